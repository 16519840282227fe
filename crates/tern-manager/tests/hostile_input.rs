//! Host addresses a standalone manager (no cluster CA, as `tern manager` runs on
//! loopback) cannot serve, refused at registration over real HTTP. The other probes of
//! hostile input run against the lab's manager in the fault suite (`tern bench faults`).

use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tern_manager::manager::system_clock;
use tern_manager::store::SqliteStore;
use tern_manager::Manager;

const TOKEN: &str = "s3cret";

struct Server {
    base: String,
    manager: Arc<Manager>,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// A standalone manager, as `tern manager` runs one: it reaches hosts over HTTP only.
async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("tern.db")).unwrap();
    let manager = Arc::new(Manager::open(Box::new(store), system_clock()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(tern_manager::api::serve(
        listener,
        manager.clone(),
        vec![TOKEN.into()],
        std::future::pending(),
    ));
    Server {
        base,
        manager,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Server {
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn register(
        &self,
        name: &str,
        address: &str,
        cpus: Value,
        mib: Value,
    ) -> (StatusCode, Value) {
        let body = json!({"name": name, "address": address,
                          "capacity": {"cpus": cpus, "memory_mib": mib}});
        self.call(Method::POST, "/v1/hosts", Some(body)).await
    }
}

fn says(body: &Value, what: &str) -> bool {
    body["error"].as_str().is_some_and(|e| e.contains(what))
}

#[tokio::test]
async fn a_host_address_the_manager_cannot_reach_is_refused_at_registration() {
    let m = start().await;
    for address in [
        "sim:",
        "file:///etc/passwd",
        "http://",
        "http://admin:pw@198.18.0.2:7070",
        "http://198.18.0.2:7070/v1?x=1",
        "198.18.0.2:7070",
    ] {
        let (status, body) = m.register("h1", address, json!(8), json!(1024)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{address}: {body}");
        assert!(says(&body, "address"), "{body}");
    }
    assert!(m.manager.read(|s| s.hosts.is_empty()));
    for address in ["http://198.18.0.2:7070", "https://h1.example:7070/"] {
        let (status, body) = m.register("h1", address, json!(8), json!(1024)).await;
        assert!(
            status.is_success() || status == StatusCode::CONFLICT,
            "{address}: {body}"
        );
    }
}
