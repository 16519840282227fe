//! The recorder against this machine's kernel: two busy threads of this test, one moved
//! between CPUs with `sched_setaffinity` at a known moment, must show that move in the
//! trace within 20 ms, and their run intervals must be consistent.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tern_trace::recorder::monotonic_ns;
use tern_trace::{analyse, EventKind, HostTrace, RecorderConfig, State, Timeline, VcpuMap};

/// Whether this test can record scheduler events here (root, two CPUs). Under `CI` a
/// missing piece is a failure.
fn can_trace() -> bool {
    let root = tern_testkit::is_root();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if root && cpus >= 2 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "tracing tests need root and 2 CPUs (root: {root}, cpus: {cpus})"
    );
    eprintln!("SKIP: tracing needs root and 2 CPUs (root: {root}, cpus: {cpus})");
    false
}

fn set_affinity(tid: u32, cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below CPU_SETSIZE (the machine has 2 CPUs).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe {
        libc::sched_setaffinity(tid as i32, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(
        rc,
        0,
        "sched_setaffinity: {}",
        std::io::Error::last_os_error()
    );
}

/// The kernel's own count of the time `tid` ran (`/proc/self/task/TID/schedstat`).
fn cpu_ns(tid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap();
    text.split_whitespace().next().unwrap().parse().unwrap()
}

/// How long `tid` spent in states `pick` within `[from, to)`.
fn within(tl: &Timeline, tid: u32, from: u64, to: u64, pick: impl Fn(State) -> bool) -> u64 {
    tl.spans_of(tid)
        .filter(|s| pick(s.state))
        .map(|s| s.end_ns.min(to).saturating_sub(s.start_ns.max(from)))
        .sum()
}

fn gettid() -> u32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() as u32 }
}

/// A thread pinned to `cpu` that spins until `stop`; returns its tid.
fn busy(cpu: usize, stop: Arc<AtomicBool>) -> (u32, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        set_affinity(0, cpu);
        tx.send(gettid()).unwrap();
        let mut x = 0u64;
        while !stop.load(Ordering::Relaxed) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
    });
    (rx.recv_timeout(Duration::from_secs(5)).unwrap(), h)
}

#[test]
fn a_moved_thread_shows_its_migration_within_20_ms() {
    if !can_trace() {
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (a, ha) = busy(0, stop.clone());
    let (b, hb) = busy(1, stop.clone());
    let mut rec = tern_trace::Recorder::open(&RecorderConfig::new(vec![a, b])).unwrap();
    // The schedstat reads happen somewhere between these clock reads.
    let read1 = monotonic_ns();
    let ran_before = [cpu_ns(a), cpu_ns(b)];
    let read1_done = monotonic_ns();
    let poll_for = |rec: &mut tern_trace::Recorder, d: Duration| {
        let until = std::time::Instant::now() + d;
        while std::time::Instant::now() < until {
            rec.poll(Duration::from_millis(20)).unwrap();
        }
    };
    poll_for(&mut rec, Duration::from_millis(400));
    let moved_at = monotonic_ns();
    set_affinity(a, 1);
    let move_took = monotonic_ns() - moved_at;
    poll_for(&mut rec, Duration::from_millis(400));
    let read2 = monotonic_ns();
    let ran = [cpu_ns(a) - ran_before[0], cpu_ns(b) - ran_before[1]];
    let read2_done = monotonic_ns();
    let trace = rec.finish().unwrap();
    stop.store(true, Ordering::Relaxed);
    ha.join().unwrap();
    hb.join().unwrap();

    let secs = (trace.end_ns - trace.start_ns) as f64 / 1e9;
    eprintln!(
        "{} events in {secs:.2} s ({:.0}/s), lost {}, dropped {}, setaffinity took {} µs",
        trace.events.len(),
        trace.events.len() as f64 / secs,
        trace.lost,
        trace.dropped,
        move_took / 1000
    );
    assert_eq!(
        trace.lost, 0,
        "a 1 MiB ring per CPU holds 0.8 s of two threads"
    );
    // Only the traced threads' events were kept.
    for e in &trace.events {
        assert!(
            e.kind.tids().iter().flatten().any(|t| *t == a || *t == b),
            "{e:?}"
        );
    }

    let moves: Vec<(u64, u32, u32)> = trace
        .events
        .iter()
        .filter_map(|e| match e.kind {
            EventKind::Migrate {
                tid,
                orig_cpu,
                dest_cpu,
            } if tid == a => Some((e.time_ns, orig_cpu, dest_cpu)),
            _ => None,
        })
        .collect();
    let (t, from, to) = *moves
        .iter()
        .find(|m| m.1 == 0 && m.2 == 1)
        .unwrap_or_else(|| panic!("no migration 0 → 1 of thread {a}: {moves:?}"));
    let off_ms = (t as f64 - moved_at as f64) / 1e6;
    eprintln!("migration {from} → {to} recorded {off_ms:+.3} ms from the move");
    // `sched_setaffinity` returns once the kernel has moved the running thread, which
    // on a loaded host can take a while itself: the move is recorded during that call.
    let call_ms = move_took as f64 / 1e6;
    assert!(
        (-20.0..=call_ms + 20.0).contains(&off_ms),
        "migration {off_ms} ms from the move (the call took {call_ms} ms)"
    );

    let (tl, summary) = analyse(&trace, &VcpuMap::from_threads(&[a, b]));
    // Run intervals are consistent: a ran on CPU 0 before the move and on CPU 1 after
    // it (a 20 ms margin either side), b only on CPU 1, and no CPU ran two at once.
    let margin = 20_000_000;
    for s in tl.spans_of(a) {
        if let State::Running { cpu } = s.state {
            if s.end_ns < moved_at - margin {
                assert_eq!(cpu, 0, "{s:?} before the move");
            } else if s.start_ns > moved_at + margin {
                assert_eq!(cpu, 1, "{s:?} after the move");
            }
        }
    }
    for s in tl.spans_of(b) {
        if let State::Running { cpu } = s.state {
            assert_eq!(cpu, 1, "{s:?}: b is pinned to CPU 1");
        }
    }
    for cpu in [0, 1] {
        let runs = tl.runs_on(cpu);
        assert!(runs.windows(2).all(|w| w[0].end_ns <= w[1].start_ns));
    }
    // After the move a and b share CPU 1: both wait for it, and both ran.
    let ta = &summary.threads[summary.threads.iter().position(|t| t.tid == a).unwrap()];
    let tb = &summary.threads[summary.threads.iter().position(|t| t.tid == b).unwrap()];
    eprintln!("a: {ta:?}\nb: {tb:?}\nanomalies: {}", summary.anomalies);
    for (t, ran) in [(ta, ran[0]), (tb, ran[1])] {
        assert_eq!(
            t.run_ns + t.runnable_ns + t.sleep_ns + t.unknown_ns,
            summary.window_ns
        );
        // The trace's run time agrees with the kernel's own accounting between the two
        // schedstat reads: at least what it saw run inside the narrowest window the
        // reads allow, at most what it saw run or could not tell (records this kernel
        // never emitted) inside the widest one.
        let inner = within(&tl, t.tid, read1_done, read2, |s| {
            matches!(s, State::Running { .. })
        });
        let outer = within(&tl, t.tid, read1, read2_done, |s| {
            matches!(s, State::Running { .. } | State::Unknown)
        });
        eprintln!(
            "thread {}: traced run {} ms (+{} ms unknown), schedstat {} ms",
            t.tid,
            t.run_ns / 1_000_000,
            t.unknown_ns / 1_000_000,
            ran / 1_000_000
        );
        // schedstat of a thread running on another CPU is as of that CPU's last tick or
        // switch (4 ms apart at HZ=250), once for each of the two reads. And each switch
        // spends a few microseconds between the switch-in record's timestamp and the
        // task clock starting (and again at the switch out), which the trace counts as
        // running and the kernel's accounting does not: on a busy machine, with
        // thousands of preemptions in the window, that adds up to tens of ms.
        let slack = 10_000_000;
        let per_switch = 10_000 * t.runs;
        assert!(
            inner <= ran + slack + per_switch,
            "{t:?}: {inner} ns traced, {ran} ns ran"
        );
        assert!(
            ran <= outer + slack,
            "{t:?}: {outer} ns traced, {ran} ns ran"
        );
        assert!(t.runnable_ns > 0, "{t:?} waited for CPU 1");
    }
    assert_eq!(ta.cpus, vec![0, 1]);
    assert!(ta.migrations >= 1);
}

/// A thread that sleeps 50 µs in a loop until `stop`: two scheduler events (a switch and
/// a wakeup) every ~100 µs; returns its tid.
fn napper(stop: Arc<AtomicBool>) -> (u32, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        tx.send(gettid()).unwrap();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_micros(50));
        }
    });
    (rx.recv_timeout(Duration::from_secs(5)).unwrap(), h)
}

/// Records two nappers for `ms` with `cfg` changed by `tune`, polling every 20 ms when
/// `poll`, else reading only at the end.
fn record_nappers(tune: impl Fn(&mut RecorderConfig), ms: u64, poll: bool) -> HostTrace {
    let stop = Arc::new(AtomicBool::new(false));
    let (a, ha) = napper(stop.clone());
    let (b, hb) = napper(stop.clone());
    let mut cfg = RecorderConfig::new(vec![a, b]);
    tune(&mut cfg);
    let mut rec = tern_trace::Recorder::open(&cfg).unwrap();
    let until = std::time::Instant::now() + Duration::from_millis(ms);
    while std::time::Instant::now() < until {
        if poll {
            rec.poll(Duration::from_millis(20)).unwrap();
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let trace = rec.finish().unwrap();
    stop.store(true, Ordering::Relaxed);
    ha.join().unwrap();
    hb.join().unwrap();
    trace
}

#[test]
fn events_past_the_cap_are_counted_as_dropped_and_reported() {
    if !can_trace() {
        return;
    }
    let trace = record_nappers(|c| c.max_events = 100, 300, true);
    eprintln!(
        "kept {}, dropped {}, lost {}",
        trace.events.len(),
        trace.dropped,
        trace.lost
    );
    assert_eq!(trace.events.len(), 100);
    assert!(
        trace.dropped > 0,
        "two nappers make far more than 100 events"
    );
    let tids: Vec<u32> = trace.tids.clone();
    let (_, summary) = analyse(&trace, &VcpuMap::from_threads(&tids));
    assert_eq!(summary.dropped, trace.dropped, "the summary hides no drop");
    assert_eq!(summary.lost, trace.lost);
}

#[test]
fn a_full_ring_buffer_is_counted_as_lost_and_reported() {
    if !can_trace() {
        return;
    }
    // One page per CPU, read only at the end: the kernel overwrites nothing and counts
    // what it could not write.
    let trace = record_nappers(|c| c.ring_bytes = 4096, 300, false);
    eprintln!("kept {}, lost {}", trace.events.len(), trace.lost);
    // Thousands: the ring's own lost-records notes alone, written only when a later
    // record fits, told of a handful.
    assert!(
        trace.lost >= 100,
        "300 ms of two nappers overflow a page by thousands: lost {}",
        trace.lost
    );
    let tids: Vec<u32> = trace.tids.clone();
    let (_, summary) = analyse(&trace, &VcpuMap::from_threads(&tids));
    assert_eq!(summary.lost, trace.lost, "the summary hides no loss");
}
