//! One balancing round, pure: the snapshot becomes the balancer's view
//! ([`tern_balance::round::Snapshot`], with the VMs' last moves as its history) and
//! [`tern_balance::round::plan`] plans and filters the moves (cost/benefit, per-host and
//! cluster limits, aggressiveness, cooldown); the simulator's `balance` policy calls the
//! same function. Here the kept moves become migrations.

use tern_balance::round::{self, RecentMove};

pub use tern_balance::round::{
    BalancePlan, NotMoved, PlannedMove, AGGRESSIVENESS, DIRTY_BYTES_PER_CORE_S, LAZY_FROM_MOVES,
    LINK_BYTES_PER_S, MIGRATION_CORES,
};

use super::start_migration;
use crate::state::{
    BalancerSettings, Change, EventKind, HostState, MigrationReason, Millis, Snapshot, VmState,
};

/// The balancer's view of `snap`: hosts and VMs in name order, the migrations under way,
/// and, as the history, when each VM last moved.
pub fn view(snap: &Snapshot) -> (round::Snapshot, Vec<RecentMove>) {
    let hosts = snap
        .hosts
        .values()
        .map(|h| round::Host {
            name: h.name.clone(),
            cpus: h.capacity.cpus,
            memory_mib: h.capacity.memory_mib,
            active: h.state == HostState::Active,
        })
        .collect();
    let vms = snap
        .vms
        .values()
        .map(|v| round::Vm {
            name: v.name.clone(),
            host: v.desired_host.clone(),
            vcpus: v.spec.vcpus,
            memory_mib: v.spec.memory_mib,
            cpu_used: v.cpu_used,
            cpu_measured: v.cpu_measured,
            // Moving one VM of an affinity group alone would split the group.
            movable: !v.spec.pinned && v.spec.affinity.is_none() && v.state == VmState::Running,
            anti_affinity: v.spec.anti_affinity.clone(),
        })
        .collect();
    let in_flight = snap
        .running
        .values()
        .map(|m| round::InFlight {
            from: m.from.clone(),
            to: m.to.clone(),
        })
        .collect();
    let history = snap
        .vms
        .values()
        .filter_map(|v| {
            v.last_moved.map(|at| RecentMove {
                vm: v.name.clone(),
                at,
            })
        })
        .collect();
    (
        round::Snapshot {
            hosts,
            vms,
            in_flight,
        },
        history,
    )
}

/// The planner's cluster for `snap` at `now` (see [`tern_balance::round::model`]).
pub fn model(snap: &Snapshot, now: Millis) -> round::Model {
    let (input, history) = view(snap);
    round::model(&input, &snap.settings, &history, now)
}

/// Plans one round over `snap` at `now` (see [`tern_balance::round::plan`]).
pub fn plan(snap: &Snapshot, now: Millis) -> BalancePlan {
    Input::of(snap).plan(now)
}

/// What a round plans over, read from a snapshot: the balancer's view, its history and
/// the settings. Far less than a copy of the snapshot, so a round that plans outside
/// the snapshot's lock holds it only while it reads this.
pub struct Input {
    view: round::Snapshot,
    history: Vec<RecentMove>,
    pub settings: BalancerSettings,
}

impl Input {
    pub fn of(snap: &Snapshot) -> Input {
        let (view, history) = view(snap);
        Input {
            view,
            history,
            settings: snap.settings.clone(),
        }
    }

    /// Plans one round at `now`, as [`plan`] does over the snapshot it was read from.
    pub fn plan(&self, now: Millis) -> BalancePlan {
        round::plan(&self.view, &self.settings, &self.history, now)
    }
}

/// One round as changes: in dry-run mode only an event recording the plan; otherwise a
/// migration per kept move. Does nothing when the balancer is disabled.
pub fn round(snap: &Snapshot, now: Millis) -> (Vec<Change>, BalancePlan) {
    if !snap.settings.enabled {
        return (Vec::new(), BalancePlan::default());
    }
    commit(snap, now, plan(snap, now))
}

/// The changes that carry out `p`, planned on an earlier snapshot, against `snap` as it
/// is now (see [`round`]). A planned move is kept only while it still holds: its VM is
/// there, running on the host it was planned from and not migrating, and its
/// destination is active with room for it (counting the moves kept before it). Moves
/// dropped are counted under `stale`. Against the snapshot it was planned on, every
/// move holds.
pub fn commit(snap: &Snapshot, now: Millis, mut p: BalancePlan) -> (Vec<Change>, BalancePlan) {
    if !snap.settings.enabled {
        return (Vec::new(), BalancePlan::default());
    }
    let migrating: std::collections::BTreeSet<&str> =
        snap.running.values().map(|m| m.vm.as_str()).collect();
    let mut used: std::collections::BTreeMap<String, u64> = snap
        .memory_used()
        .into_iter()
        .map(|(h, m)| (h.to_owned(), m))
        .collect();
    let planned = std::mem::take(&mut p.moves);
    let mut stale = 0;
    for mv in planned {
        let here = |h: &Option<String>| h.as_deref() == Some(mv.from.as_str());
        let vm = snap.vms.get(&mv.vm).filter(|v| {
            v.state == VmState::Running
                && here(&v.desired_host)
                && here(&v.observed_host)
                && !migrating.contains(v.name.as_str())
        });
        let dest = snap
            .hosts
            .get(&mv.to)
            .filter(|h| h.state == HostState::Active);
        let (Some(vm), Some(dest)) = (vm, dest) else {
            stale += 1;
            continue;
        };
        let mem = vm.spec.memory_mib;
        let to_used = used.get(&mv.to).copied().unwrap_or(0);
        if to_used + mem > dest.capacity.memory_mib {
            stale += 1;
            continue;
        }
        used.insert(mv.to.clone(), to_used + mem);
        if let Some(u) = used.get_mut(&mv.from) {
            *u = u.saturating_sub(mem);
        }
        p.moves.push(mv);
    }
    if stale > 0 {
        *p.skipped.entry(NotMoved::Stale).or_default() += stale;
    }
    let mut changes = Vec::new();
    if snap.settings.dry_run {
        if !p.moves.is_empty() {
            changes.push(Change::Event(EventKind::PlanRecorded {
                moves: p.moves.len(),
                score_before: p.score_before,
                score_after: p.score_after,
            }));
        }
        return (changes, p);
    }
    let mut next = snap.next_migration;
    for mv in &p.moves {
        let v = &snap.vms[&mv.vm];
        let at = Snapshot {
            next_migration: next,
            ..Snapshot::default()
        };
        if let Ok((c, m)) = start_migration(
            &at,
            now,
            v,
            &mv.to,
            snap.settings
                .migration_policy(None, v.spec.migration_policy, MigrationReason::Balance),
            MigrationReason::Balance,
        ) {
            next = m.id + 1;
            changes.extend(c);
        }
    }
    (changes, p)
}

/// Moves committed per hold of the store. A hard round plans thousands of migrations;
/// committed at once they would hold the store, and every API write behind it, for as
/// long as writing them all takes (about 150 ms for 3000 on SQLite).
pub const COMMIT_CHUNK: usize = 256;

/// `p` in parts of at most `chunk` moves, to [`commit`] one after another, each against
/// the state as it is then. The first part carries the scores, the planner's counts
/// and the planning time. A dry run stays whole: it records one event for the plan.
pub fn parts(mut p: BalancePlan, dry_run: bool, chunk: usize) -> Vec<BalancePlan> {
    if dry_run || p.moves.len() <= chunk.max(1) {
        return vec![p];
    }
    let moves = std::mem::take(&mut p.moves);
    let mut out = vec![p];
    for (n, c) in moves.chunks(chunk.max(1)).enumerate() {
        if n == 0 {
            out[0].moves = c.to_vec();
        } else {
            out.push(BalancePlan {
                moves: c.to_vec(),
                ..BalancePlan::default()
            });
        }
    }
    out
}

/// The committed parts of one plan (from [`parts`]) as one plan: the first part's
/// scores and planning time, every part's moves and counts.
pub fn join(parts: Vec<BalancePlan>) -> BalancePlan {
    let mut parts = parts.into_iter();
    let mut out = parts.next().unwrap_or_default();
    for p in parts {
        out.moves.extend(p.moves);
        for (r, n) in p.skipped {
            *out.skipped.entry(r).or_default() += n;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testing::*;
    use crate::state::VmSpec;

    /// `per_host[i]` VMs of 1 core busy on host i (8 cores, 64 GiB each).
    fn uneven(per_host: &[usize]) -> Snapshot {
        let mut snap = cluster(&vec![8.0; per_host.len()], 65536);
        for (h, n) in per_host.iter().enumerate() {
            for i in 0..*n {
                let name = format!("v{h}-{i}");
                running(&mut snap, &name, &format!("h{h}"), spec(1, 512));
                snap.vms.get_mut(&name).unwrap().cpu_used = 1.0;
            }
        }
        snap.settings.max_per_host = 4;
        snap
    }

    #[test]
    fn an_overloaded_host_sheds_load_within_the_limits() {
        let snap = uneven(&[8, 0, 0, 0]);
        let p = plan(&snap, 0);
        assert!(p.score_after < p.score_before);
        assert!(!p.moves.is_empty());
        assert!(p.moves.iter().all(|m| m.from == "h0" && m.gain > m.cost));
        assert!(p.moves.len() <= 4, "max_per_host on h0: {:?}", p.moves);
    }

    #[test]
    fn aggressiveness_one_only_evacuates_and_a_balanced_cluster_stays() {
        let mut snap = uneven(&[8, 0, 0, 0]);
        snap.settings.aggressiveness = 1;
        assert!(plan(&snap, 0).moves.is_empty());
        let snap = uneven(&[2, 2, 2, 2]);
        assert!(plan(&snap, 0).moves.is_empty());
    }

    #[test]
    fn pinned_cooling_and_grouped_vms_stay() {
        let mut snap = uneven(&[4, 0]);
        for (i, v) in snap.vms.values_mut().enumerate() {
            match i {
                0 => v.spec.pinned = true,
                1 => v.last_moved = Some(1_000),
                2 => v.spec.affinity = Some("web".into()),
                _ => v.state = VmState::Pending,
            }
        }
        snap.settings.cooldown_s = 60;
        assert!(plan(&snap, 2_000).moves.is_empty());
    }

    #[test]
    fn a_move_whose_migration_costs_more_than_it_gains_is_skipped() {
        // One slightly busy host; moving a huge, busy VM would take minutes.
        let mut snap = cluster(&[8.0, 8.0], 1 << 20);
        running(&mut snap, "big", "h0", spec(4, 512 * 1024));
        running(&mut snap, "small", "h0", spec(1, 512));
        snap.vms.get_mut("big").unwrap().cpu_used = 4.0;
        snap.vms.get_mut("small").unwrap().cpu_used = 1.0;
        snap.settings.aggressiveness = 5;
        snap.settings.cooldown_s = 30;
        let p = plan(&snap, 0);
        assert!(p.moves.iter().all(|m| m.vm != "big"), "{p:?}");
        assert!(
            p.skipped
                .get(&tern_api::manager::NotMoved::CostExceedsGain)
                .copied()
                .unwrap_or(0)
                >= 1,
            "{p:?}"
        );
    }

    #[test]
    fn anti_affinity_is_honoured() {
        let mut snap = uneven(&[0, 0]);
        for i in 0..4 {
            let name = format!("db{i}");
            running(
                &mut snap,
                &name,
                "h0",
                VmSpec {
                    anti_affinity: Some(format!("g{i}")),
                    ..spec(1, 512)
                },
            );
            snap.vms.get_mut(&name).unwrap().cpu_used = 1.0;
        }
        running(
            &mut snap,
            "other",
            "h1",
            VmSpec {
                anti_affinity: Some("g0".into()),
                ..spec(1, 512)
            },
        );
        let p = plan(&snap, 0);
        assert!(!p.moves.is_empty());
        assert!(p.moves.iter().all(|m| m.vm != "db0"), "{p:?}");
    }

    #[test]
    fn a_stale_plan_moves_no_vm_deleted_moved_or_migrating_since() {
        let snap = uneven(&[8, 0, 0, 0]);
        let p = plan(&snap, 0);
        assert!(p.moves.len() >= 3, "{p:?}");
        let (all, _) = commit(&snap, 0, p.clone());
        assert_eq!(
            all.iter()
                .filter(|c| matches!(c, Change::PutMigration(_)))
                .count(),
            p.moves.len(),
            "against its own snapshot every move holds"
        );
        // While the plan was computed: the first VM was deleted, the second moved
        // elsewhere, the third started migrating, and the fourth's target went down.
        let mut now = snap.clone();
        now.vms.remove(&p.moves[0].vm);
        let v = now.vms.get_mut(&p.moves[1].vm).unwrap();
        v.desired_host = Some("h3".into());
        v.observed_host = Some("h3".into());
        let (c, _) = start_migration(
            &now,
            0,
            &now.vms[&p.moves[2].vm].clone(),
            "h3",
            crate::state::PolicyKind::Adaptive,
            MigrationReason::Manual,
        )
        .unwrap();
        apply(&mut now, 0, &c);
        let (changes, kept) = commit(&now, 0, p.clone());
        let started: Vec<&str> = changes
            .iter()
            .filter_map(|c| match c {
                Change::PutMigration(m) => Some(m.vm.as_str()),
                _ => None,
            })
            .collect();
        for stale in &p.moves[..3] {
            assert!(
                !started.contains(&stale.vm.as_str()),
                "{} moved: {started:?}",
                stale.vm
            );
        }
        assert_eq!(started.len(), p.moves.len() - 3);
        assert_eq!(kept.skipped.get(&NotMoved::Stale), Some(&3));
        // A destination that left the active hosts takes nothing.
        let mut down = snap.clone();
        for h in down.hosts.values_mut() {
            if h.name != "h0" {
                h.state = HostState::Maintenance;
            }
        }
        let (changes, _) = commit(&down, 0, p);
        assert!(changes.is_empty(), "{changes:?}");
    }

    #[test]
    fn a_plan_committed_in_parts_starts_what_it_would_at_once() {
        let mut snap = uneven(&[8, 0, 0, 0]);
        snap.settings.max_per_host = 8;
        let p = plan(&snap, 0);
        assert!(p.moves.len() >= 3, "{p:?}");
        let (whole, at_once) = commit(&snap, 0, p.clone());
        let split = parts(p.clone(), false, 2);
        assert_eq!(split.len(), p.moves.len().div_ceil(2));
        assert!(split.iter().all(|s| s.moves.len() <= 2));
        // Each part against the state the parts before it left.
        let mut now = snap.clone();
        let mut changes = Vec::new();
        let mut done = Vec::new();
        for part in split {
            let (c, kept) = commit(&now, 0, part);
            apply(&mut now, 0, &c);
            changes.extend(c);
            done.push(kept);
        }
        assert_eq!(changes, whole);
        let joined = join(done);
        assert_eq!(joined.moves, at_once.moves);
        assert_eq!(joined.skipped, at_once.skipped);
        assert_eq!(joined.score_after, p.score_after);
        // A dry run records one event for the whole plan.
        assert_eq!(parts(p, true, 2).len(), 1);
    }

    #[test]
    fn dry_run_records_a_plan_and_migrates_nothing() {
        let mut snap = uneven(&[8, 0]);
        snap.settings.dry_run = true;
        let (changes, p) = round(&snap, 0);
        assert!(!p.moves.is_empty());
        assert!(matches!(
            changes.as_slice(),
            [Change::Event(EventKind::PlanRecorded { .. })]
        ));
        snap.settings.dry_run = false;
        let (changes, p) = round(&snap, 0);
        apply(&mut snap, 0, &changes);
        assert_eq!(snap.running.len(), p.moves.len());
        assert!(snap
            .running
            .values()
            .all(|m| m.reason == MigrationReason::Balance));
        // The next round respects the migrations now under way on h0.
        assert!(plan(&snap, 0)
            .moves
            .iter()
            .all(|m| m.from != "h0" || p.moves.len() < 4));
    }
}

#[cfg(test)]
mod properties {
    use std::collections::BTreeMap;

    use super::*;
    use crate::decide::testing::*;
    use crate::state::VmSpec;
    use proptest::prelude::*;

    /// A random running cluster: per VM (host, vCPUs, memory GiB, load, pinned, anti group).
    fn arb_cluster() -> impl Strategy<Value = Snapshot> {
        (
            2usize..8,
            prop::collection::vec(
                (
                    0usize..8,
                    1u32..4,
                    1u64..4,
                    0.0f64..1.0,
                    any::<bool>(),
                    0u8..6,
                ),
                1..60,
            ),
            1u32..4,
            1u32..10,
            1u8..=5,
        )
            .prop_map(|(hosts, vms, per_host, per_cluster, aggr)| {
                let mut snap = cluster(&vec![8.0; hosts], 64 * 1024);
                for (i, (h, vcpus, gib, load, pinned, anti)) in vms.into_iter().enumerate() {
                    let name = format!("v{i}");
                    let spec = VmSpec {
                        pinned: pinned && i % 3 == 0,
                        anti_affinity: (anti < 2).then(|| format!("g{anti}")),
                        ..spec(vcpus, gib * 1024)
                    };
                    running(&mut snap, &name, &format!("h{}", h % hosts), spec);
                    let v = snap.vms.get_mut(&name).unwrap();
                    v.cpu_used = load * f64::from(vcpus);
                    if i % 5 == 0 {
                        v.last_moved = Some(900);
                    }
                }
                snap.settings.max_per_host = per_host;
                snap.settings.max_per_cluster = per_cluster;
                snap.settings.aggressiveness = aggr;
                snap.settings.cooldown_s = 600;
                snap
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the cluster, a round keeps every limit and rule.
        #[test]
        fn a_round_keeps_limits_and_rules(snap in arb_cluster()) {
            let p = plan(&snap, 1_000);
            let s = &snap.settings;
            prop_assert!(p.moves.len() <= s.max_per_cluster as usize);
            let mut per_host: BTreeMap<&str, u32> = BTreeMap::new();
            let mut after = snap.clone();
            for m in &p.moves {
                *per_host.entry(&m.from).or_default() += 1;
                *per_host.entry(&m.to).or_default() += 1;
                let v = &snap.vms[&m.vm];
                prop_assert!(!v.spec.pinned, "{} is pinned", m.vm);
                prop_assert!(v.last_moved.is_none(), "{} is cooling down", m.vm);
                prop_assert!(m.gain > m.cost);
                prop_assert_eq!(v.observed_host.as_deref(), Some(m.from.as_str()));
                after.vms.get_mut(&m.vm).unwrap().desired_host = Some(m.to.clone());
            }
            prop_assert!(per_host.values().all(|n| *n <= s.max_per_host), "{per_host:?}");
            // The generated cluster may start over-committed; what a round must keep is
            // that every host it moves a VM onto has room for it.
            for (h, used) in after.memory_used() {
                if p.moves.iter().any(|m| m.to == *h) {
                    prop_assert!(used <= after.hosts[h].capacity.memory_mib, "{h}: {used} MiB");
                }
            }
            let mut groups: BTreeMap<(String, String), usize> = BTreeMap::new();
            let mut groups_before: BTreeMap<(String, String), usize> = BTreeMap::new();
            for (snapshot, g) in [(&after, &mut groups), (&snap, &mut groups_before)] {
                for v in snapshot.vms.values() {
                    if let (Some(a), Some(h)) = (&v.spec.anti_affinity, &v.desired_host) {
                        *g.entry((a.clone(), h.clone())).or_default() += 1;
                    }
                }
            }
            // No move puts a second member of an anti-affinity group on a host.
            for (k, n) in &groups {
                prop_assert!(*n <= 1 || groups_before.get(k) >= Some(n), "{k:?}: {n}");
            }
        }
    }
}
