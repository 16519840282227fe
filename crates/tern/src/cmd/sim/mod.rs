//! `tern sim`: the PlanetLab benchmark and custom scenarios on the discrete-event
//! simulator. Flags parse into a `SimConfig`, a cluster and traces; the library runs it.

mod plot;

use std::path::{Path, PathBuf};

use anyhow::Context;
use tern_sim::migration::{CloudSimTiming, MigrationTiming};
use tern_sim::planetlab::{self, VmTypeOrder};
use tern_sim::policy::{self, POLICY_NAMES};
use tern_sim::{Report, SimConfig, SimError, Simulation};

use crate::cmd::bad_input;

#[derive(clap::Subcommand)]
pub enum Command {
    /// CloudSim's PlanetLab benchmark on one day of traces (one file per VM).
    Planetlab(PlanetlabArgs),
}

#[derive(clap::Args)]
pub struct PlanetlabArgs {
    /// A PlanetLab day folder, e.g. ../shared/data/planetlab/20110303.
    pub dir: PathBuf,
    /// Number of hosts (half HP ML110 G4, half G5).
    #[arg(long, default_value_t = 800)]
    pub hosts: usize,
    #[command(flatten)]
    pub common: CommonArgs,
    /// How VM types are dealt to trace files: `cycle` (i mod 4) or `block` (CloudSim's
    /// four consecutive blocks).
    #[arg(long, default_value = "block")]
    pub vm_types: String,
    /// Make running VMs keep needing their RAM and bandwidth. By default they behave as
    /// in CloudSim's PlanetLab setup, where a VM asks for them only while being created.
    #[arg(long)]
    pub strict_memory: bool,
}

/// Flags every simulation takes.
#[derive(clap::Args)]
pub struct CommonArgs {
    /// Policy: none (static placement), thr-mmt (CloudSim's static threshold with
    /// minimum migration time), spread (tern's balancer).
    #[arg(long, default_value = "thr-mmt")]
    pub policy: String,
    /// CPU utilisation above which a host counts as overloaded.
    #[arg(long, default_value_t = 0.8)]
    pub threshold: f64,
    /// Migration time model: `cloudsim` (RAM over half the link, no sharing).
    #[arg(long, default_value = "cloudsim")]
    pub migration: String,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Draw utilisation spread, active hosts and migrations over time into this SVG.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Planetlab(args) => run_planetlab(args),
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
    let mut policy = policy(&args.common)?;
    check_plot_path(args.common.plot.as_deref())?;
    let (spec, traces) = planetlab::load(&args.dir, args.hosts, order).map_err(input_error)?;
    let cfg = SimConfig {
        interval_s: planetlab::INTERVAL_S,
        intervals: planetlab::SAMPLES as u32,
        threshold: args.common.threshold,
        record_series: args.common.plot.is_some(),
        strict_memory: args.strict_memory,
        ..SimConfig::default()
    };
    let sim = Simulation::new(spec, &traces, timing.as_ref(), cfg).map_err(input_error)?;
    let report = sim.run(policy.as_mut(), &mut progress_bar());
    finish(&report, &args.common)
}

fn timing(name: &str) -> anyhow::Result<Box<dyn MigrationTiming>> {
    match name {
        "cloudsim" => Ok(Box::new(CloudSimTiming)),
        other => Err(bad_input(format!(
            "unknown --migration `{other}`; use cloudsim"
        ))),
    }
}

fn policy(common: &CommonArgs) -> anyhow::Result<Box<dyn policy::Policy>> {
    if !(common.threshold > 0.0 && common.threshold <= 1.0) {
        return Err(bad_input(format!(
            "--threshold {} must be in (0, 1]",
            common.threshold
        )));
    }
    policy::by_name(&common.policy, common.threshold).map_err(|_| {
        bad_input(format!(
            "unknown --policy `{}`; use one of: {}",
            common.policy,
            POLICY_NAMES.join(", ")
        ))
    })
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
        | SimError::NoRoom { .. }
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

fn finish(report: &Report, common: &CommonArgs) -> anyhow::Result<()> {
    if let Some(path) = &common.plot {
        plot::draw(path, report).with_context(|| format!("drawing {}", path.display()))?;
    }
    if common.json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print_report(report);
    }
    Ok(())
}

fn print_report(r: &Report) {
    println!(
        "policy {} | migration model {} | {} hosts, {} VMs, {:.1} h simulated",
        r.policy, r.migration_model, r.hosts, r.vms, r.simulated_hours
    );
    println!("energy_kwh     {:.2}", r.energy_kwh);
    println!(
        "migrations     {} ({} completed, {} abandoned, mean {:.1} s)",
        r.migrations, r.migrations_completed, r.migrations_failed, r.mean_migration_s
    );
    println!("slatah         {:.4}", r.slatah);
    println!("pdm            {:.6}", r.pdm);
    println!("slav           {:.8}", r.slav);
    println!("peak active    {} hosts", r.peak_active_hosts);
    println!("events         {}", r.events);
    println!("wall_seconds   {:.3}", r.wall_seconds);
}
