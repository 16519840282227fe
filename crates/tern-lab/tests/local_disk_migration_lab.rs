//! A VM with a 1 GiB disk in h1's local store (`--local-store`, a folder only h1's
//! agent uses), live-migrated to h2: the source mirrors the disk over TLS-guarded NBD
//! into an overlay h2 makes in its own local store, and ends the mirror inside the
//! pause. The guest writes the `diskverify` pattern before and during the move; on h2
//! the disk holds every write counted and takes new ones, and h1's file is gone.
//!
//! Two moves that fail leave the guest running on h1 with its disk and nothing on h2:
//! one the destination refuses (its local store lacks the image), and one cancelled
//! while the mirror runs. During the latter, h2's NBD export is probed from outside:
//! h1's host certificate opens it, the operator's certificate, none, or plain NBD do
//! not.
//!
//! The same with `virtio_scsi` disks, one local and one shared, moved there and back.
//!
//! Needs root, iproute2, QEMU, qemu-img and the `tern` binary of this build tree;
//! without them it says why and passes, except under `CI`, where it must run.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::disk::{in_two_host_lab, make_image, DiskLab};
use serde_json::json;
use tern_agent::vms::CreateVm;

const VM: &str = "ldisk1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_disk_moves_with_the_vm() {
    in_two_host_lab("local disk migration lab test", VM, |lab, img| async move {
        scenario(&lab, &img).await
    })
    .await;
}

/// Host `i`'s local store.
fn local(lab: &DiskLab, i: usize) -> PathBuf {
    lab.state.hosts[i].local_store_dir()
}

/// Whether host `i`'s local store holds anything of the VM.
fn has_files(lab: &DiskLab, i: usize) -> bool {
    local(lab, i).join("vms").join(VM).exists()
}

async fn scenario(lab: &DiskLab, img: &tern_hv::image::GuestImage) {
    // The same image in both local stores: only what the guest writes travels.
    make_image(&local(lab, 0).join("images/base.qcow2"), "8M");
    let h2_image = local(lab, 1).join("images/base.qcow2");
    let req: CreateVm = serde_json::from_value(json!({
        "id": VM,
        "spec": {
            "memory_mib": 256,
            "kernel": img.kernel,
            "initramfs": img.initramfs,
            "cmdline": format!("{} tern.hostname={VM}", img.cmdline),
            "disks": [{"name": "root", "image": "base.qcow2", "size_mib": 1024, "store": "local"}],
        }
    }))
    .unwrap();
    lab.hosts[0].create_vm(&req).await.unwrap();
    let h1_disk = local(lab, 0).join("vms").join(VM).join("root.qcow2");
    assert!(h1_disk.is_file(), "the disk is made in h1's local store");
    assert!(
        !lab.state.store_dir().join("vms").join(VM).exists(),
        "nothing in the shared store"
    );
    lab.guest(
        0,
        json!({"cmd": "start", "workload": "diskverify --mib 64 --blocks-per-sec 2000"}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = lab.disk_ok(0, 0).await;

    // The destination lacks the image: it refuses, the guest runs on at the source.
    let refused = match lab.send(0, 1).await {
        Err(e) => e,
        Ok(id) => {
            let s = lab.finish(0, &id).await;
            assert_eq!(s["phase"], "rolled_back", "{s}");
            s.to_string()
        }
    };
    eprintln!("refused move: {refused}");
    assert!(
        refused.contains("not in this host's image store"),
        "{refused}"
    );
    assert!(lab.has_vm(0).await && !lab.has_vm(1).await);
    assert!(!has_files(lab, 1), "the refusing destination made no files");
    let still = lab.disk_ok(0, before).await;

    // Cancelled while the mirror follows the guest's writes (the memory held back by
    // a 8 Mbit/s cap): the source keeps its disk, h2 drops its copy. Meanwhile h2's
    // export lets in h1's host certificate only.
    make_image(&h2_image, "8M");
    let id = lab.send_with(0, 1, json!({"max_mbit": 8})).await.unwrap();
    let t0 = Instant::now();
    loop {
        let s = lab.status(0, &id).await;
        if s["phase"] == "pre_copy" {
            eprintln!("cancelling at: {} disks {}", s["phase"], s["disks"]);
            assert_eq!(s["disks"]["ready"], true, "{s}");
            break;
        }
        assert_ne!(s["phase"], "rolled_back", "{s}");
        assert!(t0.elapsed() < Duration::from_secs(60), "no mirror: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    export_admits_only_the_source(lab).await;
    lab.hosts[0].cancel_migration(&id).await.unwrap();
    let s = lab.finish(0, &id).await;
    assert_eq!(s["phase"], "rolled_back", "{s}");
    eprintln!("cancelled move: {}", s["error"]);
    assert!(lab.has_vm(0).await && !lab.has_vm(1).await);
    let t0 = Instant::now();
    while has_files(lab, 1) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "h2 kept its partial copy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let still = lab.disk_ok(0, still).await;

    // The real move, while the guest writes.
    let id = lab.send(0, 1).await.unwrap();
    let s = lab.finish(0, &id).await;
    assert_eq!(s["phase"], "completed", "{s}");
    eprintln!("moved: {} disks {}", s["result"], s["disks"]);
    assert_eq!(s["disks"]["ready"], true, "{s}");
    assert!(s["disks"]["copied_bytes"].as_u64().unwrap() > 0, "{s}");
    assert!(!lab.has_vm(0).await, "the source kept its copy");
    assert!(
        !h1_disk.exists(),
        "the source's local file outlived the move"
    );
    let h2_disk = local(lab, 1).join("vms").join(VM).join("root.qcow2");
    assert!(h2_disk.is_file(), "the disk is in h2's local store");
    let after = lab.disk_ok(1, still).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.disk_ok(1, after).await;

    lab.hosts[1].delete_vm(VM).await.unwrap();
    assert!(!h2_disk.exists(), "deleting the VM deletes its disk");
    assert!(h2_image.is_file(), "the image stays");
}

/// A VM with two `virtio_scsi` disks, a 64 MiB one in the local store (an overlay on
/// an image) and a 16 MiB blank one in the shared store, moved h1 → h2 while the guest writes to the local one, then back while
/// it writes to the shared one: each disk keeps every write counted, under the same
/// name in the guest, after each move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scsi_disks_move_with_the_vm() {
    in_two_host_lab(
        "scsi disk migration lab test",
        SCSI_VM,
        |lab, img| async move { scsi_scenario(&lab, &img).await },
    )
    .await;
}

const SCSI_VM: &str = "sdisk1";

async fn scsi_scenario(lab: &DiskLab, img: &tern_hv::image::GuestImage) {
    for i in 0..2 {
        make_image(&local(lab, i).join("images/base.qcow2"), "8M");
    }
    let req: CreateVm = serde_json::from_value(json!({
        "id": SCSI_VM,
        "spec": {
            "memory_mib": 256,
            "kernel": img.kernel,
            "initramfs": img.initramfs,
            "cmdline": format!("{} tern.hostname={SCSI_VM}", img.cmdline),
            "disks": [
                {"name": "root", "image": "base.qcow2", "size_mib": 64, "store": "local", "bus": "virtio_scsi"},
                {"name": "data", "size_mib": 16, "bus": "virtio_scsi"},
            ],
        }
    }))
    .unwrap();
    lab.hosts[0].create_vm(&req).await.unwrap();
    let shared_disk = lab
        .state
        .store_dir()
        .join("vms")
        .join(SCSI_VM)
        .join("data.qcow2");
    assert!(
        shared_disk.is_file(),
        "the data disk is in the shared store"
    );
    // The kernel names SCSI disks in the order its probes finish, not by target: find
    // which of sda and sdb is the 64 MiB local disk by asking for more than the other has.
    let (root_dev, data_dev) = scsi_devices(lab).await;
    lab.guest(
        0,
        json!({"cmd": "start", "workload": format!("diskverify --device {root_dev} --mib 32 --blocks-per-sec 500")}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = lab.disk_ok(0, 0).await;

    let id = lab.send(0, 1).await.unwrap();
    let s = lab.finish(0, &id).await;
    assert_eq!(s["phase"], "completed", "{s}");
    eprintln!(
        "local scsi disk moved: {} disks {}",
        s["result"], s["disks"]
    );
    assert!(s["disks"]["copied_bytes"].as_u64().unwrap() > 0, "{s}");
    let local_disk = |i| local(lab, i).join("vms").join(SCSI_VM).join("root.qcow2");
    assert!(!local_disk(0).exists() && local_disk(1).is_file());
    let after = lab.disk_ok(1, before).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    lab.disk_ok(1, after).await;
    lab.guest(1, json!({"cmd": "stop", "workload": "diskverify"}))
        .await;
    let done = lab.guest(1, json!({"cmd": "disk-check"})).await;
    let written = done["written"].as_u64().unwrap();
    assert!(done["ok"] == true && written > 0, "{done}");

    // Now the shared disk takes the writes, and the VM goes back (the local disk too).
    lab.guest(
        1,
        json!({"cmd": "start", "workload": format!("diskverify --device {data_dev} --mib 8 --blocks-per-sec 500")}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = lab.disk_ok(1, 0).await;
    let id = lab.send(1, 0).await.unwrap();
    let s = lab.finish(1, &id).await;
    assert_eq!(s["phase"], "completed", "{s}");
    eprintln!("moved back: {} disks {}", s["result"], s["disks"]);
    assert!(shared_disk.is_file(), "the shared disk stayed");
    lab.disk_ok(0, before).await;
    let root = lab
        .guest(
            0,
            json!({"cmd": "disk-check", "device": root_dev, "mib": 32}),
        )
        .await;
    assert_eq!(root["ok"], true, "{root}");
    assert_eq!(root["counter"].as_u64(), Some(written), "{root}");

    lab.hosts[0].delete_vm(SCSI_VM).await.unwrap();
    assert!(!shared_disk.exists() && !local_disk(0).exists());
}

/// The guest's names of the VM's two SCSI disks on h1, (64 MiB local, 16 MiB shared):
/// both hold 8 MiB, only the local one 32.
async fn scsi_devices(lab: &DiskLab) -> (&'static str, &'static str) {
    let names = ["/dev/sda", "/dev/sdb"];
    for d in names {
        let r = lab
            .guest(0, json!({"cmd": "disk-check", "device": d, "mib": 8}))
            .await;
        assert_eq!(r["ok"], true, "{d}: {r}");
    }
    let r = lab.hosts[0]
        .guest(
            SCSI_VM,
            &json!({"cmd": "disk-check", "device": names[0], "mib": 32}),
        )
        .await
        .unwrap();
    eprintln!("{} asked for 32 MiB: {r}", names[0]);
    match r["ok"].as_bool() {
        Some(true) => (names[0], names[1]),
        _ => {
            assert!(r.to_string().contains("fewer than"), "{r}");
            (names[1], names[0])
        }
    }
}

/// Probes h2's NBD export from outside (the lab's root namespace) with `qemu-img`:
/// h1's host certificate opens it; the operator's certificate, no certificate and no
/// TLS are refused.
async fn export_admits_only_the_source(lab: &DiskLab) {
    let h2 = &lab.state.hosts[1];
    let listening = std::process::Command::new("ip")
        .args(["netns", "exec", &h2.netns, "ss", "-ltnpH"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&listening.stdout);
    let local = text
        .lines()
        .find(|l| l.contains("qemu"))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or_else(|| panic!("no QEMU listens on h2: {text}"));
    let (ip, port) = local.rsplit_once(':').unwrap();
    assert_eq!(
        ip, h2.addr,
        "the export listens beyond the agent's address: {text}"
    );
    let addr = format!("driver=nbd,host={},port={port},export=root", h2.addr);
    let dir = tempfile::tempdir().unwrap();
    // QEMU's names for a client's files, from an identity directory.
    let creds = |name: &str, identity: Option<&std::path::Path>| {
        let d = dir.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let ca = lab.state.ca_dir.as_ref().unwrap().join("ca.pem");
        std::fs::copy(ca, d.join("ca-cert.pem")).unwrap();
        if let Some(id) = identity {
            std::fs::copy(id.join("cert.pem"), d.join("client-cert.pem")).unwrap();
            std::fs::copy(id.join("key.pem"), d.join("client-key.pem")).unwrap();
        }
        d
    };
    let info = |creds: Option<&std::path::Path>| {
        let mut c = std::process::Command::new("timeout");
        c.args(["10", "qemu-img", "info"]);
        let opts = match creds {
            Some(d) => {
                c.arg("--object").arg(format!(
                    "tls-creds-x509,id=t,dir={},endpoint=client",
                    d.display()
                ));
                format!("{addr},tls-creds=t")
            }
            None => addr.clone(),
        };
        let out = c.args(["--image-opts", &opts]).output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), said)
    };
    let source = creds("h1", Some(&lab.state.hosts[0].state_dir.join("tls")));
    let (ok, said) = info(Some(&source));
    assert!(
        ok && said.contains("1 GiB"),
        "h1 cannot open the export: {said}"
    );
    let operator = creds("operator", lab.state.hosts[0].tls_dir.as_deref());
    for (who, creds) in [
        ("the operator", Some(operator.as_path())),
        ("no certificate", Some(creds("nobody", None).as_path())),
        ("no TLS", None),
    ] {
        let (ok, said) = info(creds);
        eprintln!("export probed with {who}: {}", said.trim());
        assert!(!ok, "{who} opened h2's export: {said}");
    }
}

/// The figures for `docs/storage.md`: a VM with one 1 GiB disk (an overlay on an 8 MiB
/// image), in the local store and then in the shared one, moved h1 → h2 → h1 → h2
/// while its guest writes as fast as it can; each move's total time, downtime and the
/// bytes the mirror copied are printed. The guest first writes for
/// `TERN_DISK_FILL_S` seconds (default 20) over its first `TERN_DISK_MIB` MiB
/// (default 256). Run alone, under `chrt -f 10`:
/// `cargo test -p tern-lab --test local_disk_migration_lab -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand"]
async fn local_and_shared_1gib_disks_measured() {
    in_two_host_lab("local disk measurement", VM, |lab, img| async move {
        for store in ["local", "shared"] {
            measure(&lab, &img, store).await;
        }
    })
    .await;
}

async fn measure(lab: &DiskLab, img: &tern_hv::image::GuestImage, store: &str) {
    for i in 0..2 {
        let image = local(lab, i).join("images/base.qcow2");
        if !image.exists() {
            make_image(&image, "8M");
        }
    }
    let shared_image = lab.state.store_dir().join("images/base.qcow2");
    if !shared_image.exists() {
        make_image(&shared_image, "8M");
    }
    let req: CreateVm = serde_json::from_value(json!({
        "id": VM,
        "spec": {
            "memory_mib": 256,
            "kernel": img.kernel,
            "initramfs": img.initramfs,
            "cmdline": format!("{} tern.hostname={VM}", img.cmdline),
            "disks": [{"name": "root", "image": "base.qcow2", "size_mib": 1024, "store": store}],
        }
    }))
    .unwrap();
    lab.hosts[0].create_vm(&req).await.unwrap();
    let mib: u64 = std::env::var("TERN_DISK_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let workload = format!("diskverify --mib {mib} --blocks-per-sec 100000");
    lab.guest(0, json!({"cmd": "start", "workload": workload}))
        .await;
    let fill: u64 = std::env::var("TERN_DISK_FILL_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    tokio::time::sleep(Duration::from_secs(fill)).await;
    // The guest reads the whole region back for a check, which takes longer than a
    // guest request may above a few hundred MiB under TCG: larger regions are checked
    // by the moves completing only (the other test checks the data).
    let check = mib <= 256;
    let mut counter = if check { lab.disk_ok(0, 0).await } else { 0 };
    for (from, to) in [(0, 1), (1, 0), (0, 1)] {
        let id = lab.send(from, to).await.unwrap();
        let s = lab.finish(from, &id).await;
        assert_eq!(s["phase"], "completed", "{s}");
        let r = &s["result"];
        eprintln!(
            "MEASURED {store} 1 GiB disk h{} -> h{}: total {} ms, downtime {} ms (parts {}), memory {} MiB, disk copied {} MiB",
            from + 1,
            to + 1,
            r["total_ms"],
            r["downtime_ms"],
            r["downtime_parts_ms"],
            r["bytes"].as_u64().unwrap_or(0) >> 20,
            s["disks"]["copied_bytes"].as_u64().unwrap_or(0) >> 20,
        );
        if check {
            counter = lab.disk_ok(to, counter).await;
        }
    }
    lab.hosts[1].delete_vm(VM).await.unwrap();
}
