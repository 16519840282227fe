//! One module per subcommand; each parses its flags into values and calls the library.

use tern_agent::AgentError;

pub mod agent;
pub mod bench;
pub mod ca;
pub mod catalog;
pub mod demo;
pub mod events;
pub mod host;
pub mod image;
pub mod lab;
pub mod manager;
pub mod manager_etcd;
pub mod plan;
pub mod policy;
pub mod sim;
pub mod trace;
pub mod vm;

/// An error caused by what the user gave us (a flag, a file, a spec). Exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// Wraps any error as bad input so `main` exits with status 2.
pub fn bad_input(msg: impl std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(BadInput(msg.to_string()))
}

/// 2 for bad input anywhere in the error chain, 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.chain().any(|e| e.is::<BadInput>()) {
        2
    } else {
        1
    }
}

/// Maps an agent-library error for `main`: the user's mistakes (a bad flag or file, an
/// agent's 4xx answer) exit with status 2. Takes the agent client's errors too.
pub fn agent_error(e: impl Into<AgentError>) -> anyhow::Error {
    let e = e.into();
    let user_fault = match &e {
        AgentError::BadRequest(_) => true,
        AgentError::Client(c) => match c.status() {
            Some(status) => (400..500).contains(&status) || status == 507,
            None => matches!(
                c,
                tern_api::client::ClientError::BadUrl { .. }
                    | tern_api::client::ClientError::NoRoute { .. }
            ),
        },
        other => other.status().is_client_error(),
    };
    if user_fault {
        bad_input(e)
    } else {
        anyhow::Error::new(e)
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a
/// rename, so a reader never sees a half-written file and a failure leaves none.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
