//! The agent that runs inside a tern guest, and the host's client for it. The JSON-lines
//! requests and answers they exchange are `tern_api::guest`.
//!
//! # Layout
//! - [`server`]: the agent's command loop over any reader/writer.
//! - [`workload`]: `memdirty`, `cpu`, `barrier`, `wakeup`, `echo-server` and the memory
//!   `verifier`.
//! - [`pacing`]: pure rate control the workloads share.
//! - [`health`]: kernel-log scanning (also for the host's copy of the console log).
//! - [`channel`]: finding the virtio-serial port (or the UART) inside the guest.
//! - [`fault`]: a kernel panic and a hang, injected on request for health tests.
//! - [`config`]: applying the host's fw_cfg configuration (host name, ssh keys, address).
//! - [`client`]: the host side, over QEMU's chardev Unix socket.
//! - [`ipc`]: unix socket and shared memory endpoints for building dependencies by hand.
//! - [`trace`]: the guest kernel's scheduler events, buffered (bounded) for the host.
//! - [`taint`]: which processes the outside depends on, and the freezer for the rest
//!   during a dependency-aware migration (`taint`, `freeze`, `thaw`).
//!
//! The `tern-guest` binary is linked statically so it runs from the guest's initramfs
//! with no libraries; it needs no async runtime: one thread reads the channel and
//! each workload runs on threads of its own.

pub mod channel;
pub mod client;
pub mod config;
pub mod fault;
pub mod health;
pub mod ipc;
pub mod pacing;
pub mod server;
pub mod sysinfo;
pub mod taint;
pub mod trace;
pub mod workload;

use std::time::Duration;

/// Guest page size: the unit memdirty and the verifier write in.
pub const PAGE_SIZE: usize = 4096;
/// 64-bit words per page.
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;

/// Everything that can go wrong in the agent or its client.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The request was understood but cannot be done as given.
    #[error("{0}")]
    BadRequest(String),
    #[error("I/O: {0}")]
    Io(#[source] std::io::Error),
    #[error("JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The agent answered with an error.
    #[error("the guest agent refused: {0}")]
    Agent(String),
    /// Taint tracking or the freezer cannot work in this guest.
    #[error("taint tracking: {0}")]
    Taint(String),
    /// The guest's scheduler trace cannot be recorded or has ended.
    #[error("guest trace: {0}")]
    Trace(String),
    #[error("no answer from the guest agent within {0:?}")]
    Timeout(Duration),
    #[error("the guest agent was not reachable within {waited:?}: {last}")]
    NotReady {
        waited: Duration,
        #[source]
        last: Box<GuestError>,
    },
}

impl From<tern_api::guest::SpecError> for GuestError {
    fn from(e: tern_api::guest::SpecError) -> Self {
        GuestError::BadRequest(e.0)
    }
}
