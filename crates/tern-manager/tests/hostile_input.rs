//! Input an attacker (or a confused operator) would send, over real HTTP against a real
//! manager: each test is named after the hole it closes and fails on a manager that lets
//! the input through.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tern_manager::ha::Leadership;
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
async fn a_balancer_interval_of_2_pow_64_is_refused_not_stored() {
    let m = start().await;
    let (_, mut settings) = m.call(Method::GET, "/v1/balancer", None).await;
    for (field, value) in [
        ("interval_s", json!(u64::MAX)),
        ("dead_after_s", json!(u64::MAX)),
        ("cooldown_s", json!(u64::MAX)),
        ("max_per_cluster", json!(u32::MAX)),
        ("smoothing_window", json!(u32::MAX)),
    ] {
        let mut bad = settings.clone();
        bad[field] = value;
        let (status, body) = m.call(Method::PUT, "/v1/balancer", Some(bad)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{field}: {body}");
        assert!(says(&body, field) && says(&body, "at most"), "{body}");
    }
    assert_eq!(
        m.manager.read(|s| s.settings.interval_s),
        30,
        "nothing stored"
    );
    settings["interval_s"] = json!(86_400);
    let (status, body) = m.call(Method::PUT, "/v1/balancer", Some(settings)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn host_capacities_and_loads_out_of_range_are_refused() {
    let m = start().await;
    let url = "http://198.18.0.2:7070";
    for (cpus, mib) in [
        (json!(1e300), json!(1024)),
        (json!(4097), json!(1024)),
        (json!(8), json!(u64::MAX)),
        (json!(8), json!((1u64 << 26) + 1)),
    ] {
        let (status, body) = m.register("h1", url, cpus.clone(), mib.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{cpus} {mib}: {body}");
        assert!(says(&body, "capacity"), "{body}");
    }
    let (status, body) = m.register("h1", url, json!(8), json!(1 << 26)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    for report in [
        json!({"cpu_used": 1e300}),
        json!({"cpu_used": 1.0, "vms": [{"name": "v1", "cpu_used": -1.0}]}),
        json!({"cpu_used": 1.0, "vms": [{"name": "v1", "cpu_used": 1e300}]}),
        json!({"cpu_used": 1.0, "vms": [{"name": "../v1", "cpu_used": 1.0}]}),
    ] {
        let (status, body) = m
            .call(Method::POST, "/v1/hosts/h1/heartbeat", Some(report.clone()))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{report}: {body}");
    }
    assert_eq!(m.manager.read(|s| s.hosts["h1"].cpu_used), None);
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

#[tokio::test]
async fn request_bodies_over_2_mib_are_refused() {
    let m = start().await;
    let huge = json!({"name": "v1", "spec": {"vcpus": 1, "memory_mib": 64, "cmdline": "x".repeat(3 << 20)}});
    let (status, body) = m.call(Method::POST, "/v1/vms", Some(huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert!(says(&body, "larger than 2097152 bytes"), "{body}");
}

#[tokio::test]
async fn names_in_paths_are_checked_before_any_lookup() {
    let m = start().await;
    for (method, path) in [
        (Method::GET, "/v1/vms/..%2Fx"),
        (Method::DELETE, "/v1/vms/V1"),
        (Method::POST, "/v1/vms/a%20b/migrate"),
        (Method::GET, "/v1/hosts/..%2F..%2Fetc"),
        (Method::POST, "/v1/hosts/H1/drain"),
    ] {
        let body = (method == Method::POST).then(|| json!({}));
        let (status, answer) = m.call(method.clone(), path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {answer}");
        assert!(says(&answer, "name"), "{answer}");
    }
}

/// A "leader" that counts the connections it gets and never answers.
async fn counting_leader() -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    (url, hits)
}

#[tokio::test]
async fn an_ha_follower_checks_the_token_before_reading_a_body() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("tern.db")).unwrap();
    let manager = Arc::new(Manager::open(Box::new(store), system_clock()).unwrap());
    let (leader, hits) = counting_leader().await;
    let leadership = Arc::new(Leadership::new("http://follower.invalid:1"));
    leadership.follow(Some(leader));
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let app = tern_manager::ha::forward::router(manager, vec![TOKEN.into()], leadership, stopping)
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });

    // A follower that passes the request on would wait for the silent leader for ever.
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap();
    let big = vec![b' '; 8 << 20];
    for token in [None, Some("wrong")] {
        let mut req = http.post(format!("{base}/v1/vms")).body(big.clone());
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let status = req.send().await.map(|r| r.status());
        // The follower answers 401 at once; it may close the socket before the body is
        // through, which the client sees as a broken connection.
        assert!(
            status
                .as_ref()
                .map_or(true, |s| *s == StatusCode::UNAUTHORIZED),
            "{token:?}: {status:?}"
        );
    }
    let (status, body) = {
        let r = http
            .post(format!("{base}/v1/vms"))
            .bearer_auth(TOKEN)
            .body(big)
            .send()
            .await
            .unwrap();
        (r.status(), r.json::<Value>().await.unwrap_or(Value::Null))
    };
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        0,
        "the leader was sent a request"
    );
}
