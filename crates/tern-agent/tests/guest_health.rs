//! Guest health on real guests: a guest whose kernel panics is reported `panicked`
//! (QEMU's pvpanic device holds it) within a bound, a guest that hangs (a real-time
//! busy loop on every CPU starves its guest agent) `unresponsive` within the agent's
//! silence bound, and a power cycle brings either back to `ok`.

use serde_json::json;
use std::time::{Duration, Instant};
use tern_agent::client::AgentClient;
use tern_agent::watch::WatchConfig;
use tern_api::health::GuestState;
use tern_hv::Action;

mod qemu_agent;
use qemu_agent::QemuAgent as Agent;

/// The silence bound the test asks of the agent: short, so the test is.
const SILENT: Duration = Duration::from_secs(6);

async fn agent() -> Agent {
    let watch = WatchConfig {
        every: Duration::from_secs(1),
        ping_timeout: Duration::from_secs(2),
        unresponsive_after: SILENT,
        boot_within: Some(Duration::from_secs(240)),
    };
    watch.check().unwrap();
    Agent::start_watching(
        "h1",
        tempfile::tempdir().unwrap(),
        None,
        None,
        watch,
        Duration::from_secs(30),
    )
    .await
}

/// Waits up to `within` for VM `id`'s guest to be reported `want`; how long it took
/// and the reason given.
async fn wait_state(
    c: &AgentClient,
    id: &str,
    want: GuestState,
    within: Duration,
) -> (Duration, String) {
    let t0 = Instant::now();
    let mut last = None;
    while t0.elapsed() < within {
        let v = c.show_vm(id).await.unwrap();
        if let Some(g) = &v.guest {
            if g.state == want {
                return (t0.elapsed(), g.reason.clone());
            }
        }
        last = v.guest;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("VM {id}: guest not {want} within {within:?}; last seen {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_and_a_hang_are_seen_and_a_power_cycle_clears_them() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let a = agent().await;
    let c = &a.c;
    let v = c.create_vm(&a.vm("p1", json!({"vcpus": 1}))).await.unwrap();
    let pid = v.info.pid;
    let (boot, _) = wait_state(c, "p1", GuestState::Ok, Duration::from_secs(240)).await;
    eprintln!("guest ok {boot:?} after create");

    // A kernel panic: answered first, then sysrq-c.
    let r = c.guest("p1", &json!({"cmd": "panic"})).await.unwrap();
    assert_eq!(r["result"]["kind"], "panicking", "{r}");
    let (took, reason) = wait_state(c, "p1", GuestState::Panicked, Duration::from_secs(30)).await;
    eprintln!("panic detected after {took:?}: {reason}");
    assert!(reason.contains("pvpanic"), "{reason}");
    assert!(took < Duration::from_secs(10), "panic seen after {took:?}");
    // QEMU holds the guest: the VM is still on, in the same process.
    let v = c.show_vm("p1").await.unwrap();
    assert_eq!(v.info.state, tern_hv::VmState::Running);
    assert_eq!(v.info.pid, pid);

    // A power cycle starts a new QEMU and a fresh watch.
    c.act("p1", Action::Reboot).await.unwrap();
    let v = c.show_vm("p1").await.unwrap();
    assert_ne!(v.info.pid, pid);
    let (back, _) = wait_state(c, "p1", GuestState::Ok, Duration::from_secs(240)).await;
    eprintln!("guest ok again {back:?} after the power cycle");

    // A hang: the guest agent is starved while QEMU runs on.
    let r = c.guest("p1", &json!({"cmd": "hang"})).await.unwrap();
    assert_eq!(r["result"]["kind"], "hanging", "{r}");
    let hung = Instant::now();
    let (took, reason) =
        wait_state(c, "p1", GuestState::Unresponsive, Duration::from_secs(60)).await;
    eprintln!("hang detected after {took:?} (bound {SILENT:?}): {reason}");
    assert!(hung.elapsed() > SILENT, "unresponsive only after the bound");
    assert!(
        took < SILENT + Duration::from_secs(10),
        "hang seen after {took:?}"
    );
    assert!(c.show_vm("p1").await.unwrap().info.pid.is_some());

    c.act("p1", Action::Reboot).await.unwrap();
    wait_state(c, "p1", GuestState::Ok, Duration::from_secs(240)).await;
    c.delete_vm("p1").await.unwrap();
    a.shut().await;
}
