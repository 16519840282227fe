//! The agent's trace API (`POST /v1/vms/{id}/trace`): what a host recording of a VM's
//! vCPU threads is on the wire. `tern-trace` records and analyses these values.

use serde::{Deserialize, Serialize};

/// Longest trace one request may ask for.
pub const MAX_TRACE_MS: u64 = 3_600_000;

/// `POST /v1/vms/{id}/trace`'s body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TraceRequest {
    /// How long to record, milliseconds: more than 0, at most an hour.
    pub duration_ms: u64,
    /// Record the host's vCPU threads only, not the guest's processes.
    #[serde(default)]
    pub host_only: bool,
}

impl TraceRequest {
    /// Refuses a duration of 0 or above [`MAX_TRACE_MS`], saying what is allowed.
    pub fn check(&self) -> Result<(), String> {
        if self.duration_ms == 0 || self.duration_ms > MAX_TRACE_MS {
            return Err(format!(
                "duration_ms {} is out of range: give 1 to {MAX_TRACE_MS} (one hour)",
                self.duration_ms
            ));
        }
        Ok(())
    }
}

/// One scheduler event. `time_ns` is on the recording's clock (`CLOCK_MONOTONIC` of the
/// host for host recordings), `cpu` the physical CPU whose ring buffer held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SchedEvent {
    pub time_ns: u64,
    pub cpu: u32,
    pub kind: EventKind,
}

/// What happened. Thread ids are the kernel's `pid` of a thread (a `tid` in userspace).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventKind {
    /// `sched_switch`: `prev_tid` stops running on the event's CPU, `next_tid` starts.
    /// `prev_state` is the kernel's task state of `prev_tid` (0: still runnable).
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

impl EventKind {
    /// Every thread this event is about.
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// Whether `kvm_entry`/`kvm_exit` were enabled (the kernel has them). They fire only
    /// under hardware virtualisation; under TCG a VM's trace is scheduler events alone.
    pub kvm_events: bool,
}

/// `POST /v1/vms/{id}/trace`'s answer: one VM's vCPU threads recorded on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmTrace {
    pub vm: String,
    pub host: String,
    /// Host thread ids of the vCPUs, in vCPU order (QMP `query-cpus-fast`).
    pub vcpu_threads: Vec<u32>,
    pub trace: HostTrace,
    /// The guest's own scheduler events, when the guest level was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestTrace>,
}

impl VmTrace {
    /// Keeps the first `len_ns` of the window (on this recording's clock): the events
    /// and guest events after it go. The manager cuts a segment where the next one, on
    /// the host the VM moved to, begins.
    pub fn truncate(&mut self, len_ns: u64) {
        let end = self.trace.start_ns.saturating_add(len_ns);
        if end >= self.trace.end_ns {
            return;
        }
        self.trace.end_ns = end;
        self.trace.events.retain(|e| e.time_ns <= end);
        if let Some(g) = &mut self.guest {
            g.end_ns = g.end_ns.min(end).max(g.start_ns);
            g.events.retain(|e| e.time_ns <= end);
        }
    }
}

/// The manager's answer to `POST /v1/vms/{name}/trace`: the recording on the host the
/// VM ran on when the trace began (its fields, as the agent answers them, so a client
/// that knows only [`VmTrace`] reads the first host's part), then one segment per host
/// the VM moved to by live migration while the trace ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClusterTrace {
    #[serde(flatten)]
    pub first: VmTrace,
    /// The recordings on the hosts the VM moved to, in order; empty when it stayed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub later: Vec<TraceSegment>,
    /// Segments that could not be recorded, each with why (the trace has a gap there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

/// One host's part of a trace that followed a VM across a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TraceSegment {
    /// When the manager asked this host to record, after it asked the first: where the
    /// segment sits on the trace's time line (each host's events are on its own clock).
    pub offset_ns: u64,
    #[serde(flatten)]
    pub trace: VmTrace,
}

impl ClusterTrace {
    /// A trace of one host alone.
    pub fn one(first: VmTrace) -> Self {
        ClusterTrace {
            first,
            later: Vec::new(),
            missing: Vec::new(),
        }
    }

    /// Every segment with its offset, the first at 0.
    pub fn segments(&self) -> impl Iterator<Item = (u64, &VmTrace)> {
        std::iter::once((0, &self.first)).chain(self.later.iter().map(|s| (s.offset_ns, &s.trace)))
    }
}

/// How the guest's clock maps to the host's, from timestamp exchanges over the control
/// channel, and how far to trust it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClockAlignment {
    /// Guest `CLOCK_MONOTONIC` minus the host's.
    pub offset_ns: i64,
    /// Most a guest time mapped to the host's clock can be off: half the best round trip.
    pub error_ns: u64,
    /// The best exchange's round trip (outside the guest).
    pub round_trip_ns: u64,
    /// Exchanges made.
    pub exchanges: u32,
}

impl ClockAlignment {
    /// A guest timestamp on the host's clock.
    pub fn to_host(&self, guest_ns: u64) -> u64 {
        (guest_ns as i128 - self.offset_ns as i128).clamp(0, u64::MAX as i128) as u64
    }
}

/// A guest recording: the guest kernel's scheduler events of every process, with `cpu`
/// a vCPU index and times already on the host's clock (through `alignment`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GuestTrace {
    /// The guest's recording window, host clock.
    pub start_ns: u64,
    pub end_ns: u64,
    pub events: Vec<SchedEvent>,
    /// Records the guest kernel could not write (full ring buffer).
    pub lost: u64,
    /// Records the guest agent did not keep (its buffer was full when the host read).
    pub dropped: u64,
    /// Process (thread) names by thread id, as the guest's `/proc` had them.
    pub comms: std::collections::BTreeMap<u32, String>,
    /// `None` only when no exchange could be made (then the trace has no guest level).
    pub alignment: Option<ClockAlignment>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_bounded() {
        assert!(TraceRequest {
            duration_ms: 1,
            host_only: false
        }
        .check()
        .is_ok());
        assert!(TraceRequest {
            duration_ms: MAX_TRACE_MS,
            host_only: true,
        }
        .check()
        .is_ok());
        for bad in [0, MAX_TRACE_MS + 1] {
            let e = TraceRequest {
                duration_ms: bad,
                host_only: false,
            }
            .check()
            .unwrap_err();
            assert!(e.contains("1 to 3600000"), "{e}");
        }
    }

    fn vm_trace(host: &str, times: &[u64]) -> VmTrace {
        let ev = |t| SchedEvent {
            time_ns: t,
            cpu: 0,
            kind: EventKind::Wakeup {
                tid: 1,
                target_cpu: 0,
            },
        };
        VmTrace {
            vm: "v".into(),
            host: host.into(),
            vcpu_threads: vec![1],
            trace: HostTrace {
                start_ns: 100,
                end_ns: 1_100,
                cpus: vec![0],
                tids: vec![1],
                events: times.iter().map(|&t| ev(t)).collect(),
                lost: 0,
                dropped: 0,
                kvm_events: false,
            },
            guest: Some(GuestTrace {
                start_ns: 90,
                end_ns: 1_100,
                events: times.iter().map(|&t| ev(t)).collect(),
                ..GuestTrace::default()
            }),
        }
    }

    #[test]
    fn a_segment_is_cut_where_the_next_begins() {
        let mut t = vm_trace("h1", &[100, 400, 600, 1_000]);
        t.truncate(5_000);
        assert_eq!(t, vm_trace("h1", &[100, 400, 600, 1_000]));
        t.truncate(400);
        assert_eq!((t.trace.start_ns, t.trace.end_ns), (100, 500));
        let times = |e: &[SchedEvent]| e.iter().map(|e| e.time_ns).collect::<Vec<_>>();
        assert_eq!(times(&t.trace.events), [100, 400]);
        let g = t.guest.as_ref().unwrap();
        assert_eq!((g.end_ns, times(&g.events)), (500, vec![100, 400]));
    }

    #[test]
    fn a_cluster_trace_reads_as_its_first_host_for_an_older_client() {
        let one = ClusterTrace::one(vm_trace("h1", &[200]));
        let v = serde_json::to_value(&one).unwrap();
        assert!(
            v.get("later").is_none() && v.get("missing").is_none(),
            "{v}"
        );
        assert_eq!(
            serde_json::from_value::<VmTrace>(v.clone()).unwrap(),
            one.first
        );
        let two = ClusterTrace {
            later: vec![TraceSegment {
                offset_ns: 2_000_000,
                trace: vm_trace("h2", &[300]),
            }],
            ..one
        };
        let v = serde_json::to_value(&two).unwrap();
        assert_eq!(v["host"], "h1");
        assert_eq!(v["later"][0]["host"], "h2");
        assert_eq!(serde_json::from_value::<ClusterTrace>(v).unwrap(), two);
        let hosts: Vec<(u64, &str)> = two.segments().map(|(o, t)| (o, t.host.as_str())).collect();
        assert_eq!(hosts, [(0, "h1"), (2_000_000, "h2")]);
    }

    #[test]
    fn events_are_tagged_by_kind() {
        let e = SchedEvent {
            time_ns: 5,
            cpu: 1,
            kind: EventKind::Migrate {
                tid: 7,
                orig_cpu: 0,
                dest_cpu: 1,
            },
        };
        let v = serde_json::to_value(e).unwrap();
        assert_eq!(v["kind"]["kind"], "migrate");
        assert_eq!(serde_json::from_value::<SchedEvent>(v).unwrap(), e);
        assert_eq!(e.kind.tids(), [Some(7), None]);
    }
}
