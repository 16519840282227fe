//! Policies decide, once per scheduling interval, which VMs to move where. One small
//! file per policy; each reads the simulator state and returns moves, nothing else.

mod balance;
mod none;
mod spread;
mod thr_mmt;

pub use balance::{host_name, vm_name, Balance};
pub use none::Static;
pub use spread::Spread;
pub use thr_mmt::ThrMmt;

use crate::state::State;
use crate::SimError;

/// Start migrating `vm` to host `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub vm: u32,
    pub to: u32,
}

/// A consolidation or balancing policy.
pub trait Policy {
    /// The name the command line uses.
    fn name(&self) -> &'static str;
    /// The moves to start now. Must not name a VM that is already migrating.
    fn plan(&mut self, state: &State, now: f64) -> Vec<Move>;
}

/// Policy names `by_name` accepts.
pub const POLICY_NAMES: [&str; 4] = ["none", "thr-mmt", "spread", "balance"];

/// Builds a policy from its command-line name; `threshold` is the overload threshold.
/// `balance` gets the manager's default settings ([`Balance::new`] takes others).
pub fn by_name(name: &str, threshold: f64) -> Result<Box<dyn Policy>, SimError> {
    match name {
        "none" => Ok(Box::new(Static)),
        "thr-mmt" => Ok(Box::new(ThrMmt::new(threshold))),
        "spread" => Ok(Box::new(Spread::new())),
        "balance" => Ok(Box::new(Balance::default())),
        other => Err(SimError::UnknownPolicy(other.to_string())),
    }
}
