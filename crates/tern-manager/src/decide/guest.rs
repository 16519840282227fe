//! Guest health and HA: what the hosts report of each running VM's guest (see the
//! agent's `watch` module) is recorded, and a guest that panicked or stopped answering
//! is restarted or left as its VM's `ha_policy` says (`docs/manager.md`, "Guest
//! health").
//!
//! ```text
//!  reported down (panicked | unresponsive) for > grace, policy restart, host alive
//!     ├─ fewer than max_restarts restarts in the window, backoff over
//!     │     ──► restart pending ──► the host power-cycles it ──► booting
//!     ├─ max_restarts in the window ──► failed (shown, left alone)
//!     └─ else wait for the backoff
//!  policy leave: only shown.  Stopped, paused, suspended, migrating VMs: never touched.
//! ```
//!
//! A restart reuses the lifecycle's reboot: a new QEMU on the same host, from the same
//! disks. The manager decides and records it first (`restarts.pending`), then the
//! control loop asks the host (see [`super::reconcile`]); a restart the host could not
//! carry out stays pending and is asked again.

use crate::state::{Change, EventKind, HostState, Millis, Snapshot, Vm, VmState};
use tern_api::health::{GuestHealth, GuestState, HaPolicy};

/// How HA treats guests that stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HaLimits {
    /// A guest reported down for this long is acted on: a report that is already out of
    /// date when a restart lands must not cause a second one.
    pub grace_ms: Millis,
    /// The wait after a restart before the next; it doubles with each restart in the
    /// window.
    pub backoff_ms: Millis,
    /// Restarts allowed within `window_ms`; a guest down again after that many is
    /// left failed.
    pub max_restarts: u32,
    pub window_ms: Millis,
}

impl Default for HaLimits {
    fn default() -> Self {
        HaLimits {
            grace_ms: 10_000,
            backoff_ms: 30_000,
            max_restarts: 3,
            window_ms: 30 * 60_000,
        }
    }
}

/// The guest health to record for a VM that had `prev` when its host reports
/// `reported` (pure): the manager's own `since` (its clock, when it first saw the
/// state), the host's reason.
pub fn merge(
    prev: Option<&GuestHealth>,
    reported: Option<&GuestHealth>,
    now: Millis,
) -> Option<GuestHealth> {
    let r = reported?;
    let since_ms = match prev {
        Some(p) if p.state == r.state => p.since_ms,
        _ => now,
    };
    Some(GuestHealth {
        state: r.state,
        reason: r.reason.clone(),
        since_ms,
    })
}

/// The event for a VM whose guest health went from `prev` to `next`, if it changed.
pub fn health_event(
    vm: &str,
    prev: Option<&GuestHealth>,
    next: Option<&GuestHealth>,
) -> Option<EventKind> {
    let to = next?;
    if prev.map(|p| p.state) == Some(to.state) {
        return None;
    }
    Some(EventKind::VmGuestHealth {
        vm: vm.to_owned(),
        from: prev.map(|p| p.state),
        to: to.state,
        reason: to.reason.clone(),
    })
}

/// What HA does with one VM now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing: healthy, not running, policy `leave`, given up, or already pending.
    None,
    /// Down, but still within the grace or the backoff.
    Wait,
    /// Restart it on `host`; `attempt` counts restarts in the window, this one included.
    Restart { host: String, attempt: u32 },
    /// It failed again after every allowed restart.
    GiveUp { reason: String },
}

/// HA's verdict on `v` at `now` (pure).
pub fn verdict(snap: &Snapshot, v: &Vm, now: Millis, limits: &HaLimits) -> Verdict {
    let Some(g) = v.guest.as_ref().filter(|g| g.state.is_down()) else {
        return Verdict::None;
    };
    let Some(host) = &v.observed_host else {
        return Verdict::None;
    };
    let host_alive = snap
        .hosts
        .get(host)
        .is_some_and(|h| h.state != HostState::Dead);
    if v.state != VmState::Running
        || v.spec.ha_policy == HaPolicy::Leave
        || v.restarts.failed.is_some()
        || v.restarts.pending
        || !host_alive
    {
        return Verdict::None;
    }
    if now.saturating_sub(g.since_ms) < limits.grace_ms {
        return Verdict::Wait;
    }
    let recent = recent(&v.restarts.at_ms, now, limits);
    if recent.len() as u32 >= limits.max_restarts {
        return Verdict::GiveUp {
            reason: format!(
                "guest {} after {} restarts within {} s: {}",
                g.state,
                recent.len(),
                limits.window_ms / 1000,
                g.reason
            ),
        };
    }
    if let Some(&last) = recent.last() {
        let wait = backoff(limits, recent.len() as u32);
        if now < last.saturating_add(wait) || g.since_ms < last {
            return Verdict::Wait;
        }
    }
    Verdict::Restart {
        host: host.clone(),
        attempt: recent.len() as u32 + 1,
    }
}

/// The wait after the `n`th restart in the window (pure): the backoff, doubled for each
/// earlier one.
pub fn backoff(limits: &HaLimits, n: u32) -> Millis {
    limits
        .backoff_ms
        .saturating_mul(1 << n.saturating_sub(1).min(16))
}

/// Restart times still within the window.
fn recent(at: &[Millis], now: Millis, limits: &HaLimits) -> Vec<Millis> {
    at.iter()
        .copied()
        .filter(|&t| now.saturating_sub(t) < limits.window_ms)
        .collect()
}

/// One HA step over every VM (pure).
pub fn tick(snap: &Snapshot, now: Millis, limits: &HaLimits) -> Vec<Change> {
    let mut changes = Vec::new();
    for v in snap.vms.values() {
        let reason = v.guest.as_ref().map_or(String::new(), |g| {
            format!("guest {}: {}", g.state, g.reason)
        });
        match verdict(snap, v, now, limits) {
            Verdict::None | Verdict::Wait => {}
            Verdict::Restart { host, attempt } => {
                let mut next = v.clone();
                next.restarts.at_ms = recent(&v.restarts.at_ms, now, limits);
                next.restarts.at_ms.push(now);
                next.restarts.pending = true;
                changes.push(Change::PutVm(next));
                changes.push(Change::Event(EventKind::VmGuestRestart {
                    vm: v.name.clone(),
                    host,
                    attempt,
                    reason,
                }));
            }
            Verdict::GiveUp { reason } => {
                let mut next = v.clone();
                next.restarts.failed = Some(reason.clone());
                changes.push(Change::PutVm(next));
                changes.push(Change::Event(EventKind::VmGuestFailed {
                    vm: v.name.clone(),
                    reason,
                }));
            }
        }
    }
    changes
}

/// `v` with no guest any more (it is placed anew, or its host lost it): its health is
/// gone with its QEMU, and a pending restart is moot; the restarts so far still count.
pub fn gone(mut v: Vm) -> Vm {
    v.guest = None;
    v.restarts.pending = false;
    v
}

/// Records that the host power-cycled VM `v` for HA (pure): no longer pending, its new
/// guest booting.
pub fn restarted(v: &Vm, now: Millis) -> Vm {
    let mut next = v.clone();
    next.restarts.pending = false;
    next.guest = Some(GuestHealth {
        state: GuestState::Booting,
        reason: String::new(),
        since_ms: now,
    });
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testing::*;
    use proptest::prelude::*;

    fn down(state: GuestState, since_ms: Millis) -> Option<GuestHealth> {
        Some(GuestHealth {
            state,
            reason: "x".into(),
            since_ms,
        })
    }

    fn snap_with(guest: Option<GuestHealth>, policy: HaPolicy) -> Snapshot {
        let mut snap = cluster(&[4.0], 4096);
        running(&mut snap, "v", "h0", spec(1, 256));
        let v = snap.vms.get_mut("v").unwrap();
        v.guest = guest;
        v.spec.ha_policy = policy;
        snap
    }

    fn limits() -> HaLimits {
        HaLimits {
            grace_ms: 1_000,
            backoff_ms: 10_000,
            max_restarts: 3,
            window_ms: 600_000,
        }
    }

    #[test]
    fn a_panicked_guest_is_restarted_after_the_grace_and_a_left_one_is_not() {
        let snap = snap_with(down(GuestState::Panicked, 0), HaPolicy::Restart);
        let v = &snap.vms["v"];
        assert_eq!(verdict(&snap, v, 500, &limits()), Verdict::Wait);
        assert_eq!(
            verdict(&snap, v, 1_000, &limits()),
            Verdict::Restart {
                host: "h0".into(),
                attempt: 1
            }
        );
        let c = tick(&snap, 1_000, &limits());
        assert!(
            matches!(&c[0], Change::PutVm(n) if n.restarts.pending && n.restarts.at_ms == [1_000])
        );
        assert!(matches!(
            &c[1],
            Change::Event(EventKind::VmGuestRestart { attempt: 1, .. })
        ));
        let left = snap_with(down(GuestState::Panicked, 0), HaPolicy::Leave);
        assert!(tick(&left, 100_000, &limits()).is_empty());
        let ok = snap_with(down(GuestState::Ok, 0), HaPolicy::Restart);
        assert!(tick(&ok, 100_000, &limits()).is_empty());
    }

    #[test]
    fn stopped_paused_suspended_and_migrating_vms_are_never_touched() {
        for state in [
            VmState::Stopped,
            VmState::Paused,
            VmState::Suspended,
            VmState::Migrating,
            VmState::Pending,
        ] {
            let mut snap = snap_with(down(GuestState::Unresponsive, 0), HaPolicy::Restart);
            snap.vms.get_mut("v").unwrap().state = state;
            assert!(tick(&snap, 100_000, &limits()).is_empty(), "{state:?}");
        }
        let mut snap = snap_with(down(GuestState::Panicked, 0), HaPolicy::Restart);
        snap.hosts.get_mut("h0").unwrap().state = HostState::Dead;
        assert!(
            tick(&snap, 100_000, &limits()).is_empty(),
            "a dead host's VMs are the host HA's"
        );
    }

    #[test]
    fn restarts_back_off_and_then_give_up() {
        let l = limits();
        let mut snap = snap_with(down(GuestState::Panicked, 0), HaPolicy::Restart);
        let mut now = 1_000;
        let mut restarts = 0;
        let mut gave_up = None;
        // The guest panics at every boot, a second after each restart.
        while now < 500_000 {
            let c = tick(&snap, now, &l);
            apply(&mut snap, now, &c);
            let v = snap.vms["v"].clone();
            if let Some(f) = &v.restarts.failed {
                gave_up = Some((now, f.clone()));
                break;
            }
            if v.restarts.pending {
                restarts += 1;
                let mut n = restarted(&v, now);
                n.guest = down(GuestState::Panicked, now + 1_000);
                apply(&mut snap, now, &[Change::PutVm(n)]);
            }
            now += 500;
        }
        assert_eq!(restarts, 3);
        let (at, reason) = gave_up.expect("HA gave up");
        // Restarts at ~1 s, then after 10 s and 20 s of backoff, then the give-up.
        assert!(at >= 1_000 + 10_000 + 20_000, "gave up at {at}");
        assert!(reason.contains("after 3 restarts"), "{reason}");
        // Failed: shown, never restarted again.
        assert!(tick(&snap, at + 1_000_000, &l).is_empty());
    }

    #[test]
    fn a_report_older_than_the_last_restart_does_not_restart_again() {
        let mut snap = snap_with(down(GuestState::Panicked, 5_000), HaPolicy::Restart);
        snap.vms.get_mut("v").unwrap().restarts.at_ms = vec![10_000];
        // The backoff is over, but the guest was seen down since before the restart:
        // the report predates it.
        assert_eq!(
            verdict(&snap, &snap.vms["v"], 100_000, &limits()),
            Verdict::Wait
        );
    }

    #[test]
    fn a_vm_lost_and_created_again_does_not_inherit_its_old_guests_panic() {
        let mut snap = snap_with(down(GuestState::Panicked, 0), HaPolicy::Restart);
        snap.vms.get_mut("v").unwrap().restarts.pending = true;
        snap.index();
        // Its host reports it gone: it is created again, with no guest and nothing pending.
        let report = crate::decide::LoadReport {
            cpu_used: 0.0,
            vms: vec![],
            store_free_mib: None,
        };
        run(
            &mut snap,
            50_000,
            crate::decide::Command::Heartbeat {
                host: "h0".into(),
                report,
            },
        )
        .unwrap();
        let v = &snap.vms["v"];
        assert_eq!(v.state, VmState::Pending);
        assert!(v.guest.is_none() && !v.restarts.pending, "{v:?}");
        run(
            &mut snap,
            51_000,
            crate::decide::Command::VmStarted {
                vm: "v".into(),
                host: "h0".into(),
            },
        )
        .unwrap();
        assert!(tick(&snap, 100_000, &limits()).is_empty());
    }

    #[test]
    fn a_new_policy_is_recorded_and_clears_a_given_up_record() {
        let mut snap = snap_with(down(GuestState::Panicked, 0), HaPolicy::Restart);
        snap.vms.get_mut("v").unwrap().restarts.failed = Some("gave up".into());
        let set = |p| crate::decide::Command::SetHaPolicy {
            name: "v".into(),
            policy: p,
        };
        run(&mut snap, 1, set(HaPolicy::Leave)).unwrap();
        let v = &snap.vms["v"];
        assert_eq!(v.spec.ha_policy, HaPolicy::Leave);
        assert!(v.restarts.failed.is_none());
        // Unchanged: nothing to record.
        let (changes, _) = crate::decide::decide(&snap, 2, set(HaPolicy::Leave)).unwrap();
        assert!(changes.is_empty());
        snap.vms.get_mut("v").unwrap().state = VmState::Deleting;
        assert!(crate::decide::decide(&snap, 3, set(HaPolicy::Restart)).is_err());
        let unknown = crate::decide::Command::SetHaPolicy {
            name: "nope".into(),
            policy: HaPolicy::Leave,
        };
        assert!(crate::decide::decide(&snap, 3, unknown).is_err());
    }

    #[test]
    fn merged_health_keeps_the_managers_since_while_the_state_holds() {
        let rep = |s| GuestHealth {
            state: s,
            reason: "r".into(),
            since_ms: 99,
        };
        let first = merge(None, Some(&rep(GuestState::Booting)), 10).unwrap();
        assert_eq!(first.since_ms, 10);
        let same = merge(Some(&first), Some(&rep(GuestState::Booting)), 20).unwrap();
        assert_eq!(same.since_ms, 10);
        let ok = merge(Some(&same), Some(&rep(GuestState::Ok)), 30).unwrap();
        assert_eq!(ok.since_ms, 30);
        assert_eq!(merge(Some(&ok), None, 40), None);
        assert!(health_event("v", Some(&same), Some(&ok)).is_some());
        assert!(health_event("v", Some(&first), Some(&same)).is_none());
        assert!(health_event("v", Some(&ok), None).is_none());
    }

    proptest! {
        /// Whatever the guest does, HA restarts it at most `max_restarts` times in a
        /// window, never sooner than the backoff after the previous restart, and never
        /// a VM whose policy is `leave`.
        #[test]
        fn restarts_stay_within_the_limits(
            downs in proptest::collection::vec((any::<bool>(), 0u64..20_000), 1..80),
            leave in any::<bool>(),
        ) {
            let l = limits();
            let policy = if leave { HaPolicy::Leave } else { HaPolicy::Restart };
            let mut snap = snap_with(None, policy);
            let mut now = 0;
            let mut at: Vec<Millis> = Vec::new();
            for (is_down, dt) in downs {
                now += dt;
                let v = snap.vms["v"].clone();
                let state = if is_down { GuestState::Panicked } else { GuestState::Ok };
                let g = merge(v.guest.as_ref(), down(state, 0).as_ref(), now);
                let mut n = v.clone();
                n.guest = g;
                apply(&mut snap, now, &[Change::PutVm(n)]);
                let c = tick(&snap, now, &l);
            apply(&mut snap, now, &c);
                let v = snap.vms["v"].clone();
                if v.restarts.pending {
                    prop_assert!(!leave);
                    if let Some(&last) = at.last() {
                        prop_assert!(now - last >= l.backoff_ms);
                    }
                    at.push(now);
                    apply(&mut snap, now, &[Change::PutVm(restarted(&v, now))]);
                }
                let in_window = at.iter().filter(|&&t| now - t < l.window_ms).count();
                prop_assert!(in_window as u32 <= l.max_restarts);
            }
        }
    }
}
