//! One module per subcommand; each parses its flags into values and calls the library.

pub mod bench;
pub mod plan;
pub mod sim;

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
