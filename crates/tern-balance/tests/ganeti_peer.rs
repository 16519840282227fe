//! The `ganeti` metric against Ganeti itself:
//! - every component and the score `hinfo -t FILE` prints, for Ganeti's test
//!   files, for tern's own rewrite of them, and for generated clusters;
//! - the incremental form: replay each step of the plans `hbal -t FILE`
//!   prints, re-score only the nodes a step touches, and compare with the score
//!   hbal printed for that step. This checks the post-move rules (memory missing
//!   at load, N+1 as `unallocated <= reserved`) the way Ganeti applies them.
//!
//! Needs Debian's `ganeti-htools-3.0`; without it the tests print why and pass,
//! unless `CI` is set (then they fail: CI installs it via `scripts/setup`).

use std::path::{Path, PathBuf};
use std::process::Command;

use tern_balance::metric::ganeti::{self, Context, NodeValues, NodeView};
use tern_model::{ganeti as text, generate, Cluster, NodeId};

const HINFO: &str = "/usr/lib/ganeti/3.0/usr/bin/hinfo";
const HBAL: &str = "/usr/lib/ganeti/3.0/usr/bin/hbal";

fn present(tool: &str) -> bool {
    if Path::new(tool).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{tool} is missing; scripts/setup installs ganeti-htools-3.0"
    );
    eprintln!("skipping: {tool} not installed (apt-get install ganeti-htools-3.0)");
    false
}

/// What `hinfo` printed: components (name, value, weight) and the score.
#[derive(Debug)]
struct Hinfo {
    components: Vec<(String, f64, f64)>,
    score: f64,
}

fn run_hinfo(path: &Path) -> Hinfo {
    let out = Command::new(HINFO)
        .arg("-t")
        .arg(path)
        .output()
        .expect("hinfo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hinfo -t {} failed: {}{}",
        path.display(),
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut components = Vec::new();
    let mut score = None;
    let mut in_table = false;
    for line in stdout.lines() {
        if line.starts_with("Cluster coefficients:") {
            in_table = true;
        } else if let Some(s) = line.strip_prefix("Cluster score:") {
            score = Some(s.trim().parse::<f64>().expect("score is a number"));
            in_table = false;
        } else if in_table {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 3 && f[0] != "Field" {
                let weight = f[2].trim_start_matches('x').parse().unwrap();
                components.push((f[0].to_owned(), f[1].parse().unwrap(), weight));
            }
        }
    }
    Hinfo {
        components,
        score: score.expect("hinfo prints a cluster score"),
    }
}

/// Equal to the 8 decimals hinfo prints, or to 6 significant digits.
fn close(tern: f64, hinfo: f64) -> bool {
    (tern.is_nan() && hinfo.is_nan())
        || tern == hinfo
        || (tern - hinfo).abs() <= (1e-6 * hinfo.abs()).max(2e-8)
}

/// Compares tern's metric on `cluster` with hinfo's output; returns the scores.
fn compare(label: &str, cluster: &Cluster, h: &Hinfo) -> (f64, f64) {
    let ours = ganeti::components(cluster);
    assert_eq!(
        ours.len(),
        h.components.len(),
        "{label}: tern has {} components, hinfo printed {}",
        ours.len(),
        h.components.len()
    );
    for ((name, weight, value), (hname, hvalue, hweight)) in ours.iter().zip(&h.components) {
        assert_eq!(name, hname, "{label}: component order");
        assert!((weight - hweight).abs() < 1e-9, "{label}: weight of {name}");
        assert!(
            close(*value, *hvalue),
            "{label}: {name} is {value:.8} in tern, {hvalue:.8} in hinfo"
        );
    }
    let score = ganeti::score(cluster);
    assert!(
        close(score, h.score),
        "{label}: score {score:.8} in tern, {:.8} in hinfo",
        h.score
    );
    (score, h.score)
}

fn data_files() -> Vec<PathBuf> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/ganeti");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("data/ganeti exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "data"))
        .collect();
    files.sort();
    files
}

/// A scratch file removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn write(tag: &str, contents: &str) -> Scratch {
        let path =
            std::env::temp_dir().join(format!("tern-ganeti-{}-{tag}.data", std::process::id()));
        std::fs::write(&path, contents).unwrap();
        Scratch(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn every_loadable_data_file_scores_as_in_hinfo() {
    if !present(HINFO) {
        return;
    }
    let mut compared = 0;
    for path in data_files() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(cluster) = text::parse(&std::fs::read_to_string(&path).unwrap()) else {
            continue;
        };
        let h = run_hinfo(&path);
        let (ours, theirs) = compare(&name, &cluster, &h);
        eprintln!("{name:40} tern {ours:.8}  hinfo {theirs:.8}");
        compared += 1;
    }
    assert!(compared >= 40, "only {compared} files compared");
}

#[test]
fn hinfo_reads_terns_rewrite_of_every_data_file_with_the_same_score() {
    if !present(HINFO) {
        return;
    }
    for path in data_files() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(cluster) = text::parse(&std::fs::read_to_string(&path).unwrap()) else {
            continue;
        };
        let original = run_hinfo(&path);
        let rewrite = Scratch::write(&name, &text::serialize(&cluster));
        let again = run_hinfo(&rewrite.0);
        assert!(
            close(again.score, original.score),
            "{name}: hinfo scores tern's rewrite {:.8}, the original {:.8}",
            again.score,
            original.score
        );
    }
}

#[test]
fn generated_clusters_score_as_in_hinfo() {
    if !present(HINFO) {
        return;
    }
    let shapes = [
        generate::Shape {
            groups: 1,
            nodes: 2,
            instances: 3,
            tagged: false,
        },
        generate::Shape {
            groups: 1,
            nodes: 8,
            instances: 40,
            tagged: false,
        },
        generate::Shape {
            groups: 2,
            nodes: 12,
            instances: 80,
            tagged: true,
        },
        generate::Shape {
            groups: 3,
            nodes: 20,
            instances: 150,
            tagged: true,
        },
    ];
    let mut nonzero = std::collections::BTreeSet::new();
    for seed in 0..8u64 {
        for (s, &shape) in shapes.iter().enumerate() {
            let cluster = generate::cluster(seed * 31 + s as u64, shape);
            let label = format!("seed {seed} shape {s}");
            let file = Scratch::write(&format!("gen-{seed}-{s}"), &text::serialize(&cluster));
            let h = run_hinfo(&file.0);
            compare(&label, &cluster, &h);
            nonzero.extend(
                h.components
                    .iter()
                    .filter(|c| c.1 != 0.0)
                    .map(|c| c.0.clone()),
            );
        }
    }
    // The comparison means something only if the generated clusters make
    // every component non-zero somewhere.
    let missing: Vec<_> = ganeti::COMPONENTS
        .iter()
        .filter(|c| !nonzero.contains(c.name))
        .map(|c| c.name)
        .collect();
    assert!(
        missing.is_empty(),
        "components always 0 in generated clusters: {missing:?}"
    );
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
    if !present(HBAL) {
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

#[test]
fn odd_but_valid_files_score_as_in_hinfo() {
    if !present(HINFO) {
        return;
    }
    let g = "g|u|preferred||";
    let a = "a|1024|0|1024|1000|1000|4|N|u|1";
    let b = "b|2048|0|1000|1000|600|4|N|u|1";
    let cases = [
        ("duplicate node names", format!("{g}\n\n{a}\n{a}\n{b}\n\ni|128|10|1|running|Y|a||ext||1\n\n\n")),
        ("plain with a secondary", format!("{g}\n\n{a}\n{b}\n\ni|128|10|1|running|Y|a|b|plain||1\n\n\n")),
        ("unknown flag, negative memory", format!("{g}\n\na|-5|0|1024|1000|1000|4|X|u|1\n{b}\n\n\n\n")),
        ("unknown resources", format!("{g}\n\na|?|0|1024|1000|1000|4|N|u|1\n{b}\n\ni|128|10|1|running|Y|a|b|drbd||1\n\n\n")),
        ("zero disk and spindles", format!("{g}\n\na|1024|0|1024|0|0|4|N|u|0\n{b}\n\ni|128|10|1|running|Y|b|a|drbd||1\n\n\n")),
    ];
    for (label, text) in cases {
        let cluster = text::parse(&text).unwrap_or_else(|e| panic!("{label}: {e}"));
        let file = Scratch::write(&label.replace(' ', "-"), &text);
        compare(label, &cluster, &run_hinfo(&file.0));
    }
}

#[test]
fn load_warnings_match_hinfos() {
    if !present(HINFO) {
        return;
    }
    let mut warned = 0;
    for path in data_files() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(cluster) = text::parse(&std::fs::read_to_string(&path).unwrap()) else {
            continue;
        };
        let out = Command::new(HINFO)
            .arg("-v")
            .arg("-t")
            .arg(&path)
            .output()
            .unwrap();
        let mut theirs: Vec<String> = String::from_utf8_lossy(&out.stderr)
            .lines()
            .chain(String::from_utf8_lossy(&out.stdout).lines())
            .filter_map(|l| {
                l.trim()
                    .strip_prefix("- node ")
                    .map(|r| format!("node {r}"))
            })
            .collect();
        let mut ours = text::missing_resources(&cluster);
        theirs.sort();
        ours.sort();
        assert_eq!(ours, theirs, "{name}");
        warned += ours.len();
    }
    assert!(
        warned > 0,
        "no data file produced a warning; the test checks nothing"
    );
}
