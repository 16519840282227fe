//! Steepest descent in the spirit of Ganeti's hbal, with live migrations as moves.
//!
//! Each step ([`best_move`], hbal's `tryBalance`) looks for the single move that
//! lowers the score most and takes it if hbal would: the score must drop, and by at
//! least `min_gain` once the score is at or below `min_gain_limit`. [`plan`] repeats
//! steps until none qualifies, `max_moves` is reached or the score falls to
//! `min_score`.
//!
//! Finding the best move exactly means scoring every (instance, target) pair:
//! 20 million pairs per step at 1000 nodes × 20000 instances. [`Search::Pruned`]
//! narrows that in three tiers, each tried only when the one before found no
//! acceptable move:
//!
//! 1. *narrow*: rank nodes with a typical instance as a probe (how much would the
//!    score drop if it left this node, or rise if it joined that one); take the
//!    instances on the best [`NARROW_SOURCES`] sources and score them against the
//!    best [`NARROW_TARGETS`] targets;
//! 2. *medium*: rank every instance by the gain of removing it from its node and by
//!    an exact move to the target the leading instance prefers; score all targets
//!    for the `width` best of each ranking;
//! 3. *exhaustive*: every pair, so a plan stops exactly where hbal's rule says.
//!
//! For metrics with linear node values (`spread`), a [`Frontier`] bounds the best
//! score each instance's move can reach before the medium tier runs: when no
//! bound is acceptable the step ends there, proven empty, and otherwise the
//! exhaustive tier scores only the instances whose bound is. Both give the result
//! the full exhaustive tier would, at a fraction of the pairs.
//!
//! Pairs are scored in parallel (rayon) by instance chunks.

use std::borrow::Cow;

use rayon::prelude::*;
use tern_model::{Cluster, InstId, Mobility, Move, NodeId, Plan};

use crate::bound::Frontier;
use crate::constraints::{self, Refusals};
use crate::lazy;
use crate::metric::spread::Spread;
use crate::metric::Metric;
use crate::state::State;

/// How a step looks for the best move.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Search {
    /// Find the best (instance, target) pair exactly, as hbal does: every pair is
    /// scored, except (for metrics with a [`Frontier`]) those of instances whose
    /// bound shows they cannot make an acceptable move.
    Exhaustive,
    /// Score all targets only for the `width` most promising instances by each of
    /// two rankings; fall back to exhaustive when that finds no acceptable move.
    Pruned { width: usize },
    /// For metrics with a [`Frontier`] (`spread`): several moves per step from a
    /// lazily updated heap of each instance's best move ([`crate::lazy`]); when
    /// that finds nothing acceptable, `Pruned` steps with this width take over,
    /// so a plan stops where hbal's rule says. Metrics without a frontier get
    /// `Pruned` alone.
    Lazy { width: usize },
}

impl Search {
    /// How many instances a pruned step scores against every target, if it prunes.
    fn width(self) -> Option<usize> {
        match self {
            Search::Exhaustive => None,
            Search::Pruned { width } | Search::Lazy { width } => Some(width),
        }
    }
}

/// Tunables of a plan; defaults are hbal's.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanOptions {
    /// Below `min_gain_limit`, a move must gain at least this much.
    pub min_gain: f64,
    pub min_gain_limit: f64,
    /// Stop after this many moves.
    pub max_moves: Option<usize>,
    /// Stop once the score is at or below this.
    pub min_score: f64,
    /// Refuse moves that make a node fail N+1 (Ganeti always checks this).
    pub n_plus_one: bool,
    /// Instances that must stay where they are.
    pub pinned: Vec<InstId>,
    pub search: Search,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            min_gain: 0.01,
            min_gain_limit: 0.1,
            max_moves: None,
            min_score: 1e-9,
            n_plus_one: true,
            pinned: Vec::new(),
            search: Search::Pruned { width: 24 },
        }
    }
}

/// A plan and what went into it.
#[derive(Clone, Debug, PartialEq)]
pub struct Planned {
    pub plan: Plan,
    /// Candidate moves refused, by reason (every step's candidates counted).
    pub refusals: Refusals,
    /// Candidate moves scored.
    pub evaluations: u64,
    /// Steps where the pruned search found nothing and the exhaustive one ran.
    pub exhaustive_steps: u64,
}

/// The best move found in one step, with its score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Step {
    pub mv: Move,
    pub score: f64,
}

#[derive(Clone, Copy, Debug)]
struct Best {
    score: f64,
    inst: u32,
    to: u32,
}

impl Best {
    const NONE: Best = Best {
        score: f64::INFINITY,
        inst: u32::MAX,
        to: u32::MAX,
    };

    /// Lower score wins; ties go to the earlier instance, then the earlier node,
    /// which is the order hbal scans in.
    fn better(self, other: Best) -> Best {
        if (other.score, other.inst, other.to) < (self.score, self.inst, self.to) {
            other
        } else {
            self
        }
    }
}

#[derive(Default)]
struct Tally {
    refusals: Refusals,
    evaluations: u64,
}

impl Tally {
    fn merge(mut self, other: Tally) -> Tally {
        self.refusals.merge(&other.refusals);
        self.evaluations += other.evaluations;
        self
    }
}

/// Plans with the `spread` metric: the entry point for the simulator and the live
/// manager.
pub fn plan_spread(cluster: &Cluster, opts: &PlanOptions) -> Planned {
    plan(cluster, &Spread, opts)
}

/// Plans moves for `cluster` under `metric` (see the module doc).
pub fn plan<M: Metric + ?Sized>(cluster: &Cluster, metric: &M, opts: &PlanOptions) -> Planned {
    let mut state = State::new(cluster, metric);
    let initial_score = state.score();
    let mut pinned = vec![false; cluster.instances.len()];
    for p in &opts.pinned {
        if let Some(x) = pinned.get_mut(p.index()) {
            *x = true;
        }
    }
    let mut refusals = Refusals::default();
    let movable: Vec<InstId> = cluster
        .instance_ids()
        .filter(|&i| match constraints::check_instance(&state, i, &pinned) {
            Ok(()) => true,
            Err(r) => {
                refusals.add(r);
                false
            }
        })
        .collect();
    let mut moves = Vec::new();
    let mut evaluations = 0;
    let mut exhaustive_steps = 0;
    let mut lazy = matches!(opts.search, Search::Lazy { .. });
    let mut ctx = None;
    let mut productive = lazy;
    loop {
        if opts.max_moves.is_some_and(|m| moves.len() >= m) || state.score() <= opts.min_score {
            break;
        }
        if lazy {
            let before = moves.len();
            let targets: Vec<NodeId> = cluster
                .node_ids()
                .filter(|&n| !cluster.node(n).offline)
                .collect();
            let rule = lazy::Rule {
                accept: &|ini, fin| acceptable(ini, fin, opts),
                max_moves: opts.max_moves.unwrap_or(usize::MAX),
                min_score: opts.min_score,
                n_plus_one: opts.n_plus_one,
            };
            if let Some(t) = lazy::descend(&mut state, &movable, &targets, &rule, &mut moves) {
                refusals.merge(&t.refusals);
                evaluations += t.evaluations;
            }
            // Lazy descent again only after a single step found what it missed, and
            // only while it finds moves itself.
            lazy = false;
            productive = moves.len() > before;
            if productive {
                ctx = None;
                continue;
            }
        }
        let ctx = ctx.get_or_insert_with(|| Context::new(&state, movable.clone()));
        let (step, tally, fell_back) = search(&state, opts, ctx);
        refusals.merge(&tally.refusals);
        evaluations += tally.evaluations;
        exhaustive_steps += u64::from(fell_back);
        let Some(step) = step else { break };
        state.apply(step.mv);
        ctx.moved(step.mv);
        moves.push(step.mv);
        lazy = productive;
        if moves.len().is_multiple_of(64) {
            state.refresh();
        }
    }
    state.refresh();
    Planned {
        plan: Plan {
            moves,
            initial_score,
            final_score: state.score(),
        },
        refusals,
        evaluations,
        exhaustive_steps,
    }
}

/// One planner step on its own: the best acceptable move from `state`, if any.
pub fn best_move<M: Metric + ?Sized>(state: &State<'_, M>, opts: &PlanOptions) -> Option<Step> {
    let pinned = pinned_flags(state.cluster, &opts.pinned);
    let movable: Vec<InstId> = state
        .cluster
        .instance_ids()
        .filter(|&i| constraints::check_instance(state, i, &pinned).is_ok())
        .collect();
    search(state, opts, &Context::new(state, movable)).0
}

/// Source nodes the narrow search takes instances from.
pub const NARROW_SOURCES: usize = 32;
/// Target nodes the narrow search scores them against.
pub const NARROW_TARGETS: usize = 128;

/// What a plan keeps between steps.
struct Context {
    movable: Vec<InstId>,
    /// Online nodes, in order.
    targets: Vec<NodeId>,
    /// Movable instances per node, by current primary.
    on_node: Vec<Vec<InstId>>,
    /// A movable shared-storage instance of typical size, used to rank nodes as
    /// sources and targets.
    probe: Option<tern_model::Instance>,
}

impl Context {
    fn new<M: Metric + ?Sized>(state: &State<'_, M>, movable: Vec<InstId>) -> Context {
        let c = state.cluster;
        let targets = c.node_ids().filter(|&n| !c.node(n).offline).collect();
        let mut on_node = vec![Vec::new(); c.nodes.len()];
        for &i in &movable {
            on_node[state.primary_of(i).index()].push(i);
        }
        let shared: Vec<&tern_model::Instance> = movable
            .iter()
            .map(|&i| c.instance(i))
            .filter(|i| i.disk_template.is_shared())
            .collect();
        let n = shared.len().max(1) as f64;
        let mean_mem = shared.iter().map(|i| i.mem as f64).sum::<f64>() / n;
        let mean_cpu = shared.iter().map(|i| i.vcpus as f64).sum::<f64>() / n;
        let probe = shared
            .iter()
            .min_by(|a, b| {
                let d = |i: &tern_model::Instance| {
                    ((i.mem as f64 - mean_mem) / mean_mem.max(1.0)).abs()
                        + ((i.vcpus as f64 - mean_cpu) / mean_cpu.max(1.0)).abs()
                };
                d(a).total_cmp(&d(b))
            })
            .map(|i| (*i).clone());
        Context {
            movable,
            targets,
            on_node,
            probe,
        }
    }

    fn moved(&mut self, mv: Move) {
        let from = &mut self.on_node[mv.from.index()];
        if let Some(pos) = from.iter().position(|&i| i == mv.inst) {
            from.remove(pos);
        }
        self.on_node[mv.to.index()].push(mv.inst);
    }
}

/// The `count` nodes whose score after the probe leaves (or joins) them is lowest.
fn rank_nodes<M: Metric + ?Sized>(
    state: &State<'_, M>,
    nodes: &[NodeId],
    probe: &tern_model::Instance,
    adding: bool,
    count: usize,
) -> Vec<NodeId> {
    let k = state.components_len();
    let mut ranked: Vec<(f64, NodeId)> = nodes
        .par_iter()
        .with_min_len(64)
        .map_init(
            || vec![0.0; k],
            |scratch, &n| (state.probe_score(n, probe, adding, scratch), n),
        )
        .collect();
    let count = count.min(ranked.len());
    if count == 0 {
        return Vec::new();
    }
    ranked.select_nth_unstable_by(count - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut out: Vec<NodeId> = ranked[..count].iter().map(|x| x.1).collect();
    out.sort_unstable();
    out
}

fn pinned_flags(cluster: &Cluster, pinned: &[InstId]) -> Vec<bool> {
    let mut flags = vec![false; cluster.instances.len()];
    for p in pinned {
        if let Some(x) = flags.get_mut(p.index()) {
            *x = true;
        }
    }
    flags
}

/// hbal's acceptance rule for a step from `ini` to `fin`.
fn acceptable(ini: f64, fin: f64, opts: &PlanOptions) -> bool {
    fin < ini && (ini > opts.min_gain_limit || ini - fin >= opts.min_gain)
}

fn search<M: Metric + ?Sized>(
    state: &State<'_, M>,
    opts: &PlanOptions,
    ctx: &Context,
) -> (Option<Step>, Tally, bool) {
    let ini = state.score();
    let to_step = |b: Best| {
        (b.score.is_finite() && acceptable(ini, b.score, opts)).then(|| {
            let inst = InstId(b.inst);
            Step {
                mv: Move {
                    inst,
                    from: state.primary_of(inst),
                    to: NodeId(b.to),
                },
                score: b.score,
            }
        })
    };
    let (movable, targets) = (&ctx.movable[..], &ctx.targets[..]);
    let mut tally = Tally::default();
    if let Some(width) = opts.search.width() {
        // Narrow: instances on the few best source nodes, against the few best
        // targets, both ranked with a typical instance.
        if let Some(probe) = ctx
            .probe
            .as_ref()
            .filter(|_| targets.len() > NARROW_TARGETS)
        {
            let busy: Vec<NodeId> = state
                .cluster
                .node_ids()
                .filter(|n| !ctx.on_node[n.index()].is_empty())
                .collect();
            let sources = rank_nodes(state, &busy, probe, false, NARROW_SOURCES);
            let near = rank_nodes(state, targets, probe, true, NARROW_TARGETS);
            tally.evaluations += (busy.len() + targets.len()) as u64;
            let insts: Vec<InstId> = sources
                .iter()
                .flat_map(|n| ctx.on_node[n.index()].iter().copied())
                .collect();
            if !insts.is_empty() {
                let (cands, t) = shortlist(state, opts, &insts, &near, width);
                tally = tally.merge(t);
                let (best, t) = scan(state, opts, &cands, &near);
                tally = tally.merge(t);
                if let Some(step) = to_step(best) {
                    return (Some(step), tally, false);
                }
            }
        }
    }
    // Only instances whose bound is acceptable can make an acceptable move.
    let hopeful = match hopeful(state, opts, movable, targets, &mut tally) {
        Some(h) if h.is_empty() => return (None, tally, false),
        Some(h) => Cow::Owned(h),
        None => Cow::Borrowed(movable),
    };
    if let Some(width) = opts.search.width() {
        // Medium: every instance ranked, every target for the best-ranked.
        if movable.len() > 2 * width {
            let (cands, t) = shortlist(state, opts, movable, targets, width);
            tally = tally.merge(t);
            let (best, t) = scan(state, opts, &cands, targets);
            tally = tally.merge(t);
            if let Some(step) = to_step(best) {
                return (Some(step), tally, false);
            }
            let (best, t) = scan(state, opts, &hopeful, targets);
            return (to_step(best), tally.merge(t), true);
        }
    }
    let (best, t) = scan(state, opts, &hopeful, targets);
    (to_step(best), tally.merge(t), false)
}

/// The movable instances whose move could be acceptable by their [`Frontier`]
/// bound, in order; None when the metric has no bound or it would cost about as
/// much as scoring every target.
fn hopeful<M: Metric + ?Sized>(
    state: &State<'_, M>,
    opts: &PlanOptions,
    movable: &[InstId],
    targets: &[NodeId],
    tally: &mut Tally,
) -> Option<Vec<InstId>> {
    let frontier = Frontier::new(state, targets)?;
    if 2 * frontier.width() > targets.len() {
        return None;
    }
    let ini = state.score();
    let k = state.components_len();
    let bounds: Vec<(f64, u64)> = movable
        .par_iter()
        .with_min_len(64)
        .map_init(
            || vec![0.0; 3 * k],
            |scratch, &i| frontier.lower_bound(state, i, scratch),
        )
        .collect();
    tally.evaluations += bounds.iter().map(|b| b.1).sum::<u64>();
    Some(
        movable
            .iter()
            .zip(&bounds)
            .filter(|(_, b)| acceptable(ini, b.0, opts))
            .map(|(&i, _)| i)
            .collect(),
    )
}

/// The instances worth scoring against every target: the best by removal gain, and
/// the best by an exact move to the target that suits the top one most.
fn shortlist<M: Metric + ?Sized>(
    state: &State<'_, M>,
    opts: &PlanOptions,
    movable: &[InstId],
    targets: &[NodeId],
    width: usize,
) -> (Vec<InstId>, Tally) {
    let k = state.components_len();
    let mut by_removal: Vec<(f64, InstId)> = movable
        .par_iter()
        .with_min_len(256)
        .map_init(
            || vec![0.0; k],
            |scratch, &i| (state.removal_score(i, scratch), i),
        )
        .collect();
    let cmp = |a: &(f64, InstId), b: &(f64, InstId)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
    let width = width.min(by_removal.len());
    by_removal.select_nth_unstable_by(width - 1, cmp);
    by_removal[..width].sort_by(cmp);
    let mut cands: Vec<InstId> = by_removal[..width].iter().map(|x| x.1).collect();
    let mut tally = Tally {
        evaluations: movable.len() as u64,
        ..Tally::default()
    };
    // The target that the most promising instance likes best is usually a good
    // target for many instances; rank every instance by an exact move there.
    let (lead, t) = scan(state, opts, &cands[..1], targets);
    tally = tally.merge(t);
    if lead.to != u32::MAX {
        let to = NodeId(lead.to);
        let mut by_target: Vec<(f64, InstId)> = movable
            .par_iter()
            .with_min_len(256)
            .filter(|&&i| state.primary_of(i) != to && state.mobility(i) == Mobility::AnyNode)
            .map_init(
                || vec![0.0; 2 * k],
                |scratch, &i| {
                    let (src, dst) = scratch.split_at_mut(k);
                    let from_load = state.source_after(i, to, src);
                    let score = state
                        .try_move(i, to, opts.n_plus_one, &from_load, src, dst)
                        .unwrap_or(f64::INFINITY);
                    (score, i)
                },
            )
            .filter(|x| x.0.is_finite())
            .collect();
        tally.evaluations += by_target.len() as u64;
        if !by_target.is_empty() {
            let w = width.min(by_target.len());
            by_target.select_nth_unstable_by(w - 1, cmp);
            cands.extend(by_target[..w].iter().map(|x| x.1));
        }
    }
    cands.sort_unstable();
    cands.dedup();
    (cands, tally)
}

/// Scores every allowed target of every instance in `insts`; returns the best.
fn scan<M: Metric + ?Sized>(
    state: &State<'_, M>,
    opts: &PlanOptions,
    insts: &[InstId],
    targets: &[NodeId],
) -> (Best, Tally) {
    let k = state.components_len();
    insts
        .par_iter()
        .with_min_len(8)
        .fold(
            || (Best::NONE, Tally::default(), vec![0.0; 2 * k]),
            |(mut best, mut tally, mut scratch), &i| {
                let (src, dst) = scratch.split_at_mut(k);
                match state.mobility(i) {
                    Mobility::Immovable => {}
                    Mobility::SecondaryOnly(s) => {
                        best = best.better(try_target(state, opts, i, s, src, dst, &mut tally));
                    }
                    Mobility::AnyNode => {
                        let from = state.primary_of(i);
                        let from_load = state.source_after(i, from, src);
                        for &to in targets {
                            if to == from {
                                continue;
                            }
                            match state.try_move(i, to, opts.n_plus_one, &from_load, src, dst) {
                                Err(r) => tally.refusals.add(r),
                                Ok(score) => {
                                    tally.evaluations += 1;
                                    best = best.better(Best {
                                        score,
                                        inst: i.0,
                                        to: to.0,
                                    });
                                }
                            }
                        }
                    }
                }
                (best, tally, scratch)
            },
        )
        .map(|(b, t, _)| (b, t))
        .reduce(
            || (Best::NONE, Tally::default()),
            |a, b| (a.0.better(b.0), a.1.merge(b.1)),
        )
}

fn try_target<M: Metric + ?Sized>(
    state: &State<'_, M>,
    opts: &PlanOptions,
    i: InstId,
    to: NodeId,
    src: &mut [f64],
    dst: &mut [f64],
    tally: &mut Tally,
) -> Best {
    let from_load = state.source_after(i, to, src);
    match state.try_move(i, to, opts.n_plus_one, &from_load, src, dst) {
        Err(r) => {
            tally.refusals.add(r);
            Best::NONE
        }
        Ok(score) => {
            tally.evaluations += 1;
            Best {
                score,
                inst: i.0,
                to: to.0,
            }
        }
    }
}
