//! Hard constraints on a live migration, and the reasons a candidate is refused.
//!
//! Mirrors the checks Ganeti's `addPriEx` makes when hbal tries a move (memory,
//! N+1, vCPU ratio, exclusion tags), plus tern's own (pinning, offline target), and
//! the planner state's checked moves ([`State::check`], [`State::try_move`]).

use tern_model::{InstId, Mobility, NodeId};

use crate::metric::{Metric, NodeLoad};
pub use crate::refusal::{Refusal, Refusals};
use crate::state::State;

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

impl<M: Metric + ?Sized> State<'_, M> {
    /// Checks every hard constraint for moving `inst` to `to`.
    pub fn check(&self, inst: InstId, to: NodeId, n_plus_one: bool) -> Result<(), Refusal> {
        check_target(self, inst, to, n_plus_one)
    }

    /// Checks and scores moving `inst` to `to` in one pass, given the source's
    /// state after the move from [`State::source_after`].
    pub fn try_move(
        &self,
        inst: InstId,
        to: NodeId,
        n_plus_one: bool,
        from_load: &NodeLoad,
        from_vals: &[f64],
        scratch: &mut [f64],
    ) -> Result<f64, Refusal> {
        let to_load = self.load_after_in(inst, to);
        check_target_with(self, inst, to, n_plus_one, &to_load, from_load)?;
        self.metric.node_values(
            self.cluster,
            to,
            &to_load,
            &mut scratch[..self.components_len()],
        );
        Ok(self.score_values(inst, to, from_vals, &scratch[..self.components_len()]))
    }
}
