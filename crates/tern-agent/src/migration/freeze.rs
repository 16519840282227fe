//! A `dependency-aware` migration's dealings with the guest's freezer (`tern-guest`
//! freezes the processes nothing outside the VM depends on, so their memory stops
//! changing and is sent once):
//!
//! ```text
//!  source agent                                   guest                destination agent
//!   freeze {deadline} ─────────────────────────►  untainted frozen
//!   pre-copy rounds; every RENEW_EVERY:
//!   freeze {deadline} (renews) ─────────────────►
//!   pause, last pages, device state, resume?thaw=true ───────────────────► thaw written,
//!                                                                           VM runs ──► guest
//!   POST /v1/incoming/{id}/thaw (collects the answer) ───────────────────►
//!  on rollback, once the VM runs here again: thaw ─► guest
//!  source agent gone: no renewal ─► the guest thaws by itself at the deadline
//! ```
//!
//! A guest that does not answer the first `freeze` within [`FREEZE_ASK_TIMEOUT`], or
//! refuses it, freezes nothing: the migration goes on as `adaptive` and its view says
//! why. A thaw that fails is reported, never a failed migration: the deadline is the
//! backstop.

use std::sync::Arc;
use std::time::Duration;

use tern_api::guest::{Command, FreezeReport, Reply, ThawReport};
use tern_api::migration::{DependencyOutcome, ThawSite};

use super::session::Outbound;
use crate::error::AgentError;
use crate::guest::Pending;
use crate::state::AppState;

/// How long the source waits for the guest to answer `freeze` before it goes on as
/// `adaptive`: the pre-copy waits for it.
pub const FREEZE_ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guest stays frozen without a renewal: long enough to ride out a few
/// unanswered renewals on a loaded host, short enough that a guest whose source agent
/// died does not hold its batch work for long.
pub const FREEZE_DEADLINE: Duration = Duration::from_secs(15);
/// How often the freeze is renewed during pre-copy: several renewals fit in a deadline.
pub const RENEW_EVERY: Duration = Duration::from_secs(3);
/// How long one `thaw` may take to be answered, and how many are sent.
pub const THAW_TIMEOUT: Duration = Duration::from_secs(3);
pub const THAW_TRIES: u32 = 3;

fn freeze_command() -> Command {
    Command::Freeze {
        deadline_ms: FREEZE_DEADLINE.as_millis() as u64,
    }
}

/// Asks the guest to freeze (or renew the freeze); the reason when it did not.
pub async fn freeze(state: &AppState, vm: &str) -> Result<FreezeReport, String> {
    match state
        .call_guest(vm, &freeze_command(), FREEZE_ASK_TIMEOUT)
        .await
    {
        Ok(Reply::Frozen(r)) => Ok(r),
        Ok(other) => Err(format!("the guest answered freeze with {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Thaws VM `vm`'s guest through this host's channel: the source after a rollback, the
/// destination once the migrated VM runs there. Tried [`THAW_TRIES`] times: the first
/// request on a guest channel that just moved can go unanswered, and a `thaw` repeated
/// after one that was carried out but whose answer was lost answers the same report.
pub async fn thaw(state: &AppState, vm: &str) -> Result<ThawReport, AgentError> {
    thaw_after(state, vm, None).await
}

/// [`thaw`] whose first try is `sent`, a `thaw` already written to the guest (the
/// destination writes it while the VM is still paused), when there is one.
pub async fn thaw_after(
    state: &AppState,
    vm: &str,
    mut sent: Option<Pending>,
) -> Result<ThawReport, AgentError> {
    let mut tries = 0;
    loop {
        tries += 1;
        let answer = match sent.take() {
            Some(pending) => pending.reply(THAW_TIMEOUT).await,
            None => state.call_guest(vm, &Command::Thaw, THAW_TIMEOUT).await,
        };
        match answer {
            Ok(Reply::Thawed(r)) => return Ok(r),
            Ok(other) => {
                return Err(AgentError::Guest {
                    id: vm.to_string(),
                    reason: format!("the guest answered thaw with {other:?}"),
                })
            }
            Err(e) if tries >= THAW_TRIES || matches!(e, AgentError::GuestRefused { .. }) => {
                return Err(e)
            }
            Err(e) => {
                tracing::info!(vm, error = %e, tries, "dependency-aware: thaw unanswered; asking again")
            }
        }
    }
}

/// The outcome of the first `freeze` (pure): what the guest froze, or why the migration
/// goes on as `adaptive`.
pub fn outcome_of(freeze: &Result<FreezeReport, String>) -> DependencyOutcome {
    match freeze {
        Ok(r) => DependencyOutcome {
            frozen: r.frozen.len() as u32,
            tainted: r.tainted,
            exempt: r.exempt,
            ..DependencyOutcome::default()
        },
        Err(reason) => DependencyOutcome::fallback(reason.clone()),
    }
}

/// Records how the thaw on `site` went (pure).
pub fn record_thaw(o: &mut DependencyOutcome, site: ThawSite, thaw: Result<ThawReport, String>) {
    o.thawed_on = Some(site);
    match thaw {
        Ok(r) => {
            o.thaw = Some(r);
            o.thaw_error = None;
        }
        Err(e) => o.thaw_error = Some(e),
    }
}

/// The renewals of a freeze during pre-copy, counted in the migration's view. They
/// stop when this is stopped or dropped (a source that gives up on the migration
/// renews nothing, so the guest thaws by itself at the deadline).
pub struct Renewals {
    task: tokio::task::JoinHandle<()>,
}

impl Renewals {
    pub fn start(state: AppState, job: Arc<Outbound>, vm: String) -> Self {
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(RENEW_EVERY).await;
                let r = freeze(&state, &vm).await;
                let mut v = job.view.lock().expect("migration view lock");
                let Some(d) = v.dependency.as_mut() else {
                    return;
                };
                d.renewals += 1;
                if let Err(e) = r {
                    d.renewals_failed += 1;
                    tracing::warn!(vm, error = %e, "dependency-aware: the guest did not renew its freeze");
                }
            }
        });
        Renewals { task }
    }

    /// No more renewals: the guest is about to be paused, or thawed.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for Renewals {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::guest::{FrozenProcess, ThawCause};

    #[test]
    fn deadline_outlasts_several_renewals_and_the_ask_is_shorter_than_a_renewal() {
        assert!(FREEZE_DEADLINE >= 4 * RENEW_EVERY);
        assert!(FREEZE_ASK_TIMEOUT < RENEW_EVERY);
        assert!(FREEZE_DEADLINE.as_millis() as u64 <= tern_api::guest::MAX_FREEZE_DEADLINE_MS);
    }

    #[test]
    fn a_refused_freeze_is_a_fallback_with_its_reason_and_a_frozen_one_counts() {
        let refused = outcome_of(&Err("this guest agent does not track taint yet".into()));
        assert_eq!(refused.frozen, 0);
        assert!(refused
            .fallback_reason
            .as_deref()
            .unwrap()
            .contains("does not track taint"));
        let frozen = outcome_of(&Ok(FreezeReport {
            frozen: vec![80, 81, 95],
            tainted: 4,
            exempt: 30,
            deadline_ms: 15_000,
            renewed: false,
        }));
        assert_eq!((frozen.frozen, frozen.tainted, frozen.exempt), (3, 4, 30));
        assert_eq!(frozen.fallback_reason, None);
    }

    #[test]
    fn a_thaw_records_its_site_and_report_and_a_failed_one_its_reason() {
        let mut o = DependencyOutcome::default();
        record_thaw(
            &mut o,
            ThawSite::Source,
            Err("no answer within 5000 ms".into()),
        );
        assert_eq!(o.thawed_on, Some(ThawSite::Source));
        assert_eq!(o.batch_paused_ms(), None);
        assert!(o.thaw_error.is_some());
        let p = |pid, ms| FrozenProcess {
            pid,
            comm: "batch".into(),
            frozen_ms: ms,
            thawed_early: false,
        };
        let report = ThawReport {
            cause: ThawCause::Host,
            processes: vec![p(80, 1200.0), p(81, 3400.5)],
            freeze_ms: 3401.0,
        };
        record_thaw(&mut o, ThawSite::Destination, Ok(report));
        assert_eq!(o.thawed_on, Some(ThawSite::Destination));
        assert_eq!(o.thaw_error, None);
        assert_eq!(o.batch_paused_ms(), Some(3400.5));
    }
}
