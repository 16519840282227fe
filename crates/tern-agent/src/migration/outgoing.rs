//! The source's memory streams: connect, send a round of pages, finish.
//!
//! A round's pages are split into contiguous slices, one per TCP stream, so zero pages
//! stay in runs and each stream reads memory sequentially. Slices hold equal numbers of
//! pages with data, not equal numbers of pages: guest RAM is mostly empty at one end
//! and full at the other, and a stream that finishes early leaves the link to one. Every stream ends the round
//! with `RoundEnd` and waits for the destination's `Ack`: a round is on the destination
//! once `send_round` returns.
//!
//! A [`RoundMeter`] shows the round being sent while it runs: the streams add each batch
//! to shared counters, and the status endpoint reads them, so a round that carries
//! gigabytes is seen moving rather than only once it ends.

use std::io::{BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_migrate::RoundProgress;

use xxhash_rust::xxh3::xxh3_64;

use super::memory::{is_zero, zero_digest, SentDigests, SourceMemory};
use super::pace::Pacer;
use super::secure::{self, ClientTls, Stream};
use super::wire::{self, Batch, Channel, Hello, Kind, PAGE_SIZE};
use super::MigrationError;

/// How the memory is put on the wire.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Parallel TCP streams; more than one helps when one core cannot fill the link.
    pub streams: usize,
    /// LZ4 per batch, kept only where it shrinks the batch.
    pub lz4: bool,
    /// Bandwidth cap over all streams, bytes per second.
    pub rate_bytes_per_s: Option<u64>,
    /// A socket that cannot move a byte for this long is a dead link.
    pub io_timeout: Duration,
    /// Pages per `Pages` frame.
    pub batch_pages: usize,
    /// Mutual TLS to the destination (both agents have host identities); `None`: plain
    /// TCP, the token in the `Hello` the only check.
    pub tls: Option<ClientTls>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            streams: tern_migrate::precopy::STREAMS as usize,
            lz4: false,
            rate_bytes_per_s: None,
            // Generous: on a loaded host the peer's stream thread can go seconds without
            // the CPU, and a false "link down" costs a whole migration. Short enough that
            // a cut link is rolled back well within 15 s (docs/migration.md).
            io_timeout: Duration::from_secs(10),
            batch_pages: 64,
            tls: None,
        }
    }
}

/// What one round put on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundTransfer {
    pub data_pages: u64,
    pub zero_pages: u64,
    /// Bytes written to the sockets, frame headers included.
    pub bytes: u64,
}

/// Live counters of the round being sent. The streams only add to atomics, once per
/// batch; the lock is taken when a round begins or ends and when the counters are read,
/// never per page.
#[derive(Debug, Default)]
pub struct RoundMeter {
    /// The round under way: (round, pages planned, when it began, live-phase seconds then).
    running: Mutex<Option<(u32, u64, Instant, f64)>>,
    pages: AtomicU64,
    bytes: AtomicU64,
}

impl RoundMeter {
    /// Starts counting `round`, which sends `pages_planned` pages; `elapsed_s`: seconds
    /// since the live phase began.
    pub fn begin(&self, round: u32, pages_planned: u64, elapsed_s: f64) {
        let mut running = self.running.lock().expect("round meter lock");
        // Reset under the lock: a reader never sees the new round with the old counts.
        self.pages.store(0, Ordering::Relaxed);
        self.bytes.store(0, Ordering::Relaxed);
        *running = Some((round, pages_planned, Instant::now(), elapsed_s));
    }

    /// No round is under way any more.
    pub fn end(&self) {
        *self.running.lock().expect("round meter lock") = None;
    }

    fn add(&self, pages: u64, bytes: u64) {
        self.pages.fetch_add(pages, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The round under way, if any.
    pub fn read(&self) -> Option<RoundProgress> {
        let running = self.running.lock().expect("round meter lock");
        let (round, pages_planned, began, at) = (*running)?;
        let duration_s = began.elapsed().as_secs_f64();
        Some(RoundProgress {
            round,
            pages_planned,
            pages_sent: self.pages.load(Ordering::Relaxed).min(pages_planned),
            bytes_sent: self.bytes.load(Ordering::Relaxed),
            duration_s,
            elapsed_s: at + duration_s,
        })
    }
}

/// The connected memory streams of one outgoing migration.
pub struct Outgoing {
    streams: Vec<Stream>,
    opts: StreamOptions,
    pacer: Option<Pacer>,
    meter: Arc<RoundMeter>,
}

impl Outgoing {
    /// Opens `opts.streams` connections to the destination and shakes hands on each.
    pub fn connect(
        addr: SocketAddr,
        migration: &str,
        token: &str,
        pages: u64,
        opts: StreamOptions,
    ) -> Result<Outgoing, MigrationError> {
        let count = opts.streams.clamp(1, 16);
        let mut streams = Vec::with_capacity(count);
        for stream in 0..count {
            let hello = Hello {
                version: wire::VERSION,
                channel: Channel::Memory,
                stream: stream as u16,
                streams: count as u16,
                pages,
                migration: migration.to_string(),
                token: token.to_string(),
            };
            streams.push(open_stream(addr, &hello, &opts)?);
        }
        let pacer = opts.rate_bytes_per_s.map(Pacer::new);
        Ok(Outgoing {
            streams,
            opts,
            pacer,
            meter: Arc::default(),
        })
    }

    /// Counts what the rounds send on `meter` (by default a meter nobody reads).
    pub fn with_meter(mut self, meter: Arc<RoundMeter>) -> Self {
        self.meter = meter;
        self
    }

    /// The meter the rounds count on; whoever sends a round calls its `begin` first.
    pub fn meter(&self) -> &Arc<RoundMeter> {
        &self.meter
    }

    /// Sends `pages` (ascending indices) as round `round`; records the digest of every
    /// page as sent. Returns once the destination acknowledged the round on all streams.
    pub fn send_round(
        &mut self,
        round: u32,
        mem: &SourceMemory,
        sent: &SentDigests,
        pages: &[u64],
        cancel: &AtomicBool,
    ) -> Result<RoundTransfer, MigrationError> {
        let n = self.streams.len();
        let data = AtomicU64::new(0);
        let zeros = AtomicU64::new(0);
        let bytes = AtomicU64::new(0);
        let opts = &self.opts;
        let pacer = self.pacer.as_ref();
        let meter = &*self.meter;
        let bounds = balanced_slices(pages, n, |p| mem.has_data(p));
        let results: Vec<Result<(), MigrationError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .streams
                .iter_mut()
                .enumerate()
                .map(|(i, stream)| {
                    let slice = &pages[bounds[i]..bounds[i + 1]];
                    let (data, zeros, bytes) = (&data, &zeros, &bytes);
                    s.spawn(move || -> Result<(), MigrationError> {
                        let link = Link {
                            opts,
                            pacer,
                            meter,
                            cancel,
                        };
                        let t = send_slice(stream, round, mem, sent, slice, &link)?;
                        data.fetch_add(t.data_pages, Ordering::Relaxed);
                        zeros.fetch_add(t.zero_pages, Ordering::Relaxed);
                        bytes.fetch_add(t.bytes, Ordering::Relaxed);
                        Ok(())
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("memory stream thread panicked"))
                .collect()
        });
        results.into_iter().collect::<Result<(), _>>()?;
        Ok(RoundTransfer {
            data_pages: data.into_inner(),
            zero_pages: zeros.into_inner(),
            bytes: bytes.into_inner(),
        })
    }

    /// Tells the destination no more pages come; waits for it to confirm every stream.
    pub fn finish(mut self) -> Result<(), MigrationError> {
        for s in &mut self.streams {
            wire::write_frame(s, Kind::Done, 0, &[])?;
            s.flush().map_err(wire::WireError::from)?;
        }
        for s in &mut self.streams {
            wire::expect(s, Kind::Ack)?;
        }
        Ok(())
    }

    /// Tells the destination this migration is abandoned; best effort, the link may be
    /// gone. Never waits: on a cut link a blocking write would hold the rollback for
    /// the stream timeout, once per stream.
    pub fn abort(mut self, reason: &str) {
        for s in &mut self.streams {
            if s.tcp().set_nonblocking(true).is_ok() {
                let _ = wire::write_frame(s, Kind::Abort, 0, reason.as_bytes());
                let _ = s.flush();
            }
        }
    }
}

/// Connects one stream to the destination's migration port (over TLS when `opts`
/// say so) and shakes hands: `Hello` out, `Welcome` back.
pub fn open_stream(
    addr: SocketAddr,
    hello: &Hello,
    opts: &StreamOptions,
) -> Result<Stream, MigrationError> {
    let io_timeout = opts.io_timeout;
    let started = std::time::Instant::now();
    let s = TcpStream::connect_timeout(&addr, io_timeout)
        .map_err(|source| MigrationError::Connect { addr, source })?;
    s.set_nodelay(true)
        .and_then(|()| s.set_read_timeout(Some(io_timeout)))
        .and_then(|()| s.set_write_timeout(Some(io_timeout)))
        .map_err(wire::WireError::from)?;
    // A write timeout alone restarts with every write that moved a byte, so a cut link
    // took two or three of them to show. With this, data the peer has not acknowledged
    // for `io_timeout` ends the connection, and the blocked write fails at once.
    let ms = u32::try_from(io_timeout.as_millis()).unwrap_or(u32::MAX);
    rustix::net::sockopt::set_tcp_user_timeout(&s, ms)
        .map_err(|e| wire::WireError::from(std::io::Error::from(e)))?;
    let tcp_ms = started.elapsed().as_secs_f64() * 1e3;
    let mut s = secure::connect(s, addr, opts.tls.as_ref())?;
    let tls_ms = started.elapsed().as_secs_f64() * 1e3;
    handshake(&mut s, hello)?;
    tracing::debug!(
        channel = ?hello.channel,
        stream = hello.stream,
        tcp_ms,
        tls_ms,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "stream opened"
    );
    Ok(s)
}

/// Says `hello` and waits for the `Welcome`; any transport will do.
pub fn handshake<S: Read + Write>(s: &mut S, hello: &Hello) -> Result<(), MigrationError> {
    wire::write_frame(s, Kind::Hello, 0, &hello.encode())?;
    s.flush().map_err(wire::WireError::from)?;
    wire::expect(s, Kind::Welcome)?;
    Ok(())
}

/// Boundaries (`n + 1` indices into `pages`, first 0, last `pages.len()`) cutting it
/// into `n` contiguous slices with about the same number of pages for which `heavy`
/// holds; pages without data cost next to nothing to send.
fn balanced_slices(pages: &[u64], n: usize, heavy: impl Fn(u64) -> bool) -> Vec<usize> {
    let total = pages.iter().filter(|&&p| heavy(p)).count();
    if total == 0 {
        return (0..=n).map(|i| i * pages.len() / n).collect();
    }
    let mut bounds = Vec::with_capacity(n + 1);
    bounds.push(0);
    let mut seen = 0;
    for (i, &p) in pages.iter().enumerate() {
        if bounds.len() == n {
            break;
        }
        if heavy(p) {
            seen += 1;
            if seen * n >= total * bounds.len() {
                bounds.push(i + 1);
            }
        }
    }
    while bounds.len() < n {
        bounds.push(pages.len());
    }
    bounds.push(pages.len());
    bounds
}

/// What every stream of a round shares.
struct Link<'a> {
    opts: &'a StreamOptions,
    pacer: Option<&'a Pacer>,
    meter: &'a RoundMeter,
    cancel: &'a AtomicBool,
}

/// Sends one stream's slice of a round and waits for its `Ack`.
fn send_slice<S: Read + Write>(
    stream: &mut S,
    round: u32,
    mem: &SourceMemory,
    sent: &SentDigests,
    pages: &[u64],
    link: &Link,
) -> Result<RoundTransfer, MigrationError> {
    let mut batches = Batches {
        out: BufWriter::with_capacity(1 << 20, &mut *stream),
        batch: Batch::with_capacity(link.opts.batch_pages),
        total: RoundTransfer::default(),
        link,
    };
    let written =
        write_slice(&mut batches, mem, sent, pages).and_then(|()| batches.end_round(round));
    let total = match written {
        Ok(total) => {
            // Flushed by `end_round`: dropping it writes nothing.
            drop(batches);
            total
        }
        Err(e) => {
            // Dropping a buffered writer flushes it: on a dead link that is one more
            // stream timeout before the error is even seen. What is buffered is lost.
            let _ = batches.out.into_parts();
            return Err(e);
        }
    };
    let ack = wire::expect(stream, Kind::Ack)?;
    if wire::parse_u32(&ack.payload)? != round {
        return Err(wire::WireError::Malformed("ack for another round").into());
    }
    Ok(total)
}

/// Puts a slice's pages into batches: data pages, zero pages as runs.
fn write_slice<W: Write>(
    batches: &mut Batches<'_, W>,
    mem: &SourceMemory,
    sent: &SentDigests,
    pages: &[u64],
) -> Result<(), MigrationError> {
    let link = batches.link;
    let mut buf = [0u8; PAGE_SIZE];
    // An open zero run: (first page, count).
    let mut run: Option<(u64, u32)> = None;
    for &index in pages {
        // A hole is a zero page known without reading it (reading would allocate it).
        let hole = !mem.has_data(index);
        if !hole {
            mem.read_page(index, &mut buf);
        }
        if hole || is_zero(&buf) {
            sent.set(index, zero_digest());
            run = match run {
                Some((first, count)) if first + u64::from(count) == index && count < u32::MAX => {
                    Some((first, count + 1))
                }
                other => {
                    if let Some((first, count)) = other {
                        batches.batch.push_zero_run(first as u32, count);
                    }
                    Some((index, 1))
                }
            };
            continue;
        }
        if let Some((first, count)) = run.take() {
            batches.batch.push_zero_run(first as u32, count);
        }
        sent.set(index, xxh3_64(&buf));
        batches.batch.push_data(index as u32, &buf);
        if batches.batch.data_pages >= link.opts.batch_pages {
            batches.flush()?;
        }
    }
    if let Some((first, count)) = run.take() {
        batches.batch.push_zero_run(first as u32, count);
    }
    batches.flush()
}

/// One stream's batches of a round on their way to the socket.
struct Batches<'l, W: Write> {
    out: BufWriter<W>,
    batch: Batch,
    total: RoundTransfer,
    link: &'l Link<'l>,
}

impl<W: Write> Batches<'_, W> {
    /// Seals the open batch and writes it as one `Pages` frame, paced and counted.
    fn flush(&mut self) -> Result<(), MigrationError> {
        let Link {
            opts,
            pacer,
            meter,
            cancel,
        } = *self.link;
        if self.batch.is_empty() {
            return Ok(());
        }
        if cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        let (flags, payload) = self.batch.seal(opts.lz4);
        if let Some(p) = pacer {
            p.wait(payload.len() as u64 + 8);
        }
        let bytes = wire::write_frame(&mut self.out, Kind::Pages, flags, &payload)? as u64;
        self.total.bytes += bytes;
        self.total.data_pages += self.batch.data_pages as u64;
        self.total.zero_pages += self.batch.zero_pages;
        meter.add(self.batch.data_pages as u64 + self.batch.zero_pages, bytes);
        self.batch.clear();
        Ok(())
    }

    /// Ends the round on this stream and pushes everything out; returns what it carried.
    fn end_round(&mut self, round: u32) -> Result<RoundTransfer, MigrationError> {
        let end = wire::u32_payload(round);
        let end = wire::write_frame(&mut self.out, Kind::RoundEnd, 0, &end)? as u64;
        self.total.bytes += end;
        self.link.meter.add(0, end);
        self.out.flush().map_err(wire::WireError::from)?;
        Ok(self.total)
    }
}

#[cfg(test)]
mod tests {
    use super::balanced_slices;

    #[test]
    fn slices_carry_equal_shares_of_pages_with_data() {
        // Data in 60..100 only: two streams split it 20/20, not 50/50 by page count.
        let pages: Vec<u64> = (0..100).collect();
        let b = balanced_slices(&pages, 2, |p| p >= 60);
        assert_eq!(b, vec![0, 80, 100]);
        let b = balanced_slices(&pages, 4, |p| p >= 60);
        assert_eq!(b, vec![0, 70, 80, 90, 100]);
        // No data at all: split by count; more streams than pages: empty slices.
        assert_eq!(balanced_slices(&pages, 2, |_| false), vec![0, 50, 100]);
        assert_eq!(balanced_slices(&[5], 3, |_| true), vec![0, 1, 1, 1]);
        assert_eq!(balanced_slices(&[], 2, |_| true), vec![0, 0, 0]);
    }
}
