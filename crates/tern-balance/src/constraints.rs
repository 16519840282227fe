//! Hard constraints on a live migration, and the reasons a candidate is refused.
//!
//! Mirrors the checks Ganeti's `addPriEx` makes when hbal tries a move (memory,
//! N+1, vCPU ratio, exclusion tags), plus tern's own (pinning, offline target).

use std::fmt;

use tern_model::{Cluster, InstId, Mobility, NodeId};

use crate::metric::{Metric, NodeLoad};
use crate::state::State;

/// Why a candidate move was refused. Counted per plan so a user can see what
/// held the balancer back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Refusal {
    /// `plain`/`file` disks, or DRBD without a secondary.
    Immovable,
    /// DRBD instances only move to their secondary.
    NotSecondary,
    /// Pinned by the caller.
    Pinned,
    /// The instance's `auto_balance` flag is off.
    AutoBalanceOff,
    /// Target is offline or drained.
    TargetOffline,
    /// Target lies in another node group.
    OtherGroup,
    /// Not enough free memory on the target.
    NoMemory,
    /// The target (or, for DRBD, the new secondary) would fail N+1.
    NPlusOne,
    /// Too many virtual CPUs per physical CPU on the target.
    VcpuRatio,
    /// The target already runs an instance with the same exclusion tag.
    ExclusionTag,
}

impl Refusal {
    pub const ALL: [Refusal; 10] = [
        Refusal::Immovable,
        Refusal::NotSecondary,
        Refusal::Pinned,
        Refusal::AutoBalanceOff,
        Refusal::TargetOffline,
        Refusal::OtherGroup,
        Refusal::NoMemory,
        Refusal::NPlusOne,
        Refusal::VcpuRatio,
        Refusal::ExclusionTag,
    ];

    /// Stable snake_case name, for JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Immovable => "immovable",
            Refusal::NotSecondary => "not_secondary",
            Refusal::Pinned => "pinned",
            Refusal::AutoBalanceOff => "auto_balance_off",
            Refusal::TargetOffline => "target_offline",
            Refusal::OtherGroup => "other_group",
            Refusal::NoMemory => "no_memory",
            Refusal::NPlusOne => "n_plus_one",
            Refusal::VcpuRatio => "vcpu_ratio",
            Refusal::ExclusionTag => "exclusion_tag",
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How often each refusal occurred.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    counts: [u64; Refusal::ALL.len()],
}

impl Refusals {
    pub fn add(&mut self, r: Refusal) {
        self.counts[r as usize] += 1;
    }

    pub fn get(&self, r: Refusal) -> u64 {
        self.counts[r as usize]
    }

    pub fn merge(&mut self, other: &Refusals) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
    }

    /// Non-zero counts, in [`Refusal::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (Refusal, u64)> + '_ {
        Refusal::ALL
            .iter()
            .map(|&r| (r, self.get(r)))
            .filter(|(_, c)| *c > 0)
    }
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

/// Whether `inst` may move at all (independent of the target).
pub fn check_instance<M: Metric + ?Sized>(
    state: &State<'_, M>,
    inst: InstId,
    pinned: &[bool],
) -> Result<(), Refusal> {
    let i = state.cluster.instance(inst);
    if pinned.get(inst.index()).copied().unwrap_or(false) {
        return Err(Refusal::Pinned);
    }
    if !i.auto_balance {
        return Err(Refusal::AutoBalanceOff);
    }
    if i.forthcoming || state.mobility(inst) == Mobility::Immovable {
        return Err(Refusal::Immovable);
    }
    Ok(())
}

/// Whether `inst` may move to `to`, given the state's current placement.
pub fn check_target<M: Metric + ?Sized>(
    state: &State<'_, M>,
    inst: InstId,
    to: NodeId,
    n_plus_one: bool,
) -> Result<(), Refusal> {
    let after = state.load_after_in(inst, to);
    let src_after = state.load_after_out(inst, to);
    check_target_with(state, inst, to, n_plus_one, &after, &src_after)
}

/// [`check_target`] with the target's and source's loads after the move given.
pub fn check_target_with<M: Metric + ?Sized>(
    state: &State<'_, M>,
    inst: InstId,
    to: NodeId,
    n_plus_one: bool,
    after: &NodeLoad,
    src_after: &NodeLoad,
) -> Result<(), Refusal> {
    let from = state.primary_of(inst);
    match state.mobility(inst) {
        Mobility::Immovable => return Err(Refusal::Immovable),
        Mobility::SecondaryOnly(s) if s != to => return Err(Refusal::NotSecondary),
        _ => {}
    }
    let cluster = state.cluster;
    let target = cluster.node(to);
    if target.offline {
        return Err(Refusal::TargetOffline);
    }
    if target.group != cluster.node(from).group {
        return Err(Refusal::OtherGroup);
    }
    let i = cluster.instance(inst);
    let before = state.load(to);
    if after.free_mem <= 0.0 {
        return Err(Refusal::NoMemory);
    }
    if n_plus_one {
        let failed_before = before.free_mem <= before.reserved_mem;
        if after.free_mem <= after.reserved_mem && !failed_before {
            return Err(Refusal::NPlusOne);
        }
        if matches!(state.mobility(inst), Mobility::SecondaryOnly(_)) {
            let src_before = state.load(from);
            if src_after.free_mem <= src_after.reserved_mem
                && src_before.free_mem > src_before.reserved_mem
            {
                return Err(Refusal::NPlusOne);
            }
        }
    }
    let ratio = state.vcpu_ratio[to.index()];
    if ratio >= 0.0 && after.vcpus / target.pcpus > ratio && i.status.uses_memory() {
        return Err(Refusal::VcpuRatio);
    }
    if state.tag_clash(to, inst) {
        return Err(Refusal::ExclusionTag);
    }
    Ok(())
}
