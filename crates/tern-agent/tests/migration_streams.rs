//! The migration's streams between two real agents on loopback, each with the QEMU
//! driver: a real guest moves with tern's engine and with `qemu-native`, QEMU's stream
//! relayed over tern's authenticated device-state stream both times. (Strangers on the
//! migration port are probed against the lab in the fault suite, `tern bench faults`.)

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tern_agent::client::AgentClient;
use tern_agent::host::Capacity;
use tern_agent::migration::session::{Phase, SendRequest};
use tern_agent::vms::CreateVm;
use tern_agent::{AppState, HostConfig};
use tern_hv::qemu::{QemuConfig, QemuDriver};

const TOKEN: &str = "t";

/// One agent serving on 127.0.0.1 until dropped.
struct Agent {
    url: String,
    client: AgentClient,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), tern_agent::error::AgentError>>>,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn start(name: &str) -> Agent {
        Agent::start_with(name, None).await
    }

    /// With `ca`: the agent has a host identity from it, serves mutual TLS and moves
    /// memory and device state over mutual TLS; it is called with an operator's
    /// certificate.
    async fn start_with(name: &str, ca: Option<&tern_pki::ca::Ca>) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let hv = QemuDriver::new(QemuConfig::new(
            dir.path().join("run"),
            dir.path().join("mem"),
            None,
        ));
        let host = HostConfig {
            name: name.into(),
            capacity: Capacity {
                cpus: 2,
                memory_mib: 1024,
            },
            token: TOKEN.into(),
            state_dir: dir.path().to_path_buf(),
            image_dir: tern_testkit::test_cache_dir(),
        };
        let mut state = AppState::new(Arc::new(hv), host);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let mut serving = tern_agent::server::Serving::default();
        let (url, client) = match ca {
            None => {
                let url = format!("http://{addr}");
                let client = AgentClient::new(&url, TOKEN, Duration::from_secs(30)).unwrap();
                (url, client)
            }
            Some(ca) => {
                use tern_pki::ca::Role;
                use tern_pki::tls::{client_config, server_config, ClientAuth};
                let id = ca.issue(Role::Host, name, &[addr.ip()]).unwrap();
                let server = server_config(&id, None, ClientAuth::Required).unwrap();
                let own = client_config(&id.ca_pem, Some(&id), None).unwrap();
                state = state.with_tls(own).with_stream_tls(server.clone());
                serving.tls = Some(tern_pki::TlsAcceptor::new(server));
                let op = ca.issue(Role::Operator, "op", &[]).unwrap();
                let op = client_config(&id.ca_pem, Some(&op), None).unwrap();
                let url = format!("https://{addr}");
                let client =
                    AgentClient::new_tls(&url, "", Duration::from_secs(30), Some(op)).unwrap();
                (url, client)
            }
        };
        let server = tokio::spawn(tern_agent::server::serve_with(
            listener,
            state,
            serving,
            async {
                let _ = rx.await;
            },
        ));
        Agent {
            url,
            client,
            stop: Some(stop),
            server: Some(server),
            _dir: dir,
        }
    }

    /// Stops serving; the agent destroys its VMs on the way out.
    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            s.await.unwrap().unwrap();
        }
    }
}

async fn image() -> Option<tern_hv::image::GuestImage> {
    if !tern_testkit::require_qemu() {
        return None;
    }
    let img = tern_hv::image::ensure_image_async(tern_testkit::test_cache_dir(), |s| {
        eprintln!("image: {s}")
    })
    .await
    .expect("guest image builds");
    Some(img)
}

fn guest_spec(img: &tern_hv::image::GuestImage, id: &str) -> CreateVm {
    serde_json::from_value(json!({
        "id": id,
        "spec": {
            "vcpus": 1,
            "memory_mib": 128,
            "kernel": img.kernel,
            "initramfs": img.initramfs,
            "cmdline": format!("{} tern.hostname={id}", img.cmdline),
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_moves_through_the_authenticated_streams_with_either_engine() {
    let (a, b) = (Agent::start("h1").await, Agent::start("h2").await);
    moves_both_ways(a, b, "g1").await;
}

/// The same between agents with host identities: memory and device state cross over
/// mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_moves_over_mutual_tls_between_agents_with_host_identities() {
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = tern_pki::ca::Ca::init(ca_dir.path()).unwrap();
    let a = Agent::start_with("h1", Some(&ca)).await;
    let b = Agent::start_with("h2", Some(&ca)).await;
    // Another VM name: the two tests may run at once on this host.
    moves_both_ways(a, b, "g2").await;
}

/// A guest moves `a` to `b` with `adaptive` (dirtying memory) and back with `qemu-native`
/// (memory writer stopped), its counter advancing and checksum matching after each.
async fn moves_both_ways(a: Agent, b: Agent, vm: &str) {
    let Some(img) = image().await else { return };
    a.client.create_vm(&guest_spec(&img, vm)).await.unwrap();
    let t0 = Instant::now();
    while a.client.guest(vm, &json!({"cmd": "ping"})).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "guest never answered"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let start = json!({"cmd": "start", "workload": "memdirty --mib 16 --mbps 20"});
    a.client.guest(vm, &start).await.unwrap();
    let mut counter = verified(&a.client, vm, 0).await;
    for (from, to, policy) in [(&a, &b, "adaptive"), (&b, &a, "qemu-native")] {
        if policy == "qemu-native" {
            // QEMU's own pre-copy loses guests that dirty memory fast during the move on
            // emulated CPUs (docs/migration.md); this leg tests the relay of its stream,
            // so the guest keeps only its verifier running.
            let stop = json!({"cmd": "stop", "workload": "memdirty"});
            from.client.guest(vm, &stop).await.unwrap();
        }
        let req = SendRequest {
            vm: vm.parse().unwrap(),
            destination: to.url.clone(),
            token: TOKEN.into(),
            policy: policy.parse().unwrap(),
            options: Default::default(),
        };
        let id = from.client.send_migration(&req).await.unwrap().id;
        let t0 = Instant::now();
        let v = loop {
            let v = from.client.show_migration(&id).await.unwrap();
            if v.phase.is_final() {
                break v;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "stuck: {v:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(v.phase, Phase::Completed, "{policy}: {v:?}");
        eprintln!("{policy}: {:?}", v.result);
        counter = verified(&to.client, vm, counter).await;
    }
    a.stop().await;
    b.stop().await;
}

/// The guest's verifier counter once it advanced past `after` with a good checksum.
/// Retried: the first request on a guest channel that just moved can go unanswered.
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
            t0.elapsed() < Duration::from_secs(40),
            "the guest's counter did not advance past {after}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
