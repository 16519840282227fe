//! The imperative shell around the decisions: holds the snapshot in memory, commits each
//! decision's changes to the store before applying them, and publishes the events.
//!
//! ```text
//!  command ──► decide(snapshot, now) ──► changes ──► store.commit ──► snapshot.apply
//!                                                          └──► events ──► subscribers
//! ```
//!
//! Writers take the store's lock from decision to commit, so decisions see every earlier
//! commit and a failed commit leaves the snapshot as it was; readers take only the
//! snapshot's read lock and never wait for the disk.

use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

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

/// The cluster's state and the one door through which it changes.
pub struct Manager {
    /// Held by every writer from decision to commit, so decisions see every earlier
    /// commit; readers never wait for it.
    store: Mutex<Box<dyn Store>>,
    /// Written only by a writer holding `store`, after its commit succeeded.
    snap: RwLock<Snapshot>,
    events: broadcast::Sender<Event>,
    clock: Clock,
    /// Telemetry of the migrations under way; never stored.
    live: crate::control::LiveMigrations,
}

impl Manager {
    /// Loads the snapshot from `store`.
    pub fn open(store: Box<dyn Store>, clock: Clock) -> Result<Self> {
        let mut snap = store.load()?;
        snap.index();
        let (events, _) = broadcast::channel(4096);
        Ok(Self {
            store: Mutex::new(store),
            snap: RwLock::new(snap),
            events,
            clock,
            live: Default::default(),
        })
    }

    // A panic while holding a lock cannot leave the snapshot half-applied (apply does not
    // panic), so a poisoned lock is still consistent.
    fn store(&self) -> MutexGuard<'_, Box<dyn Store>> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn snap(&self) -> RwLockReadGuard<'_, Snapshot> {
        self.snap.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The running migrations' latest telemetry, which the control loop keeps.
    pub fn live(&self) -> &crate::control::LiveMigrations {
        &self.live
    }

    pub fn now(&self) -> Millis {
        (self.clock)()
    }

    /// Decides `cmd`, commits and applies it.
    pub fn execute(&self, cmd: Command) -> Result<Reply> {
        let now = self.now();
        let mut store = self.store();
        let (changes, reply) = decide::decide(&self.snap(), now, cmd)?;
        self.commit(&mut store, now, &changes)?;
        Ok(reply)
    }

    /// Decides the commands one after another, each seeing the ones before, and commits
    /// all that succeeded in one transaction. A command that fails is left out with its
    /// error; if the commit fails, nothing changes.
    pub fn execute_many(&self, cmds: Vec<Command>) -> Result<Vec<Result<Reply>>> {
        let now = self.now();
        let mut store = self.store();
        let mut work = self.snap().clone();
        let mut all = Vec::new();
        let mut out = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            match decide::decide(&work, now, cmd) {
                Ok((changes, reply)) => {
                    work.apply(&changes, &[]);
                    all.extend(changes);
                    out.push(Ok(reply));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        self.commit(&mut store, now, &all)?;
        Ok(out)
    }

    /// Runs a decision that needs no command (the health step, the balancer) and commits
    /// what it returns, with the value it computed beside the changes.
    pub fn step<T>(&self, f: impl FnOnce(&Snapshot, Millis) -> (Vec<Change>, T)) -> Result<T> {
        let now = self.now();
        let mut store = self.store();
        let (changes, out) = f(&self.snap(), now);
        self.commit(&mut store, now, &changes)?;
        Ok(out)
    }

    /// Commits, then applies to the snapshot; the caller holds the store.
    fn commit(&self, store: &mut Box<dyn Store>, now: Millis, changes: &[Change]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        let events = store.commit(now, changes)?;
        self.snap
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(changes, &events);
        for e in events {
            // No subscribers is fine: the log in the store is the record.
            let _ = self.events.send(e);
        }
        Ok(())
    }

    /// Replaces the snapshot with the store's (a manager that has just been elected
    /// leader catches up with what the previous leader committed).
    pub fn reload(&self) -> Result<()> {
        let store = self.store();
        let mut loaded = store.load()?;
        loaded.index();
        *self.snap.write().unwrap_or_else(|e| e.into_inner()) = loaded;
        Ok(())
    }

    /// Reads the snapshot; waits only while a commit is being applied, never for the
    /// store.
    pub fn read<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        f(&self.snap())
    }

    pub fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        self.store().events_since(since, limit)
    }

    pub fn migrations(&self, limit: usize) -> Result<Vec<Migration>> {
        self.store().migrations(limit)
    }

    /// Events committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}
