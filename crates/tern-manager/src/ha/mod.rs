//! Several managers over one etcd cluster, exactly one of them acting.
//!
//! ```text
//!            campaign: txn "create /tern/leader with my lease if absent"
//!  Follower ───────────────────────────────────────────────────────────► Leader
//!     ▲   (forwards API requests to the leader it read from the key)     │ keepalive every TTL/3
//!     │                                                                  │ runs the control loop
//!     └──── lease not renewed before its deadline, or a fenced commit ◄──┘ commits to etcd
//!           failed: step down at once, stop the control loop
//! ```
//!
//! The deadline is counted from when the last successful keepalive was *sent*, so this
//! manager stops before etcd can have let the lease expire. Every commit is also fenced in
//! etcd itself (the leader key must still have the create revision this manager won with),
//! so a manager paused past its deadline cannot write even if it has not noticed yet.
//!
//! - [`election`]: the campaign and keepalive loop.
//! - [`forward`]: the API in front of the manager: local when leading, forwarded otherwise.

pub mod election;
pub mod forward;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Which role this manager plays, as of the last thing it heard from etcd.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not leading; `leader` is the URL the leader advertised, if one is known.
    Follower { leader: Option<String> },
    /// Leading since the leader key was created at revision `term`, until `until`
    /// unless a keepalive extends it.
    Leader { term: i64, until: Instant },
}

/// What to do with an API request, decided from the role alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Local,
    Forward(String),
    /// Answer 503 with this message.
    Refuse(String),
}

/// The term this role may write in at `now`: the leader's, while its lease is surely alive.
pub fn term_at(role: &Role, now: Instant) -> Option<i64> {
    match role {
        Role::Leader { term, until } if now < *until => Some(*term),
        _ => None,
    }
}

/// Where a request goes. `forwarded`: it already came from another manager, so it is not
/// passed on again (two managers with stale views must not bounce it between them).
pub fn route(role: &Role, now: Instant, me: &str, forwarded: bool) -> Route {
    if term_at(role, now).is_some() {
        return Route::Local;
    }
    match role {
        Role::Follower {
            leader: Some(url), ..
        } if url != me && !forwarded => Route::Forward(url.clone()),
        Role::Follower { leader: Some(url) } if url != me => {
            Route::Refuse(format!("not the leader; the leader is at {url}"))
        }
        _ => Route::Refuse(
            "not the leader; no leader is elected right now, retry in a few seconds".into(),
        ),
    }
}

/// Until when a lease renewed with `ttl_s` (as etcd answered) is surely alive, counting
/// from `sent`, when the renewal was sent. `None`: the lease is gone.
pub fn renewed_until(sent: Instant, ttl_s: i64) -> Option<Instant> {
    (ttl_s > 0).then(|| sent + Duration::from_secs(ttl_s as u64))
}

/// This manager's role, shared by the election loop (which changes it), the store (which
/// fences commits with it) and the API (which routes requests by it).
pub struct Leadership {
    /// The URL other managers reach this one by.
    me: String,
    role: Mutex<Role>,
    /// True while leading; the control loop runs while it is.
    leading: watch::Sender<bool>,
}

impl Leadership {
    pub fn new(me: impl Into<String>) -> Self {
        Self {
            me: me.into(),
            role: Mutex::new(Role::Follower { leader: None }),
            leading: watch::channel(false).0,
        }
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Role> {
        self.role.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn role(&self) -> Role {
        self.lock().clone()
    }

    /// The term to fence a commit with, if this manager may write now.
    pub fn term(&self) -> Option<i64> {
        term_at(&self.lock(), Instant::now())
    }

    pub fn route(&self, forwarded: bool) -> Route {
        route(&self.lock(), Instant::now(), &self.me, forwarded)
    }

    /// The leader's URL as last seen (this manager's own while it leads).
    pub fn leader(&self) -> Option<String> {
        match &*self.lock() {
            Role::Leader { .. } => Some(self.me.clone()),
            Role::Follower { leader } => leader.clone(),
        }
    }

    /// Starts or extends leading in `term` until `until`.
    pub fn lead(&self, term: i64, until: Instant) {
        *self.lock() = Role::Leader { term, until };
        self.set_leading(true);
    }

    /// Follows `leader` (stepping down if leading).
    pub fn follow(&self, leader: Option<String>) {
        *self.lock() = Role::Follower { leader };
        self.set_leading(false);
    }

    /// Steps down if still leading in `term`; a later term is left alone.
    pub fn step_down(&self, term: i64) {
        let mut role = self.lock();
        if matches!(&*role, Role::Leader { term: t, .. } if *t == term) {
            *role = Role::Follower { leader: None };
            self.set_leading(false);
        }
    }

    /// Wakes watchers only when leading starts or stops, not at every renewal.
    fn set_leading(&self, on: bool) {
        self.leading
            .send_if_modified(|l| std::mem::replace(l, on) != on);
    }

    /// Watches whether this manager leads.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.leading.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ME: &str = "http://10.0.0.1:7080";
    const OTHER: &str = "http://10.0.0.2:7080";

    #[test]
    fn a_leader_routes_locally_until_its_deadline() {
        let t0 = Instant::now();
        let role = Role::Leader {
            term: 9,
            until: t0 + Duration::from_secs(3),
        };
        assert_eq!(route(&role, t0, ME, false), Route::Local);
        assert_eq!(term_at(&role, t0), Some(9));
        let late = t0 + Duration::from_secs(3);
        assert_eq!(term_at(&role, late), None);
        assert!(matches!(route(&role, late, ME, false), Route::Refuse(_)));
    }

    #[test]
    fn followers_forward_once_and_name_the_leader_when_refusing() {
        let now = Instant::now();
        let f = Role::Follower {
            leader: Some(OTHER.into()),
        };
        assert_eq!(route(&f, now, ME, false), Route::Forward(OTHER.into()));
        assert_eq!(
            route(&f, now, ME, true),
            Route::Refuse(format!("not the leader; the leader is at {OTHER}"))
        );
        // The key still names this manager (it has just won, or just lost): never itself.
        let me = Role::Follower {
            leader: Some(ME.into()),
        };
        assert!(matches!(route(&me, now, ME, false), Route::Refuse(_)));
        let none = Role::Follower { leader: None };
        assert!(
            matches!(route(&none, now, ME, false), Route::Refuse(m) if m.contains("no leader"))
        );
    }

    #[test]
    fn stepping_down_only_ends_the_same_term() {
        let l = Leadership::new(ME);
        let rx = l.watch();
        l.lead(5, Instant::now() + Duration::from_secs(60));
        assert_eq!(l.term(), Some(5));
        assert!(*rx.borrow());
        l.step_down(4);
        assert_eq!(l.term(), Some(5));
        l.step_down(5);
        assert_eq!(l.term(), None);
        assert!(!*rx.borrow());
        assert_eq!(l.leader(), None);
    }

    proptest! {
        /// A term is granted only strictly before the deadline, and a request is served
        /// locally exactly when a term is granted.
        #[test]
        fn local_exactly_while_a_term_is_granted(
            lead in any::<bool>(), until_ms in 0u64..10_000, at_ms in 0u64..10_000,
            forwarded in any::<bool>(), known in any::<bool>(),
        ) {
            let t0 = Instant::now();
            let role = if lead {
                Role::Leader { term: 1, until: t0 + Duration::from_millis(until_ms) }
            } else {
                Role::Follower { leader: known.then(|| OTHER.to_owned()) }
            };
            let now = t0 + Duration::from_millis(at_ms);
            let granted = term_at(&role, now).is_some();
            prop_assert_eq!(granted, lead && at_ms < until_ms);
            let r = route(&role, now, ME, forwarded);
            prop_assert_eq!(r == Route::Local, granted);
            if let Route::Forward(url) = r {
                prop_assert!(!forwarded);
                prop_assert_eq!(url, OTHER);
            }
        }

        #[test]
        fn renewal_deadline_counts_from_sending(ttl in -5i64..100) {
            let sent = Instant::now();
            match renewed_until(sent, ttl) {
                Some(u) => prop_assert_eq!(u - sent, Duration::from_secs(ttl as u64)),
                None => prop_assert!(ttl <= 0),
            }
        }
    }
}
