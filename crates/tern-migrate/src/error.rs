//! The one error type of this crate: every way a caller can hand it something unusable.

use thiserror::Error;

/// What is wrong with a request to the migration model or a policy name.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum MigrateError {
    /// A policy name that no policy answers to.
    #[error("unknown migration policy `{name}`: use one of qemu (alias qemu-rule), xen, adaptive, stop-copy (alias none)")]
    UnknownPolicy { name: String },
    /// A parameter outside the range the model can work with.
    #[error("invalid migration parameter `{field}`: {reason}")]
    InvalidParam { field: &'static str, reason: String },
}

impl MigrateError {
    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        MigrateError::InvalidParam {
            field,
            reason: reason.into(),
        }
    }
}
