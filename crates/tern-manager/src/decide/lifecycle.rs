//! A VM's life as an operator drives it (`docs/manager.md`, "VM lifecycle"): which
//! action each state allows and where it leads, where a suspended VM is restored, and
//! recording an action once its host carried it out. The API asks the host first and
//! records after, so a failed action leaves the VM in the state it was in.
//!
//! ```text
//!            start                   pause
//!  stopped ─────────► running ◄──────────────► paused
//!     ▲    ◄───────── │  ▲  │ ↻ reboot resume    │
//!     │       stop    │  │  │                    │ stop
//!     └───────────────┼──┼──┼────────────────────┘
//!                     │  │  suspend (running or paused)
//!              restore│  │  ▼
//!                     └─ suspended
//! ```

use tern_api::manager::VmAction;

use super::placement::Placer;
use super::{Decision, Reply};
use crate::error::{Error, Result};
use crate::state::{Change, EventKind, HostState, Snapshot, Vm, VmState};

/// The state `action` takes a VM in `state` to, if `state` allows it (pure).
pub fn next(state: VmState, action: VmAction) -> Option<VmState> {
    use VmAction as A;
    use VmState as S;
    match (state, action) {
        (S::Stopped, A::Start) => Some(S::Running),
        (S::Running | S::Paused, A::Stop) => Some(S::Stopped),
        (S::Running, A::Reboot) => Some(S::Running),
        (S::Running, A::Pause) => Some(S::Paused),
        (S::Paused, A::Resume) => Some(S::Running),
        (S::Running | S::Paused, A::Suspend) => Some(S::Suspended),
        (S::Suspended, A::Restore) => Some(S::Running),
        _ => None,
    }
}

/// Whether a VM in `state` may be deleted (pure): any but one whose migration is under
/// way, which the migration would bring back.
pub fn may_delete(state: VmState) -> bool {
    state != VmState::Migrating
}

/// The actions a VM in `state` allows, in [`VmAction::ALL`] order (pure): what the web
/// page offers as buttons.
pub fn allowed(state: VmState) -> Vec<VmAction> {
    VmAction::ALL
        .into_iter()
        .filter(|a| next(state, *a).is_some())
        .collect()
}

/// The states that allow `action` (pure), for messages.
fn allowed_in(action: VmAction) -> Vec<&'static str> {
    VmState::ALL
        .into_iter()
        .filter(|s| next(*s, action).is_some())
        .map(VmState::as_str)
        .collect()
}

/// Checks that `v` may take `action`; the state it will be in (pure). A refusal is a
/// 409 naming the VM's state and the states that allow the action.
pub fn check(v: &Vm, action: VmAction) -> Result<VmState> {
    next(v.state, action).ok_or_else(|| {
        Error::Conflict(format!(
            "VM {:?} is {}: {} needs it {}",
            v.name,
            v.state.as_str(),
            action.as_str(),
            allowed_in(action).join(" or ")
        ))
    })
}

/// The host `action` on `v` is carried out on (pure): where it is, or for a restore
/// the host asked for, else its own host while active, else the least loaded active
/// host with room.
pub fn target(snap: &Snapshot, v: &Vm, action: VmAction, asked: Option<&str>) -> Result<String> {
    let host = v.observed_host.clone().or_else(|| v.desired_host.clone());
    if action != VmAction::Restore {
        let h = host.ok_or_else(|| {
            Error::Conflict(format!(
                "VM {:?} is on no host to {} it on",
                v.name,
                action.as_str()
            ))
        })?;
        if snap
            .hosts
            .get(&h)
            .is_some_and(|x| x.state == HostState::Dead)
        {
            return Err(Error::Conflict(format!(
                "VM {:?} is on host {h:?}, which is dead; wait until it is back",
                v.name
            )));
        }
        return Ok(h);
    }
    let placer = Placer::new(snap);
    match asked {
        Some(h) => {
            placer.check(&v.name, &v.spec, h)?;
            Ok(h.to_owned())
        }
        None => match host {
            Some(h)
                if snap
                    .hosts
                    .get(&h)
                    .is_some_and(|x| x.state == HostState::Active) =>
            {
                Ok(h)
            }
            _ => placer.choose(&v.name, &v.spec, None),
        },
    }
}

/// Records that `host` carried out `action` on VM `name`: its new state (and for a
/// restore, its new host). The state is checked again: it may have changed while the
/// host worked.
pub fn acted(snap: &Snapshot, name: &str, action: VmAction, host: &str) -> Result<Decision> {
    let v = snap
        .vms
        .get(name)
        .ok_or_else(|| Error::UnknownVm(name.to_owned()))?;
    // The host's report may have recorded the stop already (a guest that powered off
    // is reported stopped): the stop is done, not refused.
    if action == VmAction::Stop && v.state == VmState::Stopped {
        return Ok((Vec::new(), Reply::Vm(v.clone())));
    }
    let to = check(v, action)?;
    let mut next = Vm {
        state: to,
        ..v.clone()
    };
    if action == VmAction::Restore {
        next.desired_host = Some(host.to_owned());
        next.observed_host = Some(host.to_owned());
    }
    // An operator who starts, stops or power-cycles the VM has seen to its guest: HA
    // counts anew. A guest that is not running any more has no health to show.
    if matches!(
        action,
        VmAction::Start | VmAction::Stop | VmAction::Reboot | VmAction::Restore
    ) {
        next.restarts = Default::default();
        next.guest = None;
    }
    if to != VmState::Running {
        next.guest = None;
    }
    let mut changes = Vec::new();
    if next != *v {
        changes.push(Change::PutVm(next.clone()));
    }
    changes.push(Change::Event(EventKind::VmStateChanged {
        vm: name.to_owned(),
        action,
        from: v.state,
        to,
        host: host.to_owned(),
    }));
    Ok((changes, Reply::Vm(next)))
}

/// Checks that disk `disk` of VM `name` may grow to `size_mib` (pure): the VM is
/// stopped, has that disk, and the size is a growth within bounds.
pub fn check_resize(snap: &Snapshot, name: &str, disk: &str, size_mib: u64) -> Result<()> {
    let v = snap
        .vms
        .get(name)
        .ok_or_else(|| Error::UnknownVm(name.to_owned()))?;
    if v.state != VmState::Stopped {
        return Err(Error::Conflict(format!(
            "VM {name:?} is {}: a disk is resized while the VM is stopped (`tern vm stop`)",
            v.state.as_str()
        )));
    }
    let d = v
        .spec
        .disks
        .iter()
        .find(|d| d.name == disk)
        .ok_or_else(|| Error::BadInput(format!("VM {name:?} has no disk named {disk:?}")))?;
    if size_mib == 0 || size_mib > tern_api::agent::MAX_DISK_MIB {
        return Err(Error::BadInput(format!(
            "size_mib {size_mib} is outside 1..={}",
            tern_api::agent::MAX_DISK_MIB
        )));
    }
    if d.size_mib.is_some_and(|now| size_mib < now) {
        return Err(Error::BadInput(format!(
            "disk {disk:?} of VM {name:?} is {} MiB; disks only grow",
            d.size_mib.unwrap_or_default()
        )));
    }
    Ok(())
}

/// Records the new size of a disk its host grew.
pub fn disk_resized(snap: &Snapshot, name: &str, disk: &str, size_mib: u64) -> Result<Decision> {
    check_resize(snap, name, disk, size_mib)?;
    let mut v = snap.vms[name].clone();
    for d in v.spec.disks.iter_mut().filter(|d| d.name == disk) {
        d.size_mib = Some(size_mib);
    }
    Ok((vec![Change::PutVm(v.clone())], Reply::Vm(v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testing::{cluster, running, spec};

    #[test]
    fn the_allowed_actions_are_those_the_state_machine_takes() {
        use VmAction as A;
        assert_eq!(allowed(VmState::Stopped), [A::Start]);
        assert_eq!(
            allowed(VmState::Running),
            [A::Stop, A::Reboot, A::Pause, A::Suspend]
        );
        assert_eq!(allowed(VmState::Paused), [A::Stop, A::Resume, A::Suspend]);
        assert_eq!(allowed(VmState::Suspended), [A::Restore]);
        for s in [VmState::Pending, VmState::Migrating, VmState::Deleting] {
            assert!(allowed(s).is_empty(), "{s:?}");
        }
        for s in VmState::ALL {
            for a in VmAction::ALL {
                assert_eq!(allowed(s).contains(&a), check_state(s, a), "{s:?} {a:?}");
            }
            assert_eq!(may_delete(s), s != VmState::Migrating);
        }
    }

    /// Whether [`check`] lets a VM in `state` take `action`.
    fn check_state(state: VmState, action: VmAction) -> bool {
        let mut snap = cluster(&[4.0], 4096);
        running(&mut snap, "v", "h0", spec(1, 512));
        let v = Vm {
            state,
            ..snap.vms["v"].clone()
        };
        check(&v, action).is_ok()
    }

    #[test]
    fn every_action_has_its_states_and_the_rest_are_refused_naming_the_state() {
        let mut snap = cluster(&[4.0], 4096);
        running(&mut snap, "v", "h0", spec(1, 512));
        let v = snap.vms["v"].clone();
        for state in VmState::ALL {
            for action in VmAction::ALL {
                let v = Vm { state, ..v.clone() };
                match (next(state, action), check(&v, action)) {
                    (Some(to), Ok(got)) => assert_eq!(to, got),
                    (None, Err(Error::Conflict(m))) => {
                        assert!(m.contains(state.as_str()), "{m}");
                        assert!(m.contains(action.as_str()), "{m}");
                    }
                    other => panic!("{state:?} {action:?}: {other:?}"),
                }
            }
        }
        // The transitional states allow nothing.
        for s in [
            VmState::Pending,
            VmState::Migrating,
            VmState::Deleting,
            VmState::Unplaced,
        ] {
            assert!(VmAction::ALL.iter().all(|a| next(s, *a).is_none()), "{s:?}");
        }
    }

    #[test]
    fn a_round_trip_through_every_state() {
        let mut snap = cluster(&[4.0, 4.0], 4096);
        running(&mut snap, "v", "h0", spec(1, 512));
        let steps = [
            (VmAction::Pause, VmState::Paused),
            (VmAction::Resume, VmState::Running),
            (VmAction::Reboot, VmState::Running),
            (VmAction::Stop, VmState::Stopped),
            (VmAction::Start, VmState::Running),
            (VmAction::Suspend, VmState::Suspended),
        ];
        for (a, want) in steps {
            let host = target(&snap, &snap.vms["v"], a, None).unwrap();
            assert_eq!(host, "h0");
            let (changes, _) = acted(&snap, "v", a, &host).unwrap();
            snap.apply(&changes, &[]);
            assert_eq!(snap.vms["v"].state, want, "{a:?}");
        }
        // Restored on another host, asked for by name.
        let host = target(&snap, &snap.vms["v"], VmAction::Restore, Some("h1")).unwrap();
        let (changes, _) = acted(&snap, "v", VmAction::Restore, &host).unwrap();
        snap.apply(&changes, &[]);
        let v = &snap.vms["v"];
        assert_eq!(
            (v.state, v.observed_host.as_deref()),
            (VmState::Running, Some("h1"))
        );
        // A second restore: refused, the VM is running.
        assert!(matches!(
            acted(&snap, "v", VmAction::Restore, "h0"),
            Err(Error::Conflict(_))
        ));
    }

    #[test]
    fn a_disk_grows_only_while_its_vm_is_stopped() {
        let mut snap = cluster(&[4.0], 4096);
        let mut s = spec(1, 512);
        s.disks = vec![tern_api::catalog::VmDisk {
            name: "data".into(),
            size_mib: Some(100),
            from_image: false,
            store: Default::default(),
            bus: None,
        }];
        running(&mut snap, "v", "h0", s);
        assert!(matches!(
            check_resize(&snap, "v", "data", 200),
            Err(Error::Conflict(_))
        ));
        snap.vms.get_mut("v").unwrap().state = VmState::Stopped;
        assert!(check_resize(&snap, "v", "data", 50).is_err(), "shrinks");
        assert!(check_resize(&snap, "v", "nope", 200).is_err());
        let (changes, _) = disk_resized(&snap, "v", "data", 200).unwrap();
        snap.apply(&changes, &[]);
        assert_eq!(snap.vms["v"].spec.disks[0].size_mib, Some(200));
    }

    #[test]
    fn a_suspended_vm_whose_host_died_is_restored_elsewhere() {
        let mut snap = cluster(&[4.0, 4.0], 4096);
        running(&mut snap, "v", "h0", spec(1, 512));
        snap.vms.get_mut("v").unwrap().state = VmState::Suspended;
        snap.hosts.get_mut("h0").unwrap().state = HostState::Dead;
        let v = snap.vms["v"].clone();
        assert_eq!(target(&snap, &v, VmAction::Restore, None).unwrap(), "h1");
        // Anything else waits for the host.
        snap.vms.get_mut("v").unwrap().state = VmState::Stopped;
        let v = snap.vms["v"].clone();
        assert!(target(&snap, &v, VmAction::Start, None).is_err());
    }
}
