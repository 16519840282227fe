//! The lifecycle beyond start and pause on real QEMU: a stop asks tern's guest to power
//! off and it does (graceful); a guest that ignores the request (firmware only) is
//! powered off after the timeout (forced), and other actions on it are refused (409)
//! meanwhile; disk data survives a graceful stop and a start; a reboot boots the guest
//! again and keeps it running; a guest suspended to disk on one agent is restored on
//! another that shares the store with its memory (the verifier's checksum) and its disk
//! (the `diskverify` pattern) intact; a restore from a damaged saved state fails and
//! leaves the VM suspended with its state.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tern_agent::client::AgentClient;
use tern_api::agent::{StopOutcome, StopRequest};
use tern_hv::disk::Store;
use tern_hv::{Action, VmState};

mod qemu_agent;
use qemu_agent::QemuAgent;

/// An agent named `name` whose VMs' disks and saved states go to `store`.
async fn agent(name: &str, store: &Store) -> QemuAgent {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    QemuAgent::start(name, dir, Some(store.clone()), Duration::from_secs(120)).await
}

/// A store of its own (not on /tmp: disks need O_DIRECT, which tmpfs may lack).
fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    (dir, store)
}

/// One guest request's result, retried while the guest boots or its channel reconnects.
async fn guest(c: &AgentClient, vm: &str, req: Value) -> Value {
    let t0 = Instant::now();
    loop {
        match c.guest(vm, &req).await {
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

/// The guest's verifier counter once it advanced past `after` with a good checksum.
async fn verified(c: &AgentClient, vm: &str, after: u64) -> u64 {
    let t0 = Instant::now();
    loop {
        if let Ok(v) = c.guest(vm, &json!({"cmd": "verify"})).await {
            assert_eq!(v["result"]["ok"], true, "checksum mismatch: {v}");
            let n = v["result"]["counter"].as_u64().unwrap_or(0);
            if n > after {
                return n;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the guest's counter did not advance past {after}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn status(e: tern_api::client::ClientError) -> (u16, String) {
    let text = e.to_string();
    (e.status().expect("an HTTP error"), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_is_graceful_when_the_guest_powers_off_and_forced_when_it_ignores_it() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let (_dir, store) = store();
    let a = agent("h1", &store).await;
    let c = &a.c;
    let v = c
        .create_vm(&a.vm("g1", json!({"disks": [{"name": "data", "size_mib": 8}]})))
        .await
        .unwrap();
    let pid = v.info.pid;
    guest(c, "g1", json!({"cmd": "ping"})).await;

    // A reboot boots the guest again and leaves it running.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = guest(c, "g1", json!({"cmd": "ping"})).await["uptime_s"]
        .as_f64()
        .unwrap();
    let v = c.act("g1", Action::Reboot).await.unwrap();
    assert_eq!(v.info.state, VmState::Running);
    assert!(v.info.pid.is_some() && v.info.pid != pid, "a new process");
    let after = guest(c, "g1", json!({"cmd": "ping"})).await["uptime_s"]
        .as_f64()
        .unwrap();
    assert!(
        after < before,
        "uptime {after} s after a reboot, {before} s before"
    );
    assert_eq!(c.show_vm("g1").await.unwrap().info.state, VmState::Running);

    // Disk data written before a graceful stop is there after the start.
    guest(
        c,
        "g1",
        json!({"cmd": "start", "workload": "diskverify --mib 4 --blocks-per-sec 200"}),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    guest(c, "g1", json!({"cmd": "stop", "workload": "diskverify"})).await;
    let done = guest(c, "g1", json!({"cmd": "disk-check"})).await;
    let written = done["written"].as_u64().unwrap();
    assert!(done["ok"] == true && written > 0, "{done}");

    let bad = StopRequest {
        timeout_s: Some(0),
        force: false,
    };
    let (code, text) = status(c.stop_vm("g1", &bad).await.unwrap_err());
    assert_eq!(code, 400, "{text}");
    let stopped = c.stop_vm("g1", &StopRequest::default()).await.unwrap();
    eprintln!("graceful stop took {} ms", stopped.took_ms);
    assert_eq!(stopped.stopped, StopOutcome::Graceful, "{stopped:?}");
    assert_eq!(stopped.vm.info.state, VmState::Stopped);
    assert!(stopped.took_ms < 30_000);
    assert!(store.disk_path("g1", "data").exists(), "the disk stays");

    // A stopped VM refuses what needs a running one, naming its state.
    for action in [
        Action::Pause,
        Action::Resume,
        Action::Reboot,
        Action::Suspend,
    ] {
        let (code, text) = status(c.act("g1", action).await.unwrap_err());
        assert_eq!(code, 409, "{action:?}: {text}");
        assert!(text.contains("stopped"), "{action:?}: {text}");
    }
    let (code, text) = status(c.stop_vm("g1", &StopRequest::default()).await.unwrap_err());
    assert_eq!(code, 409, "{text}");

    let v = c.act("g1", Action::Start).await.unwrap();
    assert_eq!(v.info.state, VmState::Running);
    let back = guest(
        c,
        "g1",
        json!({"cmd": "disk-check", "device": "/dev/vda", "mib": 4}),
    )
    .await;
    assert_eq!(back["ok"], true, "{back}");
    assert_eq!(back["counter"].as_u64(), Some(written), "{back}");
    let forced = c
        .stop_vm(
            "g1",
            &StopRequest {
                timeout_s: None,
                force: true,
            },
        )
        .await
        .unwrap();
    assert_eq!(forced.stopped, StopOutcome::Forced);
    assert_eq!(forced.vm.info.state, VmState::Stopped);

    // Firmware only: no operating system presses back the power button and no guest
    // agent answers, so the stop powers it off after the timeout.
    c.create_vm(&serde_json::from_value(json!({"id": "fw", "spec": {"memory_mib": 64}})).unwrap())
        .await
        .unwrap();
    let t0 = Instant::now();
    let stopping = {
        let c = c.clone();
        let req = StopRequest {
            timeout_s: Some(3),
            force: false,
        };
        tokio::spawn(async move { c.stop_vm("fw", &req).await })
    };
    // While the stop waits for the guest, other actions on the VM are refused.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (code, text) = status(c.act("fw", Action::Pause).await.unwrap_err());
    assert_eq!(code, 409, "{text}");
    assert!(text.contains("stop of it is under way"), "{text}");
    let ignored = stopping.await.unwrap().unwrap();
    assert_eq!(ignored.stopped, StopOutcome::Forced, "{ignored:?}");
    assert_eq!(ignored.vm.info.state, VmState::Stopped);
    assert!(ignored.took_ms >= 3_000, "{ignored:?}");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());

    c.delete_vm("g1").await.unwrap();
    c.delete_vm("fw").await.unwrap();
    assert!(!store.vm_dir("g1").exists(), "delete removes the disks");
    a.shut().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_suspended_on_one_host_resumes_on_another_with_memory_and_disk_intact() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let (_dir, store) = store();
    let a = agent("h1", &store).await;
    let b = agent("h2", &store).await;
    let vm = "s1";
    a.c.create_vm(&a.vm(vm, json!({"disks": [{"name": "data", "size_mib": 8}]})))
        .await
        .unwrap();
    guest(
        &a.c,
        vm,
        json!({"cmd": "start", "workload": "memdirty --mib 16 --mbps 20"}),
    )
    .await;
    guest(
        &a.c,
        vm,
        json!({"cmd": "start", "workload": "diskverify --mib 4 --blocks-per-sec 100"}),
    )
    .await;
    let mut counter = verified(&a.c, vm, 0).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Suspend on h1: no process, the state in the store.
    let s = a.c.suspend_vm(vm).await.unwrap();
    eprintln!(
        "suspend: {} ms, memory {} MiB, device state {} KiB",
        s.took_ms,
        s.memory_bytes >> 20,
        s.device_state_bytes >> 10
    );
    assert_eq!(s.vm.info.state, VmState::Suspended);
    assert_eq!(s.vm.info.pid, None);
    assert!(s.memory_bytes > 16 << 20, "{s:?}");
    assert!(s.device_state_bytes > 0, "{s:?}");
    assert!(store.has_saved_state(vm));
    let memory_file = s.vm.info.memory_file.clone().unwrap();
    assert!(!memory_file.exists(), "the tmpfs copy of RAM is freed");
    for action in [Action::Start, Action::Pause, Action::Resume] {
        let (code, text) = status(a.c.act(vm, action).await.unwrap_err());
        assert_eq!(code, 409, "{action:?}: {text}");
        assert!(text.contains("suspended"), "{action:?}: {text}");
    }
    let (code, text) = status(a.c.suspend_vm(vm).await.unwrap_err());
    assert_eq!(code, 409, "{text}");

    // Restore on h2, which never knew the VM: defined from the saved spec, same disks.
    let r = b.c.restore_vm(vm).await.unwrap();
    eprintln!(
        "restore elsewhere: {} ms, memory {} MiB",
        r.took_ms,
        r.memory_bytes >> 20
    );
    assert_eq!(r.vm.info.state, VmState::Running);
    assert_eq!(r.memory_bytes, s.memory_bytes);
    counter = verified(&b.c, vm, counter).await;
    let disk = guest(&b.c, vm, json!({"cmd": "disk-check"})).await;
    assert_eq!(disk["ok"], true, "{disk}");
    assert!(disk["counter"].as_u64().unwrap() > 0, "{disk}");
    assert!(!store.has_saved_state(vm), "removed once the guest runs");
    let left: Vec<_> = std::fs::read_dir(store.vm_dir(vm))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        left,
        vec!["data.qcow2".to_string()],
        "only the disk is left"
    );

    // h1's entry is a leftover: nothing to restore there.
    let (code, text) = status(a.c.restore_vm(vm).await.unwrap_err());
    assert_eq!(code, 409, "{text}");
    assert_eq!(
        a.c.show_vm(vm).await.unwrap().info.state,
        VmState::Suspended
    );

    // Suspended again, by h2: deleting h1's leftover entry keeps h2's saved state and
    // the disk.
    let s = b.c.suspend_vm(vm).await.unwrap();
    eprintln!("suspend: {} ms", s.took_ms);
    a.c.delete_vm(vm).await.unwrap();
    assert!(store.disk_path(vm, "data").exists());
    assert!(store.has_saved_state(vm));

    // A damaged device state fails the restore and leaves the VM suspended with its
    // saved state; the whole one then restores it on h2 itself.
    let device = store.saved_dir(vm).join(tern_hv::saved::DEVICE_STATE_FILE);
    let whole = std::fs::read(&device).unwrap();
    std::fs::write(&device, &whole[..whole.len() / 2]).unwrap();
    let (code, text) = status(b.c.restore_vm(vm).await.unwrap_err());
    assert!(code >= 500, "{code} {text}");
    assert_eq!(
        b.c.show_vm(vm).await.unwrap().info.state,
        VmState::Suspended
    );
    assert!(store.has_saved_state(vm), "given back: {text}");
    std::fs::write(&device, &whole).unwrap();
    let r = b.c.restore_vm(vm).await.unwrap();
    eprintln!("restore on the same host: {} ms", r.took_ms);
    assert_eq!(r.vm.info.state, VmState::Running);
    verified(&b.c, vm, counter).await;
    let disk = guest(&b.c, vm, json!({"cmd": "disk-check"})).await;
    assert_eq!(disk["ok"], true, "{disk}");

    b.c.delete_vm(vm).await.unwrap();
    assert!(!store.vm_dir(vm).exists(), "delete removes the disks");
    a.shut().await;
    b.shut().await;
}
