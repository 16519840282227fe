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
use tern_migrate::{RoundProgress, RoundTelemetry};

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
    /// The round being sent right now (the stop-and-copy pass is the one after the last
    /// live round); 0 between rounds, before the first and after the last.
    #[serde(default)]
    pub running_round: u32,
    /// Bytes put on the wire so far, the running round's included.
    pub bytes_transferred: u64,
    /// Bytes that differ from the destination's copy: what a stop now would send. While
    /// a round runs, its pages not yet sent plus, from round 2 on, what the guest is
    /// likely to have dirtied since it began (the last round's dirty rate).
    pub bytes_remaining: u64,
    /// How fast the guest dirtied memory in the last round.
    pub dirty_rate_bytes_per_s: f64,
    /// The link's throughput in the last round (during round 1: so far in it).
    pub bandwidth_bytes_per_s: f64,
    /// The downtime if the VM were paused at the last round's end.
    pub predicted_downtime_ms: f64,
    /// Since the migration started, at the last report.
    pub elapsed_ms: u64,
}

impl Progress {
    /// The telemetry after `rounds` of a guest with `memory_bytes` (pure): totals over
    /// every round, rates from the last; before the first round all memory remains.
    pub fn after_rounds(phase: &str, memory_bytes: u64, rounds: &[RoundTelemetry]) -> Self {
        Self::during(phase, memory_bytes, rounds, None)
    }

    /// The telemetry after `rounds` and part of the round `running` (the agent's `current`, or a point inside a model round; pure): its bytes
    /// count as transferred, its unsent pages as remaining, so the figures move while a
    /// long round (round 1 carries all non-zero memory) runs.
    pub fn during(
        phase: &str,
        memory_bytes: u64,
        rounds: &[RoundTelemetry],
        running: Option<&RoundProgress>,
    ) -> Self {
        let last = rounds.last();
        // A round number at or below the last completed one is stale: that round is over.
        let running = running.filter(|c| c.round > last.map_or(0, |r| r.round));
        let completed: u64 = rounds.iter().map(|r| r.bytes_sent).sum();
        let mut p = Self {
            phase: phase.to_owned(),
            round: last.map_or(0, |r| r.round),
            running_round: 0,
            bytes_transferred: completed,
            bytes_remaining: last.map_or(memory_bytes, |r| r.remaining_pages * PAGE_BYTES),
            dirty_rate_bytes_per_s: last.map_or(0.0, |r| r.dirty_rate_bytes_per_s),
            bandwidth_bytes_per_s: last.map_or(0.0, |r| r.bandwidth_bytes_per_s),
            predicted_downtime_ms: last.map_or(0.0, |r| r.predicted_downtime_s * 1e3),
            elapsed_ms: last.map_or(0, |r| (r.elapsed_s * 1e3).round() as u64),
        };
        let Some(c) = running else {
            return p;
        };
        p.running_round = c.round;
        p.bytes_transferred = completed + c.bytes_sent;
        // What differed when the round began: the last round's remainder, held-back
        // pages included (round 1: every page it plans).
        let differing = last.map_or(c.pages_planned, |r| r.remaining_pages.max(c.pages_planned));
        let unsent = differing.saturating_sub(c.pages_sent) * PAGE_BYTES;
        // Only a running guest dirties more; the stop-and-copy pass runs paused.
        let redirtied = match last {
            Some(r) if phase == "pre_copy" => (r.dirty_rate_bytes_per_s * c.duration_s) as u64,
            _ => 0,
        };
        p.bytes_remaining = (unsent + redirtied).min(memory_bytes.max(unsent));
        if last.is_none() && c.duration_s > 0.0 {
            p.bandwidth_bytes_per_s = c.bytes_sent as f64 / c.duration_s;
        }
        p.elapsed_ms = (c.elapsed_s * 1e3).round() as u64;
        p
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

    fn running(round: u32, planned: u64, sent: u64, duration_s: f64) -> RoundProgress {
        RoundProgress {
            round,
            pages_planned: planned,
            pages_sent: sent,
            bytes_sent: sent * PAGE_BYTES / 2,
            duration_s,
            elapsed_s: 10.0 + duration_s,
        }
    }

    #[test]
    fn a_running_round_moves_the_totals_before_it_ends() {
        // Round 1 of a 1 MiB guest (256 pages), 100 sent.
        let r1 = running(1, 256, 100, 0.5);
        let p = Progress::during("pre_copy", 1 << 20, &[], Some(&r1));
        assert_eq!((p.round, p.running_round), (0, 1));
        assert_eq!(p.bytes_transferred, 100 * PAGE_BYTES / 2);
        assert_eq!(p.bytes_remaining, 156 * PAGE_BYTES);
        assert_eq!(p.bandwidth_bytes_per_s, (100 * PAGE_BYTES) as f64);
        assert_eq!(p.elapsed_ms, 10_500);
        assert_eq!(p.dirty_rate_bytes_per_s, 0.0, "no rate before a round ends");

        // Round 3 after two (10 pages were left after round 2, 8 of them planned, 2 held
        // back): the unsent pages, plus what round 2's dirty rate (2 MB/s) adds in 1 ms.
        let done = [round(1, 8192, 40), round(2, 4096, 10)];
        let r3 = running(3, 8, 5, 0.001);
        let p = Progress::during("pre_copy", 1 << 20, &done, Some(&r3));
        assert_eq!((p.round, p.running_round), (2, 3));
        assert_eq!(p.bytes_transferred, 8192 + 4096 + 5 * PAGE_BYTES / 2);
        assert_eq!(p.bytes_remaining, 5 * PAGE_BYTES + 2000);
        assert_eq!(p.bandwidth_bytes_per_s, 1e8, "the last round's");
        // Stopped: nothing more is dirtied.
        let p = Progress::during("stop_and_copy", 1 << 20, &done, Some(&r3));
        assert_eq!(p.bytes_remaining, 5 * PAGE_BYTES);
        // Never more than the guest's memory.
        let long = running(3, 8, 0, 1e6);
        let p = Progress::during("pre_copy", 1 << 20, &done, Some(&long));
        assert_eq!(p.bytes_remaining, 1 << 20);

        // A round already among the completed ones is ignored.
        let stale = running(2, 8, 8, 0.3);
        let p = Progress::during("pre_copy", 1 << 20, &done, Some(&stale));
        assert_eq!(p, Progress::after_rounds("pre_copy", 1 << 20, &done));
        assert_eq!(p.running_round, 0);
    }
}
