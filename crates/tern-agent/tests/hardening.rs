//! Certificate roles on an agent: another host's certificate cannot drive it. (Slow
//! clients and callers without a cluster certificate are probed against the lab in the
//! fault suite, `tern bench faults`.)

use std::sync::Arc;
use std::time::Duration;

use tern_agent::host::Capacity;
use tern_agent::server::Serving;
use tern_agent::{AppState, HostConfig};
use tern_hv::sim::SimDriver;
use tern_pki::ca::{Ca, Role};
use tern_pki::tls::{client_config, server_config, ClientAuth};
use tern_pki::TlsAcceptor;
use tokio::net::TcpListener;

fn state(dir: &std::path::Path) -> AppState {
    AppState::new(
        Arc::new(SimDriver::new()),
        HostConfig {
            name: "h1".into(),
            capacity: Capacity {
                cpus: 4,
                memory_mib: 4096,
            },
            token: "s3cret".into(),
            state_dir: dir.to_path_buf(),
            image_dir: dir.join("images"),
        },
    )
}

/// Today's hole: any certificate of the cluster CA could call any agent route, so one
/// host (or whoever took its key) could destroy another host's VMs or send them away.
/// Now a host's certificate reaches only the destination's incoming-migration routes.
#[tokio::test]
async fn another_hosts_certificate_cannot_drive_an_agent() {
    let dir = tempfile::tempdir().unwrap();
    let ca_dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(ca_dir.path()).unwrap();
    let host = ca
        .issue(Role::Host, "h1", &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = Serving {
        tls: Some(TlsAcceptor::new(
            server_config(&host, None, ClientAuth::Required).unwrap(),
        )),
        ..Default::default()
    };
    let st = state(dir.path()).with_tls(client_config(&host.ca_pem, Some(&host), None).unwrap());
    tokio::spawn(tern_agent::server::serve_with(
        listener,
        st,
        serving,
        std::future::pending(),
    ));
    let as_ = |role, name: &str| {
        let id = ca.issue(role, name, &[]).unwrap();
        reqwest::Client::builder()
            .use_preconfigured_tls(client_config(ca.cert_pem(), Some(&id), None).unwrap())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let (other_host, manager, operator) = (
        as_(Role::Host, "h2"),
        as_(Role::Manager, "manager"),
        as_(Role::Operator, "alice"),
    );
    let url = |path: &str| format!("https://{addr}{path}");
    let vm = serde_json::json!({"id": "v1", "spec": {"vcpus": 1, "memory_mib": 64}});
    for c in [&manager, &operator] {
        let r = c.get(url("/v1/vms")).send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = manager.post(url("/v1/vms")).json(&vm).send().await.unwrap();
    assert_eq!(r.status(), 201, "{:?}", r.text().await);

    let refused = [
        other_host.get(url("/v1/vms")).send().await.unwrap(),
        other_host.get(url("/v1/host")).send().await.unwrap(),
        other_host.delete(url("/v1/vms/v1")).send().await.unwrap(),
        other_host.post(url("/v1/vms/v1/stop")).send().await.unwrap(),
        other_host.get(url("/v1/migrations")).send().await.unwrap(),
        other_host
            .post(url("/v1/migrations"))
            .json(&serde_json::json!({"vm": "v1", "destination": "https://127.0.0.1:1", "token": "t"}))
            .send()
            .await
            .unwrap(),
    ];
    for r in refused {
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["kind"], "forbidden", "{body}");
    }
    let r = manager.get(url("/v1/vms/v1")).send().await.unwrap();
    assert_eq!(r.status(), 200, "the VM was touched");
    // The destination's routes take a host: past the role check, an unknown migration.
    let r = other_host
        .get(url("/v1/incoming/in-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}
