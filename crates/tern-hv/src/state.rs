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
//! ```
//! `destroy` is allowed from every state and ends the VM.

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
        (S::Incoming, A::IncomingDone) => Some(S::Paused),
        _ => None,
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
        ]
    }
    fn any_action() -> impl Strategy<Value = Action> {
        prop_oneof![
            Just(Action::Start),
            Just(Action::Pause),
            Just(Action::Resume),
            Just(Action::Stop),
            Just(Action::IncomingDone),
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

    proptest! {
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

        #[test]
        fn refused_actions_are_not_identity(s in any_state(), a in any_action()) {
            if let Some(n) = transition(s, a) { prop_assert_ne!(n, s); }
        }
    }
}
