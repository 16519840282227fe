//! Host leases: when the manager may believe a host's guests are stopped.
//!
//! A host's agent renews its lease every `renew_s`; the host counts the lease from just
//! before it sent the renewal and stops its own guests before it runs out, the manager
//! counts it from when the renewal arrived (later). So once the manager's count has run
//! out, plus [`MARGIN_MS`] for clock rates and the host's stop, the host's guests are
//! stopped and they may be restarted elsewhere without running twice.
//!
//! ```text
//!  host:     sent ──────────── lease ─────────┤ guests stopped before here
//!  manager:      arrived ───── lease ─────────────┤ + margin ──┤ restart elsewhere
//! ```
//!
//! Leases are not stored: they change every few seconds and are worthless a lease later.
//! A manager that starts or takes over the lead at `since` cannot know what an earlier
//! one granted, so it treats every host as holding a lease granted at `since`.

use std::collections::BTreeMap;

use crate::state::{BalancerSettings, Host, HostState, Millis, Snapshot};
pub use tern_api::manager::LeaseGrant;

/// Added to a lease before the manager acts on its expiry: the two clocks may run at
/// slightly different rates, and the host needs a moment to stop its guests.
pub const MARGIN_MS: Millis = 2_000;

/// The leases this manager granted, in its own clock.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Leases {
    /// When this manager began granting leases (its start or its taking the lead);
    /// `None` where no other manager can have granted one (the simulator, tests).
    pub since: Option<Millis>,
    /// Each host's lease end, for the hosts that renewed since `since`.
    pub expires: BTreeMap<String, Millis>,
}

/// The lease a renewal grants under `settings`.
pub fn grant_for(settings: &BalancerSettings) -> LeaseGrant {
    LeaseGrant {
        lease_ms: settings.lease_s.saturating_mul(1000),
        renew_ms: settings.renew_s.saturating_mul(1000),
    }
}

impl Leases {
    pub fn new(since: Millis) -> Self {
        Self {
            since: Some(since),
            expires: BTreeMap::new(),
        }
    }

    /// Records a renewal by `host` that arrived at `now`. A lease never shrinks: a
    /// shorter setting applies from the next lease that would end later.
    pub fn renew(&mut self, host: &str, now: Millis, settings: &BalancerSettings) -> LeaseGrant {
        let g = grant_for(settings);
        let end = now.saturating_add(g.lease_ms);
        let e = self.expires.entry(host.to_owned()).or_insert(end);
        *e = (*e).max(end);
        g
    }

    /// Whether `host` renewed a lease with this manager.
    pub fn holds(&self, host: &str) -> bool {
        self.expires.contains_key(host)
    }

    /// The time after which `host`'s guests are surely stopped, if it renews leases at
    /// all: its lease end plus the margin. A host not heard since `since` may still hold
    /// a lease an earlier manager granted just before; without `since`, none.
    pub fn fenced_after(&self, host: &str, settings: &BalancerSettings) -> Millis {
        match (self.expires.get(host), self.since) {
            (Some(&end), _) => end.saturating_add(MARGIN_MS),
            (None, Some(t)) => t
                .saturating_add(grant_for(settings).lease_ms)
                .saturating_add(MARGIN_MS),
            (None, None) => 0,
        }
    }

    /// Hosts holding a lease that ran out (with the margin) and not yet dead: the
    /// control loop runs the health step as soon as there is one.
    pub fn expired<'a>(&self, snap: &'a Snapshot, now: Millis) -> Vec<&'a Host> {
        snap.hosts
            .values()
            .filter(|h| h.state != HostState::Dead && self.holds(&h.name))
            .filter(|h| now > self.fenced_after(&h.name, &snap.settings))
            .collect()
    }

    /// Whether `host` may be declared dead at `now` (its VMs restarted elsewhere). A host
    /// holding a lease: once the lease ran out, whatever its load reports say (a host
    /// that renews but cannot be reached still runs its guests). Other hosts: once
    /// silent for `dead_after_s`, and not before a lease it may hold from an earlier
    /// manager surely ran out.
    pub fn may_declare_dead(&self, host: &Host, now: Millis, settings: &BalancerSettings) -> bool {
        let after = self.fenced_after(&host.name, settings);
        if self.holds(&host.name) {
            return now > after;
        }
        let limit = settings.dead_after_s.saturating_mul(1000);
        let silent = now.saturating_sub(host.last_heartbeat.unwrap_or(0)) > limit;
        silent && now > after
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Capacity;
    use proptest::prelude::*;

    fn host(name: &str, last_heartbeat: Option<Millis>) -> Host {
        Host {
            name: name.into(),
            address: "http://h".into(),
            capacity: Capacity {
                cpus: 4.0,
                memory_mib: 4096,
            },
            state: HostState::Active,
            last_heartbeat,
            cpu_used: None,
            cpu_smoothed: None,
            store_free_mib: None,
        }
    }

    #[test]
    fn a_leased_host_dies_only_after_its_lease_and_the_margin() {
        let s = BalancerSettings::default();
        let mut l = Leases::new(0);
        let g = l.renew("h1", 100_000, &s);
        assert_eq!(
            g,
            LeaseGrant {
                lease_ms: 15_000,
                renew_ms: 3_000
            }
        );
        // Silent for far longer than dead_after_s, but the lease holds.
        let h = host("h1", Some(0));
        assert!(!l.may_declare_dead(&h, 115_000 + MARGIN_MS, &s));
        assert!(l.may_declare_dead(&h, 115_001 + MARGIN_MS, &s));
        // A renewal that arrives late does not shorten the lease.
        l.renew("h1", 90_000, &s);
        assert!(!l.may_declare_dead(&h, 116_000, &s));
    }

    #[test]
    fn a_host_unheard_since_the_start_may_hold_an_earlier_lease() {
        let s = BalancerSettings::default();
        let l = Leases::new(1_000_000);
        let h = host("h1", Some(0));
        assert!(!l.may_declare_dead(&h, 1_000_000 + 15_000 + MARGIN_MS, &s));
        assert!(l.may_declare_dead(&h, 1_000_001 + 15_000 + MARGIN_MS, &s));
        // A host without leases still needs dead_after_s of silence.
        let fresh = host("h2", Some(1_010_000));
        assert!(!l.may_declare_dead(&fresh, 1_020_000, &s));
        assert!(l.may_declare_dead(&fresh, 1_040_001, &s));
    }

    #[test]
    fn expired_lists_leased_hosts_past_their_lease() {
        let mut snap = Snapshot::default();
        for n in ["a", "b", "c"] {
            snap.hosts.insert(n.into(), host(n, None));
        }
        snap.hosts.get_mut("c").unwrap().state = HostState::Dead;
        let mut l = Leases::new(0);
        l.renew("a", 0, &snap.settings);
        l.renew("b", 10_000, &snap.settings);
        l.renew("c", 0, &snap.settings);
        let names = |v: Vec<&Host>| v.iter().map(|h| h.name.clone()).collect::<Vec<_>>();
        assert!(l.expired(&snap, 17_000).is_empty());
        assert_eq!(names(l.expired(&snap, 17_001)), ["a"]);
    }

    proptest! {
        // The safety rule: whatever the order of renewals and the delays of the network,
        // the manager never declares a host dead before the host's own count of its last
        // lease (from the moment it sent the renewal, which is before it arrived) ran out.
        #[test]
        fn never_dead_while_the_host_may_still_hold_its_lease(
            start in 0u64..1_000_000,
            sends in proptest::collection::vec((0u64..20_000, 0u64..5_000), 1..20),
            lease_s in 2u64..60,
            probe in 0u64..200_000,
        ) {
            let s = BalancerSettings { lease_s, renew_s: 1, ..Default::default() };
            let mut l = Leases::new(start);
            let mut sent_at = start;
            let mut host_lease_end = 0;
            for (gap, delay) in sends {
                sent_at += gap;
                let arrived = sent_at + delay;
                let g = l.renew("h", arrived, &s);
                host_lease_end = host_lease_end.max(sent_at + g.lease_ms);
            }
            let now = start + probe;
            if l.may_declare_dead(&host("h", Some(0)), now, &s) {
                prop_assert!(now > host_lease_end + MARGIN_MS);
            }
        }
    }
}
