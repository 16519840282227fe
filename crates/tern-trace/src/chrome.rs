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
//! A trace that followed a VM across live migrations ([`write_segments`]) has a
//! process of cores per host (pid 1 for the first, 10 + *k* for the *k*-th later one)
//! whose tracks are named `HOST cpu N`, so two hosts' cores are told apart; the vCPU
//! and guest tracks go on across hosts. Each host's times are on its own clock, so a
//! segment is placed by its offset (the manager's clock) from the first one's start.
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
/// The cores of the hosts a VM moved to during a trace: pid 10 + the segment's index.
const LATER_HOST_PID: u32 = 10;

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

/// Where one host's recording goes in the file: the host time that maps to 0, the
/// "process" of that host's cores, and what its core tracks are called.
struct Place {
    origin_ns: i128,
    host_pid: u32,
    cpu_prefix: String,
}

/// The events of `e`, track names first.
fn events(e: &Export<'_>) -> Vec<Event> {
    let place = Place {
        origin_ns: e.timeline.start_ns as i128,
        host_pid: HOST_PID,
        cpu_prefix: String::new(),
    };
    let mut out = vec![vm_process(e.vm)];
    let tl = e.timeline;
    let label = |tid: u32| match e.vcpus.vcpu(tid) {
        Some(i) => format!("vCPU {i}"),
        None => format!("thread {tid}"),
    };
    for &tid in &tl.tids {
        out.push(Event::meta(
            "thread_name",
            VCPU_PID,
            track(e, tid),
            format!("{} (tid {tid})", label(tid)),
            "name",
        ));
    }
    segment_events(&mut out, e, &place);
    if e.guest.is_some() {
        out.push(guest_process());
    }
    out
}

fn vm_process(vm: &str) -> Event {
    Event::meta("process_name", VCPU_PID, 0, format!("{vm} vcpus"), "name")
}

fn guest_process() -> Event {
    Event::meta(
        "process_name",
        GUEST_PID,
        0,
        "guest processes".to_string(),
        "name",
    )
}

/// A vCPU's track id is its index; a traced thread that is not a vCPU gets one past the
/// vCPUs, ordered by thread id.
fn track(e: &Export<'_>, tid: u32) -> u32 {
    let tl = e.timeline;
    e.vcpus.vcpu(tid).unwrap_or_else(|| {
        e.vcpus.len() as u32 + tl.tids.iter().position(|&t| t == tid).unwrap_or(0) as u32
    })
}

/// One host's recording: its cores' tracks and slices, its vCPU slices, its guest level.
fn segment_events(out: &mut Vec<Event>, e: &Export<'_>, at: &Place) {
    let tl = e.timeline;
    // Guest events may start before the host window: times are signed.
    let us = |t: u64| (t as i128 - at.origin_ns) as f64 / 1000.0;
    let label = |tid: u32| match e.vcpus.vcpu(tid) {
        Some(i) => format!("vCPU {i}"),
        None => format!("thread {tid}"),
    };
    out.push(Event::meta(
        "process_name",
        at.host_pid,
        0,
        format!("host {} cores", e.host),
        "name",
    ));
    for cpu in tl.cpus() {
        out.push(Event::meta(
            "thread_name",
            at.host_pid,
            cpu,
            format!("{}cpu {cpu}", at.cpu_prefix),
            "name",
        ));
        out.push(Event::meta(
            "thread_sort_index",
            at.host_pid,
            cpu,
            cpu.to_string(),
            "sort_index",
        ));
    }
    for s in &tl.spans {
        let (name, cpu) = match s.state {
            State::Running { cpu } => (format!("{}cpu {cpu}", at.cpu_prefix), Some(cpu)),
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
            args: json!({ "tid": s.tid, "host": e.host }),
        };
        out.push(slice(name, VCPU_PID, track(e, s.tid)));
        if let Some(cpu) = cpu {
            out.push(slice(label(s.tid), at.host_pid, cpu));
        }
    }
    for m in &tl.migrations {
        out.push(Event {
            name: format!(
                "migrate {p}cpu {} → {p}cpu {}",
                m.from_cpu,
                m.to_cpu,
                p = at.cpu_prefix
            ),
            ph: "i",
            pid: VCPU_PID,
            tid: track(e, m.tid),
            ts: Some(us(m.time_ns)),
            dur: None,
            s: Some("t"),
            args: json!({ "tid": m.tid, "from_cpu": m.from_cpu, "to_cpu": m.to_cpu, "host": e.host }),
        });
    }
    if let Some(g) = e.guest {
        guest_events(out, g, us);
    }
}

/// One host's part of a trace that followed a VM across live migrations.
pub struct Segment<'a> {
    pub export: Export<'a>,
    /// Where it begins after the first segment's start (the manager's clock).
    pub offset_ns: u64,
}

/// The events of a trace in segments: the first host's cores as pid 1, each later
/// host's as a process of its own (pid 10, 11, ...) whose core tracks are named
/// `HOST cpu N`, so two hosts' cores are told apart; the VM's vCPU and guest tracks
/// go on across the hosts.
fn segments_events(segments: &[Segment<'_>]) -> Vec<Event> {
    let Some(first) = segments.first() else {
        return Vec::new();
    };
    if segments.len() == 1 {
        return events(&first.export);
    }
    let mut out = vec![vm_process(first.export.vm)];
    // One name per vCPU track, with its thread on every host.
    let mut names: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
    for seg in segments {
        let e = &seg.export;
        for &tid in &e.timeline.tids {
            names
                .entry(track(e, tid))
                .or_default()
                .push(format!("tid {tid} on {}", e.host));
        }
    }
    for (track, on) in names {
        let who = match (track as usize) < first.export.vcpus.len() {
            true => format!("vCPU {track}"),
            false => format!("thread {track}"),
        };
        out.push(Event::meta(
            "thread_name",
            VCPU_PID,
            track,
            format!("{who} ({})", on.join(", ")),
            "name",
        ));
    }
    for (k, seg) in segments.iter().enumerate() {
        let e = &seg.export;
        // Each host's times are on its own clock: its window starts at its offset.
        let at = Place {
            origin_ns: e.timeline.start_ns as i128 - seg.offset_ns as i128,
            host_pid: if k == 0 {
                HOST_PID
            } else {
                LATER_HOST_PID + k as u32
            },
            cpu_prefix: format!("{} ", e.host),
        };
        segment_events(&mut out, e, &at);
    }
    if segments.iter().any(|s| s.export.guest.is_some()) {
        out.push(guest_process());
    }
    out
}

/// Pid 3: a track per guest thread, named after its `comm`.
fn guest_events(out: &mut Vec<Event>, g: GuestLevel<'_>, us: impl Fn(u64) -> f64) {
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

/// A trace in segments (see [`Segment`]) as one JSON value: `otherData` carries the
/// first host's fields as [`to_value`] does, and `segments`, each host's name, offset
/// and summary.
pub fn segments_to_value(segments: &[Segment<'_>]) -> Value {
    let Some(first) = segments.first() else {
        return json!({ "traceEvents": [] });
    };
    let mut v = to_value(&first.export);
    v["traceEvents"] = json!(segments_events(segments));
    if segments.len() > 1 {
        v["otherData"]["segments"] = segments
            .iter()
            .map(|s| {
                json!({
                    "host": s.export.host,
                    "offset_ns": s.offset_ns,
                    "start_ns": s.export.timeline.start_ns,
                    "summary": s.export.summary,
                    "guest": s.export.guest.map(|g| g.summary),
                })
            })
            .collect();
    }
    v
}

/// Writes a trace in segments to `out`.
pub fn write_segments(out: impl Write, segments: &[Segment<'_>]) -> Result<()> {
    serde_json::to_writer(out, &segments_to_value(segments))
        .map_err(|e| TraceError::Write(e.to_string()))
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
    fn segments_on_two_hosts_name_their_cores_apart_and_share_the_vcpu_tracks() {
        let vcpus1 = VcpuMap::from_threads(&[10]);
        let vcpus2 = VcpuMap::from_threads(&[20]);
        // The second host's clock is far from the first's; its segment begins 5 µs in.
        let tl1 = timeline(1_000, 6_000, &[10], &[sw(2_000, 0, 0, 0, 10)]);
        let tl2 = timeline(900_000, 905_000, &[20], &[sw(901_000, 0, 0, 0, 20)]);
        let s1 = summarize(&tl1, &vcpus1, Counts::default());
        let s2 = summarize(&tl2, &vcpus2, Counts::default());
        let segments = [
            Segment {
                export: Export {
                    host: "h1",
                    vm: "vm1",
                    timeline: &tl1,
                    vcpus: &vcpus1,
                    summary: &s1,
                    guest: None,
                },
                offset_ns: 0,
            },
            Segment {
                export: Export {
                    host: "h2",
                    vm: "vm1",
                    timeline: &tl2,
                    vcpus: &vcpus2,
                    summary: &s2,
                    guest: None,
                },
                offset_ns: 5_000,
            },
        ];
        let v = segments_to_value(&segments);
        let evs = v["traceEvents"].as_array().unwrap();
        let name = |pid: u64, tid: u64| {
            evs.iter()
                .find(|e| e["name"] == "thread_name" && e["pid"] == pid && e["tid"] == tid)
                .map(|e| e["args"]["name"].as_str().unwrap().to_string())
        };
        assert_eq!(name(1, 0).as_deref(), Some("h1 cpu 0"));
        assert_eq!(name(11, 0).as_deref(), Some("h2 cpu 0"));
        assert_eq!(
            name(2, 0).as_deref(),
            Some("vCPU 0 (tid 10 on h1, tid 20 on h2)")
        );
        let slices: Vec<(u64, f64)> = evs
            .iter()
            .filter(|e| e["ph"] == "X" && e["pid"] == 2)
            .map(|e| (e["tid"].as_u64().unwrap(), e["ts"].as_f64().unwrap()))
            .collect();
        // h1's vCPU ran from 1 µs, h2's from 5 + 1 µs, on one track.
        assert!(
            slices.contains(&(0, 1.0)) && slices.contains(&(0, 6.0)),
            "{slices:?}"
        );
        assert_eq!(v["otherData"]["segments"][1]["host"], "h2");
        assert_eq!(v["otherData"]["segments"][1]["offset_ns"], 5_000);
        // One segment alone is what `write` writes.
        assert_eq!(
            segments_to_value(&segments[..1]),
            to_value(&segments[0].export)
        );
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
