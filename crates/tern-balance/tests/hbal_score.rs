//! The incremental `ganeti` metric gives the same cluster score as Ganeti's `hinfo`
//! on every file, location tags and forthcoming instances included.

use std::path::{Path, PathBuf};
use std::process::Command;

use tern_balance::metric::ganeti::Ganeti;
use tern_balance::score;

const HINFO: &str = "/usr/lib/ganeti/3.0/usr/bin/hinfo";

fn data_dir() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/ganeti")).to_path_buf()
}

/// `hinfo`'s "Cluster score", or None when hinfo rejects the file.
fn hinfo_score(file: &Path) -> Option<f64> {
    let out = Command::new(HINFO).arg("-t").arg(file).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Cluster score:"))
        .and_then(|s| s.trim().parse().ok())
}

fn hinfo_available() -> bool {
    if Path::new(HINFO).exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{HINFO} is missing under CI: scripts/setup installs ganeti-htools-3.0"
    );
    eprintln!("skipping: {HINFO} not installed");
    false
}

#[test]
fn matches_hinfo_on_every_ganeti_data_file() {
    if !hinfo_available() {
        return;
    }
    let mut compared = 0;
    let mut wrong = Vec::new();
    for entry in std::fs::read_dir(data_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "data") {
            continue;
        }
        let Ok(cluster) = tern_model::ganeti::parse(&std::fs::read_to_string(&path).unwrap())
        else {
            continue;
        };
        let Some(want) = hinfo_score(&path) else {
            continue;
        };
        let got = score(&cluster, &Ganeti::new(&cluster));
        compared += 1;
        if (got - want).abs() > 1e-6 * want.abs().max(1.0) {
            wrong.push(format!("{}: tern {got:.8} hinfo {want:.8}", path.display()));
        }
    }
    eprintln!("compared {compared} files");
    assert!(compared >= 49, "only {compared} files compared");
    assert!(wrong.is_empty(), "scores differ:\n{}", wrong.join("\n"));
}
