//! Descent by batches of moves from a lazily updated heap of source nodes, for
//! metrics with a [`Frontier`] (`spread`): the planner's fast path on hard rounds.
//!
//! Scoring every (instance, target) pair at every step is what makes a round of
//! thousands of moves slow. Three facts make most of that work redundant:
//!
//! - an instance's best target lies on the fronts of the target classes (see
//!   [`crate::bound`]), a handful of nodes;
//! - a move changes only its two nodes, so what a node offers as a source (its
//!   *key*: the score drop of its best move) stays what it was until a move
//!   touches it or its best target; the rest of the cluster shifts keys slowly;
//! - node values grow linearly with what runs on a node, so a candidate's values
//!   are its nodes' values plus or minus what the instance adds to a node of
//!   that class ([`Rises`]), and many moves from one source share the cluster's
//!   sums after the source's half ([`crate::metric::Stats::shifted`]): a
//!   candidate is estimated in a few operations, and only the best one by
//!   estimate has its constraints checked and is scored exactly.
//!
//! So every node with movable instances goes into a max-heap by key once. A
//! popped node's best move is computed afresh: its [`INSTANCES_PER_SOURCE`]
//! best instances by removal (ranked again only when a move touches the node),
//! each against every front node; it is taken when it still gains at least the
//! next node's recorded key (the usual lazy-greedy test), and otherwise the node
//! goes back with its new key. A node a move touched gets a new entry (older
//! ones are dropped when popped). A popped node whose recorded best target has
//! taken load since first goes back with a bound (its best instances' moves to
//! that target now, or its best move elsewhere then): the coldest nodes are
//! everyone's best targets, and each move into one would otherwise send every
//! source through a full search.
//!
//! A *step* takes several moves against fronts found at its start, each from
//! a different source: a source an earlier move of the step touched waits for
//! the next step. A target may take several moves in a step, each scored
//! exactly against the state it meets (the coldest node is the best target for
//! several moves in a row). A step ends when no source has an acceptable move
//! left or the best gains less than [`STEP_GAIN_RATIO`] of the step's first.
//! Between steps the fronts are found afresh (with two components, by one pass
//! over the nodes in the order of their values, kept across steps: see
//! [`Sorted`]) and every key is made current from its source's record
//! ([`rekeyed`]): the gain of one move grows as the score falls, so an old key
//! would sink. A source whose recorded target took load is keyed by its
//! record's bound alone ([`recorded_gain`]) and looked at afresh only if
//! popped. A source looked at after a move of the step had loaded the fronts
//! is estimated against the nodes the step uncovered (those on the fronts now
//! that were not at its start: the loaded ones hid them), and the best of
//! those, when it beats the record, becomes its record. Sources for which a
//! node that gave up load and joined the fronts is a better target are looked
//! at afresh.
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
use crate::metric::{Metric, Running};
use crate::state::State;

/// A step ends once the best move left gains less than this share of the step's
/// first move: such a move is one the single-move search would not make next.
pub const STEP_GAIN_RATIO: f64 = 0.95;

/// Instances of a source, best by removal first, scored against every front node.
pub const INSTANCES_PER_SOURCE: usize = 2;

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
    /// Whether the key is a bound from the source's record, taken when its
    /// recorded target had changed: popped again, it is looked at afresh.
    bounded: bool,
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

/// How much each movable instance raises the values of a node of each class
/// (nodes with equal [`Metric::scales`]): the metric's values grow linearly with
/// what runs on a node, so a move's values are the nodes' values plus or minus
/// these, without building the nodes' loads.
struct Rises {
    k: usize,
    classes: usize,
    /// Per node: its class.
    class: Vec<u32>,
    /// Per instance, per class: the rise of each component.
    rise: Vec<f64>,
    /// Per instance: whether it may go to any node ([`Mobility::AnyNode`], fixed by
    /// its disk template), kept here as the instances themselves are far apart
    /// in memory.
    any: Vec<bool>,
}

impl Rises {
    /// None when a node has no scales.
    fn new<M: Metric + ?Sized>(state: &State<'_, M>, movable: &[InstId]) -> Option<Rises> {
        let k = state.components_len();
        let mut scales = vec![0.0; k];
        let mut keys: Vec<Vec<u64>> = Vec::new();
        let mut probes = Vec::new();
        let mut class = Vec::with_capacity(state.node_count());
        for n in 0..state.node_count() {
            let node = NodeId::from_index(n);
            if !state.metric.scales(state.cluster, node, &mut scales) {
                return None;
            }
            let key: Vec<u64> = scales.iter().map(|x| x.to_bits()).collect();
            let c = match keys.iter().position(|x| *x == key) {
                Some(c) => c,
                None => {
                    keys.push(key);
                    probes.push(node);
                    keys.len() - 1
                }
            };
            class.push(c as u32);
        }
        let classes = probes.len();
        let mut rise = vec![0.0; state.cluster.instances.len() * classes * k];
        let mut vals = vec![0.0; k];
        let mut any = vec![false; state.cluster.instances.len()];
        for &i in movable {
            if state.mobility(i) != Mobility::AnyNode {
                continue;
            }
            any[i.index()] = true;
            for (c, &probe) in probes.iter().enumerate() {
                let load = state.load_after_in(i, probe);
                state
                    .metric
                    .node_values(state.cluster, probe, &load, &mut vals);
                let at = (i.index() * classes + c) * k;
                for ((r, new), old) in rise[at..at + k]
                    .iter_mut()
                    .zip(&vals)
                    .zip(state.values_of(probe))
                {
                    *r = new - old;
                }
            }
        }
        Some(Rises {
            k,
            classes,
            class,
            rise,
            any,
        })
    }

    /// Whether `inst` may go to any node.
    #[inline]
    fn any(&self, inst: InstId) -> bool {
        self.any[inst.index()]
    }

    /// What `inst` adds to `node`'s values.
    #[inline]
    fn of(&self, inst: InstId, node: NodeId) -> &[f64] {
        let at = (inst.index() * self.classes + self.class[node.index()] as usize) * self.k;
        &self.rise[at..at + self.k]
    }
}

/// A node's two values and the node, ordered lexicographically.
type Point = (f64, f64, NodeId);

fn lex(x: &Point, y: &Point) -> Ordering {
    x.0.total_cmp(&y.0)
        .then(x.1.total_cmp(&y.1))
        .then(x.2.cmp(&y.2))
}

/// The target nodes of each class in lexicographic order of their two values,
/// kept across steps for metrics with two components: a step's moves change a
/// few nodes, which leave the order and are merged back, and each front is then
/// one pass over it, instead of sorting half the cluster twice at every step.
struct Sorted {
    /// Per class, its target nodes.
    classes: Vec<Vec<Point>>,
    /// Per node: whether it is a target.
    target: Vec<bool>,
    /// Per node: whether a move changed it since the order was last brought up to date.
    changed: Vec<bool>,
    pending: Vec<NodeId>,
}

impl Sorted {
    /// None unless the metric has two components.
    fn new<M: Metric + ?Sized>(
        state: &State<'_, M>,
        rises: &Rises,
        targets: &[NodeId],
    ) -> Option<Sorted> {
        if state.components_len() != 2 {
            return None;
        }
        let n = state.node_count();
        let mut classes = vec![Vec::new(); rises.classes];
        let mut target = vec![false; n];
        for &t in targets {
            target[t.index()] = true;
            classes[rises.class[t.index()] as usize].push(point(state, t));
        }
        for c in &mut classes {
            c.sort_unstable_by(lex);
        }
        Some(Sorted {
            classes,
            target,
            changed: vec![false; n],
            pending: Vec::new(),
        })
    }

    /// Notes that a move changed `node`'s values.
    fn moved(&mut self, node: NodeId) {
        if !std::mem::replace(&mut self.changed[node.index()], true) {
            self.pending.push(node);
        }
    }

    /// The nodes of [`Frontier::nodes`] for the targets, in order: per class,
    /// the nodes no other one weakly undercuts in both values (duplicates aside),
    /// and the same among the rest.
    fn fronts<M: Metric + ?Sized>(&mut self, state: &State<'_, M>, rises: &Rises) -> Vec<NodeId> {
        if !self.pending.is_empty() {
            let mut fresh = vec![Vec::new(); self.classes.len()];
            for &node in &self.pending {
                if self.target[node.index()] {
                    fresh[rises.class[node.index()] as usize].push(point(state, node));
                }
            }
            for (points, mut fresh) in self.classes.iter_mut().zip(fresh) {
                if fresh.is_empty() {
                    continue;
                }
                points.retain(|p| !self.changed[p.2.index()]);
                fresh.sort_unstable_by(lex);
                // Two sorted runs: the stable sort merges them in one pass.
                points.extend(fresh);
                points.sort_by(lex);
            }
            for node in self.pending.drain(..) {
                self.changed[node.index()] = false;
            }
        }
        let mut out = Vec::new();
        for points in &self.classes {
            let first = staircase(points, &[]);
            let second = staircase(points, &first);
            out.extend(first);
            out.extend(second);
        }
        out.sort_unstable();
        out
    }
}

fn point<M: Metric + ?Sized>(state: &State<'_, M>, node: NodeId) -> Point {
    let x = state.values_of(node);
    (x[0], x[1], node)
}

/// The nodes of `points` (in lexicographic order), `skip`'s aside, that no
/// other one weakly undercuts in both values (duplicates aside): in that
/// order, each one lower in the second value than every one before it.
fn staircase(points: &[Point], skip: &[NodeId]) -> Vec<NodeId> {
    let mut out = Vec::new();
    let mut low = f64::INFINITY;
    for p in points.iter().filter(|p| !skip.contains(&p.2)) {
        if out.is_empty() || p.1.total_cmp(&low).is_lt() {
            low = p.1;
            out.push(p.2);
        }
    }
    out
}

/// A source's best move when last looked at, kept to key its entry again later.
#[derive(Clone, Copy, Debug)]
struct Record {
    mv: Move,
    /// The target's version then.
    target: u32,
    /// The move's gain then.
    gain: f64,
    /// The estimated gain then of the best move to another target.
    other: f64,
}

/// Buffers a search reuses instead of allocating.
struct Work {
    /// Exact values of the source and the target after the last move found.
    exact: Vec<f64>,
    /// Estimated values of a source and a target.
    estimate: Vec<f64>,
    /// Moves by estimated score.
    cands: Vec<(f64, InstId, NodeId)>,
    /// The cluster's sums once a source has given up an instance.
    base: Vec<Running>,
    /// The estimated score of the best move found to a target other than the
    /// chosen one's (+∞ when there is none).
    other: f64,
}

impl Work {
    fn new(k: usize) -> Work {
        Work {
            exact: vec![0.0; 2 * k],
            estimate: vec![0.0; 2 * k],
            cands: Vec::new(),
            base: vec![Running::default(); k],
            other: f64::INFINITY,
        }
    }
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
    let k = state.components_len();
    let mut front = Frontier::new(state, targets)?.nodes();
    let rises = Rises::new(state, movable)?;
    let mut sorted = Sorted::new(state, &rises, targets);
    let mut on_node: Vec<Vec<InstId>> = vec![Vec::new(); n];
    for &i in movable {
        on_node[state.primary_of(i).index()].push(i);
    }
    // The step in which a move last touched each node.
    let mut touched = vec![u64::MAX; n];
    // Each source's best move when last looked at, and its nodes' values
    // before and after it.
    let mut recorded: Vec<Option<Record>> = vec![None; n];
    let mut rec_vals = vec![0.0; 4 * k * n];
    let (mut heap, mut tops) = fill(
        state,
        &rises,
        &on_node,
        &front,
        rule,
        &mut recorded,
        &mut rec_vals,
        &mut tally,
    );
    // Bumped by every move that touches the node.
    let mut version = vec![0u32; n];
    let mut work = Work::new(k);
    let mut deferred: Vec<Source> = Vec::new();
    let mut shed: Vec<NodeId> = Vec::new();
    // Sources looked at after a move of the step loaded its fronts.
    let mut mid = vec![false; n];
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
            let now = match sorted.as_mut() {
                Some(s) => s.fronts(state, &rises),
                None => Frontier::new(state, targets)?.nodes(),
            };
            let before = std::mem::replace(&mut front, now);
            deferred.extend(heap.drain());
            // A source that gave up load and joined the fronts may be a better
            // target than any an entry recorded.
            let joined: Vec<NodeId> = front.iter().copied().filter(|f| shed.contains(f)).collect();
            shed.clear();
            // Nodes the last step's moves had hidden behind the fronts they loaded:
            // the sources looked at after such a move may prefer them.
            let uncovered: Vec<NodeId> = front
                .iter()
                .copied()
                .filter(|f| joined.contains(f) || before.binary_search(f).is_err())
                .collect();
            let entries: Vec<Source> = deferred
                .drain(..)
                .filter(|e| e.version == version[e.node.index()])
                .collect();
            let view = View {
                state,
                rises: &rises,
                tops: &tops,
                on_node: &on_node,
                records: &recorded,
                rec_vals: &rec_vals,
                version: &version,
                mid: &mid,
                front: &front,
                joined: &joined,
                uncovered: &uncovered,
                rule,
            };
            // On one thread: a step keys about a thousand sources in well under a
            // millisecond, less than waking a second thread for every step costs on a
            // loaded machine, and the core stays free for the manager's API.
            let fresh: Vec<(Source, Option<Box<Looked>>, u64)> =
                entries.iter().map(|e| view.renew(*e, &mut work)).collect();
            let mut keyed = Vec::with_capacity(fresh.len());
            for (e, looked, evaluations) in fresh {
                tally.evaluations += evaluations;
                let a = e.node.index();
                mid[a] = false;
                if let Some(l) = looked {
                    tally.refusals.merge(&l.refusals);
                    if let Some(top) = l.top {
                        tops[a] = Some(top);
                    }
                    recorded[a] = None;
                    if let Some(b) = l.best {
                        record(
                            state,
                            b,
                            &l.exact,
                            l.other,
                            &version,
                            &mut recorded,
                            &mut rec_vals,
                        );
                    }
                }
                keyed.push(e);
            }
            heap = BinaryHeap::from(keyed);
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
        // A source whose recorded target took load this step offers less than
        // its key; a cheap bound says whether it still leads.
        let stale = recorded[a].filter(|r| !src.bounded && r.target != version[r.mv.to.index()]);
        if let Some(rec) = stale {
            let bound = rekeyed(
                state,
                &rises,
                tops[a].as_deref(),
                Some(rec),
                &rec_vals,
                &version,
                &mut work,
                &mut tally,
            );
            if let Some(bound) = bound.filter(|b| *b < src.key) {
                heap.push(Source {
                    key: bound,
                    bounded: true,
                    ..src
                });
                continue;
            }
        }
        let top = tops[a].get_or_insert_with(|| ranked(state, &rises, &on_node[a], &mut tally));
        let found = best_move(state, &rises, top, &front, rule, &mut work, &mut tally);
        recorded[a] = None;
        // Fronts loaded earlier in the step may hide nodes that are better targets
        // now: the next step looks at this source again.
        mid[a] = step_moves > 0;
        let Some(best) = found else {
            // No allowed move from here against this step's fronts.
            deferred.push(Source {
                key: f64::NEG_INFINITY,
                bounded: false,
                ..src
            });
            continue;
        };
        record(
            state,
            best,
            &work.exact,
            work.other,
            &version,
            &mut recorded,
            &mut rec_vals,
        );
        let gain = ini - best.score;
        let src = Source {
            key: gain,
            bounded: false,
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
        shed.push(mv.from);
        if let Some(s) = sorted.as_mut() {
            s.moved(mv.from);
            s.moved(mv.to);
        }
        let from = &mut on_node[a];
        if let Some(p) = from.iter().position(|&i| i == mv.inst) {
            from.swap_remove(p);
        }
        on_node[mv.to.index()].push(mv.inst);
        for node in [mv.from, mv.to] {
            touched[node.index()] = step;
            version[node.index()] += 1;
            tops[node.index()] = None;
            recorded[node.index()] = None;
        }
        // The source offers less now, the target more (it may have had nothing
        // to offer): both are looked at again when popped.
        let again = [
            Source {
                key: gain,
                node: mv.from,
                version: version[a],
                bounded: false,
            },
            Source {
                key: f64::INFINITY,
                node: mv.to,
                version: version[mv.to.index()],
                bounded: false,
            },
        ];
        deferred.extend(again);
        if moves.len().is_multiple_of(64) {
            state.refresh();
        }
    }
    tally.steps += u64::from(step_moves > 0);
    state.refresh();
    Some(tally)
}

/// What the start of a step reads to key an entry again ([`View::renew`]).
struct View<'v, 's, M: Metric + ?Sized> {
    state: &'v State<'s, M>,
    rises: &'v Rises,
    tops: &'v [Option<Vec<InstId>>],
    on_node: &'v [Vec<InstId>],
    records: &'v [Option<Record>],
    rec_vals: &'v [f64],
    version: &'v [u32],
    /// Sources looked at after a move of the last step loaded its fronts.
    mid: &'v [bool],
    front: &'v [NodeId],
    /// Sources of the last step's moves that are on the fronts now.
    joined: &'v [NodeId],
    /// Nodes on the fronts now that were not on the last step's, and `joined`.
    uncovered: &'v [NodeId],
    rule: &'v Rule<'v>,
}

/// A source looked at afresh: its best instances (when they had to be ranked)
/// and best move, with what [`record`] keeps of the look and what it refused.
/// Boxed where it is returned: a step keys every source again and looks at few
/// of them, and the rest would carry its room through the step's collection.
struct Looked {
    top: Option<Vec<InstId>>,
    best: Option<Scored>,
    /// [`Work::exact`] after the look.
    exact: Vec<f64>,
    /// [`Work::other`] after the look.
    other: f64,
    refusals: Refusals,
}

impl<M: Metric + ?Sized> View<'_, '_, M> {
    /// For a source looked at after a move of the last step had loaded the fronts,
    /// keyed `key` from its record: its best estimated move to the nodes the step
    /// uncovered, kept as its record when it beats `key` (a source's values grow
    /// linearly with what runs on it, so the estimate gives the nodes' values after
    /// the move). None when the source needs a look instead: it has no ranked
    /// instances, or one whose moves depend on its disk template.
    fn uncovered_record(
        &self,
        e: Source,
        key: f64,
        bounded: bool,
        work: &mut Work,
        tally: &mut Tally,
    ) -> Option<(Source, Option<Box<Looked>>)> {
        let (state, rises) = (self.state, self.rises);
        let top = self.tops[e.node.index()]
            .as_ref()
            .filter(|t| self.mid[e.node.index()] && t.iter().all(|&i| rises.any(i)))?;
        let ini = state.score();
        let found = estimate(state, rises, top, self.uncovered, work, tally)
            .filter(|(score, _, _)| ini - score > key);
        let Some((score, inst, to)) = found else {
            return Some((Source { key, bounded, ..e }, None));
        };
        let k = state.components_len();
        let from = state.primary_of(inst);
        let mut exact = vec![0.0; 2 * k];
        let (src, dst) = exact.split_at_mut(k);
        for ((s, v), r) in src
            .iter_mut()
            .zip(state.values_of(from))
            .zip(rises.of(inst, from))
        {
            *s = v - r;
        }
        for ((d, v), r) in dst
            .iter_mut()
            .zip(state.values_of(to))
            .zip(rises.of(inst, to))
        {
            *d = v + r;
        }
        // The record's move is the best elsewhere, unless a node the step uncovered
        // beats it too.
        let other = work
            .cands
            .iter()
            .filter(|c| c.2 != to)
            .fold(ini - key, |m, c| m.min(c.0));
        let looked = Looked {
            top: None,
            best: Some(Scored {
                mv: Move { inst, from, to },
                score,
            }),
            exact,
            other,
            refusals: Refusals::default(),
        };
        let e = Source {
            key: ini - score,
            bounded: false,
            ..e
        };
        Some((e, Some(Box::new(looked))))
    }

    /// Entry `e` keyed again from its record ([`rekeyed`]), or looked at afresh
    /// when its record may miss a better target: it was made against fronts that
    /// moves had loaded (nodes they hid may be better targets now), or a source
    /// that gave up load is a better target for it.
    /// Returns the entry, the look if there was one, and the candidates scored.
    fn renew(&self, e: Source, work: &mut Work) -> (Source, Option<Box<Looked>>, u64) {
        let (state, a) = (self.state, e.node.index());
        let mut tally = Tally::default();
        let ini = state.score();
        // A source whose recorded target took load is keyed by its record's bound
        // alone and looked at afresh only if popped: most never are before the
        // next step, and scoring their instances against the target now, for
        // every source at every step, was most of a hard round's work.
        let bound = self.records[a]
            .filter(|r| !self.mid[a] && r.target != self.version[r.mv.to.index()])
            .filter(|_| {
                self.tops[a]
                    .as_ref()
                    .is_some_and(|t| t.iter().all(|&i| self.rises.any(i)))
            })
            .map(|r| {
                tally.evaluations += 1;
                let (gain, grown) = recorded_gain(state, r, self.rec_vals);
                gain.max(r.other * grown)
            });
        let bounded = bound.is_some();
        let key = bound
            .or_else(|| {
                rekeyed(
                    state,
                    self.rises,
                    self.tops[a].as_deref(),
                    self.records[a],
                    self.rec_vals,
                    self.version,
                    work,
                    &mut tally,
                )
            })
            .unwrap_or(e.key);
        if let Some(found) = self.uncovered_record(e, key, bounded, work, &mut tally) {
            return (found.0, found.1, tally.evaluations);
        }
        let better = !self.joined.is_empty()
            && self.tops[a].as_ref().is_some_and(|top| {
                estimate(state, self.rises, top, self.joined, work, &mut tally)
                    .is_some_and(|(score, _, _)| ini - score > key)
            });
        if !self.mid[a] && !better {
            // Keys from records and estimates check no constraint: nothing refused
            // is dropped with the tally.
            debug_assert_eq!(tally.refusals, Refusals::default());
            return (Source { key, bounded, ..e }, None, tally.evaluations);
        }
        let ranked_now = match &self.tops[a] {
            Some(_) => None,
            None => Some(ranked(state, self.rises, &self.on_node[a], &mut tally)),
        };
        let top = ranked_now
            .as_deref()
            .or(self.tops[a].as_deref())
            .unwrap_or(&[]);
        let best = best_move(
            state, self.rises, top, self.front, self.rule, work, &mut tally,
        );
        let e = Source {
            key: best.map_or(f64::NEG_INFINITY, |b| ini - b.score),
            bounded: false,
            ..e
        };
        // Only a look's best move refuses candidates.
        let looked = Looked {
            top: ranked_now,
            best,
            exact: work.exact.clone(),
            other: work.other,
            refusals: tally.refusals,
        };
        (e, Some(Box::new(looked)), tally.evaluations)
    }
}

/// Keeps `best` (from [`best_move`], which left `exact` and `other` in its
/// [`Work`]) as its source's record, with the values of its nodes before and
/// after it, for [`rekeyed`].
fn record<M: Metric + ?Sized>(
    state: &State<'_, M>,
    best: Scored,
    exact: &[f64],
    other: f64,
    version: &[u32],
    records: &mut [Option<Record>],
    rec_vals: &mut [f64],
) {
    let (mv, k, ini) = (best.mv, state.components_len(), state.score());
    let a = mv.from.index();
    let r = &mut rec_vals[a * 4 * k..(a + 1) * 4 * k];
    r[..k].copy_from_slice(state.values_of(mv.from));
    r[k..2 * k].copy_from_slice(state.values_of(mv.to));
    r[2 * k..].copy_from_slice(&exact[..2 * k]);
    records[a] = Some(Record {
        mv,
        target: version[mv.to.index()],
        gain: ini - best.score,
        other: ini - other,
    });
}

/// What a source whose node has not changed offers now, from its record (None
/// without one). A recorded move whose target has not changed either is scored
/// exactly under the cluster's sums now. When the target has changed, the best
/// the source can offer is at most the better of its best instances' moves to
/// that target as it is now and its best move elsewhere then (other targets
/// only took load or stayed as they were), grown as the recorded move's gain
/// grew since.
#[allow(clippy::too_many_arguments)]
fn rekeyed<M: Metric + ?Sized>(
    state: &State<'_, M>,
    rises: &Rises,
    top: Option<&[InstId]>,
    rec: Option<Record>,
    rec_vals: &[f64],
    version: &[u32],
    work: &mut Work,
    tally: &mut Tally,
) -> Option<f64> {
    let rec = rec?;
    let ini = state.score();
    let mv = rec.mv;
    tally.evaluations += 1;
    let (gain, grown) = recorded_gain(state, rec, rec_vals);
    if rec.target == version[mv.to.index()] {
        return Some(gain);
    }
    let top = top?;
    if !top.iter().all(|&i| rises.any(i)) {
        return None;
    }
    let to = estimate(state, rises, top, &[mv.to], work, tally)
        .map_or(f64::NEG_INFINITY, |(score, _, _)| ini - score);
    Some(to.max(rec.other * grown))
}

/// The gain now of a record's move with its nodes' recorded values (exact while
/// its target has not changed, at least the move's gain once the target took
/// load), and how much that gain grew since it was recorded (at least 1).
fn recorded_gain<M: Metric + ?Sized>(
    state: &State<'_, M>,
    rec: Record,
    rec_vals: &[f64],
) -> (f64, f64) {
    let k = state.components_len();
    let mv = rec.mv;
    let a = mv.from.index();
    let r = &rec_vals[a * 4 * k..(a + 1) * 4 * k];
    let gain = state.score() - state.score_recorded(mv.from, mv.to, &r[..2 * k], &r[2 * k..]);
    let grown = if rec.gain > 0.0 {
        (gain / rec.gain).max(1.0)
    } else {
        1.0
    };
    (gain, grown)
}

/// Every node's entry, keyed by its best move now, and its best instances by
/// removal (in parallel).
#[allow(clippy::too_many_arguments)]
fn fill<M: Metric + ?Sized>(
    state: &State<'_, M>,
    rises: &Rises,
    on_node: &[Vec<InstId>],
    front: &[NodeId],
    rule: &Rule<'_>,
    recorded: &mut [Option<Record>],
    rec_vals: &mut [f64],
    tally: &mut Tally,
) -> (BinaryHeap<Source>, Vec<Option<Vec<InstId>>>) {
    let k = state.components_len();
    let ini = state.score();
    let found: Vec<(Option<Scored>, Work, Vec<InstId>, Tally)> = on_node
        .par_iter()
        .with_min_len(16)
        .map_init(
            || Work::new(k),
            |work, insts| {
                let mut t = Tally::default();
                let top = ranked(state, rises, insts, &mut t);
                let best = best_move(state, rises, &top, front, rule, work, &mut t);
                let mut w = Work::new(k);
                w.exact.copy_from_slice(&work.exact);
                w.other = work.other;
                (best, w, top, t)
            },
        )
        .collect();
    let mut tops = Vec::with_capacity(found.len());
    let mut heap = BinaryHeap::new();
    let version = vec![0; on_node.len()];
    for (a, (best, work, top, t)) in found.into_iter().enumerate() {
        tally.refusals.merge(&t.refusals);
        tally.evaluations += t.evaluations;
        tops.push(Some(top));
        if let Some(b) = best {
            record(
                state,
                b,
                &work.exact,
                work.other,
                &version,
                recorded,
                rec_vals,
            );
            heap.push(Source {
                key: ini - b.score,
                node: NodeId::from_index(a),
                version: 0,
                bounded: false,
            });
        }
    }
    (heap, tops)
}

/// The [`INSTANCES_PER_SOURCE`] of `insts` (all on one node) whose removal lowers
/// the score most, best first.
fn ranked<M: Metric + ?Sized>(
    state: &State<'_, M>,
    rises: &Rises,
    insts: &[InstId],
    tally: &mut Tally,
) -> Vec<InstId> {
    let k = state.components_len();
    let mut vals = vec![0.0; k];
    let mut ranked: Vec<(f64, InstId)> = insts
        .iter()
        .map(|&i| {
            let score = if rises.any(i) {
                let a = state.primary_of(i);
                for ((v, now), r) in vals.iter_mut().zip(state.values_of(a)).zip(rises.of(i, a)) {
                    *v = now - r;
                }
                state.score_node_values(a, &vals)
            } else {
                state.removal_score(i, &mut vals)
            };
            (score, i)
        })
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

/// Fills `work.cands` with every move of one of `top` to one of `targets` (or,
/// for DRBD, to its secondary) and its estimated score, constraints unchecked;
/// returns the best.
fn estimate<M: Metric + ?Sized>(
    state: &State<'_, M>,
    rises: &Rises,
    top: &[InstId],
    targets: &[NodeId],
    work: &mut Work,
    tally: &mut Tally,
) -> Option<(f64, InstId, NodeId)> {
    let k = state.components_len();
    work.cands.clear();
    let (src, dst) = work.estimate.split_at_mut(k);
    for &inst in top {
        let from = state.primary_of(inst);
        let mobility = if rises.any(inst) {
            Mobility::AnyNode
        } else {
            state.mobility(inst)
        };
        match mobility {
            Mobility::Immovable => {}
            Mobility::SecondaryOnly(s) => {
                let e = state.evaluate(inst, s);
                tally.evaluations += 1;
                work.cands.push((e.score, inst, s));
            }
            Mobility::AnyNode => {
                for ((s, v), r) in src
                    .iter_mut()
                    .zip(state.values_of(from))
                    .zip(rises.of(inst, from))
                {
                    *s = v - r;
                }
                state.shifted(from, src, &mut work.base);
                for &to in targets {
                    if to == from {
                        continue;
                    }
                    for ((d, v), r) in dst
                        .iter_mut()
                        .zip(state.values_of(to))
                        .zip(rises.of(inst, to))
                    {
                        *d = v + r;
                    }
                    tally.evaluations += 1;
                    work.cands
                        .push((state.score_shifted(&work.base, to, dst), inst, to));
                }
            }
        }
    }
    work.cands
        .iter()
        .copied()
        .min_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)))
}

/// The best allowed move of one of `top` (instances of one node, from [`ranked`])
/// to a front node (or, for DRBD, to its secondary): candidates in order of their
/// estimated score, the first whose constraints hold scored exactly, with the
/// values it leaves in `work.exact`.
fn best_move<M: Metric + ?Sized>(
    state: &State<'_, M>,
    rises: &Rises,
    top: &[InstId],
    front: &[NodeId],
    rule: &Rule<'_>,
    work: &mut Work,
    tally: &mut Tally,
) -> Option<Scored> {
    let k = state.components_len();
    estimate(state, rises, top, front, work, tally)?;
    loop {
        let (at, &(_, inst, to)) =
            work.cands.iter().enumerate().min_by(|(_, x), (_, y)| {
                x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2))
            })?;
        work.cands.swap_remove(at);
        let (src, dst) = work.exact.split_at_mut(k);
        let from_load = state.source_after(inst, to, src);
        match state.try_move(inst, to, rule.n_plus_one, &from_load, src, dst) {
            Err(r) => tally.refusals.add(r),
            Ok(score) => {
                work.other = work
                    .cands
                    .iter()
                    .filter(|c| c.2 != to)
                    .fold(f64::INFINITY, |m, c| m.min(c.0));
                return Some(Scored {
                    mv: Move {
                        inst,
                        from: state.primary_of(inst),
                        to,
                    },
                    score,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tern_model::NodeId;

    use super::*;
    use crate::metric::spread::Spread;

    proptest! {
        /// The two-component fronts found from the box their ends span are the
        /// fronts `bound` finds by sorting every node, nodes of several sizes and
        /// ties included.
        #[test]
        fn fronts_from_the_box_are_bounds_fronts(
            seed in 0u64..1000, nodes in 2usize..60, per_node in 0usize..6, sizes in 1usize..4,
        ) {
            let mut c = crate::synth::unbalanced(nodes, nodes * per_node, seed);
            for (i, n) in c.nodes.iter_mut().enumerate() {
                n.pcpus = 8.0 * (1 + i % sizes) as f64;
                n.total_mem = 65536.0 * (1 + i % sizes) as f64;
            }
            let state = State::new(&c, &Spread);
            let movable: Vec<InstId> = c.instance_ids().collect();
            let targets: Vec<NodeId> = c.node_ids().filter(|&n| !c.node(n).offline).collect();
            let rises = Rises::new(&state, &movable).unwrap();
            let want = Frontier::new(&state, &targets).unwrap().nodes();
            let mut sorted = Sorted::new(&state, &rises, &targets).unwrap();
            prop_assert_eq!(sorted.fronts(&state, &rises), want);
        }

        /// The order kept across moves gives the fronts `bound` finds afresh.
        #[test]
        fn fronts_kept_across_moves_are_bounds_fronts(
            seed in 0u64..1000, nodes in 2usize..40, per_node in 1usize..6,
            moves in proptest::collection::vec((0usize..1000, 0usize..1000), 1..40),
            every in 1usize..5,
        ) {
            let c = crate::synth::unbalanced(nodes, nodes * per_node, seed);
            let mut state = State::new(&c, &Spread);
            let movable: Vec<InstId> = c.instance_ids().collect();
            let targets: Vec<NodeId> = c.node_ids().filter(|&n| !c.node(n).offline).collect();
            let rises = Rises::new(&state, &movable).unwrap();
            let mut sorted = Sorted::new(&state, &rises, &targets).unwrap();
            for (i, (inst, to)) in moves.into_iter().enumerate() {
                let inst = movable[inst % movable.len()];
                let to = targets[to % targets.len()];
                let from = state.primary_of(inst);
                if from == to || state.mobility(inst) != Mobility::AnyNode {
                    continue;
                }
                state.apply(Move { inst, from, to });
                sorted.moved(from);
                sorted.moved(to);
                if i % every == 0 {
                    let want = Frontier::new(&state, &targets).unwrap().nodes();
                    prop_assert_eq!(sorted.fronts(&state, &rises), want);
                }
            }
            let want = Frontier::new(&state, &targets).unwrap().nodes();
            prop_assert_eq!(sorted.fronts(&state, &rises), want);
        }
    }
}
