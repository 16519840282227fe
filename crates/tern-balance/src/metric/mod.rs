//! Cluster scores (lower is better) in a form the planner can update incrementally.
//!
//! A metric turns each node's [`NodeLoad`] into a short vector of component values;
//! each component is aggregated across nodes by a population standard deviation or a
//! sum and multiplied by its weight. Because both aggregates only need running Σx and
//! Σx² per component, a candidate move that touches two nodes is scored in O(K)
//! without looking at the rest of the cluster ([`Stats`]).
//!
//! Metrics: [`spread`] (CPU and memory utilisation, for the live balancer and the
//! simulator) and [`ganeti`] (Ganeti's cluster score, exactly as `hinfo` prints it,
//! so plans are comparable with `hbal`'s).
//!
//! Two of Ganeti's terms are not functions of one node's load: the location score
//! depends on where an instance's DRBD peer sits ([`Metric::location`], kept per
//! node in [`NodeLoad::location`]) and the location-exclusion score counts
//! (failure domain, tag) pairs across the cluster ([`Metric::pair_component`],
//! counted by the planner's state).

pub mod ganeti;
pub mod spread;

use tern_model::{Cluster, DynUtil, InstId, NodeId};

/// How one component's per-node values become one number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Aggregate {
    /// Population standard deviation over the nodes the component counts.
    StdDev,
    /// Plain sum.
    Sum,
}

/// Which nodes a component counts: Ganeti scores most things over online nodes
/// but penalises instances left on offline ones separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Over {
    Online,
    Offline,
}

/// One named, weighted term of a score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Component {
    pub name: &'static str,
    pub weight: f64,
    pub aggregate: Aggregate,
    pub over: Over,
}

/// What sits on a node, as far as any metric cares: the running sums the planner
/// keeps up to date while it moves instances. All fields change only through
/// [`NodeLoad::add_primary`]/[`NodeLoad::remove_primary`] and the DRBD swap.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NodeLoad {
    /// Ganeti's free memory (MiB): the node's reported free memory, adjusted as
    /// memory-holding primaries leave or arrive.
    pub free_mem: f64,
    /// Like `free_mem` but also counting forthcoming instances.
    pub free_mem_forth: f64,
    /// Virtual CPUs of online primaries.
    pub vcpus: f64,
    pub vcpus_forth: f64,
    /// Summed dynamic utilisation of primaries.
    pub util: DynUtil,
    pub primaries: u32,
    pub secondaries: u32,
    /// Memory the node must hold back to take over its DRBD peers (Ganeti's rMem).
    pub reserved_mem: f64,
    /// Primaries sharing an exclusion tag with another primary (Ganeti's
    /// conflicting primaries).
    pub tag_conflicts: u32,
    /// Measured CPU demand of primaries, cores (falls back to vCPUs, see `spread`).
    pub cpu_demand: f64,
    /// Measured memory in use of primaries, MiB (falls back to configured memory).
    pub mem_demand: f64,
    /// Sum of [`Metric::location`] over the node's primaries.
    pub location: f64,
    /// Whether an instance has moved on or off the node: Ganeti judges N+1 by
    /// the reported free memory until then, by its own count after.
    pub touched: bool,
}

/// A component counted over (node key, instance key) pairs instead of per node:
/// each pair held by the primaries of online nodes adds (count − 1). Ganeti's
/// location-exclusion score, with failure domains as node keys and exclusion
/// tags as instance keys.
#[derive(Clone, Copy, Debug)]
pub struct PairComponent<'a> {
    /// Index of the component in [`Metric::components`]; its node values are 0.
    pub index: usize,
    /// Per node: its keys.
    pub node_keys: &'a [Vec<u32>],
    /// Per instance: its keys (repeats count).
    pub inst_keys: &'a [Vec<u32>],
}

/// A cluster score the planner can update incrementally.
///
/// `node_values` must be a pure function of the node's static description and its
/// load, so the score of any placement is fixed by the loads alone.
pub trait Metric: Sync {
    /// Short name used on the command line (`ganeti`, `spread`).
    fn name(&self) -> &'static str;
    /// The components, in the order `node_values` writes them.
    fn components(&self) -> &[Component];
    /// Writes node `node`'s component values into `out` (`out.len()` equals the
    /// number of components). `cluster` gives the node's static fields.
    fn node_values(&self, cluster: &Cluster, node: NodeId, load: &NodeLoad, out: &mut [f64]);
    /// What `inst` adds to [`NodeLoad::location`] while it runs on `node` with
    /// `secondary` as its DRBD peer (Ganeti's failure-domain penalties).
    fn location(&self, _inst: InstId, _node: NodeId, _secondary: Option<NodeId>) -> f64 {
        0.0
    }
    /// The component that is counted over pairs, if the metric has one.
    fn pair_component(&self) -> Option<PairComponent<'_>> {
        None
    }
    /// For a metric whose every node value is a per-node factor times the sum, over
    /// the node's primaries, of a nonnegative per-instance amount: writes node
    /// `node`'s factors into `out` and returns true. The same instance then raises
    /// two nodes with equal factors by the same amounts, which lets the planner
    /// bound the best move without scoring every target ([`crate::bound`]).
    /// Metrics without that shape keep the default, false.
    fn scales(&self, _cluster: &Cluster, _node: NodeId, _out: &mut [f64]) -> bool {
        false
    }
}

/// Running sums of one component over the nodes it counts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Running {
    pub n: f64,
    pub sum: f64,
    pub sum_sq: f64,
}

impl Running {
    #[inline]
    fn value(&self, aggregate: Aggregate) -> f64 {
        match aggregate {
            Aggregate::Sum => self.sum,
            Aggregate::StdDev => {
                if self.n == 0.0 {
                    return 0.0;
                }
                let mean = self.sum / self.n;
                (self.sum_sq / self.n - mean * mean).max(0.0).sqrt()
            }
        }
    }
}

/// Per-component running sums for a whole cluster, and the score they give.
///
/// Each component's weighted value is cached, so scoring a change recomputes only
/// the components whose values the change touches.
#[derive(Clone, Debug, PartialEq)]
pub struct Stats {
    comps: Vec<Component>,
    running: Vec<Running>,
    weighted: Vec<f64>,
    total: f64,
}

impl Stats {
    /// Builds the sums from every node's values (`values[node]` has one entry per
    /// component) and online flags.
    pub fn new(comps: &[Component], values: &[Vec<f64>], online: &[bool]) -> Stats {
        let mut running = vec![Running::default(); comps.len()];
        for (vals, &on) in values.iter().zip(online) {
            for (k, c) in comps.iter().enumerate() {
                if counts(c.over, on) {
                    let r = &mut running[k];
                    r.n += 1.0;
                    r.sum += vals[k];
                    r.sum_sq += vals[k] * vals[k];
                }
            }
        }
        let mut s = Stats {
            comps: comps.to_vec(),
            running,
            weighted: vec![0.0; comps.len()],
            total: 0.0,
        };
        s.recache();
        s
    }

    fn recache(&mut self) {
        for (k, c) in self.comps.iter().enumerate() {
            self.weighted[k] = c.weight * self.running[k].value(c.aggregate);
        }
        self.total = self.weighted.iter().sum();
    }

    pub fn score(&self) -> f64 {
        self.total
    }

    /// Each component's name, weight and aggregated value (unweighted).
    pub fn breakdown(&self) -> Vec<(&'static str, f64, f64)> {
        self.comps
            .iter()
            .zip(&self.running)
            .map(|(c, r)| (c.name, c.weight, r.value(c.aggregate)))
            .collect()
    }

    /// The score if the given nodes' values changed from `old` to `new`.
    /// `changes` holds `(online, old, new)` per touched node.
    pub fn score_with(&self, changes: &[(bool, &[f64], &[f64])]) -> f64 {
        let mut total = self.total;
        for (k, c) in self.comps.iter().enumerate() {
            let mut r = self.running[k];
            let mut moved = false;
            for &(on, old, new) in changes {
                if counts(c.over, on) && new[k] != old[k] {
                    r.sum += new[k] - old[k];
                    r.sum_sq += new[k] * new[k] - old[k] * old[k];
                    moved = true;
                }
            }
            if moved {
                total += c.weight * r.value(c.aggregate) - self.weighted[k];
            }
        }
        total
    }

    /// The running sums once one node's values change from `old` to `new`, into
    /// `out` (one per component): the part that many candidate moves from one
    /// source share, each then scored by [`Stats::score_shifted`].
    #[inline]
    pub fn shifted(&self, online: bool, old: &[f64], new: &[f64], out: &mut [Running]) {
        for (k, (c, o)) in self.comps.iter().zip(out.iter_mut()).enumerate() {
            *o = self.running[k];
            if counts(c.over, online) {
                o.sum += new[k] - old[k];
                o.sum_sq += new[k] * new[k] - old[k] * old[k];
            }
        }
    }

    /// The score from the sums `base` ([`Stats::shifted`]) once another node's
    /// values change from `old` to `new`. Summed afresh rather than from the
    /// cached total, so it may differ from [`Stats::score_with`] in the last bits.
    #[inline]
    pub fn score_shifted(&self, base: &[Running], online: bool, old: &[f64], new: &[f64]) -> f64 {
        let mut total = 0.0;
        for (k, (c, b)) in self.comps.iter().zip(base).enumerate() {
            let mut r = *b;
            if counts(c.over, online) {
                r.sum += new[k] - old[k];
                r.sum_sq += new[k] * new[k] - old[k] * old[k];
            }
            total += c.weight * r.value(c.aggregate);
        }
        total
    }

    /// Commits a change that [`Stats::score_with`] evaluated.
    pub fn apply(&mut self, changes: &[(bool, &[f64], &[f64])]) {
        for (k, c) in self.comps.iter().enumerate() {
            let r = &mut self.running[k];
            for &(on, old, new) in changes {
                if counts(c.over, on) {
                    r.sum += new[k] - old[k];
                    r.sum_sq += new[k] * new[k] - old[k] * old[k];
                }
            }
        }
        self.recache();
    }
}

fn counts(over: Over, online: bool) -> bool {
    match over {
        Over::Online => online,
        Over::Offline => !online,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SD: Component = Component {
        name: "x",
        weight: 2.0,
        aggregate: Aggregate::StdDev,
        over: Over::Online,
    };

    #[test]
    fn stddev_is_population_and_weighted() {
        let values = vec![vec![1.0], vec![3.0], vec![100.0]];
        let s = Stats::new(&[SD], &values, &[true, true, false]);
        assert!((s.score() - 2.0).abs() < 1e-12);
    }

    #[test]
    fn incremental_matches_rebuild() {
        let values = vec![vec![1.0], vec![3.0], vec![8.0]];
        let mut s = Stats::new(&[SD], &values, &[true; 3]);
        let (old, new) = ([8.0], [4.0]);
        let (old1, new1) = ([1.0], [5.0]);
        let changes = [(true, &old[..], &new[..]), (true, &old1[..], &new1[..])];
        let predicted = s.score_with(&changes);
        s.apply(&changes);
        let rebuilt = Stats::new(&[SD], &[vec![5.0], vec![3.0], vec![4.0]], &[true; 3]);
        assert!((predicted - rebuilt.score()).abs() < 1e-12);
        assert!((s.score() - rebuilt.score()).abs() < 1e-12);
    }
}
