//! Properties of the planner on generated clusters: the incremental score agrees
//! with a fresh computation, plans only ever improve the score, and no move breaks
//! a hard constraint.

use proptest::prelude::*;
use tern_balance::metric::ganeti::{self, Ganeti};
use tern_balance::metric::{score, spread::Spread, Metric};
use tern_balance::{plan, PlanOptions, Refusal, Search, State};
use tern_model::{generate, Cluster, DiskTemplate, InstId, Mobility, NodeId};

/// A small cluster mixing every kind of instance: shared storage, DRBD, plain,
/// pinned-by-flag, with exclusion tags and an offline node.
fn mixed(seed: u64, nodes: usize, instances: usize) -> Cluster {
    let mut c = tern_balance::synth::unbalanced(nodes, instances, seed);
    c.tags.push("htools:iextags:svc:".into());
    let n = c.nodes.len();
    for (j, inst) in c.instances.iter_mut().enumerate() {
        match j % 7 {
            1 => {
                inst.disk_template = DiskTemplate::Drbd;
                let p = inst.primary.index();
                inst.secondary = Some(NodeId::from_index((p + 1 + j % (n - 1)) % n));
            }
            2 => inst.disk_template = DiskTemplate::Plain,
            3 => inst.auto_balance = false,
            4 => inst.tags.push(format!("svc:{}", j % 3)),
            _ => {}
        }
    }
    c
}

fn check_plan<M: Metric>(c: &Cluster, metric: &M, opts: &PlanOptions) {
    let planned = plan(c, metric, opts);
    let p = &planned.plan;
    assert!(p.final_score <= p.initial_score + 1e-12);
    assert!((p.initial_score - score(c, metric)).abs() < 1e-9);
    let mut state = State::new(c, metric);
    let mut last = state.score();
    for mv in &p.moves {
        assert_eq!(state.primary_of(mv.inst), mv.from);
        assert_eq!(state.check(mv.inst, mv.to, opts.n_plus_one), Ok(()));
        let inst = c.instance(mv.inst);
        assert!(inst.auto_balance && !opts.pinned.contains(&mv.inst));
        assert_ne!(state.mobility(mv.inst), Mobility::Immovable);
        state.apply(*mv);
        // The running sums agree with a fresh computation after every move.
        let fresh = score(&state.to_cluster(), metric);
        assert!(
            (state.score() - fresh).abs() < 1e-9 * fresh.max(1.0),
            "{} vs {fresh}",
            state.score()
        );
        assert!(state.score() < last + 1e-12);
        last = state.score();
    }
    assert!((last - p.final_score).abs() < 1e-9 * last.max(1.0));
    // Free memory stays positive on every online node.
    for (id, node) in c.nodes.iter().enumerate() {
        if !node.offline {
            assert!(state.load(NodeId::from_index(id)).free_mem > 0.0);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn plans_are_valid_and_incremental_scores_exact(
        seed in 0u64..1000, nodes in 3usize..9, per_node in 2usize..12, pruned in any::<bool>()
    ) {
        let mut c = mixed(seed, nodes, nodes * per_node);
        c.nodes[nodes - 1].offline = seed % 3 == 0;
        let opts = PlanOptions {
            search: if pruned { Search::Pruned { width: 2 } } else { Search::Exhaustive },
            pinned: vec![InstId(0)],
            ..PlanOptions::default()
        };
        check_plan(&c, &Ganeti::new(&c), &opts);
        check_plan(&c, &Spread, &opts);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// With location, desired-location and exclusion tags, the incremental score
    /// after every move equals Ganeti's score computed from scratch.
    #[test]
    fn ganeti_score_stays_exact_with_location_tags(
        seed in any::<u64>(), nodes in 3usize..12, instances in 4usize..60,
    ) {
        let shape = generate::Shape { groups: 1, nodes, instances, tagged: true };
        let c = generate::cluster(seed, shape);
        let m = Ganeti::new(&c);
        let planned = plan(&c, &m, &PlanOptions::default());
        let mut state = State::new(&c, &m);
        prop_assert!(close(state.score(), ganeti::score(&c)));
        for mv in &planned.plan.moves {
            state.apply(*mv);
            let exact = ganeti::score(&state.to_cluster());
            prop_assert!(close(state.score(), exact), "{} vs {exact}", state.score());
        }
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(1.0)
}

#[test]
fn drbd_moves_swap_roles_and_plain_never_moves() {
    let c = mixed(3, 6, 60);
    let m = Ganeti::new(&c);
    let planned = plan(&c, &m, &PlanOptions::default());
    assert!(!planned.plan.moves.is_empty());
    let mut state = State::new(&c, &m);
    for mv in &planned.plan.moves {
        let inst = c.instance(mv.inst);
        assert_ne!(inst.disk_template, DiskTemplate::Plain);
        state.apply(*mv);
    }
    let after = state.to_cluster();
    for (before, after) in c.instances.iter().zip(&after.instances) {
        if before.disk_template == DiskTemplate::Drbd && before.primary != after.primary {
            assert_eq!(after.primary, before.secondary.unwrap());
            assert_eq!(after.secondary, Some(before.primary));
        }
    }
}

#[test]
fn offline_target_and_tags_are_refused() {
    let mut c = mixed(5, 4, 20);
    c.nodes[3].offline = true;
    let m = Ganeti::new(&c);
    let state = State::new(&c, &m);
    let shared = c
        .instance_ids()
        .find(|&i| {
            c.instance(i).disk_template == DiskTemplate::Ext && c.instance(i).primary != NodeId(3)
        })
        .unwrap();
    assert_eq!(
        state.check(shared, NodeId(3), true),
        Err(Refusal::TargetOffline)
    );
    let plain = c
        .instance_ids()
        .find(|&i| c.instance(i).disk_template == DiskTemplate::Plain)
        .unwrap();
    let other = NodeId::from_index((c.instance(plain).primary.index() + 1) % 3);
    assert_eq!(state.check(plain, other, true), Err(Refusal::Immovable));
}

#[test]
fn max_moves_and_min_score_stop_the_plan() {
    let c = tern_balance::synth::unbalanced(8, 80, 2);
    let m = Ganeti::new(&c);
    let capped = plan(
        &c,
        &m,
        &PlanOptions {
            max_moves: Some(3),
            ..PlanOptions::default()
        },
    );
    assert_eq!(capped.plan.moves.len(), 3);
    let full = plan(&c, &m, &PlanOptions::default());
    let stop_at = (full.plan.initial_score + full.plan.final_score) / 2.0;
    let early = plan(
        &c,
        &m,
        &PlanOptions {
            min_score: stop_at,
            ..PlanOptions::default()
        },
    );
    assert!(early.plan.final_score <= stop_at);
    assert!(early.plan.moves.len() < full.plan.moves.len());
}

#[test]
fn pruned_search_matches_exhaustive_quality() {
    let c = tern_balance::synth::unbalanced(16, 240, 4);
    let m = Ganeti::new(&c);
    let exact = plan(
        &c,
        &m,
        &PlanOptions {
            search: Search::Exhaustive,
            ..PlanOptions::default()
        },
    );
    let fast = plan(&c, &m, &PlanOptions::default());
    assert!(fast.plan.final_score <= exact.plan.final_score * 1.01);
    assert!(fast.plan.moves.len() <= exact.plan.moves.len());
    // The balanced cluster, scored from scratch by the exact Ganeti metric, has
    // the score the planner reports.
    let mut state = State::new(&c, &m);
    for mv in &fast.plan.moves {
        state.apply(*mv);
    }
    let rescored = ganeti::score(&state.to_cluster());
    assert!((rescored - fast.plan.final_score).abs() < 1e-9 * rescored.max(1.0));
}
