//! The crate's one error type.

use thiserror::Error;

use crate::{InstId, NodeId};

/// What can go wrong reading a Ganeti file or changing a cluster.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum Error {
    /// A line of a Ganeti text file is wrong; `what` names the line's object
    /// (e.g. `node "node-03"`) and the field.
    #[error("line {line}, {what}: {message}")]
    Line {
        line: usize,
        what: String,
        message: String,
    },
    /// The file's structure is wrong (not a line-level problem).
    #[error("{0}")]
    Format(String),
    #[error("no instance with id {id} (cluster has {count})")]
    NoSuchInstance { id: InstId, count: usize },
    #[error("no node with id {id} (cluster has {count})")]
    NoSuchNode { id: NodeId, count: usize },
    #[error("instance {inst} runs on {expected}, not on {given}")]
    WrongSource {
        inst: String,
        expected: String,
        given: String,
    },
    #[error("instance {inst} (disk template {template}) cannot live-migrate to {to}")]
    CannotMigrate {
        inst: String,
        template: &'static str,
        to: String,
    },
}
