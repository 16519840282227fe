//! A manager serving TLS with the cluster CA, called by hosts with their own
//! certificates: a lease is renewed only by its host, a host's certificate is not an
//! API user, and a revoked host is refused by the running manager.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tern_manager::api::Serving;
use tern_manager::manager::system_clock;
use tern_manager::store::SqliteStore;
use tern_manager::Manager;
use tern_pki::tls::{client_config, server_config_with, ClientAuth};
use tern_pki::{Ca, Identity, Role, TlsAcceptor, Trust};

const TOKEN: &str = "t0ken";

struct Server {
    base: String,
    ca: Arc<Ca>,
    _dir: tempfile::TempDir,
}

async fn start(crl_refresh: Duration) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("tern.db")).unwrap();
    let manager = Arc::new(Manager::open(Box::new(store), system_clock()).unwrap());
    let ca = Arc::new(Ca::init(&dir.path().join("ca")).unwrap());
    let id = ca
        .issue(Role::Manager, "manager", &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let trust = Trust::new(ca.cert_pem(), Some(&ca.crl_pem().unwrap())).unwrap();
    let config = server_config_with(&id, &trust, ClientAuth::Optional).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("https://{}", listener.local_addr().unwrap());
    let serving = Serving {
        tls: Some(TlsAcceptor::new(config)),
        ca: Some(ca.clone()),
        trust: Some(trust),
        crl_refresh: Some(crl_refresh),
        ..Serving::default()
    };
    tokio::spawn(tern_manager::api::serve_with(
        listener,
        manager,
        vec![TOKEN.into()],
        serving,
        std::future::pending(),
    ));
    Server {
        base,
        ca,
        _dir: dir,
    }
}

impl Server {
    /// A client showing `id`'s certificate (none: no certificate), opening a new
    /// connection for every request so each one is a fresh handshake.
    fn client(&self, id: Option<&Identity>) -> reqwest::Client {
        reqwest::Client::builder()
            .use_preconfigured_tls(client_config(self.ca.cert_pem(), id, None).unwrap())
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }

    /// Enrols host `name` with a join token; its identity.
    async fn enrol(&self, name: &str, port: u16) -> Identity {
        let token = self.ca.create_join_token(Duration::from_secs(60)).unwrap();
        let (key_pem, csr) = tern_pki::identity::new_key_and_csr(name).unwrap();
        let body = json!({"token": token.token, "name": name,
            "address": format!("https://127.0.0.1:{port}"),
            "capacity": {"cpus": 4, "memory_mib": 4096}, "csr_pem": csr});
        let r = self
            .client(None)
            .post(format!("{}/v1/join", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let reply: serde_json::Value = r.json().await.unwrap();
        Identity {
            ca_pem: self.ca.cert_pem().into(),
            cert_pem: reply["cert_pem"].as_str().unwrap().into(),
            key_pem,
        }
    }

    /// `POST /v1/hosts/{host}/lease` as `id`, with the token when asked; the status, or
    /// `None` when the connection was refused.
    async fn renew(&self, id: Option<&Identity>, host: &str, token: bool) -> Option<u16> {
        let mut req = self
            .client(id)
            .post(format!("{}/v1/hosts/{host}/lease", self.base));
        if token {
            req = req.bearer_auth(TOKEN);
        }
        req.send().await.ok().map(|r| r.status().as_u16())
    }
}

/// Today's hole: a lease was renewed with the manager's bearer token, which every host
/// held, so any host could keep another's lease alive (and the guests of a dead host
/// would never be restarted) or hold the whole API. Over TLS only the host's own
/// certificate renews its lease.
#[tokio::test]
async fn a_lease_is_renewed_only_with_the_hosts_own_certificate() {
    let srv = start(Duration::from_secs(10)).await;
    let h1 = srv.enrol("h1", 7071).await;
    let h2 = srv.enrol("h2", 7072).await;
    let alice = srv.ca.issue(Role::Operator, "alice", &[]).unwrap();
    assert_eq!(srv.renew(Some(&h1), "h1", false).await, Some(200));
    assert_eq!(srv.renew(Some(&h2), "h2", false).await, Some(200));
    assert_eq!(srv.renew(Some(&h2), "h1", false).await, Some(403));
    assert_eq!(srv.renew(Some(&h2), "h1", true).await, Some(403));
    assert_eq!(srv.renew(None, "h1", true).await, Some(401), "the token");
    assert_eq!(srv.renew(Some(&alice), "h1", true).await, Some(403));
    // Only a manager may say which host it passes a renewal on for.
    let r = srv
        .client(Some(&h2))
        .post(format!("{}/v1/hosts/h1/lease", srv.base))
        .header(tern_manager::api::LEASE_HOST, "h1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

/// Today's hole: a host's credentials (the manager token it renewed its lease with)
/// were a full API user's. A caller showing a host's certificate is refused on every
/// user route, token or not.
#[tokio::test]
async fn a_host_certificate_is_not_an_api_user() {
    let srv = start(Duration::from_secs(10)).await;
    let h1 = srv.enrol("h1", 7071).await;
    srv.enrol("h2", 7072).await;
    let alice = srv.ca.issue(Role::Operator, "alice", &[]).unwrap();
    let url = |p: &str| format!("{}{p}", srv.base);
    let host = srv.client(Some(&h1));
    for r in [
        host.get(url("/v1/hosts")).bearer_auth(TOKEN).send().await,
        host.delete(url("/v1/hosts/h2"))
            .bearer_auth(TOKEN)
            .send()
            .await,
        host.post(url("/v1/vms"))
            .bearer_auth(TOKEN)
            .json(&json!({"name": "v1", "spec": {"vcpus": 1, "memory_mib": 64}}))
            .send()
            .await,
    ] {
        let r = r.unwrap();
        assert_eq!(r.status(), 403);
        assert!(r.text().await.unwrap().contains("not an API user"));
    }
    for c in [srv.client(Some(&alice)), srv.client(None)] {
        let r = c.get(url("/v1/hosts")).bearer_auth(TOKEN).send().await;
        assert_eq!(r.unwrap().status(), 200);
    }
    // What a host needs stays open to it; the revocation list to no one without a
    // certificate or the token.
    let crl = host.get(url("/v1/ca/crl")).send().await.unwrap();
    assert_eq!(crl.status(), 200);
    let anonymous = srv
        .client(None)
        .get(url("/v1/ca/crl"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
}

/// Today's hole: the manager checked certificates against the revocation list as of
/// its start. A host removed through this manager is refused from the next handshake;
/// one revoked by another process (`tern ca revoke`) within the refresh period.
#[tokio::test]
async fn a_revoked_host_is_refused_by_the_running_manager() {
    let srv = start(Duration::from_millis(200)).await;
    let h1 = srv.enrol("h1", 7071).await;
    let h2 = srv.enrol("h2", 7072).await;
    assert_eq!(srv.renew(Some(&h1), "h1", false).await, Some(200));
    assert_eq!(srv.renew(Some(&h2), "h2", false).await, Some(200));

    let r = srv
        .client(None)
        .delete(format!("{}/v1/hosts/h1", srv.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(srv.renew(Some(&h1), "h1", false).await, None, "h1 got in");

    // Another process revokes h2 in the same CA directory.
    Ca::load(srv.ca.dir()).unwrap().revoke("h2").unwrap();
    let t = Instant::now();
    while srv.renew(Some(&h2), "h2", false).await.is_some() {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "a host revoked elsewhere still got in"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
