//! The destination's memory streams: accept, check, write pages into its own file.
//!
//! A connection that does not open with a valid `Hello` for this migration (wrong
//! token, wrong id, wrong memory size, other protocol version) is answered with `Abort`
//! and dropped; the listener keeps waiting for the real source until its deadline.

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::memory::DestMemory;
use super::wire::{self, Hello, Kind};
use super::MigrationError;

/// What the destination expects of the streams that will connect.
#[derive(Debug, Clone)]
pub struct Expect {
    pub migration: String,
    pub token: String,
    /// How long to wait for the source to connect all its streams.
    pub accept_timeout: Duration,
    /// A stream silent for this long is a dead source or a cut link.
    pub io_timeout: Duration,
}

/// What arrived over all streams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    pub bytes: u64,
    pub data_pages: u64,
    pub zero_pages: u64,
    /// Highest round number acknowledged.
    pub rounds: u32,
}

/// Live counters the status endpoint reads while pages arrive.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes: AtomicU64,
    pub data_pages: AtomicU64,
    pub rounds: AtomicU64,
}

/// Accepts the source's streams on `listener` and writes every page into `mem` until
/// each stream says `Done`. Fails on any stream error, timeout or `cancel`.
pub fn receive(
    listener: &TcpListener,
    mem: &DestMemory,
    expect: &Expect,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Received, MigrationError> {
    listener
        .set_nonblocking(true)
        .map_err(wire::WireError::from)?;
    let deadline = Instant::now() + expect.accept_timeout;
    let mut streams: Vec<TcpStream> = Vec::new();
    let mut want: Option<u16> = None;
    while want.is_none_or(|w| streams.len() < w as usize) {
        if cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        if Instant::now() > deadline {
            return Err(MigrationError::StreamsMissing {
                connected: streams.len(),
                wanted: want.unwrap_or(1),
                waited: expect.accept_timeout,
            });
        }
        let mut s = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            Err(e) => return Err(wire::WireError::from(e).into()),
        };
        s.set_nonblocking(false).map_err(wire::WireError::from)?;
        s.set_read_timeout(Some(expect.io_timeout))
            .map_err(wire::WireError::from)?;
        s.set_write_timeout(Some(expect.io_timeout))
            .map_err(wire::WireError::from)?;
        s.set_nodelay(true).map_err(wire::WireError::from)?;
        match admit(&mut s, mem, expect, want) {
            Ok(hello) => {
                want = Some(hello.streams);
                wire::write_frame(
                    &mut s,
                    Kind::Welcome,
                    0,
                    &u32::from(wire::VERSION).to_le_bytes(),
                )?;
                streams.push(s);
            }
            Err(reason) => {
                tracing::warn!(%reason, "refused a memory stream");
                let _ = wire::write_frame(&mut s, Kind::Abort, 0, reason.as_bytes());
            }
        }
    }
    let results: Vec<Result<Received, MigrationError>> = std::thread::scope(|sc| {
        let handles: Vec<_> = streams
            .into_iter()
            .map(|s| sc.spawn(move || stream_loop(s, mem, progress, cancel)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("memory stream thread panicked"))
            .collect()
    });
    let mut total = Received::default();
    for r in results {
        let r = r?;
        total.bytes += r.bytes;
        total.data_pages += r.data_pages;
        total.zero_pages += r.zero_pages;
        total.rounds = total.rounds.max(r.rounds);
    }
    Ok(total)
}

/// Checks a stream's `Hello`; the error is the reason sent back to the caller.
fn admit(
    s: &mut TcpStream,
    mem: &DestMemory,
    expect: &Expect,
    want: Option<u16>,
) -> Result<Hello, String> {
    let frame = wire::expect(s, Kind::Hello).map_err(|e| e.to_string())?;
    let hello = Hello::decode(&frame.payload).map_err(|e| e.to_string())?;
    if hello.migration != expect.migration {
        return Err(format!("unknown migration {:?}", hello.migration));
    }
    if hello.token != expect.token {
        return Err("bad token".into());
    }
    if hello.pages != mem.pages() {
        return Err(format!(
            "source has {} pages, destination memory has {}",
            hello.pages,
            mem.pages()
        ));
    }
    if hello.streams == 0
        || want.is_some_and(|w| w != hello.streams)
        || hello.stream >= hello.streams
    {
        return Err(format!(
            "inconsistent stream numbering {}/{}",
            hello.stream, hello.streams
        ));
    }
    Ok(hello)
}

fn stream_loop(
    mut s: TcpStream,
    mem: &DestMemory,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Received, MigrationError> {
    let mut got = Received::default();
    let mut reader =
        BufReader::with_capacity(1 << 20, s.try_clone().map_err(wire::WireError::from)?);
    loop {
        if cancel.load(Ordering::Relaxed) {
            let _ = wire::write_frame(&mut s, Kind::Abort, 0, b"cancelled on the destination");
            return Err(MigrationError::Cancelled);
        }
        let frame = wire::read_frame(&mut reader)?;
        got.bytes += 8 + frame.payload.len() as u64;
        progress
            .bytes
            .fetch_add(8 + frame.payload.len() as u64, Ordering::Relaxed);
        match frame.kind {
            Kind::Pages => {
                let raw = wire::unseal(&frame)?;
                let entries = wire::entries(&raw)?;
                mem.apply(&entries)?;
                for e in &entries {
                    match e {
                        wire::Entry::Data { .. } => got.data_pages += 1,
                        wire::Entry::ZeroRun { count, .. } => got.zero_pages += u64::from(*count),
                    }
                }
                progress
                    .data_pages
                    .fetch_add(entries.len() as u64, Ordering::Relaxed);
            }
            Kind::RoundEnd => {
                let round = wire::parse_u32(&frame.payload)?;
                got.rounds = got.rounds.max(round);
                progress
                    .rounds
                    .fetch_max(u64::from(round), Ordering::Relaxed);
                wire::write_frame(&mut s, Kind::Ack, 0, &wire::u32_payload(round))?;
                s.flush().map_err(wire::WireError::from)?;
            }
            Kind::Done => {
                wire::write_frame(&mut s, Kind::Ack, 0, &wire::u32_payload(0))?;
                return Ok(got);
            }
            _ => return Err(wire::WireError::Malformed("frame kind in a page stream").into()),
        }
    }
}
