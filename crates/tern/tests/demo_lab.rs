//! `tern demo` end to end on real QEMU guests: a 3-host lab, VMs crowded on one host
//! with CPU-heavy workloads, the manager's balancer live-migrating them, and a teardown
//! that leaves nothing behind.

use std::process::Command;

use serde_json::Value;

#[test]
fn the_demo_balances_a_real_lab_and_leaves_nothing_behind() {
    if !tern_testkit::require_lab("the demo test", &[]) {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["demo", "--json"])
        .env("TERN_CACHE", tern_testkit::test_cache_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tern demo failed:\n{stderr}");
    let r: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not one JSON report ({e}):\n{stderr}"));

    let migrations = r["migrations"].as_array().unwrap();
    assert!(!migrations.is_empty(), "no migration happened:\n{stderr}");
    for m in migrations {
        assert_eq!(m["policy"], "adaptive", "{m}");
        assert!(m["total_ms"].as_u64().is_some(), "migration failed: {m}");
        assert_eq!(m["guest_ok"], true, "guest unhealthy after {m}");
    }

    let busiest = |loads: &Value| {
        loads
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["cpu_cores"].as_f64().unwrap())
            .fold(0.0, f64::max)
    };
    let (before, after) = (busiest(&r["before"]), busiest(&r["after"]));
    assert!(
        after < before,
        "the busiest host's load did not go down: {before} -> {after}\n{stderr}"
    );
    let vms_on = |loads: &Value, host: &str| {
        loads
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == host)
            .map(|h| h["vms"].as_u64().unwrap())
            .unwrap()
    };
    assert!(vms_on(&r["after"], "h1") < vms_on(&r["before"], "h1"));

    // The report's own check, and the machine's word for it.
    assert_eq!(r["left_behind"], Value::Array(vec![]), "{r}");
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout);
    let made: Vec<&str> = r["lab_namespaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(made.len(), 4, "{r}");
    for n in made {
        assert!(
            !ns.lines().any(|l| l.split_whitespace().next() == Some(n)),
            "namespace {n} left behind"
        );
    }
}

#[test]
fn an_interrupted_demo_tears_its_lab_down() {
    if !tern_testkit::require_lab("the interrupted demo test", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["demo", "--json"])
        .env("TERN_CACHE", tern_testkit::test_cache_dir())
        .env("TMPDIR", dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the lab exists (its state file is written before anything is made),
    // give the agents a moment, then interrupt.
    let t0 = std::time::Instant::now();
    let state = loop {
        let found = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.path().join("lab/lab.json"))
            .find(|p| p.exists());
        if let Some(p) = found {
            break p;
        }
        assert!(t0.elapsed().as_secs() < 300, "the demo never made its lab");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    std::thread::sleep(std::time::Duration::from_secs(3));
    let lab: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    // The shell's own `kill`: procps may be absent on a minimal machine.
    let kill = format!("kill -INT {}", child.id());
    assert!(Command::new("sh")
        .args(["-c", &kill])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("interrupted by SIGINT"), "{stderr}");
    let ns = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let ns = String::from_utf8_lossy(&ns.stdout);
    let mut names = vec![lab["switch_netns"].as_str().unwrap().to_string()];
    for h in lab["hosts"].as_array().unwrap() {
        names.push(h["netns"].as_str().unwrap().to_string());
    }
    for n in &names {
        assert!(
            !ns.lines().any(|l| l.split_whitespace().next() == Some(n)),
            "namespace {n} left behind after SIGINT:\n{stderr}"
        );
    }
    assert!(!state.exists(), "the lab's state survived the teardown");
}
