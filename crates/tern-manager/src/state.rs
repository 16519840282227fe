//! The manager's view of the cluster as plain values: hosts, VMs, migrations, events and
//! the balancer's settings. The store persists them; every decision reads a [`Snapshot`]
//! and answers with [`Change`]s, which the store commits and the snapshot then applies.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::Error;
use tern_model::NameKind;

pub use tern_api::catalog::{Image, Template};
pub use tern_api::manager::{
    BalancerSettings, Capacity, Event, EventKind, Host, HostState, Migration, MigrationReason,
    MigrationResult, Millis, Vm, VmSpec, VmState, MAX_MEMORY_MIB, MAX_VCPUS,
};
pub use tern_api::migration::PolicyKind;

/// The manager's checks of a value that arrived through the API, before it is used.
pub trait Validate {
    fn validate(&self) -> Result<(), Error>;
}

impl Validate for VmSpec {
    fn validate(&self) -> Result<(), Error> {
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
        // Groups follow the rule of VM and host names.
        for g in [&self.affinity, &self.anti_affinity].into_iter().flatten() {
            tern_model::names::check(NameKind::Group, g)?;
        }
        Ok(())
    }
}

impl Validate for BalancerSettings {
    fn validate(&self) -> Result<(), Error> {
        tern_balance::round::validate(self).map_err(|e| Error::BadInput(e.to_string()))
    }
}

/// One step of a decision's outcome. A decision's changes are committed atomically.
// Changes live from a decision to its commit and most of them are VM records, so
// boxing those to shrink the rarer variants would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    PutHost(Host),
    RemoveHost(String),
    PutVm(Vm),
    RemoveVm(String),
    PutMigration(Migration),
    PutSettings(BalancerSettings),
    PutImage(Image),
    RemoveImage(String),
    PutTemplate(Template),
    RemoveTemplate(String),
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
    /// The catalogue's images, by name.
    pub images: BTreeMap<String, Image>,
    /// The catalogue's templates, by name.
    pub templates: BTreeMap<String, Template>,
    /// Where VMs with a NIC get their addresses (`tern manager --guest-network`);
    /// configuration, never stored.
    pub guest_network: Option<crate::decide::network::GuestNetwork>,
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
                Change::RemoveHost(name) => {
                    self.hosts.remove(name);
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
                Change::PutImage(i) => {
                    self.images.insert(i.name.clone(), i.clone());
                }
                Change::RemoveImage(name) => {
                    self.images.remove(name);
                }
                Change::PutTemplate(t) => {
                    self.templates.insert(t.name.to_string(), t.clone());
                }
                Change::RemoveTemplate(name) => {
                    self.templates.remove(name);
                }
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
    fn specs_and_settings_are_checked() {
        let spec = VmSpec {
            anti_affinity: Some("db".into()),
            ..VmSpec::sized(2, 512)
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
            spec: VmSpec::sized(1, 1),
            desired_host: host.map(Into::into),
            observed_host: host.map(Into::into),
            state: VmState::Running,
            cpu_used: 0.0,
            cpu_measured: false,
            last_moved: None,
            disks_made: false,
            guest: None,
            restarts: Default::default(),
            start_error: None,
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
