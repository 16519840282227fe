//! The merged trace (pure): guest processes on vCPUs (the guest's own events, on the
//! host's clock) over vCPU threads on physical CPUs (the host's events).
//!
//! Guest CPU *n* is vCPU *n*. A guest process the guest kernel has running on vCPU *n*
//! while the host has vCPU *n*'s thread runnable but not running (steal) is waiting
//! without either scheduler knowing: that time is its double-scheduling delay.

use crate::model::{GuestTrace, VcpuMap};
use crate::timeline::{timeline, State, Timeline};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One guest process (thread) over the window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSummary {
    pub tid: u32,
    pub comm: String,
    /// Running on some vCPU, in the guest's view.
    pub run_ns: u64,
    /// Runnable in the guest, waiting for a vCPU.
    pub runnable_ns: u64,
    /// Moves between vCPUs.
    pub vcpu_migrations: u64,
    pub vcpus: Vec<u32>,
    /// Running in the guest's view while its vCPU's host thread was runnable but not
    /// running: waiting for the host without the guest knowing.
    pub double_sched_delay_ns: u64,
}

/// The guest level of a merged trace.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSummary {
    pub events: u64,
    pub lost: u64,
    pub dropped: u64,
    /// Most a guest event's time can be off on the host's clock (`None`: not aligned).
    pub alignment_error_ns: Option<u64>,
    /// Events that contradicted the guest timeline's state.
    pub anomalies: u64,
    /// Processes that ran, most run time first.
    pub processes: Vec<ProcessSummary>,
    pub double_sched_delay_ns: u64,
}

/// The guest's timeline on the host clock: every thread but the idle task (tid 0),
/// `Running { cpu }` naming a vCPU.
pub fn guest_timeline(g: &GuestTrace) -> Timeline {
    let mut tids: Vec<u32> = g
        .events
        .iter()
        .flat_map(|e| e.kind.tids())
        .flatten()
        .filter(|&t| t != 0)
        .collect();
    tids.sort_unstable();
    tids.dedup();
    timeline(g.start_ns, g.end_ns, &tids, &g.events)
}

/// Total overlap of two lists of half-open intervals, each sorted and disjoint.
pub fn overlap_ns(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let (mut i, mut j, mut total) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        let lo = a[i].0.max(b[j].0);
        let hi = a[i].1.min(b[j].1);
        total += hi.saturating_sub(lo);
        if a[i].1 <= b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    total
}

fn intervals(tl: &Timeline, tid: u32, keep: impl Fn(State) -> bool) -> Vec<(u64, u64)> {
    tl.spans_of(tid)
        .filter(|s| keep(s.state))
        .map(|s| (s.start_ns, s.end_ns))
        .collect()
}

/// Per guest process: run and runnable time, vCPU migrations, and the double-scheduling
/// delay against the host timeline `host` (vCPU threads named by `vcpus`).
pub fn summarize_guest(
    guest: &Timeline,
    g: &GuestTrace,
    host: &Timeline,
    vcpus: &VcpuMap,
) -> GuestSummary {
    // Each vCPU's steal intervals on the host.
    let steal: BTreeMap<u32, Vec<(u64, u64)>> = vcpus
        .tids()
        .into_iter()
        .filter_map(|t| Some((vcpus.vcpu(t)?, intervals(host, t, |s| s == State::Runnable))))
        .collect();
    let mut processes: Vec<ProcessSummary> = guest
        .tids
        .iter()
        .map(|&tid| {
            let mut p = ProcessSummary {
                tid,
                comm: g.comms.get(&tid).cloned().unwrap_or_default(),
                run_ns: 0,
                runnable_ns: 0,
                vcpu_migrations: guest.migrations.iter().filter(|m| m.tid == tid).count() as u64,
                vcpus: Vec::new(),
                double_sched_delay_ns: 0,
            };
            for s in guest.spans_of(tid) {
                match s.state {
                    State::Running { cpu } => {
                        p.run_ns += s.len_ns();
                        if !p.vcpus.contains(&cpu) {
                            p.vcpus.push(cpu);
                        }
                    }
                    State::Runnable => p.runnable_ns += s.len_ns(),
                    _ => {}
                }
            }
            p.vcpus.sort_unstable();
            for &v in &p.vcpus {
                let on_v = intervals(guest, tid, |s| s == State::Running { cpu: v });
                if let Some(st) = steal.get(&v) {
                    p.double_sched_delay_ns += overlap_ns(&on_v, st);
                }
            }
            p
        })
        .filter(|p| p.run_ns > 0 || p.runnable_ns > 0)
        .collect();
    processes.sort_by(|a, b| b.run_ns.cmp(&a.run_ns).then(a.tid.cmp(&b.tid)));
    GuestSummary {
        events: g.events.len() as u64,
        lost: g.lost,
        dropped: g.dropped,
        alignment_error_ns: g.alignment.map(|a| a.error_ns),
        anomalies: guest.anomalies,
        double_sched_delay_ns: processes.iter().map(|p| p.double_sched_delay_ns).sum(),
        processes,
    }
}

/// Where a guest thread ran at `time_ns` (host clock): its vCPU, if it was running.
pub fn vcpu_at(guest: &Timeline, tid: u32, time_ns: u64) -> Option<u32> {
    guest
        .spans_of(tid)
        .find(|s| s.start_ns <= time_ns && time_ns < s.end_ns)
        .and_then(|s| match s.state {
            State::Running { cpu } => Some(cpu),
            _ => None,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EventKind, SchedEvent};
    use crate::timeline::tests::sw;
    use proptest::prelude::*;

    fn sorted_disjoint() -> impl Strategy<Value = Vec<(u64, u64)>> {
        prop::collection::vec((0u64..50, 1u64..50), 0..20).prop_map(|gaps| {
            let mut t = 0;
            gaps.into_iter()
                .map(|(gap, len)| {
                    let s = t + gap;
                    t = s + len;
                    (s, t)
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn overlap_is_the_brute_force_count(a in sorted_disjoint(), b in sorted_disjoint()) {
            let brute = (0..3_000u64)
                .filter(|&t| a.iter().any(|&(s, e)| s <= t && t < e)
                    && b.iter().any(|&(s, e)| s <= t && t < e))
                .count() as u64;
            prop_assert_eq!(overlap_ns(&a, &b), brute);
            prop_assert_eq!(overlap_ns(&a, &b), overlap_ns(&b, &a));
        }
    }

    /// Guest process 50 runs on vCPU 0 over [100, 300); the host ran vCPU 0's thread
    /// (tid 900) over [0, 150) and [250, 400), and had it runnable over [150, 250): 100 ns
    /// of double-scheduling delay. Then 50 moves to vCPU 1.
    #[test]
    fn delay_is_guest_running_while_the_host_steals() {
        let vcpus = VcpuMap::from_threads(&[900, 901]);
        let host = timeline(
            0,
            500,
            &[900],
            &[
                sw(0, 0, 1, 1, 900),
                sw(150, 0, 900, 0, 1),
                sw(250, 0, 1, 1, 900),
                sw(400, 0, 900, 1, 1),
            ],
        );
        let g = GuestTrace {
            start_ns: 0,
            end_ns: 500,
            events: vec![
                sw(100, 0, 0, 0, 50),
                sw(300, 0, 50, 0, 0),
                SchedEvent {
                    time_ns: 310,
                    cpu: 0,
                    kind: EventKind::Migrate {
                        tid: 50,
                        orig_cpu: 0,
                        dest_cpu: 1,
                    },
                },
                sw(320, 1, 0, 0, 50),
                sw(420, 1, 50, 1, 0),
            ],
            comms: [(50, "spin".to_string())].into(),
            ..GuestTrace::default()
        };
        let tl = guest_timeline(&g);
        assert_eq!(tl.tids, vec![50]);
        let s = summarize_guest(&tl, &g, &host, &vcpus);
        let p = &s.processes[0];
        assert_eq!((p.tid, p.comm.as_str()), (50, "spin"));
        assert_eq!(p.run_ns, 300);
        assert_eq!(p.vcpus, vec![0, 1]);
        assert_eq!(p.vcpu_migrations, 1);
        assert_eq!(p.double_sched_delay_ns, 100);
        assert_eq!(s.double_sched_delay_ns, 100);
        assert_eq!(vcpu_at(&tl, 50, 200), Some(0));
        assert_eq!(vcpu_at(&tl, 50, 350), Some(1));
        assert_eq!(vcpu_at(&tl, 50, 310), None);
    }
}
