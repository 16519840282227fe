//! `tern sim`: the PlanetLab benchmark and custom scenarios on the discrete-event
//! simulator. Flags parse into a `SimConfig`, a cluster and traces; the library runs it.

mod plot;

use std::path::{Path, PathBuf};

use std::io::Write;

use anyhow::Context;
use tern_balance::round::BalancerSettings;
use tern_migrate::policy::PolicyKind;
use tern_sim::migration::{CloudSimTiming, MigrationTiming, PreCopyTiming};
use tern_sim::planetlab::{self, VmTypeOrder};
use tern_sim::policy::{self, POLICY_NAMES};
use tern_sim::scenario::Scenario;
use tern_sim::{Report, SimConfig, SimError, Simulation};

use crate::cmd::bad_input;

#[derive(clap::Subcommand)]
pub enum Command {
    /// CloudSim's PlanetLab benchmark on one day of traces (one file per VM).
    Planetlab(PlanetlabArgs),
    /// A custom cluster from a scenario file (format: docs/simulator.md).
    Run(RunArgs),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The scenario, e.g. examples/sim/small.toml.
    pub scenario: PathBuf,
    /// Override the scenario's policy (none, thr-mmt, spread, balance).
    #[arg(long)]
    pub policy: Option<String>,
    /// Balancer settings for `--policy balance`: the JSON `GET /v1/balancer` returns
    /// (default: the manager's defaults).
    #[arg(long)]
    pub settings: Option<PathBuf>,
    /// Override the scenario's migration model (cloudsim, qemu, xen, adaptive, stop-copy).
    #[arg(long)]
    pub migration: Option<String>,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// How results come out.
#[derive(clap::Args)]
pub struct OutputArgs {
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Draw utilisation spread, active hosts and migrations over time into this SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct PlanetlabArgs {
    /// A PlanetLab day folder, e.g. data/planetlab/20110303 (files may be gzip-compressed).
    pub dir: PathBuf,
    /// Number of hosts (half HP ML110 G4, half G5).
    #[arg(long, default_value_t = 800)]
    pub hosts: usize,
    #[command(flatten)]
    pub common: CommonArgs,
    /// How VM types are dealt to trace files: `block` (CloudSim's four consecutive
    /// blocks) or `cycle` (i mod 4). A VM that fits on no host at the start is left out
    /// with a warning and counted in `dropped_vms`, as CloudSim does.
    #[arg(long, default_value = "block")]
    pub vm_types: String,
    /// Keep VMs whose load drops to zero. By default such a VM finishes and leaves, as in
    /// CloudSim, which destroys a VM whose workload asks for no CPU.
    #[arg(long)]
    pub keep_idle_vms: bool,
    /// Make running VMs keep needing their RAM and bandwidth. By default they behave as
    /// in CloudSim's PlanetLab setup, where a VM asks for them only while being created.
    #[arg(long)]
    pub strict_memory: bool,
}

/// Flags every simulation takes.
#[derive(clap::Args)]
pub struct CommonArgs {
    /// Policy: none (static placement), thr-mmt (CloudSim's static threshold with
    /// minimum migration time), spread (tern's planner alone), balance (the manager's
    /// balancing round: planner, cost/benefit, limits, cooldown).
    #[arg(long, default_value = "thr-mmt")]
    pub policy: String,
    /// Balancer settings for `--policy balance`: the JSON `GET /v1/balancer` returns
    /// (default: the manager's defaults).
    #[arg(long)]
    pub settings: Option<PathBuf>,
    /// CPU utilisation above which a host counts as overloaded.
    #[arg(long, default_value_t = 0.8)]
    pub threshold: f64,
    /// Migration time model: a pre-copy termination policy of tern's migration model
    /// (`qemu`, `xen`, `adaptive`, `stop-copy`), with concurrent migrations sharing each
    /// host's link; or `cloudsim` (RAM over half the link, no dirtying, no sharing).
    #[arg(long, default_value = "qemu")]
    pub migration: String,
    /// MB/s of memory a VM dirties at 100 % CPU (scaled by its load when it starts
    /// migrating); pre-copy models only.
    #[arg(long, default_value_t = 20.0)]
    pub dirty_mb_s: f64,
    #[command(flatten)]
    pub output: OutputArgs,
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Planetlab(args) => run_planetlab(args),
        Command::Run(args) => run_scenario(args),
    }
}

fn run_planetlab(args: PlanetlabArgs) -> anyhow::Result<()> {
    let order = match args.vm_types.as_str() {
        "cycle" => VmTypeOrder::Cycle,
        "block" => VmTypeOrder::Block,
        other => {
            return Err(bad_input(format!(
                "unknown --vm-types `{other}`; use cycle or block"
            )))
        }
    };
    if args.hosts == 0 {
        return Err(bad_input("--hosts must be at least 1"));
    }
    let timing = timing(&args.common.migration)?;
    let mut policy = policy(
        &args.common.policy,
        args.common.threshold,
        args.common.settings.as_deref(),
    )?;
    check_plot_path(args.common.output.plot.as_deref())?;
    let (spec, traces) = planetlab::load(&args.dir, args.hosts, order).map_err(input_error)?;
    let cfg = SimConfig {
        interval_s: planetlab::INTERVAL_S,
        intervals: planetlab::INTERVALS,
        warm_up_intervals: planetlab::WARM_UP_INTERVALS,
        finish_idle_vms: !args.keep_idle_vms,
        threshold: args.common.threshold,
        record_series: args.common.output.plot.is_some(),
        strict_memory: args.strict_memory,
        dirty_mb_s_at_full_cpu: args.common.dirty_mb_s,
        ..SimConfig::default()
    };
    let sim = Simulation::new(spec, &traces, timing.as_ref(), cfg).map_err(input_error)?;
    let report = sim.run(policy.as_mut(), &mut progress_bar());
    if report.dropped_vms > 0 {
        tracing::warn!(
            "{} of {} VMs fit on no host at the start and were left out (see --vm-types)",
            report.dropped_vms,
            report.vms
        );
    }
    finish(&report, &args.common.output)
}

fn run_scenario(args: RunArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.scenario).map_err(|e| {
        bad_input(format!(
            "cannot read scenario {}: {e}",
            args.scenario.display()
        ))
    })?;
    let sc = Scenario::parse(&text)
        .map_err(|e| bad_input(format!("{}: {e}", args.scenario.display())))?;
    let timing = timing(args.migration.as_deref().unwrap_or(&sc.migration))?;
    let mut policy = policy(
        args.policy.as_deref().unwrap_or(&sc.policy),
        sc.threshold,
        args.settings.as_deref(),
    )?;
    check_plot_path(args.output.plot.as_deref())?;
    let base = args.scenario.parent().unwrap_or(Path::new("."));
    let (spec, traces) = sc
        .build(base)
        .map_err(|e| bad_input(format!("{}: {e}", args.scenario.display())))?;
    let cfg = SimConfig {
        interval_s: sc.interval_s,
        intervals: sc.intervals(),
        threshold: sc.threshold,
        record_series: args.output.plot.is_some(),
        strict_memory: sc.strict_memory,
        dirty_mb_s_at_full_cpu: sc.dirty_mb_s,
        ..SimConfig::default()
    };
    let sim = Simulation::new(spec, &traces, timing.as_ref(), cfg).map_err(input_error)?;
    let report = sim.run(policy.as_mut(), &mut progress_bar());
    if report.dropped_vms > 0 {
        tracing::warn!(
            "{} of {} VMs fit on no host at the start and were left out",
            report.dropped_vms,
            report.vms
        );
    }
    finish(&report, &args.output)
}

fn timing(name: &str) -> anyhow::Result<Box<dyn MigrationTiming>> {
    if name == "cloudsim" {
        return Ok(Box::new(CloudSimTiming));
    }
    match name.parse::<PolicyKind>() {
        Ok(policy) => Ok(Box::new(PreCopyTiming::new(policy))),
        Err(_) => Err(bad_input(format!(
            "unknown --migration `{name}`; use one of: cloudsim, qemu, xen, adaptive, stop-copy"
        ))),
    }
}

fn policy(
    name: &str,
    threshold: f64,
    settings: Option<&Path>,
) -> anyhow::Result<Box<dyn policy::Policy>> {
    if !(threshold > 0.0 && threshold <= 1.0) {
        return Err(bad_input(format!(
            "threshold {threshold} must be in (0, 1]"
        )));
    }
    if let Some(path) = settings {
        if name != "balance" {
            return Err(bad_input(format!(
                "--settings applies to --policy balance, not `{name}`"
            )));
        }
        return Ok(Box::new(policy::Balance::new(balancer_settings(path)?)));
    }
    policy::by_name(name, threshold).map_err(|_| {
        bad_input(format!(
            "unknown policy `{name}`; use one of: {}",
            POLICY_NAMES.join(", ")
        ))
    })
}

/// Reads balancer settings as `GET /v1/balancer` returns them, checked as the manager
/// checks a `PUT`.
fn balancer_settings(path: &Path) -> anyhow::Result<BalancerSettings> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad_input(format!("cannot read settings {}: {e}", path.display())))?;
    let settings: BalancerSettings =
        serde_json::from_str(&text).map_err(|e| bad_input(format!("{}: {e}", path.display())))?;
    tern_balance::round::validate(&settings)
        .map_err(|e| bad_input(format!("{}: {e}", path.display())))?;
    Ok(settings)
}

fn check_plot_path(plot: Option<&Path>) -> anyhow::Result<()> {
    if let Some(p) = plot {
        if p.extension().and_then(|e| e.to_str()) != Some("svg") {
            return Err(bad_input(format!(
                "--plot {}: give a file name ending in .svg",
                p.display()
            )));
        }
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
        if parent.is_some_and(|d| !d.is_dir()) {
            return Err(bad_input(format!(
                "--plot {}: the folder does not exist",
                p.display()
            )));
        }
    }
    Ok(())
}

/// Setup errors caused by the files or flags given are bad input; others are not.
fn input_error(e: SimError) -> anyhow::Error {
    match e {
        SimError::Io { .. }
        | SimError::BadTrace(_)
        | SimError::BadScenario(_)
        | SimError::UnknownPolicy(_) => bad_input(e),
    }
}

fn progress_bar() -> impl FnMut(u32, u32) {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("simulating {bar:40} {pos}/{len} intervals")
            .expect("valid template"),
    );
    move |done, total| {
        bar.set_length(u64::from(total));
        bar.set_position(u64::from(done));
        if done >= total {
            bar.finish_and_clear();
        }
    }
}

fn finish(report: &Report, output: &OutputArgs) -> anyhow::Result<()> {
    if let Some(path) = &output.plot {
        plot::draw(path, report).with_context(|| format!("drawing {}", path.display()))?;
    }
    let text = if output.json {
        serde_json::to_string_pretty(report)? + "\n"
    } else {
        report_text(report)
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn report_text(r: &Report) -> String {
    format!(
        "policy {} | migration model {} | {} hosts, {} VMs, {:.1} h simulated\n\
         VMs            {} left out at the start, {} finished during the run\n\
         energy_kwh     {:.2}\n\
         migrations     {} ({} completed, {} abandoned, mean {:.1} s)\n\
         slatah         {:.4}\n\
         pdm            {:.6}\n\
         slav           {:.8}\n\
         peak active    {} hosts\n\
         imbalance      mean {:.4}, max {:.4} (spread score)\n\
         events         {}\n\
         wall_seconds   {:.3}\n",
        r.policy,
        r.migration_model,
        r.hosts,
        r.vms,
        r.simulated_hours,
        r.dropped_vms,
        r.vms_finished,
        r.energy_kwh,
        r.migrations,
        r.migrations_completed,
        r.migrations_failed,
        r.mean_migration_s,
        r.slatah,
        r.pdm,
        r.slav,
        r.peak_active_hosts,
        r.imbalance_mean,
        r.imbalance_max,
        r.events,
        r.wall_seconds
    )
}
