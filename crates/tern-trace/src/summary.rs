//! What a timeline adds up to, per thread (vCPU), per CPU and per VM (pure).

use crate::model::VcpuMap;
use crate::timeline::{State, Timeline};
use serde::{Deserialize, Serialize};

/// One traced thread over the window. The four times add up to the window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThreadSummary {
    pub tid: u32,
    /// The vCPU the thread runs, when it is a vCPU thread.
    pub vcpu: Option<u32>,
    pub run_ns: u64,
    /// Runnable but not running: for a vCPU, time stolen from the guest by the host.
    pub runnable_ns: u64,
    pub sleep_ns: u64,
    pub unknown_ns: u64,
    /// Moves between CPUs (`sched_migrate_task`).
    pub migrations: u64,
    /// Separate stretches of running.
    pub runs: u64,
    /// CPUs it ran on.
    pub cpus: Vec<u32>,
}

/// One physical CPU: how long traced threads ran on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuSummary {
    pub cpu: u32,
    pub busy_ns: u64,
    /// Distinct traced threads that ran on it.
    pub threads: u64,
}

/// The whole trace's summary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub window_ns: u64,
    pub events: u64,
    /// Records the kernel dropped (full ring buffer): never hidden, the trace has gaps.
    pub lost: u64,
    /// Records read but not kept (the recording's event cap).
    pub dropped: u64,
    /// Events that contradicted the state they found (lost records leave these).
    pub anomalies: u64,
    pub threads: Vec<ThreadSummary>,
    pub cpus: Vec<CpuSummary>,
    /// Of the time at least one vCPU ran, the share during which all of them ran
    /// together (what gang scheduling raises); `None` when no vCPU ran.
    pub corun_share: Option<f64>,
}

/// Record counts that come from the recording, not the timeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub events: u64,
    pub lost: u64,
    pub dropped: u64,
}

/// Summarises `tl`; `vcpus` names the vCPU threads (the co-run share is over them).
pub fn summarize(tl: &Timeline, vcpus: &VcpuMap, counts: Counts) -> Summary {
    let threads = tl
        .tids
        .iter()
        .map(|&tid| {
            let mut s = ThreadSummary {
                tid,
                vcpu: vcpus.vcpu(tid),
                run_ns: 0,
                runnable_ns: 0,
                sleep_ns: 0,
                unknown_ns: 0,
                migrations: tl.migrations.iter().filter(|m| m.tid == tid).count() as u64,
                runs: 0,
                cpus: vec![],
            };
            for span in tl.spans_of(tid) {
                match span.state {
                    State::Running { cpu } => {
                        s.run_ns += span.len_ns();
                        s.runs += 1;
                        s.cpus.push(cpu);
                    }
                    State::Runnable => s.runnable_ns += span.len_ns(),
                    State::Sleeping => s.sleep_ns += span.len_ns(),
                    State::Unknown => s.unknown_ns += span.len_ns(),
                }
            }
            s.cpus.sort_unstable();
            s.cpus.dedup();
            s
        })
        .collect();
    let cpus = tl
        .cpus()
        .into_iter()
        .map(|cpu| {
            let runs = tl.runs_on(cpu);
            let mut tids: Vec<u32> = runs.iter().map(|s| s.tid).collect();
            tids.sort_unstable();
            tids.dedup();
            CpuSummary {
                cpu,
                busy_ns: runs.iter().map(|s| s.len_ns()).sum(),
                threads: tids.len() as u64,
            }
        })
        .collect();
    Summary {
        window_ns: tl.end_ns - tl.start_ns,
        events: counts.events,
        lost: counts.lost,
        dropped: counts.dropped,
        anomalies: tl.anomalies,
        threads,
        cpus,
        corun_share: corun_share(tl, &vcpus.tids()),
    }
}

/// Of the time at least one of `tids` ran, the share during which all of them ran.
pub fn corun_share(tl: &Timeline, tids: &[u32]) -> Option<f64> {
    if tids.is_empty() {
        return None;
    }
    // +1 at each run's start, -1 at its end; one thread's runs never overlap, so a
    // count equal to the number of threads means all of them ran.
    let mut edges: Vec<(u64, i64)> = tl
        .spans
        .iter()
        .filter(|s| matches!(s.state, State::Running { .. }) && tids.contains(&s.tid))
        .flat_map(|s| [(s.start_ns, 1), (s.end_ns, -1)])
        .collect();
    edges.sort_unstable();
    let (mut any, mut all, mut running, mut last) = (0u64, 0u64, 0i64, 0u64);
    for (t, d) in edges {
        let dt = t - last;
        if running > 0 {
            any += dt;
        }
        if running == tids.len() as i64 {
            all += dt;
        }
        running += d;
        last = t;
    }
    (any > 0).then(|| all as f64 / any as f64)
}

/// The summaries of a trace's segments on several hosts (a VM followed across live
/// migrations) as one (pure): windows and record counts add up; a vCPU's times,
/// migrations and runs add up over its threads on every host (the first host's thread
/// id names it; `cpus` lists core numbers of every host, not told apart). Per-core
/// figures and the co-run share stay with each segment's own summary: `cpus` is empty
/// and `corun_share` is `None` unless there is one segment.
pub fn combine(parts: &[Summary]) -> Option<Summary> {
    let (first, rest) = parts.split_first()?;
    if rest.is_empty() {
        return Some(first.clone());
    }
    let mut out = Summary {
        cpus: Vec::new(),
        corun_share: None,
        ..first.clone()
    };
    for p in rest {
        out.window_ns += p.window_ns;
        out.events += p.events;
        out.lost += p.lost;
        out.dropped += p.dropped;
        out.anomalies += p.anomalies;
        for t in &p.threads {
            let same = out
                .threads
                .iter_mut()
                .find(|o| o.vcpu.is_some() && o.vcpu == t.vcpu);
            match same {
                Some(o) => {
                    o.run_ns += t.run_ns;
                    o.runnable_ns += t.runnable_ns;
                    o.sleep_ns += t.sleep_ns;
                    o.unknown_ns += t.unknown_ns;
                    o.migrations += t.migrations;
                    o.runs += t.runs;
                    for c in &t.cpus {
                        if !o.cpus.contains(c) {
                            o.cpus.push(*c);
                        }
                    }
                    o.cpus.sort_unstable();
                }
                None => out.threads.push(t.clone()),
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::tests::{events, sw};
    use crate::timeline::timeline;
    use proptest::prelude::*;

    #[test]
    fn segments_add_up_per_vcpu() {
        let vcpus = VcpuMap::from_threads(&[10]);
        let a = summarize(
            &timeline(0, 100, &[10], &[sw(20, 0, 0, 0, 10)]),
            &vcpus,
            Counts {
                events: 1,
                lost: 2,
                dropped: 0,
            },
        );
        let vcpus2 = VcpuMap::from_threads(&[20]);
        let b = summarize(
            &timeline(500, 700, &[20], &[sw(550, 1, 0, 0, 20)]),
            &vcpus2,
            Counts {
                events: 1,
                lost: 0,
                dropped: 3,
            },
        );
        let c = combine(&[a.clone(), b.clone()]).unwrap();
        assert_eq!((c.window_ns, c.events, c.lost, c.dropped), (300, 2, 2, 3));
        assert_eq!(c.threads.len(), 1);
        let t = &c.threads[0];
        assert_eq!((t.tid, t.vcpu), (10, Some(0)));
        assert_eq!(t.run_ns, a.threads[0].run_ns + b.threads[0].run_ns);
        assert_eq!(t.cpus, [0, 1]);
        assert_eq!((c.cpus.len(), c.corun_share), (0, None));
        assert_eq!(combine(std::slice::from_ref(&a)), Some(a));
        assert_eq!(combine(&[]), None);
    }

    #[test]
    fn corun_counts_only_time_all_vcpus_ran() {
        // vCPU threads 1 and 2 on CPUs 0 and 1: 1 runs 0..100, 2 runs 50..150.
        let events = [
            sw(0, 0, 0, 0, 1),
            sw(50, 1, 0, 0, 2),
            sw(100, 0, 1, 1, 0),
            sw(150, 1, 2, 1, 0),
        ];
        let tl = timeline(0, 200, &[1, 2], &events);
        let s = summarize(&tl, &VcpuMap::from_threads(&[1, 2]), Counts::default());
        assert_eq!(s.corun_share, Some(50.0 / 150.0));
        let t1 = &s.threads[0];
        assert_eq!(
            (t1.vcpu, t1.run_ns, t1.sleep_ns, t1.runs),
            (Some(0), 100, 100, 1)
        );
        assert_eq!(s.cpus.len(), 2);
        assert_eq!(s.cpus[1].busy_ns, 100);
        assert_eq!(corun_share(&tl, &[]), None);
    }

    proptest! {
        #[test]
        fn thread_times_add_up_to_the_window(events in events(), len in 0u64..5000) {
            let tl = timeline(1_000, 1_000 + len, &[1, 2, 3], &events);
            let s = summarize(&tl, &VcpuMap::from_threads(&[1, 2]), Counts::default());
            for t in &s.threads {
                prop_assert_eq!(t.run_ns + t.runnable_ns + t.sleep_ns + t.unknown_ns, len);
            }
            let run: u64 = s.threads.iter().map(|t| t.run_ns).sum();
            let busy: u64 = s.cpus.iter().map(|c| c.busy_ns).sum();
            prop_assert_eq!(run, busy);
            if let Some(c) = s.corun_share {
                prop_assert!((0.0..=1.0).contains(&c));
            }
        }
    }
}
