//! The agent API's client is `tern_api::client::AgentClient` (the CLI, the lab, the
//! manager and a migration source calling its destination all use it); here its errors
//! become the agent's own.

pub use tern_api::client::{AgentClient, ClientError};

use crate::error::AgentError;

impl From<ClientError> for AgentError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Remote {
                url,
                status,
                message,
                ..
            } => AgentError::Remote {
                url,
                status,
                body: message,
            },
            ClientError::BadUrl { .. } | ClientError::NoRoute { .. } => {
                AgentError::BadRequest(e.to_string())
            }
            ClientError::Transport { ref url, .. }
            | ClientError::Timeout { ref url, .. }
            | ClientError::TooLarge { ref url, .. }
            | ClientError::Decode { ref url, .. } => AgentError::Unreachable {
                url: url.clone(),
                reason: e.to_string(),
            },
        }
    }
}
