//! `tern bench dependency`: why a dependency-aware move pays. A guest runs a TCP
//! service (`service`, a process of its own with a peer outside the guest) and a
//! memory-hungry batch job (`batch`, a process that talks to nobody) that rewrites its
//! memory at a share of the link; a client on another lab host sends requests to the
//! service at a steady rate and records the latency of every one. The guest is moved
//! with QEMU's own migration, tern's `adaptive` policy (which throttles the whole guest,
//! the service too) and `dependency-aware` (which freezes the batch job for the move
//! and pre-copies the rest). Each run reports the move's time, downtime and bytes
//! against the lower bound (non-zero memory over the link), the client's latency during
//! the move, how long the batch job lost and whether its result still checks out, and
//! what `tern-migrate`'s model predicts with the measured untainted share of writes.
//!
//! Then a host holding several such guests is drained through the manager under each
//! policy (see `drain.rs` in this directory): time to empty the host and the services'
//! latency meanwhile.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tern_api::guest::{Command as GuestCommand, WorkloadSpec};
use tern_lab::LabState;

use super::client;
use super::migration::{median, parse_list, predict, Bench, Shape};
use crate::cmd::bad_input;

/// The port the guest's service listens on.
pub(super) const SERVICE_PORT: u16 = 7000;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Link bandwidth of each lab host, Mbit/s.
    #[arg(long, default_value_t = 1000)]
    pub link_mbit: u32,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    /// The batch job's memory, MiB.
    #[arg(long, default_value_t = 128)]
    pub batch_mib: u64,
    /// The batch job's write rates as percent of the link bandwidth, comma-separated.
    #[arg(long, default_value = "75,150")]
    pub rates: String,
    /// Policies, comma-separated: qemu-native (QEMU's own migration), adaptive,
    /// dependency-aware, or any other tern policy.
    #[arg(long, default_value = "qemu-native,adaptive,dependency-aware")]
    pub policies: String,
    /// Runs of each policy at each rate.
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Longest a migration may iterate before it is stopped (tern) or cancelled (QEMU).
    #[arg(long, default_value_t = 30.0)]
    pub max_precopy_s: f64,
    /// Requests per second the client sends to the service.
    #[arg(long, default_value_t = 150)]
    pub client_rps: u32,
    /// Guests on the host the drain case empties (0: no drain case).
    #[arg(long, default_value_t = 4)]
    pub drain_vms: u32,
    /// The write rate of each drained guest's batch job, percent of the link.
    #[arg(long, default_value_t = 75)]
    pub drain_rate: u32,
    /// One repetition at the highest rate and no drain case (for CI).
    #[arg(long)]
    pub quick: bool,
    /// Only the drain case.
    #[arg(long, conflicts_with = "quick")]
    pub drain_only: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One move of the benchmark.
#[derive(Clone, Debug, Serialize)]
pub struct Run {
    pub policy: String,
    pub rate_percent: u32,
    /// Which of the `--repeat` runs of this policy at this rate (from 1).
    pub repetition: u32,
    /// What the batch job was asked to write, MB/s, and what the guest wrote in the
    /// second before the move (batch and verifier).
    pub dirty_mb_s: u64,
    pub measured_dirty_mb_s: f64,
    /// The batch job's share of the measured writes: what a dependency-aware move stops.
    pub untainted_write_share: f64,
    pub total_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    /// The downtime's parts as the source measured them: the final pass (scan and last
    /// pages), the device state, the resume.
    pub downtime_parts_ms: Option<Vec<u64>>,
    pub bytes: Option<u64>,
    pub nonzero_bytes: Option<u64>,
    /// Non-zero guest memory over the link bandwidth.
    pub lower_bound_ms: Option<u64>,
    /// Requests the client sent while the move ran, and their latency (from when each
    /// was due, so a stall counts against every request it held up).
    pub client_requests: u64,
    pub client_p50_ms: Option<f64>,
    pub client_p99_ms: Option<f64>,
    pub client_max_ms: Option<f64>,
    /// Requests that failed or got no answer within the client's timeout, over the
    /// client's whole run (from a second before the move to a second after).
    pub client_errors: u64,
    /// The client's p99 in the second before the move: the service's latency at rest.
    pub client_before_p99_ms: Option<f64>,
    /// Time the batch job lost from just before the move to just after: the wall time
    /// less the pages it wrote over its measured rate (frozen, throttled or paused).
    pub batch_paused_ms: Option<u64>,
    /// The batch job still runs after the move, found every page it checked holding
    /// what its previous pass wrote, and checked more pages than before the move.
    pub batch_result_ok: bool,
    /// Verifier counter advanced, its checksum matches, no oops or panic in the guest.
    pub guest_ok: bool,
    pub predicted_total_ms: Option<u64>,
    pub predicted_downtime_ms: Option<u64>,
    pub total_error_percent: Option<f64>,
    pub downtime_error_percent: Option<f64>,
    pub stop_reason: Option<String>,
    pub max_throttle_percent: Option<u8>,
    /// `dependency-aware` only: processes frozen, the longest freeze (the guest's
    /// count), and why the move fell back to `adaptive` if it did.
    pub frozen: Option<u64>,
    pub frozen_ms: Option<f64>,
    pub fallback: Option<String>,
    /// From asking the guest to freeze to its answer (overlaps the preparation).
    pub freeze_answer_ms: Option<u64>,
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    link_mbit: u32,
    memory_mib: u64,
    batch_mib: u64,
    client_rps: u32,
    runs: Vec<Run>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    drain: Vec<super::drain::DrainRun>,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    let mut rates: Vec<u32> = parse_list(&args.rates, "rates")?;
    let policies: Vec<String> = args
        .policies
        .split(',')
        .map(|e| e.trim().to_string())
        .collect();
    for p in &policies {
        if p != "qemu-native" && p.parse::<tern_migrate::PolicyKind>().is_err() {
            return Err(bad_input(format!(
                "--policies: unknown policy {p:?}; use qemu-native, adaptive, dependency-aware, xen, qemu-rule, stop-copy"
            )));
        }
    }
    if args.memory_mib == 0 || args.batch_mib == 0 || args.batch_mib * 2 > args.memory_mib {
        return Err(bad_input(
            "--batch-mib must be positive and at most half of --memory-mib",
        ));
    }
    if args.link_mbit == 0 || args.client_rps == 0 || args.client_rps > 5000 {
        return Err(bad_input(
            "--link-mbit must be positive and --client-rps within 1..=5000",
        ));
    }
    if args.repeat == 0 {
        return Err(bad_input("--repeat must be at least 1"));
    }
    if args.drain_vms > 8 || !(1..=400).contains(&args.drain_rate) {
        return Err(bad_input(
            "--drain-vms must be at most 8 and --drain-rate within 1..=400",
        ));
    }
    if args.quick {
        args.repeat = 1;
        args.drain_vms = 0;
        let top = rates.iter().copied().max().unwrap_or(150);
        rates = vec![top];
    }
    let runs = if args.drain_only {
        Vec::new()
    } else {
        super::with_lab(
            3,
            Some(args.link_mbit),
            args.memory_mib * 3,
            async |lab, img, _| bench(lab, img, &args, &rates, &policies).await,
        )?
    };
    // A lab of its own for the drain: its manager would take the guests the first
    // part created behind its back for strays. A drain that fails leaves the moves'
    // figures standing: they are printed, then the error.
    let mut drain_error = None;
    let drain = if args.drain_vms > 0 {
        let host_mib = u64::from(args.drain_vms) * 384 + 512;
        super::drain::with_manager_lab(args.link_mbit, host_mib, async |lab, _dir, m| {
            super::drain::drain(lab, m, &args, &policies, args.drain_rate, host_mib).await
        })
        .unwrap_or_else(|e| {
            drain_error = Some(e);
            Vec::new()
        })
    } else {
        Vec::new()
    };
    let report = Report {
        link_mbit: args.link_mbit,
        memory_mib: args.memory_mib,
        batch_mib: args.batch_mib,
        client_rps: args.client_rps,
        runs,
        drain,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    match drain_error {
        Some(e) => Err(e.context("the drain case")),
        None => Ok(()),
    }
}

/// The address of the lab's guest number `n` (from 1): `.100` up on the lab's segment,
/// where every host's bridge is, so the client reaches it on whatever host it runs.
pub(super) fn guest_addr(lab: &LabState, n: u32) -> anyhow::Result<Ipv4Addr> {
    let last = u8::try_from(100 + n)
        .ok()
        .filter(|&l| l <= 253)
        .ok_or_else(|| anyhow::anyhow!("no guest address left on the lab's segment"))?;
    Ok(Ipv4Addr::new(198, 18, lab.index, last))
}

/// A guest of the image with a NIC on the lab's segment at `addr`.
pub(super) fn networked_spec(
    img: &tern_hv::image::GuestImage,
    memory_mib: u64,
    name: &str,
    addr: Ipv4Addr,
) -> tern_hv::VmSpec {
    let mut spec = img.vm_spec(1, memory_mib, name);
    spec.cmdline = format!("{} tern.ip={addr}/24", spec.cmdline);
    spec.nics = vec![tern_hv::Nic { mac: None }];
    spec
}

/// A workload's entry in a guest's `status`.
pub(super) fn workload<'v>(status: &'v Value, name: &str) -> Option<&'v Value> {
    status["workloads"]
        .as_array()?
        .iter()
        .find(|w| w["name"] == name)
}

async fn bench(
    lab: &LabState,
    img: &tern_hv::image::GuestImage,
    args: &Args,
    rates: &[u32],
    policies: &[String],
) -> anyhow::Result<Vec<Run>> {
    let mut b = Bench::new(lab)?;
    let client_ns = lab
        .hosts
        .get(2)
        .map(|h| h.netns.clone())
        .ok_or_else(|| anyhow::anyhow!("the lab has no third host for the client"))?;
    let link_bytes_s = f64::from(args.link_mbit) * 1e6 / 8.0;
    let mut runs = Vec::new();
    let mut boots = 0;
    for &rate in rates {
        let dirty_mb_s = (link_bytes_s * f64::from(rate) / 100.0 / 1e6).round() as u64;
        // QEMU's own migration last: it may leave a broken guest behind.
        let (tern, native): (Vec<&String>, Vec<&String>) =
            policies.iter().partition(|p| *p != "qemu-native");
        let order: Vec<(&String, u32)> = tern
            .into_iter()
            .chain(native)
            .flat_map(|p| (1..=args.repeat).map(move |r| (p, r)))
            .collect();
        let mut addr = None;
        let first = runs.len();
        for &(policy, repetition) in &order {
            if addr.is_none() {
                boots += 1;
                let a = guest_addr(lab, boots)?;
                let spec = networked_spec(img, args.memory_mib, &format!("bench{boots}"), a);
                let workloads = [
                    WorkloadSpec::Service { port: SERVICE_PORT },
                    WorkloadSpec::Batch {
                        mib: args.batch_mib,
                        mbps: dirty_mb_s as f64,
                    },
                ];
                b.boot_with(spec, &workloads).await?;
                addr = Some(a);
            }
            let Some(a) = addr else { continue };
            eprintln!(
                "bench: {rate}% ({dirty_mb_s} MB/s): {policy} #{repetition}, h{} -> h{}",
                b.at + 1,
                2 - b.at
            );
            let mut run = one_move(&mut b, args, &client_ns, a, policy).await?;
            run.rate_percent = rate;
            run.dirty_mb_s = dirty_mb_s;
            run.repetition = repetition;
            eprintln!("bench: {run:?}");
            if !run.guest_ok || !run.batch_result_ok {
                b.destroy().await;
                addr = None;
            }
            runs.push(run);
        }
        b.destroy().await;
        // QEMU's own migration does not say how much memory holds data: the bound a
        // tern run at this rate measured stands for its runs too.
        let known = runs[first..]
            .iter()
            .find_map(|r| r.nonzero_bytes.zip(r.lower_bound_ms));
        if let Some((nonzero, bound)) = known {
            for r in runs[first..]
                .iter_mut()
                .filter(|r| r.lower_bound_ms.is_none())
            {
                r.lower_bound_ms = Some(bound);
                r.nonzero_bytes = Some(nonzero);
            }
        }
    }
    Ok(runs)
}

/// Writes per second of the guest's batch job and verifier over one second, MB/s.
async fn write_rates(b: &Bench<'_>) -> anyhow::Result<(f64, f64)> {
    let status = || b.guest(b.at, GuestCommand::Status, Duration::from_secs(10));
    let (s0, t0) = (status().await?, Instant::now());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (s1, t1) = (status().await?, Instant::now());
    let secs = (t1 - t0).as_secs_f64();
    let rate = |name: &str| -> anyhow::Result<f64> {
        let work = |s: &Value| workload(s, name).and_then(|w| w["work"].as_u64());
        match (work(&s0), work(&s1)) {
            (Some(a), Some(b)) => Ok(b.saturating_sub(a) as f64 * 4096.0 / secs / 1e6),
            _ => anyhow::bail!("{name} reports no page count: {s1}"),
        }
    };
    Ok((rate("batch")?, rate("verifier")?))
}

/// The batch job's pages written and checked, and its error, if any.
struct BatchState {
    at: Instant,
    work: u64,
    checked: u64,
    running: bool,
    error: Option<String>,
}

async fn batch_state(b: &Bench<'_>) -> anyhow::Result<BatchState> {
    let st = b
        .guest(b.at, GuestCommand::Status, Duration::from_secs(30))
        .await?;
    let at = Instant::now();
    let w = workload(&st, "batch").ok_or_else(|| anyhow::anyhow!("no batch job in {st}"))?;
    Ok(BatchState {
        at,
        work: w["work"].as_u64().unwrap_or(0),
        checked: w["checked"].as_u64().unwrap_or(0),
        running: w["running"] == true,
        error: w["error"].as_str().map(str::to_string),
    })
}

async fn one_move(
    b: &mut Bench<'_>,
    args: &Args,
    client_ns: &str,
    addr: Ipv4Addr,
    policy: &str,
) -> anyhow::Result<Run> {
    let (batch_mb_s, verifier_mb_s) = write_rates(b).await?;
    let measured = batch_mb_s + verifier_mb_s;
    let share = if measured > 0.0 {
        batch_mb_s / measured
    } else {
        0.0
    };
    let service = SocketAddrV4::new(addr, SERVICE_PORT);
    let client = client::start(
        client_ns,
        service,
        args.client_rps,
        Duration::from_secs_f64(args.max_precopy_s + 180.0),
    )?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = batch_state(b).await?;
    let started = client.elapsed();
    let moved = b.migrate(policy, args.max_precopy_s, args.link_mbit).await;
    // The move's own length when it completed: the call above also checks the guest
    // afterwards, which is no part of the move.
    let ended = match &moved {
        Ok(m) => m
            .total_ms
            .map_or_else(|| client.elapsed(), |t| started + Duration::from_millis(t)),
        Err(_) => client.elapsed(),
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lat = client.stop().await?;
    let mut m = moved?;
    m.measured_dirty_mb_s = Some(measured);
    let shape = Shape {
        link_mbit: args.link_mbit,
        memory_mib: args.memory_mib,
        wss_mib: args.batch_mib,
        max_precopy_s: args.max_precopy_s,
        untainted_write_share: share,
    };
    predict(&mut m, &shape);
    let after = batch_state(b).await;
    let mut note = m.note.clone();
    let (paused, batch_ok) = match after {
        Ok(a) => {
            let pages_s = batch_mb_s * 1e6 / 4096.0;
            let wall = (a.at - before.at).as_secs_f64();
            let paused = (pages_s > 0.0).then(|| {
                ((wall - (a.work - before.work.min(a.work)) as f64 / pages_s) * 1000.0)
                    .max(0.0)
                    .round() as u64
            });
            let ok = a.running
                && a.error.is_none()
                && before.error.is_none()
                && a.checked > before.checked;
            if !ok {
                note.get_or_insert(format!(
                    "batch: running {}, checked {} -> {}, error {:?}",
                    a.running, before.checked, a.checked, a.error
                ));
            }
            (paused, ok)
        }
        Err(e) => {
            note.get_or_insert(format!("batch: {e}"));
            (None, false)
        }
    };
    let during = lat.between(started, ended);
    let before_move = lat.between(started.saturating_sub(Duration::from_secs(1)), started);
    Ok(Run {
        policy: policy.to_string(),
        rate_percent: 0,
        repetition: 0,
        dirty_mb_s: 0,
        measured_dirty_mb_s: (measured * 10.0).round() / 10.0,
        untainted_write_share: (share * 1000.0).round() / 1000.0,
        total_ms: m.total_ms,
        downtime_ms: m.downtime_ms,
        downtime_parts_ms: m.downtime_parts_ms.clone(),
        bytes: m.bytes,
        nonzero_bytes: m.nonzero_bytes,
        lower_bound_ms: m.lower_bound_ms,
        client_requests: during.count() as u64,
        client_p50_ms: during.quantile(0.5),
        client_p99_ms: during.quantile(0.99),
        client_max_ms: during.quantile(1.0),
        client_errors: lat.errors(),
        client_before_p99_ms: before_move.quantile(0.99),
        batch_paused_ms: paused,
        batch_result_ok: batch_ok,
        guest_ok: m.guest_ok,
        predicted_total_ms: m.predicted_total_ms,
        predicted_downtime_ms: m.predicted_downtime_ms,
        total_error_percent: m.total_error_percent,
        downtime_error_percent: m.downtime_error_percent,
        stop_reason: m.stop_reason,
        max_throttle_percent: m.max_throttle_percent,
        frozen: m.frozen,
        frozen_ms: m.frozen_ms,
        fallback: m.fallback,
        freeze_answer_ms: m.freeze_answer_ms,
        note,
    })
}

fn print_table(r: &Report) {
    println!(
        "{} MiB guest, batch job {} MiB, {} Mbit/s link, client {} requests/s; latency of the \
         requests due during the move; predicted: tern-migrate's model with the measured \
         untainted share, error = predicted / measured - 1",
        r.memory_mib, r.batch_mib, r.link_mbit, r.client_rps
    );
    println!(
        "{:>5} {:<17} {:>2} {:>8} {:>8} {:>7} {:>11} {:>6} {:>7} {:>7} {:>7} {:>4} {:>8} {:>5} {:>5} {:>17} {:>13}",
        "rate", "policy", "#", "total", "down", "M/B", "bytes", "share", "p50", "p99", "max", "err",
        "paused", "batch", "guest", "predicted", "error"
    );
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |x| format!("{x}"));
    let fms = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:+.0}%"));
    for run in &r.runs {
        println!(
            "{:>4}% {:<17} {:>2} {:>8} {:>8} {:>7} {:>11} {:>6.3} {:>7} {:>7} {:>7} {:>4} {:>8} {:>5} {:>5} {:>17} {:>13}{}",
            run.rate_percent,
            run.policy,
            run.repetition,
            ms(run.total_ms),
            ms(run.downtime_ms),
            ms(run.lower_bound_ms),
            run.bytes.map_or("-".into(), |b| b.to_string()),
            run.untainted_write_share,
            fms(run.client_p50_ms),
            fms(run.client_p99_ms),
            fms(run.client_max_ms),
            run.client_errors,
            ms(run.batch_paused_ms),
            if run.batch_result_ok { "ok" } else { "BAD" },
            if run.guest_ok { "ok" } else { "BAD" },
            match (run.predicted_total_ms, run.predicted_downtime_ms) {
                (Some(t), Some(d)) => format!("{t} / {d} ms"),
                _ => "-".into(),
            },
            format!(
                "{} / {}",
                pct(run.total_error_percent),
                pct(run.downtime_error_percent)
            ),
            run.note
                .as_ref()
                .map_or(String::new(), |n| format!("  ({n})")),
        );
    }
    println!();
    print_medians(&r.runs);
    if !r.drain.is_empty() {
        println!();
        super::drain::print_table(&r.drain);
    }
}

/// The median of the values `f` gives over `runs` (those that have one).
pub(super) fn median_of<R>(runs: &[&R], f: impl Fn(&R) -> Option<f64>) -> Option<f64> {
    let mut v: Vec<f64> = runs.iter().filter_map(|r| f(r)).collect();
    v.sort_by(f64::total_cmp);
    (!v.is_empty()).then(|| median(&v))
}

/// Medians per rate and policy, and the ratios the goals are stated in.
fn print_medians(runs: &[Run]) {
    let mut cells: Vec<(u32, &str)> = runs
        .iter()
        .map(|r| (r.rate_percent, r.policy.as_str()))
        .collect();
    cells.sort();
    cells.dedup();
    println!(
        "medians: {:>5} {:<17} {:>4} {:>8} {:>6} {:>9} {:>10} {:>6} {:>6} {:>7} {:>4} {:>7} {:>8} {:>9} {:>9}",
        "rate", "policy", "runs", "total", "down", "total/MB", "bytes/nz", "p50", "p99", "max",
        "err", "paused", "batch ok", "total err", "down err"
    );
    let f = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |x| format!("{x:.d$}"));
    for (rate, policy) in cells {
        let cell: Vec<&Run> = runs
            .iter()
            .filter(|r| r.rate_percent == rate && r.policy == policy)
            .collect();
        let ratio = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) if b > 0 => Some(a as f64 / b as f64),
            _ => None,
        };
        println!(
            "         {:>4}% {:<17} {:>4} {:>8} {:>6} {:>9} {:>10} {:>6} {:>6} {:>7} {:>4} {:>7} {:>5}/{:<2} {:>9} {:>9}",
            rate,
            policy,
            cell.len(),
            f(median_of(&cell, |r| r.total_ms.map(|x| x as f64)), 0),
            f(median_of(&cell, |r| r.downtime_ms.map(|x| x as f64)), 0),
            f(median_of(&cell, |r| ratio(r.total_ms, r.lower_bound_ms)), 2),
            f(median_of(&cell, |r| ratio(r.bytes, r.nonzero_bytes)), 2),
            f(median_of(&cell, |r| r.client_p50_ms), 1),
            f(median_of(&cell, |r| r.client_p99_ms), 1),
            f(median_of(&cell, |r| r.client_max_ms), 0),
            f(median_of(&cell, |r| Some(r.client_errors as f64)), 0),
            f(median_of(&cell, |r| r.batch_paused_ms.map(|x| x as f64)), 0),
            cell.iter().filter(|r| r.batch_result_ok).count(),
            cell.len(),
            f(median_of(&cell, |r| r.total_error_percent), 0),
            f(median_of(&cell, |r| r.downtime_error_percent), 0),
        );
    }
}
