//! tern's migration engine on real QEMU guests between two lab hosts (network
//! namespaces, 1 Gbit/s shaped links, one `tern agent` process each).
//!
//! One guest, booted once, runs `memdirty` and the verifier throughout and is moved
//! h1 → h2 (xen), h2 → h1 (qemu-rule), h1 → h2 (adaptive); after each move its counter
//! has advanced and its checksum matches. Moves broken on purpose (the destination's
//! QEMU or agent killed, its link cut) are cases of the fault suite (`tern-faults`).
//!
//! The lab is made as `tern lab up` makes it: a lab CA, agents serving mutual TLS only
//! and calling each other with their host certificates.
//!
//! Needs root, iproute2, QEMU and the `tern` binary of this build tree; without them it
//! says why and passes, except under `CI`, where it must run.

mod common;

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tern_agent::client::AgentClient;
use tern_lab::{self as lab, LabState};

const VM: &str = "mig1";

fn can_run() -> bool {
    let (tern, built) = common::tern_binary_need();
    tern_testkit::require_lab("migration lab test", &[(&tern, built)])
}

struct Lab {
    state: LabState,
    hosts: Vec<AgentClient>,
}

impl Lab {
    fn url(&self, i: usize) -> &str {
        &self.state.hosts[i].url
    }

    /// Starts a migration of the test VM from host `from` to host `to`; returns its id.
    async fn send(&self, from: usize, to: usize, policy: &str, options: Value) -> String {
        // The agents call each other with their host certificates: no token.
        let body = json!({ "vm": VM, "destination": self.url(to), "token": "", "policy": policy, "options": options });
        let v: Value = self.hosts[from]
            .http()
            .send(Method::POST, "/v1/migrations", Some(&body))
            .await
            .unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    async fn status(&self, host: usize, id: &str) -> Value {
        self.hosts[host]
            .http()
            .get(&format!("/v1/migrations/{id}"))
            .await
            .unwrap()
    }

    /// Waits until the migration reached `phase` (or finished).
    async fn wait_phase(&self, host: usize, id: &str, phase: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.status(host, id).await;
            let p = s["phase"].as_str().unwrap_or("");
            if p == phase || p == "completed" || p == "rolled_back" {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "migration stuck: {s}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One request to the guest agent. Retried for a while: the first request on a
    /// guest channel that just moved can go unanswered while virtio-serial reconnects.
    async fn guest(&self, host: usize, req: Value) -> Value {
        let t0 = Instant::now();
        let a = loop {
            match self.hosts[host].guest(VM, &req).await {
                Ok(a) => break a,
                Err(e) if t0.elapsed() < Duration::from_secs(40) => {
                    eprintln!("guest on h{}: {e}; retrying", host + 1)
                }
                Err(e) => panic!("guest on h{} does not answer: {e}", host + 1),
            }
        };
        assert_eq!(a["ok"], true, "{a}");
        a["result"].clone()
    }

    /// The guest's verifier counter, after checking it, its checksum and its health.
    async fn guest_ok(&self, host: usize, after: u64) -> u64 {
        let v = self.guest(host, json!({"cmd": "verify"})).await;
        assert_eq!(v["ok"], true, "checksum mismatch on h{}: {v}", host + 1);
        let counter = v["counter"].as_u64().unwrap();
        assert!(
            counter > after,
            "counter did not advance: {counter} <= {after}"
        );
        let h = self.guest(host, json!({"cmd": "health"})).await;
        assert_eq!(h["ok"], true, "guest console shows trouble: {h}");
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

/// The guest image, and a lab with two hosts running `scenario`, taken down whatever
/// the scenario's outcome.
async fn in_a_lab<F, Fut>(scenario: F)
where
    F: FnOnce(Lab, tern_hv::image::GuestImage) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let img = tern_hv::image::ensure_image_async(tern_testkit::test_cache_dir(), |s| {
        eprintln!("image: {s}")
    })
    .await
    .expect("guest image builds");
    let dir = tempfile::tempdir().unwrap();
    let lab = bring_up(&dir).await;
    let lab_dir = lab.state.dir.clone();
    let outcome = tokio::spawn(scenario(lab, img)).await;
    lab::down(&lab_dir, &|s| eprintln!("{s}"))
        .await
        .expect("lab down");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Creates the test VM on host 0 with `memory_mib`, waits until its guest agent
/// answers, and starts `workload` in it.
async fn boot(lab: &Lab, img: &tern_hv::image::GuestImage, memory_mib: u64, workload: &str) {
    common::boot_guest(&lab.hosts[0], img, VM, memory_mib).await;
    lab.guest(0, json!({"cmd": "start", "workload": workload}))
        .await;
}

async fn bring_up(dir: &tempfile::TempDir) -> Lab {
    let (state, hosts) = common::two_hosts(dir, 2048).await;
    Lab { state, hosts }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_moves_under_each_policy() {
    if !can_run() {
        return;
    }
    in_a_lab(|lab, img| async move { scenario(&lab, &img).await }).await;
}

async fn scenario(lab: &Lab, img: &tern_hv::image::GuestImage) {
    boot(lab, img, 256, "memdirty --mib 32 --mbps 20").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut counter = lab.guest_ok(0, 0).await;

    // Three moves, one per policy; the guest is checked on its new host each time.
    let mut at = 0usize;
    for policy in ["xen", "qemu-rule", "adaptive"] {
        let to = 1 - at;
        let id = lab.send(at, to, policy, json!({})).await;
        let s = lab.wait_phase(at, &id, "completed").await;
        assert_eq!(s["phase"], "completed", "{policy}: {s}");
        let r = &s["result"];
        eprintln!("{policy}: h{} -> h{}: {r}", at + 1, to + 1);
        assert_eq!(r["policy"], policy.trim_end_matches("-rule"));
        assert!(r["downtime_ms"].as_u64().unwrap() < 5_000, "{r}");
        assert!(
            !lab.has_vm(at).await,
            "the source kept its copy after {policy}"
        );
        counter = lab.guest_ok(to, counter).await;
        at = to;
    }
    assert_eq!(at, 1);
}
