//! The host agent: runs VMs through `tern-hv`, reports load and serves migrations.
//!
//! # Layout
//! - [`server`]: `serve(listener, state, shutdown)`; [`api`]: routes parsed into commands;
//!   [`error`]: the agent's error type and its HTTP status mapping.
//! - [`state`]: what handlers share, and the token file; [`vms`]: VM operations
//!   (admission, records, driver); [`host`]: capacity, load and the admission rule;
//!   [`images`]: catalogue image files copied from the manager into the store;
//!   [`guest`]: the guest agent channel.
//! - [`client`]: a typed HTTP client for the API (CLI, lab, manager, migration source).
//! - [`migration`]: tern's live-migration engine.
//! - [`fence`]: the host's lease with the manager, the watchdog that stops the guests
//!   when it runs out, and what a restarted agent does with the QEMUs it finds.
//! - [`openapi`]: the API's OpenAPI document, generated from the handlers and types.
//! - [`trace`]: the trace route, recording a VM's vCPU threads with `tern-trace`.
//! - [`vcpu`]: vCPU scheduling policies (`none`, `pin`, `gang`) and their route.
//! - [`watch`]: guest health: pings, pvpanic and the console, judged per running VM.

pub mod api;
pub mod client;
pub mod console;
pub mod error;
pub mod fence;
pub mod guest;
pub mod host;
pub mod images;
pub mod lifecycle;
pub mod migration;
pub mod openapi;
pub mod server;
pub mod state;
pub mod trace;
pub mod vcpu;
pub mod vms;
pub mod watch;

pub use error::AgentError;
pub use state::{AppState, HostConfig};
