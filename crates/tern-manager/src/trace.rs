//! A VM's trace through the manager (`POST /v1/vms/{name}/trace`), followed across live
//! migrations: the agent of the VM's host records; when the VM's record names another
//! host during the window (a migration finished), that host's agent is asked to record
//! the rest of the window too. The answer is a [`ClusterTrace`]: the first host's
//! recording, then a segment per host the VM moved to, each cut where the next begins
//! ([`stitch`], pure).

use std::sync::Arc;
use std::time::Duration;

use tern_api::trace::{ClusterTrace, TraceRequest, TraceSegment, VmTrace};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::client::Connector;
use crate::error::{Error, Result};
use crate::manager::Manager;
use crate::state::{Host, VmState};

/// How often the VM's record is read for a new host while a trace runs. A segment on
/// the new host begins this long after the migration was recorded, at most.
const FOLLOW_EVERY: Duration = Duration::from_millis(50);

/// A segment shorter than this is not asked for: the window is over.
const MIN_SEGMENT: Duration = Duration::from_millis(10);

/// The host VM `vm` runs on, when it runs.
fn running_host(manager: &Manager, vm: &str) -> Result<Option<Host>> {
    manager.read(|s| {
        let v = s
            .vms
            .get(vm)
            .ok_or_else(|| Error::UnknownVm(vm.to_owned()))?;
        Ok(match (v.state, &v.observed_host) {
            (VmState::Running, Some(h)) => s.hosts.get(h).cloned(),
            _ => None,
        })
    })
}

type Recording = JoinHandle<Result<VmTrace>>;

fn record(agents: &Arc<dyn Connector>, host: &Host, vm: &str, req: TraceRequest) -> Recording {
    let client = agents.client(host);
    let vm = vm.to_owned();
    tokio::spawn(async move { client?.trace_vm(&vm, &req).await })
}

/// Records VM `vm` for `req.duration_ms` wherever it runs. The VM must run when the
/// trace begins (409); the first host's failure is the answer's, a later one's is
/// listed in [`ClusterTrace::missing`].
pub async fn follow(
    manager: &Manager,
    agents: &Arc<dyn Connector>,
    vm: &str,
    req: TraceRequest,
) -> Result<ClusterTrace> {
    let window = Duration::from_millis(req.duration_ms);
    let state = || manager.read(|s| s.vms.get(vm).map(|v| v.state));
    let first = running_host(manager, vm)?.ok_or_else(|| {
        Error::Conflict(format!(
            "VM {vm:?} is {:?}, not running on a host: only a running VM is traced",
            state()
        ))
    })?;
    let started = Instant::now();
    let mut on = first.name.clone();
    let mut segments: Vec<(u64, String, Recording)> =
        vec![(0, on.clone(), record(agents, &first, vm, req))];
    loop {
        let left = window.saturating_sub(started.elapsed());
        if left < MIN_SEGMENT {
            break;
        }
        tokio::time::sleep(left.min(FOLLOW_EVERY)).await;
        // A VM deleted meanwhile ends the following, not the recordings under way.
        let Ok(Some(host)) = running_host(manager, vm) else {
            continue;
        };
        if host.name == on {
            continue;
        }
        let offset = started.elapsed();
        let left = window.saturating_sub(offset);
        if left < MIN_SEGMENT {
            break;
        }
        let rest = TraceRequest {
            duration_ms: left.as_millis().max(1) as u64,
            ..req
        };
        tracing::info!(vm, from = %on, to = %host.name, ?offset, "trace follows the VM to its new host");
        on = host.name.clone();
        segments.push((
            offset.as_nanos() as u64,
            on.clone(),
            record(agents, &host, vm, rest),
        ));
    }
    let mut done = Vec::new();
    for (offset, host, rec) in segments {
        let r = rec.await.unwrap_or_else(|e| {
            Err(Error::Agent {
                host: host.clone(),
                message: format!("the trace request ended: {e}"),
            })
        });
        done.push((offset, host, r));
    }
    let mut done = done.into_iter();
    let (_, _, first) = done.next().expect("the first host's recording");
    Ok(stitch(first?, done.collect()))
}

/// The first host's recording and the later ones, in the order they were asked, as
/// one answer (pure): each cut where the next begins; a later one that failed is listed
/// as missing.
pub fn stitch(first: VmTrace, later: Vec<(u64, String, Result<VmTrace>)>) -> ClusterTrace {
    let mut out = ClusterTrace::one(first);
    let mut last_offset = 0;
    for (offset, host, r) in later {
        match r {
            Ok(trace) => {
                let cut = offset.saturating_sub(last_offset);
                match out.later.last_mut() {
                    Some(prev) => prev.trace.truncate(cut),
                    None => out.first.truncate(cut),
                }
                out.later.push(TraceSegment {
                    offset_ns: offset,
                    trace,
                });
                last_offset = offset;
            }
            Err(e) => out
                .missing
                .push(format!("{host} from {} ms: {e}", offset / 1_000_000)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::trace::{EventKind, HostTrace, SchedEvent};

    fn rec(host: &str, start: u64, times: &[u64]) -> VmTrace {
        VmTrace {
            vm: "v".into(),
            host: host.into(),
            vcpu_threads: vec![7],
            trace: HostTrace {
                start_ns: start,
                end_ns: start + 10_000,
                cpus: vec![0],
                tids: vec![7],
                events: times
                    .iter()
                    .map(|&t| SchedEvent {
                        time_ns: start + t,
                        cpu: 0,
                        kind: EventKind::Wakeup {
                            tid: 7,
                            target_cpu: 0,
                        },
                    })
                    .collect(),
                lost: 0,
                dropped: 0,
                kvm_events: false,
            },
            guest: None,
        }
    }

    #[test]
    fn each_segment_ends_where_the_next_begins_and_failures_are_gaps() {
        let t = stitch(
            rec("h1", 1_000, &[10, 3_000, 9_000]),
            vec![
                (4_000, "h2".into(), Ok(rec("h2", 50, &[100, 5_000]))),
                (
                    7_000,
                    "h3".into(),
                    Err(Error::Conflict("not running".into())),
                ),
            ],
        );
        assert_eq!(t.first.trace.end_ns, 5_000);
        assert_eq!(t.first.trace.events.len(), 2);
        assert_eq!(t.later.len(), 1);
        assert_eq!(
            (t.later[0].offset_ns, t.later[0].trace.host.as_str()),
            (4_000, "h2")
        );
        // The last recorded segment keeps its whole window.
        assert_eq!(t.later[0].trace.trace.end_ns, 10_050);
        assert_eq!(t.missing.len(), 1);
        assert!(t.missing[0].starts_with("h3 from 0 ms"), "{:?}", t.missing);
    }

    #[test]
    fn a_trace_that_stayed_on_its_host_is_that_hosts_recording() {
        let one = stitch(rec("h1", 0, &[5]), Vec::new());
        assert_eq!(one, ClusterTrace::one(rec("h1", 0, &[5])));
    }
}
