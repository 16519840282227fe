//! What one pre-copy round and one whole migration report. The engine fills these from
//! measurements, the model from its equations; policies read only these values.

use serde::{Deserialize, Serialize};

use crate::stop::StopReason;

/// Telemetry of one completed pre-copy round.
///
/// Times are seconds and rates bytes per second, as `f64`, because the simulator adds
/// thousands of them and the engine measures them with sub-millisecond resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundTelemetry {
    /// 1-based round number; round 1 is the first full pass over memory.
    pub round: u32,
    /// Pages put on the wire in this round.
    pub pages_sent: u64,
    /// Bytes put on the wire in this round (after compression and zero-page flags, for the
    /// engine; pages times page size, for the model).
    pub bytes_sent: u64,
    /// Distinct pages whose content changed while this round ran, whether or not they
    /// belong to a held-back fragment: the dirtying the guest did, not what will be sent.
    pub pages_changed: u64,
    /// `pages_changed` times page size over the round's duration: the guest's effective
    /// dirty rate as seen through one round (a page rewritten twice counts once).
    pub dirty_rate_bytes_per_s: f64,
    /// Throughput the link gave this round; policies use it to predict the downtime of
    /// a stop-and-copy and to size a throttle.
    pub bandwidth_bytes_per_s: f64,
    /// Pages that differ from the destination's copy at the end of the round, held-back
    /// fragments included: what a stop-and-copy started now would send.
    pub remaining_pages: u64,
    /// Of `remaining_pages`, those in fragments the policy held back this round.
    pub held_back_pages: u64,
    /// `remaining_pages` over the bandwidth, plus the fixed cost of stopping (final scan,
    /// device state): the downtime if the VM were paused now.
    pub predicted_downtime_s: f64,
    /// Wall time of this round.
    pub duration_s: f64,
    /// Time since the migration started, at the end of this round.
    pub elapsed_s: f64,
    /// Share of vCPU time taken away from the guest while this round ran (0 = none).
    pub throttle_percent: u8,
}

/// A round part way through: how far the engine got sending it (or a point inside a
/// model round), so a round that carries gigabytes is seen moving before it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundProgress {
    /// 1-based, as in [`RoundTelemetry::round`]; the stop-and-copy pass is the round
    /// after the last live one.
    pub round: u32,
    /// Pages this round sends, zero pages included.
    pub pages_planned: u64,
    /// Of those, pages on the wire so far.
    pub pages_sent: u64,
    /// Bytes on the wire so far this round.
    pub bytes_sent: u64,
    /// Since this round began.
    pub duration_s: f64,
    /// Since the migration's live phase began, as [`RoundTelemetry::elapsed_s`].
    pub elapsed_s: f64,
}

/// What the engine measured part way into round 1, after sending its first stretch of
/// memory: enough to see how fast the guest dirties pages while most of round 1 is
/// still to go, so a throttle can start before the guest has re-dirtied its whole
/// working set behind the copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FirstRoundProbe {
    /// Distinct pages whose content changed during the probe window.
    pub pages_changed: u64,
    /// Length of the probe window (from the scan before round 1 to the probe's scan).
    pub window_s: f64,
    /// Throughput the link gave the probe's stretch.
    pub bandwidth_bytes_per_s: f64,
    /// Bytes of non-zero memory round 1 still has to send.
    pub bytes_left: u64,
    /// Fixed cost of stopping (final scan, device state), as for
    /// [`RoundTelemetry::predicted_downtime_s`].
    pub stop_cost_s: f64,
}

impl FirstRoundProbe {
    /// The guest's distinct-page dirty rate over the window, bytes per second.
    pub fn dirty_rate_bytes_per_s(&self, page_size: u64) -> f64 {
        if self.window_s > 0.0 {
            (self.pages_changed * page_size) as f64 / self.window_s
        } else {
            0.0
        }
    }
}

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
