//! What one pre-copy round and one whole migration report. The engine fills these from
//! measurements, the model from its equations; policies read only these values.

use serde::{Deserialize, Serialize};

use tern_api::migration::StopReason;
pub use tern_api::migration::{FirstRoundProbe, RoundProgress, RoundTelemetry, WriterSeen};

/// Result of one migration, simulated or real.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationOutcome {
    /// Name of the policy that decided when to stop.
    pub policy: String,
    /// From the start of round 1 to the VM running on the destination.
    pub total_time_s: f64,
    /// Time the VM was paused: the stop-and-copy plus the fixed stop cost.
    pub downtime_s: f64,
    /// Bytes sent in all rounds and in the stop-and-copy.
    pub bytes_sent: u64,
    /// Live pre-copy rounds before the stop-and-copy (0 for a pure stop-and-copy).
    pub rounds: u32,
    /// Whether the policy stopped because its goal was met, not because a cap forced it.
    pub converged: bool,
    /// Why iteration ended.
    pub stop_reason: StopReason,
    /// Highest throttle applied, 0 if the guest ran at full speed throughout.
    pub max_throttle_percent: u8,
    /// Per-round telemetry, in order.
    pub telemetry: Vec<RoundTelemetry>,
}

impl MigrationOutcome {
    /// Total time in whole milliseconds, as the engine's result reports it.
    pub fn total_ms(&self) -> u64 {
        secs_to_ms(self.total_time_s)
    }

    /// Downtime in whole milliseconds, as the engine's result reports it.
    pub fn downtime_ms(&self) -> u64 {
        secs_to_ms(self.downtime_s)
    }
}

fn secs_to_ms(s: f64) -> u64 {
    (s * 1000.0).round().max(0.0) as u64
}
