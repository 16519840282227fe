//! The agent API's client is `tern_api::client::AgentClient` (the CLI, the lab, the
//! manager and a migration source calling its destination all use it); its errors become the
//! agent's own through `AgentError::Client`, which keeps them whole.

pub use tern_api::client::{AgentClient, ClientError};
