//! The control plane: cluster state, placement, the REST API, agents and the balance loop.
//!
//! # Layout
//! - [`state`]: hosts, VMs, migrations, events and settings as values; [`state::Snapshot`].
//! - [`store`]: the [`store::Store`] trait and its SQLite implementation (the only disk I/O).
//! - [`api`]: the REST API and `/metrics`.
//! - [`client`]: agents behind [`client::HostClient`] (HTTP; `tern-simhost` runs them in
//!   process over the `sim` driver).
//! - [`control`]: the loop that pulls load reports and drives agents toward the plan;
//!   [`ratelimit`]: its repeated warnings, at most one per VM and failure per 30 s.
//! - [`live`]: the running migrations' latest telemetry (memory only).
//! - [`decide`]: the pure decisions: commands, placement, health, reconciliation.
//! - [`manager`]: the shell that commits decisions to the store and publishes events.
//! - [`error`]: the crate's one error type.
//! - [`ha`]: several managers over etcd, one leader elected through a lease.
//! - [`trace`]: a VM's trace through its host's agent, followed across migrations.
//! - [`web`]: the web page at `/` and the score history it draws.
//!
//! Decisions are pure functions from a snapshot (and the time, as a value) to changes; the
//! manager commits the changes to the store and then applies them to its snapshot.

pub mod api;
pub mod client;
pub mod control;
pub mod decide;
pub mod error;
pub mod ha;
pub mod live;
pub mod manager;
pub mod ratelimit;
pub mod state;
pub mod store;
pub mod trace;
pub mod web;

pub use error::{Error, Result};
pub use manager::Manager;
