//! The `ganeti` metric's incremental form against `hbal` itself: replay each
//! step of the plans `hbal -t FILE` prints on Ganeti's test files, re-score
//! only the nodes a step touches, and compare with the score hbal printed for
//! that step. This checks the post-move rules (memory missing at load, N+1 as
//! `unallocated <= reserved`) the way Ganeti applies them.
//!
//! Needs Debian's `ganeti-htools-3.0`; skipped with a message without it unless
//! `CI` is set.

use std::path::{Path, PathBuf};
use std::process::Command;

use tern_balance::metric::ganeti::{self, Context, NodeValues, NodeView};
use tern_model::{ganeti as text, Cluster, NodeId};

const HBAL: &str = "/usr/lib/ganeti/3.0/usr/bin/hbal";

fn hbal_present() -> bool {
    if Path::new(HBAL).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{HBAL} is missing; scripts/setup installs ganeti-htools-3.0"
    );
    eprintln!("skipping: {HBAL} not installed (apt-get install ganeti-htools-3.0)");
    false
}

/// One printed step: instance, new primary, new secondary, score after it.
struct Step {
    inst: String,
    primary: String,
    secondary: String,
    score: f64,
}

struct Run {
    group: String,
    initial: f64,
    steps: Vec<Step>,
}

fn run_hbal(path: &Path, extra: &[&str]) -> Option<Run> {
    let out = Command::new(HBAL)
        .arg("-t")
        .arg(path)
        .args(extra)
        .output()
        .expect("hbal runs");
    if !out.status.success() {
        return None;
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut group = None;
    let mut initial = None;
    let mut steps = Vec::new();
    for line in stdout.lines() {
        if let Some(g) = line.strip_prefix("Selected node group: ") {
            group = Some(g.trim().to_owned());
        } else if let Some(s) = line.strip_prefix("Initial score: ") {
            initial = Some(s.trim().parse().unwrap());
        } else {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || !f[0].ends_with('.') || f[3] != "=>" {
                continue;
            }
            if let (Some((p, s)), Ok(score)) = (f[4].split_once(':'), f[5].parse()) {
                steps.push(Step {
                    inst: f[1].to_owned(),
                    primary: p.to_owned(),
                    secondary: s.to_owned(),
                    score,
                });
            }
        }
    }
    Some(Run {
        group: group?,
        initial: initial?,
        steps,
    })
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= (1e-6 * b.abs()).max(2e-8)
}

fn values(ctx: &Context, c: &Cluster, node: NodeId, touched: bool) -> NodeValues {
    let by_node = c.instances_by_node();
    ganeti::node_values(
        ctx,
        c,
        NodeView {
            node,
            primaries: &by_node.primaries[node.index()],
            secondaries: &by_node.secondaries[node.index()],
            touched,
        },
    )
}

/// The score over one group's nodes, as hbal scores the group it balances.
fn group_score(c: &Cluster, vals: &[NodeValues], group: &str) -> f64 {
    let (v, online): (Vec<NodeValues>, Vec<bool>) = c
        .node_ids()
        .filter(|&n| c.group(c.node(n).group).name == group)
        .map(|n| (vals[n.index()].clone(), !c.node(n).offline))
        .unzip();
    ganeti::aggregate(&v, &online)
        .iter()
        .fold(0.0, |a, (_, w, x)| a + w * x)
}

fn data_files() -> Vec<PathBuf> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/ganeti");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("../shared/data/ganeti exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .collect();
    files.sort();
    files
}

/// Replays hbal's steps; returns how many steps were checked.
fn replay(name: &str, mut c: Cluster, run: &Run) -> usize {
    let ctx = Context::new(&c);
    let mut vals: Vec<NodeValues> = c.node_ids().map(|n| values(&ctx, &c, n, false)).collect();
    let initial = group_score(&c, &vals, &run.group);
    assert!(
        close(initial, run.initial),
        "{name}: initial {initial:.8}, hbal {:.8}",
        run.initial
    );
    for (k, step) in run.steps.iter().enumerate() {
        let inst = c
            .find_instance(&step.inst)
            .expect("hbal names a known instance");
        let node = |s: &str| c.find_node(s).expect("hbal names a known node");
        let new_p = node(&step.primary);
        let new_s = (!step.secondary.is_empty()).then(|| node(&step.secondary));
        let i = &c.instances[inst.index()];
        let mut changed: Vec<NodeId> = [Some(i.primary), i.secondary, Some(new_p), new_s]
            .into_iter()
            .flatten()
            .collect();
        changed.sort_unstable();
        changed.dedup();
        let i = &mut c.instances[inst.index()];
        i.primary = new_p;
        i.secondary = new_s;
        for n in changed {
            vals[n.index()] = values(&ctx, &c, n, true);
        }
        let ours = group_score(&c, &vals, &run.group);
        assert!(
            close(ours, step.score),
            "{name}: after step {} ({} to {}:{}) tern {ours:.8}, hbal {:.8}",
            k + 1,
            step.inst,
            step.primary,
            step.secondary,
            step.score
        );
    }
    run.steps.len()
}

#[test]
fn replaying_hbal_plans_gives_hbals_score_after_every_step() {
    if !hbal_present() {
        return;
    }
    let mut checked = 0;
    for path in data_files() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(cluster) = text::parse(&std::fs::read_to_string(&path).unwrap()) else {
            continue;
        };
        for extra in [&[][..], &["--no-disk-moves"][..]] {
            if let Some(run) = run_hbal(&path, extra) {
                checked += replay(&name, cluster.clone(), &run);
            }
        }
    }
    eprintln!("checked {checked} hbal steps");
    assert!(checked >= 20, "only {checked} steps checked");
}
