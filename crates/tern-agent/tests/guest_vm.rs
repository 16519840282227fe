//! A real guest through the agent: the QEMU driver boots tern's guest image, the API
//! proxies requests to the guest agent, a workload runs, the verifier's checksum holds,
//! and the vCPU threads' CPU time shows in the metrics and the host's load.

use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_agent::client::AgentClient;
use tern_agent::host::Capacity;
use tern_agent::vms::CreateVm;
use tern_agent::{AppState, HostConfig};
use tern_hv::qemu::{QemuConfig, QemuDriver};
use tern_hv::VmState;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_and_answers_through_the_agent() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let img = tern_hv::image::ensure_image_async(tern_testkit::test_cache_dir(), |s| {
        eprintln!("image: {s}")
    })
    .await
    .expect("guest image builds");

    let dir = tempfile::tempdir().unwrap();
    let hv = QemuDriver::new(QemuConfig::new(
        dir.path().join("run"),
        dir.path().join("mem"),
        None,
    ));
    let state = AppState::new(
        Arc::new(hv),
        HostConfig {
            name: "h1".into(),
            capacity: Capacity {
                cpus: 2,
                memory_mib: 1024,
            },
            token: "t".into(),
            state_dir: dir.path().to_path_buf(),
            image_dir: tern_testkit::test_cache_dir(),
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tern_agent::server::serve(listener, state, async {
        let _ = rx.await;
    }));
    let c = AgentClient::new(&url, "t", Duration::from_secs(30)).unwrap();

    let req: CreateVm = serde_json::from_value(json!({
        "id": "g1",
        "spec": {
            "vcpus": 1,
            "memory_mib": 256,
            "kernel": img.kernel,
            "initramfs": img.initramfs,
            "cmdline": format!("{} tern.hostname=g1", img.cmdline),
        }
    }))
    .unwrap();
    let v = c.create_vm(&req).await.unwrap();
    assert_eq!(v.info.state, VmState::Running);

    // Booting under TCG takes seconds; the agent's channel answers once the guest is up.
    let t0 = Instant::now();
    let pong = loop {
        match c.guest("g1", &json!({"cmd": "ping"})).await {
            Ok(p) => break p,
            Err(e) if t0.elapsed() < Duration::from_secs(90) => {
                eprintln!("waiting for the guest: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("guest never answered: {e}"),
        }
    };
    eprintln!("guest answered after {:?}", t0.elapsed());
    assert_eq!(pong["ok"], true, "{pong}");
    assert_eq!(pong["result"]["kind"], "pong");

    let started = c
        .guest(
            "g1",
            &json!({"cmd": "start", "workload": "memdirty --mib 16 --mbps 20"}),
        )
        .await
        .unwrap();
    assert_eq!(started["ok"], true, "{started}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let verify = c.guest("g1", &json!({"cmd": "verify"})).await.unwrap();
    assert_eq!(verify["result"]["ok"], true, "{verify}");

    let m = c.metrics("g1").await.unwrap();
    assert_eq!(m.vcpus.len(), 1);
    assert!(m.vcpu_cpu_ns > 0, "a booted guest used CPU");
    // The sampler (1 s period) has seen the busy guest by now.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let h = c.host().await.unwrap();
    assert!(h.load.vm_cpu_cores > 0.0, "{h:?}");

    let health = c.guest("g1", &json!({"cmd": "health"})).await.unwrap();
    assert_eq!(health["result"]["ok"], true, "{health}");
    let ram = v.info.memory_file.unwrap();
    assert!(ram.exists());
    c.delete_vm("g1").await.unwrap();
    assert!(!ram.exists());

    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
