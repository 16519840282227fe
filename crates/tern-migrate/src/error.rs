//! The one error type of this crate: every way a caller can hand it something unusable.

use thiserror::Error;

/// What is wrong with a request to the migration model (an unknown policy name is
/// `tern_api`'s `UnknownPolicy`, where the names live).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum MigrateError {
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
