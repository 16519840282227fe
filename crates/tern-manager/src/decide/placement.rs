//! Where a VM goes: the active host with room that is least loaded relative to its size,
//! honouring affinity and anti-affinity groups. Built once from a snapshot and updated as it
//! places, so placing many VMs in a row stays linear.

use std::collections::{BTreeMap, BTreeSet};

use crate::error::Error;
use crate::state::{HostState, Snapshot, VmSpec};

/// Why a host was not chosen; counted into the "no room" message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    NotActive,
    Excluded,
    Memory,
    /// Its disk store has too little free space for the VM's disks.
    Disk,
    AntiAffinity,
    Affinity,
}

impl Refusal {
    fn describe(self) -> &'static str {
        match self {
            Self::NotActive => "not active (maintenance or dead)",
            Self::Excluded => "the VM's current host",
            Self::Memory => "too little free memory",
            Self::Disk => "too little free space in its disk store for the VM's disks",
            Self::AntiAffinity => "already holding a VM of its anti-affinity group",
            Self::Affinity => "not the host of its affinity group",
        }
    }
}

struct Slot {
    active: bool,
    cpus: f64,
    memory_mib: u64,
    memory_used: u64,
    /// Cores in use, smoothed where a report exists; new VMs add their vCPUs until
    /// reports show what they really use.
    cpu_load: f64,
    /// Free MiB in its disk store as last reported, less the disks of VMs placed there
    /// and not yet made; `None` before a report.
    disk_free: Option<u64>,
}

/// Placement state over one snapshot.
pub struct Placer {
    hosts: BTreeMap<String, Slot>,
    /// Hosts holding a VM of each anti-affinity group.
    anti: BTreeMap<String, BTreeSet<String>>,
    /// The host of each affinity group.
    affinity: BTreeMap<String, String>,
    /// The disk size of each catalogue image that has a disk, in MiB.
    image_mib: BTreeMap<String, u64>,
    /// Whether the VMs placed get new disks, which need store space; a migration's
    /// disks are already made.
    new_disks: bool,
}

impl Placer {
    pub fn new(snap: &Snapshot) -> Self {
        let mut hosts: BTreeMap<String, Slot> = snap
            .hosts
            .values()
            .map(|h| {
                let slot = Slot {
                    active: h.state == HostState::Active,
                    cpus: h.capacity.cpus.max(f64::MIN_POSITIVE),
                    memory_mib: h.capacity.memory_mib,
                    memory_used: 0,
                    cpu_load: h.cpu_smoothed.or(h.cpu_used).unwrap_or(0.0),
                    disk_free: h.store_free_mib,
                };
                (h.name.clone(), slot)
            })
            .collect();
        let mut placer = Self {
            hosts: BTreeMap::new(),
            anti: BTreeMap::new(),
            affinity: BTreeMap::new(),
            image_mib: snap
                .images
                .keys()
                .filter_map(|n| Some((n.clone(), super::catalog::image_disk_mib(snap, n)?)))
                .collect(),
            new_disks: false,
        };
        for vm in snap.vms.values() {
            if let Some(h) = &vm.desired_host {
                let pending = vm.state == crate::state::VmState::Pending;
                let disks = placer.disk_mib(&vm.spec);
                if let Some(slot) = hosts.get_mut(h) {
                    slot.memory_used += vm.spec.memory_mib;
                    // A report already counts the disks of VMs that run.
                    if pending {
                        slot.disk_free = slot.disk_free.map(|f| f.saturating_sub(disks));
                    }
                }
                placer.note_groups(&vm.spec, h);
            }
        }
        placer.hosts = std::mem::take(&mut hosts);
        placer
    }

    /// A placer for new VMs: their disks must fit in the host's store as well.
    pub fn for_new_vms(snap: &Snapshot) -> Self {
        Self {
            new_disks: true,
            ..Self::new(snap)
        }
    }

    /// The most store space `spec`'s disks take, in MiB.
    fn disk_mib(&self, spec: &VmSpec) -> u64 {
        super::catalog::disk_mib_with(spec, |i| self.image_mib.get(i).copied())
    }

    fn note_groups(&mut self, spec: &VmSpec, host: &str) {
        if let Some(g) = &spec.anti_affinity {
            self.anti
                .entry(g.clone())
                .or_default()
                .insert(host.to_owned());
        }
        if let Some(g) = &spec.affinity {
            self.affinity
                .entry(g.clone())
                .or_insert_with(|| host.to_owned());
        }
    }

    /// Why `host` cannot take `spec`, or `None` if it can.
    fn refusal(
        &self,
        host: &str,
        slot: &Slot,
        spec: &VmSpec,
        exclude: Option<&str>,
    ) -> Option<Refusal> {
        if !slot.active {
            return Some(Refusal::NotActive);
        }
        if exclude == Some(host) {
            return Some(Refusal::Excluded);
        }
        if slot.memory_used + spec.memory_mib > slot.memory_mib {
            return Some(Refusal::Memory);
        }
        if self.new_disks
            && slot
                .disk_free
                .is_some_and(|free| self.disk_mib(spec) > free)
        {
            return Some(Refusal::Disk);
        }
        if let Some(g) = &spec.anti_affinity {
            if self.anti.get(g).is_some_and(|hs| hs.contains(host)) {
                return Some(Refusal::AntiAffinity);
            }
        }
        if let Some(g) = &spec.affinity {
            if self.affinity.get(g).is_some_and(|h| h != host) {
                return Some(Refusal::Affinity);
            }
        }
        None
    }

    /// Checks that `host` can take the VM (for a placement an operator named).
    pub fn check(&self, vm: &str, spec: &VmSpec, host: &str) -> Result<(), Error> {
        let slot = self
            .hosts
            .get(host)
            .ok_or_else(|| Error::UnknownHost(host.to_owned()))?;
        match self.refusal(host, slot, spec, None) {
            None => Ok(()),
            Some(r) => Err(Error::NoRoom {
                vm: vm.to_owned(),
                reason: format!("host {host:?} is {}", r.describe()),
            }),
        }
    }

    /// The best host for a new VM (or one leaving `exclude`), without recording it.
    pub fn choose(&self, vm: &str, spec: &VmSpec, exclude: Option<&str>) -> Result<String, Error> {
        let mut refused: BTreeMap<Refusal, usize> = BTreeMap::new();
        let mut best: Option<(f64, &str)> = None;
        for (name, slot) in &self.hosts {
            if let Some(r) = self.refusal(name, slot, spec, exclude) {
                *refused.entry(r).or_default() += 1;
                continue;
            }
            let load = (slot.cpu_load + f64::from(spec.vcpus)) / slot.cpus;
            if best.is_none_or(|(b, _)| load < b) {
                best = Some((load, name));
            }
        }
        match best {
            Some((_, name)) => Ok(name.to_owned()),
            None if self.hosts.is_empty() => Err(Error::NoRoom {
                vm: vm.to_owned(),
                reason: "no hosts are registered".into(),
            }),
            None => Err(Error::NoRoom {
                vm: vm.to_owned(),
                reason: refused
                    .iter()
                    .map(|(r, n)| format!("{n} host(s) {}", r.describe()))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    /// Records that the VM now holds room on `host`.
    pub fn take(&mut self, spec: &VmSpec, host: &str) {
        let disks = if self.new_disks {
            self.disk_mib(spec)
        } else {
            0
        };
        if let Some(slot) = self.hosts.get_mut(host) {
            slot.memory_used += spec.memory_mib;
            slot.cpu_load += f64::from(spec.vcpus);
            slot.disk_free = slot.disk_free.map(|f| f.saturating_sub(disks));
        }
        self.note_groups(spec, host);
    }

    /// Chooses and records in one step.
    pub fn place(
        &mut self,
        vm: &str,
        spec: &VmSpec,
        exclude: Option<&str>,
    ) -> Result<String, Error> {
        let host = self.choose(vm, spec, exclude)?;
        self.take(spec, &host);
        Ok(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testing::{cluster, spec};
    use proptest::prelude::*;

    #[test]
    fn the_least_loaded_host_with_room_wins() {
        let mut snap = cluster(&[8.0, 8.0, 8.0], 4096);
        snap.hosts.get_mut("h0").unwrap().cpu_smoothed = Some(6.0);
        snap.hosts.get_mut("h1").unwrap().cpu_smoothed = Some(1.0);
        snap.hosts.get_mut("h2").unwrap().cpu_smoothed = Some(3.0);
        let p = Placer::new(&snap);
        assert_eq!(p.choose("v", &spec(1, 1024), None).unwrap(), "h1");
        assert_eq!(p.choose("v", &spec(1, 1024), Some("h1")).unwrap(), "h2");
    }

    #[test]
    fn refusals_are_counted_in_the_message() {
        let mut snap = cluster(&[8.0, 8.0, 8.0], 1024);
        snap.hosts.get_mut("h0").unwrap().state = HostState::Maintenance;
        let err = Placer::new(&snap)
            .choose("big", &spec(1, 2048), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("1 host(s) not active"), "{err}");
        assert!(err.contains("2 host(s) too little free memory"), "{err}");
    }

    #[test]
    fn new_disks_must_fit_the_store_and_count_until_made() {
        let mut snap = cluster(&[8.0, 8.0], 8192);
        snap.hosts.get_mut("h0").unwrap().store_free_mib = Some(1000);
        snap.hosts.get_mut("h1").unwrap().store_free_mib = Some(5000);
        let mut disk = spec(1, 64);
        disk.disks = vec![tern_api::catalog::VmDisk {
            name: "data".into(),
            size_mib: Some(3000),
            from_image: false,
            store: Default::default(),
            bus: None,
        }];
        let p = Placer::for_new_vms(&snap);
        let err = p.check("v", &disk, "h0").unwrap_err().to_string();
        assert!(err.contains("disk store"), "{err}");
        assert_eq!(p.choose("v", &disk, None).unwrap(), "h1");
        // A migration moves no disk: the store's space does not matter.
        Placer::new(&snap).check("v", &disk, "h0").unwrap();
        // A VM placed on h1 and not yet made holds its space there.
        let mut p = Placer::for_new_vms(&snap);
        p.take(&disk, "h1");
        assert!(p.choose("w", &disk, None).is_err());
        let mut pending = snap.clone();
        crate::decide::testing::running(&mut pending, "p", "h1", disk.clone());
        pending.vms.get_mut("p").unwrap().state = crate::state::VmState::Pending;
        assert!(Placer::for_new_vms(&pending)
            .check("w", &disk, "h1")
            .is_err());
        // Running, it is in the report already.
        pending.vms.get_mut("p").unwrap().state = crate::state::VmState::Running;
        Placer::for_new_vms(&pending)
            .check("w", &disk, "h1")
            .unwrap();
    }

    #[test]
    fn groups_are_honoured() {
        let snap = cluster(&[8.0, 8.0, 8.0], 8192);
        let mut p = Placer::new(&snap);
        let anti = VmSpec {
            anti_affinity: Some("db".into()),
            ..spec(1, 512)
        };
        let mut seen = BTreeSet::new();
        for i in 0..3 {
            seen.insert(p.place(&format!("db{i}"), &anti, None).unwrap());
        }
        assert_eq!(seen.len(), 3);
        let err = p.place("db3", &anti, None).unwrap_err().to_string();
        assert!(err.contains("anti-affinity"), "{err}");
        let aff = VmSpec {
            affinity: Some("web".into()),
            ..spec(4, 512)
        };
        let first = p.place("w0", &aff, None).unwrap();
        // Even though that host is now the busiest, its group mate follows it.
        assert_eq!(p.place("w1", &aff, None).unwrap(), first);
    }

    proptest! {
        /// Whatever order VMs arrive in, memory is never overcommitted and a refusal only
        /// happens when no host could take the VM.
        #[test]
        fn memory_is_never_overcommitted(sizes in prop::collection::vec(1u64..4096, 1..60)) {
            let snap = cluster(&[4.0, 8.0, 2.0], 8192);
            let mut p = Placer::new(&snap);
            let mut used: BTreeMap<String, u64> = BTreeMap::new();
            for (i, m) in sizes.iter().enumerate() {
                match p.place(&format!("v{i}"), &spec(1, *m), None) {
                    Ok(h) => *used.entry(h).or_default() += m,
                    Err(_) => prop_assert!(snap.hosts.keys().all(|h| used.get(h).copied().unwrap_or(0) + m > 8192)),
                }
            }
            prop_assert!(used.values().all(|u| *u <= 8192));
        }
    }
}
