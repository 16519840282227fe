//! The lab's error type.

use tern_agent::AgentError;
use tern_hv::HvError;

/// Everything building, checking or removing a lab can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// What was asked for cannot be done as asked (bad shape, no root, a lab already up
    /// or none up, an empty token file): the caller can fix it.
    #[error("{0}")]
    BadRequest(String),
    /// The lab's state file exists but is not a lab state this version can read.
    #[error(
        "lab state file {path} is unreadable: {source}; remove it with `tern lab down` or by hand"
    )]
    BadState {
        path: std::path::PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A lab host's address in the state file is not an IP address.
    #[error("lab host address {addr:?} is not an IP address: {source}")]
    BadAddress {
        addr: String,
        #[source]
        source: std::net::AddrParseError,
    },
    /// Every lab index (0-255) already names a namespace or an address on this machine.
    #[error("every lab index 0-255 is in use; take a lab down with `tern lab down` first")]
    NoFreeIndex,
    /// An agent did not answer its health check in time, or its process died.
    #[error("agent {host} did not come up ({cause}); its log ends: {log_tail}")]
    AgentDown {
        host: String,
        #[source]
        cause: Box<tern_agent::client::ClientError>,
        log_tail: String,
    },
    /// An `ip`, `tc` or `kill` command failed.
    #[error(transparent)]
    Command(#[from] HvError),
    /// Talking to an agent, or reading what the agent reads (capacity, token file).
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// An agent's API could not be asked (bad URL, refused, timed out).
    #[error(transparent)]
    Client(#[from] tern_agent::client::ClientError),
    /// The lab's CA or a certificate it issues.
    #[error(transparent)]
    Pki(#[from] tern_pki::PkiError),
    /// The lab's own files (state file, token, logs, directories).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl LabError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
        let context = context.into();
        move |source| LabError::Io { context, source }
    }
}
