//! Enrolment with the cluster CA: hosts join with one-time tokens, and removing a host
//! revokes it. (That a host registered by hand must be enrolled and at an https://
//! address is probed against the lab in the fault suite, `tern bench faults`.)

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tern_manager::api::Serving;
use tern_manager::manager::system_clock;
use tern_manager::store::SqliteStore;
use tern_manager::Manager;
use tern_pki::Ca;

const TOKEN: &str = "t0ken";

struct Server {
    base: String,
    ca: Arc<Ca>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("tern.db")).unwrap();
    let manager = Arc::new(Manager::open(Box::new(store), system_clock()).unwrap());
    let ca = Arc::new(Ca::init(&dir.path().join("ca")).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let serving = Serving {
        ca: Some(ca.clone()),
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
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Server {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `POST /v1/join` for `name` at https://127.0.0.1:PORT with a fresh key.
    async fn join(&self, token: &str, name: &str, port: u16) -> (u16, Value) {
        let (_key, csr) = tern_pki::identity::new_key_and_csr(name).unwrap();
        let body = json!({"token": token, "name": name,
            "address": format!("https://127.0.0.1:{port}"),
            "capacity": {"cpus": 4, "memory_mib": 4096}, "csr_pem": csr});
        self.call(reqwest::Method::POST, "/v1/join", Some(body))
            .await
    }

    /// A new join token's text.
    fn token(&self) -> String {
        self.ca
            .create_join_token(Duration::from_secs(60))
            .unwrap()
            .token
    }
}

#[tokio::test]
async fn a_host_joins_once_with_its_token_and_gets_a_certificate_for_its_address() {
    let srv = start().await;
    let token = srv.token();
    let (s, reply) = srv.join(&token, "h1", 7071).await;
    assert_eq!(s, 201, "{reply}");
    assert!(reply["cert_pem"]
        .as_str()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert_eq!(reply["ca_pem"].as_str().unwrap(), srv.ca.cert_pem());
    let (s, host) = srv.call(reqwest::Method::GET, "/v1/hosts/h1", None).await;
    assert_eq!(s, 200);
    assert_eq!(host["address"], "https://127.0.0.1:7071");
    // The token is spent: a second host cannot use it.
    let (s, e) = srv.join(&token, "h2", 7072).await;
    assert_eq!(s, 401, "{e}");
    let (s, _) = srv.join("0123456789ab.nope", "h2", 7072).await;
    assert_eq!(s, 401);
}

#[tokio::test]
async fn removing_a_host_revokes_its_certificate() {
    let srv = start().await;
    let (s, _) = srv.join(&srv.token(), "h1", 7071).await;
    assert_eq!(s, 201);
    let crl = || srv.http.get(format!("{}/v1/ca/crl", srv.base));
    let anonymous = crl().send().await.unwrap();
    assert_eq!(
        anonymous.status(),
        401,
        "the CRL takes a certificate or the token"
    );
    let before = crl().bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(before.status(), 200);
    let before = before.text().await.unwrap();
    let (s, _) = srv
        .call(reqwest::Method::DELETE, "/v1/hosts/h1", None)
        .await;
    assert_eq!(s, 200);
    let (s, _) = srv.call(reqwest::Method::GET, "/v1/hosts/h1", None).await;
    assert_eq!(s, 404);
    assert!(srv
        .ca
        .ledger()
        .unwrap()
        .iter()
        .all(|i| i.name != "h1" || i.revoked_at.is_some()));
    let after = crl().bearer_auth(TOKEN).send().await.unwrap();
    assert_ne!(after.text().await.unwrap(), before);
    // Removed, the host may enrol again with a new token.
    let (s, _) = srv.join(&srv.token(), "h1", 7071).await;
    assert_eq!(s, 201);
}
