//! Golden outcomes from Ganeti's own hbal shell tests (`shelltests/`) that involve
//! only live migrations of shared-storage instances.

use tern_balance::metric::ganeti::Ganeti;
use tern_balance::{plan, PlanOptions, State};
use tern_model::DynUtil;

fn load(name: &str) -> tern_model::Cluster {
    let path = format!("{}/../../data/ganeti/{name}", env!("CARGO_MANIFEST_DIR"));
    tern_model::ganeti::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Primaries per node after planning, in node order.
fn pcnt(c: &tern_model::Cluster) -> Vec<(String, usize)> {
    let m = Ganeti::new(c);
    let planned = plan(c, &m, &PlanOptions::default());
    let mut s = State::new(c, &m);
    for mv in &planned.plan.moves {
        s.apply(*mv);
    }
    let after = s.to_cluster();
    let by = after.instances_by_node();
    after
        .nodes
        .iter()
        .zip(&by.primaries)
        .map(|(n, p)| (n.name.clone(), p.len()))
        .collect()
}

/// `hbal -t shared-n1-failure.data --ignore-dynu -O nodeA`: nodeA is emptied.
#[test]
fn shared_n1_failure_evacuates_offline_node() {
    let mut c = load("shared-n1-failure.data");
    for i in &mut c.instances {
        i.util = DynUtil::ZERO;
    }
    let a = c.find_node("nodeA").unwrap();
    c.nodes[a.index()].offline = true;
    let got = pcnt(&c);
    let want: Vec<(String, usize)> = [("nodeA", 0), ("nodeB", 4), ("nodeC", 2), ("nodeD", 4)]
        .iter()
        .map(|(n, k)| (n.to_string(), *k))
        .collect();
    assert_eq!(got, want);
}

/// `hbal -t shared-n1-failure.data --ignore-dynu`: already well balanced.
#[test]
fn shared_n1_failure_is_already_balanced() {
    let mut c = load("shared-n1-failure.data");
    for i in &mut c.instances {
        i.util = DynUtil::ZERO;
    }
    let m = Ganeti::new(&c);
    assert!(plan(&c, &m, &PlanOptions::default()).plan.moves.is_empty());
}
