//! The `ganeti` metric against Ganeti itself: every component and the score
//! `hinfo -t FILE` prints, for Ganeti's test files, for tern's own rewrite of
//! them, and for generated clusters.
//!
//! Needs Debian's `ganeti-htools-3.0`; without it the tests print why and pass,
//! unless `CI` is set (then they fail: CI installs it via `scripts/setup`).

use std::path::{Path, PathBuf};
use std::process::Command;

use tern_balance::metric::ganeti;
use tern_model::{ganeti as text, generate, Cluster};

const HINFO: &str = "/usr/lib/ganeti/3.0/usr/bin/hinfo";

fn hinfo_present() -> bool {
    if Path::new(HINFO).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{HINFO} is missing; scripts/setup installs ganeti-htools-3.0"
    );
    eprintln!("skipping: {HINFO} not installed (apt-get install ganeti-htools-3.0)");
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
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/data/ganeti");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("../shared/data/ganeti exists")
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
    if !hinfo_present() {
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
    if !hinfo_present() {
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
    if !hinfo_present() {
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
