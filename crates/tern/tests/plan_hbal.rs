//! `tern plan` and `tern bench hbal` end to end: bad input exits 2 and writes
//! nothing; the saved cluster is what hinfo scores; on a small generated cluster
//! tern's plan is as good as hbal's with no more moves.

use std::path::Path;
use std::process::Command;

const GANETI_BIN: &str = "/usr/lib/ganeti/3.0/usr/bin";

fn tern() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tern"))
}

fn data(name: &str) -> String {
    format!("{}/../../data/ganeti/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn ganeti_available() -> bool {
    if Path::new(GANETI_BIN).join("hbal").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "hbal is missing under CI: scripts/setup installs ganeti-htools-3.0"
    );
    eprintln!("skipping: {GANETI_BIN}/hbal not installed");
    false
}

#[test]
fn bad_input_exits_2_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.data");
    let svg = dir.path().join("out.svg");
    let broken = dir.path().join("broken.data");
    std::fs::write(
        &broken,
        "g|u|preferred||\n\nnode-1|abc|0|0|0|0|1|N|u|1\n\n\n",
    )
    .unwrap();
    let huge = dir.path().join("huge.data");
    let text = std::fs::read_to_string(data("hbal-migration-1.data")).unwrap();
    std::fs::write(&huge, text.replace("inst121|1024|", "inst121|999999|")).unwrap();
    for (args, says) in [
        (vec!["--ganeti", broken.to_str().unwrap()], "line 3"),
        (vec!["--ganeti", huge.to_str().unwrap()], "inst121"),
        (vec!["--ganeti", "/nonexistent/file.data"], "cannot read"),
        (
            vec![
                "--ganeti",
                &data("hbal-migration-1.data"),
                "--metric",
                "nope",
            ],
            "nope",
        ),
        (
            vec!["--ganeti", &data("hbal-migration-1.data"), "--pin", "ghost"],
            "ghost",
        ),
    ] {
        let o = tern()
            .arg("plan")
            .args(&args)
            .arg("--save")
            .arg(&out)
            .arg("--plot")
            .arg(&svg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(!out.exists() && !svg.exists(), "{args:?} wrote a file");
    }
}

#[test]
fn json_plan_and_saved_cluster_agree_with_hinfo() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.data");
    let svg = dir.path().join("out.svg");
    let o = tern()
        .args(["plan", "--json", "--ganeti", &data("hbal-soft-errors.data")])
        .arg("--save")
        .arg(&out)
        .arg("--plot")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fin = v["final_score"].as_f64().unwrap();
    assert!(fin < v["initial_score"].as_f64().unwrap());
    let moves = v["moves"].as_array().unwrap();
    assert!(!moves.is_empty());
    assert!(
        moves[0]["instance"].is_string()
            && moves[0]["from"].is_string()
            && moves[0]["to"].is_string()
    );
    assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
    if !ganeti_available() {
        return;
    }
    let h = Command::new(Path::new(GANETI_BIN).join("hinfo"))
        .arg("-t")
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&h.stdout);
    let hinfo: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Cluster score:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        (hinfo - fin).abs() < 1e-6 * fin.max(1.0),
        "hinfo {hinfo} tern {fin}"
    );
}

#[test]
fn bench_small_case_matches_hbal() {
    if !ganeti_available() {
        return;
    }
    let o = tern()
        .args(["bench", "hbal", "--cases", "10x120", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let case = &v["cases"][0];
    assert_eq!(case["hbal"]["timed_out"], false);
    let ratio = case["score_ratio"].as_f64().unwrap();
    assert!(ratio <= 1.01, "tern/hbal score ratio {ratio}");
    assert!(case["tern"]["moves"].as_u64() <= case["hbal"]["moves"].as_u64());
    assert!(case["tern"]["moves"].as_u64().unwrap() > 0);
}
