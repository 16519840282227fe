//! The state store: the manager's only I/O besides the network. Decisions never see it;
//! the manager loads a [`Snapshot`] once, then commits each decision's [`Change`]s here
//! before applying them to the snapshot in memory.
//!
//! - [`sqlite`]: the default store, one SQLite file in WAL mode, with read-only
//!   connections for the reads ([`StoreRead`]) so they never wait for a commit.
//! - [`schema`]: the versioned schema and its migrations.
//! - [`etcd`]: the store several managers share, in etcd.

pub mod etcd;
pub mod schema;
pub mod sqlite;

use std::sync::Arc;

use crate::error::Result;
use crate::state::{Change, Event, Migration, Millis, Snapshot};

pub use etcd::EtcdStore;
pub use sqlite::SqliteStore;

/// Durable cluster state.
pub trait Store: Send {
    /// Everything decisions need: hosts, VMs, running migrations, settings, counters.
    fn load(&self) -> Result<Snapshot>;
    /// Commits `changes` at `time` all at once or not at all; returns the events they
    /// appended, numbered.
    fn commit(&mut self, time: Millis, changes: &[Change]) -> Result<Vec<Event>>;
    /// Events numbered above `since`, oldest first, at most `limit`.
    fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>>;
    /// Migration records, newest first, at most `limit`.
    fn migrations(&self, limit: usize) -> Result<Vec<Migration>>;
    /// A reader of the last committed state that works beside commits instead of queueing
    /// behind them, if this store has one.
    fn reader(&self) -> Result<Option<Arc<dyn StoreRead>>> {
        Ok(None)
    }
}

/// The reads of [`Store`] that may run while another thread commits; each sees every
/// commit that finished before it started.
pub trait StoreRead: Send + Sync {
    fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>>;
    fn migrations(&self, limit: usize) -> Result<Vec<Migration>>;
}
