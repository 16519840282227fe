//! The live phase: rounds of changed pages while the guest runs, until the policy says
//! stop. Every decision (what to hold back, how hard to throttle, when to stop) comes
//! from `tern-migrate`'s pure policies; this loop only measures and executes.
//!
//! ```text
//!  scan ─► round r: send dirty pages not held back ─► scan ─► telemetry ─► decide
//!             ▲                                                         │
//!             └──── Continue / Throttle (cgroup) ◄──────────────────────┤
//!                                                   StopAndCopy ◄──────┘
//! ```

use std::sync::atomic::AtomicBool;
use std::time::Instant;

use tern_migrate::fragment::{FragmentTracker, DEFAULT_FRAGMENT_BYTES};
use tern_migrate::policy::{decide, Decision, Limits, Policy, PolicyInput, StopReason};
use tern_migrate::telemetry::RoundTelemetry;

use super::memory::{scan, SeenDigests, SentDigests, SourceMemory};
use super::outgoing::Outgoing;
use super::wire::PAGE_SIZE;
use super::MigrationError;

/// Knobs of the live phase.
#[derive(Debug, Clone)]
pub struct PrecopyConfig {
    pub limits_downtime_s: f64,
    pub max_rounds: u32,
    /// Iteration stops (not converged) after this long.
    pub max_elapsed_s: f64,
    pub scan_threads: usize,
    /// Fixed cost of stopping besides the final pass: device state and resume.
    pub stop_cost_s: f64,
    /// Link rate to assume before one round was big enough to measure it.
    pub initial_bandwidth_bytes_per_s: f64,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            limits_downtime_s: tern_migrate::policy::DEFAULT_DOWNTIME_LIMIT_S,
            max_rounds: 60,
            max_elapsed_s: 60.0,
            scan_threads: 2,
            stop_cost_s: 0.03,
            initial_bandwidth_bytes_per_s: 125e6,
        }
    }
}

/// How the live phase ended.
#[derive(Debug, Clone)]
pub struct PrecopyOutcome {
    pub history: Vec<RoundTelemetry>,
    pub stop_reason: StopReason,
    pub bytes: u64,
    pub max_throttle_percent: u8,
    /// Pages that were not zero when round 1 read them.
    pub nonzero_pages: u64,
}

/// Applies a throttle and returns the percent actually in effect (0 when the host
/// cannot throttle). The policy's next decision sees the applied value.
pub trait Throttle {
    fn apply(&mut self, percent: u8) -> u8;
}

/// Runs live rounds until the policy decides to stop and copy. `on_round` sees every
/// round's telemetry as soon as it is known (the status endpoint reads it).
#[allow(clippy::too_many_arguments)] // each is a distinct collaborator of the loop
pub fn run(
    out: &mut Outgoing,
    mem: &SourceMemory,
    sent: &SentDigests,
    policy: &dyn Policy,
    cfg: &PrecopyConfig,
    throttle: &mut dyn Throttle,
    cancel: &AtomicBool,
    on_round: &mut dyn FnMut(&RoundTelemetry),
) -> Result<PrecopyOutcome, MigrationError> {
    let pages = mem.pages();
    let started = Instant::now();
    let seen = SeenDigests::new(pages);
    let mut tracker = FragmentTracker::new(pages, DEFAULT_FRAGMENT_BYTES / PAGE_SIZE as u64);
    let limits = Limits {
        downtime_limit_s: cfg.limits_downtime_s,
        max_rounds: cfg.max_rounds,
        max_elapsed_s: Some(cfg.max_elapsed_s),
        ..Limits::new(pages, PAGE_SIZE as u64)
    };
    let mut held = vec![false; tracker.len()];
    let mut history: Vec<RoundTelemetry> = Vec::new();
    let mut bandwidth = cfg.initial_bandwidth_bytes_per_s;
    let mut throttle_percent = 0u8;
    let mut max_throttle = 0u8;
    let mut bytes = 0u64;
    let mut nonzero_pages = 0u64;
    // Round 1 covers every page, zero pages as runs: the destination file is not
    // assumed to be zero-filled (its QEMU may have written to it at start-up).
    scan(mem, sent, &seen, cfg.scan_threads);
    let mut dirty: Vec<u64> = (0..pages).collect();
    for round in 1u32.. {
        let round_start = Instant::now();
        let to_send: Vec<u64> = dirty
            .iter()
            .copied()
            .filter(|&p| !tracker.fragment_of(p).is_some_and(|f| held[f as usize]))
            .collect();
        let t = out.send_round(round, mem, sent, &to_send, cancel)?;
        let send_s = round_start.elapsed().as_secs_f64();
        bytes += t.bytes;
        if round == 1 {
            nonzero_pages = t.data_pages;
        }
        // Small rounds are dominated by round trips; they say nothing about the link.
        if t.bytes >= 4 << 20 && send_s > 0.0 {
            bandwidth = t.bytes as f64 / send_s;
        }
        let scan_start = Instant::now();
        let s = scan(mem, sent, &seen, cfg.scan_threads);
        let scan_s = scan_start.elapsed().as_secs_f64();
        tracker.observe_pages(s.changed.iter().copied());
        let duration_s = round_start.elapsed().as_secs_f64();
        let held_back_pages = s
            .dirty
            .iter()
            .filter(|&&p| tracker.fragment_of(p).is_some_and(|f| held[f as usize]))
            .count() as u64;
        let remaining = s.dirty.len() as u64;
        let telemetry = RoundTelemetry {
            round,
            pages_sent: t.data_pages + t.zero_pages,
            bytes_sent: t.bytes,
            pages_changed: s.changed.len() as u64,
            dirty_rate_bytes_per_s: (s.changed.len() * PAGE_SIZE) as f64 / duration_s.max(1e-6),
            bandwidth_bytes_per_s: bandwidth,
            remaining_pages: remaining,
            held_back_pages,
            predicted_downtime_s: (remaining * PAGE_SIZE as u64) as f64 / bandwidth
                + scan_s
                + cfg.stop_cost_s,
            duration_s,
            elapsed_s: started.elapsed().as_secs_f64(),
            throttle_percent,
        };
        on_round(&telemetry);
        history.push(telemetry);
        dirty = s.dirty;
        let input = PolicyInput {
            history: &history,
            fragments: &tracker,
            limits: &limits,
        };
        let hold_back = match decide(policy, &input) {
            Decision::StopAndCopy { reason } => {
                return Ok(PrecopyOutcome {
                    history,
                    stop_reason: reason,
                    bytes,
                    max_throttle_percent: max_throttle,
                    nonzero_pages,
                });
            }
            Decision::Continue { hold_back } => hold_back,
            Decision::Throttle { percent, hold_back } => {
                let applied = throttle.apply(percent);
                if applied == 0 {
                    // The host cannot throttle; iterating further cannot help.
                    tracing::warn!(
                        percent,
                        "throttle requested but unavailable on this host; stopping"
                    );
                    return Ok(PrecopyOutcome {
                        history,
                        stop_reason: StopReason::ThrottleExhausted,
                        bytes,
                        max_throttle_percent: max_throttle,
                        nonzero_pages,
                    });
                }
                throttle_percent = applied;
                max_throttle = max_throttle.max(applied);
                hold_back
            }
        };
        held.iter_mut().for_each(|h| *h = false);
        for f in hold_back {
            if let Some(h) = held.get_mut(f as usize) {
                *h = true;
            }
        }
    }
    unreachable!("the round counter does not run out before the policy's round cap")
}
