//! Descent by batches of moves from a lazily updated heap of source nodes, for
//! metrics with a [`Frontier`] (`spread`): the planner's fast path on hard rounds.
//!
//! Scoring every (instance, target) pair at every step is what makes a round of
//! thousands of moves slow. Two facts make most of that work redundant:
//!
//! - an instance's best target lies on the fronts of the target classes (see
//!   [`crate::bound`]), a handful of nodes;
//! - a move changes only its two nodes, so what a node offers as a source (its
//!   *key*: the score drop of its best move) stays what it was until a move
//!   touches it or its best target; the rest of the cluster shifts keys slowly.
//!
//! So every node with movable instances goes into a max-heap by key once. A
//! popped node's best move is computed afresh: its [`INSTANCES_PER_SOURCE`]
//! best instances by removal ([`State::removal_score`]; ranked again only when
//! a move touches the node), each scored exactly
//! (constraints checked) against every front node; it is taken when it still
//! gains at least the next node's recorded key (the usual lazy-greedy test),
//! and otherwise the node goes back with its new key. A node a move touched gets
//! a new entry (older ones are dropped when popped).
//!
//! A *step* takes several moves against fronts computed at its start, each from
//! a different source: a source an earlier move of the step touched waits for
//! the next step. A target may take several moves in a step, each scored
//! exactly against the state it meets (keeping targets apart too cost about 2 %
//! more moves for the same score: the coldest node is the best target for
//! several moves in a row). A step ends when no source has an acceptable move
//! left or the best gains less than [`STEP_GAIN_RATIO`] of the step's first.
//! Between steps every key is made current again: the gain of a recorded move
//! whose nodes have not changed is rescored (the gain of one move grows as the
//! score falls, so an old key would sink), and the [`REFRESHED_PER_STEP`] best
//! sources are computed afresh (a source that gave up load may have joined the
//! fronts, as a better target for others).
//!
//! Every move is checked and scored against the state as it is when applied, and
//! taken only when the planner's acceptance rule says so: the score never rises.
//! A step without a move ends the descent; the planner's exact search then has
//! the last word.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use rayon::prelude::*;
use tern_model::{InstId, Mobility, Move, NodeId};

use crate::bound::Frontier;
use crate::constraints::Refusals;
use crate::metric::Metric;
use crate::state::State;

/// A step ends once the best move left gains less than this share of the step's
/// first move: such a move is one the single-move search would not make next.
pub const STEP_GAIN_RATIO: f64 = 0.95;

/// Entries at the top of the heap computed afresh at the start of each step.
pub const REFRESHED_PER_STEP: usize = 32;

/// Instances of a source, best by removal first, scored against every front node.
pub const INSTANCES_PER_SOURCE: usize = 8;

/// When [`descend`] stops and which moves it may take.
pub struct Rule<'r> {
    /// The planner's acceptance rule, from the current score to the score after.
    pub accept: &'r (dyn Fn(f64, f64) -> bool + Sync),
    /// Stop once the plan holds this many moves.
    pub max_moves: usize,
    /// Stop once the score is at or below this.
    pub min_score: f64,
    pub n_plus_one: bool,
}

/// What a descent found besides its moves.
#[derive(Debug, Default)]
pub struct Tally {
    pub refusals: Refusals,
    /// Candidate moves and removals scored.
    pub evaluations: u64,
    /// Steps that took a move (each one or more moves sharing no node).
    pub steps: u64,
}

/// A source node and the gain of its best move when last looked at.
#[derive(Clone, Copy, Debug)]
struct Source {
    key: f64,
    node: NodeId,
    /// The node's version then; an entry with an older one is dropped, a newer
    /// entry stands in for it.
    version: u32,
    /// The move the key is the gain of, with its target's version then.
    best: Option<(Move, u32)>,
}

impl PartialEq for Source {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Source {}

impl PartialOrd for Source {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Source {
    /// Larger key first; ties to the earlier node.
    fn cmp(&self, other: &Self) -> Ordering {
        self.key
            .total_cmp(&other.key)
            .then(other.node.cmp(&self.node))
    }
}

/// A move and the score it leads to.
#[derive(Clone, Copy, Debug)]
struct Scored {
    mv: Move,
    score: f64,
}

/// Applies moves to `state` (appending them to `moves`) until the rule stops it
/// or a step finds no acceptable move; None when the metric has no frontier.
pub fn descend<M: Metric + ?Sized>(
    state: &mut State<'_, M>,
    movable: &[InstId],
    targets: &[NodeId],
    rule: &Rule<'_>,
    moves: &mut Vec<Move>,
) -> Option<Tally> {
    let mut tally = Tally::default();
    let n = state.node_count();
    let mut front = Frontier::new(state, targets)?.nodes();
    let mut on_node: Vec<Vec<InstId>> = vec![Vec::new(); n];
    for &i in movable {
        on_node[state.primary_of(i).index()].push(i);
    }
    // The step in which a move last touched each node.
    let mut touched = vec![u64::MAX; n];
    let k = state.components_len();
    let (mut heap, mut tops) = fill(state, &on_node, &front, rule, &mut tally);
    // Bumped by every move that touches the node.
    let mut version = vec![0u32; n];
    let mut scratch = vec![0.0; 2 * k];
    let mut deferred: Vec<Source> = Vec::new();
    let mut step = 0u64;
    let mut step_moves = 0usize;
    let mut first_gain = f64::NAN;
    while moves.len() < rule.max_moves && state.score() > rule.min_score {
        let Some(src) = heap.pop() else {
            if step_moves == 0 {
                break;
            }
            // Next step: fresh fronts, every node free again.
            tally.steps += 1;
            step += 1;
            step_moves = 0;
            front = Frontier::new(state, targets)?.nodes();
            deferred.extend(heap.drain());
            heap = rekey(
                state,
                deferred.drain(..),
                &version,
                rule,
                &mut scratch,
                &mut tally,
            );
            // Sources give up load too and may join the fronts, so the best few
            // entries are computed afresh against the new ones.
            let ini = state.score();
            let mut fresh = Vec::new();
            while fresh.len() < REFRESHED_PER_STEP {
                let Some(e) = heap.pop() else { break };
                if e.version != version[e.node.index()] {
                    continue;
                }
                let top = tops[e.node.index()].get_or_insert_with(|| {
                    ranked(state, &on_node[e.node.index()], &mut scratch, &mut tally)
                });
                let b = best_move(state, top, &front, rule, &mut scratch, &mut tally);
                fresh.push(Source {
                    key: b.map_or(f64::NEG_INFINITY, |b| ini - b.score),
                    best: b.map(|b| (b.mv, version[b.mv.to.index()])),
                    ..e
                });
            }
            heap.extend(fresh);
            continue;
        };
        let a = src.node.index();
        if src.version != version[a] {
            continue;
        }
        if touched[a] == step {
            deferred.push(src);
            continue;
        }
        let ini = state.score();
        let top =
            tops[a].get_or_insert_with(|| ranked(state, &on_node[a], &mut scratch, &mut tally));
        let Some(best) = best_move(state, top, &front, rule, &mut scratch, &mut tally) else {
            // No allowed move from here against this step's fronts.
            deferred.push(Source {
                key: f64::NEG_INFINITY,
                best: None,
                ..src
            });
            continue;
        };
        let gain = ini - best.score;
        let src = Source {
            key: gain,
            best: Some((best.mv, version[best.mv.to.index()])),
            ..src
        };
        // Keys only record what a source offered when last looked at: take this
        // one's move only if it still beats what the next one offered then.
        if heap.peek().is_some_and(|next| next.key > gain) {
            heap.push(src);
            continue;
        }
        if !(rule.accept)(ini, best.score)
            || (step_moves > 0 && gain < STEP_GAIN_RATIO * first_gain)
        {
            // Nothing left worth taking in this step.
            deferred.push(src);
            deferred.extend(heap.drain());
            continue;
        }
        if step_moves == 0 {
            first_gain = gain;
        }
        step_moves += 1;
        let mv = best.mv;
        state.apply(mv);
        moves.push(mv);
        let from = &mut on_node[a];
        if let Some(p) = from.iter().position(|&i| i == mv.inst) {
            from.swap_remove(p);
        }
        on_node[mv.to.index()].push(mv.inst);
        for node in [mv.from, mv.to] {
            touched[node.index()] = step;
            version[node.index()] += 1;
            tops[node.index()] = None;
        }
        // The source offers less now, the target more (it may have had nothing
        // to offer): both are looked at again when popped.
        deferred.push(Source {
            key: gain,
            node: mv.from,
            version: version[a],
            best: None,
        });
        deferred.push(Source {
            key: f64::INFINITY,
            node: mv.to,
            version: version[mv.to.index()],
            best: None,
        });
        if moves.len().is_multiple_of(64) {
            state.refresh();
        }
    }
    tally.steps += u64::from(step_moves > 0);
    state.refresh();
    Some(tally)
}

/// The entries still current, each keyed again by the gain its recorded move
/// gives now when neither of its nodes has changed: the gain of one move grows
/// as the score falls, so a key recorded early would otherwise sink.
fn rekey<M: Metric + ?Sized>(
    state: &State<'_, M>,
    entries: impl Iterator<Item = Source>,
    version: &[u32],
    rule: &Rule<'_>,
    scratch: &mut [f64],
    tally: &mut Tally,
) -> BinaryHeap<Source> {
    let ini = state.score();
    entries
        .filter(|e| e.version == version[e.node.index()])
        .filter_map(|e| match e.best {
            Some((mv, v)) if v == version[mv.to.index()] && state.primary_of(mv.inst) == e.node => {
                let score = rescore(state, mv, rule, scratch, tally)?;
                Some(Source {
                    key: ini - score,
                    ..e
                })
            }
            _ => Some(e),
        })
        .collect()
}

/// The score after `mv`, checked against the current state; None when a
/// constraint now refuses it.
fn rescore<M: Metric + ?Sized>(
    state: &State<'_, M>,
    mv: Move,
    rule: &Rule<'_>,
    scratch: &mut [f64],
    tally: &mut Tally,
) -> Option<f64> {
    let k = state.components_len();
    let (src, dst) = scratch.split_at_mut(k);
    let from_load = state.source_after(mv.inst, mv.to, src);
    tally.evaluations += 1;
    match state.try_move(mv.inst, mv.to, rule.n_plus_one, &from_load, src, dst) {
        Ok(score) => Some(score),
        Err(r) => {
            tally.refusals.add(r);
            None
        }
    }
}

/// Every node's entry, keyed by its best move now, and its best instances by
/// removal (in parallel).
fn fill<M: Metric + ?Sized>(
    state: &State<'_, M>,
    on_node: &[Vec<InstId>],
    front: &[NodeId],
    rule: &Rule<'_>,
    tally: &mut Tally,
) -> (BinaryHeap<Source>, Vec<Option<Vec<InstId>>>) {
    let k = state.components_len();
    let ini = state.score();
    let found: Vec<(Option<Scored>, Vec<InstId>, Tally)> = on_node
        .par_iter()
        .with_min_len(16)
        .map_init(
            || vec![0.0; 2 * k],
            |scratch, insts| {
                let mut t = Tally::default();
                let top = ranked(state, insts, scratch, &mut t);
                let best = best_move(state, &top, front, rule, scratch, &mut t);
                (best, top, t)
            },
        )
        .collect();
    let mut tops = Vec::with_capacity(found.len());
    let mut heap = BinaryHeap::new();
    for (a, (best, top, t)) in found.into_iter().enumerate() {
        tally.refusals.merge(&t.refusals);
        tally.evaluations += t.evaluations;
        tops.push(Some(top));
        if let Some(b) = best {
            heap.push(Source {
                key: ini - b.score,
                node: NodeId::from_index(a),
                version: 0,
                best: Some((b.mv, 0)),
            });
        }
    }
    (heap, tops)
}

/// The [`INSTANCES_PER_SOURCE`] of `insts` (all on one node) whose removal lowers
/// the score most, best first.
fn ranked<M: Metric + ?Sized>(
    state: &State<'_, M>,
    insts: &[InstId],
    scratch: &mut [f64],
    tally: &mut Tally,
) -> Vec<InstId> {
    let k = state.components_len();
    let mut ranked: Vec<(f64, InstId)> = insts
        .iter()
        .map(|&i| (state.removal_score(i, &mut scratch[..k]), i))
        .collect();
    tally.evaluations += ranked.len() as u64;
    let cmp = |x: &(f64, InstId), y: &(f64, InstId)| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1));
    let w = INSTANCES_PER_SOURCE.min(ranked.len());
    if w == 0 {
        return Vec::new();
    }
    ranked.select_nth_unstable_by(w - 1, cmp);
    ranked[..w].sort_unstable_by(cmp);
    ranked[..w].iter().map(|x| x.1).collect()
}

/// The best allowed move of one of `top` (instances of one node, from [`ranked`])
/// to a front node (or, for DRBD, to its secondary).
fn best_move<M: Metric + ?Sized>(
    state: &State<'_, M>,
    top: &[InstId],
    front: &[NodeId],
    rule: &Rule<'_>,
    scratch: &mut [f64],
    tally: &mut Tally,
) -> Option<Scored> {
    let k = state.components_len();
    let (src, dst) = scratch.split_at_mut(k);
    let mut best: Option<Scored> = None;
    for &inst in top {
        let from = state.primary_of(inst);
        let only;
        let targets: &[NodeId] = match state.mobility(inst) {
            Mobility::Immovable => continue,
            Mobility::SecondaryOnly(s) => {
                only = [s];
                &only
            }
            Mobility::AnyNode => front,
        };
        let mut from_load = None;
        for &to in targets {
            if to == from {
                continue;
            }
            // The source's side depends on the target only for a DRBD swap.
            let fl = match from_load {
                Some(l) if state.mobility(inst) == Mobility::AnyNode => l,
                _ => {
                    let l = state.source_after(inst, to, src);
                    from_load = Some(l);
                    l
                }
            };
            tally.evaluations += 1;
            match state.try_move(inst, to, rule.n_plus_one, &fl, src, dst) {
                Err(r) => tally.refusals.add(r),
                Ok(score) => {
                    if best.is_none_or(|b| score < b.score) {
                        best = Some(Scored {
                            mv: Move { inst, from, to },
                            score,
                        });
                    }
                }
            }
        }
    }
    best
}
