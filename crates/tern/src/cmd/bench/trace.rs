//! `tern bench trace`: what recording scheduler events costs a scheduler-heavy guest,
//! tern's recorder beside `perf sched record`. One 2-vCPU guest on a one-host lab runs
//! `wakeup` (threads in a ring waking each other); each round measures the guest's
//! handoff rate with no tracer, under `tern-host` (the agent's trace route, host level
//! only), under `tern` (host and guest levels) and under `perf sched record` on the
//! host, in an order rotated by one per round. Every run measures the same window, with
//! the tracer already running a second before it and still running after it.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;
use tern_agent::client::AgentClient;
use tern_agent::vms::CreateVm;
use tern_api::guest::{Command as GuestCommand, WorkloadSpec, MAX_WAKEUP_THREADS};
use tern_api::trace::TraceRequest;
use tern_lab as lab;

use super::migration::median;
use super::vcpu::{guest as ask, rate};
use crate::cmd::bad_input;

/// The guest of the experiment.
const VM: &str = "trace-a";
/// How long a tracer runs before the measured window (perf synthesises the machine's
/// threads when it starts; tern's guest level aligns clocks first)...
const LEAD: Duration = Duration::from_secs(1);
/// ...and after it, so the window never sees a tracer start or stop.
const TAIL: Duration = Duration::from_millis(500);
/// Pause between runs: perf's post-processing and the last run's answer are done, the
/// guest's ring is back in its steady state.
const SETTLE: Duration = Duration::from_secs(1);
/// Longest wait for `perf report --stats` on a recording.
const PERF_REPORT_TIMEOUT: Duration = Duration::from_secs(180);

/// What the numbers mean, printed with them.
pub const NOTE: &str = "ops_per_s: the guest's wakeup handoffs per second over the \
     measured window; overhead_pct: per round, (none - x) / none * 100 against that \
     round's untraced run, then the median over the rounds; events: records in the \
     recording (tern-host: the VM's vCPU threads, filtered in the kernel; tern: those and \
     every guest process's; perf: every thread of the host, as perf sched record \
     records system-wide); lost: records the kernel could not write plus records not \
     kept";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Rounds; each runs every tracer once, in an order rotated by one per round.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Seconds each run measures.
    #[arg(long, default_value_t = 5.0)]
    pub seconds: f64,
    /// Threads in the guest's wakeup ring.
    #[arg(long, default_value_t = 4)]
    pub threads: u32,
    /// Memory of the guest, MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mib: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What records scheduler events during a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tracer {
    /// Nothing: the baseline.
    None,
    /// The agent's trace route with `host_only`: the VM's vCPU threads on the host.
    TernHost,
    /// The agent's trace route with both levels: the host's and the guest's own events.
    Tern,
    /// `perf sched record` on the host, system-wide.
    Perf,
}

impl Tracer {
    pub const ALL: [Tracer; 4] = [Tracer::None, Tracer::TernHost, Tracer::Tern, Tracer::Perf];

    pub fn name(self) -> &'static str {
        match self {
            Tracer::None => "none",
            Tracer::TernHost => "tern-host",
            Tracer::Tern => "tern",
            Tracer::Perf => "perf",
        }
    }
}

/// One tracer in one round.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Sample {
    pub tracer: Tracer,
    pub round: u32,
    pub ops_per_s: f64,
    /// Against this round's `none` run; `None` when that run did nothing.
    pub overhead_pct: Option<f64>,
    pub events: u64,
    pub lost: u64,
    /// How long the tracer recorded (0 for `none`).
    pub recorded_s: f64,
    /// `tern` only: of `events` and `lost`, the guest level's: records the guest
    /// kernel could not write (`guest_lost`) and records the guest agent's full buffer
    /// did not keep (`guest_dropped`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_events: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_lost: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_dropped: Option<u64>,
}

/// One tracer over every round: medians, and the range of the rounds.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Run {
    pub tracer: Tracer,
    pub ops_per_s: f64,
    pub overhead_pct: f64,
    pub events: u64,
    pub lost: u64,
    pub ops_per_s_range: [f64; 2],
    pub overhead_pct_range: [f64; 2],
    pub events_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub runs: Vec<Run>,
    pub rounds: Vec<Sample>,
    pub seconds: f64,
    pub threads: u32,
    /// `tern-host`'s median overhead at most `perf`'s (the goal).
    pub goal_met: Option<bool>,
    pub note: &'static str,
}

/// The tracers of round `round`: all four, rotated by `round` (pure).
pub fn round_order(round: u32) -> [Tracer; 4] {
    let mut t = Tracer::ALL;
    t.rotate_left(round as usize % Tracer::ALL.len());
    t
}

/// The throughput `x` lost against `none`, percent (pure); `None` without a baseline.
pub fn overhead_pct(none: f64, x: f64) -> Option<f64> {
    (none > 0.0 && none.is_finite() && x.is_finite()).then(|| (none - x) / none * 100.0)
}

/// Fills each sample's overhead from its round's `none` run (pure).
pub fn with_overheads(samples: &mut [Sample]) {
    let baselines: Vec<(u32, f64)> = samples
        .iter()
        .filter(|s| s.tracer == Tracer::None)
        .map(|s| (s.round, s.ops_per_s))
        .collect();
    for s in samples.iter_mut() {
        s.overhead_pct = baselines
            .iter()
            .find(|(r, _)| *r == s.round)
            .and_then(|&(_, none)| overhead_pct(none, s.ops_per_s));
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Medians and ranges per tracer, in [`Tracer::ALL`]'s order (pure).
pub fn summarize(samples: &[Sample]) -> Vec<Run> {
    Tracer::ALL
        .into_iter()
        .filter_map(|tracer| {
            let of: Vec<&Sample> = samples.iter().filter(|s| s.tracer == tracer).collect();
            let ops = sorted(of.iter().map(|s| s.ops_per_s).collect());
            if ops.is_empty() {
                return None;
            }
            let over = sorted(of.iter().filter_map(|s| s.overhead_pct).collect());
            let events = sorted(of.iter().map(|s| s.events as f64).collect());
            let lost = sorted(of.iter().map(|s| s.lost as f64).collect());
            let per_s = sorted(
                of.iter()
                    .map(|s| match s.recorded_s {
                        r if r > 0.0 => s.events as f64 / r,
                        _ => 0.0,
                    })
                    .collect(),
            );
            let range = |v: &[f64]| match (v.first(), v.last()) {
                (Some(&a), Some(&b)) => [a, b],
                _ => [f64::NAN, f64::NAN],
            };
            Some(Run {
                tracer,
                ops_per_s: median(&ops),
                overhead_pct: median(&over),
                events: median(&events).round() as u64,
                lost: median(&lost).round() as u64,
                ops_per_s_range: range(&ops),
                overhead_pct_range: range(&over),
                events_per_s: median(&per_s),
            })
        })
        .collect()
}

/// Whether `tern-host`'s median overhead is at most `perf`'s (pure); `None` when
/// either is missing.
pub fn goal_met(runs: &[Run]) -> Option<bool> {
    let of = |t| {
        runs.iter()
            .find(|r| r.tracer == t)
            .map(|r| r.overhead_pct)
            .filter(|o| o.is_finite())
    };
    Some(of(Tracer::TernHost)? <= of(Tracer::Perf)?)
}

/// What a perf recording holds, from `perf report --stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerfCount {
    pub samples: u64,
    pub lost: u64,
}

/// Reads `perf report --stats` (pure): the samples are the aggregated `SAMPLE events`;
/// the lost samples are the sum of the per-event `LOST_SAMPLES events` (perf reads the
/// kernel's own count of each event's lost records when it stops), or, from a perf
/// that does not read them, at least the number of `PERF_RECORD_LOST` records.
pub fn perf_stats(text: &str) -> Option<PerfCount> {
    let mut aggregated = false;
    let mut samples = None;
    let (mut per_event_lost, mut lost_records) = (0u64, 0u64);
    for line in text.lines().map(str::trim) {
        if line == "Aggregated stats:" {
            aggregated = true;
            continue;
        }
        if line.ends_with(" stats:") {
            aggregated = false;
            continue;
        }
        let Some((name, rest)) = line.split_once(" events:") else {
            continue;
        };
        let Some(n) = rest
            .split_whitespace()
            .next()
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        match (aggregated, name.trim()) {
            (true, "SAMPLE") => samples = Some(n),
            (true, "LOST") => lost_records = n,
            (false, "LOST_SAMPLES") => per_event_lost += n,
            _ => {}
        }
    }
    Some(PerfCount {
        samples: samples?,
        lost: per_event_lost.max(lost_records),
    })
}

/// Fails with what to install when `perf` cannot run.
fn check_perf() -> anyhow::Result<()> {
    match std::process::Command::new("perf")
        .arg("--version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => bail!(
            "perf does not run here ({}); install Debian's linux-perf matching the kernel \
             (apt-get install linux-perf)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "perf is not installed: install Debian's linux-perf (apt-get install linux-perf, \
             or scripts/setup), which `tern bench trace` runs beside tern's recorder"
        ),
        Err(e) => bail!("cannot run perf: {e}"),
    }
}

/// Under `SCHED_FIFO` (`chrt -f`), makes this process `SCHED_RR` at the same priority
/// before it starts anything, and so the lab's agent, QEMU and perf, which inherit it.
/// FIFO never shares a CPU among equals: a vCPU thread that does not halt (a booting
/// guest) starves its own agent and QEMU's main loop for minutes. RR keeps them all
/// above the machine's other work and gives each a time slice.
fn fifo_to_rr() -> anyhow::Result<()> {
    // SAFETY: plain syscalls on this thread with a parameter struct they fill or read.
    unsafe {
        if libc::sched_getscheduler(0) != libc::SCHED_FIFO {
            return Ok(());
        }
        let mut param: libc::sched_param = std::mem::zeroed();
        if libc::sched_getparam(0, &mut param) != 0
            || libc::sched_setscheduler(0, libc::SCHED_RR, &param) != 0
        {
            return Err(std::io::Error::last_os_error()).context("SCHED_FIFO to SCHED_RR");
        }
    }
    eprintln!("bench: SCHED_FIFO became SCHED_RR for the lab, QEMU and perf to share CPUs");
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.rounds == 0 || args.rounds > 100 {
        return Err(bad_input("--rounds must be within 1..=100"));
    }
    if !(args.seconds.is_finite() && (0.5..=600.0).contains(&args.seconds)) {
        return Err(bad_input("--seconds must be within 0.5..=600"));
    }
    if !(2..=MAX_WAKEUP_THREADS).contains(&args.threads) {
        return Err(bad_input(format!(
            "--threads must be within 2..={MAX_WAKEUP_THREADS}"
        )));
    }
    if args.memory_mib < 64 {
        return Err(bad_input("--memory-mib must be at least 64"));
    }
    check_perf()?;
    fifo_to_rr()?;
    let mut rounds = super::with_lab(1, None, args.memory_mib * 2, async |lab, img, dir| {
        let host = client(lab, &lab.hosts[0].url, &args)?;
        bench(&host, img, &args, dir).await
    })?;
    with_overheads(&mut rounds);
    let runs = summarize(&rounds);
    let report = Report {
        goal_met: goal_met(&runs),
        runs,
        rounds,
        seconds: args.seconds,
        threads: args.threads,
        note: NOTE,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// The lab's client for `url`, allowed a whole trace as its answer.
fn client(lab: &lab::LabState, url: &str, args: &Args) -> anyhow::Result<AgentClient> {
    let tls = lab.tls()?;
    let token = match tls {
        Some(_) => String::new(),
        None => lab.token()?,
    };
    let options = tern_api::client::ClientOptions {
        max_body_bytes: crate::cmd::vm::trace::MAX_TRACE_BYTES,
        ..tern_api::client::ClientOptions::with_timeout(
            Duration::from_secs_f64(args.seconds) + LEAD + TAIL + Duration::from_secs(60),
        )
    };
    Ok(tern_api::client::Client::with_tls(url, &token, options, tls).map(AgentClient::from)?)
}

fn print_table(r: &Report) {
    println!(
        "tracer      ops/s median (range)        overhead median (range)      events  events/s  lost"
    );
    for x in &r.runs {
        println!(
            "{:<10} {:>8.0} ({:>6.0}-{:<6.0})    {:>6.1} % ({:>5.1} to {:>5.1} %)  {:>9} {:>9.0} {:>5}",
            x.tracer.name(),
            x.ops_per_s,
            x.ops_per_s_range[0],
            x.ops_per_s_range[1],
            x.overhead_pct,
            x.overhead_pct_range[0],
            x.overhead_pct_range[1],
            x.events,
            x.events_per_s,
            x.lost
        );
    }
    match r.goal_met {
        Some(true) => println!("goal met: tern-host's overhead is at most perf sched record's"),
        Some(false) => println!("goal NOT met: tern-host's overhead is above perf sched record's"),
        None => println!("goal: no verdict (a tracer has no overhead figure)"),
    }
    println!("{}", r.note);
}

/// The guest's handoffs so far, and the instant between asking and hearing back.
async fn handoffs(host: &AgentClient) -> anyhow::Result<(u64, Instant)> {
    let asked = Instant::now();
    let st = ask(host, VM, GuestCommand::Status).await?;
    let at = asked + asked.elapsed() / 2;
    let n = st["workloads"]
        .as_array()
        .and_then(|w| w.iter().find(|w| w["name"] == "wakeup"))
        .filter(|w| w["running"] == true)
        .and_then(|w| w["work"].as_u64())
        .ok_or_else(|| anyhow::anyhow!("guest {VM} runs no wakeup workload: {st}"))?;
    Ok((n, at))
}

/// Waits [`LEAD`], then the guest's handoff rate over `window`.
async fn measure(host: &AgentClient, window: Duration) -> anyhow::Result<f64> {
    tokio::time::sleep(LEAD).await;
    let (c0, t0) = handoffs(host).await?;
    tokio::time::sleep(window).await;
    let (c1, t1) = handoffs(host).await?;
    Ok(rate(c0, c1, t1 - t0))
}

/// Runs `perf sched record` on the host for `length`.
async fn perf_record(file: &Path, length: Duration) -> anyhow::Result<()> {
    let child = tokio::process::Command::new("perf")
        .args(["sched", "record", "-o"])
        .arg(file)
        .args(["--", "sleep", &format!("{:.3}", length.as_secs_f64())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting perf sched record")?;
    let out = tokio::time::timeout(length + Duration::from_secs(60), child.wait_with_output())
        .await
        .context("perf sched record did not finish in time")??;
    if !out.status.success() {
        bail!(
            "perf sched record failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Samples and lost samples of a perf recording.
async fn perf_count(file: &Path) -> anyhow::Result<PerfCount> {
    let child = tokio::process::Command::new("perf")
        .args(["report", "--stats", "-i"])
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting perf report")?;
    let out = tokio::time::timeout(PERF_REPORT_TIMEOUT, child.wait_with_output())
        .await
        .context("perf report --stats did not finish in time")??;
    let text = String::from_utf8_lossy(&out.stdout);
    perf_stats(&text).ok_or_else(|| {
        anyhow::anyhow!(
            "perf report --stats gave no sample count ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })
}

/// One run of `tracer`.
async fn one_run(
    host: &AgentClient,
    tracer: Tracer,
    round: u32,
    window: Duration,
    dir: &Path,
) -> anyhow::Result<Sample> {
    let length = LEAD + window + TAIL;
    let mut sample = Sample {
        tracer,
        round,
        ops_per_s: 0.0,
        overhead_pct: None,
        events: 0,
        lost: 0,
        recorded_s: 0.0,
        guest_events: None,
        guest_lost: None,
        guest_dropped: None,
    };
    match tracer {
        Tracer::None => sample.ops_per_s = measure(host, window).await?,
        Tracer::TernHost | Tracer::Tern => {
            let req = TraceRequest {
                duration_ms: length.as_millis() as u64,
                host_only: tracer == Tracer::TernHost,
            };
            let (t, ops) = tokio::join!(host.trace(VM, &req), measure(host, window));
            let t = t.context("recording through the agent")?;
            sample.ops_per_s = ops?;
            let h = &t.trace;
            sample.events = h.events.len() as u64;
            sample.lost = h.lost + h.dropped;
            sample.recorded_s = h.end_ns.saturating_sub(h.start_ns) as f64 / 1e9;
            if let Some(g) = &t.guest {
                sample.events += g.events.len() as u64;
                sample.lost += g.lost + g.dropped;
                sample.guest_events = Some(g.events.len() as u64);
                sample.guest_lost = Some(g.lost);
                sample.guest_dropped = Some(g.dropped);
            }
        }
        Tracer::Perf => {
            let file = dir.join(format!("perf-{round}.data"));
            let (rec, ops) = tokio::join!(perf_record(&file, length), measure(host, window));
            rec?;
            sample.ops_per_s = ops?;
            let count = perf_count(&file).await?;
            let _ = std::fs::remove_file(&file);
            sample.events = count.samples;
            sample.lost = count.lost;
            sample.recorded_s = length.as_secs_f64();
        }
    }
    Ok(sample)
}

async fn bench(
    host: &AgentClient,
    img: &tern_hv::image::GuestImage,
    args: &Args,
    dir: &Path,
) -> anyhow::Result<Vec<Sample>> {
    eprintln!("bench: booting {VM} (2 vCPUs)");
    host.create_vm(&CreateVm {
        id: VM.parse()?,
        spec: img.vm_spec(2, args.memory_mib, VM),
        start: true,
        reuse_disks: false,
    })
    .await?;
    ask(host, VM, GuestCommand::Ping).await?;
    let workload = WorkloadSpec::Wakeup {
        threads: args.threads,
    };
    ask(host, VM, GuestCommand::Start { workload }).await?;
    // The ring's threads bind themselves and the guest's boot work dies down.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let window = Duration::from_secs_f64(args.seconds);
    let mut samples = Vec::new();
    let result = async {
        for round in 1..=args.rounds {
            for tracer in round_order(round - 1) {
                let s = one_run(host, tracer, round, window, dir).await?;
                let guest = match (s.guest_events, s.guest_lost, s.guest_dropped) {
                    (Some(e), Some(l), Some(d)) => {
                        format!(" (guest level: {e} events, {l} lost, {d} dropped)")
                    }
                    _ => String::new(),
                };
                eprintln!(
                    "bench: round {round} {:<9} {:>8.0} ops/s, {} events, {} lost{guest}",
                    tracer.name(),
                    s.ops_per_s,
                    s.events,
                    s.lost
                );
                samples.push(s);
                tokio::time::sleep(SETTLE).await;
            }
        }
        anyhow::Ok(())
    }
    .await;
    let _ = host.delete_vm(VM).await;
    result.map(|()| samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(tracer: Tracer, round: u32, ops: f64, events: u64) -> Sample {
        Sample {
            tracer,
            round,
            ops_per_s: ops,
            overhead_pct: None,
            events,
            lost: 0,
            recorded_s: 2.0,
            guest_events: None,
            guest_lost: None,
            guest_dropped: None,
        }
    }

    #[test]
    fn every_round_runs_each_tracer_once_and_the_order_rotates() {
        let firsts: Vec<_> = (0..4).map(|k| round_order(k)[0]).collect();
        assert_eq!(firsts, Tracer::ALL);
        for k in 0..9 {
            let o = round_order(k);
            for t in Tracer::ALL {
                assert_eq!(o.iter().filter(|&&x| x == t).count(), 1, "{o:?}");
            }
        }
    }

    #[test]
    fn overheads_are_against_the_same_rounds_baseline() {
        assert_eq!(overhead_pct(200.0, 150.0), Some(25.0));
        assert_eq!(overhead_pct(200.0, 250.0), Some(-25.0));
        assert_eq!(overhead_pct(0.0, 5.0), None);
        let mut v = vec![
            s(Tracer::None, 1, 100.0, 0),
            s(Tracer::Perf, 1, 90.0, 10),
            s(Tracer::None, 2, 200.0, 0),
            s(Tracer::Perf, 2, 150.0, 30),
            s(Tracer::Perf, 3, 1.0, 20),
        ];
        with_overheads(&mut v);
        let o: Vec<_> = v.iter().map(|s| s.overhead_pct).collect();
        assert_eq!(o, [Some(0.0), Some(10.0), Some(0.0), Some(25.0), None]);
    }

    #[test]
    fn medians_ranges_and_the_goal() {
        let mut v = vec![
            s(Tracer::None, 1, 100.0, 0),
            s(Tracer::TernHost, 1, 98.0, 10),
            s(Tracer::Perf, 1, 90.0, 100),
            s(Tracer::None, 2, 100.0, 0),
            s(Tracer::TernHost, 2, 96.0, 30),
            s(Tracer::Perf, 2, 80.0, 300),
            s(Tracer::None, 3, 100.0, 0),
            s(Tracer::TernHost, 3, 99.0, 20),
            s(Tracer::Perf, 3, 85.0, 200),
        ];
        with_overheads(&mut v);
        let runs = summarize(&v);
        assert_eq!(runs.len(), 3, "tern has no runs: {runs:?}");
        let host = &runs[1];
        assert_eq!(host.tracer, Tracer::TernHost);
        assert_eq!(host.ops_per_s, 98.0);
        assert_eq!(host.ops_per_s_range, [96.0, 99.0]);
        assert!((host.overhead_pct - 2.0).abs() < 1e-9);
        assert_eq!(host.events, 20);
        assert_eq!(host.events_per_s, 10.0);
        assert_eq!(runs[2].overhead_pct, 15.0);
        assert_eq!(runs[2].overhead_pct_range, [10.0, 20.0]);
        assert_eq!(goal_met(&runs), Some(true));
        // Slower than perf: not met; no perf run: no verdict.
        let mut worse = runs.clone();
        worse[1].overhead_pct = 16.0;
        assert_eq!(goal_met(&worse), Some(false));
        assert_eq!(goal_met(&runs[..2]), None);
    }

    #[test]
    fn perf_stats_are_read_from_perf_reports_output() {
        let text = "\nAggregated stats:\n           TOTAL events:     436481\n\
            \x20           LOST events:        104  ( 0.0%)\n\
            \x20         SAMPLE events:     408594  (93.6%)\n\
            \x20   LOST_SAMPLES events:          7  ( 0.0%)\n\
            sched:sched_switch stats:\n          SAMPLE events:     159268\n\
            \x20   LOST_SAMPLES events:      88549\n\
            sched:sched_waking stats:\n          SAMPLE events:     174424\n\
            \x20   LOST_SAMPLES events:      89522\n";
        assert_eq!(
            perf_stats(text),
            Some(PerfCount {
                samples: 408_594,
                lost: 178_071
            })
        );
        // An older perf without per-event counts: at least one per LOST record.
        let old = "Aggregated stats:\n SAMPLE events: 50\n LOST events: 3\n";
        assert_eq!(
            perf_stats(old),
            Some(PerfCount {
                samples: 50,
                lost: 3
            })
        );
        assert_eq!(perf_stats("perf: no such file"), None);
    }
}
