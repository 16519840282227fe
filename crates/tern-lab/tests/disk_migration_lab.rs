//! A VM with a disk on the lab's shared store, live-migrated between two lab hosts
//! (network namespaces, one `tern agent` each, every agent given the same `--store`):
//! the guest writes the `diskverify` pattern on h1, moves to h2, and there the disk
//! holds every write counted before the move and takes new ones; the disk file never
//! moved. A move the destination refuses (it does not see the disk) leaves the guest
//! running on the source with its disk. Deleting the VM deletes the file.
//!
//! Needs root, iproute2, QEMU, qemu-img and the `tern` binary of this build tree;
//! without them it says why and passes, except under `CI`, where it must run.

mod common;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tern_agent::client::AgentClient;
use tern_agent::vms::CreateVm;
use tern_lab::{self as lab, LabState};

const VM: &str = "disk1";

fn can_run() -> bool {
    let (tern, built) = common::tern_binary_need();
    let qemu_img = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    tern_testkit::require_lab(
        "disk migration lab test",
        &[(&tern, built), ("qemu-img (qemu-utils)", qemu_img)],
    )
}

struct Lab {
    state: LabState,
    hosts: Vec<AgentClient>,
}

impl Lab {
    /// Asks host `from` to move the VM to host `to`: the migration's id, or the
    /// refusal when the source gave up before it began.
    async fn send(&self, from: usize, to: usize) -> Result<String, String> {
        let body = json!({ "vm": VM, "destination": self.state.hosts[to].url, "token": "", "policy": "adaptive" });
        let sent: Result<Value, _> = self.hosts[from]
            .http()
            .send(Method::POST, "/v1/migrations", Some(&body))
            .await;
        sent.map(|v| v["id"].as_str().unwrap().to_string())
            .map_err(|e| e.to_string())
    }

    /// Waits until the migration completed or was rolled back; its last status.
    async fn finish(&self, host: usize, id: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let s: Value = self.hosts[host]
                .http()
                .get(&format!("/v1/migrations/{id}"))
                .await
                .unwrap();
            if matches!(s["phase"].as_str(), Some("completed" | "rolled_back")) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "migration stuck: {s}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One guest request, retried while the guest boots or its channel reconnects
    /// after a move.
    async fn guest(&self, host: usize, req: Value) -> Value {
        let t0 = Instant::now();
        loop {
            match self.hosts[host].guest(VM, &req).await {
                Ok(a) => {
                    assert_eq!(a["ok"], true, "{a}");
                    return a["result"].clone();
                }
                Err(e) if t0.elapsed() < Duration::from_secs(90) => {
                    eprintln!("guest on h{}: {e}; retrying", host + 1);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("guest on h{} does not answer: {e}", host + 1),
            }
        }
    }

    /// Reads the disk back on `host`: every write counted so far must be there.
    async fn disk_ok(&self, host: usize, after: u64) -> u64 {
        let r = self.guest(host, json!({"cmd": "disk-check"})).await;
        eprintln!("disk on h{}: {r}", host + 1);
        assert_eq!(r["ok"], true, "disk check on h{}: {r}", host + 1);
        let counter = r["counter"].as_u64().unwrap();
        assert!(counter > after, "no new writes: {counter} <= {after}");
        counter
    }

    async fn has_vm(&self, host: usize) -> bool {
        self.hosts[host]
            .list_vms()
            .await
            .unwrap()
            .iter()
            .any(|v| v.info.id == VM)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_stays_on_the_shared_store_while_the_vm_moves() {
    if !can_run() {
        return;
    }
    let img = tern_hv::image::ensure_image_async(tern_testkit::test_cache_dir(), |s| {
        eprintln!("image: {s}")
    })
    .await
    .expect("guest image builds");
    let dir = tempfile::tempdir().unwrap();
    let (state, hosts) = common::two_hosts(&dir, 1024).await;
    let lab_dir = state.dir.clone();
    let lab = Lab { state, hosts };
    let outcome = tokio::spawn(async move { scenario(&lab, &img).await }).await;
    lab::down(&lab_dir, &|s| eprintln!("{s}"))
        .await
        .expect("lab down");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn scenario(lab: &Lab, img: &tern_hv::image::GuestImage) {
    let store = lab.state.store_dir();
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(store.join("images/base.qcow2"))
        .arg("8M")
        .status()
        .unwrap();
    assert!(made.success());
    let req: CreateVm = serde_json::from_value(json!({
        "id": VM,
        "spec": {
            "memory_mib": 256,
            "kernel": img.kernel,
            "initramfs": img.initramfs,
            "cmdline": format!("{} tern.hostname={VM}", img.cmdline),
            "disks": [{"name": "root", "image": "base.qcow2", "size_mib": 16}],
        }
    }))
    .unwrap();
    lab.hosts[0].create_vm(&req).await.unwrap();
    let disk = store.join("vms").join(VM).join("root.qcow2");
    assert!(disk.is_file(), "the disk is made in the shared store");
    lab.guest(
        0,
        json!({"cmd": "start", "workload": "diskverify --mib 4 --blocks-per-sec 100"}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = lab.disk_ok(0, 0).await;

    // A destination that does not see the disk refuses; the guest runs on at the
    // source with its disk. (The file is moved aside: the source's QEMU keeps it open.)
    let aside = disk.with_extension("aside");
    std::fs::rename(&disk, &aside).unwrap();
    let refused = match lab.send(0, 1).await {
        Err(e) => e,
        Ok(id) => {
            let s = lab.finish(0, &id).await;
            assert_eq!(s["phase"], "rolled_back", "{s}");
            s.to_string()
        }
    };
    std::fs::rename(&aside, &disk).unwrap();
    eprintln!("refused move: {refused}");
    assert!(refused.contains("not in this host's store"), "{refused}");
    assert!(lab.has_vm(0).await && !lab.has_vm(1).await);
    let still = lab.disk_ok(0, before).await;

    // The real move: memory and device state go, the disk file stays where it is.
    let id = lab.send(0, 1).await.unwrap();
    let s = lab.finish(0, &id).await;
    assert_eq!(s["phase"], "completed", "{s}");
    eprintln!("moved: {}", s["result"]);
    assert!(!lab.has_vm(0).await, "the source kept its copy");
    assert!(disk.is_file(), "the source's teardown kept the disk");
    let after = lab.disk_ok(1, still).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.disk_ok(1, after).await;

    lab.hosts[1].delete_vm(VM).await.unwrap();
    assert!(!disk.exists(), "deleting the VM deletes its disk");
    assert!(store.join("images/base.qcow2").is_file(), "the image stays");
}
