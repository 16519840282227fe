//! The live phase under each policy, on plain files over loopback: a writer thread plays
//! the guest (its speed follows the throttle the policy asks for), the policy decides
//! when to stop, and after the final pass the two files are identical. The migration's
//! status view is read while it runs, as `GET /v1/migrations/{id}` reads it.

use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use migration_support::writer;
use rand::{Rng, SeedableRng};
use tern_agent::migration::incoming::{self, Expect, Progress};
use tern_agent::migration::memory::{changed_pages, DestMemory, SentDigests, SourceMemory};
use tern_agent::migration::outgoing::{Outgoing, StreamOptions};
use tern_agent::migration::precopy::{self, PrecopyConfig, Throttle};
use tern_agent::migration::session::{MigrationView, Outbound, Phase};
use tern_agent::migration::wire::PAGE_SIZE;
use tern_migrate::{PolicyKind, StopReason};

mod migration_support;

const PAGES: u64 = 8192; // 32 MiB

/// The writer's speed control: the throttle percent it honours.
struct WriterThrottle(Arc<AtomicU8>);

impl Throttle for WriterThrottle {
    fn apply(&mut self, percent: u8) -> u8 {
        self.0.store(percent, Ordering::Relaxed);
        percent
    }
}

struct Run {
    stop_reason: StopReason,
    rounds: usize,
    max_throttle: u8,
    /// Throttle in effect at the end of round 1 (set by the round-1 probe, if any).
    first_round_throttle: u8,
}

/// A migration's status record, as the source agent keeps it.
fn job() -> Outbound {
    let mut view = MigrationView::new("m", "v", "http://127.0.0.1:1", Default::default());
    view.phase = Phase::PreCopy;
    Outbound::new(view)
}

/// Migrates a 32 MiB file with a hot set of `hot` pages (0: no writer) written at
/// `pages_per_s`, over a link capped at `rate`, under `policy`, probing round 1 after
/// `probe_bytes` (0: the default), recording into `job` as the agent does; checks the
/// result is identical.
fn migrate(
    policy: PolicyKind,
    hot: u64,
    pages_per_s: u64,
    rate: u64,
    probe_bytes: u64,
    job: &Outbound,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.mem");
    let mut content = vec![0u8; PAGES as usize * PAGE_SIZE];
    rand_chacha::ChaCha8Rng::seed_from_u64(1).fill(&mut content[..PAGES as usize * PAGE_SIZE / 2]);
    std::fs::write(&src, &content).unwrap();
    let mem = SourceMemory::open(&src).unwrap();
    let dest = DestMemory::open(&dir.path().join("dst.mem"), PAGES * PAGE_SIZE as u64).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = AtomicBool::new(false);
    let progress = Progress::default();
    let expect = Expect {
        migration: "m".into(),
        token: "t".into(),
        accept_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
    };
    let speed = Arc::new(AtomicU8::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let w = (hot > 0).then(|| writer(src.clone(), hot, pages_per_s, speed.clone(), stop.clone()));
    let run = std::thread::scope(|s| {
        let rx = s.spawn(|| incoming::receive(&listener, &dest, &expect, &progress, &cancel));
        let opts = StreamOptions {
            rate_bytes_per_s: Some(rate),
            ..StreamOptions::default()
        };
        let mut out = Outgoing::connect(addr, "m", "t", mem.pages(), opts)
            .unwrap()
            .with_meter(job.meter.clone());
        let sent = SentDigests::new(mem.pages());
        let cfg = PrecopyConfig {
            max_elapsed_s: 10.0,
            initial_bandwidth_bytes_per_s: rate as f64,
            probe_bytes: if probe_bytes > 0 {
                probe_bytes
            } else {
                PrecopyConfig::default().probe_bytes
            },
            ..PrecopyConfig::default()
        };
        let mut throttle = WriterThrottle(speed.clone());
        let mut seen = Vec::new();
        let outcome = precopy::run(
            &mut out,
            &mem,
            &sent,
            &policy,
            &cfg,
            &mut throttle,
            &cancel,
            None,
            &mut |t| {
                seen.push(t.round);
                job.view.lock().unwrap().rounds.push(t.clone());
            },
        )
        .unwrap();
        assert_eq!(seen.len(), outcome.history.len());
        // Stop-and-copy: the guest is paused, the rest goes.
        stop.store(true, Ordering::Relaxed);
        let pages = changed_pages(&mem, &sent, 2);
        out.send_round(
            outcome.history.len() as u32 + 1,
            &mem,
            &sent,
            &pages,
            &cancel,
        )
        .unwrap();
        out.finish().unwrap();
        rx.join().unwrap().unwrap();
        Run {
            stop_reason: outcome.stop_reason,
            rounds: outcome.history.len(),
            max_throttle: outcome.max_throttle_percent,
            first_round_throttle: outcome.history[0].throttle_percent,
        }
    });
    if let Some(w) = w {
        w.join().unwrap();
    }
    let src_digest = xxhash_rust::xxh3::xxh3_64(&std::fs::read(&src).unwrap());
    assert_eq!(
        dest.digest(),
        src_digest,
        "{policy}: destination differs after the final pass"
    );
    run
}

#[test]
fn every_policy_ends_with_identical_memory_under_a_moderate_writer() {
    // 32 hot pages rewritten 2000 times a second over a 40 MB/s link: fewer than Xen's
    // 50 pages stay dirty, so every policy reaches its goal.
    for policy in [PolicyKind::Xen, PolicyKind::Qemu, PolicyKind::Adaptive] {
        let run = migrate(policy, 32, 2000, 40 << 20, 0, &job());
        assert!(
            run.stop_reason.converged(),
            "{policy}: stopped for {:?}",
            run.stop_reason
        );
        assert!(run.rounds >= 1);
    }
}

#[test]
fn adaptive_throttles_a_writer_faster_than_the_link_and_converges() {
    // A 16 MiB hot set rewritten at ~12k pages/s (48 MB/s) over a 16 MB/s link: the
    // remainder cannot fit 300 ms without slowing the writer.
    let run = migrate(PolicyKind::Adaptive, 4096, 12_000, 16 << 20, 0, &job());
    // 16 MiB of data is below the default probe's 2 x 24 MiB: round 1 ran whole.
    assert_eq!(run.first_round_throttle, 0);
    assert!(
        run.max_throttle > 0,
        "adaptive never throttled: {:?} after {} rounds",
        run.stop_reason,
        run.rounds
    );
    assert!(
        run.stop_reason.converged() || run.stop_reason == StopReason::ThrottleExhausted,
        "{:?}",
        run.stop_reason
    );
}

#[test]
fn adaptive_throttles_during_round_one_when_the_probe_sees_a_fast_writer() {
    // As above, but round 1 probed after 2 MiB: the writer (3x the link) is throttled
    // while round 1 still has 14 MiB to go, and the memory still ends identical.
    let run = migrate(
        PolicyKind::Adaptive,
        4096,
        12_000,
        16 << 20,
        2 << 20,
        &job(),
    );
    assert!(
        run.first_round_throttle > 0,
        "no throttle during round 1: {:?} after {} rounds",
        run.stop_reason,
        run.rounds
    );
    // A slow writer (well under half the link) is left alone in round 1.
    let run = migrate(PolicyKind::Adaptive, 32, 500, 16 << 20, 2 << 20, &job());
    assert_eq!(run.first_round_throttle, 0);
    assert!(run.stop_reason.converged(), "{:?}", run.stop_reason);
}

#[test]
fn the_status_view_shows_round_one_moving_while_it_runs() {
    // 16 MiB of data over a link capped at 8 MiB/s: round 1 takes about two seconds,
    // read every 20 ms as the manager reads the agent.
    let job = job();
    let done = AtomicBool::new(false);
    let seen = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                let v = job.snapshot();
                let answer = serde_json::to_value(&v).unwrap();
                if let Some(c) = v.current {
                    seen.push((v.rounds.len(), c, answer));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        let run = migrate(PolicyKind::Adaptive, 0, 0, 8 << 20, 0, &job);
        done.store(true, Ordering::Relaxed);
        assert!(run.stop_reason.converged(), "{:?}", run.stop_reason);
        watcher.join().unwrap()
    });
    let first: Vec<_> = seen
        .iter()
        .filter(|(_, c, _)| c.round == 1)
        .map(|(completed, c, _)| {
            assert_eq!(
                *completed, 0,
                "round 1 shown as running after it ended: {c:?}"
            );
            assert_eq!(c.pages_planned, PAGES, "round 1 covers every page");
            c
        })
        .collect();
    let moving: Vec<_> = first
        .iter()
        .filter(|c| c.pages_sent > 0 && c.pages_sent < c.pages_planned && c.bytes_sent > 0)
        .collect();
    assert!(
        moving.len() >= 3,
        "round 1 was not seen under way: {first:?}"
    );
    assert!(
        first.windows(2).all(|w| w[0].bytes_sent <= w[1].bytes_sent
            && w[0].pages_sent <= w[1].pages_sent
            && w[0].duration_s <= w[1].duration_s),
        "round 1's counts went back: {first:?}"
    );
    // Part way, the bytes follow the cap: not all at once, not none.
    let mid = moving[moving.len() / 2];
    let rate = mid.bytes_sent as f64 / mid.duration_s;
    assert!(
        rate < 2.0 * (8 << 20) as f64,
        "{rate} B/s over an 8 MiB/s cap: {mid:?}"
    );

    // Every field the agent's OpenAPI document requires is in the answer.
    let doc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/agent-openapi.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let schemas = &doc["components"]["schemas"];
    let view = &seen[seen.len() / 2].2;
    for (schema, value) in [("MigrationView", view), ("RoundProgress", &view["current"])] {
        let required = schemas[schema]["required"].as_array().unwrap();
        for f in required {
            let f = f.as_str().unwrap();
            assert!(value.get(f).is_some(), "{schema} answer lacks {f}: {value}");
        }
    }
}
