//! What the agents must do so that what runs (observed) meets what was asked (desired).
//! The manager's shell carries these out through [`crate::client::HostClient`]s and feeds
//! the answers back as commands.

use crate::state::{HostState, Snapshot, VmState};

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
        policy: String,
    },
}

impl Action {
    /// The VM the action is about; the shell runs one action per VM at a time.
    pub fn vm(&self) -> &str {
        match self {
            Self::Create { vm, .. } | Self::Delete { vm, .. } | Self::Migrate { vm, .. } => vm,
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
            _ => {}
        }
    }
    for m in snap.running.values() {
        out.push(Action::Migrate {
            id: m.id,
            vm: m.vm.clone(),
            from: m.from.clone(),
            to: m.to.clone(),
            policy: m.policy.clone(),
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
                    policy: "adaptive".into()
                },
            ]
        );
    }
}
