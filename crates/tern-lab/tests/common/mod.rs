//! What the lab tests share: the `tern` binary the agents run, and a two-host lab made
//! as `tern lab up` makes it (a lab CA, agents serving mutual TLS only).

pub mod disk;

use std::path::PathBuf;
use std::time::Duration;

use tern_agent::client::AgentClient;
use tern_lab::{self as lab, LabOptions, LabState};

/// The `tern` binary of this build tree.
pub fn tern_binary() -> PathBuf {
    // Integration tests live in target/<profile>/deps; the binary one level up.
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|d| d.parent()).unwrap().join("tern")
}

/// What a lab test needs beyond root, iproute2 and QEMU: the `tern` binary.
pub fn tern_binary_need() -> (String, bool) {
    let need = format!(
        "the tern binary at {} (cargo build -p tern)",
        tern_binary().display()
    );
    (need, tern_binary().exists())
}

/// Two hosts with `host_memory_mib` each on 1 Gbit/s links, under `dir`, and an
/// operator's client for each agent.
pub async fn two_hosts(
    dir: &tempfile::TempDir,
    host_memory_mib: u64,
) -> (LabState, Vec<AgentClient>) {
    let opts = LabOptions {
        hosts: 2,
        link_mbit: Some(1000),
        dir: dir.path().join("lab"),
        tern_binary: tern_binary(),
        host_memory_mib: Some(host_memory_mib),
        host_cpus: None,
        image_dir: tern_testkit::test_cache_dir(),
        manager_port: None,
    };
    let state = lab::up(&opts, &|s| eprintln!("{s}")).await.expect("lab up");
    let hosts = state
        .hosts
        .iter()
        .map(|h| state.client(&h.url, Duration::from_secs(60)).unwrap())
        .collect();
    (state, hosts)
}

/// Creates VM `vm` with `memory_mib` booting tern's guest image `img` on `host`, and
/// waits until its guest agent answers.
#[allow(dead_code)] // the disk lab tests boot their own guests
pub async fn boot_guest(
    host: &AgentClient,
    img: &tern_hv::image::GuestImage,
    vm: &str,
    memory_mib: u64,
) {
    let req: tern_agent::vms::CreateVm = serde_json::from_value(serde_json::json!({
        "id": vm,
        "spec": {
            "vcpus": 1,
            "memory_mib": memory_mib,
            "kernel": img.kernel,
            "initramfs": img.initramfs,
            "cmdline": format!("{} tern.hostname={vm}", img.cmdline),
        }
    }))
    .unwrap();
    host.create_vm(&req).await.unwrap();
    let t0 = std::time::Instant::now();
    while host
        .guest(vm, &serde_json::json!({"cmd": "ping"}))
        .await
        .is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "guest never answered"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
