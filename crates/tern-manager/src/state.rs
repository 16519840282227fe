//! The manager's view of the cluster as plain values: hosts, VMs, migrations, events and
//! the balancer's settings. The store persists them; every decision reads a [`Snapshot`]
//! and answers with [`Change`]s, which the store commits and the snapshot then applies.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Milliseconds since the Unix epoch; decisions take the time as a value, never read a clock.
pub type Millis = u64;

/// Whether a host takes VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Active,
    /// Drained by an operator: keeps no VMs, takes no new ones, still heartbeats.
    Maintenance,
    /// Missed heartbeats for longer than the limit; its VMs were restarted elsewhere.
    Dead,
}

impl HostState {
    pub const ALL: [HostState; 3] = [Self::Active, Self::Maintenance, Self::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Maintenance => "maintenance",
            Self::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// What a host offers to VMs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// Physical cores available to guests.
    pub cpus: f64,
    /// Memory available to guests, MiB; VMs never overcommit it.
    pub memory_mib: u64,
}

/// A host as the manager knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    /// Where its agent answers (`http://ADDR:PORT`, or `sim:` for an in-process host).
    pub address: String,
    pub capacity: Capacity,
    pub state: HostState,
    pub last_heartbeat: Option<Millis>,
    /// Cores in use at the last heartbeat.
    pub cpu_used: Option<f64>,
    /// Cores in use, smoothed (EWMA) so one noisy report does not trigger migrations.
    pub cpu_smoothed: Option<f64>,
}

/// What an operator asks for when creating a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Pinned VMs stay where they are placed: the balancer never moves them.
    #[serde(default)]
    pub pinned: bool,
    /// VMs sharing an affinity group are kept on one host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// VMs sharing an anti-affinity group are kept on different hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
}

/// Largest VM the manager accepts; catches typos such as an extra zero.
pub const MAX_VCPUS: u32 = 64;
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

impl VmSpec {
    pub fn validate(&self) -> Result<(), Error> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(Error::BadInput(format!(
                "vcpus must be between 1 and {MAX_VCPUS}, got {}",
                self.vcpus
            )));
        }
        if self.memory_mib == 0 || self.memory_mib > MAX_MEMORY_MIB {
            return Err(Error::BadInput(format!(
                "memory_mib must be between 1 and {MAX_MEMORY_MIB}, got {}",
                self.memory_mib
            )));
        }
        for (what, group) in [
            ("affinity", &self.affinity),
            ("anti_affinity", &self.anti_affinity),
        ] {
            if let Some(g) = group {
                check_name(what, g)?;
            }
        }
        Ok(())
    }
}

/// Names of hosts, VMs and groups: 1-63 of `a-z 0-9 - _ .`, starting with a letter or digit,
/// so they are safe in URLs, file names and metric labels.
pub fn check_name(what: &str, name: &str) -> Result<(), Error> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c);
    let first_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if name.is_empty() || name.len() > 63 || !first_ok || !name.chars().all(ok_char) {
        return Err(Error::BadInput(format!(
            "{what} name {name:?} is invalid: use 1-63 characters of a-z, 0-9, '-', '_', '.', \
             starting with a letter or digit"
        )));
    }
    Ok(())
}

/// The migration termination policy named `name`, or a message listing the known ones.
pub fn check_policy(name: &str) -> Result<tern_migrate::policy::PolicyKind, Error> {
    name.parse().map_err(|_| {
        let known: Vec<&str> = tern_migrate::policy::PolicyKind::ALL
            .iter()
            .map(|p| p.as_str())
            .collect();
        Error::BadInput(format!(
            "unknown migration policy {name:?}; use one of: {}",
            known.join(", ")
        ))
    })
}

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Recorded with a desired host; not yet seen running there.
    Pending,
    Running,
    /// A live migration to the desired host is under way.
    Migrating,
    /// Deleted by an operator; removed once its host confirms.
    Deleting,
    /// No host could take it (e.g. after its host died); waits for room.
    Unplaced,
}

impl VmState {
    pub const ALL: [VmState; 5] = [
        Self::Pending,
        Self::Running,
        Self::Migrating,
        Self::Deleting,
        Self::Unplaced,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Migrating => "migrating",
            Self::Deleting => "deleting",
            Self::Unplaced => "unplaced",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// A VM: what was asked (spec, desired host) beside what agents report (observed host, load).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vm {
    pub name: String,
    pub spec: VmSpec,
    pub desired_host: Option<String>,
    pub observed_host: Option<String>,
    pub state: VmState,
    /// Cores it uses, smoothed over its host's reports like the host's own load.
    pub cpu_used: f64,
    /// Whether `cpu_used` comes from a report yet; the first report is taken as it is
    /// instead of being averaged with the 0 a new VM starts from.
    #[serde(default)]
    pub cpu_measured: bool,
    /// When it last moved; the balancer leaves it alone for the cooldown after that.
    pub last_moved: Option<Millis>,
}

/// Why a migration was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationReason {
    Manual,
    Balance,
    Evacuate,
}

/// How a migration ended, or that it has not yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum MigrationResult {
    Running,
    Succeeded { total_ms: u64, downtime_ms: u64 },
    Failed { error: String },
}

/// One live migration, kept after it ends as a record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Migration {
    pub id: u64,
    pub vm: String,
    pub from: String,
    pub to: String,
    /// The termination policy of the pre-copy rounds.
    pub policy: String,
    pub reason: MigrationReason,
    pub started: Millis,
    pub finished: Option<Millis>,
    pub result: MigrationResult,
}

/// How aggressively the balancer acts, and its safety limits (defined with the round it
/// steers, in `tern-balance`).
pub use tern_balance::round::BalancerSettings;

/// What happened, in the order it happened; the event log is append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    HostRegistered {
        host: String,
    },
    HostStateChanged {
        host: String,
        from: HostState,
        to: HostState,
    },
    VmCreated {
        vm: String,
        host: String,
    },
    VmRunning {
        vm: String,
        host: String,
    },
    VmDeleted {
        vm: String,
    },
    VmRestarted {
        vm: String,
        from: String,
        to: String,
    },
    VmUnplaced {
        vm: String,
        reason: String,
    },
    /// Its host stopped reporting it; it is created again.
    VmLost {
        vm: String,
        host: String,
    },
    MigrationStarted {
        id: u64,
        vm: String,
        from: String,
        to: String,
        policy: String,
    },
    MigrationFinished {
        id: u64,
        vm: String,
        result: MigrationResult,
    },
    PlanRecorded {
        moves: usize,
        score_before: f64,
        score_after: f64,
    },
    SettingsChanged,
}

/// A numbered event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub time: Millis,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// One step of a decision's outcome. A decision's changes are committed atomically.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    PutHost(Host),
    PutVm(Vm),
    RemoveVm(String),
    PutMigration(Migration),
    PutSettings(BalancerSettings),
    Event(EventKind),
}

/// Everything decisions need, in memory.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub hosts: BTreeMap<String, Host>,
    pub vms: BTreeMap<String, Vm>,
    /// Migrations not yet finished.
    pub running: BTreeMap<u64, Migration>,
    pub settings: BalancerSettings,
    /// Id the next migration gets.
    pub next_migration: u64,
    /// Sequence number of the last event (0: none yet).
    pub last_event: u64,
    /// VM names by observed host, so a heartbeat need not scan every VM. Built by
    /// [`Snapshot::index`]; [`Snapshot::apply`] keeps it. A snapshot built by hand has
    /// none and is scanned instead.
    pub observed: ObservedIndex,
}

/// VM names by the host they were last seen on; derived from [`Snapshot::vms`], so it
/// never makes two snapshots differ.
#[derive(Clone, Debug, Default)]
pub struct ObservedIndex(Option<BTreeMap<String, BTreeSet<String>>>);

impl PartialEq for ObservedIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl ObservedIndex {
    fn put(&mut self, old: Option<&Vm>, new: Option<&Vm>) {
        let Some(map) = &mut self.0 else { return };
        let host = |v: Option<&Vm>| v.and_then(|v| v.observed_host.clone());
        let (was, now) = (host(old), host(new));
        if was == now {
            return;
        }
        let name = old.or(new).map_or(String::new(), |v| v.name.clone());
        if let Some(h) = was {
            if let Some(set) = map.get_mut(&h) {
                set.remove(&name);
                if set.is_empty() {
                    map.remove(&h);
                }
            }
        }
        if let Some(h) = now {
            map.entry(h).or_default().insert(name);
        }
    }
}

impl Snapshot {
    /// Applies committed changes; `events` are those the store numbered for them.
    pub fn apply(&mut self, changes: &[Change], events: &[Event]) {
        for c in changes {
            match c {
                Change::PutHost(h) => {
                    self.hosts.insert(h.name.clone(), h.clone());
                }
                Change::PutVm(v) => {
                    let old = self.vms.insert(v.name.clone(), v.clone());
                    self.observed.put(old.as_ref(), Some(v));
                }
                Change::RemoveVm(name) => {
                    let old = self.vms.remove(name);
                    self.observed.put(old.as_ref(), None);
                }
                Change::PutMigration(m) => {
                    self.next_migration = self.next_migration.max(m.id + 1);
                    if m.finished.is_some() {
                        self.running.remove(&m.id);
                    } else {
                        self.running.insert(m.id, m.clone());
                    }
                }
                Change::PutSettings(s) => self.settings = s.clone(),
                Change::Event(_) => {}
            }
        }
        if let Some(last) = events.last() {
            self.last_event = last.seq;
        }
    }

    /// Builds the index of VMs by observed host; [`Snapshot::apply`] keeps it from then on.
    /// Whoever changes `vms` by hand afterwards must call this again.
    pub fn index(&mut self) {
        let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for v in self.vms.values() {
            if let Some(h) = &v.observed_host {
                map.entry(h.clone()).or_default().insert(v.name.clone());
            }
        }
        self.observed = ObservedIndex(Some(map));
    }

    /// VMs last seen on `host`, by name: through the index when there is one (a lookup
    /// instead of a scan of every VM), else by scanning.
    pub fn vms_observed_on<'a>(&'a self, host: &'a str) -> Box<dyn Iterator<Item = &'a Vm> + 'a> {
        let Some(map) = &self.observed.0 else {
            return Box::new(
                self.vms
                    .values()
                    .filter(move |v| v.observed_host.as_deref() == Some(host)),
            );
        };
        // A stale index would hide lost VMs; tests catch code that edits `vms` by hand
        // and forgets to re-index.
        debug_assert_eq!(
            map.get(host).map_or(0, BTreeSet::len),
            self.vms
                .values()
                .filter(|v| v.observed_host.as_deref() == Some(host))
                .count(),
            "the observed-host index of host {host} is stale"
        );
        Box::new(
            map.get(host)
                .into_iter()
                .flatten()
                .filter_map(|n| self.vms.get(n)),
        )
    }

    /// VMs whose desired host is `host`, i.e. those that hold room there.
    pub fn vms_on<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Vm> + 'a {
        self.vms
            .values()
            .filter(move |v| v.desired_host.as_deref() == Some(host))
    }

    /// Memory promised to VMs on each host, MiB.
    pub fn memory_used(&self) -> BTreeMap<&str, u64> {
        let mut out: BTreeMap<&str, u64> = BTreeMap::new();
        for v in self.vms.values() {
            if let Some(h) = &v.desired_host {
                *out.entry(h.as_str()).or_default() += v.spec.memory_mib;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["a", "web-1", "h0.rack2", "x_y"] {
            assert!(check_name("vm", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a b", "a/b", &"x".repeat(64)] {
            let err = check_name("vm", bad).unwrap_err().to_string();
            assert!(err.contains("invalid"), "{bad}: {err}");
        }
    }

    #[test]
    fn specs_and_settings_are_checked() {
        let spec = VmSpec {
            vcpus: 2,
            memory_mib: 512,
            pinned: false,
            affinity: None,
            anti_affinity: Some("db".into()),
        };
        assert!(spec.validate().is_ok());
        assert!(VmSpec {
            vcpus: 0,
            ..spec.clone()
        }
        .validate()
        .is_err());
        assert!(VmSpec {
            memory_mib: 0,
            ..spec.clone()
        }
        .validate()
        .is_err());
        assert!(VmSpec {
            anti_affinity: Some("DB!".into()),
            ..spec
        }
        .validate()
        .is_err());
        let s = BalancerSettings::default();
        assert!(s.validate().is_ok());
        assert!(BalancerSettings {
            aggressiveness: 6,
            ..s.clone()
        }
        .validate()
        .is_err());
        assert!(BalancerSettings {
            max_per_host: 0,
            ..s
        }
        .validate()
        .is_err());
    }

    #[test]
    fn the_observed_host_index_follows_applied_changes() {
        let vm = |name: &str, host: Option<&str>| Vm {
            name: name.into(),
            spec: VmSpec {
                vcpus: 1,
                memory_mib: 1,
                pinned: false,
                affinity: None,
                anti_affinity: None,
            },
            desired_host: host.map(Into::into),
            observed_host: host.map(Into::into),
            state: VmState::Running,
            cpu_used: 0.0,
            cpu_measured: false,
            last_moved: None,
        };
        let mut snap = Snapshot::default();
        snap.vms.insert("a".into(), vm("a", Some("h1")));
        snap.index();
        snap.apply(
            &[
                Change::PutVm(vm("b", Some("h1"))),
                Change::PutVm(vm("c", None)),
                Change::PutVm(vm("a", Some("h2"))),
            ],
            &[],
        );
        let on = |s: &Snapshot, h: &str| {
            s.vms_observed_on(h)
                .map(|v| v.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(on(&snap, "h1"), ["b"]);
        assert_eq!(on(&snap, "h2"), ["a"]);
        snap.apply(
            &[
                Change::RemoveVm("b".into()),
                Change::PutVm(vm("c", Some("h2"))),
            ],
            &[],
        );
        assert!(on(&snap, "h1").is_empty());
        assert_eq!(on(&snap, "h2"), ["a", "c"]);
        // Without an index the same answer comes from a scan.
        let mut plain = snap.clone();
        plain.observed = ObservedIndex::default();
        assert_eq!(on(&plain, "h2"), on(&snap, "h2"));
    }

    #[test]
    fn events_serialise_flat_with_a_type_tag() {
        let e = Event {
            seq: 7,
            time: 1000,
            kind: EventKind::VmDeleted { vm: "a".into() },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "vm_deleted");
        assert_eq!(v["seq"], 7);
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), e);
    }
}
