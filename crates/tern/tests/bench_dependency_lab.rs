//! `tern bench dependency --quick`: one move of a guest running a service (hit by a
//! client on another lab host) and a batch job writing at 150 % of the link, under
//! `adaptive` and `dependency-aware`. Both leave the guest and the batch job's result
//! intact; the dependency-aware move froze the batch job and sent its memory once.
//! Needs root and QEMU.

use std::process::Command;

use serde_json::Value;

#[test]
fn a_dependency_aware_move_freezes_the_batch_job_and_keeps_it_correct() {
    if !tern_testkit::require_lab("the dependency benchmark test", &[]) {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "bench",
            "dependency",
            "--quick",
            "--policies",
            "adaptive,dependency-aware",
            "--json",
        ])
        .env("TERN_CACHE", tern_testkit::test_cache_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {stderr}"));
    eprintln!("{report}");
    assert!(out.status.success(), "{stderr}");
    let runs = report["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "{report}");
    for r in runs {
        assert_eq!(r["rate_percent"], 150, "{r}");
        assert_eq!(r["guest_ok"], true, "{r}");
        assert_eq!(r["batch_result_ok"], true, "{r}");
        assert!(r["client_requests"].as_u64().unwrap() > 0, "{r}");
        assert!(r["predicted_total_ms"].is_u64(), "{r}");
    }
    let dep = runs
        .iter()
        .find(|r| r["policy"] == "dependency-aware")
        .expect("a dependency-aware run");
    assert!(
        dep["frozen"].as_u64().unwrap() >= 1,
        "the batch job froze: {dep}"
    );
    assert!(
        dep["untainted_write_share"].as_f64().unwrap() > 0.9,
        "{dep}"
    );
    // Memory sent once: within 10 % of what holds data.
    let (bytes, nonzero) = (
        dep["bytes"].as_u64().unwrap(),
        dep["nonzero_bytes"].as_u64().unwrap(),
    );
    assert!(
        bytes as f64 <= 1.1 * nonzero as f64,
        "{bytes} bytes for {nonzero} non-zero: {dep}"
    );
}
