//! The values a trace is made of: typed scheduler events, the recording they came from,
//! and which host thread is which vCPU.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One scheduler event. `time_ns` is on the recording's clock (`CLOCK_MONOTONIC` of the
/// host for host recordings), `cpu` the physical CPU whose ring buffer held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedEvent {
    pub time_ns: u64,
    pub cpu: u32,
    pub kind: EventKind,
}

/// What happened. Thread ids are the kernel's `pid` of a thread (a `tid` in userspace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// `sched_switch`: `prev_tid` stops running on the event's CPU, `next_tid` starts.
    /// `prev_state` is the kernel's task state of `prev_tid`; see [`is_preempted`].
    Switch {
        prev_tid: u32,
        prev_state: i64,
        next_tid: u32,
    },
    /// `sched_wakeup`: `tid` became runnable, queued on `target_cpu`.
    Wakeup { tid: u32, target_cpu: u32 },
    /// `sched_migrate_task`: `tid` moved from one CPU's run queue to another's.
    Migrate {
        tid: u32,
        orig_cpu: u32,
        dest_cpu: u32,
    },
    /// `kvm:kvm_entry`: a vCPU thread entered the guest (hardware virtualisation only).
    KvmEntry { tid: u32, vcpu_id: u32 },
    /// `kvm:kvm_exit`: a vCPU thread left the guest.
    KvmExit { tid: u32 },
}

/// The task-state bits `sched_switch` reports for a task that stopped running because it
/// sleeps or stopped (S, D, T, t, X, Z, P, I). With none of them set the task was still
/// runnable: preempted (`R+`, the kernel's extra `TASK_REPORT_MAX` bit) or it yielded or
/// was moved (`R`).
const SLEEP_BITS: i64 = 0xff;

/// Whether a `sched_switch`'s `prev_state` says the task still wanted the CPU.
pub fn is_preempted(prev_state: i64) -> bool {
    prev_state & SLEEP_BITS == 0
}

impl EventKind {
    /// Every thread this event is about (for filtering a recording to a set of threads).
    pub fn tids(&self) -> [Option<u32>; 2] {
        match *self {
            EventKind::Switch {
                prev_tid, next_tid, ..
            } => [Some(prev_tid), Some(next_tid)],
            EventKind::Wakeup { tid, .. }
            | EventKind::Migrate { tid, .. }
            | EventKind::KvmEntry { tid, .. }
            | EventKind::KvmExit { tid } => [Some(tid), None],
        }
    }
}

/// A host recording: events of the traced threads, in time order, over a window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostTrace {
    /// When recording was enabled and disabled, on the events' clock.
    pub start_ns: u64,
    pub end_ns: u64,
    /// Online CPUs recorded (one ring buffer each).
    pub cpus: Vec<u32>,
    /// The threads recorded.
    pub tids: Vec<u32>,
    pub events: Vec<SchedEvent>,
    /// Records the kernel could not write because a ring buffer was full
    /// (`PERF_RECORD_LOST`): the trace has gaps when this is not zero.
    pub lost: u64,
    /// Records read but not kept because the recording reached its event cap.
    pub dropped: u64,
    /// Whether `kvm_entry`/`kvm_exit` were recorded (they fire only under hardware
    /// virtualisation; under TCG a VM's trace comes from scheduler events alone).
    pub kvm_events: bool,
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
