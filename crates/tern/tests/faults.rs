//! The fault and attack suite, once, against one lab: every probe of a closed hole and
//! every fault case passes, no VM is lost or runs on two hosts at once, and no secret
//! reaches a party that should not have it. The cases live in `tern-faults`; `tern bench
//! faults` runs the same ones.
//!
//! Needs root, iproute2 and QEMU; without them it says why and passes, except under
//! `CI`, where it must run.

use std::path::PathBuf;
use std::sync::Arc;

use tern_faults::{Fixture, FixtureOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_and_probe_case_passes_with_nothing_lost_twice_or_leaked() {
    if !tern_testkit::require_lab("fault suite", &[]) {
        return;
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let opts = FixtureOptions {
        dir: dir.path().join("faults"),
        tern_binary: PathBuf::from(env!("CARGO_BIN_EXE_tern")),
        image_dir: tern_testkit::test_cache_dir(),
        progress: Arc::new(|s: &str| eprintln!("{s}")),
    };
    let fixture = Fixture::start(opts).await.expect("the suite's lab starts");
    let cases = tern_faults::all();
    let summary = tern_faults::run(&fixture, &cases, |r| {
        let verdict = if r.outcome.passed { "PASS" } else { "FAIL" };
        eprintln!(
            "{verdict} {}  {} ({:.1} s)",
            r.name, r.outcome.detail, r.seconds
        );
    })
    .await;
    if !summary.goal_met() {
        eprintln!("{}", fixture.logs(40));
    }
    fixture.stop().await;
    let failed: Vec<String> = summary
        .results
        .iter()
        .filter(|r| !r.outcome.passed)
        .map(|r| format!("{}: {}", r.name, r.outcome.detail))
        .collect();
    assert!(failed.is_empty(), "failed cases:\n{}", failed.join("\n"));
    assert_eq!(
        (
            summary.vms_lost,
            summary.vms_running_twice,
            summary.secrets_leaked
        ),
        (0, 0, 0),
        "VMs lost, VMs running twice, cases leaking a secret"
    );
    eprintln!(
        "{} cases passed in {:.0} s",
        summary.passed, summary.seconds
    );
}
