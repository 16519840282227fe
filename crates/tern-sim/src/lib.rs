//! The discrete-event simulator: trace-driven load, periodic balancing and migrations
//! that take time and bandwidth, running the same planners as the real manager.
//!
//! # Layout
//! - `queue`: the (time, sequence)-ordered event queue; `engine`: the event loop.
//! - `state`: hosts, VMs, CPU sharing during migration, lazily integrated metrics
//!   (energy, SLATAH, PDM).
//! - `placement`: CloudSim's power-aware best fit; `policy`: one file per policy
//!   (`none`, `thr-mmt`, `spread`, `balance`: the live manager's round).
//! - `imbalance`: the `spread` score of the state, reported over time.
//! - `migration`: how long a migration takes (`MigrationTiming`).
//! - `trace`, `planetlab`, `scenario`: where load and clusters come from.
//! - `power`: SPECpower tables.
//!
//! Runs are deterministic: synthetic load is seeded and events at the same instant keep
//! the order they were scheduled in.

pub mod cluster;
pub mod engine;
pub mod imbalance;
pub mod migration;
pub mod placement;
pub mod planetlab;
pub mod policy;
pub mod power;
pub mod queue;
pub mod scenario;
pub mod state;
pub mod trace;

pub use engine::{Report, SeriesPoint, SimConfig, Simulation};

/// What can go wrong setting up or running a simulation.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("bad trace: {0}")]
    BadTrace(String),
    #[error("unknown policy `{0}`; use one of: none, thr-mmt, spread, balance")]
    UnknownPolicy(String),
    #[error("bad scenario: {0}")]
    BadScenario(String),
}
