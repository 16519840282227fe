//! Agents as the manager sees them: one small trait, [`HostClient`], with a real HTTP
//! implementation ([`http`]) for `tern agent` and an in-process one ([`sim`]) over the
//! `sim` hypervisor driver, for the demo and for tests at scale.
//!
//! A [`Connector`] finds the client of a host from its record, so the control loop does
//! not care which kind it talks to.

pub mod http;
pub mod sim;

use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tern_migrate::RoundTelemetry;

use crate::decide::LoadReport;
use crate::error::Result;
use crate::state::{Host, MigrationResult, VmSpec};

/// What the manager asks of a host's agent.
#[async_trait]
pub trait HostClient: Send + Sync {
    /// Creates and starts `vm`.
    async fn create_vm(&self, vm: &str, spec: &VmSpec) -> Result<()>;
    /// Destroys `vm`; a VM the host does not have counts as destroyed.
    async fn delete_vm(&self, vm: &str) -> Result<()>;
    /// Live-migrates `vm` from this host to `to` with the termination policy `policy`;
    /// on failure the VM keeps running here. `progress` is told the telemetry each time
    /// it changes while the migration runs.
    async fn migrate_vm(
        &self,
        vm: &str,
        spec: &VmSpec,
        to: &Host,
        policy: &str,
        progress: ProgressFn<'_>,
    ) -> Result<MigrationResult>;
    /// The host's current load and the VMs it runs.
    async fn load_report(&self) -> Result<LoadReport>;
}

/// Finds the client for a host.
pub trait Connector: Send + Sync {
    fn client(&self, host: &Host) -> Result<Arc<dyn HostClient>>;
}

/// Where a running migration's telemetry goes.
pub type ProgressFn<'a> = &'a (dyn Fn(Progress) + Send + Sync);

/// Bytes per guest page, in the agent's engine and in the model alike.
const PAGE_BYTES: u64 = 4096;

/// A running migration's latest telemetry, as its source reports it: the same shape
/// whether it comes from a real agent's engine or from the pre-copy model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The source's phase: `preparing`, `connecting`, `pre_copy`, `stop_and_copy`,
    /// `device_state` or `resuming`.
    pub phase: String,
    /// Pre-copy rounds completed.
    pub round: u32,
    /// Bytes put on the wire so far.
    pub bytes_transferred: u64,
    /// Bytes that differ from the destination's copy: what a stop now would send.
    pub bytes_remaining: u64,
    /// How fast the guest dirtied memory in the last round.
    pub dirty_rate_bytes_per_s: f64,
    /// The link's throughput in the last round.
    pub bandwidth_bytes_per_s: f64,
    /// The downtime if the VM were paused now.
    pub predicted_downtime_ms: f64,
    /// Since the migration started, at the last round's end.
    pub elapsed_ms: u64,
}

impl Progress {
    /// The telemetry after `rounds` of a guest with `memory_bytes` (pure): totals over
    /// every round, rates from the last; before the first round all memory remains.
    pub fn after_rounds(phase: &str, memory_bytes: u64, rounds: &[RoundTelemetry]) -> Self {
        let last = rounds.last();
        Self {
            phase: phase.to_owned(),
            round: last.map_or(0, |r| r.round),
            bytes_transferred: rounds.iter().map(|r| r.bytes_sent).sum(),
            bytes_remaining: last.map_or(memory_bytes, |r| r.remaining_pages * PAGE_BYTES),
            dirty_rate_bytes_per_s: last.map_or(0.0, |r| r.dirty_rate_bytes_per_s),
            bandwidth_bytes_per_s: last.map_or(0.0, |r| r.bandwidth_bytes_per_s),
            predicted_downtime_ms: last.map_or(0.0, |r| r.predicted_downtime_s * 1e3),
            elapsed_ms: last.map_or(0, |r| (r.elapsed_s * 1e3).round() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(n: u32, sent: u64, remaining_pages: u64) -> RoundTelemetry {
        RoundTelemetry {
            round: n,
            pages_sent: sent / PAGE_BYTES,
            bytes_sent: sent,
            pages_changed: 0,
            dirty_rate_bytes_per_s: f64::from(n) * 1e6,
            bandwidth_bytes_per_s: 1e8,
            remaining_pages,
            held_back_pages: 0,
            predicted_downtime_s: 0.25,
            duration_s: 1.0,
            elapsed_s: f64::from(n) * 1.5,
            throttle_percent: 0,
        }
    }

    #[test]
    fn progress_sums_bytes_and_takes_rates_from_the_last_round() {
        let p = Progress::after_rounds(
            "pre_copy",
            1 << 20,
            &[round(1, 8192, 10), round(2, 4096, 3)],
        );
        assert_eq!(p.round, 2);
        assert_eq!(p.bytes_transferred, 12288);
        assert_eq!(p.bytes_remaining, 3 * 4096);
        assert_eq!(p.dirty_rate_bytes_per_s, 2e6);
        assert_eq!(p.predicted_downtime_ms, 250.0);
        assert_eq!(p.elapsed_ms, 3000);
        let none = Progress::after_rounds("connecting", 1 << 20, &[]);
        assert_eq!((none.round, none.bytes_transferred), (0, 0));
        assert_eq!(none.bytes_remaining, 1 << 20);
        assert_eq!(none.phase, "connecting");
    }
}
