//! `tern plan`: read a cluster snapshot, print a balancing plan, optionally save the
//! balanced cluster and plot per-node load before and after.

mod plot;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use serde::Serialize;
use tern_balance::metric::{ganeti::Ganeti, spread::Spread, Metric};
use tern_balance::{PlanOptions, Planned, Search, State};
use tern_model::{Cluster, InstId};

use super::bad_input;

/// Which score the planner minimises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricName {
    /// Ganeti's cluster score, as `hinfo` and `hbal` compute it.
    Ganeti,
    /// Standard deviation of CPU and memory utilisation across hosts.
    Spread,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Cluster in Ganeti's htools text format (as `hbal -t FILE` reads it).
    #[arg(long, value_name = "FILE")]
    pub ganeti: PathBuf,
    /// Score to minimise.
    #[arg(long, value_enum, default_value = "ganeti")]
    pub metric: MetricName,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Write the balanced cluster to OUT in the same text format.
    #[arg(long, value_name = "OUT")]
    pub save: Option<PathBuf>,
    /// Draw per-node load before and after as an SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Stop after this many moves.
    #[arg(long)]
    pub max_moves: Option<usize>,
    /// Once the score is at or below --min-gain-limit, a move must gain this much.
    #[arg(long, default_value_t = 0.01)]
    pub min_gain: f64,
    #[arg(long, default_value_t = 0.1)]
    pub min_gain_limit: f64,
    /// Stop once the score is at or below this.
    #[arg(long, default_value_t = 1e-9)]
    pub min_score: f64,
    /// Allow moves that leave a node unable to absorb a failed DRBD peer.
    #[arg(long)]
    pub no_n_plus_one: bool,
    /// Treat this node as offline, so the plan evacuates it (repeatable; hbal's -O).
    #[arg(long, value_name = "NODE")]
    pub offline: Vec<String>,
    /// Ignore dynamic utilisation (hbal's --ignore-dynu).
    #[arg(long)]
    pub ignore_dynu: bool,
    /// Keep this instance where it is (repeatable).
    #[arg(long, value_name = "INSTANCE")]
    pub pin: Vec<String>,
    /// Score every (instance, node) pair at every step, as hbal does, instead of
    /// the pruned search.
    #[arg(long)]
    pub exhaustive: bool,
    /// Instances per ranking that the pruned search scores against every node.
    #[arg(long, default_value_t = 24)]
    pub search_width: usize,
}

#[derive(Serialize)]
struct MoveOut<'a> {
    instance: &'a str,
    from: &'a str,
    to: &'a str,
}

#[derive(Serialize)]
struct Report<'a> {
    metric: &'static str,
    nodes: usize,
    instances: usize,
    initial_score: f64,
    final_score: f64,
    moves: Vec<MoveOut<'a>>,
    refusals: std::collections::BTreeMap<&'static str, u64>,
    evaluations: u64,
    /// Steps where the pruned search found nothing and every pair was scored.
    exhaustive_steps: u64,
    wall_seconds: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cluster = load(&args.ganeti)?;
    for name in &args.offline {
        let id = cluster.find_node(name).ok_or_else(|| {
            bad_input(format!(
                "--offline {name}: no such node in {}",
                args.ganeti.display()
            ))
        })?;
        cluster.nodes[id.index()].offline = true;
    }
    if args.ignore_dynu {
        for inst in &mut cluster.instances {
            inst.util = tern_model::DynUtil::ZERO;
        }
    }
    let opts = options(&args, &cluster)?;
    let started = Instant::now();
    match args.metric {
        MetricName::Ganeti => finish(&args, &cluster, &Ganeti::new(&cluster), &opts, started),
        MetricName::Spread => finish(&args, &cluster, &Spread, &opts, started),
    }
}

/// Reads and checks a Ganeti file; every problem is bad input.
pub fn load(path: &Path) -> anyhow::Result<Cluster> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| bad_input(format!("cannot read {}: {e}", path.display())))?;
    let cluster = tern_model::ganeti::parse(&text)
        .map_err(|e| bad_input(format!("{}: {e}", path.display())))?;
    let biggest = cluster
        .nodes
        .iter()
        .map(|n| n.total_mem)
        .fold(0.0, f64::max);
    if let Some(i) = cluster.instances.iter().find(|i| i.mem as f64 > biggest) {
        return Err(bad_input(format!(
            "{}: instance {} needs {} MiB of memory, more than the largest node has ({} MiB); \
             fix its size or add a bigger node",
            path.display(),
            i.name,
            i.mem,
            biggest
        )));
    }
    Ok(cluster)
}

fn options(args: &Args, cluster: &Cluster) -> anyhow::Result<PlanOptions> {
    let mut pinned: Vec<InstId> = Vec::new();
    for name in &args.pin {
        let id = cluster.find_instance(name).ok_or_else(|| {
            bad_input(format!(
                "--pin {name}: no such instance in {}",
                args.ganeti.display()
            ))
        })?;
        pinned.push(id);
    }
    for (flag, v) in [
        ("--min-gain", args.min_gain),
        ("--min-gain-limit", args.min_gain_limit),
        ("--min-score", args.min_score),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(bad_input(format!(
                "{flag} {v}: expected a non-negative number"
            )));
        }
    }
    if args.search_width == 0 {
        return Err(bad_input("--search-width 0: expected at least 1"));
    }
    Ok(PlanOptions {
        min_gain: args.min_gain,
        min_gain_limit: args.min_gain_limit,
        max_moves: args.max_moves,
        min_score: args.min_score,
        n_plus_one: !args.no_n_plus_one,
        pinned,
        search: if args.exhaustive {
            Search::Exhaustive
        } else {
            Search::Pruned {
                width: args.search_width,
            }
        },
    })
}

fn finish<M: Metric>(
    args: &Args,
    cluster: &Cluster,
    metric: &M,
    opts: &PlanOptions,
    started: Instant,
) -> anyhow::Result<()> {
    let planned = tern_balance::plan(cluster, metric, opts);
    let wall = started.elapsed().as_secs_f64();
    let mut state = State::new(cluster, metric);
    for mv in &planned.plan.moves {
        state.apply(*mv);
    }
    let balanced = state.to_cluster();
    // Render everything first so that a failure leaves no file behind.
    let saved = args
        .save
        .as_ref()
        .map(|p| (p, tern_model::ganeti::serialize(&balanced)));
    let svg = match &args.plot {
        Some(p) => Some((p, plot::render(cluster, &balanced, metric)?)),
        None => None,
    };
    if let Some((p, text)) = saved {
        super::write_atomic(p, text.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some((p, text)) = svg {
        super::write_atomic(p, text.as_bytes())
            .with_context(|| format!("writing {}", p.display()))?;
    }
    print_report(args, cluster, metric, &planned, wall)
}

fn print_report<M: Metric>(
    args: &Args,
    cluster: &Cluster,
    metric: &M,
    planned: &Planned,
    wall: f64,
) -> anyhow::Result<()> {
    let plan = &planned.plan;
    let node = |id: tern_model::NodeId| cluster.node(id).name.as_str();
    if args.json {
        let report = Report {
            metric: metric.name(),
            nodes: cluster.nodes.len(),
            instances: cluster.instances.len(),
            initial_score: plan.initial_score,
            final_score: plan.final_score,
            moves: plan
                .moves
                .iter()
                .map(|m| MoveOut {
                    instance: &cluster.instance(m.inst).name,
                    from: node(m.from),
                    to: node(m.to),
                })
                .collect(),
            refusals: planned
                .refusals
                .iter()
                .map(|(r, c)| (r.as_str(), c))
                .collect(),
            evaluations: planned.evaluations,
            exhaustive_steps: planned.exhaustive_steps,
            wall_seconds: wall,
        };
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "Loaded {} nodes, {} instances; metric {}",
        cluster.nodes.len(),
        cluster.instances.len(),
        metric.name()
    );
    println!("Initial score: {:.8}", plan.initial_score);
    for (n, m) in plan.moves.iter().enumerate() {
        println!(
            "{:5}. {} {} => {}",
            n + 1,
            cluster.instance(m.inst).name,
            node(m.from),
            node(m.to)
        );
    }
    println!("Final score: {:.8}", plan.final_score);
    println!(
        "Moves: {}; candidates scored: {}; planning took {:.3} s",
        plan.moves.len(),
        planned.evaluations,
        wall
    );
    let refused: Vec<String> = planned
        .refusals
        .iter()
        .map(|(r, c)| format!("{r} {c}"))
        .collect();
    if !refused.is_empty() {
        println!("Refused candidates: {}", refused.join(", "));
    }
    Ok(())
}
