//! `tern sim` from the command line: reports, plots and bad input.

use std::process::Command;

const DAY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../data/planetlab/20110303");
const SMALL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/sim/small.toml");

fn tern(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn planetlab_json_has_the_benchmark_metrics_and_plot_is_svg() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("day.svg");
    let out = tern(&[
        "sim",
        "planetlab",
        DAY,
        "--policy",
        "thr-mmt",
        "--migration",
        "cloudsim",
        "--json",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in [
        "energy_kwh",
        "migrations",
        "slatah",
        "pdm",
        "slav",
        "wall_seconds",
    ] {
        assert!(v[key].is_number(), "{key} missing in {v}");
    }
    assert_eq!(v["vms"], 1052);
    assert!(v["migrations"].as_u64().unwrap() > 1000);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("active hosts"));
}

#[test]
fn planetlab_leaves_out_what_fits_nowhere() {
    let out = tern(&[
        "sim",
        "planetlab",
        DAY,
        "--vm-types",
        "cycle",
        "--hosts",
        "300",
        "--migration",
        "cloudsim",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["dropped_vms"].as_u64().unwrap() > 0, "{v}");
    assert!(v["vms_finished"].as_u64().unwrap() > 0, "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("left out"), "{stderr}");
    // 800 hosts take every VM of the day, as in CloudSim.
    let out = tern(&["sim", "planetlab", DAY, "--migration", "cloudsim", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dropped_vms"], 0);
}

#[test]
fn scenario_runs_with_every_policy() {
    for policy in ["none", "thr-mmt", "spread", "balance"] {
        let out = tern(&[
            "sim",
            "run",
            SMALL,
            "--policy",
            policy,
            "--migration",
            "cloudsim",
            "--json",
        ]);
        assert!(
            out.status.success(),
            "{policy}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["policy"], policy);
        assert_eq!(v["hosts"], 60);
        let (mean, max) = (v["imbalance_mean"].as_f64(), v["imbalance_max"].as_f64());
        assert!(
            mean.zip(max).is_some_and(|(m, x)| 0.0 < m && m <= x),
            "{policy}: imbalance {mean:?}, {max:?}"
        );
    }
}

/// `--settings` takes the manager's balancer settings JSON: a disabled balancer moves
/// nothing, a busier one moves more than the defaults allow.
#[test]
fn balance_takes_the_managers_settings() {
    let dir = tempfile::tempdir().unwrap();
    let run = |settings: Option<serde_json::Value>| {
        let mut args = vec!["sim", "run", SMALL, "--policy", "balance", "--json"];
        let path = dir.path().join("settings.json");
        if let Some(s) = settings {
            std::fs::write(&path, s.to_string()).unwrap();
            args.extend(["--settings", path.to_str().unwrap()]);
        }
        let out = tern(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["migrations"].as_u64().unwrap()
    };
    let settings = |enabled: bool, per_host: u32, per_cluster: u32| {
        serde_json::json!({
            "enabled": enabled, "dry_run": false, "aggressiveness": 5, "interval_s": 30,
            "cooldown_s": 300, "max_per_host": per_host, "max_per_cluster": per_cluster,
            "dead_after_s": 30, "smoothing_window": 5, "default_policy": "adaptive"
        })
    };
    let defaults = run(None);
    assert!(defaults > 0);
    assert_eq!(run(Some(settings(false, 1, 8))), 0);
    assert!(run(Some(settings(true, 4, 40))) > defaults);
}

#[test]
fn bad_input_exits_2_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("x.svg");
    let bad_toml = dir.path().join("bad.toml");
    std::fs::write(&bad_toml, "hours = 24\n[[hosts]]\ncount = 1\n").unwrap();
    // Valid JSON the manager would refuse.
    let bad_settings = dir.path().join("settings.json");
    std::fs::write(&bad_settings, r#"{"enabled": true}"#).unwrap();
    let bad_json = bad_settings.to_str().unwrap();
    let plot = svg.to_str().unwrap();
    let cases: Vec<Vec<&str>> = vec![
        vec!["sim", "planetlab", "/no/such/folder", "--plot", plot],
        vec!["sim", "planetlab", DAY, "--policy", "magic", "--plot", plot],
        vec![
            "sim",
            "planetlab",
            DAY,
            "--migration",
            "teleport",
            "--plot",
            plot,
        ],
        vec!["sim", "run", bad_toml.to_str().unwrap(), "--plot", plot],
        vec!["sim", "run", SMALL, "--plot", "out.png"],
        vec![
            "sim",
            "run",
            SMALL,
            "--policy",
            "spread",
            "--settings",
            plot,
        ],
        vec![
            "sim",
            "run",
            SMALL,
            "--policy",
            "balance",
            "--settings",
            bad_json,
        ],
    ];
    for args in cases {
        let out = tern(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
        assert!(out.stdout.is_empty());
        assert!(!svg.exists(), "{args:?} wrote the plot");
    }
}
