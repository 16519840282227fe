//! The values a trace is made of: typed scheduler events and the recording they came
//! from (wire types of `tern-api`, re-exported), and which host thread is which vCPU.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
pub use tern_api::trace::{ClockAlignment, EventKind, GuestTrace, HostTrace, SchedEvent, VmTrace};

/// The task-state bits `sched_switch` reports for a task that stopped running because it
/// sleeps or stopped (S, D, T, t, X, Z, P, I). With none of them set the task was still
/// runnable: preempted (`R+`, the kernel's extra `TASK_REPORT_MAX` bit) or it yielded or
/// was moved (`R`).
const SLEEP_BITS: i64 = 0xff;

/// Whether a `sched_switch`'s `prev_state` says the task still wanted the CPU.
pub fn is_preempted(prev_state: i64) -> bool {
    prev_state & SLEEP_BITS == 0
}

/// Which host thread runs which vCPU of a VM (from QMP `query-cpus-fast`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuMap {
    by_tid: BTreeMap<u32, u32>,
}

impl VcpuMap {
    /// From thread ids in vCPU order, as `Hypervisor::vcpu_threads` returns them.
    pub fn from_threads(threads: &[u32]) -> VcpuMap {
        VcpuMap {
            by_tid: threads
                .iter()
                .enumerate()
                .map(|(i, &t)| (t, i as u32))
                .collect(),
        }
    }

    /// The vCPU index thread `tid` runs, if it is a vCPU thread.
    pub fn vcpu(&self, tid: u32) -> Option<u32> {
        self.by_tid.get(&tid).copied()
    }

    /// The vCPU threads, in thread-id order.
    pub fn tids(&self) -> Vec<u32> {
        self.by_tid.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.by_tid.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_tid.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preempted_is_runnable_sleeping_is_not() {
        assert!(is_preempted(0), "R: yielded or moved");
        assert!(is_preempted(0x100), "R+: preempted");
        assert!(!is_preempted(1), "S");
        assert!(!is_preempted(2), "D");
        assert!(!is_preempted(0x80), "I");
    }

    #[test]
    fn vcpu_map_follows_query_order() {
        let m = VcpuMap::from_threads(&[300, 100]);
        assert_eq!(m.vcpu(300), Some(0));
        assert_eq!(m.vcpu(100), Some(1));
        assert_eq!(m.vcpu(5), None);
        assert_eq!(m.tids(), vec![100, 300]);
    }
}
