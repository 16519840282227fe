//! QEMU's rule: keep iterating until what remains can be sent within the downtime budget.
//! It has no cap of its own, so a guest that dirties faster than the link never converges
//! and only the safety caps of [`super::Limits`] end the migration.

use super::{Decision, Policy, PolicyInput, StopReason};

/// Stop when the predicted downtime fits [`super::Limits::downtime_limit_s`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QemuRule;

impl Policy for QemuRule {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn decide(&self, input: &PolicyInput<'_>) -> Decision {
        match input.last() {
            Some(last) if last.remaining_pages == 0 => Decision::StopAndCopy {
                reason: StopReason::NothingDirty,
            },
            Some(last) if last.predicted_downtime_s <= input.limits.downtime_limit_s => {
                Decision::StopAndCopy {
                    reason: StopReason::FitsDowntime,
                }
            }
            _ => Decision::Continue { hold_back: vec![] },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::round;
    use super::super::Limits;
    use super::*;
    use crate::fragment::FragmentTracker;

    fn decide(history: &[crate::RoundTelemetry]) -> Decision {
        let limits = Limits::new(1000, 4096);
        let tracker = FragmentTracker::new(1000, 512);
        QemuRule.decide(&PolicyInput {
            history,
            fragments: &tracker,
            limits: &limits,
        })
    }

    #[test]
    fn iterates_until_the_remainder_fits_the_budget() {
        assert_eq!(decide(&[]), Decision::Continue { hold_back: vec![] });
        assert_eq!(
            decide(&[round(1, 500, 0.31)]),
            Decision::Continue { hold_back: vec![] }
        );
        assert_eq!(
            decide(&[round(1, 500, 0.31), round(2, 400, 0.3)]),
            Decision::StopAndCopy {
                reason: StopReason::FitsDowntime
            }
        );
        assert_eq!(
            decide(&[round(1, 0, 0.0)]),
            Decision::StopAndCopy {
                reason: StopReason::NothingDirty
            }
        );
    }
}
