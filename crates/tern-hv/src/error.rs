//! The one error type of `tern-hv`.

use std::path::PathBuf;

/// Result alias for driver operations.
pub type Result<T, E = HvError> = std::result::Result<T, E>;

/// Everything a driver can refuse or fail at. The variants are grouped so a caller (the
/// agent) can map them to "the request was wrong", "not found", "conflict" and "failed".
#[derive(Debug, thiserror::Error)]
pub enum HvError {
    /// The VM spec is wrong; the message says which field and how to fix it.
    #[error("invalid VM spec: {0}")]
    InvalidSpec(String),
    /// The VM's name breaks the naming rule (it names the VM's files).
    #[error(transparent)]
    BadName(#[from] tern_model::NameError),
    /// A path named in the spec does not exist.
    #[error("invalid VM spec: {field} {path} does not exist")]
    MissingPath { field: &'static str, path: PathBuf },
    /// No VM with this id on this host.
    #[error("no VM named {0:?} on this host")]
    UnknownVm(String),
    /// A VM with this id already exists.
    #[error("a VM named {0:?} already exists on this host")]
    AlreadyExists(String),
    /// The action is not allowed in the VM's current state.
    #[error("cannot {action} VM {id:?}: it is {state}")]
    Conflict {
        id: String,
        action: &'static str,
        state: crate::state::VmState,
    },
    /// A NIC was requested but the host has no bridge to attach it to.
    #[error("VM {0:?} asks for a NIC but this host has no bridge (start the agent with --bridge)")]
    NoBridge(String),
    /// QEMU answered a QMP command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Qmp {
        command: String,
        class: String,
        desc: String,
    },
    /// QMP did not answer in time.
    #[error("QMP command {command} timed out after {ms} ms")]
    Timeout { command: String, ms: u64 },
    /// The QMP conversation broke (socket closed, an unexpected message).
    #[error("QMP protocol error: {0}")]
    Protocol(String),
    /// QEMU sent a line that is not JSON.
    #[error("QMP protocol error: bad JSON from QEMU ({source}): {line}")]
    BadJson {
        line: String,
        #[source]
        source: serde_json::Error,
    },
    /// The QEMU binary could not be run.
    #[error("QEMU failed: cannot run {}: {source} (install qemu-system-x86)", binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// QEMU died or did not come up.
    #[error("QEMU failed: {0}")]
    Qemu(String),
    /// A host command (ip, tc) failed.
    #[error("host command `{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    /// A disk could not be made, found or checked.
    #[error(transparent)]
    Disk(#[from] crate::disk::DiskError),
    /// A suspended VM's saved state could not be written, found or read.
    #[error(transparent)]
    Saved(#[from] crate::saved::SavedError),
    /// Filesystem or socket error.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl HvError {
    /// Wraps an I/O error with what we were doing.
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HvError {
        let context = context.into();
        move |source| HvError::Io { context, source }
    }

    /// True when the error is the caller's fault (bad spec), not the host's.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            HvError::InvalidSpec(_)
                | HvError::BadName(_)
                | HvError::MissingPath { .. }
                | HvError::NoBridge(_)
        ) || matches!(self, HvError::Disk(d) if d.is_bad_input())
    }
}

impl From<tern_api::agent::InvalidSpec> for HvError {
    fn from(e: tern_api::agent::InvalidSpec) -> Self {
        HvError::InvalidSpec(e.0)
    }
}
