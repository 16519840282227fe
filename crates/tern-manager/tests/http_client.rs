//! The HTTP [`HostClient`] against real `tern agent` servers (sim driver) on port 0:
//! create, load report, migrate between two agents, delete, and a wrong token.

use std::sync::Arc;
use std::time::Duration;

use tern_agent::host::Capacity as AgentCapacity;
use tern_agent::{AppState, HostConfig};
use tern_hv::sim::SimDriver;
use tern_manager::client::http::HttpHost;
use tern_manager::client::HostClient;
use tern_manager::state::{Capacity, Host, HostState, MigrationResult, VmSpec};

const TOKEN: &str = "agent-token";

struct Agent {
    host: Host,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

async fn agent(name: &str) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let state = AppState::new(
        Arc::new(SimDriver::new()),
        HostConfig {
            name: name.into(),
            capacity: AgentCapacity {
                cpus: 4,
                memory_mib: 8192,
            },
            token: TOKEN.into(),
            state_dir: dir.path().to_path_buf(),
            image_dir: dir.path().join("images"),
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tern_agent::server::serve(listener, state, async {
        let _ = rx.await;
    }));
    Agent {
        host: Host {
            name: name.into(),
            address,
            capacity: Capacity {
                cpus: 4.0,
                memory_mib: 8192,
            },
            state: HostState::Active,
            last_heartbeat: None,
            cpu_used: None,
            cpu_smoothed: None,
            store_free_mib: None,
        },
        stop: Some(tx),
        _dir: dir,
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

fn spec() -> VmSpec {
    VmSpec::sized(1, 64)
}

fn names(r: &tern_manager::decide::LoadReport) -> Vec<&str> {
    r.vms.iter().map(|v| v.name.as_str()).collect()
}

#[tokio::test]
async fn the_http_client_drives_a_real_agent() {
    let (a, b) = (agent("a").await, agent("b").await);
    let ca = HttpHost::new(&a.host, TOKEN, Duration::from_secs(10)).unwrap();
    let cb = HttpHost::new(&b.host, TOKEN, Duration::from_secs(10)).unwrap();
    ca.create_vm("web-1", &spec(), None, false).await.unwrap();
    let report = ca.load_report().await.unwrap();
    assert_eq!(names(&report), ["web-1"]);
    assert!(report.cpu_used >= 0.0);

    let seen = std::sync::Mutex::new(Vec::new());
    let result = ca
        .migrate_vm(
            "web-1",
            &spec(),
            &b.host,
            tern_manager::state::PolicyKind::Adaptive,
            &|p| seen.lock().unwrap().push(p),
        )
        .await
        .unwrap();
    // Whatever the polls caught is a phase under way, its rounds never going back.
    let seen = seen.into_inner().unwrap();
    for p in &seen {
        assert!(!p.phase.is_final(), "{p:?}");
    }
    assert!(
        seen.windows(2).all(|w| w[0].round <= w[1].round),
        "{seen:?}"
    );
    let (on_a, on_b) = (
        ca.load_report().await.unwrap(),
        cb.load_report().await.unwrap(),
    );
    match result {
        MigrationResult::Succeeded { .. } => {
            assert!(names(&on_a).is_empty(), "{on_a:?}");
            assert_eq!(names(&on_b), ["web-1"]);
        }
        MigrationResult::Failed { error } => {
            // The agent rolled back: the VM runs where it was and nowhere else.
            assert!(!error.is_empty());
            assert_eq!(names(&on_a), ["web-1"], "{error}");
            assert!(names(&on_b).is_empty(), "{error}");
        }
        MigrationResult::Running => panic!("the client waits for the end"),
    }

    for c in [&ca, &cb] {
        c.delete_vm("web-1").await.unwrap();
        // Deleting what is not there is not an error.
        c.delete_vm("web-1").await.unwrap();
        assert!(c.load_report().await.unwrap().vms.is_empty());
    }

    let wrong = HttpHost::new(&a.host, "nope", Duration::from_secs(10)).unwrap();
    let err = wrong.load_report().await.unwrap_err().to_string();
    assert!(err.contains("401"), "{err}");
    let bad = Host {
        address: "sim:".into(),
        ..a.host.clone()
    };
    assert!(HttpHost::new(&bad, TOKEN, Duration::from_secs(1)).is_err());
}
