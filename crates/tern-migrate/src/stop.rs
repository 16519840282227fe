//! Why pre-copy iteration ended: the reason a policy or a safety cap gives, shared by
//! the policies that decide it and the telemetry that records it.

use serde::{Deserialize, Serialize};

/// Why iteration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The policy never iterates (plain stop-and-copy).
    Immediate,
    /// Nothing differs from the destination any more.
    NothingDirty,
    /// The predicted downtime fits the budget.
    FitsDowntime,
    /// Fewer dirty pages are left than the policy's threshold (Xen: 50).
    FewDirtyPages,
    /// A further round no longer shrinks what remains, and the remainder fits the budget.
    NoLongerShrinking,
    /// The policy's own round cap (Xen: 30).
    RoundCap,
    /// The policy's own volume cap (Xen: 3× memory sent).
    VolumeCap,
    /// Throttling reached its maximum and the remainder still does not fit.
    ThrottleExhausted,
    /// The fixed cost of stopping (final scan, device state) alone exceeds the budget,
    /// so no amount of iterating or throttling can meet it.
    BudgetUnreachable,
    /// The safety cap [`Limits::max_rounds`](crate::policy::Limits::max_rounds) was reached.
    SafetyRounds,
    /// The safety cap [`Limits::max_elapsed_s`](crate::policy::Limits::max_elapsed_s) was reached.
    SafetyTime,
}

impl StopReason {
    /// Whether stopping for this reason means the policy reached its goal rather than
    /// being cut off by a cap.
    pub fn converged(self) -> bool {
        matches!(
            self,
            StopReason::Immediate
                | StopReason::NothingDirty
                | StopReason::FitsDowntime
                | StopReason::FewDirtyPages
                | StopReason::NoLongerShrinking
        )
    }
}
