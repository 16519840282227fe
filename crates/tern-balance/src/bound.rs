//! The best score any single move of an instance can reach, found without scoring
//! every target, for metrics whose node values grow linearly with what runs on a
//! node ([`Metric::scales`]).
//!
//! Nodes with equal scales form a class: an instance joining any of them raises
//! their values by the same amounts. The score after moving a given instance to a
//! node of a class then only grows with that node's current values (a standard
//! deviation's sum of squares grows with them, a sum ignores them), so the
//! instance's best target in the class lies on the class's front: the nodes that no
//! other node of the class undercuts in every component. A front is a handful of
//! nodes where a class has hundreds. Scoring an instance against the fronts gives
//! the lowest score its move can reach anywhere, constraints ignored: a lower
//! bound on what scoring every pair would find. The planner uses it to prove that
//! no acceptable move exists, and to score every target only for the instances
//! whose bound leaves room for one.

use tern_model::{InstId, Mobility, NodeId};

use crate::metric::Metric;
use crate::state::State;

/// The fronts of every class of target nodes, for one placement.
#[derive(Clone, Debug)]
pub struct Frontier {
    classes: Vec<Class>,
    /// Rounding allowance: a bound is computed along another path than the
    /// planner's exact scores (a node's values plus an instance's rise, instead
    /// of the values of the summed load), so the two may differ in the last bits,
    /// which a standard deviation near zero magnifies to about their square root.
    slack: f64,
}

#[derive(Clone, Debug)]
struct Class {
    /// A member, to measure how much an instance raises the class's values.
    probe: NodeId,
    /// Members that no other member undercuts in every component.
    first: Vec<NodeId>,
    /// The same among the other members: an instance running on a node of the
    /// first front cannot move onto it, and the nodes only that node undercut
    /// are on this one.
    second: Vec<NodeId>,
}

impl Frontier {
    /// The fronts over `targets` (online nodes), or None when the metric has no
    /// scales or counts a component over pairs (not a function of node values).
    pub fn new<M: Metric + ?Sized>(state: &State<'_, M>, targets: &[NodeId]) -> Option<Frontier> {
        let metric = state.metric;
        if metric.pair_component().is_some() {
            return None;
        }
        let k = state.components_len();
        let mut scales = vec![0.0; k];
        let mut keys: Vec<Vec<u64>> = Vec::new();
        let mut members: Vec<Vec<NodeId>> = Vec::new();
        for &n in targets {
            if !metric.scales(state.cluster, n, &mut scales) {
                return None;
            }
            let key: Vec<u64> = scales.iter().map(|x| x.to_bits()).collect();
            match keys.iter().position(|x| *x == key) {
                Some(c) => members[c].push(n),
                None => {
                    keys.push(key);
                    members.push(vec![n]);
                }
            }
        }
        let classes = members
            .into_iter()
            .map(|nodes| {
                let probe = nodes[0];
                let (first, rest) = front(state, nodes);
                let (second, _) = front(state, rest);
                Class {
                    probe,
                    first,
                    second,
                }
            })
            .collect();
        let mut largest = vec![0.0f64; k];
        for n in 0..state.node_count() {
            for (m, v) in largest
                .iter_mut()
                .zip(state.values_of(NodeId::from_index(n)))
            {
                *m = m.max(v.abs());
            }
        }
        let slack = 1e-12
            + 1e-6
                * metric
                    .components()
                    .iter()
                    .zip(&largest)
                    .map(|(c, m)| c.weight.abs() * m)
                    .sum::<f64>();
        Some(Frontier { classes, slack })
    }

    /// Every node on a first or second front, in order: the only targets an
    /// instance's best move can have, constraints aside.
    pub fn nodes(&self) -> Vec<NodeId> {
        let mut v: Vec<NodeId> = self
            .classes
            .iter()
            .flat_map(|c| c.first.iter().chain(&c.second).copied())
            .collect();
        v.sort_unstable();
        v
    }

    /// Targets scored per instance, at most: what a bound costs against the
    /// targets an exhaustive scan scores.
    pub fn width(&self) -> usize {
        self.classes
            .iter()
            .map(|c| 1 + c.first.len() + c.second.len())
            .sum()
    }

    /// A score no move of `inst` to any target can beat, with the number of
    /// moves scored to find it. `scratch` holds three times the metric's
    /// component count. Immovable instances get +∞; an instance whose arrival
    /// would lower some node value (a negative demand) gets −∞, no bound.
    pub fn lower_bound<M: Metric + ?Sized>(
        &self,
        state: &State<'_, M>,
        inst: InstId,
        scratch: &mut [f64],
    ) -> (f64, u64) {
        let k = state.components_len();
        let (src, rest) = scratch.split_at_mut(k);
        let (rise, to_vals) = rest.split_at_mut(k);
        let a = state.primary_of(inst);
        let best = match state.mobility(inst) {
            Mobility::Immovable => return (f64::INFINITY, 0),
            Mobility::SecondaryOnly(s) => {
                let from_load = state.source_after(inst, s, src);
                let e = state.evaluate_with_source(inst, s, &from_load, src, to_vals);
                return (e.score - self.slack, 1);
            }
            Mobility::AnyNode => {
                state.source_after(inst, a, src);
                let mut best = f64::INFINITY;
                let mut scored = 0;
                for c in &self.classes {
                    let load = state.load_after_in(inst, c.probe);
                    state
                        .metric
                        .node_values(state.cluster, c.probe, &load, to_vals);
                    scored += 1;
                    for ((r, new), old) in
                        rise.iter_mut().zip(&*to_vals).zip(state.values_of(c.probe))
                    {
                        *r = new - old;
                        // A fall (or NaN) breaks the ordering the fronts rely on.
                        if r.is_nan() || *r < 0.0 {
                            return (f64::NEG_INFINITY, scored);
                        }
                    }
                    let second: &[NodeId] = if c.first.contains(&a) { &c.second } else { &[] };
                    for &b in c.first.iter().chain(second) {
                        if b == a {
                            continue;
                        }
                        for ((t, r), v) in to_vals.iter_mut().zip(&*rise).zip(state.values_of(b)) {
                            *t = v + r;
                        }
                        best = best.min(state.score_values(inst, b, src, to_vals));
                        scored += 1;
                    }
                }
                (best, scored)
            }
        };
        if best.0.is_nan() {
            (f64::NEG_INFINITY, best.1)
        } else {
            (best.0 - self.slack, best.1)
        }
    }
}

/// Splits `nodes` into a front (no other node weakly undercuts a front node in
/// every component, duplicates aside) and the rest, each of which some front
/// node weakly undercuts.
fn front<M: Metric + ?Sized>(
    state: &State<'_, M>,
    mut nodes: Vec<NodeId>,
) -> (Vec<NodeId>, Vec<NodeId>) {
    let vals = |n: NodeId| state.values_of(n);
    // In lexicographic order a node can only be undercut by one before it.
    nodes.sort_by(|&x, &y| {
        vals(x)
            .iter()
            .zip(vals(y))
            .map(|(a, b)| a.total_cmp(b))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(x.cmp(&y))
    });
    let mut first: Vec<NodeId> = Vec::new();
    let mut rest = Vec::new();
    for n in nodes {
        let undercut = first
            .iter()
            .any(|&f| vals(f).iter().zip(vals(n)).all(|(a, b)| a <= b));
        if undercut {
            rest.push(n);
        } else {
            first.push(n);
        }
    }
    (first, rest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metric::spread::Spread;

    /// Eight nodes of one size; node loads chosen so the front is known.
    fn cluster() -> tern_model::Cluster {
        let mut c = crate::synth::unbalanced(8, 16, 7);
        for n in &mut c.nodes {
            n.total_mem = 1000.0;
            n.pcpus = 10.0;
            n.free_mem = 900;
        }
        // (node, cpu, mem) per instance, two instances per node.
        for (j, inst) in c.instances.iter_mut().enumerate() {
            let node = j / 2;
            inst.primary = NodeId::from_index(node);
            inst.mem = 50;
            inst.demand.mem_used_mib = [40.0, 10.0, 30.0, 20.0, 50.0, 60.0, 70.0, 80.0][node];
            inst.demand.cpu_cores = [1.0, 3.0, 2.0, 2.5, 4.0, 0.5, 3.0, 3.5][node];
        }
        c
    }

    #[test]
    fn front_keeps_the_nodes_nothing_undercuts() {
        let c = cluster();
        let state = State::new(&c, &Spread);
        let all: Vec<NodeId> = c.node_ids().collect();
        let (first, rest) = front(&state, all);
        // CPU, memory per node: 0:(.2,.08) 1:(.6,.02) 2:(.4,.06) 3:(.5,.04)
        // 4:(.8,.1) 5:(.1,.12) 6:(.6,.14) 7:(.7,.16).
        let ids = |v: &[NodeId]| v.iter().map(|n| n.index()).collect::<Vec<_>>();
        assert_eq!(ids(&first), vec![5, 0, 2, 3, 1]);
        let (second, _) = front(&state, rest);
        assert_eq!(ids(&second), vec![6, 4]);
    }

    #[test]
    fn bound_equals_the_best_unconstrained_move() {
        let c = cluster();
        let state = State::new(&c, &Spread);
        let targets: Vec<NodeId> = c.node_ids().collect();
        let f = Frontier::new(&state, &targets).unwrap();
        let mut scratch = vec![0.0; 6];
        for i in c.instance_ids() {
            let (lb, _) = f.lower_bound(&state, i, &mut scratch);
            let best = targets
                .iter()
                .filter(|&&t| t != state.primary_of(i))
                .map(|&t| state.evaluate(i, t).score)
                .fold(f64::INFINITY, f64::min);
            assert!(lb <= best, "{i:?}: bound {lb} above best {best}");
            assert!(best - lb < 1e-5, "{i:?}: bound {lb} far below best {best}");
        }
    }
}
