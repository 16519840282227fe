//! The periodic health step: declares silent hosts dead and restarts their VMs elsewhere,
//! retries VMs that found no room, and evacuates hosts drained into maintenance.
//!
//! ```text
//!  active ──drain──► maintenance ──undrain──► active
//!    │                   │
//!    └──silent > limit───┴──► dead ──heartbeat without stale VMs──► active
//! ```
//!
//! A host holding a lease (see [`super::lease`]) is declared dead only once its lease ran out,
//! when its own watchdog has stopped its guests; other hosts once silent for
//! `dead_after_s`. A host is declared dead by the step that first sees it so; the same step moves its
//! VMs away, so later steps find a dead host with no VMs and each VM restarts exactly once.

use std::collections::BTreeMap;

use super::lease::Leases;
use super::placement::Placer;
use super::start_migration;
use crate::state::{
    Change, EventKind, Host, HostState, Migration, MigrationReason, MigrationResult, Millis,
    Snapshot, Vm, VmState,
};

/// Migrations under way per host (as source or destination) and in all.
pub fn in_flight(snap: &Snapshot) -> (BTreeMap<&str, u32>, u32) {
    let mut per_host: BTreeMap<&str, u32> = BTreeMap::new();
    for m in snap.running.values() {
        *per_host.entry(m.from.as_str()).or_default() += 1;
        *per_host.entry(m.to.as_str()).or_default() += 1;
    }
    (per_host, snap.running.len() as u32)
}

/// Hosts not yet dead that may now be declared dead: leased ones whose lease ran out,
/// the others silent for longer than the settings allow (see [`Leases::may_declare_dead`]).
pub fn silent_hosts<'a>(snap: &'a Snapshot, now: Millis, leases: &Leases) -> Vec<&'a Host> {
    snap.hosts
        .values()
        .filter(|h| h.state != HostState::Dead)
        .filter(|h| leases.may_declare_dead(h, now, &snap.settings))
        .collect()
}

/// One health step, given the leases the manager granted.
pub fn tick(snap: &Snapshot, now: Millis, leases: &Leases) -> Vec<Change> {
    let mut changes = Vec::new();
    let dead: Vec<&Host> = silent_hosts(snap, now, leases);
    let is_dead = |h: &str| {
        dead.iter().any(|d| d.name == h)
            || snap.hosts.get(h).is_none_or(|x| x.state == HostState::Dead)
    };
    let mut after = snap.clone();
    for h in &dead {
        let mut gone = (*h).clone();
        gone.state = HostState::Dead;
        after.hosts.insert(h.name.clone(), gone.clone());
        changes.push(Change::PutHost(gone));
        changes.push(Change::Event(EventKind::HostStateChanged {
            host: h.name.clone(),
            from: h.state,
            to: HostState::Dead,
        }));
    }
    // Migrations touching a dead host fail; the VM stays where it really runs.
    for m in snap.running.values() {
        if is_dead(&m.from) || is_dead(&m.to) {
            let result = MigrationResult::Failed {
                error: "a host of the migration died".into(),
            };
            changes.push(Change::PutMigration(Migration {
                finished: Some(now),
                result: result.clone(),
                ..m.clone()
            }));
            changes.push(Change::Event(EventKind::MigrationFinished {
                id: m.id,
                vm: m.vm.clone(),
                result,
            }));
            after.running.remove(&m.id);
            if let Some(v) = after.vms.get_mut(&m.vm) {
                v.desired_host = Some(m.from.clone());
                v.state = VmState::Running;
            }
        }
    }
    // VMs whose host died, and those still waiting for room, are placed anew.
    let homeless: Vec<Vm> = after
        .vms
        .values()
        .filter(|v| match v.state {
            VmState::Unplaced => true,
            // Off by the operator's wish: HA leaves them off. A suspended VM's state is
            // in the shared store; `restore` runs it on any host.
            VmState::Deleting | VmState::Stopped | VmState::Suspended => false,
            _ => v.desired_host.as_deref().is_some_and(is_dead),
        })
        .cloned()
        .collect();
    for v in &homeless {
        if let Some(vm) = after.vms.get_mut(&v.name) {
            vm.desired_host = None;
        }
    }
    let mut placer = Placer::new(&after);
    for v in homeless {
        let from = v.observed_host.clone().or(v.desired_host.clone());
        match placer.place(&v.name, &v.spec, None) {
            Ok(to) => {
                if let Some(from) = from {
                    changes.push(Change::Event(EventKind::VmRestarted {
                        vm: v.name.clone(),
                        from,
                        to: to.clone(),
                    }));
                } else {
                    changes.push(Change::Event(EventKind::VmCreated {
                        vm: v.name.clone(),
                        host: to.clone(),
                    }));
                }
                changes.push(Change::PutVm(super::guest::gone(Vm {
                    desired_host: Some(to),
                    observed_host: None,
                    state: VmState::Pending,
                    ..v
                })));
            }
            Err(e) if v.state != VmState::Unplaced => {
                changes.push(Change::Event(EventKind::VmUnplaced {
                    vm: v.name.clone(),
                    reason: e.to_string(),
                }));
                changes.push(Change::PutVm(super::guest::gone(Vm {
                    desired_host: None,
                    observed_host: None,
                    state: VmState::Unplaced,
                    ..v
                })));
            }
            Err(_) => {}
        }
    }
    // VMs on dead hosts that were being deleted are gone with their host.
    for v in snap.vms.values() {
        if v.state == VmState::Deleting && v.observed_host.as_deref().is_some_and(is_dead) {
            changes.push(Change::RemoveVm(v.name.clone()));
            changes.push(Change::Event(EventKind::VmDeleted { vm: v.name.clone() }));
        }
    }
    changes.extend(evacuate(&after, now));
    changes
}

/// Migrations that move running VMs off hosts in maintenance, within the limits.
pub fn evacuate(snap: &Snapshot, now: Millis) -> Vec<Change> {
    let s = &snap.settings;
    let (mut per_host, mut total) = in_flight(snap);
    let mut per_host: BTreeMap<String, u32> = per_host
        .iter_mut()
        .map(|(k, v)| ((*k).to_owned(), *v))
        .collect();
    let mut placer = Placer::new(snap);
    let mut next = snap.clone();
    let mut changes = Vec::new();
    let draining = snap
        .hosts
        .values()
        .filter(|h| h.state == HostState::Maintenance);
    for h in draining {
        for v in snap.vms_on(&h.name).filter(|v| v.state == VmState::Running) {
            if total >= s.max_per_cluster {
                return changes;
            }
            if per_host.get(&h.name).copied().unwrap_or(0) >= s.max_per_host {
                break;
            }
            let Ok(to) = placer.choose(&v.name, &v.spec, Some(&h.name)) else {
                continue;
            };
            if per_host.get(&to).copied().unwrap_or(0) >= s.max_per_host {
                continue;
            }
            let Ok((c, m)) = start_migration(
                &next,
                now,
                v,
                &to,
                s.migration_policy(None, v.spec.migration_policy, MigrationReason::Evacuate),
                MigrationReason::Evacuate,
            ) else {
                continue;
            };
            placer.take(&v.spec, &to);
            next.next_migration = m.id + 1;
            next.running.insert(m.id, m);
            *per_host.entry(h.name.clone()).or_default() += 1;
            *per_host.entry(to).or_default() += 1;
            total += 1;
            changes.extend(c);
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testing::*;
    use crate::decide::{Command, LoadReport, VmLoad};

    /// A health step for hosts that hold no lease, in a cluster that never had any.
    fn tick_unleased(snap: &Snapshot, now: Millis) -> Vec<Change> {
        tick(snap, now, &Leases::default())
    }

    #[test]
    fn a_leased_host_is_not_declared_dead_while_its_lease_holds() {
        let mut snap = cluster(&[4.0, 4.0, 4.0], 4096);
        running(&mut snap, "a", "h0", spec(1, 1024));
        snap.settings.dead_after_s = 5;
        let mut leases = Leases::new(0);
        leases.renew("h0", 1_000, &snap.settings);
        for h in ["h1", "h2"] {
            snap.hosts.get_mut(h).unwrap().last_heartbeat = Some(20_000);
        }
        let end = 1_000 + snap.settings.lease_s * 1000 + crate::decide::lease::MARGIN_MS;
        assert!(tick(&snap, end, &leases).is_empty(), "silent, but leased");
        let changes = tick(&snap, end + 1, &leases);
        apply(&mut snap, end + 1, &changes);
        assert_eq!(snap.hosts["h0"].state, HostState::Dead);
        assert_ne!(snap.vms["a"].desired_host.as_deref(), Some("h0"));
    }

    #[test]
    fn ha_restarts_what_ran_from_its_disks_and_leaves_what_was_switched_off() {
        let mut snap = cluster(&[4.0, 4.0], 4096);
        for (v, state) in [
            ("up", VmState::Running),
            ("held", VmState::Paused),
            ("off", VmState::Stopped),
            ("saved", VmState::Suspended),
        ] {
            running(&mut snap, v, "h0", spec(1, 256));
            let vm = snap.vms.get_mut(v).unwrap();
            vm.state = state;
            vm.disks_made = true;
        }
        snap.settings.dead_after_s = 10;
        snap.hosts.get_mut("h1").unwrap().last_heartbeat = Some(15_000);
        let changes = tick_unleased(&snap, 20_000);
        apply(&mut snap, 20_000, &changes);
        assert_eq!(snap.hosts["h0"].state, HostState::Dead);
        for v in ["up", "held"] {
            let vm = &snap.vms[v];
            assert_eq!(
                (vm.state, vm.desired_host.as_deref()),
                (VmState::Pending, Some("h1"))
            );
            assert!(vm.disks_made, "{v} is created again from the disks it has");
        }
        assert_eq!(snap.vms["off"].state, VmState::Stopped);
        assert_eq!(snap.vms["saved"].state, VmState::Suspended);
        assert_eq!(snap.vms["off"].desired_host.as_deref(), Some("h0"));
    }

    #[test]
    fn a_silent_host_dies_once_and_its_vms_restart_once() {
        let mut snap = cluster(&[4.0, 4.0, 4.0], 4096);
        running(&mut snap, "a", "h0", spec(1, 1024));
        running(&mut snap, "b", "h0", spec(1, 1024));
        running(&mut snap, "c", "h1", spec(1, 1024));
        snap.settings.dead_after_s = 10;
        for h in ["h1", "h2"] {
            snap.hosts.get_mut(h).unwrap().last_heartbeat = Some(15_000);
        }
        assert!(tick_unleased(&snap, 10_000).is_empty());
        let changes = tick_unleased(&snap, 20_000);
        apply(&mut snap, 20_000, &changes);
        assert_eq!(snap.hosts["h0"].state, HostState::Dead);
        let restarts = changes
            .iter()
            .filter(|c| matches!(c, Change::Event(EventKind::VmRestarted { .. })))
            .count();
        assert_eq!(restarts, 2);
        for v in ["a", "b"] {
            let vm = &snap.vms[v];
            assert_eq!(vm.state, VmState::Pending);
            assert_ne!(vm.desired_host.as_deref(), Some("h0"));
        }
        // The next step restarts nothing again.
        assert!(tick_unleased(&snap, 21_000).is_empty());
        // h0 comes back still running its old copy of "a": it is told to destroy it and
        // stays dead until it has.
        let report = LoadReport {
            cpu_used: 1.0,
            vms: vec![VmLoad {
                name: "a".parse().unwrap(),
                cpu_used: 1.0,
                guest: None,
                powered_off: false,
            }],
            store_free_mib: None,
        };
        let reply = run(
            &mut snap,
            22_000,
            Command::Heartbeat {
                host: "h0".into(),
                report,
            },
        )
        .unwrap();
        assert_eq!(
            reply,
            crate::decide::Reply::Heartbeat(crate::decide::HeartbeatReply {
                stale: vec!["a".into()]
            })
        );
        assert_eq!(snap.hosts["h0"].state, HostState::Dead);
        run(
            &mut snap,
            23_000,
            Command::Heartbeat {
                host: "h0".into(),
                report: LoadReport::default(),
            },
        )
        .unwrap();
        assert_eq!(snap.hosts["h0"].state, HostState::Active);
    }

    #[test]
    fn vms_without_room_wait_and_are_placed_when_room_appears() {
        let mut snap = cluster(&[4.0, 4.0], 1024);
        running(&mut snap, "a", "h0", spec(1, 1024));
        running(&mut snap, "b", "h1", spec(1, 1024));
        snap.settings.dead_after_s = 1;
        snap.hosts.get_mut("h1").unwrap().last_heartbeat = Some(5_000);
        let c = tick_unleased(&snap, 5_000);
        apply(&mut snap, 5_000, &c);
        assert_eq!(snap.vms["a"].state, VmState::Unplaced);
        assert!(
            tick_unleased(&snap, 5_500).is_empty(),
            "no repeated unplaced events"
        );
        run(&mut snap, 6_000, Command::DeleteVm { name: "b".into() }).unwrap();
        run(&mut snap, 6_000, Command::VmRemoved { vm: "b".into() }).unwrap();
        snap.hosts.get_mut("h1").unwrap().last_heartbeat = Some(6_000);
        let c = tick_unleased(&snap, 6_000);
        apply(&mut snap, 6_000, &c);
        assert_eq!(snap.vms["a"].desired_host.as_deref(), Some("h1"));
        assert_eq!(snap.vms["a"].state, VmState::Pending);
    }

    #[test]
    fn a_drain_moves_vms_with_their_own_policy_else_the_evacuation_policy() {
        use tern_api::migration::PolicyKind;
        let mut snap = cluster(&[8.0, 8.0], 8192);
        running(&mut snap, "own", "h0", spec(1, 512));
        running(&mut snap, "plain", "h0", spec(1, 512));
        snap.settings.max_per_host = 2;
        snap.settings.evacuation_policy = Some(PolicyKind::DependencyAware);
        let set = Command::SetMigrationPolicy {
            name: "own".into(),
            policy: Some(PolicyKind::Xen),
        };
        run(&mut snap, 0, set).unwrap();
        let drain = Command::SetMaintenance {
            host: "h0".into(),
            on: true,
        };
        run(&mut snap, 0, drain).unwrap();
        let c = tick_unleased(&snap, 0);
        apply(&mut snap, 0, &c);
        let policy = |vm: &str| snap.running.values().find(|m| m.vm == vm).map(|m| m.policy);
        assert_eq!(policy("own"), Some(PolicyKind::Xen));
        assert_eq!(policy("plain"), Some(PolicyKind::DependencyAware));
    }

    #[test]
    fn draining_evacuates_within_the_limits() {
        let mut snap = cluster(&[8.0, 8.0, 8.0], 8192);
        for i in 0..4 {
            running(&mut snap, &format!("v{i}"), "h0", spec(1, 512));
        }
        snap.settings.max_per_host = 2;
        run(
            &mut snap,
            0,
            Command::SetMaintenance {
                host: "h0".into(),
                on: true,
            },
        )
        .unwrap();
        let c = tick_unleased(&snap, 0);
        apply(&mut snap, 0, &c);
        assert_eq!(snap.running.len(), 2);
        assert!(snap
            .running
            .values()
            .all(|m| m.from == "h0" && m.reason == MigrationReason::Evacuate));
        // Nothing more starts until those finish.
        assert!(evacuate(&snap, 0).is_empty());
        for id in snap.running.keys().copied().collect::<Vec<_>>() {
            run(
                &mut snap,
                1,
                Command::MigrationDone {
                    id,
                    result: MigrationResult::Succeeded {
                        total_ms: 1,
                        downtime_ms: 1,
                    },
                },
            )
            .unwrap();
        }
        let c = tick_unleased(&snap, 2);
        apply(&mut snap, 2, &c);
        assert_eq!(snap.running.len(), 2);
        assert_eq!(
            snap.vms_on("h0").count(),
            0,
            "desired hosts all moved off h0"
        );
    }
}
