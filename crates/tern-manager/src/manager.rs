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
//! snapshot's read lock and never wait for the disk. Reads of the event log and of
//! migration records go to the store's reader where it has one, beside the commits.
//!
//! Heartbeats, the bulk of the writes, are committed in groups: each waits in a queue,
//! and whoever holds the store's lock next decides every queued one and commits them in
//! one transaction, answering each only after that commit.

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use tokio::sync::broadcast;

use crate::decide::{self, Command, HostAddresses, Reply};
use crate::error::Result;
use crate::state::{Change, Event, Migration, Millis, Snapshot};
use crate::store::{Store, StoreRead};

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
    /// Fair when a step lets go of it (see [`Manager::step`]).
    store: parking_lot::Mutex<Box<dyn Store>>,
    /// Reads the log and the records without waiting for `store`, when the store can.
    reader: Option<Arc<dyn StoreRead>>,
    /// Heartbeats waiting for whoever takes `store` next.
    queued: Mutex<Vec<Queued>>,
    /// Written only by a writer holding `store`, after its commit succeeded.
    snap: RwLock<Snapshot>,
    events: broadcast::Sender<Event>,
    clock: Clock,
    /// Telemetry of the migrations under way; never stored.
    live: crate::live::LiveMigrations,
    /// The host addresses registration accepts.
    addresses: HostAddresses,
    /// The host leases granted; never stored (see [`decide::lease`]).
    leases: Mutex<decide::lease::Leases>,
    /// How to reach agents, set by the control loop; routes that ask an agent directly
    /// (a trace) use it.
    agents: std::sync::OnceLock<Arc<dyn crate::client::Connector>>,
    /// The catalogue's image files (`docs/images.md`); none on a manager of simulated
    /// hosts.
    catalog_dir: Option<std::path::PathBuf>,
    /// How HA treats guests that stopped (see [`decide::guest`]).
    ha_limits: decide::guest::HaLimits,
}

impl Manager {
    /// Loads the snapshot from `store`.
    pub fn open(store: Box<dyn Store>, clock: Clock) -> Result<Self> {
        let mut snap = store.load()?;
        snap.index();
        let (events, _) = broadcast::channel(4096);
        let reader = store.reader()?;
        Ok(Self {
            reader,
            queued: Mutex::new(Vec::new()),
            store: parking_lot::Mutex::new(store),
            snap: RwLock::new(snap),
            events,
            leases: Mutex::new(decide::lease::Leases::new(clock())),
            agents: std::sync::OnceLock::new(),
            clock,
            live: Default::default(),
            addresses: HostAddresses::default(),
            catalog_dir: None,
            ha_limits: Default::default(),
        })
    }

    /// Hands VMs with a NIC addresses from `net`.
    pub fn with_guest_network(mut self, net: decide::network::GuestNetwork) -> Self {
        self.snap
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .guest_network = Some(net);
        self
    }

    /// Keeps the catalogue's image files in `dir` (created when the first arrives).
    pub fn with_catalog(mut self, dir: std::path::PathBuf) -> Self {
        self.catalog_dir = Some(dir);
        self
    }

    /// Treats guests that stopped with `limits` instead of the defaults.
    pub fn with_ha_limits(mut self, limits: decide::guest::HaLimits) -> Self {
        self.ha_limits = limits;
        self
    }

    /// How HA treats guests that stopped.
    pub fn ha_limits(&self) -> decide::guest::HaLimits {
        self.ha_limits
    }

    /// Where the catalogue's image files are, if this manager keeps any.
    pub fn catalog_dir(&self) -> Option<&std::path::Path> {
        self.catalog_dir.as_deref()
    }

    /// Accepts hosts at `addresses` instead of agent URLs: the clients the control
    /// loop is given must be able to reach every registered host.
    pub fn serving(mut self, addresses: HostAddresses) -> Self {
        self.addresses = addresses;
        self
    }

    fn store(&self) -> parking_lot::MutexGuard<'_, Box<dyn Store>> {
        self.store.lock()
    }

    // A panic while holding the lock cannot leave the snapshot half-applied (apply does
    // not panic), so a poisoned lock is still consistent.
    fn snap(&self) -> RwLockReadGuard<'_, Snapshot> {
        self.snap.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The running migrations' latest telemetry, which the control loop keeps.
    pub fn live(&self) -> &crate::live::LiveMigrations {
        &self.live
    }

    /// Records a lease renewal by `host` and answers the lease it now holds.
    pub fn renew_lease(&self, host: &str) -> Result<decide::lease::LeaseGrant> {
        let now = self.now();
        let settings = self.read(|s| {
            s.hosts
                .contains_key(host)
                .then(|| s.settings.clone())
                .ok_or_else(|| crate::Error::UnknownHost(host.to_owned()))
        })?;
        Ok(lock(&self.leases).renew(host, now, &settings))
    }

    /// The leases granted so far.
    pub fn leases(&self) -> decide::lease::Leases {
        lock(&self.leases).clone()
    }

    /// Forgets the leases granted and counts as if every host had renewed now: a
    /// manager that takes the lead cannot know what the previous leader granted.
    pub fn reset_leases(&self) {
        *lock(&self.leases) = decide::lease::Leases::new(self.now());
    }

    pub fn now(&self) -> Millis {
        (self.clock)()
    }

    /// Decides `cmd`, commits and applies it.
    pub fn execute(&self, cmd: Command) -> Result<Reply> {
        if matches!(cmd, Command::Heartbeat { .. }) {
            return self.execute_grouped(cmd);
        }
        self.check_address(&cmd)?;
        let now = self.now();
        let mut store = self.store();
        let (changes, reply) = decide::decide(&self.snap(), now, cmd)?;
        self.commit(&mut store, now, &changes)?;
        Ok(reply)
    }

    /// Refuses to register a host at an address this manager's clients cannot reach.
    fn check_address(&self, cmd: &Command) -> Result<()> {
        match cmd {
            Command::RegisterHost { address, .. } => self.addresses.check(address),
            _ => Ok(()),
        }
    }

    /// Queues `cmd` and waits until it is committed, by this thread or by the one that
    /// held the store before it and took the whole queue.
    fn execute_grouped(&self, cmd: Command) -> Result<Reply> {
        let (done, answer) = mpsc::sync_channel(1);
        lock(&self.queued).push(Queued { cmd, done });
        let mut store = self.store();
        // A holder of the store answers everything it took before letting go, so the
        // answer is here already or the command is still queued. Either way the store
        // goes on to the next thread that waits for it, answered as well or not.
        if let Ok(r) = answer.try_recv() {
            parking_lot::MutexGuard::unlock_fair(store);
            return r;
        }
        self.drain_queue(&mut store);
        parking_lot::MutexGuard::unlock_fair(store);
        answer
            .recv()
            .expect("a taken command is answered before the store is let go")
    }

    /// Commits every queued heartbeat; the caller holds the store.
    fn drain_queue(&self, store: &mut Box<dyn Store>) {
        let mut todo = std::mem::take(&mut *lock(&self.queued));
        while !todo.is_empty() {
            todo = self.commit_group(store, todo);
        }
    }

    /// Decides the queued commands against the snapshot and commits them together. One
    /// that reads what an earlier one of the group writes is left for the next group, so
    /// each decision sees what it would have seen alone, one after another; those are
    /// returned. If the group's commit fails, each is committed on its own instead, so
    /// one bad change fails only its own command.
    fn commit_group(&self, store: &mut Box<dyn Store>, todo: Vec<Queued>) -> Vec<Queued> {
        let now = self.now();
        let mut later = Vec::new();
        let mut group: Vec<(Queued, Reply)> = Vec::new();
        let mut changes = Vec::new();
        {
            let snap = self.snap();
            let mut written: HashSet<Key> = HashSet::new();
            for q in todo {
                if reads(&snap, &q.cmd).iter().any(|k| written.contains(k)) {
                    later.push(q);
                    continue;
                }
                match decide::decide(&snap, now, q.cmd.clone()) {
                    Ok((c, reply)) => {
                        written.extend(c.iter().filter_map(Key::written));
                        changes.extend(c);
                        group.push((q, reply));
                    }
                    // Nothing changed, so nothing waits for a commit.
                    Err(e) => {
                        let _ = q.done.send(Err(e));
                    }
                }
            }
        }
        match self.commit(store, now, &changes) {
            Ok(()) => {
                for (q, reply) in group {
                    let _ = q.done.send(Ok(reply));
                }
            }
            Err(_) => {
                for (q, _) in group {
                    let r = self.execute_locked(store, q.cmd);
                    let _ = q.done.send(r);
                }
            }
        }
        later
    }

    fn execute_locked(&self, store: &mut Box<dyn Store>, cmd: Command) -> Result<Reply> {
        let now = self.now();
        let (changes, reply) = decide::decide(&self.snap(), now, cmd)?;
        self.commit(store, now, &changes)?;
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
            match self
                .check_address(&cmd)
                .and_then(|()| decide::decide(&work, now, cmd))
            {
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
        // Heartbeats that queued meanwhile are answered, and the store goes to a thread
        // that waits for it: a caller that steps again at once (a balancing round
        // commits part after part) does not keep the writers waiting for every part.
        self.drain_queue(&mut store);
        parking_lot::MutexGuard::unlock_fair(store);
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
        let mut snap = self.snap.write().unwrap_or_else(|e| e.into_inner());
        // Configuration, not state: it stays as the manager was started.
        loaded.guest_network = snap.guest_network;
        *snap = loaded;
        Ok(())
    }

    /// Reads the snapshot; waits only while a commit is being applied, never for the
    /// store.
    /// Gives the manager its way to reach agents (the control loop's; the first wins).
    pub fn set_agents(&self, agents: Arc<dyn crate::client::Connector>) {
        let _ = self.agents.set(agents);
    }

    /// How to reach agents, once a control loop runs.
    pub fn agents(&self) -> Option<Arc<dyn crate::client::Connector>> {
        self.agents.get().cloned()
    }

    pub fn read<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        f(&self.snap())
    }

    pub fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        match &self.reader {
            Some(r) => r.events_since(since, limit),
            None => self.store().events_since(since, limit),
        }
    }

    pub fn migrations(&self, limit: usize) -> Result<Vec<Migration>> {
        match &self.reader {
            Some(r) => r.migrations(limit),
            None => self.store().migrations(limit),
        }
    }

    /// Events committed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

/// A heartbeat waiting to be committed, and where its answer goes.
struct Queued {
    cmd: Command,
    done: mpsc::SyncSender<Result<Reply>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a grouped decision reads or writes.
#[derive(PartialEq, Eq, Hash)]
enum Key {
    Host(String),
    Vm(String),
}

impl Key {
    fn written(c: &Change) -> Option<Key> {
        match c {
            Change::PutHost(h) => Some(Key::Host(h.name.clone())),
            Change::RemoveHost(name) => Some(Key::Host(name.clone())),
            Change::PutVm(v) => Some(Key::Vm(v.name.clone())),
            Change::RemoveVm(name) => Some(Key::Vm(name.clone())),
            Change::PutMigration(_)
            | Change::PutSettings(_)
            | Change::PutImage(_)
            | Change::RemoveImage(_)
            | Change::PutTemplate(_)
            | Change::RemoveTemplate(_)
            | Change::Event(_) => None,
        }
    }
}

/// Everything a heartbeat's decision reads besides the settings (which no heartbeat
/// writes): its host, the VMs it reports and the VMs last seen there.
fn reads(snap: &Snapshot, cmd: &Command) -> Vec<Key> {
    let Command::Heartbeat { host, report } = cmd else {
        unreachable!("only heartbeats are grouped")
    };
    let mut keys = vec![Key::Host(host.clone())];
    keys.extend(report.vms.iter().map(|l| Key::Vm(l.name.to_string())));
    keys.extend(snap.vms_observed_on(host).map(|v| Key::Vm(v.name.clone())));
    keys
}
