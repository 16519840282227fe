//! Live migration: the pre-copy model, termination policies and the decisions the
//! migration engine takes round by round. Decisions are pure functions over telemetry;
//! the engine that streams memory lives with the host agent and calls into this crate.
//!
//! # Layout
//!
//! - [`policy`]: the [`Policy`] trait, [`decide`] (safety caps, then the policy), the
//!   [`Decision`] enum, and one file per policy: `qemu`, `xen`,
//!   `adaptive`, `stop-copy`; plus the throttle arithmetic ([`throttle_for`], [`cpu_max`]).
//! - [`StopReason`] (why iteration ended), [`RoundTelemetry`] and [`RoundProgress`] are
//!   the agent's wire types, defined in `tern-api` and re-exported here.
//! - [`fragment`]: [`FragmentTracker`], per-fragment re-dirtying history.
//! - [`precopy`]: the engine's own rules outside any policy (its defaults, when a round
//!   measures the link, when round 1 is split for the probe, the downtime the policy is
//!   told), called by both the engine and the model.
//! - [`telemetry`]: [`RoundTelemetry`], [`RoundProgress`], [`FirstRoundProbe`] and
//!   [`MigrationOutcome`].
//! - [`model`]: [`simulate`] (analytic), [`simulate_pages`] (page-level, seeded), and
//!   [`estimate`] / [`estimate_duration`] for a simulator's many migrations;
//!   [`MigrationParams::new`] is the textbook model, [`MigrationParams::engine`] the
//!   model with the costs measured on tern's engine (`model/engine.rs`).
//!
//! # Example
//!
//! ```
//! use tern_migrate::{simulate, DirtyModel, MigrationParams, PolicyKind, MIB, mbit_per_s};
//!
//! let params = MigrationParams::new(512 * MIB, mbit_per_s(1000.0)).with_dirty(
//!     DirtyModel::HotCold {
//!         hot_bytes: 64 * MIB,
//!         hot_rate_bytes_per_s: 400e6,
//!         cold_bytes: 384 * MIB,
//!         cold_rate_bytes_per_s: 2e6,
//!     },
//! );
//! let policy: PolicyKind = "adaptive".parse().unwrap();
//! let outcome = simulate(&params, &policy).unwrap();
//! assert!(outcome.converged);
//! assert!(outcome.downtime_s <= 0.3);
//! ```
//!
//! Units: bytes, seconds and bytes per second throughout, as `u64`/`f64`.
//!
//! The equations, the policies' rules and a comparison table of `adaptive` against
//! `qemu` and `xen` are in `docs/migration-model.md`.

pub mod error;
pub mod fragment;
pub mod model;
pub mod policy;
pub mod precopy;
pub mod telemetry;

pub use error::MigrateError;
pub use fragment::{FragmentId, FragmentStat, FragmentTracker, DEFAULT_FRAGMENT_BYTES};
pub use model::{
    estimate, estimate_duration, evenly_spaced_starts, expected_over_writer_starts, simulate,
    simulate_pages, DirtyModel, MigrationEstimate, MigrationParams, SetExtent, ThrottledRate,
};
pub use policy::{
    cpu_max, cpu_quota_percent, decide, throttle_for, Adaptive, Decision, Limits, Policy,
    PolicyInput, PolicyKind, QemuRule, StopCopy, StopReason, Xen,
};
pub use telemetry::{FirstRoundProbe, MigrationOutcome, RoundProgress, RoundTelemetry, WriterSeen};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;

/// Bytes per second of a link of `mbit` megabits per second.
pub fn mbit_per_s(mbit: f64) -> f64 {
    mbit * 1e6 / 8.0
}
