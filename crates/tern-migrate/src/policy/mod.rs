//! Termination policies: after every pre-copy round, decide whether to run another round
//! (and what to hold back), throttle the guest, or stop and copy.
//!
//! ```text
//!            ┌──────────────── Continue { hold_back } ───────────────┐
//!            ▼                                                       │
//!   start ─► round n ─► telemetry + fragment tracker ─► decide() ────┤
//!                                                          │         │
//!                                      Throttle { percent }─┘         │
//!                                                                    ▼
//!                                            StopAndCopy { reason } ─► pause, final pass
//! ```
//!
//! [`decide`] is the one entry point for both the model and the engine: it applies the
//! safety caps of [`Limits`] and otherwise asks the [`Policy`]. Policies are pure: the
//! same history always yields the same decision. One file per policy.

mod adaptive;
mod qemu;
mod stop_copy;
mod throttle;
mod xen;

use serde::{Deserialize, Serialize};

pub use adaptive::Adaptive;
pub use qemu::QemuRule;
pub use stop_copy::StopCopy;
pub use throttle::{cpu_max, cpu_quota_percent, throttle_for};
pub use xen::Xen;

use crate::fragment::{FragmentId, FragmentTracker};
use crate::telemetry::{FirstRoundProbe, RoundTelemetry};
pub use tern_api::migration::{PolicyKind, StopReason, UnknownPolicy};

/// Downtime budget QEMU uses by default (`downtime-limit`, 300 ms).
pub const DEFAULT_DOWNTIME_LIMIT_S: f64 = 0.3;
/// Rounds after which any policy is stopped, so a migration that cannot converge ends.
pub const DEFAULT_MAX_ROUNDS: u32 = 100;

/// Bounds that hold for every policy, and the facts about the guest a policy may need.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Longest acceptable pause of the VM.
    pub downtime_limit_s: f64,
    /// Safety cap on live rounds; reaching it forces a stop-and-copy (not converged).
    pub max_rounds: u32,
    /// Safety cap on time spent iterating, if any.
    pub max_elapsed_s: Option<f64>,
    /// Guest memory in pages.
    pub memory_pages: u64,
    /// Page size in bytes.
    pub page_size: u64,
}

impl Limits {
    /// Default limits for a guest of `memory_pages` pages of `page_size` bytes.
    pub fn new(memory_pages: u64, page_size: u64) -> Self {
        Limits {
            downtime_limit_s: DEFAULT_DOWNTIME_LIMIT_S,
            max_rounds: DEFAULT_MAX_ROUNDS,
            max_elapsed_s: None,
            memory_pages,
            page_size,
        }
    }
}

/// Everything a policy sees when it decides.
#[derive(Debug, Clone, Copy)]
pub struct PolicyInput<'a> {
    /// Completed rounds, oldest first; empty before round 1.
    pub history: &'a [RoundTelemetry],
    /// Re-dirtying history per fragment, fed with the same rounds as `history`.
    pub fragments: &'a FragmentTracker,
    pub limits: &'a Limits,
}

impl PolicyInput<'_> {
    /// The most recent round, if any.
    pub fn last(&self) -> Option<&RoundTelemetry> {
        self.history.last()
    }

    /// Pages sent over all rounds so far.
    pub fn pages_sent_total(&self) -> u64 {
        self.history.iter().map(|r| r.pages_sent).sum()
    }

    /// Throttle in effect during the last round.
    pub fn current_throttle(&self) -> u8 {
        self.last().map_or(0, |r| r.throttle_percent)
    }
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Run another round, sending every changed page except those in `hold_back`
    /// (fragment ids, ascending), which wait for the stop-and-copy.
    Continue { hold_back: Vec<FragmentId> },
    /// Take `percent` of vCPU time away from the guest (QEMU's
    /// `cpu-throttle-percentage` meaning), then run another round as in `Continue`.
    Throttle {
        percent: u8,
        hold_back: Vec<FragmentId>,
    },
    /// Pause the VM and send everything that still differs.
    StopAndCopy { reason: StopReason },
}

/// A termination policy. Implementations are pure and cheap to call; `Send + Sync` so
/// that one policy value can serve migrations evaluated in parallel.
pub trait Policy: Send + Sync {
    /// Name as the CLI and outcomes spell it.
    fn name(&self) -> &'static str;

    /// The policy's own decision; callers use [`decide`], which applies safety caps first.
    fn decide(&self, input: &PolicyInput<'_>) -> Decision;

    /// Throttle percent to apply for the rest of round 1, from what the engine saw
    /// after sending its first stretch; 0 (the default) lets round 1 run unthrottled.
    fn first_round_throttle(&self, _probe: &FirstRoundProbe, _limits: &Limits) -> u8 {
        0
    }

    /// Whether the guest's untainted processes are frozen for the move (the
    /// dependency-aware policy): their writes stop, so the models leave out the share
    /// of the dirty rate [`MigrationParams::untainted_write_share`](crate::MigrationParams::untainted_write_share)
    /// says is theirs.
    fn freezes_untainted(&self) -> bool {
        false
    }
}

/// Next step for a migration: the safety caps of `input.limits`, then `policy`.
pub fn decide(policy: &dyn Policy, input: &PolicyInput<'_>) -> Decision {
    if let Some(last) = input.last() {
        if last.round >= input.limits.max_rounds {
            return Decision::StopAndCopy {
                reason: StopReason::SafetyRounds,
            };
        }
        if input
            .limits
            .max_elapsed_s
            .is_some_and(|m| last.elapsed_s >= m)
        {
            return Decision::StopAndCopy {
                reason: StopReason::SafetyTime,
            };
        }
    }
    policy.decide(input)
}

impl Policy for PolicyKind {
    fn freezes_untainted(&self) -> bool {
        matches!(self, PolicyKind::DependencyAware)
    }

    fn name(&self) -> &'static str {
        self.as_str()
    }

    fn decide(&self, input: &PolicyInput<'_>) -> Decision {
        match self {
            PolicyKind::Qemu => QemuRule.decide(input),
            PolicyKind::Xen => Xen::default().decide(input),
            // Its difference is in the guest (untainted processes frozen); the rounds
            // over what still changes follow the adaptive rules.
            PolicyKind::Adaptive | PolicyKind::DependencyAware => Adaptive::default().decide(input),
            PolicyKind::StopCopy => StopCopy.decide(input),
        }
    }

    fn first_round_throttle(&self, probe: &FirstRoundProbe, limits: &Limits) -> u8 {
        match self {
            PolicyKind::Adaptive | PolicyKind::DependencyAware => {
                Adaptive::default().first_round_throttle(probe, limits)
            }
            PolicyKind::Qemu | PolicyKind::Xen | PolicyKind::StopCopy => 0,
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Builders for policy tests: a round with the given remainder.

    use super::*;

    pub fn round(round: u32, remaining_pages: u64, predicted_downtime_s: f64) -> RoundTelemetry {
        RoundTelemetry {
            round,
            pages_sent: 1000,
            bytes_sent: 1000 * 4096,
            pages_changed: remaining_pages,
            dirty_rate_bytes_per_s: 1e8,
            bandwidth_bytes_per_s: 1.25e8,
            remaining_pages,
            held_back_pages: 0,
            predicted_downtime_s,
            duration_s: 0.1,
            elapsed_s: 0.1 * round as f64,
            throttle_percent: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::round;
    use super::*;

    #[test]
    fn names_parse_with_aliases_and_unknown_names_are_refused() {
        assert_eq!("qemu-rule".parse::<PolicyKind>(), Ok(PolicyKind::Qemu));
        assert_eq!("QEMU".parse::<PolicyKind>(), Ok(PolicyKind::Qemu));
        assert_eq!("none".parse::<PolicyKind>(), Ok(PolicyKind::StopCopy));
        for k in PolicyKind::ALL {
            assert_eq!(k.as_str().parse::<PolicyKind>(), Ok(k));
        }
        let err = "greedy".parse::<PolicyKind>().unwrap_err();
        assert!(err.to_string().contains("greedy"));
        assert!(err.to_string().contains("adaptive"));
    }

    #[test]
    fn safety_round_cap_overrides_the_policy() {
        let limits = Limits {
            max_rounds: 3,
            ..Limits::new(1000, 4096)
        };
        let tracker = FragmentTracker::new(1000, 512);
        let history: Vec<_> = (1..=3).map(|r| round(r, 900, 10.0)).collect();
        let input = PolicyInput {
            history: &history,
            fragments: &tracker,
            limits: &limits,
        };
        assert_eq!(
            decide(&PolicyKind::Qemu, &input),
            Decision::StopAndCopy {
                reason: StopReason::SafetyRounds
            }
        );
        assert!(!StopReason::SafetyRounds.converged());
    }
}
