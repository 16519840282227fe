//! The VM state machine both drivers follow. Pure: a driver asks [`transition`] before it
//! acts, so a refused action changes nothing.
//!
//! ```text
//!              start                pause
//!   Created ─────────► Running ◄──────────► Paused
//!      ▲  │ stop          │ stop   resume     │ stop
//!      │  └─────────────► Stopped ◄───────────┘
//!      │                  │ start ─► Running
//!   Incoming ── incoming_done ──► Paused   (destination of a migration)
//!
//!   Running ── reboot ──► Running           (hard reset)
//!   Running | Paused ── suspend ──► Suspended ── restore ──► Restoring
//!   Restoring ── incoming_done ──► Paused      (the saved state is loaded)
//!   Restoring ── abandon_restore ──► Suspended (or its process ended)
//! ```
//! `destroy` is allowed from every state and ends the VM. A suspended VM is neither
//! started nor stopped: booting it from its disks would throw away the memory saved
//! beside them, so it only runs again through `restore`.

pub use tern_api::agent::{Action, VmState};

/// The state after `action`, or `None` when the action is not allowed in `state`.
pub fn transition(state: VmState, action: Action) -> Option<VmState> {
    use Action as A;
    use VmState as S;
    match (state, action) {
        (S::Created | S::Stopped, A::Start) => Some(S::Running),
        (S::Running, A::Pause) => Some(S::Paused),
        (S::Paused, A::Resume) => Some(S::Running),
        (S::Created | S::Running | S::Paused | S::Incoming, A::Stop) => Some(S::Stopped),
        (S::Incoming | S::Restoring, A::IncomingDone) => Some(S::Paused),
        (S::Running, A::Reboot) => Some(S::Running),
        (S::Running | S::Paused, A::Suspend) => Some(S::Suspended),
        (S::Suspended, A::Restore) => Some(S::Restoring),
        (S::Restoring, A::AbandonRestore) => Some(S::Suspended),
        _ => None,
    }
}

/// The state of a VM whose process ended on its own (the guest powered off, QEMU
/// crashed): stopped, except that a VM being restored is still suspended, its saved
/// state untouched, and a suspended VM has no process to end.
pub fn state_after_exit(state: VmState) -> VmState {
    match state {
        VmState::Restoring | VmState::Suspended => VmState::Suspended,
        _ => VmState::Stopped,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_state() -> impl Strategy<Value = VmState> {
        prop_oneof![
            Just(VmState::Created),
            Just(VmState::Running),
            Just(VmState::Paused),
            Just(VmState::Stopped),
            Just(VmState::Incoming),
            Just(VmState::Suspended),
            Just(VmState::Restoring),
        ]
    }
    fn any_action() -> impl Strategy<Value = Action> {
        prop_oneof![
            Just(Action::Start),
            Just(Action::Pause),
            Just(Action::Resume),
            Just(Action::Stop),
            Just(Action::IncomingDone),
            Just(Action::Reboot),
            Just(Action::Suspend),
            Just(Action::Restore),
            Just(Action::AbandonRestore),
        ]
    }

    #[test]
    fn lifecycle() {
        let s = transition(VmState::Created, Action::Start).unwrap();
        let s = transition(s, Action::Pause).unwrap();
        assert_eq!(
            transition(s, Action::Pause),
            None,
            "pausing twice is a conflict"
        );
        let s = transition(s, Action::Resume).unwrap();
        let s = transition(s, Action::Stop).unwrap();
        assert_eq!(s, VmState::Stopped);
        assert_eq!(transition(s, Action::Resume), None);
        assert_eq!(transition(s, Action::Start), Some(VmState::Running));
        assert_eq!(
            transition(VmState::Incoming, Action::Start),
            None,
            "an incoming VM must not run before its memory arrived"
        );
    }

    #[test]
    fn suspend_and_restore() {
        let s = transition(VmState::Running, Action::Suspend).unwrap();
        assert_eq!(s, VmState::Suspended);
        for a in [Action::Start, Action::Stop, Action::Pause, Action::Resume] {
            assert_eq!(transition(s, a), None, "{a:?} of a suspended VM");
        }
        let r = transition(s, Action::Restore).unwrap();
        assert_eq!(r, VmState::Restoring);
        assert_eq!(transition(r, Action::Stop), None);
        assert_eq!(
            transition(r, Action::AbandonRestore),
            Some(VmState::Suspended)
        );
        let p = transition(r, Action::IncomingDone).unwrap();
        assert_eq!(transition(p, Action::Resume), Some(VmState::Running));
        assert_eq!(
            transition(VmState::Paused, Action::Suspend),
            Some(VmState::Suspended)
        );
        assert_eq!(transition(VmState::Stopped, Action::Suspend), None);
        assert_eq!(transition(VmState::Incoming, Action::Suspend), None);
    }

    #[test]
    fn reboot_only_while_running() {
        assert_eq!(
            transition(VmState::Running, Action::Reboot),
            Some(VmState::Running)
        );
        for s in [VmState::Paused, VmState::Stopped, VmState::Created] {
            assert_eq!(transition(s, Action::Reboot), None, "{s}");
        }
    }

    #[test]
    fn a_process_that_ends_leaves_a_restore_suspended() {
        assert_eq!(state_after_exit(VmState::Running), VmState::Stopped);
        assert_eq!(state_after_exit(VmState::Paused), VmState::Stopped);
        assert_eq!(state_after_exit(VmState::Restoring), VmState::Suspended);
        assert_eq!(state_after_exit(VmState::Suspended), VmState::Suspended);
    }

    proptest! {
        // The memory saved beside a suspended VM's disks is only thrown away by
        // destroying the VM: from `Suspended` it runs again only through a restore
        // that loaded the saved state, never by a fresh boot from its disks.
        #[test]
        fn a_suspended_vm_runs_only_after_its_state_is_loaded(actions in proptest::collection::vec(any_action(), 0..24)) {
            let mut s = VmState::Suspended;
            let mut loaded = false;
            for a in actions {
                if let Some(n) = transition(s, a) {
                    if s == VmState::Restoring && a == Action::IncomingDone { loaded = true; }
                    prop_assert!(n != VmState::Stopped || loaded, "{s} -> {a:?} -> stopped");
                    s = n;
                }
                if s == VmState::Running { prop_assert!(loaded); }
            }
        }

        // A destination never runs a guest whose migration did not finish: from `Incoming`
        // the guest runs only after `IncomingDone`, or after a stop (a fresh boot).
        #[test]
        fn incoming_only_leaves_by_done_or_stop(actions in proptest::collection::vec(any_action(), 0..20)) {
            let mut s = VmState::Incoming;
            let mut done = false;
            for a in actions {
                if let Some(n) = transition(s, a) {
                    if s == VmState::Incoming { done = a == Action::IncomingDone || a == Action::Stop; }
                    s = n;
                }
                if s == VmState::Running { prop_assert!(done); }
            }
        }

        // Every allowed action but a reboot changes the state.
        #[test]
        fn allowed_actions_change_the_state(s in any_state(), a in any_action()) {
            if let Some(n) = transition(s, a) {
                prop_assert_eq!(n == s, a == Action::Reboot);
            }
        }
    }
}
