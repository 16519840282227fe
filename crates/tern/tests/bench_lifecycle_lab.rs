//! `tern bench lifecycle` in a short form (a 64 MiB local disk, the minimal template
//! only), so the whole life of a VM through the manager runs in every test run: boot from
//! the catalogue, disk writes, live migration with a shared and with a local disk,
//! suspend on one host and restore on the other, and a host's agent killed with its VM
//! restarted elsewhere from its disk, every write kept. Needs root, QEMU and qemu-img.

use std::process::Command;

use serde_json::Value;

#[test]
fn every_case_of_a_vms_life_passes() {
    let qemu_img = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !tern_testkit::require_lab("the lifecycle benchmark test", &[("qemu-img", qemu_img)]) {
        return;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["bench", "lifecycle", "--disk-mib", "64", "--json"])
        // The image the other guest tests build.
        .env("TERN_CACHE", tern_testkit::test_cache_dir())
        .env_remove("TERN_MANAGER")
        .env_remove("TERN_TOKEN")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}): {stderr}"));
    eprintln!("{report}");
    let cases = report["cases"].as_array().expect("cases");
    for c in cases {
        assert_eq!(c["ok"], true, "{c}\n{stderr}");
    }
    for name in [
        "create-minimal",
        "migrate-shared-disk",
        "migrate-local-disk",
        "agent-restart",
        "suspend-restore",
        "host-killed",
    ] {
        assert!(
            cases.iter().any(|c| c["name"] == name),
            "case {name} ran: {report}"
        );
    }
    assert!(
        report["boot_s"]["minimal"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    let moves = report["migrations"].as_array().unwrap();
    assert_eq!(moves.len(), 2, "{report}");
    for m in moves {
        assert!(m["disk_ok"] == true && m["guest_ok"] == true, "{m}");
    }
    assert!(out.status.success(), "{stderr}");
}
