//! The Chrome trace event format (JSON), which ui.perfetto.dev and chrome://tracing open.
//!
//! One "process" per level, one track ("thread") per thing at that level:
//!
//! | pid | process name      | one track per | slices                               |
//! | --- | ----------------- | ------------- | ------------------------------------ |
//! | 1   | `host HOST cores` | physical CPU  | the vCPU running on it               |
//! | 2   | `VM vcpus`        | vCPU          | `cpu N` while running, `runnable` (steal) while waiting; instant events at each migration |
//!
//! | 3   | `VM processes`    | guest thread  | `vcpu N` while the guest ran it, `runnable` while it waited; instant events at each vCPU migration |
//!
//! Times are microseconds from the host window's start (guest events are on the host's
//! clock already), with nanosecond precision in the fraction. The summary and
//! the lost-record counts travel in `otherData`, so a trace file tells its own gaps.

use crate::error::{Result, TraceError};
use crate::merge::GuestSummary;
use crate::model::{GuestTrace, VcpuMap};
use crate::summary::Summary;
use crate::timeline::{State, Timeline};
use serde::Serialize;
use serde_json::{json, Value};
use std::io::Write;

const HOST_PID: u32 = 1;
const VCPU_PID: u32 = 2;
const GUEST_PID: u32 = 3;

/// What to export: one VM's vCPUs on one host.
pub struct Export<'a> {
    pub host: &'a str,
    pub vm: &'a str,
    pub timeline: &'a Timeline,
    pub vcpus: &'a VcpuMap,
    pub summary: &'a Summary,
    /// The guest level, when the trace has one.
    pub guest: Option<GuestLevel<'a>>,
}

/// The guest's processes: their timeline on the host's clock, names and summary.
#[derive(Clone, Copy)]
pub struct GuestLevel<'a> {
    pub timeline: &'a Timeline,
    pub trace: &'a GuestTrace,
    pub summary: &'a GuestSummary,
}

/// One trace event (`ph`: `X` complete slice, `i` instant, `M` metadata).
#[derive(Debug, Serialize)]
struct Event {
    name: String,
    ph: &'static str,
    pid: u32,
    tid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dur: Option<f64>,
    /// Instant events: scoped to their track.
    #[serde(skip_serializing_if = "Option::is_none")]
    s: Option<&'static str>,
    #[serde(skip_serializing_if = "Value::is_null")]
    args: Value,
}

impl Event {
    fn meta(name: &str, pid: u32, tid: u32, value: String, key: &str) -> Event {
        Event {
            name: name.to_string(),
            ph: "M",
            pid,
            tid,
            ts: None,
            dur: None,
            s: None,
            args: json!({ key: value }),
        }
    }
}

/// The events of `e`, track names first.
fn events(e: &Export<'_>) -> Vec<Event> {
    let tl = e.timeline;
    // Guest events may start before the host window: times are signed.
    let us = |t: u64| (t as i128 - tl.start_ns as i128) as f64 / 1000.0;
    // A vCPU's track id is its index; a traced thread that is not a vCPU gets one past
    // the vCPUs, ordered by thread id.
    let track = |tid: u32| {
        e.vcpus.vcpu(tid).unwrap_or_else(|| {
            e.vcpus.len() as u32 + tl.tids.iter().position(|&t| t == tid).unwrap_or(0) as u32
        })
    };
    let label = |tid: u32| match e.vcpus.vcpu(tid) {
        Some(i) => format!("vCPU {i}"),
        None => format!("thread {tid}"),
    };
    let mut out = vec![
        Event::meta(
            "process_name",
            HOST_PID,
            0,
            format!("host {} cores", e.host),
            "name",
        ),
        Event::meta(
            "process_name",
            VCPU_PID,
            0,
            format!("{} vcpus", e.vm),
            "name",
        ),
    ];
    for cpu in tl.cpus() {
        out.push(Event::meta(
            "thread_name",
            HOST_PID,
            cpu,
            format!("cpu {cpu}"),
            "name",
        ));
        out.push(Event::meta(
            "thread_sort_index",
            HOST_PID,
            cpu,
            cpu.to_string(),
            "sort_index",
        ));
    }
    for &tid in &tl.tids {
        out.push(Event::meta(
            "thread_name",
            VCPU_PID,
            track(tid),
            format!("{} (tid {tid})", label(tid)),
            "name",
        ));
    }
    for s in &tl.spans {
        let (name, cpu) = match s.state {
            State::Running { cpu } => (format!("cpu {cpu}"), Some(cpu)),
            State::Runnable => ("runnable".to_string(), None),
            // Sleeping and unknown stretches are gaps on the track.
            State::Sleeping | State::Unknown => continue,
        };
        let slice = |name: String, pid, tid| Event {
            name,
            ph: "X",
            pid,
            tid,
            ts: Some(us(s.start_ns)),
            dur: Some(s.len_ns() as f64 / 1000.0),
            s: None,
            args: json!({ "tid": s.tid }),
        };
        out.push(slice(name, VCPU_PID, track(s.tid)));
        if let Some(cpu) = cpu {
            out.push(slice(label(s.tid), HOST_PID, cpu));
        }
    }
    for m in &tl.migrations {
        out.push(Event {
            name: format!("migrate cpu {} → {}", m.from_cpu, m.to_cpu),
            ph: "i",
            pid: VCPU_PID,
            tid: track(m.tid),
            ts: Some(us(m.time_ns)),
            dur: None,
            s: Some("t"),
            args: json!({ "tid": m.tid, "from_cpu": m.from_cpu, "to_cpu": m.to_cpu }),
        });
    }
    if let Some(g) = e.guest {
        guest_events(&mut out, g, us);
    }
    out
}

/// Pid 3: a track per guest thread, named after its `comm`.
fn guest_events(out: &mut Vec<Event>, g: GuestLevel<'_>, us: impl Fn(u64) -> f64) {
    out.push(Event::meta(
        "process_name",
        GUEST_PID,
        0,
        "guest processes".to_string(),
        "name",
    ));
    for &tid in &g.timeline.tids {
        let comm = g.trace.comms.get(&tid).map(String::as_str).unwrap_or("?");
        out.push(Event::meta(
            "thread_name",
            GUEST_PID,
            tid,
            format!("{comm} (tid {tid})"),
            "name",
        ));
    }
    for s in &g.timeline.spans {
        let name = match s.state {
            State::Running { cpu } => format!("vcpu {cpu}"),
            State::Runnable => "runnable".to_string(),
            State::Sleeping | State::Unknown => continue,
        };
        out.push(Event {
            name,
            ph: "X",
            pid: GUEST_PID,
            tid: s.tid,
            ts: Some(us(s.start_ns)),
            dur: Some(s.len_ns() as f64 / 1000.0),
            s: None,
            args: Value::Null,
        });
    }
    for m in &g.timeline.migrations {
        out.push(Event {
            name: format!("migrate vcpu {} → {}", m.from_cpu, m.to_cpu),
            ph: "i",
            pid: GUEST_PID,
            tid: m.tid,
            ts: Some(us(m.time_ns)),
            dur: None,
            s: Some("t"),
            args: Value::Null,
        });
    }
}

/// The whole trace as one JSON value.
pub fn to_value(e: &Export<'_>) -> Value {
    json!({
        "traceEvents": events(e),
        "displayTimeUnit": "ns",
        "otherData": {
            "host": e.host,
            "vm": e.vm,
            "start_ns": e.timeline.start_ns,
            "summary": e.summary,
            "guest": e.guest.map(|g| g.summary),
            "clock_alignment": e.guest.and_then(|g| g.trace.alignment),
        },
    })
}

/// Writes the trace to `out`.
pub fn write(out: impl Write, e: &Export<'_>) -> Result<()> {
    serde_json::to_writer(out, &to_value(e)).map_err(|e| TraceError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventKind;
    use crate::summary::{summarize, Counts};
    use crate::timeline::tests::{ev, sw};
    use crate::timeline::timeline;

    #[test]
    fn tracks_per_cpu_and_vcpu_with_migrations() {
        let events = [
            sw(1_000, 0, 0, 0, 10),
            sw(3_000, 0, 10, 0x100, 0),
            ev(
                3_500,
                1,
                EventKind::Migrate {
                    tid: 10,
                    orig_cpu: 0,
                    dest_cpu: 1,
                },
            ),
            sw(4_000, 1, 0, 0, 10),
        ];
        let tl = timeline(0, 10_000, &[10, 11], &events);
        let vcpus = VcpuMap::from_threads(&[10, 11]);
        let summary = summarize(&tl, &vcpus, Counts::default());
        let v = to_value(&Export {
            host: "h1",
            vm: "vm1",
            timeline: &tl,
            vcpus: &vcpus,
            summary: &summary,
            guest: None,
        });
        let evs = v["traceEvents"].as_array().unwrap();
        let named = |pid: u64, tid: u64| {
            evs.iter()
                .find(|e| {
                    e["ph"] == "M"
                        && e["name"] == "thread_name"
                        && e["pid"] == pid
                        && e["tid"] == tid
                })
                .map(|e| e["args"]["name"].as_str().unwrap().to_string())
        };
        assert_eq!(named(1, 0).as_deref(), Some("cpu 0"));
        assert_eq!(named(1, 1).as_deref(), Some("cpu 1"));
        assert_eq!(named(2, 0).as_deref(), Some("vCPU 0 (tid 10)"));
        assert_eq!(named(2, 1).as_deref(), Some("vCPU 1 (tid 11)"));
        let on_cpu1: Vec<&Value> = evs
            .iter()
            .filter(|e| e["ph"] == "X" && e["pid"] == 1 && e["tid"] == 1)
            .collect();
        assert_eq!(on_cpu1.len(), 1);
        assert_eq!(on_cpu1[0]["name"], "vCPU 0");
        assert_eq!(on_cpu1[0]["ts"], 4.0);
        assert_eq!(on_cpu1[0]["dur"], 6.0);
        // Runnable before its first switch-in (inferred) and while preempted.
        let runnable: Vec<(Option<f64>, Option<f64>)> = evs
            .iter()
            .filter(|e| e["name"] == "runnable")
            .map(|e| (e["ts"].as_f64(), e["dur"].as_f64()))
            .collect();
        assert_eq!(
            runnable,
            vec![(Some(0.0), Some(1.0)), (Some(3.0), Some(1.0))]
        );
        let mig = evs.iter().find(|e| e["ph"] == "i").unwrap();
        assert_eq!(
            (mig["pid"].as_u64(), mig["tid"].as_u64()),
            (Some(2), Some(0))
        );
        assert_eq!(v["otherData"]["summary"]["lost"], 0);
        let mut buf = Vec::new();
        write(
            &mut buf,
            &Export {
                host: "h1",
                vm: "vm1",
                timeline: &tl,
                vcpus: &vcpus,
                summary: &summary,
                guest: None,
            },
        )
        .unwrap();
        let back: Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn guest_processes_get_a_track_each_with_the_alignment() {
        use crate::merge::{guest_timeline, summarize_guest};
        use crate::model::{ClockAlignment, GuestTrace};
        let vcpus = VcpuMap::from_threads(&[10]);
        let tl = timeline(0, 1_000, &[10], &[sw(0, 0, 0, 0, 10)]);
        let summary = summarize(&tl, &vcpus, Counts::default());
        let g = GuestTrace {
            start_ns: 0,
            end_ns: 1_000,
            events: vec![sw(100, 0, 0, 0, 50), sw(400, 0, 50, 1, 0)],
            comms: [(50, "spin".to_string())].into(),
            alignment: Some(ClockAlignment {
                offset_ns: 7,
                error_ns: 30,
                round_trip_ns: 60,
                exchanges: 8,
            }),
            dropped: 3,
            ..GuestTrace::default()
        };
        let gtl = guest_timeline(&g);
        let gs = summarize_guest(&gtl, &g, &tl, &vcpus);
        let v = to_value(&Export {
            host: "h1",
            vm: "vm1",
            timeline: &tl,
            vcpus: &vcpus,
            summary: &summary,
            guest: Some(GuestLevel {
                timeline: &gtl,
                trace: &g,
                summary: &gs,
            }),
        });
        let evs = v["traceEvents"].as_array().unwrap();
        assert!(evs
            .iter()
            .any(|e| e["pid"] == 3 && e["tid"] == 50 && e["args"]["name"] == "spin (tid 50)"));
        let slice = evs
            .iter()
            .find(|e| e["pid"] == 3 && e["name"] == "vcpu 0")
            .unwrap();
        assert_eq!(slice["ts"].as_f64(), Some(0.1));
        assert_eq!(slice["dur"].as_f64(), Some(0.3));
        assert_eq!(v["otherData"]["clock_alignment"]["error_ns"], 30);
        assert_eq!(v["otherData"]["guest"]["dropped"], 3);
    }
}
