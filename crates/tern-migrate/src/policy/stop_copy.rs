//! Plain stop-and-copy: pause at once and send all of memory. The baseline every
//! pre-copy policy must beat on downtime.

use super::{Decision, Policy, PolicyInput, StopReason};

/// Never iterate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StopCopy;

impl Policy for StopCopy {
    fn name(&self) -> &'static str {
        "stop-copy"
    }

    fn decide(&self, _input: &PolicyInput<'_>) -> Decision {
        Decision::StopAndCopy {
            reason: StopReason::Immediate,
        }
    }
}
