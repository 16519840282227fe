//! The imperative shell around the decisions: holds the snapshot in memory, commits each
//! decision's changes to the store before applying them, and publishes the events.
//!
//! ```text
//!  command ──► decide(snapshot, now) ──► changes ──► store.commit ──► snapshot.apply
//!                                                          └──► events ──► subscribers
//! ```
//!
//! One lock covers the store and the snapshot, so decisions see every earlier commit and
//! a failed commit leaves the snapshot as it was.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

use crate::decide::{self, Command, Reply};
use crate::error::Result;
use crate::state::{Change, Event, Migration, Millis, Snapshot};
use crate::store::Store;

/// The time source; tests drive it by hand.
pub type Clock = Arc<dyn Fn() -> Millis + Send + Sync>;

/// Wall-clock milliseconds since the Unix epoch.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as Millis)
    })
}

struct Inner {
    store: Box<dyn Store>,
    snap: Snapshot,
}

/// The cluster's state and the one door through which it changes.
pub struct Manager {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Event>,
    clock: Clock,
}

impl Manager {
    /// Loads the snapshot from `store`.
    pub fn open(store: Box<dyn Store>, clock: Clock) -> Result<Self> {
        let snap = store.load()?;
        let (events, _) = broadcast::channel(4096);
        Ok(Self {
            inner: Mutex::new(Inner { store, snap }),
            events,
            clock,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the snapshot half-applied (apply
        // does not panic), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn now(&self) -> Millis {
        (self.clock)()
    }

    /// Decides `cmd`, commits and applies it.
    pub fn execute(&self, cmd: Command) -> Result<Reply> {
        let now = self.now();
        let mut inner = self.lock();
        let (changes, reply) = decide::decide(&inner.snap, now, cmd)?;
        Self::commit(&mut inner, &self.events, now, &changes)?;
        Ok(reply)
    }

    /// Decides the commands one after another, each seeing the ones before, and commits
    /// all that succeeded in one transaction. A command that fails is left out with its
    /// error; if the commit fails, nothing changes.
    pub fn execute_many(&self, cmds: Vec<Command>) -> Result<Vec<Result<Reply>>> {
        let now = self.now();
        let mut inner = self.lock();
        let backup = inner.snap.clone();
        let mut all = Vec::new();
        let mut out = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            match decide::decide(&inner.snap, now, cmd) {
                Ok((changes, reply)) => {
                    inner.snap.apply(&changes, &[]);
                    all.extend(changes);
                    out.push(Ok(reply));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        inner.snap = backup;
        Self::commit(&mut inner, &self.events, now, &all)?;
        Ok(out)
    }

    /// Runs a decision that needs no command (the health step, the balancer) and commits
    /// what it returns, with the value it computed beside the changes.
    pub fn step<T>(&self, f: impl FnOnce(&Snapshot, Millis) -> (Vec<Change>, T)) -> Result<T> {
        let now = self.now();
        let mut inner = self.lock();
        let (changes, out) = f(&inner.snap, now);
        Self::commit(&mut inner, &self.events, now, &changes)?;
        Ok(out)
    }

    fn commit(
        inner: &mut Inner,
        tx: &broadcast::Sender<Event>,
        now: Millis,
        changes: &[Change],
    ) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let events = inner.store.commit(now, changes)?;
        inner.snap.apply(changes, &events);
        for e in events {
            // No subscribers is fine: the log in the store is the record.
            let _ = tx.send(e);
        }
        Ok(())
    }

    /// Replaces the snapshot with the store's (a manager that has just been elected
    /// leader catches up with what the previous leader committed).
    pub fn reload(&self) -> Result<()> {
        let mut inner = self.lock();
        inner.snap = inner.store.load()?;
        Ok(())
    }

    /// Reads the snapshot under the lock.
    pub fn read<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        f(&self.lock().snap)
    }

    pub fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        self.lock().store.events_since(since, limit)
    }

    pub fn migrations(&self, limit: usize) -> Result<Vec<Migration>> {
        self.lock().store.migrations(limit)
    }

    /// Events committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}
