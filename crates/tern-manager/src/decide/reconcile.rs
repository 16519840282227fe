//! What the agents must do so that what runs (observed) meets what was asked (desired).
//! The manager's shell carries these out through [`crate::client::HostClient`]s and feeds
//! the answers back as commands.

use crate::state::{HostState, PolicyKind, Snapshot, VmState};

/// One request to an agent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    Create {
        vm: String,
        host: String,
    },
    Delete {
        vm: String,
        host: String,
    },
    Migrate {
        id: u64,
        vm: String,
        from: String,
        to: String,
        policy: PolicyKind,
    },
    /// HA power-cycles the VM on its host (see [`super::guest`]).
    Restart {
        vm: String,
        host: String,
    },
}

impl Action {
    /// The VM the action is about; the shell runs one action per VM at a time.
    pub fn vm(&self) -> &str {
        match self {
            Self::Create { vm, .. }
            | Self::Delete { vm, .. }
            | Self::Migrate { vm, .. }
            | Self::Restart { vm, .. } => vm,
        }
    }
}

/// Everything that should be asked of agents now, given the snapshot.
pub fn actions(snap: &Snapshot) -> Vec<Action> {
    let usable = |h: &str| {
        snap.hosts
            .get(h)
            .is_some_and(|h| h.state != HostState::Dead)
    };
    let mut out = Vec::new();
    for v in snap.vms.values() {
        match (v.state, &v.desired_host, &v.observed_host) {
            (VmState::Pending, Some(d), _) if usable(d) => out.push(Action::Create {
                vm: v.name.clone(),
                host: d.clone(),
            }),
            (VmState::Deleting, _, Some(o)) if usable(o) => out.push(Action::Delete {
                vm: v.name.clone(),
                host: o.clone(),
            }),
            (VmState::Running, _, Some(o)) if v.restarts.pending && usable(o) => {
                out.push(Action::Restart {
                    vm: v.name.clone(),
                    host: o.clone(),
                })
            }
            _ => {}
        }
    }
    for m in snap.running.values() {
        out.push(Action::Migrate {
            id: m.id,
            vm: m.vm.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            policy: m.policy,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testing::*;
    use crate::decide::Command;

    #[test]
    fn pending_deleting_and_migrating_vms_become_actions() {
        let mut snap = cluster(&[4.0, 4.0], 4096);
        running(&mut snap, "r", "h0", spec(1, 512));
        running(&mut snap, "d", "h0", spec(1, 512));
        run(
            &mut snap,
            0,
            Command::CreateVm {
                name: "p".into(),
                spec: spec(1, 512),
                host: Some("h1".into()),
                template: None,
            },
        )
        .unwrap();
        run(&mut snap, 0, Command::DeleteVm { name: "d".into() }).unwrap();
        run(
            &mut snap,
            0,
            Command::MigrateVm {
                name: "r".into(),
                to: Some("h1".into()),
                policy: None,
            },
        )
        .unwrap();
        let mut got = actions(&snap);
        got.sort();
        assert_eq!(
            got,
            [
                Action::Create {
                    vm: "p".into(),
                    host: "h1".into()
                },
                Action::Delete {
                    vm: "d".into(),
                    host: "h0".into()
                },
                Action::Migrate {
                    id: 1,
                    vm: "r".into(),
                    from: "h0".into(),
                    to: "h1".into(),
                    policy: PolicyKind::Adaptive
                },
            ]
        );
    }
}

/// After a manager restart, what the hosts report settles what the store left open:
/// `running` maps each host that answered to the VMs it runs. A migration whose VM runs on
/// its destination and not its source finished while the manager was down (the manager
/// measured only its bounds: total is the time from its start to now, downtime unknown,
/// recorded as 0); one whose VM is still only on its source is dispatched again as usual.
/// A pending VM already running on its desired host is recorded as running, so it is not
/// created twice.
pub fn recover(
    snap: &Snapshot,
    now: crate::state::Millis,
    running: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
) -> Vec<crate::decide::Command> {
    use crate::decide::Command;
    let on = |host: &str, vm: &str| running.get(host).map(|vms| vms.contains(vm));
    let mut out = Vec::new();
    for m in snap.running.values() {
        if on(&m.to, &m.vm) == Some(true) && on(&m.from, &m.vm) == Some(false) {
            out.push(Command::MigrationDone {
                id: m.id,
                result: crate::state::MigrationResult::Succeeded {
                    total_ms: now.saturating_sub(m.started),
                    downtime_ms: 0,
                },
            });
        }
    }
    for v in snap.vms.values() {
        if let (VmState::Pending, Some(h)) = (v.state, &v.desired_host) {
            if on(h, &v.name) == Some(true) {
                out.push(Command::VmStarted {
                    vm: v.name.clone(),
                    host: h.clone(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod recovery {
    use super::*;
    use crate::decide::testing::*;
    use crate::decide::Command;
    use std::collections::{BTreeMap, BTreeSet};

    fn hosts(list: &[(&str, &[&str])]) -> BTreeMap<String, BTreeSet<String>> {
        list.iter()
            .map(|(h, vms)| (h.to_string(), vms.iter().map(|v| v.to_string()).collect()))
            .collect()
    }

    #[test]
    fn what_the_hosts_run_settles_open_migrations_and_creates() {
        let mut snap = cluster(&[4.0, 4.0], 4096);
        running(&mut snap, "moved", "h0", spec(1, 512));
        running(&mut snap, "stayed", "h0", spec(1, 512));
        for (vm, t) in [("moved", 10), ("stayed", 20)] {
            run(
                &mut snap,
                t,
                Command::MigrateVm {
                    name: vm.into(),
                    to: Some("h1".into()),
                    policy: None,
                },
            )
            .unwrap();
        }
        run(
            &mut snap,
            30,
            Command::CreateVm {
                name: "new".into(),
                spec: spec(1, 512),
                host: Some("h1".into()),
                template: None,
            },
        )
        .unwrap();
        run(
            &mut snap,
            30,
            Command::CreateVm {
                name: "unborn".into(),
                spec: spec(1, 512),
                host: Some("h1".into()),
                template: None,
            },
        )
        .unwrap();
        let report = hosts(&[("h0", &["stayed"]), ("h1", &["moved", "new"])]);
        let cmds = recover(&snap, 1_010, &report);
        assert_eq!(
            cmds,
            [
                Command::MigrationDone {
                    id: 1,
                    result: crate::state::MigrationResult::Succeeded {
                        total_ms: 1_000,
                        downtime_ms: 0
                    }
                },
                Command::VmStarted {
                    vm: "new".into(),
                    host: "h1".into()
                },
            ]
        );
        // A host that did not answer settles nothing.
        assert!(recover(&snap, 1_010, &hosts(&[("h1", &["moved", "new"])]))
            .iter()
            .all(|c| !matches!(c, Command::MigrationDone { .. })));
    }
}
