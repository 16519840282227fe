//! One balancing round as the live manager runs it, pure: a snapshot of hosts and VMs,
//! the balancer's settings, the recent moves and the time go in; the moves to start,
//! with the scores and what was left out, come out. The manager and the simulator's
//! `balance` policy both call [`plan`], so the simulator runs exactly the manager's
//! decisions.
//!
//! The snapshot becomes a `tern_model::Cluster` ([`model`]) and the planner proposes
//! moves under the `spread` metric. What the planner never sees: VMs the caller marks
//! unmovable (pinned, in an affinity group, not running), VMs in their cooldown, and
//! hosts that are not active (offline to it). Anti-affinity groups become Ganeti
//! exclusion tags, which the planner honours.
//!
//! Each proposed move then passes, in order:
//! 1. the cost/benefit test: the peak CPU utilisation of the two hosts it removes, held
//!    for the cooldown, against the host time the migration itself burns (see
//!    [`MIGRATION_CORES`]); a move that costs more than it removes is skipped;
//! 2. the limits on concurrent migrations per host and in the cluster.

use std::collections::BTreeMap;

use tern_migrate::policy::PolicyKind;
use tern_model::{
    AllocPolicy, Cluster, Demand, DiskTemplate, DynUtil, Group, IPolicy, InstId, Instance,
    InstanceStatus, Node, NodeId,
};

use crate::{PlanOptions, Search};

/// Milliseconds since the Unix epoch (or since the start of a simulation).
pub type Millis = u64;

/// Aggressiveness 1-5 as the planner's thresholds, in the spirit of VMware DRS: level 1
/// makes only mandatory moves (evacuation), higher levels act on ever smaller imbalance.
/// `(stop when the spread score is at or below, least score drop per move times the
/// number of active hosts)`.
///
/// The second is scaled by the host count because the score is a standard deviation over
/// hosts: one move changes it by about (moved utilisation × utilisation gap) / hosts, so a
/// fixed threshold would stop a large cluster long before a small one.
pub const AGGRESSIVENESS: [(f64, f64); 5] = [
    (f64::INFINITY, f64::INFINITY),
    (0.20, 0.05),
    (0.10, 0.02),
    (0.05, 0.005),
    (0.01, 0.001),
];

/// Cores a live migration keeps busy while it runs (copying and hashing pages on the
/// source, receiving on the destination: about one core each, as measured for tern's
/// engine).
pub const MIGRATION_CORES: f64 = 2.0;

/// Link bandwidth assumed between hosts when estimating a migration's duration
/// (1 Gbit/s, the lab's shaped links).
pub const LINK_BYTES_PER_S: f64 = 125e6;

/// Memory a guest dirties per core it keeps busy; CPU-heavy guests dirty more.
pub const DIRTY_BYTES_PER_CORE_S: f64 = 20e6;

/// Rounds that may plan more moves than this use the lazy many-moves search.
pub const LAZY_FROM_MOVES: usize = 64;

pub use tern_api::manager::{BalancePlan, BalancerSettings, NotMoved, PlannedMove};

/// Why settings are refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("aggressiveness must be 1 (conservative) to 5 (aggressive), got {0}")]
    Aggressiveness(u8),
    #[error("interval_s and dead_after_s must be at least 1 second")]
    ZeroInterval,
    #[error("max_per_host and max_per_cluster must be at least 1")]
    ZeroLimit,
    #[error("smoothing_window must be at least 1 report")]
    ZeroWindow,
    /// A number past its bound: kept, it would overflow the time arithmetic of the
    /// control loop or stall it for ever.
    #[error("{field} must be at most {max}, got {got}")]
    TooLarge {
        field: &'static str,
        max: u64,
        got: u64,
    },
    #[error(
        "renew_s must be at least 1 and lease_s at least twice renew_s (got lease_s {lease_s}, \
         renew_s {renew_s}), so one lost renewal does not cost a host its lease"
    )]
    Lease { lease_s: u64, renew_s: u64 },
}

/// Upper bounds of the settings: a day between rounds or before a silent host is dead,
/// a week of cooldown, and limits no cluster tern runs comes near.
pub const SETTINGS_MAX: [(&str, u64); 8] = [
    ("interval_s", 86_400),
    ("cooldown_s", 604_800),
    ("max_per_host", 1_024),
    ("max_per_cluster", 65_536),
    ("dead_after_s", 86_400),
    ("smoothing_window", 1_000),
    ("lease_s", 3_600),
    ("renew_s", 1_800),
];

/// Checks settings before they steer a round: the manager's `PUT /v1/balancer` and the
/// simulator's `--settings` refuse what this refuses.
pub fn validate(s: &BalancerSettings) -> Result<(), SettingsError> {
    if !(1..=5).contains(&s.aggressiveness) {
        return Err(SettingsError::Aggressiveness(s.aggressiveness));
    }
    if s.interval_s == 0 || s.dead_after_s == 0 {
        return Err(SettingsError::ZeroInterval);
    }
    if s.max_per_host == 0 || s.max_per_cluster == 0 {
        return Err(SettingsError::ZeroLimit);
    }
    if s.smoothing_window == 0 {
        return Err(SettingsError::ZeroWindow);
    }
    let values = [
        s.interval_s,
        s.cooldown_s,
        u64::from(s.max_per_host),
        u64::from(s.max_per_cluster),
        s.dead_after_s,
        u64::from(s.smoothing_window),
        s.lease_s,
        s.renew_s,
    ];
    for ((field, max), got) in SETTINGS_MAX.into_iter().zip(values) {
        if got > max {
            return Err(SettingsError::TooLarge { field, max, got });
        }
    }
    if s.renew_s == 0 || s.lease_s < s.renew_s.saturating_mul(2) {
        return Err(SettingsError::Lease {
            lease_s: s.lease_s,
            renew_s: s.renew_s,
        });
    }
    // `default_policy` is a `PolicyKind`: an unknown name is refused when it is read.
    Ok(())
}

/// A host as the balancer sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    pub name: String,
    pub cpus: f64,
    pub memory_mib: u64,
    /// Takes part in balancing; VMs on an inactive host stay, none move to it.
    pub active: bool,
}

/// A VM as the balancer sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Vm {
    pub name: String,
    /// The host it runs on (or is being moved to); a VM on none is left out.
    pub host: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Cores it uses, as measured.
    pub cpu_used: f64,
    /// Whether `cpu_used` comes from a measurement; an unmeasured VM counts as idle.
    pub cpu_measured: bool,
    /// Whether the balancer may move it at all (false when pinned, in an affinity group
    /// or not running).
    pub movable: bool,
    pub anti_affinity: Option<String>,
}

/// A migration under way, which holds a slot on both hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InFlight {
    pub from: String,
    pub to: String,
}

/// What a round plans over. Hosts and VMs keep the order given; the manager gives them
/// sorted by name, and the plan depends on the order only through ties.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub hosts: Vec<Host>,
    pub vms: Vec<Vm>,
    pub in_flight: Vec<InFlight>,
}

/// A VM that finished moving at `at`; it sits out the cooldown after that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentMove {
    pub vm: String,
    pub at: Millis,
}

/// Exclusion-tag prefix for anti-affinity groups.
const ANTI_TAG: &str = "tern-anti:";

/// The planner's view of the snapshot, and the names behind its indices.
pub struct Model {
    pub cluster: Cluster,
    /// Node i is host `hosts[i]` of the snapshot.
    pub hosts: Vec<String>,
    /// Instance i is VM `vms[i]` of the snapshot (an index into `Snapshot::vms`).
    pub vms: Vec<usize>,
    /// VMs the planner must leave where they are.
    pub pinned: Vec<InstId>,
}

/// Builds the planner's cluster from the snapshot (see the module doc for what is pinned).
pub fn model(
    snap: &Snapshot,
    settings: &BalancerSettings,
    history: &[RecentMove],
    now: Millis,
) -> Model {
    let hosts: Vec<String> = snap.hosts.iter().map(|h| h.name.clone()).collect();
    let index: BTreeMap<&str, NodeId> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.as_str(), NodeId::from_index(i)))
        .collect();
    let mut used: BTreeMap<&str, u64> = BTreeMap::new();
    for v in &snap.vms {
        if let Some(h) = &v.host {
            *used.entry(h.as_str()).or_default() += v.memory_mib;
        }
    }
    let nodes = snap
        .hosts
        .iter()
        .map(|h| {
            let mem = h.memory_mib as i64;
            let free = mem - used.get(h.name.as_str()).copied().unwrap_or(0) as i64;
            Node::live(h.name.clone(), h.cpus, mem as f64, free, !h.active)
        })
        .collect();
    let cooldown = settings.cooldown_s.saturating_mul(1000);
    let mut last_moved: BTreeMap<&str, Millis> = BTreeMap::new();
    for m in history {
        let t = last_moved.entry(m.vm.as_str()).or_default();
        *t = (*t).max(m.at);
    }
    let mut vms = Vec::new();
    let mut instances = Vec::new();
    let mut pinned = Vec::new();
    for (vi, v) in snap.vms.iter().enumerate() {
        let Some(node) = v.host.as_deref().and_then(|h| index.get(h)) else {
            continue;
        };
        let id = InstId::from_index(instances.len());
        let on_active = snap.hosts[node.index()].active;
        let cooling = last_moved
            .get(v.name.as_str())
            .is_some_and(|&t| now.saturating_sub(t) < cooldown);
        if !v.movable || cooling || !on_active {
            pinned.push(id);
        }
        vms.push(vi);
        instances.push(Instance {
            name: v.name.clone(),
            mem: v.memory_mib as i64,
            disk: 0,
            vcpus: i64::from(v.vcpus),
            status: InstanceStatus::Running,
            auto_balance: true,
            primary: *node,
            secondary: None,
            disk_template: DiskTemplate::Diskless,
            tags: v
                .anti_affinity
                .iter()
                .map(|g| format!("{ANTI_TAG}{g}"))
                .collect(),
            spindle_use: 0,
            spindles: None,
            forthcoming: false,
            util: DynUtil::BASE,
            demand: Demand {
                // A VM seen running with no measured load counts as (almost) idle, not
                // as its vCPU count, which the planner assumes for unmeasured VMs.
                cpu_cores: if v.cpu_measured {
                    v.cpu_used.max(1e-6)
                } else {
                    0.0
                },
                mem_used_mib: v.memory_mib as f64,
            },
        });
    }
    let cluster = Cluster {
        groups: vec![Group {
            name: "default".into(),
            uuid: "00000000-0000-0000-0000-000000000000".into(),
            alloc_policy: AllocPolicy::Preferred,
            tags: Vec::new(),
            networks: Vec::new(),
            ipolicy: IPolicy {
                // Memory is the hard limit; CPU is what the balancer spreads.
                vcpu_ratio: f64::MAX,
                ..IPolicy::default()
            },
        }],
        nodes,
        instances,
        tags: vec![format!("htools:iextags:{ANTI_TAG}")],
        ipolicy: IPolicy {
            vcpu_ratio: f64::MAX,
            ..IPolicy::default()
        },
    };
    Model {
        cluster,
        hosts,
        vms,
        pinned,
    }
}

/// Estimated seconds to live-migrate a VM of `memory_mib` using `cpu_used` cores under
/// `policy` over [`LINK_BYTES_PER_S`].
pub fn migration_seconds(memory_mib: u64, cpu_used: f64, policy: PolicyKind) -> f64 {
    let bytes = memory_mib * 1024 * 1024;
    let dirty = cpu_used.max(0.0) * DIRTY_BYTES_PER_CORE_S;
    tern_migrate::model::estimate_duration(bytes, dirty, LINK_BYTES_PER_S, &policy)
        // The model refuses only impossible inputs; treat one as a move not worth making.
        .unwrap_or(f64::INFINITY)
}

/// Migrations under way per host (as source or destination) and in all.
fn in_flight(snap: &Snapshot) -> (BTreeMap<&str, u32>, u32) {
    let mut per_host: BTreeMap<&str, u32> = BTreeMap::new();
    for m in &snap.in_flight {
        *per_host.entry(m.from.as_str()).or_default() += 1;
        *per_host.entry(m.to.as_str()).or_default() += 1;
    }
    (per_host, snap.in_flight.len() as u32)
}

/// Plans one round over `snap` at `now` (see the module doc). `history` holds the VMs'
/// recent moves; only those within the cooldown matter.
pub fn plan(
    snap: &Snapshot,
    s: &BalancerSettings,
    history: &[RecentMove],
    now: Millis,
) -> BalancePlan {
    let (min_score, gain_per_host) = AGGRESSIVENESS[usize::from(s.aggressiveness.clamp(1, 5)) - 1];
    let active = snap.hosts.iter().filter(|h| h.active).count();
    let min_gain = gain_per_host / active.max(1) as f64;
    let (busy, total) = in_flight(snap);
    let budget = s.max_per_cluster.saturating_sub(total) as usize;
    // Each migration takes a slot on two hosts.
    let host_slots = snap
        .hosts
        .iter()
        .filter(|h| h.active)
        .map(|h| {
            s.max_per_host
                .saturating_sub(busy.get(h.name.as_str()).copied().unwrap_or(0))
                as usize
        })
        .sum::<usize>()
        / 2;
    let m = model(snap, s, history, now);
    // Twice what the limits let through: some proposals fall to the per-host limit or the
    // cost test, and planning further would be wasted work.
    let max_moves = budget.min(host_slots).saturating_mul(2);
    let opts = PlanOptions {
        min_gain,
        min_gain_limit: f64::INFINITY,
        max_moves: Some(max_moves),
        min_score,
        n_plus_one: false,
        pinned: m.pinned.clone(),
        // Many moves per step where a round may plan many (a hard first round plans
        // thousands); a few moves cost less one at a time than the lazy search's set-up.
        search: if max_moves > LAZY_FROM_MOVES {
            Search::Lazy { width: 24 }
        } else {
            Search::Pruned { width: 24 }
        },
    };
    let mut out = BalancePlan::default();
    if budget == 0 || min_score.is_infinite() {
        let score = crate::plan_spread(
            &m.cluster,
            &PlanOptions {
                max_moves: Some(0),
                ..opts
            },
        );
        out.score_before = score.plan.initial_score;
        out.score_after = score.plan.final_score;
        if budget == 0 {
            out.skipped.insert(NotMoved::ClusterLimit, 1);
        }
        return out;
    }
    let planned = crate::plan_spread(&m.cluster, &opts);
    out.score_before = planned.plan.initial_score;
    out.score_after = planned.plan.final_score;
    for (r, n) in planned.refusals.iter() {
        out.skipped.insert(not_moved(r), n);
    }
    let policy = s.default_policy;
    // CPU load per host as the kept moves leave it.
    let mut load: Vec<f64> = vec![0.0; m.hosts.len()];
    for inst in &m.cluster.instances {
        load[inst.primary.index()] += cpu_of(inst);
    }
    let cap: Vec<f64> = m.cluster.nodes.iter().map(|n| n.pcpus.max(1e-9)).collect();
    // Free memory per host as the kept moves leave it: the planner checked room along its
    // whole sequence, and a dropped move can be the one that made room for a later one.
    let mut free_mem: Vec<i64> = m.cluster.nodes.iter().map(|n| n.free_mem).collect();
    let mut per_host: BTreeMap<String, u32> =
        busy.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    let skip = |out: &mut BalancePlan, why: NotMoved| *out.skipped.entry(why).or_default() += 1;
    let mut moved = vec![false; m.vms.len()];
    for mv in &planned.plan.moves {
        let (a, b) = (mv.from.index(), mv.to.index());
        let inst = &m.cluster.instances[mv.inst.index()];
        // A later proposal for a VM already moved this round, or from where it no longer
        // is, was planned on moves we dropped.
        if moved[mv.inst.index()] || inst.primary != mv.from {
            skip(&mut out, NotMoved::Superseded);
            continue;
        }
        let c = cpu_of(inst);
        let before = (load[a] / cap[a]).max(load[b] / cap[b]);
        let after = ((load[a] - c) / cap[a]).max((load[b] + c) / cap[b]);
        let vm = &snap.vms[m.vms[mv.inst.index()]];
        let gain = (before - after) * s.cooldown_s.max(1) as f64;
        let cost = migration_seconds(vm.memory_mib, vm.cpu_used, policy) * MIGRATION_CORES / 2.0
            * (1.0 / cap[a] + 1.0 / cap[b]);
        if cost >= gain {
            skip(&mut out, NotMoved::CostExceedsGain);
            continue;
        }
        if out.moves.len() >= budget {
            skip(&mut out, NotMoved::ClusterLimit);
            continue;
        }
        if free_mem[b] < inst.mem {
            skip(&mut out, NotMoved::NoMemory);
            continue;
        }
        let (from, to) = (&m.hosts[a], &m.hosts[b]);
        if [from, to]
            .iter()
            .any(|h| per_host.get(*h).copied().unwrap_or(0) >= s.max_per_host)
        {
            skip(&mut out, NotMoved::HostLimit);
            continue;
        }
        *per_host.entry(from.clone()).or_default() += 1;
        *per_host.entry(to.clone()).or_default() += 1;
        load[a] -= c;
        load[b] += c;
        free_mem[a] += inst.mem;
        free_mem[b] -= inst.mem;
        moved[mv.inst.index()] = true;
        out.moves.push(PlannedMove {
            vm: vm.name.clone(),
            from: from.clone(),
            to: to.clone(),
            gain,
            cost,
        });
    }
    out
}

/// The planner's refusal as the API names it.
fn not_moved(r: crate::Refusal) -> NotMoved {
    use crate::Refusal as R;
    match r {
        R::Immovable => NotMoved::Immovable,
        R::NotSecondary => NotMoved::NotSecondary,
        R::Pinned => NotMoved::Pinned,
        R::AutoBalanceOff => NotMoved::AutoBalanceOff,
        R::TargetOffline => NotMoved::TargetOffline,
        R::OtherGroup => NotMoved::OtherGroup,
        R::NoMemory => NotMoved::NoMemory,
        R::NPlusOne => NotMoved::NPlusOne,
        R::VcpuRatio => NotMoved::VcpuRatio,
        R::ExclusionTag => NotMoved::ExclusionTag,
    }
}

fn cpu_of(inst: &Instance) -> f64 {
    if inst.demand.cpu_cores > 0.0 {
        inst.demand.cpu_cores
    } else {
        inst.vcpus as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, active: bool) -> Host {
        Host {
            name: name.into(),
            cpus: 8.0,
            memory_mib: 65536,
            active,
        }
    }

    fn vm(name: &str, host: &str, cpu: f64) -> Vm {
        Vm {
            name: name.into(),
            host: Some(host.into()),
            vcpus: 1,
            memory_mib: 512,
            cpu_used: cpu,
            cpu_measured: true,
            movable: true,
            anti_affinity: None,
        }
    }

    /// Eight busy VMs on h0 of four hosts.
    fn piled() -> Snapshot {
        Snapshot {
            hosts: (0..4).map(|h| host(&format!("h{h}"), true)).collect(),
            vms: (0..8).map(|i| vm(&format!("v{i}"), "h0", 1.0)).collect(),
            in_flight: Vec::new(),
        }
    }

    #[test]
    fn settings_refuse_what_the_manager_refuses() {
        let s = BalancerSettings::default();
        assert_eq!(validate(&s), Ok(()));
        let bad = BalancerSettings {
            aggressiveness: 6,
            ..s.clone()
        };
        assert_eq!(validate(&bad), Err(SettingsError::Aggressiveness(6)));
        let huge = BalancerSettings {
            interval_s: u64::MAX,
            ..s.clone()
        };
        let e = validate(&huge).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("interval_s must be at most 86400"),
            "{e}"
        );
        let at_bounds = BalancerSettings {
            interval_s: 86_400,
            cooldown_s: 604_800,
            max_per_host: 1_024,
            max_per_cluster: 65_536,
            dead_after_s: 86_400,
            smoothing_window: 1_000,
            ..s.clone()
        };
        assert_eq!(validate(&at_bounds), Ok(()));
        let short_lease = BalancerSettings {
            lease_s: 5,
            renew_s: 3,
            ..s.clone()
        };
        assert!(matches!(
            validate(&short_lease),
            Err(SettingsError::Lease { .. })
        ));
        let mut old = serde_json::to_value(&s).unwrap();
        old.as_object_mut().unwrap().remove("lease_s");
        let old: BalancerSettings = serde_json::from_value(old).unwrap();
        assert_eq!(
            old.lease_s, 15,
            "settings stored before leases read as the default"
        );
        let mut json = serde_json::to_value(&s).unwrap();
        json["default_policy"] = "fast".into();
        let msg = serde_json::from_value::<BalancerSettings>(json)
            .unwrap_err()
            .to_string();
        assert!(msg.starts_with("unknown migration policy `fast`: use one of "));
        assert!(msg.contains("adaptive"), "{msg}");
    }

    #[test]
    fn limits_and_cooldown_bound_the_round() {
        let s = BalancerSettings {
            max_per_host: 2,
            ..BalancerSettings::default()
        };
        let p = plan(&piled(), &s, &[], 0);
        assert!(p.score_after < p.score_before);
        // h0 is in every move, so its two slots are all the round gets.
        assert_eq!(p.moves.len(), 2, "{p:?}");
        assert!(p.moves.iter().all(|m| m.from == "h0" && m.gain > m.cost));
        // A migration already under way from h0 takes one of them.
        let mut busy = piled();
        busy.in_flight.push(InFlight {
            from: "h0".into(),
            to: "h1".into(),
        });
        assert_eq!(plan(&busy, &s, &[], 0).moves.len(), 1);
        // VMs that moved within the cooldown stay; once it has passed they may move.
        let history: Vec<RecentMove> = (0..8)
            .map(|i| RecentMove {
                vm: format!("v{i}"),
                at: 1_000,
            })
            .collect();
        assert!(plan(&piled(), &s, &history, 2_000).moves.is_empty());
        let after = 1_000 + s.cooldown_s * 1000;
        assert_eq!(plan(&piled(), &s, &history, after).moves.len(), 2);
    }

    #[test]
    fn inactive_hosts_and_unmovable_vms_are_left_alone() {
        let s = BalancerSettings {
            max_per_host: 8,
            ..BalancerSettings::default()
        };
        let mut snap = piled();
        for h in &mut snap.hosts[2..] {
            h.active = false;
        }
        snap.vms[0].movable = false;
        let p = plan(&snap, &s, &[], 0);
        assert!(!p.moves.is_empty());
        assert!(
            p.moves.iter().all(|m| m.to == "h1" && m.vm != "v0"),
            "{p:?}"
        );
    }
}
