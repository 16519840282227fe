//! `tern agent vm trace ID` and `tern trace VM`: record the scheduler events of a VM's
//! vCPU threads on its host and of its guest's processes (unless `--host-only`) through
//! its agent (directly, or through the manager), write a Chrome/Perfetto trace and
//! print the summary (docs/trace.md).
//!
//! Bad input (a duration of 0 or over an hour, an output path that cannot be written)
//! exits 2 before anything is recorded; the trace file is written beside its target
//! and renamed, so a failed run leaves nothing half-written.

use super::super::bad_input;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_api::trace::{ClusterTrace, TraceRequest, MAX_TRACE_MS};
use tern_trace::chrome::{self, Export, GuestLevel, Segment};
use tern_trace::merge::{guest_timeline, summarize_guest, GuestSummary};
use tern_trace::{Summary, VcpuMap};

#[derive(clap::Args, Debug)]
pub struct TraceArgs {
    pub id: String,
    /// How long to record: e.g. 500ms, 10s, 2m (at most 1h).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Where to write the Chrome/Perfetto trace (opens in ui.perfetto.dev).
    #[arg(long, default_value = "trace.json", value_name = "FILE")]
    pub out: PathBuf,
    /// Record the host's vCPU threads only, not the guest's processes.
    #[arg(long)]
    pub host_only: bool,
}

/// Largest trace answer read (an hour of a busy VM's events is below).
pub const MAX_TRACE_BYTES: usize = 1 << 30;

/// What a trace run reports: the host level, and the guest level when recorded. A
/// trace that followed the VM to other hosts has the host level of all of them added
/// up (`tern_trace::summary::combine`) and each host's part in `segments`.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    #[serde(flatten)]
    pub host: Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestSummary>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub segments: Vec<SegmentReport>,
    /// Parts of the window no host recorded, with why.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

/// One host's part of a trace that followed the VM across live migrations.
#[derive(Debug, serde::Serialize)]
pub struct SegmentReport {
    pub host: String,
    /// Where it begins after the trace's start.
    pub offset_ns: u64,
    pub summary: Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestSummary>,
}

/// `500ms`, `10s`, `2m`, `1h` (pure). 0 and more than an hour are refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: give e.g. 500ms, 10s, 2m"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" | "" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(|| format!("{text:?}: the unit is one of ms, s, m, h"))?;
    if ms == 0 || ms > MAX_TRACE_MS {
        return Err(format!(
            "{text:?} is out of range: give more than 0 and at most 1h"
        ));
    }
    Ok(Duration::from_millis(ms))
}

/// A temporary file beside `out`, created now so an unwritable path fails before the
/// recording starts.
fn staging(out: &Path) -> anyhow::Result<tempfile::NamedTempFile> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    tempfile::Builder::new()
        .prefix(".tern-trace-")
        .tempfile_in(dir)
        .map_err(|e| bad_input(format!("--out {}: cannot write there: {e}", out.display())))
}

/// Records through `fetch` (the agent's or the manager's trace route), writes the trace
/// to `a.out`, and returns the summary.
pub fn run(
    a: &TraceArgs,
    fetch: impl FnOnce(&TraceRequest) -> anyhow::Result<ClusterTrace>,
) -> anyhow::Result<Report> {
    let tmp = staging(&a.out)?;
    let req = TraceRequest {
        duration_ms: a.duration.as_millis() as u64,
        host_only: a.host_only,
    };
    let ct = fetch(&req)?;
    // Each host's part analysed on its own (its threads, its clock).
    let parts: Vec<_> = ct
        .segments()
        .map(|(offset_ns, v)| {
            let vcpus = VcpuMap::from_threads(&v.vcpu_threads);
            let (tl, summary) = tern_trace::analyse(&v.trace, &vcpus);
            let guest = v.guest.as_ref().map(|g| {
                let gtl = guest_timeline(g);
                let gs = summarize_guest(&gtl, g, &tl, &vcpus);
                (g, gtl, gs)
            });
            (offset_ns, v, vcpus, tl, summary, guest)
        })
        .collect();
    let segments: Vec<Segment<'_>> = parts
        .iter()
        .map(|(offset_ns, v, vcpus, tl, summary, guest)| Segment {
            export: Export {
                host: &v.host,
                vm: &v.vm,
                timeline: tl,
                vcpus,
                summary,
                guest: guest.as_ref().map(|(g, gtl, gs)| GuestLevel {
                    timeline: gtl,
                    trace: g,
                    summary: gs,
                }),
            },
            offset_ns: *offset_ns,
        })
        .collect();
    let mut w = std::io::BufWriter::new(tmp.as_file());
    chrome::write_segments(&mut w, &segments)?;
    w.flush()?;
    drop(w);
    drop(segments);
    // The staging file is private (0600); the trace is an ordinary file.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644))?;
    tmp.persist(&a.out)
        .map_err(|e| anyhow::anyhow!("writing {}: {}", a.out.display(), e.error))?;
    let summaries: Vec<Summary> = parts.iter().map(|p| p.4.clone()).collect();
    let host = tern_trace::summary::combine(&summaries).expect("a trace has its first host");
    let mut segments: Vec<SegmentReport> = parts
        .into_iter()
        .map(|(offset_ns, v, _, _, summary, guest)| SegmentReport {
            host: v.host.clone(),
            offset_ns,
            summary,
            guest: guest.map(|(_, _, gs)| gs),
        })
        .collect();
    let (guest, segments) = match segments.len() {
        1 => (segments.remove(0).guest, Vec::new()),
        _ => (None, segments),
    };
    Ok(Report {
        host,
        guest,
        segments,
        missing: ct.missing,
    })
}

/// Guest processes listed in the text summary (the JSON has them all).
const PROCESSES_SHOWN: usize = 15;

/// The report as text: the vCPUs, then the guest's busiest processes; for a trace
/// that followed the VM to other hosts, each host's part, then the whole.
pub fn print(r: &Report, out: &Path) {
    for m in &r.missing {
        println!("not recorded: {m}");
    }
    if r.segments.is_empty() {
        print_host(&r.host, out);
        if let Some(g) = &r.guest {
            print_guest(g);
        }
        return;
    }
    let hosts: Vec<String> = r
        .segments
        .iter()
        .map(|s| format!("{} from {:.0} ms", s.host, s.offset_ns as f64 / 1e6))
        .collect();
    println!(
        "the VM moved during the trace: {} hosts, {}",
        r.segments.len(),
        hosts.join(", ")
    );
    for s in &r.segments {
        println!("on {}:", s.host);
        print_host(&s.summary, out);
        if let Some(g) = &s.guest {
            print_guest(g);
        }
    }
    println!(
        "in all: {} events over {:.0} ms; lost {}, dropped {}, {} inconsistencies",
        r.host.events,
        r.host.window_ns as f64 / 1e6,
        r.host.lost,
        r.host.dropped,
        r.host.anomalies
    );
}

/// The guest level as text: its counts, then its busiest processes.
fn print_guest(g: &GuestSummary) {
    let ms = |ns: u64| ns as f64 / 1e6;
    println!(
        "guest: {} events; clock alignment error ≤ {}; lost {} records (ring buffer full), \
         dropped {} (guest buffer full), {} inconsistencies",
        g.events,
        g.alignment_error_ns
            .map_or("unknown".to_string(), |e| format!("{:.3} ms", ms(e))),
        g.lost,
        g.dropped,
        g.anomalies
    );
    for p in g.processes.iter().take(PROCESSES_SHOWN) {
        println!(
            "  {:<16} tid {:<7} run {:>9.1} ms  runnable {:>8.1} ms  vCPU-not-running {:>8.1} ms  \
             {} vCPU migrations, vCPUs {:?}",
            p.comm,
            p.tid,
            ms(p.run_ns),
            ms(p.runnable_ns),
            ms(p.double_sched_delay_ns),
            p.vcpu_migrations,
            p.vcpus
        );
    }
    if g.processes.len() > PROCESSES_SHOWN {
        println!(
            "  ... {} more processes (--json lists them all)",
            g.processes.len() - PROCESSES_SHOWN
        );
    }
    println!(
        "  double-scheduling delay (guest thread running, its vCPU not): {:.1} ms in all",
        ms(g.double_sched_delay_ns)
    );
}

/// The host level as text: one line per vCPU, then the trace's gaps.
fn print_host(s: &Summary, out: &Path) {
    let ms = |ns: u64| ns as f64 / 1e6;
    println!(
        "{} events over {:.0} ms, written to {}",
        s.events,
        ms(s.window_ns),
        out.display()
    );
    for t in &s.threads {
        let who = t
            .vcpu
            .map_or(format!("thread {}", t.tid), |i| format!("vCPU {i}"));
        println!(
            "  {who:<8} run {:>9.1} ms  steal {:>9.1} ms  idle {:>9.1} ms  unknown {:>7.1} ms  \
             {} core migrations, cores {:?}",
            ms(t.run_ns),
            ms(t.runnable_ns),
            ms(t.sleep_ns),
            ms(t.unknown_ns),
            t.migrations,
            t.cpus
        );
    }
    if let Some(c) = s.corun_share {
        println!(
            "  all vCPUs ran together {:.1} % of the time any ran",
            c * 100.0
        );
    }
    println!(
        "  lost {} records (ring buffer full), dropped {} (event cap), {} inconsistencies",
        s.lost, s.dropped, s.anomalies
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["0s", "61m", "2h", "x", "5d", "", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_unwritable_output_fails_before_recording() {
        let err = staging(Path::new("/nonexistent-dir/trace.json")).unwrap_err();
        assert_eq!(super::super::super::exit_code(&err), 2);
        let dir = tempfile::tempdir().unwrap();
        let tmp = staging(&dir.path().join("t.json")).unwrap();
        assert_eq!(tmp.path().parent(), Some(dir.path()));
    }
}
