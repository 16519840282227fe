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

use std::time::Duration;

use common::disk::{in_two_host_lab, make_image, DiskLab as Lab};
use serde_json::json;
use tern_agent::vms::CreateVm;

const VM: &str = "disk1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_stays_on_the_shared_store_while_the_vm_moves() {
    in_two_host_lab("disk migration lab test", VM, |lab, img| async move {
        scenario(&lab, &img).await
    })
    .await;
}

async fn scenario(lab: &Lab, img: &tern_hv::image::GuestImage) {
    let store = lab.state.store_dir();
    make_image(&store.join("images/base.qcow2"), "8M");
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
