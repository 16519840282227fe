//! An agent with the QEMU driver served on a loopback port, for the tests that boot
//! tern's guest image through the API.

#![allow(dead_code)] // each test binary uses its own part

use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tern_agent::client::AgentClient;
use tern_agent::host::Capacity;
use tern_agent::vms::CreateVm;
use tern_agent::{AppState, HostConfig};
use tern_hv::disk::Store;
use tern_hv::qemu::{QemuConfig, QemuDriver};

pub struct QemuAgent {
    pub c: AgentClient,
    pub img: tern_hv::image::GuestImage,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), tern_agent::AgentError>>,
    pub dir: tempfile::TempDir,
}

impl QemuAgent {
    /// Host `name` with its state in `dir`, answering within `timeout`; its VMs' disks
    /// go to `store` when there is one.
    pub async fn start(
        name: &str,
        dir: tempfile::TempDir,
        store: Option<Store>,
        timeout: Duration,
    ) -> QemuAgent {
        QemuAgent::start_bridged(name, dir, store, None, timeout).await
    }

    /// [`QemuAgent::start`] whose VMs' NICs are taps on `bridge`.
    pub async fn start_bridged(
        name: &str,
        dir: tempfile::TempDir,
        store: Option<Store>,
        bridge: Option<String>,
        timeout: Duration,
    ) -> QemuAgent {
        QemuAgent::start_watching(name, dir, store, bridge, Default::default(), timeout).await
    }

    /// A bridge of its own holding `host_addr` (see [`Bridge::new`]) and an agent whose
    /// VMs' NICs are on it; `None` (after saying why) without root, which a bridge needs.
    pub async fn on_new_bridge(prefix: &str, host_addr: &str) -> Option<(Bridge, QemuAgent)> {
        if !tern_testkit::is_root() {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            eprintln!("SKIP: a bridge for the guest's NIC needs root");
            return None;
        }
        let bridge = Bridge::new(prefix, host_addr);
        let a = QemuAgent::start_bridged(
            "h1",
            tempfile::tempdir().unwrap(),
            None,
            Some(bridge.0.clone()),
            Duration::from_secs(30),
        )
        .await;
        Some((bridge, a))
    }

    /// [`QemuAgent::start_bridged`] that watches its guests' health with `watch`.
    pub async fn start_watching(
        name: &str,
        dir: tempfile::TempDir,
        store: Option<Store>,
        bridge: Option<String>,
        watch: tern_agent::watch::WatchConfig,
        timeout: Duration,
    ) -> QemuAgent {
        let img = tern_hv::image::ensure_image_async(tern_testkit::test_cache_dir(), |s| {
            eprintln!("image: {s}")
        })
        .await
        .expect("guest image builds");
        let mut cfg = QemuConfig::new(dir.path().join("run"), dir.path().join("mem"), bridge);
        cfg.store = store.clone();
        let mut state = AppState::new(
            Arc::new(QemuDriver::new(cfg)),
            HostConfig {
                name: name.into(),
                capacity: Capacity {
                    cpus: 2,
                    memory_mib: 1024,
                },
                token: "t".into(),
                state_dir: dir.path().to_path_buf(),
                image_dir: tern_testkit::test_cache_dir(),
            },
        );
        if let Some(store) = store {
            state = state.with_store(store);
        }
        let state = state.with_guest_watch(watch);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tern_agent::server::serve(listener, state, async {
            let _ = rx.await;
        }));
        let c = AgentClient::new(&url, "t", timeout).unwrap();
        QemuAgent {
            c,
            img,
            stop,
            server,
            dir,
        }
    }

    /// A VM `id` of 256 MiB booting tern's guest image, `extra` merged into its spec.
    pub fn vm(&self, id: &str, extra: Value) -> CreateVm {
        let mut spec = json!({
            "memory_mib": 256,
            "kernel": self.img.kernel,
            "initramfs": self.img.initramfs,
            "cmdline": format!("{} tern.hostname={id}", self.img.cmdline),
        });
        for (k, v) in extra.as_object().into_iter().flatten() {
            spec[k] = v.clone();
        }
        serde_json::from_value(json!({ "id": id, "spec": spec })).unwrap()
    }

    pub async fn shut(self) {
        self.stop.send(()).unwrap();
        self.server.await.unwrap().unwrap();
    }
}

/// A bridge of its own (`PREFIX` and this process's id) holding `host_addr`/24, the
/// host's end of a guest subnet; deleted on drop.
pub struct Bridge(pub String);

impl Bridge {
    pub fn new(prefix: &str, host_addr: &str) -> Bridge {
        let name = format!("{prefix}{}", std::process::id() % 100_000);
        let _ = ip(&["link", "del", &name]);
        ip(&["link", "add", "name", &name, "type", "bridge"]).unwrap();
        let b = Bridge(name);
        ip(&["addr", "add", &format!("{host_addr}/24"), "dev", &b.0]).unwrap();
        ip(&["link", "set", &b.0, "up"]).unwrap();
        b
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.0]);
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
