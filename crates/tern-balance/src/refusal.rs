//! The reasons a candidate move is refused, and their counts per plan.

use std::fmt;

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
