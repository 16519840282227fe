//! The etcd store: the cluster's state under one key prefix of an etcd v3 cluster, so
//! several managers can share it (see [`crate::ha`]).
//!
//! ```text
//!  PREFIX meta                 {"last_event": N, "next_migration": M}  (bumped by every commit)
//!  PREFIX leader               URL of the leading manager, attached to its lease
//!  PREFIX hosts/NAME           Host as JSON
//!  PREFIX vms/NAME             Vm as JSON
//!  PREFIX migrations/ID        Migration as JSON, ID zero-padded so keys sort by number
//!  PREFIX events/SEQ           Event as JSON, SEQ zero-padded
//!  PREFIX settings             BalancerSettings as JSON
//! ```
//!
//! A commit is one etcd transaction that holds only if the leader key still has the
//! create revision this manager won the election with and `meta` is unchanged since this
//! store last read or wrote it. So a manager that lost the lease, or whose view is stale,
//! writes nothing; events are numbered from `meta` in the same transaction, so two
//! commits can never give out one number twice.
//!
//! The [`Store`] trait is synchronous; the store runs its requests on a runtime of its
//! own and waits for them, so it may be called from any thread, async or not.
//!
//! - [`gateway`]: the etcd client.

pub mod gateway;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Store;
use crate::error::{Error, Result};
use crate::ha::Leadership;
use crate::state::{BalancerSettings, Change, Event, Host, Migration, Millis, Snapshot, Vm};
use gateway::{op, Gateway, Kv};

/// How long one request may wait for a member; well under the lease TTL so a leader
/// notices trouble while it still holds the lease.
pub const REQUEST_TIMEOUT: Duration = Duration::from_millis(1500);

/// The counters every commit moves forward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Meta {
    last_event: u64,
    next_migration: u64,
}

/// The keys of one cluster's state.
#[derive(Clone, Debug)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix`, which should end in `/` (e.g. `/tern/`).
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }
    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.prefix).into_bytes()
    }
    pub fn leader(&self) -> Vec<u8> {
        self.key("leader")
    }
    fn meta(&self) -> Vec<u8> {
        self.key("meta")
    }
    fn settings(&self) -> Vec<u8> {
        self.key("settings")
    }
    fn images(&self) -> Vec<u8> {
        self.key("images/")
    }
    fn image(&self, name: &str) -> Vec<u8> {
        self.key(&format!("images/{name}"))
    }
    fn templates(&self) -> Vec<u8> {
        self.key("templates/")
    }
    fn template(&self, name: &str) -> Vec<u8> {
        self.key(&format!("templates/{name}"))
    }
    fn hosts(&self) -> Vec<u8> {
        self.key("hosts/")
    }
    fn host(&self, name: &str) -> Vec<u8> {
        self.key(&format!("hosts/{name}"))
    }
    fn vms(&self) -> Vec<u8> {
        self.key("vms/")
    }
    fn vm(&self, name: &str) -> Vec<u8> {
        self.key(&format!("vms/{name}"))
    }
    fn migrations(&self) -> Vec<u8> {
        self.key("migrations/")
    }
    fn migration(&self, id: u64) -> Vec<u8> {
        self.key(&format!("migrations/{id:020}"))
    }
    fn events(&self) -> Vec<u8> {
        self.key("events/")
    }
    fn event(&self, seq: u64) -> Vec<u8> {
        self.key(&format!("events/{seq:020}"))
    }
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("manager state types serialise to JSON")
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, kv: &Kv) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| {
        Error::Corrupt(format!(
            "{what} at etcd key {:?}: {e}",
            String::from_utf8_lossy(&kv.key)
        ))
    })
}

/// Puts and deletes of one commit, one per key (etcd refuses a transaction that writes a
/// key twice, and a decision may put the same VM more than once), plus its events.
struct Writes {
    keys: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    events: Vec<Event>,
    meta: Meta,
}

/// Turns a decision's changes into key writes; pure.
fn writes(keys: &Keys, meta: Meta, time: Millis, changes: &[Change]) -> Writes {
    let mut w = Writes {
        keys: BTreeMap::new(),
        events: Vec::new(),
        meta,
    };
    for c in changes {
        let (k, v) = match c {
            Change::PutHost(h) => (keys.host(&h.name), Some(to_json(h))),
            Change::RemoveHost(name) => (keys.host(name), None),
            Change::PutVm(v) => (keys.vm(&v.name), Some(to_json(v))),
            Change::RemoveVm(name) => (keys.vm(name), None),
            Change::PutMigration(m) => {
                w.meta.next_migration = w.meta.next_migration.max(m.id + 1);
                (keys.migration(m.id), Some(to_json(m)))
            }
            Change::PutSettings(s) => (keys.settings(), Some(to_json(s))),
            Change::PutImage(i) => (keys.image(&i.name), Some(to_json(i))),
            Change::RemoveImage(name) => (keys.image(name), None),
            Change::PutTemplate(t) => (keys.template(t.name.as_str()), Some(to_json(t))),
            Change::RemoveTemplate(name) => (keys.template(name), None),
            Change::Event(kind) => {
                w.meta.last_event += 1;
                let e = Event {
                    seq: w.meta.last_event,
                    time,
                    kind: kind.clone(),
                };
                let k = keys.event(e.seq);
                let v = to_json(&e);
                w.events.push(e);
                (k, Some(v))
            }
        };
        w.keys.insert(k, v);
    }
    w
}

/// What this store last read or wrote of `meta`, to compare against.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    meta: Meta,
    /// `meta`'s mod revision (0: the key does not exist yet).
    revision: i64,
}

pub struct EtcdStore {
    gateway: Arc<Gateway>,
    keys: Keys,
    fence: Arc<Leadership>,
    seen: Mutex<Seen>,
    /// Runs the requests; `None` only while dropping.
    rt: Option<tokio::runtime::Runtime>,
}

impl EtcdStore {
    /// A store over the etcd cluster at `endpoints`, keys under `prefix`; commits only
    /// while `fence` says this manager leads.
    pub fn open(endpoints: &[String], prefix: &str, fence: Arc<Leadership>) -> Result<Self> {
        let gateway = Arc::new(Gateway::new(endpoints, REQUEST_TIMEOUT)?);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tern-etcd")
            .enable_all()
            .build()
            .map_err(|e| Error::Etcd(format!("starting the etcd client: {e}")))?;
        Ok(Self {
            gateway,
            keys: Keys::new(prefix),
            fence,
            seen: Mutex::new(Seen::default()),
            rt: Some(rt),
        })
    }

    /// Runs `f` on the store's runtime and waits for it.
    fn block<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<Gateway>) -> std::pin::Pin<Box<dyn Future<Output = T> + Send>>,
    ) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let fut = f(self.gateway.clone());
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the store")
            .spawn(async move {
                let _ = tx.send(fut.await);
            });
        rx.recv()
            .expect("the store's runtime finishes what it was given")
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Seen> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime; this does not.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Store for EtcdStore {
    fn load(&self) -> Result<Snapshot> {
        let k = self.keys.clone();
        // One transaction, so every part is read at one revision.
        let reads = vec![
            op::get(&k.meta()),
            op::get_prefix(&k.hosts()),
            op::get_prefix(&k.vms()),
            op::get_prefix(&k.migrations()),
            op::get(&k.settings()),
            op::get_prefix(&k.images()),
            op::get_prefix(&k.templates()),
        ];
        let r = self.block(|g| Box::pin(async move { g.txn(vec![], reads, vec![]).await }))?;
        let mut snap = Snapshot::default();
        let mut seen = Seen::default();
        if let Some(kv) = r.range(0).first() {
            seen = Seen {
                meta: from_json("counters", kv)?,
                revision: kv.mod_revision,
            };
        }
        for kv in r.range(1) {
            let h: Host = from_json("host", kv)?;
            snap.hosts.insert(h.name.clone(), h);
        }
        for kv in r.range(2) {
            let v: Vm = from_json("VM", kv)?;
            snap.vms.insert(v.name.clone(), v);
        }
        for kv in r.range(3) {
            let m: Migration = from_json("migration", kv)?;
            if m.finished.is_none() {
                snap.running.insert(m.id, m);
            }
        }
        if let Some(kv) = r.range(4).first() {
            snap.settings = from_json::<BalancerSettings>("balancer settings", kv)?;
        }
        for kv in r.range(5) {
            let i: crate::state::Image = from_json("catalogue image", kv)?;
            snap.images.insert(i.name.clone(), i);
        }
        for kv in r.range(6) {
            let t: crate::state::Template = from_json("catalogue template", kv)?;
            snap.templates.insert(t.name.to_string(), t);
        }
        snap.next_migration = seen.meta.next_migration.max(1);
        snap.last_event = seen.meta.last_event;
        *self.seen() = seen;
        Ok(snap)
    }

    fn commit(&mut self, time: Millis, changes: &[Change]) -> Result<Vec<Event>> {
        let term = self.fence.term().ok_or_else(|| {
            Error::NotLeader(self.fence.leader().filter(|l| l != self.fence.me()))
        })?;
        let seen = *self.seen();
        let w = writes(&self.keys, seen.meta, time, changes);
        let mut ops: Vec<_> = w
            .keys
            .iter()
            .map(|(k, v)| match v {
                Some(v) => op::put(k, v, None),
                None => op::delete(k),
            })
            .collect();
        ops.push(op::put(&self.keys.meta(), &to_json(&w.meta), None));
        let compare = vec![
            op::created_at(&self.keys.leader(), term),
            op::modified_at(&self.keys.meta(), seen.revision),
        ];
        let r = self.block(|g| Box::pin(async move { g.txn(compare, ops, vec![]).await }))?;
        if !r.succeeded {
            // Another manager leads now, or wrote since this one last looked: either way
            // this one must stop acting and reload before it leads again.
            self.fence.step_down(term);
            return Err(Error::NotLeader(None));
        }
        *self.seen() = Seen {
            meta: w.meta,
            revision: r.header.revision,
        };
        Ok(w.events)
    }

    fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        let from = self.keys.event(since.saturating_add(1));
        let end = gateway::prefix_end(&self.keys.events());
        let kvs = self.block(move |g| {
            Box::pin(async move { g.range(&from, &end, limit.max(1), false).await })
        })?;
        kvs.iter().map(|kv| from_json("event", kv)).collect()
    }

    fn migrations(&self, limit: usize) -> Result<Vec<Migration>> {
        let from = self.keys.migrations();
        let end = gateway::prefix_end(&from);
        let kvs = self.block(move |g| {
            Box::pin(async move { g.range(&from, &end, limit.max(1), true).await })
        })?;
        kvs.iter().map(|kv| from_json("migration", kv)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{EventKind, VmSpec, VmState};
    use proptest::prelude::*;

    fn vm(name: &str, cpu: f64) -> Vm {
        Vm {
            name: name.into(),
            spec: VmSpec::sized(1, 64),
            desired_host: None,
            observed_host: None,
            state: VmState::Pending,
            cpu_used: cpu,
            cpu_measured: false,
            last_moved: None,
            disks_made: false,
            guest: None,
            restarts: Default::default(),
            start_error: None,
        }
    }

    #[test]
    fn a_key_written_twice_keeps_the_last_value() {
        let keys = Keys::new("/t/");
        let w = writes(
            &keys,
            Meta::default(),
            5,
            &[
                Change::PutVm(vm("a", 1.0)),
                Change::PutVm(vm("a", 2.0)),
                Change::PutVm(vm("b", 1.0)),
                Change::RemoveVm("b".into()),
            ],
        );
        assert_eq!(w.keys.len(), 2);
        let a: Vm = serde_json::from_slice(w.keys[&keys.vm("a")].as_ref().unwrap()).unwrap();
        assert_eq!(a.cpu_used, 2.0);
        assert_eq!(w.keys[&keys.vm("b")], None);
    }

    proptest! {
        /// Events are numbered on from the counter without gaps, each under its own key,
        /// and the counter ends at the last one.
        #[test]
        fn events_number_on_from_the_counter(last in 0u64..1_000_000, n in 0usize..20, ids in proptest::collection::vec(1u64..100, 0..5)) {
            let keys = Keys::new("/t/");
            let mut changes: Vec<Change> = (0..n).map(|i| Change::Event(EventKind::VmDeleted { vm: format!("v{i}") })).collect();
            for id in &ids {
                changes.push(Change::PutMigration(Migration {
                    id: *id, vm: "v".into(), from: "a".into(), to: "b".into(), policy: crate::state::PolicyKind::Adaptive,
                    reason: crate::state::MigrationReason::Manual, started: 0, finished: None,
                    result: crate::state::MigrationResult::Running,
                }));
            }
            let meta = Meta { last_event: last, next_migration: 1 };
            let w = writes(&keys, meta, 9, &changes);
            prop_assert_eq!(w.events.len(), n);
            for (i, e) in w.events.iter().enumerate() {
                prop_assert_eq!(e.seq, last + 1 + i as u64);
                prop_assert!(w.keys.contains_key(&keys.event(e.seq)));
            }
            prop_assert_eq!(w.meta.last_event, last + n as u64);
            prop_assert_eq!(w.meta.next_migration, ids.iter().max().map_or(1, |m| m + 1));
        }
    }

    #[test]
    fn zero_padded_keys_sort_by_number() {
        let k = Keys::new("/t/");
        assert!(k.event(9) < k.event(10));
        assert!(k.migration(99) < k.migration(100));
    }
}
