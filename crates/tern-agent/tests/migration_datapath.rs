//! The memory data path on one machine: two plain files, loopback TCP, a thread that
//! keeps rewriting the source "guest" while rounds run.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use migration_support::writer;
use rand::{Rng, SeedableRng};
use tern_agent::migration::incoming::{self, Expect, Progress, Received};
use tern_agent::migration::memory::{changed_pages, DestMemory, SentDigests, SourceMemory};
use tern_agent::migration::outgoing::{Outgoing, StreamOptions};
use tern_agent::migration::wire::PAGE_SIZE;
use tern_agent::migration::{wire, MigrationError};

mod migration_support;

const PAGES: u64 = 4096; // 16 MiB

/// A source file with a quarter of its pages non-zero, like a lightly used guest.
fn source_file(dir: &std::path::Path, seed: u64) -> std::path::PathBuf {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut content = vec![0u8; PAGES as usize * PAGE_SIZE];
    for page in content.chunks_mut(PAGE_SIZE) {
        if rng.gen_ratio(1, 4) {
            rng.fill(page);
        }
    }
    let path = dir.join("source.mem");
    std::fs::write(&path, &content).unwrap();
    path
}

fn expect(token: &str) -> Expect {
    Expect {
        migration: "m1".into(),
        token: token.into(),
        accept_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
    }
}

/// A source file, a destination file and a destination listener on loopback.
struct Pair {
    _dir: tempfile::TempDir,
    src_path: std::path::PathBuf,
    mem: SourceMemory,
    dest: DestMemory,
    listener: TcpListener,
    addr: std::net::SocketAddr,
    cancel: AtomicBool,
    progress: Progress,
}

impl Pair {
    fn new(seed: u64) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let src_path = source_file(dir.path(), seed);
        let dest =
            DestMemory::open(&dir.path().join("dest.mem"), PAGES * PAGE_SIZE as u64).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        Pair {
            mem: SourceMemory::open(&src_path).unwrap(),
            addr: listener.local_addr().unwrap(),
            src_path,
            dest,
            listener,
            cancel: AtomicBool::new(false),
            progress: Progress::default(),
            _dir: dir,
        }
    }

    /// Runs `source` while the destination receives with `token`.
    fn run<T: Send>(
        &self,
        token: &str,
        source: impl FnOnce(&Pair) -> T + Send,
    ) -> (T, Result<Received, MigrationError>) {
        std::thread::scope(|s| {
            let expect = expect(token);
            let rx = s.spawn(move || {
                incoming::receive(
                    &self.listener,
                    &self.dest,
                    &expect,
                    &self.progress,
                    &self.cancel,
                )
            });
            let t = source(self);
            (t, rx.join().unwrap())
        })
    }

    fn connect(&self, token: &str, opts: StreamOptions) -> Result<Outgoing, MigrationError> {
        Outgoing::connect(self.addr, "m1", token, self.mem.pages(), opts)
    }

    /// Sends everything that differs as one round.
    fn round(
        &self,
        out: &mut Outgoing,
        round: u32,
        sent: &SentDigests,
    ) -> tern_agent::migration::outgoing::RoundTransfer {
        let pages = changed_pages(&self.mem, sent, 2);
        out.send_round(round, &self.mem, sent, &pages, &self.cancel)
            .unwrap()
    }

    fn assert_identical(&self) {
        let src_digest = xxhash_rust::xxh3::xxh3_64(&std::fs::read(&self.src_path).unwrap());
        assert_eq!(
            self.dest.digest(),
            src_digest,
            "destination memory differs from the source"
        );
    }
}

#[test]
fn rounds_under_a_running_writer_end_with_identical_memory() {
    let pair = Pair::new(1);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = writer(
        pair.src_path.clone(),
        256,
        20_000,
        Arc::default(),
        stop.clone(),
    );
    let ((), received) = pair.run("t0k", |p| {
        let opts = StreamOptions {
            streams: 3,
            lz4: true,
            ..StreamOptions::default()
        };
        let mut out = p.connect("t0k", opts).unwrap();
        let sent = SentDigests::new(p.mem.pages());
        let mut round_pages = Vec::new();
        for round in 1..=4 {
            round_pages.push(p.round(&mut out, round, &sent).data_pages);
        }
        // Round 1 carries the non-zero quarter; later rounds only the hot set.
        assert!(round_pages[0] > 900, "{round_pages:?}");
        assert!(
            round_pages[1..].iter().all(|&n| n <= 256),
            "{round_pages:?}"
        );
        // Stop-and-copy: the writer stops (the VM is paused), a final pass, done.
        stop.store(true, Ordering::Relaxed);
        assert!(writer.join().unwrap() > 0);
        p.round(&mut out, 5, &sent);
        assert!(changed_pages(&p.mem, &sent, 2).is_empty());
        out.finish().unwrap();
    });
    assert_eq!(received.unwrap().rounds, 5);
    pair.assert_identical();
}

#[test]
fn a_page_that_became_zero_is_zeroed_on_the_destination() {
    let pair = Pair::new(2);
    let ((), received) = pair.run("t", |p| {
        let sent = SentDigests::new(p.mem.pages());
        let mut out = p.connect("t", StreamOptions::default()).unwrap();
        p.round(&mut out, 1, &sent);
        let mut content = std::fs::read(&p.src_path).unwrap();
        content[..PAGE_SIZE * 64].fill(0);
        std::fs::write(&p.src_path, &content).unwrap();
        let pages = changed_pages(&p.mem, &sent, 1);
        assert!(!pages.is_empty() && pages.iter().all(|&p| p < 64));
        let t = p.round(&mut out, 2, &sent);
        assert_eq!(t.data_pages, 0);
        assert_eq!(t.zero_pages, pages.len() as u64);
        out.finish().unwrap();
    });
    received.unwrap();
    pair.assert_identical();
}

#[test]
fn a_wrong_stream_token_of_the_right_length_is_refused_and_the_real_source_still_gets_through() {
    let pair = Pair::new(3);
    let right = tern_agent::migration::token::stream_token().unwrap();
    let wrong = tern_agent::migration::token::stream_token().unwrap();
    assert_eq!(right.len(), 64, "32 random bytes, hex");
    assert_eq!(wrong.len(), right.len());
    let ((), received) = pair.run(&right, |p| {
        match p.connect(&wrong, StreamOptions::default()) {
            Err(MigrationError::Wire(e)) => assert!(e.to_string().contains("bad token"), "{e}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a wrong token was accepted"),
        }
        let sent = SentDigests::new(p.mem.pages());
        let mut out = p.connect(&right, StreamOptions::default()).unwrap();
        p.round(&mut out, 1, &sent);
        out.finish().unwrap();
    });
    received.unwrap();
    pair.assert_identical();
}

#[test]
fn a_destination_that_goes_away_fails_the_round_promptly() {
    let pair = Pair::new(4);
    // A destination that welcomes the streams and then dies.
    let fake_dest = {
        let listener = pair.listener.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut conns = Vec::new();
            for _ in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                wire::read_frame(&mut s).unwrap();
                wire::write_frame(&mut s, wire::Kind::Welcome, 0, &[1, 0, 0, 0]).unwrap();
                conns.push(s);
            }
        })
    };
    let opts = StreamOptions {
        io_timeout: Duration::from_secs(2),
        ..StreamOptions::default()
    };
    let mut out = pair.connect("t", opts).unwrap();
    fake_dest.join().unwrap();
    let sent = SentDigests::new(pair.mem.pages());
    let started = std::time::Instant::now();
    let pages = changed_pages(&pair.mem, &sent, 1);
    let err = out
        .send_round(1, &pair.mem, &sent, &pages, &pair.cancel)
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(err, MigrationError::Wire(_)), "{err}");
}

#[test]
fn the_bandwidth_cap_holds_over_a_round() {
    let pair = Pair::new(5);
    let rate = 20u64 << 20; // 20 MiB/s: the ~4 MiB of non-zero pages take ~200 ms
    let ((), received) = pair.run("t", |p| {
        let opts = StreamOptions {
            rate_bytes_per_s: Some(rate),
            ..StreamOptions::default()
        };
        let mut out = p.connect("t", opts).unwrap();
        let sent = SentDigests::new(p.mem.pages());
        let started = std::time::Instant::now();
        let t = p.round(&mut out, 1, &sent);
        let secs = started.elapsed().as_secs_f64();
        let burst = (512u64 << 10) as f64;
        let floor = (t.bytes as f64 - burst) / rate as f64;
        assert!(
            secs >= floor * 0.95,
            "{} bytes in {secs:.3}s beats the cap (floor {floor:.3}s)",
            t.bytes
        );
        out.finish().unwrap();
    });
    received.unwrap();
}

/// The destination's real timeouts: a stream may be silent for 30 s between rounds.
fn patient(token: &str) -> Expect {
    Expect {
        io_timeout: Duration::from_secs(30),
        ..expect(token)
    }
}

/// Moves the memory while `silent` strangers hold connections to the port they opened
/// first; returns how long the source waited for its streams to be admitted.
fn migrate_past_silent_connections(seed: u64, silent: usize) -> Duration {
    let pair = Pair::new(seed);
    let token = tern_agent::migration::token::stream_token().unwrap();
    let listener = pair.listener.try_clone().unwrap();
    let wanted = incoming::Wanted {
        pages: Some(pair.mem.pages()),
        device: false,
    };
    let (_gate, admitted) = incoming::Gate::open(listener, patient(&token), wanted).unwrap();
    let silent: Vec<_> = (0..silent)
        .map(|_| std::net::TcpStream::connect(pair.addr).unwrap())
        .collect();
    let started = std::time::Instant::now();
    let (waited, received) = std::thread::scope(|s| {
        let memory = admitted.memory;
        let (pair, expect) = (&pair, patient(&token));
        let rx = s.spawn(move || {
            incoming::receive_streams(&memory, &pair.dest, &expect, &pair.progress, &pair.cancel)
        });
        let sent = SentDigests::new(pair.mem.pages());
        let mut out = pair.connect(&token, StreamOptions::default()).unwrap();
        let waited = started.elapsed();
        pair.round(&mut out, 1, &sent);
        out.finish().unwrap();
        (waited, rx.join().unwrap())
    });
    received.unwrap();
    pair.assert_identical();
    // The strangers were cut off after the hello timeout, with a reason.
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        match wire::read_frame(&mut s) {
            Err(wire::WireError::Aborted(reason)) => {
                assert!(reason.contains("no hello"), "{reason}")
            }
            other => panic!("a silent connection was not refused: {other:?}"),
        }
    }
    waited
}

#[test]
fn a_silent_connection_to_the_memory_port_does_not_fail_the_migration() {
    // Admitted beside the silent ones, not after them.
    let waited = migrate_past_silent_connections(6, 5);
    assert!(waited < Duration::from_secs(1), "waited {waited:?}");
}

#[test]
fn a_flood_of_silent_connections_delays_the_source_by_one_hello_timeout_at_most() {
    // More than the gate reads at once: the rest wait in the backlog, the source too.
    let waited = migrate_past_silent_connections(9, 100);
    assert!(waited < Duration::from_secs(4), "waited {waited:?}");
}

#[test]
fn a_hello_above_4_kib_is_refused_without_waiting_for_it() {
    use std::io::Write;
    let pair = Pair::new(8);
    let ((), received) = pair.run("t", |p| {
        let mut s = std::net::TcpStream::connect(p.addr).unwrap();
        // A header announcing a 60 MiB hello, and nothing after it.
        let mut header = vec![wire::Kind::Hello as u8, 0, 0, 0];
        header.extend_from_slice(&(60u32 << 20).to_le_bytes());
        s.write_all(&header).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let t0 = std::time::Instant::now();
        match wire::read_frame(&mut s) {
            Err(wire::WireError::Aborted(reason)) => assert!(reason.contains("length"), "{reason}"),
            other => panic!("an oversized hello was not refused: {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
        let sent = SentDigests::new(p.mem.pages());
        let mut out = p.connect("t", StreamOptions::default()).unwrap();
        p.round(&mut out, 1, &sent);
        out.finish().unwrap();
    });
    received.unwrap();
    pair.assert_identical();
}
