//! tern's live-migration engine: guest RAM moved by tern over its own wire protocol,
//! rounds and stop decided by `tern-migrate`'s policies, QEMU used only for the CPU and
//! device state.
//!
//! Layout:
//! - [`wire`]: the framed, versioned memory protocol (sequence diagram there);
//! - [`memory`]: guest RAM files mapped, per-page digests, the changed-page scan;
//! - [`outgoing`] / [`incoming`]: the source's and the destination's memory streams;
//! - [`pace`]: the bandwidth cap;
//! - [`precopy`]: the live rounds, decided by `tern-migrate`'s policies;
//! - [`throttle`]: the cgroup that slows the vCPUs when the policy asks;
//! - [`session`]: API values, phases and the registry of migrations;
//! - [`source`] / [`dest`]: the two ends' drivers, with the one rollback path;
//! - [`routes`]: the HTTP endpoints ([`routes::routes`] is merged into the agent).

pub use routes::routes;

pub mod dest;
pub mod incoming;
pub mod memory;
pub mod outgoing;
pub mod pace;
pub mod precopy;
pub mod routes;
pub mod session;
pub mod source;
pub mod throttle;
pub mod wire;

/// Why a migration (or one of its steps) failed. Every variant leaves the VM on the source.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The destination could not be reached or the link broke.
    #[error("link to the destination: {0}")]
    Link(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("migration cancelled")]
    Cancelled,
    /// The destination agent refused or failed a request.
    #[error("destination agent: {0}")]
    Peer(String),
    /// The hypervisor on this host failed a step (pause, device state, ...).
    #[error("hypervisor: {0}")]
    Vm(String),
}
