//! What the disk lab tests share: a two-host lab with one VM of disks, moved between
//! the hosts while its guest writes the `diskverify` pattern.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tern_agent::client::AgentClient;
use tern_lab::LabState;

/// Whether the disk lab tests can run here: root, iproute2, QEMU, qemu-img and the
/// `tern` binary.
pub fn can_run(what: &str) -> bool {
    let (tern, built) = super::tern_binary_need();
    let qemu_img = std::process::Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    tern_testkit::require_lab(what, &[(&tern, built), ("qemu-img (qemu-utils)", qemu_img)])
}

/// The lab and VM `vm` in it.
pub struct DiskLab {
    pub state: LabState,
    pub hosts: Vec<AgentClient>,
    pub vm: &'static str,
}

impl DiskLab {
    /// Asks host `from` to move the VM to host `to`: the migration's id, or the
    /// refusal when the source gave up before it began.
    pub async fn send(&self, from: usize, to: usize) -> Result<String, String> {
        self.send_with(from, to, json!({})).await
    }

    /// [`DiskLab::send`] with migration `options`.
    pub async fn send_with(
        &self,
        from: usize,
        to: usize,
        options: Value,
    ) -> Result<String, String> {
        let body = json!({ "vm": self.vm, "destination": self.state.hosts[to].url, "token": "", "policy": "adaptive", "options": options });
        let sent: Result<Value, _> = self.hosts[from]
            .http()
            .send(Method::POST, "/v1/migrations", Some(&body))
            .await;
        sent.map(|v| v["id"].as_str().unwrap().to_string())
            .map_err(|e| e.to_string())
    }

    /// The migration's status on host `host`.
    pub async fn status(&self, host: usize, id: &str) -> Value {
        self.hosts[host]
            .http()
            .get(&format!("/v1/migrations/{id}"))
            .await
            .unwrap()
    }

    /// Waits until the migration completed or was rolled back; its last status.
    pub async fn finish(&self, host: usize, id: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.status(host, id).await;
            if matches!(s["phase"].as_str(), Some("completed" | "rolled_back")) {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "migration stuck: {s}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One guest request, retried while the guest boots or its channel reconnects
    /// after a move.
    pub async fn guest(&self, host: usize, req: Value) -> Value {
        let t0 = Instant::now();
        loop {
            match self.hosts[host].guest(self.vm, &req).await {
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
    pub async fn disk_ok(&self, host: usize, after: u64) -> u64 {
        let r = self.guest(host, json!({"cmd": "disk-check"})).await;
        eprintln!("disk on h{}: {r}", host + 1);
        assert_eq!(r["ok"], true, "disk check on h{}: {r}", host + 1);
        let counter = r["counter"].as_u64().unwrap();
        assert!(counter > after, "no new writes: {counter} <= {after}");
        counter
    }

    pub async fn has_vm(&self, host: usize) -> bool {
        self.hosts[host]
            .list_vms()
            .await
            .unwrap()
            .iter()
            .any(|v| v.info.id == self.vm)
    }
}

/// Makes a blank qcow2 image of `size` (`qemu-img` size, e.g. `8M`) at `path`.
pub fn make_image(path: &std::path::Path, size: &str) {
    let made = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size)
        .status()
        .unwrap();
    assert!(made.success());
}

/// Runs `scenario` on a fresh two-host lab with VM `vm` and the test guest image, then
/// takes the lab down whatever the scenario did; its panic is the test's. Returns at
/// once (the test passes) when `can_run(what)` says the lab cannot run here.
pub async fn in_two_host_lab<F, Fut>(what: &str, vm: &'static str, scenario: F)
where
    F: FnOnce(DiskLab, tern_hv::image::GuestImage) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    if !can_run(what) {
        return;
    }
    let img = tern_hv::image::ensure_image_async(tern_testkit::test_cache_dir(), |s| {
        eprintln!("image: {s}")
    })
    .await
    .expect("guest image builds");
    let dir = tempfile::tempdir().unwrap();
    let (state, hosts) = super::two_hosts(&dir, 1024).await;
    let lab_dir = state.dir.clone();
    let lab = DiskLab { state, hosts, vm };
    let outcome = tokio::spawn(scenario(lab, img)).await;
    tern_lab::down(&lab_dir, &|s| eprintln!("{s}"))
        .await
        .expect("lab down");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
