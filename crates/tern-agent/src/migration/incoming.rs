//! The destination's streams: admit, check, write pages into its own file.
//!
//! A [`Gate`] owns the migration's one port. Every connection gets a thread of its own
//! and [`HELLO_TIMEOUT`] to open with a valid `Hello` for this migration (right token,
//! id, memory size, protocol version, stream numbering); one that does not (silent,
//! wrong token, oversized hello) is answered with `Abort` and dropped without holding
//! up the others, and the gate keeps waiting for the real source until its deadline.
//! Once every stream it waits for is in, the gate closes the port.
//!
//! With a server TLS configuration (the agent's host identity) the connection's thread
//! runs the TLS handshake first, inside the same [`HELLO_TIMEOUT`]: a client without a
//! certificate from the cluster CA never gets to say `Hello`, and one whose certificate
//! is not a host's (or not the source host's, when the gate knows it) is refused
//! before its `Hello` is read.
//!
//! Admitted memory streams go to [`receive_streams`]; the device-state stream goes to
//! whoever relays it into QEMU ([`super::relay`]).

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use rustls::ServerConfig;

use super::memory::DestMemory;
use super::secure::{self, Stream};
use super::token::token_matches;
use super::wire::{self, Channel, Hello, Kind};
use super::MigrationError;

/// How long a new connection has to say `Hello`: a real source says it at once.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections at a time still owing their `Hello`. While that many are pending, the
/// gate accepts no more: later ones wait in the kernel's backlog (a source waits for
/// its `Welcome` far longer than [`HELLO_TIMEOUT`]), so a flood costs a bounded number
/// of threads and delays the real streams by about one hello timeout.
const MAX_PENDING: usize = 64;

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

/// The streams a gate waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    /// Pages of the destination's memory file; `None`: no memory streams, QEMU brings
    /// the memory itself (`qemu-native`).
    pub pages: Option<u64>,
    /// One device-state stream.
    pub device: bool,
}

/// An admitted memory stream and the number of streams its `Hello` announced.
pub type MemoryStream = (Stream, u16);

/// Where the gate hands the streams it admitted.
pub struct Admissions {
    pub memory: mpsc::Receiver<MemoryStream>,
    /// The device-state stream, once admitted (`None` when not wanted).
    pub device: Option<tokio::sync::oneshot::Receiver<Stream>>,
}

/// The port of one incoming migration, admitting streams on its own thread until all
/// wanted are in, its deadline passes, or it is dropped (which closes the port).
pub struct Gate {
    stop: Arc<AtomicBool>,
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Gate {
    /// Starts admitting plain TCP streams on `listener`.
    pub fn open(
        listener: TcpListener,
        expect: Expect,
        wanted: Wanted,
    ) -> Result<(Gate, Admissions), MigrationError> {
        Gate::open_tls(listener, expect, wanted, None)
    }

    /// Starts admitting on `listener`; with `tls`, only TLS sessions whose client
    /// certificate `tls` accepts and that is a host's.
    pub fn open_tls(
        listener: TcpListener,
        expect: Expect,
        wanted: Wanted,
        tls: Option<Arc<ServerConfig>>,
    ) -> Result<(Gate, Admissions), MigrationError> {
        Gate::open_secure(listener, expect, wanted, tls, None)
    }

    /// [`Gate::open_tls`], admitting over TLS only the certificate of host `source`
    /// when it is given.
    pub fn open_secure(
        listener: TcpListener,
        expect: Expect,
        wanted: Wanted,
        tls: Option<Arc<ServerConfig>>,
        source: Option<String>,
    ) -> Result<(Gate, Admissions), MigrationError> {
        listener
            .set_nonblocking(true)
            .map_err(wire::WireError::from)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (memory_tx, memory) = mpsc::channel();
        let (device_tx, device) = match wanted.device {
            true => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let door = Door {
            listener,
            expect: Arc::new(expect),
            tls,
            source: source.map(Arc::from),
            wanted,
            stop: stop.clone(),
            memory: memory_tx,
            device: device_tx,
        };
        std::thread::Builder::new()
            .name("migration-gate".into())
            .spawn(move || door.run())
            .map_err(wire::WireError::from)?;
        Ok((Gate { stop }, Admissions { memory, device }))
    }
}

/// The gate's thread: accepts, has each connection checked on a thread of its own,
/// and decides in one place (so the count and numbering of streams stay consistent).
struct Door {
    listener: TcpListener,
    expect: Arc<Expect>,
    tls: Option<Arc<ServerConfig>>,
    /// Over TLS, the only host whose certificate may connect (any host's when `None`).
    source: Option<Arc<str>>,
    wanted: Wanted,
    stop: Arc<AtomicBool>,
    memory: mpsc::Sender<MemoryStream>,
    device: Option<tokio::sync::oneshot::Sender<Stream>>,
}

impl Door {
    fn run(mut self) {
        let deadline = Instant::now() + self.expect.accept_timeout;
        let pending = Arc::new(AtomicUsize::new(0));
        let (checked_tx, checked) = mpsc::channel::<(Stream, Hello)>();
        let mut roll = Roll::new(self.wanted);
        while !roll.complete() && !self.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            let mut idle = true;
            let room = pending.load(Ordering::Relaxed) < MAX_PENDING;
            match room.then(|| self.listener.accept()) {
                None => {}
                Some(Ok((s, peer))) => {
                    idle = false;
                    pending.fetch_add(1, Ordering::Relaxed);
                    let (tx, owing, expect, tls, source) = (
                        checked_tx.clone(),
                        pending.clone(),
                        self.expect.clone(),
                        self.tls.clone(),
                        self.source.clone(),
                    );
                    let pages = self.wanted.pages;
                    let spawned = std::thread::Builder::new()
                        .name("migration-hello".into())
                        .spawn(move || {
                            let tls = tls.as_ref().map(|t| (t, source.as_deref()));
                            match admit_one(s, tls, &expect, pages) {
                                Ok(checked) => {
                                    let _ = tx.send(checked);
                                }
                                Err(None) => {}
                                Err(Some((mut s, reason))) => refuse(&mut s, &reason),
                            }
                            owing.fetch_sub(1, Ordering::Relaxed);
                        });
                    if spawned.is_err() {
                        pending.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!(%peer, "no thread for a new stream; dropped it");
                    }
                }
                Some(Err(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Out of descriptors and the like: the listener stays; try again a little
                // later, so the log gets a line per 100 ms rather than per poll.
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "accepting a migration stream");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            while let Ok((s, hello)) = checked.try_recv() {
                idle = false;
                self.decide(&mut roll, s, hello);
            }
            if idle {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Welcomes and hands on a checked stream, or refuses it with the reason.
    fn decide(&mut self, roll: &mut Roll, mut s: Stream, hello: Hello) {
        if let Err(reason) = roll.admit(&hello) {
            return refuse(&mut s, &reason);
        }
        let welcome = wire::u32_payload(u32::from(wire::VERSION));
        let welcomed = wire::write_frame(&mut s, Kind::Welcome, 0, &welcome)
            .and_then(|_| s.flush().map_err(wire::WireError::from));
        if let Err(e) = welcomed {
            tracing::warn!(error = %e, "an admitted migration stream went away");
            return;
        }
        match hello.channel {
            Channel::Memory => {
                let _ = self.memory.send((s, hello.streams));
            }
            Channel::DeviceState => {
                if let Some(tx) = self.device.take() {
                    let _ = tx.send(s);
                }
            }
        }
    }
}

/// Answers a connection that is not let in with `Abort` and the reason.
fn refuse(s: &mut Stream, reason: &str) {
    tracing::warn!(%reason, "refused a migration stream");
    let _ = wire::write_frame(s, Kind::Abort, 0, reason.as_bytes());
    let _ = s.flush();
}

/// One new connection, on its own thread: the TLS handshake (when the gate has a
/// server configuration) and the checked `Hello`, both within [`HELLO_TIMEOUT`] of
/// socket silence. The error is the stream and the reason to send back, or `None`
/// when there is no stream to send it on (a failed handshake; rustls has already
/// sent its alert).
fn admit_one(
    s: TcpStream,
    tls: Option<(&Arc<ServerConfig>, Option<&str>)>,
    expect: &Expect,
    pages: Option<u64>,
) -> Result<(Stream, Hello), Option<(Stream, String)>> {
    let peer = s.peer_addr().ok();
    // No Nagle from the start: the handshake and the `Welcome` are small writes each
    // answered by the source, and one held back for a delayed ACK cost the last stream
    // opened ~40 ms.
    let timeouts = s
        .set_nonblocking(false)
        .and_then(|()| s.set_nodelay(true))
        .and_then(|()| s.set_read_timeout(Some(HELLO_TIMEOUT)))
        .and_then(|()| s.set_write_timeout(Some(HELLO_TIMEOUT)));
    if let Err(e) = timeouts {
        tracing::warn!(error = %e, "a new migration stream");
        return Err(None);
    }
    let mut s = match secure::accept(s, tls.map(|(config, _)| config)) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(?peer, error = %e, "refused a migration stream: TLS handshake");
            return Err(None);
        }
    };
    if let Some((_, source)) = tls {
        if let Err(reason) = check_source(s.peer().as_ref(), source) {
            return Err(Some((s, reason)));
        }
    }
    match read_checked_hello(&mut s, expect, pages) {
        Ok(hello) => Ok((s, hello)),
        Err(reason) => Err(Some((s, reason))),
    }
}

/// Whether a stream's client certificate may bring a migration (pure): a host's, and
/// the source host's when the gate knows which it is.
fn check_source(peer: Option<&tern_pki::Peer>, source: Option<&str>) -> Result<(), String> {
    match (peer, source) {
        (Some(p), _) if p.role != tern_pki::Role::Host => Err(format!(
            "{} certificate {:?}: only hosts send migration streams",
            p.role.as_str(),
            p.name
        )),
        (Some(p), Some(source)) if p.name != source => Err(format!(
            "host {:?} is not the source of this migration ({source:?} prepared it)",
            p.name
        )),
        (Some(_), _) => Ok(()),
        (None, _) => Err("no client certificate naming a host".into()),
    }
}

/// Reads and checks a new connection's `Hello`; the error is the reason sent back.
fn read_checked_hello(
    s: &mut Stream,
    expect: &Expect,
    pages: Option<u64>,
) -> Result<Hello, String> {
    let hello = wire::read_hello(s).map_err(|e| match e {
        wire::WireError::Stalled => format!("no hello within {HELLO_TIMEOUT:?}"),
        e => e.to_string(),
    })?;
    check_hello(&hello, expect, pages)?;
    Ok(hello)
}

/// Checks a `Hello` against what this migration expects (pure); the error is the
/// reason sent back to the caller.
pub fn check_hello(hello: &Hello, expect: &Expect, pages: Option<u64>) -> Result<(), String> {
    if hello.migration != expect.migration {
        return Err(format!("unknown migration {:?}", hello.migration));
    }
    if !token_matches(&hello.token, &expect.token) {
        return Err("bad token".into());
    }
    if hello.channel == Channel::Memory {
        let Some(pages) = pages else {
            return Err("this migration takes no memory streams (qemu-native)".into());
        };
        if hello.pages != pages {
            return Err(format!(
                "source has {} pages, destination memory has {pages}",
                hello.pages
            ));
        }
    }
    Ok(())
}

/// Which streams are in so far (pure): the memory streams' count is the first
/// admitted stream's word, and each index is taken once.
#[derive(Debug)]
struct Roll {
    wanted: Wanted,
    streams: Option<u16>,
    memory: Vec<u16>,
    device: bool,
}

impl Roll {
    fn new(wanted: Wanted) -> Roll {
        Roll {
            wanted,
            streams: None,
            memory: Vec::new(),
            device: false,
        }
    }

    fn complete(&self) -> bool {
        let memory = self.wanted.pages.is_none()
            || self
                .streams
                .is_some_and(|n| self.memory.len() == usize::from(n));
        memory && self.device == self.wanted.device
    }

    fn admit(&mut self, hello: &Hello) -> Result<(), String> {
        match hello.channel {
            Channel::DeviceState if !self.wanted.device || self.device => {
                Err("no device-state stream expected".into())
            }
            Channel::DeviceState => {
                self.device = true;
                Ok(())
            }
            Channel::Memory => {
                if hello.streams == 0
                    || self.streams.is_some_and(|w| w != hello.streams)
                    || hello.stream >= hello.streams
                    || self.memory.contains(&hello.stream)
                {
                    return Err(format!(
                        "inconsistent stream numbering {}/{}",
                        hello.stream, hello.streams
                    ));
                }
                self.streams = Some(hello.streams);
                self.memory.push(hello.stream);
                Ok(())
            }
        }
    }
}

/// Accepts the source's memory streams on `listener` and writes every page into `mem`
/// until each stream says `Done`: a [`Gate`] for memory streams only, then
/// [`receive_streams`].
pub fn receive(
    listener: &TcpListener,
    mem: &DestMemory,
    expect: &Expect,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Received, MigrationError> {
    let listener = listener.try_clone().map_err(wire::WireError::from)?;
    let wanted = Wanted {
        pages: Some(mem.pages()),
        device: false,
    };
    let (_gate, admitted) = Gate::open(listener, expect.clone(), wanted)?;
    receive_streams(&admitted.memory, mem, expect, progress, cancel)
}

/// Takes the memory streams a gate admits and writes every page into `mem` until each
/// stream says `Done`. Fails on any stream error, timeout or `cancel`.
pub fn receive_streams(
    admitted: &mpsc::Receiver<MemoryStream>,
    mem: &DestMemory,
    expect: &Expect,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Received, MigrationError> {
    let deadline = Instant::now() + expect.accept_timeout;
    let mut streams: Vec<Stream> = Vec::new();
    let mut want: Option<u16> = None;
    while want.is_none_or(|w| streams.len() < usize::from(w)) {
        if cancel.load(Ordering::Relaxed) {
            return Err(MigrationError::Cancelled);
        }
        let missing = || MigrationError::StreamsMissing {
            connected: streams.len(),
            wanted: want.unwrap_or(1),
            waited: expect.accept_timeout,
        };
        if Instant::now() > deadline {
            return Err(missing());
        }
        match admitted.recv_timeout(Duration::from_millis(20)) {
            Ok((s, n)) => {
                let tcp = s.tcp();
                tcp.set_read_timeout(Some(expect.io_timeout))
                    .and_then(|()| tcp.set_write_timeout(Some(expect.io_timeout)))
                    .and_then(|()| tcp.set_nodelay(true))
                    .map_err(wire::WireError::from)?;
                want = Some(n);
                streams.push(s);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The gate gave up (its deadline): no more streams will come.
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(missing()),
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

/// One memory stream until `Done`; generic over the transport, so a TLS session can
/// carry it as well as a socket.
fn stream_loop<S: Read + Write>(
    s: S,
    mem: &DestMemory,
    progress: &Progress,
    cancel: &AtomicBool,
) -> Result<Received, MigrationError> {
    let mut got = Received::default();
    // Reads go through the buffer, the few answers straight to the stream.
    let mut reader = BufReader::with_capacity(1 << 20, s);
    loop {
        if cancel.load(Ordering::Relaxed) {
            let _ = wire::write_frame(
                reader.get_mut(),
                Kind::Abort,
                0,
                b"cancelled on the destination",
            );
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
                let s = reader.get_mut();
                wire::write_frame(s, Kind::Ack, 0, &wire::u32_payload(round))?;
                s.flush().map_err(wire::WireError::from)?;
            }
            Kind::Done => {
                let s = reader.get_mut();
                wire::write_frame(s, Kind::Ack, 0, &wire::u32_payload(0))?;
                s.flush().map_err(wire::WireError::from)?;
                return Ok(got);
            }
            _ => return Err(wire::WireError::Malformed("frame kind in a page stream").into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_pki::{Peer, Role};

    #[test]
    fn only_the_source_hosts_certificate_brings_streams() {
        let peer = |name: &str, role| Peer {
            name: name.into(),
            role,
        };
        assert!(check_source(Some(&peer("h1", Role::Host)), Some("h1")).is_ok());
        assert!(check_source(Some(&peer("h1", Role::Host)), None).is_ok());
        assert!(check_source(Some(&peer("h3", Role::Host)), Some("h1")).is_err());
        assert!(check_source(Some(&peer("manager", Role::Manager)), None).is_err());
        assert!(check_source(Some(&peer("alice", Role::Operator)), None).is_err());
        assert!(check_source(None, None).is_err());
    }

    #[test]
    fn an_admitted_stream_sends_without_nagle() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let expect = Expect {
            migration: "in-1".into(),
            token: "t".repeat(32),
            accept_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(5),
        };
        let hello = Hello {
            version: wire::VERSION,
            channel: Channel::DeviceState,
            stream: 0,
            streams: 1,
            pages: 0,
            migration: expect.migration.clone(),
            token: expect.token.clone(),
        };
        let client = std::thread::spawn(move || {
            let mut c = TcpStream::connect(addr).unwrap();
            wire::write_frame(&mut c, Kind::Hello, 0, &hello.encode()).unwrap();
            c
        });
        let (s, _) = listener.accept().unwrap();
        let (s, got) = admit_one(s, None, &expect, None)
            .map_err(|_| "refused")
            .unwrap();
        assert_eq!(got.channel, Channel::DeviceState);
        // A small answer held back for the peer's delayed ACK costs ~40 ms per stream.
        assert!(s.tcp().nodelay().unwrap());
        drop(client.join().unwrap());
    }
}
