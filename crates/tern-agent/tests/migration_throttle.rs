//! The vCPU throttle on a real thread: a busy thread put under an 80 % throttle gets at
//! most about a fifth of a core, the kernel counts throttled periods, and once told the
//! thread is held it stays off the CPU as long as promised; once removed, the thread is
//! back in its original cgroup. Needs root and a cgroup hierarchy with the
//! cpu controller.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_agent::migration::precopy::Throttle;
use tern_agent::migration::throttle::CgroupThrottle;

fn thread_cpu_s(tid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The thread's run time in nanoseconds (exact once it is off the CPU: the scheduler
/// brings it up to date when it switches the thread out).
fn run_ns(tid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).unwrap();
    s.split_whitespace().next().unwrap().parse().unwrap()
}

fn share_over(tid: u32, d: Duration) -> f64 {
    let a = thread_cpu_s(tid);
    std::thread::sleep(d);
    (thread_cpu_s(tid) - a) / d.as_secs_f64()
}

#[test]
fn an_applied_throttle_caps_the_thread_and_removal_releases_it() {
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root {
        assert!(
            std::env::var_os("CI").is_none(),
            "the throttle test needs root, which CI has"
        );
        eprintln!("SKIP: the throttle test needs root");
        return;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let busy = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let link = std::fs::read_link("/proc/thread-self").unwrap();
            let tid: u32 = link.file_name().unwrap().to_str().unwrap().parse().unwrap();
            tx.send(tid).unwrap();
            let mut x = 0u64;
            while !stop.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
        })
    };
    let tid = rx.recv().unwrap();
    let name = format!("throttle-test-{}", std::process::id());
    let mut t = CgroupThrottle::new(&name, Some(std::process::id()), vec![tid]);
    let applied = t.apply(80);
    if applied == 0 {
        stop.store(true, Ordering::Relaxed);
        busy.join().unwrap();
        // The host has no usable cpu controller: the throttle said so and declined,
        // which is the behaviour the policy loop relies on.
        eprintln!("SKIP: no cgroup cpu controller usable on this host (see the warning above)");
        return;
    }
    assert_eq!(applied, 80);
    let throttled = share_over(tid, Duration::from_millis(1500));
    // Told the thread is held, it stays off the CPU for the time promised, every time.
    for _ in 0..3 {
        let hold = t
            .hold(Duration::from_millis(500), Duration::from_millis(40))
            .expect("a busy thread under 80 % is held with 40 ms left within five periods");
        assert!(
            hold.held_for >= Duration::from_millis(40)
                && hold.held_for <= Duration::from_millis(100),
            "{hold:?}"
        );
        let (before, at) = (run_ns(tid), Instant::now());
        std::thread::sleep(hold.held_for.saturating_sub(Duration::from_millis(3)));
        let ran = Duration::from_nanos(run_ns(tid) - before);
        assert!(
            ran < Duration::from_millis(2),
            "held for {hold:?}, yet it ran {ran:?}"
        );
        assert_eq!(
            t.ran_since(at),
            Some(false),
            "the watch saw it run while held"
        );
        // Its next share comes within the period: the watch sees it run.
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            t.ran_since(at),
            Some(true),
            "the watch missed its next share"
        );
    }
    let periods = t
        .throttled_periods()
        .expect("cpu.stat of the throttle cgroup");
    t.remove();
    assert_eq!(
        t.throttled_periods(),
        None,
        "the cgroup is gone after remove"
    );
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    eprintln!(
        "busy thread: {throttled:.2} cores under an 80 % throttle, {periods} periods throttled"
    );
    assert!(
        throttled < 0.3,
        "throttled thread still got {throttled:.2} cores"
    );
    assert!(periods > 0, "the kernel never throttled the thread");
}
