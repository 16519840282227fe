//! One case of the suite: what it is called, what it covers, how it runs, and what it
//! found.

use std::future::Future;
use std::pin::Pin;

use crate::{FaultError, Fixture};

/// What one case found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    pub passed: bool,
    /// One line: what happened, with the measured numbers (times, counts).
    pub detail: String,
    /// VMs that should be running somewhere and are running nowhere at the end.
    pub vms_lost: u32,
    /// VMs seen running on two hosts at once at any sample during the case.
    pub vms_running_twice: u32,
    /// A token, a key or a page of guest memory reached a party that should not have it.
    pub secrets_leaked: bool,
}

impl Outcome {
    pub fn pass(detail: impl Into<String>) -> Self {
        Outcome {
            passed: true,
            detail: detail.into(),
            vms_lost: 0,
            vms_running_twice: 0,
            secrets_leaked: false,
        }
    }

    pub fn fail(detail: impl Into<String>) -> Self {
        Outcome {
            passed: false,
            ..Outcome::pass(detail)
        }
    }
}

/// What a case's `run` returns: `Err` only when the suite itself could not run the case
/// (its setup failed); a hole found is `Ok` with `passed: false`.
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = Result<Outcome, FaultError>> + Send + 'a>>;

/// One probe or fault case.
#[derive(Clone, Copy)]
pub struct Case {
    /// snake_case, named after the hole it closes or the fault it injects.
    pub name: &'static str,
    /// Which part of the issue: "identity", "streams", "limits", "input", "fencing", "faults".
    pub group: &'static str,
    /// One sentence for `--list`.
    pub about: &'static str,
    pub run: for<'a> fn(&'a Fixture) -> CaseFuture<'a>,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case")
            .field("name", &self.name)
            .field("group", &self.group)
            .finish()
    }
}
