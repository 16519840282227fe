//! The QEMU driver against a real QEMU with no kernel (the guest runs its BIOS): lifecycle,
//! metrics from real vCPU threads, the shared RAM file, and a device-state-only migration
//! between two QEMUs with `x-ignore-shared` after copying the RAM file by hand, also into
//! a destination whose memory came before its QEMU started.

use std::time::Duration;
use tern_hv::qemu::{QemuConfig, QemuDriver};
use tern_hv::{HvError, Hypervisor, MigrationState, VmSpec, VmState};

fn driver(dir: &std::path::Path) -> QemuDriver {
    QemuDriver::new(QemuConfig::new(dir.join("run"), dir.join("mem"), None))
}

fn spec(mib: u64, vcpus: u32) -> VmSpec {
    serde_json::from_value(serde_json::json!({ "vcpus": vcpus, "memory_mib": mib })).unwrap()
}

#[tokio::test]
async fn lifecycle_metrics_and_ram_file() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let info = d.create("vm1", spec(64, 2), false).await.unwrap();
    assert_eq!(info.state, VmState::Created);
    let ram = info.memory_file.clone().unwrap();
    assert_eq!(std::fs::metadata(&ram).unwrap().len(), 64 << 20);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&ram).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "guest memory is for this user only: {mode:o}");
    }

    assert_eq!(d.start("vm1").await.unwrap().state, VmState::Running);
    let threads = d.vcpu_threads("vm1").await.unwrap();
    assert_eq!(threads.len(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = d.metrics("vm1").await.unwrap();
    assert_eq!(m.vcpus.len(), 2);
    assert_eq!(m.memory_bytes, 64 << 20);
    assert!(m.rss_bytes > 0);
    assert_eq!(m.vcpu_cpu_ns, m.vcpus.iter().map(|v| v.cpu_ns).sum::<u64>());

    assert_eq!(d.pause("vm1").await.unwrap().state, VmState::Paused);
    assert_eq!(d.refresh("vm1").await.unwrap().state, VmState::Paused);
    assert!(matches!(
        d.pause("vm1").await,
        Err(HvError::Conflict { .. })
    ));
    assert_eq!(d.resume("vm1").await.unwrap().state, VmState::Running);
    assert_eq!(d.stop("vm1").await.unwrap().state, VmState::Stopped);
    assert_eq!(d.info("vm1").await.unwrap().pid, None);
    // A stopped VM boots again.
    assert_eq!(d.start("vm1").await.unwrap().state, VmState::Running);
    d.destroy("vm1").await.unwrap();
    assert!(!ram.exists(), "RAM file removed");
    assert!(matches!(d.info("vm1").await, Err(HvError::UnknownVm(_))));
}

#[tokio::test]
async fn missing_kernel_changes_nothing() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let mut s = spec(64, 1);
    s.kernel = Some(dir.path().join("no-such-vmlinuz"));
    let err = d.create("vm1", s, false).await.unwrap_err();
    assert!(err.is_bad_input(), "{err}");
    assert!(d.list().await.unwrap().is_empty());
    assert!(!dir.path().join("run").exists(), "nothing written");
}

#[tokio::test]
async fn device_state_migration_with_shared_ram() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, s) = source_running_and_destination(dir.path()).await;
    let t = dst.create("vm", spec(64, 1), true).await.unwrap();
    assert_eq!(t.state, VmState::Incoming);
    assert_ne!(s.memory_file, t.memory_file, "each host its own RAM file");

    // What tern's engine does, in miniature: pause, copy RAM through the files, then let
    // QEMU carry only CPU and device state.
    let uri = listen_for_device_state(&src, &dst).await;
    src.pause("vm").await.unwrap();
    std::fs::copy(s.memory_file.unwrap(), t.memory_file.unwrap()).unwrap();
    carry_device_state(&src, &dst, &uri).await;
    assert_eq!(dst.resume("vm").await.unwrap().state, VmState::Running);
    src.destroy("vm").await.unwrap();
    dst.destroy("vm").await.unwrap();
}

/// Two drivers, `a` and `b`, each its own host; VM `vm` running its BIOS on `a`.
async fn source_running_and_destination(
    dir: &std::path::Path,
) -> (QemuDriver, QemuDriver, tern_hv::VmInfo) {
    let src = driver(&dir.join("a"));
    let dst = driver(&dir.join("b"));
    let s = src.create("vm", spec(64, 1), false).await.unwrap();
    src.start("vm").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    (src, dst, s)
}

/// Has `dst`'s VM listen for a device-state-only migration; its URI.
async fn listen_for_device_state(src: &QemuDriver, dst: &QemuDriver) -> String {
    for d in [src, dst] {
        d.set_migration_capabilities("vm", &[("x-ignore-shared", true)])
            .await
            .unwrap();
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let uri = format!("tcp:127.0.0.1:{port}");
    dst.migrate_incoming("vm", &uri).await.unwrap();
    uri
}

/// Migrates the paused `src` VM's device state to `dst` and waits until `dst` holds it.
async fn carry_device_state(src: &QemuDriver, dst: &QemuDriver, uri: &str) {
    src.migrate("vm", uri).await.unwrap();
    let mut status = src.query_migrate("vm").await.unwrap();
    for _ in 0..200 {
        if status.state.is_final() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        status = src.query_migrate("vm").await.unwrap();
    }
    assert_eq!(status.state, MigrationState::Completed, "{status:?}");
    assert!(
        status.transferred_bytes < 8 << 20,
        "RAM skipped: {} bytes",
        status.transferred_bytes
    );
    let mut state = dst.refresh("vm").await.unwrap().state;
    for _ in 0..100 {
        if state != VmState::Incoming {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        state = dst.refresh("vm").await.unwrap().state;
    }
    assert_eq!(state, VmState::Paused);
}

#[tokio::test]
async fn memory_written_before_the_destination_qemu_starts_is_what_it_runs() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (src, dst, s) = source_running_and_destination(dir.path()).await;
    let t = dst.define_incoming("vm", spec(64, 1)).await.unwrap();
    assert_eq!(
        (t.state, t.pid),
        (VmState::Incoming, None),
        "no process yet"
    );
    let ram = t.memory_file.clone().unwrap();
    let meta = std::fs::metadata(&ram).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "guest memory: owner only"
    );

    // The memory arrives before QEMU starts, written in place as tern's streams do.
    src.pause("vm").await.unwrap();
    let memory = std::fs::read(s.memory_file.as_ref().unwrap()).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(&ram).unwrap();
    std::io::Write::write_all(&mut f, &memory).unwrap();
    drop(f);
    let up = dst.launch("vm").await.unwrap();
    assert!(up.pid.is_some());
    assert_eq!(up.state, VmState::Incoming);
    assert!(
        std::fs::read(&ram).unwrap() == memory,
        "the starting QEMU left the memory it found as it was"
    );
    let uri = listen_for_device_state(&src, &dst).await;
    carry_device_state(&src, &dst, &uri).await;
    assert_eq!(dst.resume("vm").await.unwrap().state, VmState::Running);
    src.destroy("vm").await.unwrap();
    dst.destroy("vm").await.unwrap();
}

#[tokio::test]
async fn a_destination_whose_qemu_cannot_start_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = QemuConfig::new(dir.path().join("run"), dir.path().join("mem"), None);
    cfg.binary = dir.path().join("no-such-qemu");
    let d = QemuDriver::new(cfg);
    let t = d.define_incoming("vm", spec(64, 1)).await.unwrap();
    let ram = t.memory_file.unwrap();
    assert!(ram.exists());
    assert!(matches!(
        d.define_incoming("vm", spec(64, 1)).await,
        Err(HvError::AlreadyExists(_))
    ));
    let err = d.launch("vm").await.unwrap_err();
    assert!(err.to_string().contains("no-such-qemu"), "{err}");
    assert!(matches!(d.info("vm").await, Err(HvError::UnknownVm(_))));
    assert!(!ram.exists(), "its memory file went with it");
}

#[tokio::test]
async fn reclaim_removes_what_a_killed_driver_left() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let first = driver(dir.path());
    let info = first.create("left", spec(32, 1), false).await.unwrap();
    let pid = info.pid.unwrap();
    // An agent killed with SIGKILL never drops its driver: its QEMU keeps running.
    std::mem::forget(first);
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());

    let second = driver(dir.path());
    assert!(
        second.reclaim("left").await.unwrap(),
        "the old QEMU was found"
    );
    for _ in 0..50 {
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty() || stat.contains(") Z"),
        "QEMU {pid} still runs"
    );
    assert!(!info.memory_file.unwrap().exists());
    assert!(
        !second.reclaim("left").await.unwrap(),
        "nothing left the second time"
    );
    // The id is free again.
    second.create("left", spec(32, 1), false).await.unwrap();
    second.destroy("left").await.unwrap();
}

/// The process group of `pid`, from `/proc/PID/stat`.
fn process_group(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    // Fields after the command: state, ppid, pgrp.
    after.split_whitespace().nth(2)?.parse().ok()
}

#[tokio::test]
async fn a_released_qemu_outlives_its_driver_and_a_new_driver_adopts_it() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let s = spec(64, 1);
    d.create("vm1", s.clone(), false).await.unwrap();
    let pid = d.start("vm1").await.unwrap().pid.unwrap();
    // QEMU has a process group of its own: a Ctrl-C to the agent's group misses it.
    assert_eq!(process_group(pid), Some(pid));
    assert_eq!(d.release().await, ["vm1"]);
    assert!(d.list().await.unwrap().is_empty(), "the driver let go");
    drop(d);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again = driver(dir.path());
    let (found, runstate) = again.left_behind("vm1").await.unwrap();
    assert_eq!(
        found,
        Some(pid),
        "QEMU outlived the driver that released it"
    );
    assert_eq!(runstate.as_deref(), Some("running"));
    let adopted = again.adopt("vm1", s).await.unwrap();
    assert_eq!((adopted.pid, adopted.state), (Some(pid), VmState::Running));
    again.destroy("vm1").await.unwrap();
    assert_eq!(again.left_behind("vm1").await.unwrap().0, None);
}
