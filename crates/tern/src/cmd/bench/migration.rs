//! `tern bench migration`: a 2-host lab with shaped links, a guest whose `memdirty`
//! working set is rewritten at fractions of the link bandwidth, moved by tern's engine
//! under each policy and by QEMU's own migration (default and auto-converge). Each run
//! reports time, downtime, bytes, rounds, convergence, whether the guest is still
//! healthy after the move, and the lower bound M/B. Beside every tern run it prints what
//! `tern-migrate`'s model, with the engine's costs, predicts for that run and how far
//! off that is.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tern_agent::client::AgentClient;
use tern_agent::vms::CreateVm;
use tern_api::guest::{Command as GuestCommand, WorkloadSpec};
use tern_api::migration::{FirstRoundProbe, SendOptions, SendRequest};
use tern_guest::PAGE_SIZE;
use tern_lab::LabState;
use tern_migrate::{
    expected_over_writer_starts, mbit_per_s, simulate, DirtyModel, MigrationParams, PolicyKind,
    SetExtent, ThrottledRate, MIB,
};

use super::layout::SetLayout;
use crate::cmd::bad_input;

/// Bytes per guest page.
const PAGE: u64 = PAGE_SIZE as u64;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Link bandwidth of each lab host, Mbit/s.
    #[arg(long, default_value_t = 1000)]
    pub link_mbit: u32,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    /// `memdirty` working set, MiB.
    #[arg(long, default_value_t = 128)]
    pub wss_mib: u64,
    /// Dirty rates as percent of the link bandwidth, comma-separated.
    #[arg(long, default_value = "0,25,75,150")]
    pub rates: String,
    /// Engines, comma-separated: xen, qemu-rule, adaptive, stop-copy, qemu-native,
    /// qemu-native-ac (QEMU with auto-converge).
    #[arg(
        long,
        default_value = "xen,qemu-rule,adaptive,qemu-native,qemu-native-ac"
    )]
    pub engines: String,
    /// Longest a migration may iterate before it is stopped (tern) or cancelled (QEMU).
    #[arg(long, default_value_t = 40.0)]
    pub max_precopy_s: f64,
    /// Runs of each engine at each rate, on the same guest (every run is reported).
    #[arg(long, default_value_t = 1)]
    pub repeat: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run nothing: predict the runs of a report this benchmark saved with `--json`
    /// again, with the model as it is now (to try a change to the model on runs
    /// already made; the report's guest, working set and link are used).
    #[arg(long, value_name = "REPORT.json")]
    pub repredict: Option<std::path::PathBuf>,
}

/// A guest writer as measured just before a migration.
pub struct Writer {
    pub mb_s: f64,
    /// Pages written since its paced phase began: `memdirty` rewrites its working set
    /// in order from the first page, so this modulo the set's pages is its cursor.
    pub pages: u64,
    pub at: Instant,
}

impl Writer {
    /// Where the cursor of a writer over `working_set_bytes` stands when a migration
    /// asked for now reaches round 1 (the engine's setup later), as a share of the set.
    pub fn start_share(&self, working_set_bytes: u64) -> f64 {
        let set = (working_set_bytes / PAGE).max(1) as f64;
        let ahead_s = self.at.elapsed().as_secs_f64() + tern_migrate::model::ENGINE_SETUP_S;
        let cursor = self.pages as f64 + self.mb_s * 1e6 / PAGE as f64 * ahead_s;
        (cursor % set) / set
    }
}

/// One live round as the engine measured it: the guest's dirty rate under its
/// throttle, and what its stop rule weighed after it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct RoundRate {
    pub round: u32,
    pub throttle_percent: u8,
    pub dirty_mb_s: f64,
    /// Pages left after the round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining_pages: Option<u64>,
    /// The pause the engine predicted for stopping after this round (the remainder over
    /// its measured link rate, its scan after the round, the stop cost it assumes): the
    /// stop rule stops when it fits the budget. Its scan time is measured anew each
    /// round, so the same remainder fits in one run and not in another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_downtime_ms: Option<f64>,
}

/// One migration of the benchmark.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Run {
    pub rate_percent: u32,
    /// What the guest was asked to dirty, MB/s.
    pub dirty_mb_s: u64,
    pub engine: String,
    /// Which of the `--repeat` runs of this engine at this rate (from 1).
    pub repetition: u32,
    /// The guest's page-write rate just before the migration, MB/s.
    pub measured_dirty_mb_s: Option<f64>,
    /// Where `memdirty`'s cursor stood in its working set as round 1 began, as a share
    /// of the set: its page count just before the migration, carried forward at the
    /// measured rate to the start of round 1.
    pub writer_start: Option<f64>,
    /// Where round 1's probe saw `memdirty`'s cursor (the next page it writes), as a
    /// share of the set, `probe.writer_seen.at_s` into round 1: the probe's page mapped
    /// through the set's layout. Absent when that page is not followed in memory by the
    /// set's next page (the writer may then have gone on elsewhere unseen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_seen: Option<f64>,
    /// The rate round 1's probe read, MB/s (tern only, when round 1 probed), and the
    /// throttle the engine sized from it for the rest of round 1.
    pub probe_dirty_mb_s: Option<f64>,
    pub first_round_throttle_percent: Option<u8>,
    /// All that round 1's probe measured (the result's `probe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<FirstRoundProbe>,
    /// The guest's dirty rate in each live round as the engine measured it, and the
    /// throttle that held (tern only).
    #[serde(default)]
    pub round_rates: Vec<RoundRate>,
    /// Where `memdirty`'s set lay among the guest's pages holding data, read from the
    /// source's memory file before the move (runs: set page `offset + i` is data page
    /// `position + i`); empty when it could not be read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub working_set_extents: Vec<SetExtent>,
    pub total_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub bytes: Option<u64>,
    /// Live rounds (tern); not reported by QEMU.
    pub rounds: Option<u32>,
    pub converged: bool,
    /// Counter advanced, checksum matches, no oops/panic in the guest.
    pub guest_ok: bool,
    /// Non-zero guest memory over link bandwidth, ms (from tern's first round).
    pub lower_bound_ms: Option<u64>,
    /// Guest memory holding data, as this run's round 1 found it (tern only).
    pub nonzero_bytes: Option<u64>,
    /// What `tern-migrate`'s model with the engine's costs predicts for this run, fed
    /// with its non-zero memory, measured dirty rate, working set (its place in memory
    /// and the writer's cursor) and link (tern only), and the error (predicted over
    /// measured, minus 1), percent.
    pub predicted_total_ms: Option<u64>,
    pub predicted_downtime_ms: Option<u64>,
    pub total_error_percent: Option<f64>,
    pub downtime_error_percent: Option<f64>,
    /// Why tern's policy stopped iterating, and the highest vCPU throttle it applied.
    pub stop_reason: Option<String>,
    pub max_throttle_percent: Option<u8>,
    /// tern only: downtime spent in the final pass, QEMU's device state, and resuming.
    pub downtime_parts_ms: Option<Vec<u64>>,
    /// Why the migration did not complete, or what was wrong with the guest.
    pub note: Option<String>,
    /// `dependency-aware` only: processes the guest froze for the pre-copy, the longest
    /// any stayed frozen (from the guest's thaw answer), and why the move went on as
    /// `adaptive` when it froze nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frozen_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback: Option<String>,
    /// `dependency-aware` only: from asking the guest to freeze to its answer (asked
    /// as the migration starts, so most of it overlaps the destination's preparation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub freeze_answer_ms: Option<u64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Report {
    link_mbit: u32,
    memory_mib: u64,
    wss_mib: u64,
    runs: Vec<Run>,
}

pub(super) fn parse_list<T: std::str::FromStr>(s: &str, what: &str) -> anyhow::Result<Vec<T>> {
    s.split(',')
        .map(|x| {
            x.trim()
                .parse::<T>()
                .map_err(|_| bad_input(format!("--{what}: {x:?} is not valid")))
        })
        .collect()
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if let Some(path) = &args.repredict {
        let mut report = read_report(path)?;
        let shape = Shape {
            link_mbit: report.link_mbit,
            memory_mib: report.memory_mib,
            wss_mib: report.wss_mib,
            ..args.shape()
        };
        for run in &mut report.runs {
            predict(run, &shape);
        }
        return print_report(&report, args.json);
    }
    let rates: Vec<u32> = parse_list(&args.rates, "rates")?;
    let engines: Vec<String> = args
        .engines
        .split(',')
        .map(|e| e.trim().to_string())
        .collect();
    for e in &engines {
        if !matches!(e.as_str(), "qemu-native" | "qemu-native-ac")
            && e.parse::<tern_migrate::PolicyKind>().is_err()
        {
            return Err(bad_input(format!("--engines: unknown engine {e:?}; use xen, qemu-rule, adaptive, stop-copy, qemu-native, qemu-native-ac")));
        }
    }
    if args.memory_mib == 0 || args.wss_mib == 0 || args.wss_mib >= args.memory_mib {
        return Err(bad_input(
            "--wss-mib must be positive and below --memory-mib",
        ));
    }
    if args.link_mbit == 0 {
        return Err(bad_input("--link-mbit must be positive"));
    }
    if args.repeat == 0 {
        return Err(bad_input("--repeat must be at least 1"));
    }
    let runs = super::with_lab(
        2,
        Some(args.link_mbit),
        args.memory_mib * 3,
        async |lab, img, _| bench(lab, img, &args, &rates, &engines).await,
    )?;
    let report = Report {
        link_mbit: args.link_mbit,
        memory_mib: args.memory_mib,
        wss_mib: args.wss_mib,
        runs,
    };
    print_report(&report, args.json)
}

fn print_report(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print_table(report);
    }
    Ok(())
}

/// A report saved by `--json`, checked enough that predicting its runs makes sense.
fn read_report(path: &std::path::Path) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad_input(format!("--repredict {}: {e}", path.display())))?;
    let report: Report = serde_json::from_str(&text).map_err(|e| {
        bad_input(format!(
            "--repredict {}: not a report of `tern bench migration --json`: {e}",
            path.display()
        ))
    })?;
    if report.link_mbit == 0 || report.wss_mib == 0 || report.wss_mib >= report.memory_mib {
        return Err(bad_input(format!(
            "--repredict {}: the report's link, guest and working set are not a benchmark's \
             (link {} Mbit/s, guest {} MiB, working set {} MiB)",
            path.display(),
            report.link_mbit,
            report.memory_mib,
            report.wss_mib
        )));
    }
    Ok(report)
}

/// What a benchmark's moves share: the guest, its dirtied working set and the link.
#[derive(Clone, Copy, Debug)]
pub(super) struct Shape {
    pub link_mbit: u32,
    pub memory_mib: u64,
    pub wss_mib: u64,
    pub max_precopy_s: f64,
    /// Share of the dirty rate written by processes a dependency-aware move freezes.
    pub untainted_write_share: f64,
}

impl Args {
    fn shape(&self) -> Shape {
        Shape {
            link_mbit: self.link_mbit,
            memory_mib: self.memory_mib,
            wss_mib: self.wss_mib,
            max_precopy_s: self.max_precopy_s,
            untainted_write_share: 0.0,
        }
    }
}

/// Non-zero memory in front of `memdirty`'s working set in the order the engine copies
/// guest memory: what the guest's boot left in use below it. Found by `memdirty`'s page
/// signature in the source's memory file: 30.2 MB of data below its buffer in a
/// 512 MiB guest and 35.0 MB in a 1 GiB guest, the buffer itself in ascending order
/// (all but its first 8 MiB, which lay at the top of memory).
const MEMDIRTY_DATA_BEFORE_BYTES: u64 = 32 << 20;

/// How far either side of the writer's cursor the model is run, as a share of its set.
/// Not the reading's error: the probe's reading ([`Run::writer_seen`]) and the estimate
/// from before the move ([`Writer::start_share`]) agree within 0.014 of the set in 45
/// of 48 runs at 25, 75 and 150 % (mean 0.007). It stands for how far the engine's own
/// run may stray from the model's:
/// round 1's remainder moves about a page per page of cursor, the two streams' fronts
/// drift against a throttled writer moving nearly at their pace, and the engine's stop
/// rule weighs the remainder against a scan time it measures anew each round (the same
/// remainder gave one round in one run and two in another). The prediction is the
/// time off by the least in the worst case over these cursors; narrower spreads
/// (0.01-0.03) met the goal in fewer cells of the same runs.
const CURSOR_SPREAD: f64 = 0.05;

/// The engine's scan after `round`, read from the pause its stop rule weighed: that
/// less the remainder over the link and the stop cost the rule assumes.
fn weighed_scan_s(round: &RoundRate, params: &MigrationParams) -> Option<f64> {
    let told = params.policy_stop_cost_s.unwrap_or(params.stop_overhead_s);
    let pages = round.remaining_pages? as f64;
    let scan_s = round.predicted_downtime_ms? / 1000.0
        - pages * PAGE as f64 / params.effective_bandwidth()
        - told;
    (scan_s > 0.0).then_some(scan_s)
}

/// The guest's measured dirty rate under each throttle the engine applied: the mean
/// over the rounds it held in.
fn throttled_rates(rounds: &[RoundRate]) -> Vec<ThrottledRate> {
    let mut by_throttle: Vec<(u8, f64, u32)> = Vec::new();
    for r in rounds.iter().filter(|r| r.throttle_percent > 0) {
        match by_throttle
            .iter_mut()
            .find(|(p, ..)| *p == r.throttle_percent)
        {
            Some((_, sum, n)) => {
                *sum += r.dirty_mb_s;
                *n += 1;
            }
            None => by_throttle.push((r.throttle_percent, r.dirty_mb_s, 1)),
        }
    }
    by_throttle
        .into_iter()
        .map(|(percent, sum, n)| ThrottledRate {
            percent,
            rate_bytes_per_s: sum / f64::from(n) * 1e6,
        })
        .collect()
}

/// Fills in what `tern-migrate`'s model, with the engine's costs, predicts for a
/// completed tern run, fed with what the run measured. With the writer's cursor known
/// (`memdirty` alone) the page-level model follows it page by page: what round 1
/// leaves depends on where the copy's streams meet the writer. Without, the analytic
/// model (the simulator's).
pub(super) fn predict(run: &mut Run, args: &Shape) {
    let (Some(total), Some(downtime), Some(nonzero)) =
        (run.total_ms, run.downtime_ms, run.nonzero_bytes)
    else {
        return;
    };
    let Ok(policy) = run.engine.parse::<PolicyKind>() else {
        return;
    };
    let rate = run.measured_dirty_mb_s.unwrap_or(run.dirty_mb_s as f64) * 1e6;
    let wss = args.wss_mib * MIB;
    let mut params = MigrationParams::engine(
        args.memory_mib * MIB,
        nonzero,
        mbit_per_s(f64::from(args.link_mbit)),
    );
    if rate > 0.0 {
        // The working set holds data once memdirty has filled it.
        params.nonzero_bytes = Some(nonzero.max(wss));
        params.dirty = DirtyModel::Sequential {
            rate_bytes_per_s: rate,
            working_set_bytes: wss,
        };
        // A busy guest's vCPU shares the host's cores with the engine's passes over its
        // memory, which then run at the pace that run's host gave them: the median of
        // its scans after round 2 on (round 1's runs beside its probe and the throttle's
        // start).
        let mut scans: Vec<f64> = run
            .round_rates
            .iter()
            .skip(1)
            .filter_map(|r| weighed_scan_s(r, &params))
            .collect();
        let gib = (params.nonzero_pages() * params.page_size) as f64 / (1u64 << 30) as f64;
        if !scans.is_empty() && gib > 0.0 {
            scans.sort_by(f64::total_cmp);
            params.scan_s_per_gib = scans[scans.len() / 2] / gib;
        }
    } else if let Some(own) = run.probe_dirty_mb_s.filter(|r| *r > 0.0) {
        // No writer, but the guest's own kernel still writes: the engine's probe reads
        // 1-2 MB/s, and what it rewrote behind round 1's copy (50-350 pages) goes out
        // in the final pass, with the guest paused.
        params.dirty = DirtyModel::Uniform {
            rate_bytes_per_s: own * 1e6,
            working_set_bytes: nonzero,
        };
        // The stop then runs at the pace the engine's scan after round 1 showed the host
        // has (what the stop rule weighed, less the remainder and the cost it assumes),
        // or, in a report without that reading, its probe's scan.
        let after_round_one = run
            .round_rates
            .first()
            .and_then(|r| weighed_scan_s(r, &params));
        if let Some(scan_s) = after_round_one {
            params = params.with_idle_stop_costs_after_round_one(scan_s);
        } else if let Some(p) = &run.probe {
            let told = params.policy_stop_cost_s.unwrap_or(params.stop_overhead_s);
            params = params.with_idle_stop_costs(p.stop_cost_s - told);
        }
    }
    params.max_elapsed_s = Some(args.max_precopy_s);
    // The engine's own probe sizes round 1's throttle: the model's policy then answers
    // what the engine's answered, not a reading of the model's own.
    params.measured_probe = run.probe.clone();
    params.throttled_rates = throttled_rates(&run.round_rates);
    // The layout was read a moment before round 1 counted the pages with data: a run
    // past that count is cut to it.
    let data_pages = params.nonzero_pages();
    params.working_set_extents = run
        .working_set_extents
        .iter()
        .filter(|e| e.position < data_pages)
        .map(|e| SetExtent {
            pages: e.pages.min(data_pages - e.position),
            ..*e
        })
        .collect();
    params.untainted_write_share = args.untainted_write_share;
    // The probe's reading of the cursor, taken during the move, before the estimate
    // carried forward from before it.
    let seen = run
        .writer_seen
        .zip(run.probe.as_ref().and_then(|p| p.writer_seen))
        .and_then(|(share, w)| params.writer_start_seen(share, w.at_s));
    let outcome = match seen.or(run.writer_start).filter(|_| rate > 0.0) {
        Some(start) => {
            params.data_before_working_sets_bytes = MEMDIRTY_DATA_BEFORE_BYTES;
            let u = CURSOR_SPREAD;
            let starts = [
                start - u,
                start - u / 2.0,
                start,
                start + u / 2.0,
                start + u,
            ];
            expected_over_writer_starts(&params, &policy, &starts)
                .map(|e| (e.total_time_s, e.downtime_s))
        }
        None => simulate(&params, &policy).map(|o| (o.total_time_s, o.downtime_s)),
    };
    let (total_s, downtime_s) = match outcome {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "no prediction for this run");
            return;
        }
    };
    let ms = |s: f64| (s * 1000.0).round() as u64;
    let error = |predicted: u64, measured: u64| {
        (measured > 0).then(|| ((predicted as f64 / measured as f64 - 1.0) * 1000.0).round() / 10.0)
    };
    run.predicted_total_ms = Some(ms(total_s));
    run.predicted_downtime_ms = Some(ms(downtime_s));
    run.total_error_percent = error(ms(total_s), total);
    run.downtime_error_percent = error(ms(downtime_s), downtime);
}

fn print_table(r: &Report) {
    println!(
        "{} MiB guest, {} MiB working set, {} Mbit/s link; predicted: tern-migrate's model \
         with the engine's costs, error = predicted / measured - 1",
        r.memory_mib, r.wss_mib, r.link_mbit
    );
    println!(
        "{:>5} {:>6}  {:<16} {:>2} {:>8} {:>9} {:>17} {:>13} {:>11} {:>6} {:>9} {:>8} {:>7}",
        "rate",
        "MB/s",
        "engine",
        "#",
        "total",
        "downtime",
        "predicted",
        "error",
        "bytes",
        "rounds",
        "converged",
        "guest",
        "M/B"
    );
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |x| format!("{x} ms"));
    let pct = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:+.0}%"));
    for run in &r.runs {
        println!(
            "{:>4}% {:>6}  {:<16} {:>2} {:>8} {:>9} {:>17} {:>13} {:>11} {:>6} {:>9} {:>8} {:>7}{}",
            run.rate_percent,
            run.dirty_mb_s,
            run.engine,
            run.repetition,
            ms(run.total_ms),
            ms(run.downtime_ms),
            match (run.predicted_total_ms, run.predicted_downtime_ms) {
                (Some(t), Some(d)) => format!("{t} / {d} ms"),
                _ => "-".into(),
            },
            format!(
                "{} / {}",
                pct(run.total_error_percent),
                pct(run.downtime_error_percent)
            ),
            run.bytes.map_or("-".into(), |b| b.to_string()),
            run.rounds.map_or("-".into(), |b| b.to_string()),
            run.converged,
            if run.guest_ok { "ok" } else { "NOT OK" },
            ms(run.lower_bound_ms),
            match (&run.stop_reason, run.max_throttle_percent) {
                (Some(r), Some(t)) if t > 0 => format!("  {r}, throttle {t}%"),
                (Some(r), _) => format!("  {r}"),
                _ => String::new(),
            } + &run
                .note
                .as_ref()
                .map_or(String::new(), |n| format!("  ({n})")),
        );
    }
    print_medians(&r.runs);
}

/// Per rate and engine with more than one run: median and range of the measured times
/// and of the model's errors.
fn print_medians(runs: &[Run]) {
    let mut cells: Vec<(u32, &str)> = runs
        .iter()
        .map(|r| (r.rate_percent, r.engine.as_str()))
        .collect();
    cells.dedup();
    let spread = |v: Vec<f64>, unit: &str| -> String {
        let mut v = v;
        v.sort_by(f64::total_cmp);
        match (v.first(), v.last()) {
            (Some(lo), Some(hi)) => {
                format!("{:.0}{unit} ({lo:.0}..{hi:.0})", median(&v))
            }
            _ => "-".into(),
        }
    };
    let mut header = false;
    for (rate, engine) in cells {
        let cell: Vec<&Run> = runs
            .iter()
            .filter(|r| r.rate_percent == rate && r.engine == engine)
            .collect();
        if cell.len() < 2 {
            continue;
        }
        if !header {
            println!(
                "\n{:>5}  {:<16} {:>4} {:>22} {:>20} {:>20} {:>20}",
                "rate",
                "engine",
                "runs",
                "total ms",
                "downtime ms",
                "total error %",
                "downtime error %"
            );
            header = true;
        }
        let of = |f: fn(&Run) -> Option<f64>| cell.iter().filter_map(|r| f(r)).collect::<Vec<_>>();
        println!(
            "{:>4}%  {:<16} {:>4} {:>22} {:>20} {:>20} {:>20}",
            rate,
            engine,
            cell.len(),
            spread(of(|r| r.total_ms.map(|x| x as f64)), ""),
            spread(of(|r| r.downtime_ms.map(|x| x as f64)), ""),
            spread(of(|r| r.total_error_percent), "%"),
            spread(of(|r| r.downtime_error_percent), "%"),
        );
    }
}

/// The median of sorted values (the mean of the middle two for an even count).
pub(super) fn median(sorted: &[f64]) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// The lab and the guest currently under test.
pub(super) struct Bench<'a> {
    lab: &'a LabState,
    hosts: Vec<AgentClient>,
    pub vm: String,
    /// The host the guest is on.
    pub at: usize,
    counter: u64,
    boots: u32,
}

async fn bench(
    lab: &LabState,
    img: &tern_hv::image::GuestImage,
    args: &Args,
    rates: &[u32],
    engines: &[String],
) -> anyhow::Result<Vec<Run>> {
    let mut b = Bench::new(lab)?;
    let link_bytes_s = f64::from(args.link_mbit) * 1e6 / 8.0;
    let mut runs = Vec::new();
    for &rate in rates {
        let dirty_mb_s = (link_bytes_s * f64::from(rate) / 100.0 / 1e6).round() as u64;
        let mut nonzero: Option<u64> = None;
        let first_run = runs.len();
        b.boot(img, args, dirty_mb_s).await?;
        // tern's engines first: QEMU's own migration may leave a broken guest behind.
        let (tern, native): (Vec<&String>, Vec<&String>) =
            engines.iter().partition(|e| !e.starts_with("qemu-native"));
        let order: Vec<(&String, u32)> = tern
            .into_iter()
            .chain(native)
            .flat_map(|e| (1..=args.repeat).map(move |r| (e, r)))
            .collect();
        for (i, &(engine, repetition)) in order.iter().enumerate() {
            eprintln!(
                "bench: {rate}% ({dirty_mb_s} MB/s): {engine} #{repetition}, h{} -> h{}",
                b.at + 1,
                2 - b.at
            );
            // Read before the writer is timed: the scan takes a few hundred ms of CPU.
            let layout = if dirty_mb_s > 0 {
                b.working_set_layout(args.wss_mib * MIB / PAGE).await
            } else {
                None
            };
            let writer = if dirty_mb_s > 0 {
                Some(b.writer("memdirty").await?)
            } else {
                None
            };
            let measured = writer.as_ref().map_or(0.0, |w| w.mb_s);
            let writer_start = writer.map(|w| w.start_share(args.wss_mib * MIB));
            let mut run = b
                .migrate(engine, args.max_precopy_s, args.link_mbit)
                .await?;
            run.writer_start = writer_start;
            let seen = run.probe.as_ref().and_then(|p| p.writer_seen);
            run.writer_seen = layout
                .as_ref()
                .zip(seen)
                .and_then(|(l, w)| l.writer_after(w.page));
            run.working_set_extents = layout.map(|l| l.extents).unwrap_or_default();
            run.rate_percent = rate;
            run.dirty_mb_s = dirty_mb_s;
            run.repetition = repetition;
            run.measured_dirty_mb_s = Some(measured);
            predict(&mut run, &args.shape());
            if let Some(m) = run.lower_bound_ms {
                nonzero.get_or_insert(m);
            }
            run.lower_bound_ms = nonzero;
            eprintln!("bench: {run:?}");
            let healthy = run.guest_ok;
            runs.push(run);
            if !healthy && i + 1 < order.len() {
                b.destroy().await;
                b.boot(img, args, dirty_mb_s).await?;
            }
        }
        b.destroy().await;
        // The lower bound is known once a tern run measured M; fill it in everywhere.
        // Only this boot's runs: a rate listed twice boots a fresh guest each time.
        for r in &mut runs[first_run..] {
            r.lower_bound_ms = nonzero;
        }
    }
    Ok(runs)
}

impl<'a> Bench<'a> {
    pub fn new(lab: &'a LabState) -> anyhow::Result<Bench<'a>> {
        let hosts = lab
            .hosts
            .iter()
            .map(|h| lab.client(&h.url, Duration::from_secs(60)))
            .collect::<Result<_, _>>()?;
        Ok(Bench {
            lab,
            hosts,
            vm: String::new(),
            at: 0,
            counter: 0,
            boots: 0,
        })
    }

    /// Asks the guest agent of the guest on `host`, retrying for `patience` while it
    /// does not answer; the command's result.
    pub async fn guest(
        &self,
        host: usize,
        req: GuestCommand,
        patience: Duration,
    ) -> anyhow::Result<Value> {
        let t0 = Instant::now();
        loop {
            match self.hosts[host].guest(&self.vm, &req).await {
                Ok(a) if a["ok"] == true => return Ok(a["result"].clone()),
                Ok(a) => bail!("guest answered {a}"),
                // The first request after a move can go unanswered while virtio-serial
                // reconnects; a crashed guest never answers.
                Err(e) if t0.elapsed() < patience => {
                    tracing::debug!(error = %e, "guest not answering yet");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => bail!("guest does not answer: {e}"),
            }
        }
    }

    async fn boot(
        &mut self,
        img: &tern_hv::image::GuestImage,
        args: &Args,
        dirty_mb_s: u64,
    ) -> anyhow::Result<()> {
        let spec = img.vm_spec(1, args.memory_mib, &format!("bench{}", self.boots + 1));
        let workloads = if dirty_mb_s > 0 {
            vec![WorkloadSpec::Memdirty {
                mib: args.wss_mib,
                mbps: dirty_mb_s as f64,
            }]
        } else {
            vec![]
        };
        self.boot_with(spec, &workloads).await
    }

    /// Boots a fresh guest of `spec` on host 1 and starts `workloads` in order; waits
    /// until every one that fills memory first (memdirty, batch) writes at its pace.
    pub async fn boot_with(
        &mut self,
        spec: tern_hv::VmSpec,
        workloads: &[WorkloadSpec],
    ) -> anyhow::Result<()> {
        self.boots += 1;
        self.vm = format!("bench{}", self.boots);
        self.at = 0;
        let req = CreateVm {
            id: self.vm.parse()?,
            spec,
            start: true,
            reuse_disks: false,
        };
        eprintln!("bench: booting {} on h1", self.vm);
        self.hosts[0].create_vm(&req).await?;
        self.guest(0, GuestCommand::Ping, Duration::from_secs(180))
            .await?;
        for workload in workloads {
            let name = workload.name();
            self.guest(
                0,
                GuestCommand::Start {
                    workload: workload.clone(),
                },
                Duration::from_secs(10),
            )
            .await?;
            if matches!(
                workload,
                WorkloadSpec::Memdirty { .. } | WorkloadSpec::Batch { .. }
            ) {
                self.wait_paced(name).await?;
            }
        }
        // Let the rate settle.
        tokio::time::sleep(Duration::from_secs(3)).await;
        self.counter = self
            .verify(0)
            .await
            .map_err(|e| anyhow::anyhow!("fresh guest: {e}"))?;
        Ok(())
    }

    /// Waits until the workload `name` (memdirty, batch) has filled its working set and
    /// writes at its pace: on a busy host the fill can outlast any fixed wait, and a
    /// migration that starts during it measures the fill, not the workload.
    async fn wait_paced(&self, name: &str) -> anyhow::Result<()> {
        let t0 = Instant::now();
        loop {
            let st = self
                .guest(0, GuestCommand::Status, Duration::from_secs(10))
                .await?;
            let paced = st["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|w| w["name"] == name && w["work"].as_u64().unwrap_or(0) > 0);
            if paced {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(120) {
                bail!("{name} did not start its paced phase within 120 s: {st}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Workload `name`'s page-write rate over one second, from its count of pages
    /// written (what the guest really dirties on this host, not what it was asked), and
    /// that count at the end of the second.
    pub async fn writer(&self, name: &str) -> anyhow::Result<Writer> {
        let pages = |st: &Value| {
            st["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|w| w["name"] == name)
                .find_map(|w| w["work"].as_u64())
        };
        let status = || self.guest(self.at, GuestCommand::Status, Duration::from_secs(10));
        let (s0, t0) = (status().await?, Instant::now());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (s1, t1) = (status().await?, Instant::now());
        match (pages(&s0), pages(&s1)) {
            (Some(a), Some(b)) => Ok(Writer {
                mb_s: b.saturating_sub(a) as f64 * PAGE as f64 / (t1 - t0).as_secs_f64() / 1e6,
                pages: b,
                at: t1,
            }),
            _ => bail!("{name} reports no page count: {s1}"),
        }
    }

    /// Where the guest's `memdirty` set of `set_pages` lies in its memory; `None` (the
    /// model's fixed placement is used) when the file cannot be read or does not hold
    /// the set.
    async fn working_set_layout(&self, set_pages: u64) -> Option<SetLayout> {
        let path = self.lab.hosts[self.at]
            .mem_dir
            .join(format!("{}.ram", self.vm));
        let scanned = tokio::task::spawn_blocking(move || {
            super::layout::working_set_layout(&path, set_pages)
                .map_err(|e| format!("{}: {e}", path.display()))
        })
        .await;
        match scanned {
            Ok(Ok(Some(layout))) => Some(layout),
            Ok(Ok(None)) => {
                tracing::warn!("memdirty's working set not found in guest memory");
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "guest memory not readable");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "scan of guest memory failed");
                None
            }
        }
    }

    pub async fn destroy(&mut self) {
        for h in &self.hosts {
            let _ = h.delete_vm(&self.vm).await;
        }
    }

    /// Counter, checksum and health of the guest on `host`; the counter on success.
    async fn verify(&self, host: usize) -> Result<u64, String> {
        let v = self
            .guest(host, GuestCommand::Verify, Duration::from_secs(30))
            .await
            .map_err(|e| e.to_string())?;
        if v["ok"] != true {
            return Err(format!("checksum mismatch: {v}"));
        }
        let h = self
            .guest(host, GuestCommand::Health, Duration::from_secs(10))
            .await
            .map_err(|e| e.to_string())?;
        if h["ok"] != true {
            return Err(format!("guest reports trouble: {}", h["findings"]));
        }
        v["counter"]
            .as_u64()
            .ok_or_else(|| format!("no counter in {v}"))
    }

    /// Moves the guest to the other host with `engine`; the run's figures and whether
    /// the guest is healthy after it.
    pub async fn migrate(
        &mut self,
        engine: &str,
        max_precopy_s: f64,
        link_mbit: u32,
    ) -> anyhow::Result<Run> {
        let to = 1 - self.at;
        let (policy, ac) = match engine {
            "qemu-native-ac" => ("qemu-native", true),
            e => (e, false),
        };
        let body = SendRequest {
            vm: self.vm.parse()?,
            destination: self.lab.hosts[to].url.clone(),
            // The lab's agents answer mutual TLS: the source calls the destination with its
            // own host certificate, no token.
            token: String::new(),
            policy: policy.parse()?,
            options: SendOptions {
                auto_converge: ac,
                max_precopy_s,
                downtime_limit_ms: 300,
                ..SendOptions::default()
            },
        };
        let agent = self.hosts[self.at].http();
        let started: Value = agent.post("/v1/migrations", &body).await?;
        let id = started["id"].as_str().context("migration id")?.to_string();
        let t0 = Instant::now();
        let mut answered = Instant::now();
        let s = loop {
            let s: Value = match agent.get(&format!("/v1/migrations/{id}")).await {
                Ok(s) => {
                    answered = Instant::now();
                    s
                }
                // One dropped connection is no verdict on the migration; an agent silent
                // for 30 s is.
                Err(e) if answered.elapsed() < Duration::from_secs(30) => {
                    eprintln!("bench:   the source agent did not answer: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if matches!(s["phase"].as_str(), Some("completed" | "rolled_back")) {
                break s;
            }
            if t0.elapsed() > Duration::from_secs_f64(max_precopy_s + 120.0) {
                bail!("migration {id} did not finish: {s}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut run = Run {
            rate_percent: 0,
            dirty_mb_s: 0,
            engine: engine.to_string(),
            repetition: 1,
            measured_dirty_mb_s: None,
            writer_start: None,
            writer_seen: None,
            probe_dirty_mb_s: None,
            first_round_throttle_percent: None,
            probe: None,
            round_rates: Vec::new(),
            working_set_extents: Vec::new(),
            total_ms: None,
            downtime_ms: None,
            bytes: None,
            rounds: None,
            converged: false,
            guest_ok: false,
            lower_bound_ms: None,
            nonzero_bytes: None,
            predicted_total_ms: None,
            predicted_downtime_ms: None,
            total_error_percent: None,
            downtime_error_percent: None,
            stop_reason: None,
            max_throttle_percent: None,
            downtime_parts_ms: None,
            note: None,
            frozen: None,
            frozen_ms: None,
            fallback: None,
            freeze_answer_ms: None,
        };
        let dep = &s["dependency"];
        if dep.is_object() {
            run.frozen = dep["frozen"].as_u64();
            run.fallback = dep["fallback_reason"].as_str().map(str::to_string);
            run.freeze_answer_ms = dep["freeze_answer_ms"].as_u64();
            run.frozen_ms = dep["thaw"]["processes"].as_array().and_then(|p| {
                p.iter()
                    .filter_map(|p| p["frozen_ms"].as_f64())
                    .reduce(f64::max)
            });
        }
        // Per-round figures on stderr: where the time of a slow run went.
        for t in s["rounds"].as_array().into_iter().flatten() {
            if let (Some(round), Some(throttle), Some(rate)) = (
                t["round"].as_u64(),
                t["throttle_percent"].as_u64(),
                t["dirty_rate_bytes_per_s"].as_f64(),
            ) {
                run.round_rates.push(RoundRate {
                    round: round as u32,
                    throttle_percent: throttle.min(99) as u8,
                    dirty_mb_s: rate / 1e6,
                    remaining_pages: t["remaining_pages"].as_u64(),
                    predicted_downtime_ms: t["predicted_downtime_s"].as_f64().map(|s| s * 1e3),
                });
            }
            eprintln!(
                "bench:   round {}: {} pages in {:.0} ms (ending {:.0} ms into the live phase), {:.0} MB/s dirtied, {} left (a pause of {:.0} ms predicted), throttle {} %",
                t["round"],
                t["pages_sent"],
                t["duration_s"].as_f64().unwrap_or(0.0) * 1000.0,
                t["elapsed_s"].as_f64().unwrap_or(0.0) * 1000.0,
                t["dirty_rate_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e6,
                t["remaining_pages"],
                t["predicted_downtime_s"].as_f64().unwrap_or(0.0) * 1000.0,
                t["throttle_percent"],
            );
        }
        if s["phase"] == "completed" {
            let r = &s["result"];
            run.total_ms = r["total_ms"].as_u64();
            run.downtime_ms = r["downtime_ms"].as_u64();
            run.bytes = r["bytes"].as_u64();
            run.rounds = r["rounds"]
                .as_u64()
                .map(|x| x as u32)
                .filter(|_| policy != "qemu-native");
            run.converged = r["converged"] == true;
            if policy != "qemu-native" {
                run.stop_reason = r["stop_reason"].as_str().map(str::to_string);
                run.max_throttle_percent = r["max_throttle_percent"].as_u64().map(|p| p as u8);
                run.downtime_parts_ms = serde_json::from_value(r["downtime_parts_ms"].clone()).ok();
                let probe: Option<FirstRoundProbe> =
                    serde_json::from_value(r["probe"].clone()).ok();
                run.probe_dirty_mb_s = probe.as_ref().map(|p| p.dirty_rate_bytes_per_s(PAGE) / 1e6);
                run.probe = probe;
                run.first_round_throttle_percent =
                    s["rounds"][0]["throttle_percent"].as_u64().map(|p| p as u8);
            }
            let link_bytes_s = f64::from(link_mbit) * 1e6 / 8.0;
            run.nonzero_bytes = r["nonzero_bytes"].as_u64();
            run.lower_bound_ms = run
                .nonzero_bytes
                .map(|m| (m as f64 / link_bytes_s * 1000.0).round() as u64);
            self.at = to;
        } else {
            run.note = Some(format!(
                "rolled back: {}",
                s["error"].as_str().unwrap_or("?")
            ));
        }
        match self.verify(self.at).await {
            Ok(c) if c > self.counter => {
                run.guest_ok = true;
                self.counter = c;
            }
            Ok(c) => run.note = Some(format!("counter did not advance ({c} <= {})", self.counter)),
            Err(e) => run.note = Some(e),
        }
        Ok(run)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_cursor_is_its_page_count_around_the_set_carried_to_round_one() {
        let still = |pages| Writer {
            mb_s: 0.0,
            pages,
            at: Instant::now(),
        };
        // 1 MiB is 256 pages: three laps and a quarter.
        assert_eq!(still(3 * 256 + 64).start_share(MIB), 0.25);
        assert_eq!(still(0).start_share(MIB), 0.0);
        // 1000 pages a second, sampled 100 ms ago: 100 pages since, and the engine's
        // setup's worth more before round 1.
        let moving = Writer {
            mb_s: 4.096,
            pages: 64,
            at: Instant::now() - Duration::from_millis(100),
        };
        let at_least = (64.0 + 100.0 + 1000.0 * tern_migrate::model::ENGINE_SETUP_S) / 256.0;
        let s = moving.start_share(MIB);
        assert!(s >= at_least && s < at_least + 0.1, "{s} {at_least}");
    }

    /// A run as the benchmark saves it: a 512 MiB guest at 75 %, round 1 probed.
    fn saved_run(probe_pages: u64) -> Run {
        let json = serde_json::json!({
            "rate_percent": 75, "dirty_mb_s": 94, "engine": "adaptive", "repetition": 1,
            "measured_dirty_mb_s": 94.0, "writer_start": 0.5,
            "probe": {"pages_changed": probe_pages, "window_s": 0.15,
                "bandwidth_bytes_per_s": 118e6, "bytes_left": 200u64 << 20, "stop_cost_s": 0.05},
            "total_ms": 2500, "downtime_ms": 150, "bytes": 300_000_000u64, "rounds": 2,
            "converged": true, "guest_ok": true, "nonzero_bytes": 230_000_000u64,
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_saved_report_is_predicted_again_and_the_engine_s_probe_reading_counts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.json");
        let report = Report {
            link_mbit: 1000,
            memory_mib: 512,
            wss_mib: 128,
            runs: vec![saved_run(2_900), saved_run(4_200)],
        };
        std::fs::write(&path, serde_json::to_string(&report).unwrap()).unwrap();
        let mut back = read_report(&path).unwrap();
        let shape = Shape {
            link_mbit: back.link_mbit,
            memory_mib: back.memory_mib,
            wss_mib: back.wss_mib,
            max_precopy_s: 40.0,
            untainted_write_share: 0.0,
        };
        for run in &mut back.runs {
            predict(run, &shape);
            assert!(run.predicted_total_ms.is_some() && run.total_error_percent.is_some());
        }
        // A higher reading throttles the guest harder for the rest of round 1: the
        // model's prediction moves with the engine's reading.
        assert_ne!(
            back.runs[0].predicted_total_ms,
            back.runs[1].predicted_total_ms
        );
    }

    #[test]
    fn the_scan_a_round_weighed_is_its_predicted_pause_less_transfer_and_stop_cost() {
        let params = MigrationParams::engine(512 * MIB, 220 * MIB, 125e6);
        let bw = params.effective_bandwidth();
        let round = |pages: u64, scan_ms: f64| RoundRate {
            round: 2,
            throttle_percent: 95,
            dirty_mb_s: 30.0,
            remaining_pages: Some(pages),
            predicted_downtime_ms: Some(
                (pages as f64 * PAGE as f64 / bw + scan_ms / 1000.0 + 0.03) * 1000.0,
            ),
        };
        let got = weighed_scan_s(&round(400, 12.0), &params).unwrap();
        assert!((got - 0.012).abs() < 1e-9, "{got}");
        // Nothing to read, or a reading below the costs assumed: no scan.
        assert_eq!(
            weighed_scan_s(
                &RoundRate {
                    predicted_downtime_ms: None,
                    ..round(400, 12.0)
                },
                &params
            ),
            None
        );
        assert_eq!(weighed_scan_s(&round(0, -5.0), &params), None);
    }

    #[test]
    fn rates_under_each_throttle_are_averaged_over_the_rounds_it_held() {
        let r = |round, throttle_percent, dirty_mb_s| RoundRate {
            round,
            throttle_percent,
            dirty_mb_s,
            remaining_pages: None,
            predicted_downtime_ms: None,
        };
        let rates =
            throttled_rates(&[r(1, 86, 49.0), r(2, 95, 22.0), r(3, 95, 26.0), r(4, 0, 9.0)]);
        assert_eq!(
            rates.len(),
            2,
            "unthrottled rounds say nothing of a throttle"
        );
        assert_eq!((rates[0].percent, rates[0].rate_bytes_per_s), (86, 49e6));
        assert_eq!((rates[1].percent, rates[1].rate_bytes_per_s), (95, 24e6));
    }

    #[test]
    fn a_file_that_is_not_a_saved_report_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.json");
        std::fs::write(&path, r#"{"runs": 3}"#).unwrap();
        let err = read_report(&path).unwrap_err().to_string();
        assert!(
            err.contains("other.json") && err.contains("not a report"),
            "{err}"
        );
        let err = read_report(&dir.path().join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.json"), "{err}");
    }
}
