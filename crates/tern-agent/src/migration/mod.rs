//! tern's live-migration engine: guest RAM moved by tern over its own wire protocol,
//! rounds and stop decided by `tern-migrate`'s policies, QEMU used only for the CPU and
//! device state.
//!
//! Layout:
//! - [`wire`]: the framed, versioned memory protocol (sequence diagram there);
//! - [`memory`]: guest RAM files mapped, per-page digests, the changed-page scan;
//! - [`outgoing`] / [`incoming`]: the source's and the destination's memory streams,
//!   the destination's gate that admits every stream on the migration's one port;
//! - [`relay`]: QEMU's device state carried over tern's authenticated stream;
//! - [`secure`]: the streams over mutual TLS when the agents have host identities;
//! - [`pace`]: the bandwidth cap;
//! - [`precopy`]: the live rounds, decided by `tern-migrate`'s policies;
//! - [`throttle`]: the cgroup that slows the vCPUs when the policy asks;
//! - [`freeze`]: `dependency-aware`'s freeze of the guest's untainted processes, its
//!   renewals and the thaw on whichever host runs the VM afterwards;
//! - [`session`]: API values, phases and the registry of migrations;
//! - [`token`]: the stream token, drawn and compared;
//! - [`source`]: the source's phase machine (`run` walks the engine's phases, one method
//!   per phase) with the one rollback path;
//! - [`dest`]: the destination's driver, which cleans up its copy on any failure;
//! - [`routes`]: the HTTP endpoints ([`routes::routes`] is merged into the agent).

use std::time::Duration;

use tern_hv::{HvError, MigrationState};

pub use routes::routes;

pub mod dest;
pub mod disks;
pub mod freeze;
pub mod incoming;
pub mod memory;
pub mod outgoing;
pub mod pace;
pub mod precopy;
pub mod relay;
pub mod routes;
pub mod secure;
pub mod session;
pub mod source;
pub mod throttle;
pub mod token;
pub use tern_wire as wire;

/// Why a migration (or one of its steps) failed. Every variant leaves the VM on the
/// source; each keeps the error that caused it as its source.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The destination URL names no host to send memory to.
    #[error("link to the destination: no host in {url}")]
    NoHost { url: String },
    #[error("link to the destination: resolving {host}: {source}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("link to the destination: {host} has no address")]
    NoAddress { host: String },
    /// The TLS handshake with the destination failed: its certificate is not from
    /// this host's CA, does not name the host, or it refused this host's certificate.
    #[error("link to the destination: TLS with {addr}: {source} (both agents need a certificate from the same cluster CA, naming their address)")]
    Tls {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("link to the destination: {host:?} is neither an address nor a DNS name a certificate can carry")]
    TlsName { host: String },
    /// A memory stream could not connect.
    #[error("link to the destination: connect {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Fewer memory streams reached the destination than the source opens.
    #[error("timed out: only {connected} of {wanted} memory streams connected within {waited:?}")]
    StreamsMissing {
        connected: usize,
        wanted: u16,
        waited: Duration,
    },
    /// QEMU's own migration (`qemu-native`) did not finish in the time allowed.
    #[error("timed out: QEMU's migration did not converge within {limit:?} ({bytes} bytes sent)")]
    NotConverged { limit: Duration, bytes: u64 },
    /// Relaying QEMU's stream between its unix socket and the device-state stream.
    #[error("device-state relay: {step}: {source}")]
    Relay {
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The unix socket for QEMU's stream would have a path the kernel refuses.
    #[error("device-state relay: socket path {path} is {len} bytes, above the 107-byte limit: use a shorter state directory")]
    SocketPath { path: String, len: usize },
    /// QEMU did not carry the device state in time.
    #[error("timed out: device state not through after {0:?}")]
    DeviceStateTimeout(Duration),
    #[error("migration cancelled")]
    Cancelled,
    /// The destination's QEMU, started beside the memory streams, did not come up.
    #[error("hypervisor: the destination QEMU did not start: {0}")]
    QemuNotStarted(String),
    /// Moving the local disks failed (the NBD export, the block mirror).
    #[error("local disks: {0}")]
    Disks(String),
    /// The destination agent refused or failed a step (`prepare`, `resume`).
    #[error("destination agent: {step}: {source}")]
    Peer {
        step: &'static str,
        #[source]
        source: crate::client::ClientError,
    },
    /// The hypervisor on this host failed a step (pause, device state, ...).
    #[error("hypervisor: {step}: {source}")]
    Vm {
        step: &'static str,
        #[source]
        source: HvError,
    },
    /// tern's engine reads guest RAM from the VM's memory file; this VM has none.
    #[error("hypervisor: VM {vm} has no guest memory file")]
    NoMemoryFile { vm: String },
    /// QEMU's migration ended failed or cancelled; `desc` is QEMU's reason.
    #[error("hypervisor: QEMU migration {state}: {desc}")]
    Qemu { state: MigrationState, desc: String },
    /// A blocking step of the migration (the memory streams) panicked.
    #[error("hypervisor: {step} task: {source}")]
    Task {
        step: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}
