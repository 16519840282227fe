//! The suite's error type: the suite itself could not do something (build the lab, start
//! a process, reach an API to set a case up). A hole a case finds is not an error but a
//! failed [`crate::Outcome`].

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    /// Building, reading or removing the lab.
    #[error(transparent)]
    Lab(#[from] tern_lab::LabError),
    /// An agent's or the manager's API could not be asked, or refused a request the
    /// suite needs to set a case up.
    #[error(transparent)]
    Client(#[from] tern_api::client::ClientError),
    /// The guest image could not be built or found.
    #[error(transparent)]
    Image(#[from] tern_hv::image::ImageError),
    /// An `ip`, `kill` or `mount` command failed.
    #[error(transparent)]
    Command(#[from] tern_hv::HvError),
    /// The lab's CA or a certificate the suite issues.
    #[error(transparent)]
    Pki(#[from] tern_pki::PkiError),
    /// Something a case waits for did not happen in time.
    #[error("{what}: not within {limit:?}")]
    Timeout { what: String, limit: Duration },
    /// A process, file or answer was not what the suite needs, with what to do.
    #[error("{0}")]
    Setup(String),
    /// The suite's own files and processes.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl FaultError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> FaultError {
        let context = context.into();
        move |source| FaultError::Io { context, source }
    }
}
