//! VM disks through the agent on real QEMU: bad disk specs are refused and leave nothing
//! in the store; a guest with an overlay disk and a blank one writes the `diskverify`
//! pattern, keeps it across stop and start, and deleting the VM deletes its disk files
//! but not the image they started from. A `virtio_scsi` disk is `/dev/sda` beside a
//! `virtio_blk` `/dev/vda`, and keeps its data across stop and start too.

use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use tern_agent::vms::CreateVm;
use tern_hv::disk::Store;
use tern_hv::{Action, VmState};

mod qemu_agent;
use qemu_agent::QemuAgent;

/// An agent whose VMs' disks go to a store of its own.
struct Agent {
    a: QemuAgent,
    store: Store,
}

impl std::ops::Deref for Agent {
    type Target = QemuAgent;
    fn deref(&self) -> &QemuAgent {
        &self.a
    }
}

impl Agent {
    async fn start() -> Agent {
        // Not /tmp: the store needs O_DIRECT, which tmpfs may lack.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let a = QemuAgent::start("h1", dir, Some(store.clone()), Duration::from_secs(60)).await;
        Agent { a, store }
    }

    fn vm(&self, id: &str, disks: Value) -> CreateVm {
        self.a.vm(id, json!({ "disks": disks }))
    }

    /// One guest request, retried while the guest boots.
    async fn guest(&self, vm: &str, req: Value) -> Value {
        let t0 = Instant::now();
        loop {
            match self.c.guest(vm, &req).await {
                Ok(a) => {
                    assert_eq!(a["ok"], true, "{a}");
                    return a["result"].clone();
                }
                Err(e) if t0.elapsed() < Duration::from_secs(90) => {
                    eprintln!("waiting for the guest: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("guest never answered: {e}"),
            }
        }
    }

    /// Stops `vm`'s `diskverify`, stops and starts the VM, and reads `device` back:
    /// every write counted durable before the stop is there, and none after it.
    async fn writes_survive_stop_and_start(&self, vm: &str, device: &str, mib: u64) {
        self.guest(vm, json!({"cmd": "stop", "workload": "diskverify"}))
            .await;
        let done = self.guest(vm, json!({"cmd": "disk-check"})).await;
        let written = done["written"].as_u64().unwrap();
        assert!(done["ok"] == true && written > 0, "{done}");
        let v = self.c.act(vm, Action::Stop).await.unwrap();
        assert_eq!(v.info.state, VmState::Stopped);
        let v = self.c.act(vm, Action::Start).await.unwrap();
        assert_eq!(v.info.state, VmState::Running);
        let back = self
            .guest(
                vm,
                json!({"cmd": "disk-check", "device": device, "mib": mib}),
            )
            .await;
        assert_eq!(back["ok"], true, "{back}");
        assert_eq!(back["counter"].as_u64(), Some(written), "{back}");
    }

    fn files(&self) -> Vec<String> {
        let mut out = Vec::new();
        walk(self.store.root(), self.store.root(), &mut out);
        out.sort();
        out
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            walk(root, &p, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

fn status(e: tern_api::client::ClientError) -> (u16, String) {
    let text = e.to_string();
    (e.status().expect("an HTTP error"), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_disk_specs_are_refused_and_nothing_is_made() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let a = Agent::start().await;
    let outside = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let secret = outside.path().join("secret.qcow2");
    std::fs::write(&secret, b"not yours").unwrap();
    std::os::unix::fs::symlink(&secret, a.store.images_dir().join("link.qcow2")).unwrap();
    let before = a.files();
    let free_mib = a.store.free_bytes().unwrap() >> 20;
    let cases = [
        (json!([{"name": "..", "size_mib": 8}]), 400, ".."),
        (json!([{"name": "a/b", "size_mib": 8}]), 400, "'/'"),
        (
            json!([{"name": "d", "image": "../../etc/passwd"}]),
            400,
            "image",
        ),
        (
            json!([{"name": "d", "image": "link.qcow2"}]),
            400,
            "outside",
        ),
        (
            json!([{"name": "d", "image": "missing.qcow2"}]),
            400,
            "not in this host's image store",
        ),
        (json!([{"name": "d"}]), 400, "size_mib"),
        (json!([{"name": "d", "size_mib": 1u64 << 30}]), 400, "limit"),
        (
            json!([{"name": "d", "size_mib": free_mib + 1024}]),
            400,
            "MiB are free",
        ),
        (
            json!([{"name": "d", "size_mib": 8}, {"name": "d", "size_mib": 8}]),
            400,
            "twice",
        ),
    ];
    for (disks, want, says) in cases {
        let e =
            a.c.create_vm(&a.vm("bad", disks.clone()))
                .await
                .unwrap_err();
        let (code, text) = status(e);
        assert_eq!(code, want, "{disks}: {text}");
        assert!(text.contains(says), "{disks}: {text}");
        assert_eq!(a.files(), before, "{disks} left files behind");
        assert!(a.c.list_vms().await.unwrap().is_empty());
    }
    // The oversize refusal names both numbers.
    let e =
        a.c.create_vm(&a.vm("bad", json!([{"name": "d", "size_mib": free_mib + 1024}])))
            .await
            .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains(&format!("need {} MiB", free_mib + 1024)),
        "{text}"
    );
    // A file of the same VM in the store (another host's VM of that name) is not overwritten.
    std::fs::create_dir_all(a.store.vm_dir("taken")).unwrap();
    std::fs::write(a.store.disk_path("taken", "d"), b"theirs").unwrap();
    let (code, text) = status(
        a.c.create_vm(&a.vm("taken", json!([{"name": "d", "size_mib": 8}])))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 409, "{text}");
    assert_eq!(
        std::fs::read(a.store.disk_path("taken", "d")).unwrap(),
        b"theirs"
    );
    a.a.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_data_survives_stop_and_start_and_goes_with_the_vm() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let a = Agent::start().await;
    // An image with content of its own: the overlay must show it until overwritten.
    let base = a.store.images_dir().join("base.qcow2");
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("16M")
        .status()
        .unwrap();
    assert!(made.success());
    let disks = json!([
        {"name": "root", "image": "base.qcow2", "size_mib": 32},
        {"name": "data", "size_mib": 8},
    ]);
    let v = a.c.create_vm(&a.vm("d1", disks)).await.unwrap();
    assert_eq!(v.info.state, VmState::Running);
    let root = a.store.disk_path("d1", "root");
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(&root)
        .output()
        .unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["backing-filename"], "../../images/base.qcow2",
        "{info}"
    );
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_eq!(info["virtual-size"], 32u64 << 20);

    a.guest(
        "d1",
        json!({"cmd": "start", "workload": "diskverify --mib 4 --blocks-per-sec 200"}),
    )
    .await;
    // The second disk is there too.
    let e = a
        .guest(
            "d1",
            json!({"cmd": "disk-check", "device": "/dev/vdb", "mib": 8}),
        )
        .await;
    assert_eq!(e["ok"], true, "{e}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = a.guest("d1", json!({"cmd": "disk-check"})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["counter"].as_u64().unwrap() > 0, "{r}");
    a.writes_survive_stop_and_start("d1", "/dev/vda", 4).await;
    assert!(root.exists(), "the disk is kept");

    a.c.delete_vm("d1").await.unwrap();
    assert!(!a.store.vm_dir("d1").exists(), "delete removes the disks");
    assert!(base.exists(), "the image stays");
    a.a.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtio_scsi_disk_is_a_scsi_disk_in_the_guest_and_keeps_its_data() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let a = Agent::start().await;
    // The SCSI disk comes first in the spec, yet the virtio-blk one is still /dev/vda.
    let disks = json!([
        {"name": "logs", "size_mib": 8, "bus": "virtio_scsi"},
        {"name": "root", "size_mib": 16},
    ]);
    let v = a.c.create_vm(&a.vm("s1", disks)).await.unwrap();
    assert_eq!(v.info.state, VmState::Running);
    let blk = a
        .guest(
            "s1",
            json!({"cmd": "disk-check", "device": "/dev/vda", "mib": 16}),
        )
        .await;
    assert_eq!(blk["ok"], true, "{blk}");
    // Wider than the 8 MiB SCSI disk: refused, so /dev/sda is that disk. (The kernel
    // scans the SCSI bus on its own time: the device may take a moment to appear.)
    let t0 = Instant::now();
    let e = loop {
        let e =
            a.c.guest(
                "s1",
                &json!({"cmd": "disk-check", "device": "/dev/sda", "mib": 9}),
            )
            .await
            .unwrap();
        if !e.to_string().contains("cannot open") || t0.elapsed() > Duration::from_secs(20) {
            break e;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(e["ok"], false, "{e}");
    assert!(e.to_string().contains("fewer than"), "{e}");
    a.guest(
        "s1",
        json!({"cmd": "start", "workload": "diskverify --device /dev/sda --mib 8 --blocks-per-sec 200"}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = a.guest("s1", json!({"cmd": "disk-check"})).await;
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["device"], "/dev/sda", "{r}");
    assert!(r["counter"].as_u64().unwrap() > 0, "{r}");
    a.writes_survive_stop_and_start("s1", "/dev/sda", 8).await;
    a.c.delete_vm("s1").await.unwrap();
    a.a.shut().await;
}
