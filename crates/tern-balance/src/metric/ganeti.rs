//! `ganeti`: Ganeti 3.0's cluster score, exactly as `hinfo -t FILE` prints it,
//! from scratch and as the planner's incremental [`Ganeti`] metric.
//!
//! Ganeti (`Cluster/Metrics.hs`) computes twenty values per node, aggregates
//! each over the online nodes (population standard deviation or sum; two
//! components sum over the offline nodes instead) and adds them up with the
//! weights of [`TERMS`]. All twenty are implemented, including those that
//! are 0 for most files:
//!
//! - free memory/disk, vCPU ratio and spindle ratios, with and without
//!   forthcoming instances (`*_forth`);
//! - `n1_cnt`: instances on nodes that could not absorb a failed DRBD peer;
//!   `reserved_mem_*`: memory held back for those failovers;
//! - `offline_*_cnt`: instances left on offline nodes;
//! - `cpu/mem/disk/net_load_cv`: dynamic utilisation. A text file has none, so
//!   Ganeti counts 1 per instance (disk also for secondaries); tern's
//!   [`DynUtil`](tern_model::DynUtil) fields carry measured values when known;
//! - `pri_tags_score`: primaries sharing an exclusion tag (`htools:iextags:`);
//! - `location_score`: DRBD instances with both nodes in one failure domain,
//!   plus unmet desired locations (`htools:nlocation:`,
//!   `htools:desiredlocation:`); `location_exclusion_score`: instances with the
//!   same exclusion tag in the same failure domain.
//!
//! Ganeti keeps some node fields as reported at load (free memory, free disk)
//! and adjusts them by the instances that move. [`Context`] records those
//! baselines from the loaded snapshot, so [`node_values`] gives Ganeti's value
//! both for the snapshot and for any placement a planner reaches from it. One
//! rule differs between the two in Ganeti itself: a node's N+1 failure is
//! `free_mem < reserved` as loaded but `unallocated <= reserved` once an
//! instance has moved on or off it; [`NodeView::touched`] selects the second.
//!
//! Each component is declared once, in [`TERMS`], as Ganeti's own
//! `MetricsComponents` does: name, weight, statistic, whether a live migration can
//! change it, and its per-node value from Ganeti's statistics ([`NodeStats`]) and
//! from the planner's load ([`LoadView`]). Scoring from scratch, the incremental
//! metric and the `hinfo`-style breakdown all read that table.
//!
//! For incremental scoring: [`Totals`] keeps per-component running sums
//! (count, Σx, Σx² around a fixed shift, and exclusion-pair counts), so
//! replacing the values of the two or three nodes a move touches updates the
//! score in O(K). [`score`] and [`components`] compute from scratch with
//! Ganeti's own two-pass standard deviation, and match `hinfo` to its 8 printed
//! decimals.

use std::collections::{BTreeMap, HashMap};

use tern_model::ganeti::tags;
use tern_model::{Cluster, DiskTemplate, InstId, Instance, InstanceStatus, NodeId};

use super::{Aggregate, Component, Metric, NodeLoad, Over, PairComponent};

/// Number of components.
pub const K: usize = 20;

/// How a component's per-node values become one number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Statistic {
    /// Population standard deviation over the online nodes.
    StdDev,
    /// Sum over the online nodes.
    Sum,
    /// Sum over the offline nodes (instances left there).
    SumOffline,
    /// Σ(count − 1) over the (failure domain, exclusion tag) pairs held by the
    /// primaries of online nodes ([`NodeValues::pairs`]); node values are 0.
    Pairs,
}

/// One term of Ganeti's score, declared once: its name and weight as `hinfo`
/// prints them, its statistic, whether a live migration can change it, and its
/// per-node value both from Ganeti's statistics ([`node_values`]) and from the
/// planner's running [`NodeLoad`] ([`Ganeti`]).
#[derive(Clone, Copy, Debug)]
pub struct Term {
    pub name: &'static str,
    pub weight: f64,
    pub statistic: Statistic,
    /// False for the terms that depend only on local storage and forthcoming
    /// instances, which live migration never moves: the planner keeps their
    /// values from load.
    pub migration_changes: bool,
    /// The node's value from its Ganeti statistics.
    pub of_node: fn(&NodeStats) -> f64,
    /// The node's value from the planner's load (only read for terms migration
    /// changes).
    pub of_load: fn(&LoadView<'_>) -> f64,
}

impl Term {
    /// The term as a generic score component.
    pub const fn component(&self) -> Component {
        let (aggregate, over) = match self.statistic {
            Statistic::StdDev => (Aggregate::StdDev, Over::Online),
            Statistic::Sum | Statistic::Pairs => (Aggregate::Sum, Over::Online),
            Statistic::SumOffline => (Aggregate::Sum, Over::Offline),
        };
        Component {
            name: self.name,
            weight: self.weight,
            aggregate,
            over,
        }
    }

    fn counts(&self, online: bool) -> bool {
        (self.statistic == SumOffline) != online
    }
}

use Statistic::{Pairs, StdDev, Sum, SumOffline};

const fn t(
    name: &'static str,
    weight: f64,
    statistic: Statistic,
    migration_changes: bool,
    of_node: fn(&NodeStats) -> f64,
    of_load: fn(&LoadView<'_>) -> f64,
) -> Term {
    Term {
        name,
        weight,
        statistic,
        migration_changes,
        of_node,
        of_load,
    }
}

/// Placeholder for the load-side value of a term migration cannot change.
fn kept(_: &LoadView<'_>) -> f64 {
    0.0
}

/// Ganeti 3.0's components (`detailedCVInfoExt`), in Ganeti's order, with its
/// weights.
#[rustfmt::skip]
pub const TERMS: [Term; K] = [
    t("free_mem_cv",              0.5,  StdDev,     true,  |s| s.p_mem,         |l| l.load.free_mem / l.t_mem),
    t("free_disk_cv",             0.5,  StdDev,     false, |s| s.p_dsk,         kept),
    t("n1_cnt",                   1.0,  Sum,        true,  |s| s.n1,            |l| if l.fail_n1 { l.hosted } else { 0.0 }),
    t("reserved_mem_cv",          1.0,  StdDev,     true,  |s| s.p_rem,         |l| l.res),
    t("offline_all_cnt",          4.0,  SumOffline, true,  |s| s.hosted,        |l| l.hosted),
    t("offline_pri_cnt",          16.0, SumOffline, true,  |s| s.primaries,     |l| f64::from(l.load.primaries)),
    t("vcpu_ratio_cv",            0.5,  StdDev,     true,  |s| s.vcpu_ratio,    |l| l.load.vcpus / l.cpu),
    t("cpu_load_cv",              1.0,  StdDev,     true,  |s| s.util[0],       |l| l.load.util.cpu),
    t("mem_load_cv",              1.0,  StdDev,     true,  |s| s.util[1],       |l| l.load.util.mem),
    t("disk_load_cv",             1.0,  StdDev,     true,  |s| s.util[2],       |l| l.load.util.disk),
    t("net_load_cv",              1.0,  StdDev,     true,  |s| s.util[3],       |l| l.load.util.net),
    t("pri_tags_score",           2.0,  Sum,        true,  |s| s.tag_conflicts, |l| f64::from(l.load.tag_conflicts)),
    t("spindles_cv",              0.5,  StdDev,     false, |s| s.spindles,      kept),
    t("free_mem_cv_forth",        0.5,  StdDev,     true,  |s| s.p_mem_forth,   |l| l.load.free_mem_forth / l.t_mem),
    t("free_disk_cv_forth",       0.5,  StdDev,     false, |s| s.p_dsk_forth,   kept),
    t("vcpu_ratio_cv_forth",      0.5,  StdDev,     true,  |s| s.vcpu_ratio_forth, |l| l.load.vcpus_forth / l.cpu),
    t("spindles_cv_forth",        0.5,  StdDev,     false, |s| s.spindles_forth, kept),
    t("location_score",           1.0,  Sum,        true,  |s| s.location,      |l| l.load.location),
    t("location_exclusion_score", 1.0,  Pairs,      true,  |_| 0.0,             |_| 0.0),
    t("reserved_mem_rtotal",      0.25, Sum,        true,  |s| s.p_rem,         |l| l.res),
];

/// [`TERMS`] as generic components, in the same order.
pub const COMPONENTS: [Component; K] = {
    let mut out = [TERMS[0].component(); K];
    let mut k = 1;
    while k < K {
        out[k] = TERMS[k].component();
        k += 1;
    }
    out
};

/// Index of the [`Statistic::Pairs`] term, `location_exclusion_score`.
pub const LOCATION_EXCLUSION: usize = {
    let mut k = 0;
    while !matches!(TERMS[k].statistic, Pairs) {
        k += 1;
    }
    k
};

/// Ganeti's per-node statistics (`compDetailedCVNode`), named; each term of
/// [`TERMS`] picks its value from them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NodeStats {
    pub p_mem: f64,
    pub p_dsk: f64,
    /// Instances hosted, if the node fails N+1; else 0.
    pub n1: f64,
    pub p_rem: f64,
    /// Primaries and secondaries (forthcoming ones left out).
    pub hosted: f64,
    pub primaries: f64,
    pub vcpu_ratio: f64,
    /// CPU, memory, disk and network utilisation.
    pub util: [f64; 4],
    pub tag_conflicts: f64,
    pub spindles: f64,
    pub p_mem_forth: f64,
    pub p_dsk_forth: f64,
    pub vcpu_ratio_forth: f64,
    pub spindles_forth: f64,
    pub location: f64,
}

/// A node's planner load with the quantities several terms share.
#[derive(Clone, Copy, Debug)]
pub struct LoadView<'a> {
    pub load: &'a NodeLoad,
    pub t_mem: f64,
    /// Physical CPUs times their speed.
    pub cpu: f64,
    pub hosted: f64,
    /// Reserved memory over total memory.
    pub res: f64,
    pub fail_n1: bool,
}

/// A (failure domain, exclusion tag) pair, as indices into [`Context`]'s name table.
pub type Pair = (u32, u32);

/// What is fixed for the lifetime of a planning run: tag-derived sets and the
/// load-time baselines of the fields Ganeti adjusts incrementally.
#[derive(Clone, Debug)]
pub struct Context {
    /// Per node: failure domains, sorted name indices.
    locations: Vec<Vec<u32>>,
    /// Per instance: exclusion tags (with repeats, as Ganeti counts them).
    exclusions: Vec<Vec<u32>>,
    /// Per instance: desired failure domains, sorted, distinct.
    desired: Vec<Vec<u32>>,
    /// Per node: memory missing at load (Ganeti's `xMem`).
    missing_mem: Vec<i64>,
    /// Per node: free disk plus what the loaded real instances use locally.
    disk_base: Vec<i64>,
    /// Per node: free spindles plus what the loaded real instances use
    /// (exclusive-storage nodes only).
    spindle_base: Vec<i64>,
    /// Per node: free memory plus memory of the loaded memory-using primaries.
    mem_forth_base: Vec<i64>,
    /// Per node: spindle limit from its group's policy.
    hi_spindles: Vec<f64>,
}

/// A node and the instances on it, in instance order.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    pub node: NodeId,
    pub primaries: &'a [InstId],
    pub secondaries: &'a [InstId],
    /// Whether an instance moved on or off this node since the snapshot the
    /// [`Context`] was built from (selects Ganeti's post-move N+1 rule).
    pub touched: bool,
}

/// One node's component values.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeValues {
    pub values: [f64; K],
    /// `location_exclusion_score`'s input: pair counts, sorted by pair.
    pub pairs: Vec<(Pair, u32)>,
}

/// Ganeti's `usesLocalStorage`: only these count against a node's disk.
fn local_storage(i: &Instance) -> bool {
    matches!(i.disk_template, DiskTemplate::Drbd | DiskTemplate::Plain)
}

/// Ganeti's `usesMemory`.
pub(crate) fn uses_memory(i: &Instance) -> bool {
    !i.forthcoming
        && !matches!(
            i.status,
            InstanceStatus::AdminDown
                | InstanceStatus::AdminOffline
                | InstanceStatus::ErrorDown
                | InstanceStatus::UserDown
        )
}

/// Ganeti's `notOffline`: only administratively offline instances hold no vCPUs.
pub(crate) fn not_offline(i: &Instance) -> bool {
    i.status != InstanceStatus::AdminOffline
}

fn recorded_free_mem(c: &Cluster, node: NodeId, imem: i64) -> i64 {
    let n = c.node(node);
    n.total_mem.trunc() as i64 - n.node_mem - imem
}

fn ratio_or_one(free: f64, total: f64) -> f64 {
    if total == 0.0 {
        1.0
    } else {
        free / total
    }
}

struct Names(HashMap<String, u32>);

impl Names {
    fn id(&mut self, s: &str) -> u32 {
        let next = self.0.len() as u32;
        *self.0.entry(s.to_owned()).or_insert(next)
    }
}

impl Context {
    /// Records everything [`node_values`] needs besides the placement, taking
    /// `cluster`'s placement as the loaded one.
    pub fn new(cluster: &Cluster) -> Context {
        let mut names = Names(HashMap::new());
        let locations = cluster
            .node_ids()
            .map(|n| {
                let mut v: Vec<u32> = tags::node_locations(cluster, n)
                    .iter()
                    .map(|t| names.id(t))
                    .collect();
                v.sort_unstable();
                v
            })
            .collect();
        let exclusions = cluster
            .instance_ids()
            .map(|i| {
                tags::exclusion_tags(cluster, i)
                    .iter()
                    .map(|t| names.id(t))
                    .collect()
            })
            .collect();
        let desired = cluster
            .instance_ids()
            .map(|i| {
                let mut v: Vec<u32> = tags::desired_locations(cluster, i)
                    .iter()
                    .map(|t| names.id(t))
                    .collect();
                v.sort_unstable();
                v
            })
            .collect();
        let by_node = cluster.instances_by_node();
        let mut ctx = Context {
            locations,
            exclusions,
            desired,
            missing_mem: Vec::new(),
            disk_base: Vec::new(),
            spindle_base: Vec::new(),
            mem_forth_base: Vec::new(),
            hi_spindles: Vec::new(),
        };
        for node in cluster.node_ids() {
            let n = cluster.node(node);
            let pri = &by_node.primaries[node.index()];
            let sec = &by_node.secondaries[node.index()];
            let imem = instance_mem(cluster, pri);
            let real = || {
                pri.iter()
                    .chain(sec)
                    .map(|&i| cluster.instance(i))
                    .filter(|i| !i.forthcoming)
            };
            let local_disk: i64 = real().filter(|i| local_storage(i)).map(|i| i.disk).sum();
            let spindles: i64 = real().filter_map(|i| i.spindles).sum();
            ctx.missing_mem
                .push(recorded_free_mem(cluster, node, imem) - n.free_mem);
            ctx.disk_base.push(n.free_disk + local_disk);
            ctx.spindle_base.push(n.free_spindles + spindles);
            ctx.mem_forth_base.push(n.free_mem + imem);
            let ratio = cluster.group(n.group).ipolicy.spindle_ratio;
            ctx.hi_spindles.push(ratio * n.spindles as f64);
        }
        ctx
    }
}

impl Context {
    /// Ganeti's location score of `inst` as a primary in the failure domains
    /// `here`: domains shared with its DRBD secondary, plus desired domains
    /// `here` lacks.
    fn location(&self, inst: InstId, here: &[u32], secondary: Option<NodeId>) -> usize {
        let shared = secondary.map_or(0, |s| common(here, &self.locations[s.index()]));
        let want = &self.desired[inst.index()];
        shared + want.len() - common(want, here)
    }
}

/// Memory of the memory-using primaries (Ganeti's `iMem`).
fn instance_mem(c: &Cluster, primaries: &[InstId]) -> i64 {
    primaries
        .iter()
        .map(|&i| c.instance(i))
        .filter(|i| uses_memory(i))
        .map(|i| i.mem)
        .sum()
}

/// Size of the intersection of two sorted id lists.
fn common(a: &[u32], b: &[u32]) -> usize {
    a.iter().filter(|x| b.binary_search(x).is_ok()).count()
}

/// Ganeti's per-node statistics (`compDetailedCVNode`) for the node in `view`.
pub fn node_values(ctx: &Context, c: &Cluster, view: NodeView<'_>) -> NodeValues {
    let id = view.node;
    let ni = id.index();
    let n = c.node(id);
    let inst = |i: &InstId| (*i, c.instance(*i));
    let real_pri: Vec<_> = view
        .primaries
        .iter()
        .map(inst)
        .filter(|(_, i)| !i.forthcoming)
        .collect();
    let real_sec: Vec<_> = view
        .secondaries
        .iter()
        .map(inst)
        .filter(|(_, i)| !i.forthcoming)
        .collect();
    let t_mem = n.total_mem;

    // Memory as of record, corrected by what was missing at load.
    let unallocated =
        recorded_free_mem(c, id, instance_mem(c, view.primaries)) - ctx.missing_mem[ni].max(0);
    let p_mem = unallocated as f64 / t_mem;

    // Disk: the load-time free value, adjusted for local-storage instances.
    let used = |list: &[(InstId, &Instance)]| -> (i64, i64) {
        list.iter().fold((0, 0), |(d, s), (_, i)| {
            let d = d + if local_storage(i) { i.disk } else { 0 };
            (d, s + i.spindles.unwrap_or(0))
        })
    };
    let (pd, ps) = used(&real_pri);
    let (sd, ss) = used(&real_sec);
    let free_disk = ctx.disk_base[ni] - pd - sd;
    let free_spindles = ctx.spindle_base[ni] - ps - ss;
    let p_dsk = if n.exclusive_storage {
        ratio_or_one(free_spindles as f64, n.spindles as f64)
    } else {
        ratio_or_one(free_disk as f64, n.total_disk)
    };

    // Forthcoming instances reserve disk and spindles on top.
    let mut free_disk_forth = free_disk;
    let mut free_spindles_forth = free_spindles;
    let mut forth: Vec<InstId> = view
        .primaries
        .iter()
        .chain(view.secondaries)
        .copied()
        .filter(|&i| c.instance(i).forthcoming)
        .collect();
    forth.sort_unstable();
    for i in forth.iter().map(|&i| c.instance(i)) {
        if local_storage(i) {
            free_disk_forth -= i.disk;
        }
        // Ganeti marks spindles as exhausted when a forthcoming instance's are unknown.
        free_spindles_forth = i.spindles.map_or(-1, |s| free_spindles_forth - s);
    }
    let p_dsk_forth = if n.exclusive_storage {
        ratio_or_one(free_spindles_forth as f64, n.spindles as f64)
    } else {
        ratio_or_one(free_disk_forth as f64, n.total_disk)
    };
    let all_pri_mem: i64 = view.primaries.iter().map(|&i| c.instance(i).mem).sum();
    let p_mem_forth = (ctx.mem_forth_base[ni] - all_pri_mem) as f64 / t_mem;

    // N+1: the largest memory any one DRBD peer would fail over to this node.
    let mut peers: BTreeMap<NodeId, i64> = BTreeMap::new();
    for (_, i) in &real_sec {
        let mem = if not_offline(i) && i.auto_balance {
            i.mem
        } else {
            0
        };
        *peers.entry(i.primary).or_default() += mem;
    }
    let r_mem = peers.values().copied().max().unwrap_or(0);
    let fail_n1 = if view.touched {
        unallocated <= r_mem
    } else {
        n.free_mem < r_mem
    };
    let hosted = (real_pri.len() + real_sec.len()) as f64;
    let p_rem = r_mem as f64 / t_mem;

    let vcpus = |list: &mut dyn Iterator<Item = &Instance>| -> i64 {
        list.filter(|i| not_offline(i)).map(|i| i.vcpus).sum()
    };
    let u_cpu = n.os_cpus + vcpus(&mut real_pri.iter().map(|(_, i)| *i));
    let u_cpu_forth = n.os_cpus + vcpus(&mut view.primaries.iter().map(|&i| c.instance(i)));

    let mut util = [0.0; 4];
    for (_, i) in &real_pri {
        util[0] += i.util.cpu;
        util[1] += i.util.mem;
        util[2] += i.util.disk;
        util[3] += i.util.net;
    }
    for (_, i) in &real_sec {
        util[2] += i.util.disk;
    }

    // Exclusion tags of all primaries, forthcoming included.
    let mut tag_counts: HashMap<u32, u32> = HashMap::new();
    for &i in view.primaries {
        for &t in &ctx.exclusions[i.index()] {
            *tag_counts.entry(t).or_default() += 1;
        }
    }
    let conflicts: u32 = tag_counts.values().map(|v| v - 1).sum();

    let spindle_use = |list: &mut dyn Iterator<Item = &Instance>| -> f64 {
        if n.exclusive_storage {
            return 0.0;
        }
        list.filter(|i| local_storage(i))
            .map(|i| i.spindle_use as f64)
            .sum()
    };
    let inst_spindles = spindle_use(&mut real_pri.iter().chain(&real_sec).map(|(_, i)| *i));
    let inst_spindles_forth = spindle_use(
        &mut view
            .primaries
            .iter()
            .chain(view.secondaries)
            .map(|&i| c.instance(i)),
    );
    let hi = ctx.hi_spindles[ni];

    let here = &ctx.locations[ni];
    let mut location = 0usize;
    let mut pairs: BTreeMap<Pair, u32> = BTreeMap::new();
    for (id, i) in &real_pri {
        location += ctx.location(*id, here, i.secondary);
        for &loc in here {
            for &t in &ctx.exclusions[id.index()] {
                *pairs.entry((loc, t)).or_default() += 1;
            }
        }
    }

    let speed = n.cpu_speed;
    let stats = NodeStats {
        p_mem,
        p_dsk,
        n1: if fail_n1 { hosted } else { 0.0 },
        p_rem,
        hosted,
        primaries: real_pri.len() as f64,
        vcpu_ratio: u_cpu as f64 / n.pcpus / speed,
        util,
        tag_conflicts: f64::from(conflicts),
        spindles: inst_spindles / hi,
        p_mem_forth,
        p_dsk_forth,
        vcpu_ratio_forth: u_cpu_forth as f64 / n.pcpus / speed,
        spindles_forth: inst_spindles_forth / hi,
        location: location as f64,
    };
    NodeValues {
        values: TERMS.map(|t| (t.of_node)(&stats)),
        pairs: pairs.into_iter().collect(),
    }
}

/// Every node's values for the cluster as it stands (no node touched).
pub fn all_node_values(ctx: &Context, c: &Cluster) -> Vec<NodeValues> {
    let by_node = c.instances_by_node();
    c.node_ids()
        .map(|node| {
            node_values(
                ctx,
                c,
                NodeView {
                    node,
                    primaries: &by_node.primaries[node.index()],
                    secondaries: &by_node.secondaries[node.index()],
                    touched: false,
                },
            )
        })
        .collect()
}

/// Each component's name, weight and (unweighted) value, as `hinfo` prints
/// them. Empty when no node is online: Ganeti then has no statistics at all.
pub fn components(c: &Cluster) -> Vec<(&'static str, f64, f64)> {
    let ctx = Context::new(c);
    let online: Vec<bool> = c.nodes.iter().map(|n| !n.offline).collect();
    aggregate(&all_node_values(&ctx, c), &online)
}

/// Aggregates node values (with each node's online flag) the way Ganeti's
/// `compClusterStatistics` does, from scratch.
pub fn aggregate(values: &[NodeValues], online: &[bool]) -> Vec<(&'static str, f64, f64)> {
    if !online.contains(&true) {
        return Vec::new();
    }
    TERMS
        .iter()
        .enumerate()
        .map(|(k, term)| {
            let nodes = || {
                values
                    .iter()
                    .zip(online)
                    .filter(|(_, &on)| term.counts(on))
                    .map(|(v, _)| v)
            };
            let value = match term.statistic {
                Pairs => {
                    let mut all: HashMap<Pair, u32> = HashMap::new();
                    for v in nodes() {
                        for &(p, n) in &v.pairs {
                            *all.entry(p).or_default() += n;
                        }
                    }
                    all.values().fold(0.0, |a, &n| a + f64::from(n - 1))
                }
                // Folds from +0.0 in node order, as Ganeti's `foldl'` does.
                Sum | SumOffline => nodes().fold(0.0, |a, v| a + v.values[k]),
                StdDev => {
                    // Ganeti's two-pass form: mean first, then squared deviations.
                    let xs: Vec<f64> = nodes().map(|v| v.values[k]).collect();
                    let len = xs.len() as f64;
                    let mean = xs.iter().fold(0.0, |a, x| a + x) / len;
                    let nvar = xs.iter().fold(0.0, |a, x| a + (x - mean) * (x - mean));
                    (nvar / len).sqrt()
                }
            };
            (term.name, term.weight, value)
        })
        .collect()
}

/// Ganeti's cluster score (lower is better), as `hinfo` prints it.
pub fn score(c: &Cluster) -> f64 {
    components(c).iter().fold(0.0, |a, (_, w, v)| a + w * v)
}

/// Running sums of one standard-deviation or sum component.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Running {
    n: f64,
    /// Values are summed relative to `shift` so that Σx² − (Σx)²/n does not
    /// cancel catastrophically when all nodes are nearly equal.
    shift: f64,
    sum: f64,
    sum_sq: f64,
}

impl Running {
    fn add(&mut self, x: f64, sign: f64) {
        let d = x - self.shift;
        self.n += sign;
        self.sum += sign * d;
        self.sum_sq += sign * d * d;
    }

    fn value(&self, statistic: Statistic) -> f64 {
        match statistic {
            Sum | SumOffline | Pairs => self.sum + self.n * self.shift,
            StdDev if self.n == 0.0 => f64::NAN,
            StdDev => {
                let mean = self.sum / self.n;
                (self.sum_sq / self.n - mean * mean).max(0.0).sqrt()
            }
        }
    }
}

/// The score's running totals over all nodes, updatable node by node.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    running: [Running; K],
    pairs: HashMap<Pair, i64>,
    online: usize,
}

impl Totals {
    /// Totals of `values` (one per node, with the node's online flag).
    pub fn new(values: &[NodeValues], online: &[bool]) -> Totals {
        let mut t = Totals::default();
        // Shift by the online mean so the running sums stay well conditioned.
        let count = online.iter().filter(|&&o| o).count().max(1) as f64;
        for (k, r) in t.running.iter_mut().enumerate() {
            if TERMS[k].statistic == StdDev {
                let s: f64 = values
                    .iter()
                    .zip(online)
                    .filter(|(_, &o)| o)
                    .map(|(v, _)| v.values[k])
                    .sum();
                r.shift = if (s / count).is_finite() {
                    s / count
                } else {
                    0.0
                };
            }
        }
        for (v, &on) in values.iter().zip(online) {
            t.add(v, on);
        }
        t
    }

    fn update(&mut self, v: &NodeValues, online: bool, sign: f64) {
        if online {
            self.online = (self.online as f64 + sign) as usize;
        }
        for (k, term) in TERMS.iter().enumerate() {
            if term.counts(online) && term.statistic != Pairs {
                self.running[k].add(v.values[k], sign);
            }
        }
        if online {
            for &(p, n) in &v.pairs {
                let e = self.pairs.entry(p).or_default();
                *e += sign as i64 * i64::from(n);
                if *e == 0 {
                    self.pairs.remove(&p);
                }
            }
        }
    }

    /// Counts a node's values in.
    pub fn add(&mut self, v: &NodeValues, online: bool) {
        self.update(v, online, 1.0);
    }

    /// Takes a node's values out (they must have been added).
    pub fn remove(&mut self, v: &NodeValues, online: bool) {
        self.update(v, online, -1.0);
    }

    /// Each component's name, weight and value; empty without online nodes.
    pub fn components(&self) -> Vec<(&'static str, f64, f64)> {
        if self.online == 0 {
            return Vec::new();
        }
        TERMS
            .iter()
            .zip(&self.running)
            .map(|(term, r)| {
                let value = if term.statistic == Pairs {
                    self.pairs.values().fold(0.0, |a, &n| a + (n - 1) as f64)
                } else {
                    r.value(term.statistic)
                };
                (term.name, term.weight, value)
            })
            .collect()
    }

    pub fn score(&self) -> f64 {
        self.components().iter().fold(0.0, |a, (_, w, v)| a + w * v)
    }
}

/// Ganeti's score as a planner [`Metric`]: per-node values from each node's
/// [`NodeLoad`], so a move is re-scored in O(K).
///
/// Each term of [`TERMS`] gives its value from the load; the terms no live
/// migration changes (free disk and spindles, with and without forthcoming
/// instances) keep their values from [`node_values`] at load, and the
/// location-exclusion score is the planner's pair count
/// ([`Metric::pair_component`]). Tests check that this equals [`score`] on every
/// data file and after every move.
#[derive(Clone, Debug)]
pub struct Ganeti {
    ctx: Context,
    /// Per node: every term's value at load.
    loaded: Vec<[f64; K]>,
}

impl Ganeti {
    pub fn new(cluster: &Cluster) -> Ganeti {
        let ctx = Context::new(cluster);
        let loaded = all_node_values(&ctx, cluster)
            .iter()
            .map(|v| v.values)
            .collect();
        Ganeti { ctx, loaded }
    }
}

impl Metric for Ganeti {
    fn name(&self) -> &'static str {
        "ganeti"
    }

    fn components(&self) -> &[Component] {
        &COMPONENTS
    }

    fn node_values(&self, cluster: &Cluster, node: NodeId, l: &NodeLoad, out: &mut [f64]) {
        let n = cluster.node(node);
        let view = LoadView {
            load: l,
            t_mem: n.total_mem,
            cpu: n.pcpus * n.cpu_speed,
            hosted: f64::from(l.primaries + l.secondaries),
            res: l.reserved_mem / n.total_mem,
            fail_n1: if l.touched {
                l.free_mem <= l.reserved_mem
            } else {
                (n.free_mem as f64) < l.reserved_mem
            },
        };
        let loaded = &self.loaded[node.index()];
        for (k, term) in TERMS.iter().enumerate() {
            out[k] = if term.migration_changes {
                (term.of_load)(&view)
            } else {
                loaded[k]
            };
        }
    }

    fn location(&self, inst: InstId, node: NodeId, secondary: Option<NodeId>) -> f64 {
        self.ctx
            .location(inst, &self.ctx.locations[node.index()], secondary) as f64
    }

    fn pair_component(&self) -> Option<PairComponent<'_>> {
        Some(PairComponent {
            index: LOCATION_EXCLUSION,
            node_keys: &self.ctx.locations,
            inst_keys: &self.ctx.exclusions,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tern_model::generate::{self, Shape};
    use tern_model::{ganeti as text, Mobility, Move};

    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-9 * a.abs().max(1.0)
    }

    /// A standard deviation taken from running sums (Σx² less n·mean²) has an absolute
    /// error near √ε times the values' distance from the shift when the true spread is
    /// close to zero (√ε ≈ 1.5e-8): a score of running totals is compared to the
    /// two-pass one within that, not within rounding.
    fn close_score(a: f64, b: f64) -> bool {
        close(a, b) || (a - b).abs() <= 1e-7 * a.abs().max(1.0)
    }

    #[test]
    fn table_has_ganetis_weights() {
        let total: f64 = COMPONENTS.iter().map(|c| c.weight).sum();
        assert_eq!(COMPONENTS.len(), K);
        assert!((total - 34.25).abs() < 1e-12, "weights sum to {total}");
        assert_eq!(
            COMPONENTS[LOCATION_EXCLUSION].name,
            "location_exclusion_score"
        );
    }

    #[test]
    fn two_equal_nodes_score_zero_and_offline_primaries_cost_twenty() {
        let text = "g|u|preferred||\n\n\
                    a|1024|0|1024|1000|1000|4|N|u|1\n\
                    b|1024|0|1024|1000|1000|4|N|u|1\n\
                    c|1024|0|1024|1000|1000|4|Y|u|1\n\n\
                    i|128|10|1|running|Y|c||ext||1\n\n\n";
        let c = text::parse(text).unwrap();
        let comps = components(&c);
        let get = |n: &str| comps.iter().find(|x| x.0 == n).unwrap().2;
        assert_eq!(get("offline_all_cnt"), 1.0);
        assert_eq!(get("offline_pri_cnt"), 1.0);
        assert_eq!(get("free_mem_cv"), 0.0);
        // 4 x 1 + 16 x 1 for the instance on the offline node, nothing else.
        assert!((score(&c) - 20.0).abs() < 1e-12);
    }

    #[test]
    fn all_offline_has_no_components() {
        let text = "g|u|preferred||\n\na|1024|0|1024|1000|1000|4|Y|u|1\n\n\n\n";
        assert!(components(&text::parse(text).unwrap()).is_empty());
    }

    /// Applies `mv`, re-scores only the touched nodes and checks the running
    /// totals against a from-scratch aggregation of the same node values.
    fn check_moves(c: &mut Cluster, picks: &[(usize, usize)]) -> Result<(), TestCaseError> {
        let ctx = Context::new(c);
        let online: Vec<bool> = c.nodes.iter().map(|n| !n.offline).collect();
        let mut values = all_node_values(&ctx, c);
        let mut totals = Totals::new(&values, &online);
        let fresh = score(c);
        prop_assert!(
            close_score(totals.score(), fresh),
            "{} vs {}",
            totals.score(),
            fresh
        );
        let mut touched = vec![false; c.nodes.len()];
        for &(i, n) in picks {
            if c.instances.is_empty() || c.nodes.len() < 2 {
                break;
            }
            let inst = InstId::from_index(i % c.instances.len());
            let from = c.instance(inst).primary;
            let to = match c.mobility(inst) {
                Mobility::AnyNode => NodeId::from_index(n % c.nodes.len()),
                Mobility::SecondaryOnly(s) => s,
                Mobility::Immovable => continue,
            };
            if c.apply_move(Move { inst, from, to }).is_err() {
                continue;
            }
            let by_node = c.instances_by_node();
            for node in [from, to] {
                touched[node.index()] = true;
                let new = node_values(
                    &ctx,
                    c,
                    NodeView {
                        node,
                        primaries: &by_node.primaries[node.index()],
                        secondaries: &by_node.secondaries[node.index()],
                        touched: true,
                    },
                );
                let on = online[node.index()];
                totals.remove(&values[node.index()], on);
                totals.add(&new, on);
                values[node.index()] = new;
            }
            let exact: f64 = aggregate(&values, &online)
                .iter()
                .fold(0.0, |a, (_, w, v)| a + w * v);
            prop_assert!(
                close_score(totals.score(), exact),
                "{} vs {}",
                totals.score(),
                exact
            );
        }
        // Rebuilding every node from the moved cluster gives the same values.
        let by_node = c.instances_by_node();
        for node in c.node_ids() {
            let again = node_values(
                &ctx,
                c,
                NodeView {
                    node,
                    primaries: &by_node.primaries[node.index()],
                    secondaries: &by_node.secondaries[node.index()],
                    touched: touched[node.index()],
                },
            );
            let same = again
                .values
                .iter()
                .zip(&values[node.index()].values)
                .all(|(a, b)| close(*a, *b));
            prop_assert!(same && again.pairs == values[node.index()].pairs);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn running_totals_follow_moves(
            seed in any::<u64>(),
            nodes in 2usize..16,
            instances in 1usize..80,
            picks in proptest::collection::vec((any::<usize>(), any::<usize>()), 1..20),
        ) {
            let shape = Shape { groups: 2, nodes, instances, tagged: true };
            let mut c = generate::cluster(seed, shape);
            check_moves(&mut c, &picks)?;
        }
    }

    #[test]
    fn memory_missing_at_load_stays_missing_after_a_move() {
        // With no DRBD peers the N+1 rule cannot differ, so a round trip is exact.
        let text = "g|u|preferred||\n\n\
                    a|4096|0|3000|1000|1000|4|N|u|1\n\
                    b|4096|0|4096|1000|1000|4|N|u|1\n\n\
                    i|1024|10|2|running|Y|a||ext||1\n\n\n";
        let mut c = text::parse(text).unwrap();
        let before = score(&c);
        let (a, b, i) = (NodeId(0), NodeId(1), InstId(0));
        c.apply_move(Move {
            inst: i,
            from: a,
            to: b,
        })
        .unwrap();
        let ctx = Context::new(&text::parse(text).unwrap());
        let by_node = c.instances_by_node();
        let vals: Vec<NodeValues> = c
            .node_ids()
            .map(|node| {
                node_values(
                    &ctx,
                    &c,
                    NodeView {
                        node,
                        primaries: &by_node.primaries[node.index()],
                        secondaries: &by_node.secondaries[node.index()],
                        touched: true,
                    },
                )
            })
            .collect();
        // Node a reported 72 MiB less free than its record; after its only
        // instance leaves, Ganeti still holds those 72 MiB back.
        assert!(close(vals[0].values[0], (4096.0 - 72.0) / 4096.0));
        c.apply_move(Move {
            inst: i,
            from: b,
            to: a,
        })
        .unwrap();
        assert!(close(score(&c), before));
    }
}
