//! What can go wrong with certificates, keys, tokens and the files holding them.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read, written or created.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A secret (key or token) that other users could read: it may already be known.
    #[error(
        "{path} is readable by group or others (mode {mode:o}); a key or token must be \
         private: chmod 600 {path} (and make a new one if others may have read it)"
    )]
    NotPrivate { path: PathBuf, mode: u32 },
    /// A certificate, key, CSR or revocation list that does not parse or cannot be made.
    #[error("{what}: {message}")]
    Cert { what: String, message: String },
    /// A TLS configuration rustls refuses (a key that does not match, no root).
    #[error("TLS setup: {0}")]
    Tls(String),
    /// A join token that is malformed, unknown, used or expired.
    #[error("join token refused: {0}")]
    JoinToken(String),
    /// A directory with no CA in it, where one is required.
    #[error(
        "{dir} holds no cluster CA (ca.pem and ca.key): create one with `tern ca init --dir {dir}`"
    )]
    NoCa { dir: PathBuf },
    /// `tern ca init` on a directory that already has one.
    #[error("{dir} already holds a cluster CA; remove it first to make a new one (every host must then enrol again)")]
    CaExists { dir: PathBuf },
    /// A name or address that cannot go into a certificate.
    #[error("{0}")]
    BadName(String),
}

impl PkiError {
    pub(crate) fn io(
        what: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| PkiError::Io { what, path, source }
    }

    pub(crate) fn cert(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> Self {
        let what = what.into();
        move |e| PkiError::Cert {
            what,
            message: e.to_string(),
        }
    }
}

pub type Result<T, E = PkiError> = std::result::Result<T, E>;
