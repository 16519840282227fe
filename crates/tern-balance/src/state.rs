//! The planner's working copy of a cluster: where each instance runs, each node's
//! [`NodeLoad`], each node's component values and the running sums of the score.
//!
//! Scoring a candidate move rebuilds only the two nodes it touches
//! ([`State::evaluate`]); applying it updates them in place ([`State::apply`]).

use std::collections::HashMap;

use tern_model::{Cluster, DiskTemplate, InstId, Mobility, Move, NodeId};

use crate::metric::ganeti::{not_offline, uses_memory};
use crate::metric::{Metric, NodeLoad, PairComponent, Running, Stats};

/// Scores a cluster from scratch with `metric` (no incremental state kept).
pub fn score<M: Metric + ?Sized>(cluster: &Cluster, metric: &M) -> f64 {
    State::new(cluster, metric).score()
}

/// Exclusion-tag multiset of one node's primaries: `(tag index, count)`.
type TagCounts = Vec<(u32, u32)>;
/// DRBD peers of one node: `(primary node, memory of its instances mirrored here)`.
type Peers = Vec<(u32, f64)>;

/// A placement being improved, with everything needed to score a move in O(K).
#[derive(Clone)]
pub struct State<'a, M: Metric + ?Sized> {
    pub(crate) cluster: &'a Cluster,
    pub(crate) metric: &'a M,
    pub(crate) primary: Vec<NodeId>,
    pub(crate) secondary: Vec<Option<NodeId>>,
    pub(crate) loads: Vec<NodeLoad>,
    pub(crate) online: Vec<bool>,
    /// Node-major component values, `k` per node.
    values: Vec<f64>,
    k: usize,
    stats: Stats,
    /// Exclusion tags of each instance, as indices into one tag table.
    pub(crate) excl_tags: Vec<Vec<u32>>,
    tags: Vec<TagCounts>,
    peers: Vec<Peers>,
    /// Virtual CPUs per physical CPU a node admits (its group's policy).
    pub(crate) vcpu_ratio: Vec<f64>,
    /// Each node's free memory in the snapshot, to report it after moves.
    start_free_mem: Vec<f64>,
    /// The metric's pair-counted component, if any, with its counts.
    pairs: Option<Pairs<'a>>,
}

/// Running counts of a [`PairComponent`] over the primaries of online nodes.
#[derive(Clone)]
struct Pairs<'a> {
    spec: PairComponent<'a>,
    weight: f64,
    counts: HashMap<(u32, u32), i64>,
    /// Σ (count − 1) over the pairs held: the component's value.
    excess: i64,
}

impl Pairs<'_> {
    /// How the component's value changes if `inst` leaves `from` (when
    /// `Some`) and joins `to` (when `Some`); online flags decide what counts.
    fn delta(&self, inst: InstId, from: Option<usize>, to: Option<usize>) -> i64 {
        let tags = &self.spec.inst_keys[inst.index()];
        if tags.is_empty() {
            return 0;
        }
        // Pending changes to counts, so repeated tags and shared domains add up.
        let mut pending: Vec<((u32, u32), i64)> = Vec::new();
        let mut d = 0;
        let mut step = |key: (u32, u32), by: i64| {
            let held = self.counts.get(&key).copied().unwrap_or(0);
            let p = match pending.iter_mut().find(|(k, _)| *k == key) {
                Some((_, p)) => p,
                None => {
                    pending.push((key, 0));
                    &mut pending.last_mut().unwrap().1
                }
            };
            let before = held + *p;
            *p += by;
            d += (before + by - 1).max(0) - (before - 1).max(0);
        };
        for (node, by) in [(from, -1), (to, 1)] {
            let Some(node) = node else { continue };
            for &loc in &self.spec.node_keys[node] {
                for &t in tags {
                    step((loc, t), by);
                }
            }
        }
        d
    }

    fn apply(&mut self, inst: InstId, from: Option<usize>, to: Option<usize>) {
        self.excess += self.delta(inst, from, to);
        for (node, by) in [(from, -1), (to, 1)] {
            let Some(node) = node else { continue };
            for &loc in &self.spec.node_keys[node] {
                for &t in &self.spec.inst_keys[inst.index()] {
                    *self.counts.entry((loc, t)).or_default() += by;
                }
            }
        }
    }

    fn value(&self) -> f64 {
        self.weight * self.excess as f64
    }
}

/// A candidate move's effect: the touched nodes' new loads and the new score.
#[derive(Clone, Copy, Debug)]
pub struct Evaluation {
    pub score: f64,
    pub from_load: NodeLoad,
    pub to_load: NodeLoad,
}

impl<'a, M: Metric + ?Sized> State<'a, M> {
    /// Loads `cluster` as it stands.
    pub fn new(cluster: &'a Cluster, metric: &'a M) -> Self {
        let n = cluster.nodes.len();
        let prefixes = exclusion_prefixes(cluster);
        let mut tag_table: Vec<String> = Vec::new();
        let excl_tags: Vec<Vec<u32>> = cluster
            .instances
            .iter()
            .map(|inst| {
                inst.tags
                    .iter()
                    .filter(|t| prefixes.iter().any(|p| t.starts_with(p.as_str())))
                    .map(|t| match tag_table.iter().position(|x| x == t) {
                        Some(i) => i as u32,
                        None => {
                            tag_table.push(t.clone());
                            (tag_table.len() - 1) as u32
                        }
                    })
                    .collect()
            })
            .collect();
        let mut loads = vec![NodeLoad::default(); n];
        let mut imem = vec![0.0; n];
        let mut forth_mem = vec![0.0; n];
        let mut forth_vcpus = vec![0.0; n];
        let mut tags: Vec<TagCounts> = vec![Vec::new(); n];
        let mut peers: Vec<Peers> = vec![Vec::new(); n];
        for (i, inst) in cluster.instances.iter().enumerate() {
            let p = inst.primary.index();
            let l = &mut loads[p];
            // Ganeti counts forthcoming primaries' exclusion tags too.
            for &t in &excl_tags[i] {
                l.tag_conflicts += bump(&mut tags[p], t, 1);
            }
            if !uses_memory(inst) {
                forth_mem[p] += inst.mem as f64;
            }
            if inst.forthcoming {
                forth_vcpus[p] += online_vcpus(inst);
                continue;
            }
            if uses_memory(inst) {
                imem[p] += inst.mem as f64;
            }
            add_primary(l, inst);
            l.location += metric.location(InstId::from_index(i), inst.primary, inst.secondary);
            if let Some(s) = inst.secondary {
                loads[s.index()].secondaries += 1;
                loads[s.index()].util.disk += inst.util.disk;
                if uses_sec_mem(inst) {
                    bump_peer(&mut peers[s.index()], p as u32, inst.mem as f64);
                }
            }
        }
        for (id, node) in cluster.nodes.iter().enumerate() {
            let l = &mut loads[id];
            let recorded = node.total_mem - node.node_mem as f64 - imem[id];
            // Ganeti trusts the smaller of what its records imply and what the node
            // reported, and keeps that gap fixed while instances move.
            let free = recorded.min(node.free_mem as f64);
            l.free_mem = free;
            // Ganeti's forthcoming view starts from the reported figure instead,
            // less every primary the reported figure does not include.
            l.free_mem_forth = node.free_mem as f64 - forth_mem[id];
            l.vcpus += node.os_cpus as f64;
            l.vcpus_forth = l.vcpus + forth_vcpus[id];
            l.reserved_mem = max_peer(&peers[id]);
        }
        let online: Vec<bool> = cluster.nodes.iter().map(|n| !n.offline).collect();
        let k = metric.components().len();
        let mut values = vec![0.0; n * k];
        for (id, chunk) in values.chunks_mut(k.max(1)).enumerate().take(n) {
            metric.node_values(cluster, NodeId::from_index(id), &loads[id], &mut chunk[..k]);
        }
        let per_node: Vec<Vec<f64>> = (0..n)
            .map(|i| values[i * k..(i + 1) * k].to_vec())
            .collect();
        let stats = Stats::new(metric.components(), &per_node, &online);
        let vcpu_ratio = cluster
            .nodes
            .iter()
            .map(|nd| {
                cluster
                    .groups
                    .get(nd.group.index())
                    .map_or(cluster.ipolicy.vcpu_ratio, |g| g.ipolicy.vcpu_ratio)
            })
            .collect();
        let start_free_mem = loads.iter().map(|l| l.free_mem).collect();
        let pairs = metric.pair_component().map(|spec| {
            let mut p = Pairs {
                weight: metric.components()[spec.index].weight,
                spec,
                counts: HashMap::new(),
                excess: 0,
            };
            for (i, inst) in cluster.instances.iter().enumerate() {
                if !inst.forthcoming && online[inst.primary.index()] {
                    p.apply(InstId::from_index(i), None, Some(inst.primary.index()));
                }
            }
            p
        });
        State {
            pairs,
            start_free_mem,
            cluster,
            metric,
            primary: cluster.instances.iter().map(|i| i.primary).collect(),
            secondary: cluster.instances.iter().map(|i| i.secondary).collect(),
            loads,
            online,
            values,
            k,
            stats,
            excl_tags,
            tags,
            peers,
            vcpu_ratio,
        }
    }

    pub fn score(&self) -> f64 {
        self.stats.score() + self.pairs.as_ref().map_or(0.0, Pairs::value)
    }

    /// Each component's name, weight and value.
    pub fn breakdown(&self) -> Vec<(&'static str, f64, f64)> {
        let mut b = self.stats.breakdown();
        if let Some(p) = &self.pairs {
            b[p.spec.index].2 = p.excess as f64;
        }
        b
    }

    /// The pair-counted component's value and how moving `inst` to `to`
    /// changes it (both weighted).
    /// `to` None: as if `inst` vanished.
    fn pair_score(&self, inst: InstId, to: Option<NodeId>) -> f64 {
        let Some(p) = &self.pairs else { return 0.0 };
        let from = self.primary[inst.index()].index();
        let on = |n: usize| self.online[n].then_some(n);
        let to = to.and_then(|t| on(t.index()));
        p.value() + p.weight * p.delta(inst, on(from), to) as f64
    }

    pub fn node_count(&self) -> usize {
        self.loads.len()
    }

    pub fn load(&self, node: NodeId) -> &NodeLoad {
        &self.loads[node.index()]
    }

    #[inline]
    pub fn primary_of(&self, inst: InstId) -> NodeId {
        self.primary[inst.index()]
    }

    #[inline]
    fn node_vals(&self, node: usize) -> &[f64] {
        &self.values[node * self.k..(node + 1) * self.k]
    }

    /// Where `inst` may go by disk template, given where it runs now.
    #[inline]
    pub fn mobility(&self, inst: InstId) -> Mobility {
        let i = self.cluster.instance(inst);
        if i.disk_template.is_shared() {
            Mobility::AnyNode
        } else if i.disk_template == DiskTemplate::Drbd {
            self.secondary[inst.index()].map_or(Mobility::Immovable, Mobility::SecondaryOnly)
        } else {
            Mobility::Immovable
        }
    }

    /// The source node's load once `inst` has left it for `to`.
    pub(crate) fn load_after_out(&self, inst: InstId, to: NodeId) -> NodeLoad {
        let i = self.cluster.instance(inst);
        let a = self.primary[inst.index()];
        let mut l = self.loads[a.index()];
        remove_primary(&mut l, i);
        l.touched = true;
        l.location -= self.metric.location(inst, a, self.secondary[inst.index()]);
        l.tag_conflicts -= self.tag_delta(a.index(), inst, false);
        if self.is_swap(inst, to) {
            l.secondaries += 1;
            l.util.disk += i.util.disk;
            if uses_sec_mem(i) {
                l.reserved_mem = max_peer_changed(&self.peers[a.index()], to.0, i.mem as f64);
            }
        }
        l
    }

    /// The target node's load once `inst` has arrived from its primary.
    pub(crate) fn load_after_in(&self, inst: InstId, to: NodeId) -> NodeLoad {
        let i = self.cluster.instance(inst);
        let a = self.primary[inst.index()];
        let mut l = self.loads[to.index()];
        add_primary(&mut l, i);
        l.touched = true;
        let secondary = if self.is_swap(inst, to) {
            Some(a)
        } else {
            self.secondary[inst.index()]
        };
        l.location += self.metric.location(inst, to, secondary);
        l.tag_conflicts += self.tag_delta(to.index(), inst, true);
        if self.is_swap(inst, to) {
            l.secondaries -= 1;
            l.util.disk -= i.util.disk;
            if uses_sec_mem(i) {
                l.reserved_mem = max_peer_changed(&self.peers[to.index()], a.0, -(i.mem as f64));
            }
        }
        l
    }

    fn is_swap(&self, inst: InstId, to: NodeId) -> bool {
        self.secondary[inst.index()] == Some(to)
    }

    /// How many conflicts `inst`'s exclusion tags add to (or remove from) `node`.
    fn tag_delta(&self, node: usize, inst: InstId, adding: bool) -> u32 {
        let held = &self.tags[node];
        self.excl_tags[inst.index()]
            .iter()
            .filter(|t| {
                let c = held.iter().find(|(x, _)| x == *t).map_or(0, |(_, c)| *c);
                if adding {
                    c >= 1
                } else {
                    c >= 2
                }
            })
            .count() as u32
    }

    /// Whether `node`'s primaries already carry one of `inst`'s exclusion tags.
    pub(crate) fn tag_clash(&self, node: NodeId, inst: InstId) -> bool {
        self.tag_delta(node.index(), inst, true) > 0
    }

    /// Scores moving `inst` to `to` without checking constraints, reusing the
    /// source's values when the caller has them.
    pub fn evaluate_with_source(
        &self,
        inst: InstId,
        to: NodeId,
        from_load: &NodeLoad,
        from_vals: &[f64],
        scratch: &mut [f64],
    ) -> Evaluation {
        let to_load = self.load_after_in(inst, to);
        self.metric
            .node_values(self.cluster, to, &to_load, &mut scratch[..self.k]);
        let score = self.score_values(inst, to, from_vals, &scratch[..self.k]);
        Evaluation {
            score,
            from_load: *from_load,
            to_load,
        }
    }

    /// Source-side half of an evaluation: the source's load and values after
    /// `inst` leaves for `to` (`to` matters only for a DRBD swap).
    pub fn source_after(&self, inst: InstId, to: NodeId, out: &mut [f64]) -> NodeLoad {
        let a = self.primary[inst.index()];
        let l = self.load_after_out(inst, to);
        self.metric
            .node_values(self.cluster, a, &l, &mut out[..self.k]);
        l
    }

    /// The score if `inst` moved to `to` (constraints not checked).
    pub fn evaluate(&self, inst: InstId, to: NodeId) -> Evaluation {
        let mut src = vec![0.0; self.k];
        let mut dst = vec![0.0; self.k];
        let from_load = self.source_after(inst, to, &mut src);
        self.evaluate_with_source(inst, to, &from_load, &src, &mut dst)
    }

    /// The score if only the source changed, as if `inst` vanished from it: a cheap
    /// estimate of how much a move of `inst` can gain.
    pub fn removal_score(&self, inst: InstId, scratch: &mut [f64]) -> f64 {
        let a = self.primary[inst.index()];
        let to = self.secondary[inst.index()].unwrap_or(a);
        let l = self.load_after_out(inst, to);
        self.metric
            .node_values(self.cluster, a, &l, &mut scratch[..self.k]);
        self.stats.score_with(&[(
            self.online[a.index()],
            self.node_vals(a.index()),
            &scratch[..self.k],
        )]) + self.pair_score(inst, None)
    }

    /// The score if `probe`'s resources left (`adding` false) or joined `node`,
    /// wherever `probe` really runs: ranks nodes as sources or targets for an
    /// instance of that shape.
    pub fn probe_score(
        &self,
        node: NodeId,
        probe: &tern_model::Instance,
        adding: bool,
        scratch: &mut [f64],
    ) -> f64 {
        let mut l = self.loads[node.index()];
        if adding {
            add_primary(&mut l, probe);
        } else {
            remove_primary(&mut l, probe);
        }
        self.metric
            .node_values(self.cluster, node, &l, &mut scratch[..self.k]);
        self.stats.score_with(&[(
            self.online[node.index()],
            self.node_vals(node.index()),
            &scratch[..self.k],
        )]) + self.pairs.as_ref().map_or(0.0, Pairs::value)
    }

    /// The score once `inst` has moved to `to`, given the values its source and
    /// `to` would then have (constraints not checked).
    pub(crate) fn score_values(
        &self,
        inst: InstId,
        to: NodeId,
        from_vals: &[f64],
        to_vals: &[f64],
    ) -> f64 {
        let a = self.primary[inst.index()].index();
        self.stats.score_with(&[
            (self.online[a], self.node_vals(a), from_vals),
            (self.online[to.index()], self.node_vals(to.index()), to_vals),
        ]) + self.pair_score(inst, Some(to))
    }

    /// The score if only `node`'s values became `vals` (the pair-counted component
    /// as it is now).
    pub(crate) fn score_node_values(&self, node: NodeId, vals: &[f64]) -> f64 {
        self.stats.score_with(&[(
            self.online[node.index()],
            self.node_vals(node.index()),
            vals,
        )]) + self.pairs.as_ref().map_or(0.0, Pairs::value)
    }

    /// The score if nodes `a` and `b` changed from the values `old` holds (`a`'s,
    /// then `b`'s) to those `new` holds, whatever they hold now (the pair-counted
    /// component as it is now): scores a move recorded earlier as it would count
    /// under the cluster's current sums.
    pub(crate) fn score_recorded(&self, a: NodeId, b: NodeId, old: &[f64], new: &[f64]) -> f64 {
        let k = self.k;
        self.stats.score_with(&[
            (self.online[a.index()], &old[..k], &new[..k]),
            (self.online[b.index()], &old[k..2 * k], &new[k..2 * k]),
        ]) + self.pairs.as_ref().map_or(0.0, Pairs::value)
    }

    /// The running sums once `node`'s values become `vals`, for
    /// [`State::score_shifted`] (see [`Stats::shifted`]).
    #[inline]
    pub(crate) fn shifted(&self, node: NodeId, vals: &[f64], out: &mut [Running]) {
        self.stats.shifted(
            self.online[node.index()],
            self.node_vals(node.index()),
            vals,
            out,
        );
    }

    /// The score from the sums `base` ([`State::shifted`]) once `node`'s values
    /// become `vals` too (the pair-counted component as it is now): many moves
    /// from one source scored cheaply, to rank them.
    #[inline]
    pub(crate) fn score_shifted(&self, base: &[Running], node: NodeId, vals: &[f64]) -> f64 {
        self.stats.score_shifted(
            base,
            self.online[node.index()],
            self.node_vals(node.index()),
            vals,
        ) + self.pairs.as_ref().map_or(0.0, Pairs::value)
    }

    /// Node `node`'s component values as the score counts them now.
    #[inline]
    pub(crate) fn values_of(&self, node: NodeId) -> &[f64] {
        self.node_vals(node.index())
    }

    /// Number of components of the metric.
    pub fn components_len(&self) -> usize {
        self.k
    }

    /// Carries out a move (assumed checked) and updates all running sums.
    pub fn apply(&mut self, mv: Move) {
        let (inst, a, b) = (mv.inst, mv.from.index(), mv.to.index());
        let swap = self.is_swap(inst, mv.to);
        let from_load = self.load_after_out(inst, mv.to);
        let to_load = self.load_after_in(inst, mv.to);
        let i = self.cluster.instance(inst);
        let on = |n: usize| self.online[n].then_some(n);
        let (on_a, on_b) = (on(a), on(b));
        if let Some(p) = &mut self.pairs {
            p.apply(inst, on_a, on_b);
        }
        for &t in &self.excl_tags[inst.index()] {
            bump(&mut self.tags[a], t, -1);
            bump(&mut self.tags[b], t, 1);
        }
        if swap && uses_sec_mem(i) {
            bump_peer(&mut self.peers[a], b as u32, i.mem as f64);
            bump_peer(&mut self.peers[b], a as u32, -(i.mem as f64));
        }
        self.loads[a] = from_load;
        self.loads[b] = to_load;
        let k = self.k;
        let mut new_a = vec![0.0; k];
        let mut new_b = vec![0.0; k];
        self.metric
            .node_values(self.cluster, mv.from, &from_load, &mut new_a);
        self.metric
            .node_values(self.cluster, mv.to, &to_load, &mut new_b);
        let old_a = self.node_vals(a).to_vec();
        let old_b = self.node_vals(b).to_vec();
        self.stats.apply(&[
            (self.online[a], &old_a, &new_a),
            (self.online[b], &old_b, &new_b),
        ]);
        self.values[a * k..(a + 1) * k].copy_from_slice(&new_a);
        self.values[b * k..(b + 1) * k].copy_from_slice(&new_b);
        self.primary[inst.index()] = mv.to;
        if swap {
            self.secondary[inst.index()] = Some(mv.from);
        }
    }

    /// Recomputes the running sums from the stored values, dropping the rounding
    /// error that many incremental updates accumulate.
    pub fn refresh(&mut self) {
        let n = self.loads.len();
        let per_node: Vec<Vec<f64>> = (0..n).map(|i| self.node_vals(i).to_vec()).collect();
        self.stats = Stats::new(self.metric.components(), &per_node, &self.online);
    }

    /// The cluster with every applied move carried out; nodes' reported free
    /// memory changes by what the moves took or released.
    pub fn to_cluster(&self) -> Cluster {
        let mut c = self.cluster.clone();
        for ((node, load), start) in c
            .nodes
            .iter_mut()
            .zip(&self.loads)
            .zip(&self.start_free_mem)
        {
            node.free_mem += (load.free_mem - start).round() as i64;
        }
        for (inst, (p, s)) in c
            .instances
            .iter_mut()
            .zip(self.primary.iter().zip(&self.secondary))
        {
            inst.primary = *p;
            inst.secondary = *s;
        }
        c
    }
}

fn online_vcpus(inst: &tern_model::Instance) -> f64 {
    if not_offline(inst) {
        inst.vcpus as f64
    } else {
        0.0
    }
}

/// Ganeti reserves failover memory only for real, auto-balanced DRBD instances
/// that hold vCPUs (`notOffline`).
fn uses_sec_mem(inst: &tern_model::Instance) -> bool {
    inst.disk_template == DiskTemplate::Drbd
        && not_offline(inst)
        && inst.auto_balance
        && !inst.forthcoming
}

fn add_primary(l: &mut NodeLoad, inst: &tern_model::Instance) {
    shift_primary(l, inst, 1.0);
    l.primaries += 1;
}

fn remove_primary(l: &mut NodeLoad, inst: &tern_model::Instance) {
    shift_primary(l, inst, -1.0);
    l.primaries -= 1;
}

fn shift_primary(l: &mut NodeLoad, inst: &tern_model::Instance, sign: f64) {
    if uses_memory(inst) {
        l.free_mem -= sign * inst.mem as f64;
    }
    // Ganeti's forthcoming view counts every primary's memory.
    l.free_mem_forth -= sign * inst.mem as f64;
    let v = sign * online_vcpus(inst);
    l.vcpus += v;
    l.vcpus_forth += v;
    l.util.cpu += sign * inst.util.cpu;
    l.util.mem += sign * inst.util.mem;
    l.util.disk += sign * inst.util.disk;
    l.util.net += sign * inst.util.net;
    let cpu = if inst.demand.cpu_cores > 0.0 {
        inst.demand.cpu_cores
    } else {
        inst.vcpus as f64
    };
    let mem = if inst.demand.mem_used_mib > 0.0 {
        inst.demand.mem_used_mib
    } else {
        inst.mem as f64
    };
    l.cpu_demand += sign * cpu;
    l.mem_demand += sign * mem;
}

/// Changes a tag's count by `by`; returns 1 if adding made it a conflict.
fn bump(counts: &mut TagCounts, tag: u32, by: i32) -> u32 {
    match counts.iter_mut().find(|(t, _)| *t == tag) {
        Some((_, c)) => {
            let before = *c;
            *c = (*c as i32 + by).max(0) as u32;
            u32::from(by > 0 && before >= 1)
        }
        None => {
            if by > 0 {
                counts.push((tag, by as u32));
            }
            0
        }
    }
}

fn bump_peer(peers: &mut Peers, node: u32, mem: f64) {
    match peers.iter_mut().find(|(n, _)| *n == node) {
        Some((_, m)) => *m += mem,
        None => peers.push((node, mem)),
    }
}

fn max_peer(peers: &Peers) -> f64 {
    peers.iter().map(|(_, m)| *m).fold(0.0, f64::max)
}

fn max_peer_changed(peers: &Peers, node: u32, delta: f64) -> f64 {
    let mut best = if peers.iter().any(|(n, _)| *n == node) {
        0.0
    } else {
        delta.max(0.0)
    };
    for &(n, m) in peers {
        let v = if n == node { m + delta } else { m };
        best = f64::max(best, v);
    }
    best
}

/// Cluster tags `htools:iextags:PREFIX` declare which instance tags exclude each
/// other (Ganeti's convention).
pub fn exclusion_prefixes(cluster: &Cluster) -> Vec<String> {
    cluster
        .tags
        .iter()
        .filter_map(|t| t.strip_prefix("htools:iextags:"))
        .map(str::to_owned)
        .collect()
}
