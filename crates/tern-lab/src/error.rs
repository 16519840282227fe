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
    /// The lab itself failed: an agent that does not come up, an unreadable state file,
    /// no free lab index.
    #[error("lab: {0}")]
    Lab(String),
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
