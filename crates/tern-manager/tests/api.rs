//! The REST API over real HTTP on a port-0 listener, against the checked-in OpenAPI
//! document: every documented operation answers as documented, with and without a token,
//! and bad input is refused with a message and changes nothing.

use std::sync::Arc;

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tern_manager::decide::{Command, HostAddresses};
use tern_manager::manager::system_clock;
use tern_manager::store::SqliteStore;
use tern_manager::Manager;

const TOKEN: &str = "s3cret";

struct Server {
    base: String,
    manager: Arc<Manager>,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn start() -> Server {
        Server::serving(HostAddresses::Agents).await
    }

    async fn serving(addresses: HostAddresses) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("tern.db")).unwrap();
        let manager = Arc::new(
            Manager::open(Box::new(store), system_clock())
                .unwrap()
                .serving(addresses)
                .with_catalog(dir.path().join("catalog")),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tern_manager::api::serve(
            listener,
            manager.clone(),
            vec![TOKEN.into()],
            async move {
                let _ = rx.await;
            },
        ));
        Server {
            base,
            manager,
            http: reqwest::Client::new(),
            stop: Some(tx),
            task,
            _dir: dir,
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (StatusCode, String) {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let ctype = resp
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        // An event stream never ends; its status and type are what this test checks.
        let text = if ctype.starts_with("text/event-stream") {
            String::new()
        } else {
            resp.text().await.unwrap()
        };
        (status, text)
    }

    async fn json(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let b = body.map(|b| b.to_string());
        let (s, t) = self.call(method, path, Some(TOKEN), b.as_deref()).await;
        (s, serde_json::from_str(&t).unwrap_or(Value::Null))
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), self.task)
            .await
            .expect("server stops on shutdown, even with an event stream open")
            .unwrap()
            .unwrap();
    }

    /// Hosts h1, h2, h3 (empty, for the removal) and VM v1 running on h1 after two
    /// migrations: what the document's examples refer to.
    async fn fixture(&self) {
        // Images `minimal` and `base` (ready, files not kept: nothing here boots them) and
        // template `debian` over `base`.
        for image in ["minimal", "base"] {
            let new: tern_api::catalog::NewImage = serde_json::from_value(json!({
                "name": image, "files": [{"role": "kernel", "size": 5, "sha256": "ab".repeat(32)}]
            }))
            .unwrap();
            self.manager.execute(Command::AddImage(new)).unwrap();
            self.manager
                .execute(Command::ImageFileReceived {
                    image: image.into(),
                    role: tern_api::catalog::FileRole::Kernel,
                })
                .unwrap();
        }
        let t = serde_json::from_value(
            json!({"name": "debian", "image": "base", "vcpus": 1, "memory_mib": 512}),
        )
        .unwrap();
        self.manager.execute(Command::CreateTemplate(t)).unwrap();
        for (h, ip) in [("h1", 2), ("h2", 3), ("h3", 4)] {
            let (s, _) = self
                .json(
                    Method::POST,
                    "/v1/hosts",
                    Some(
                        json!({"name": h, "address": format!("http://198.18.0.{ip}:7070"),
                                "capacity": {"cpus": 8, "memory_mib": 16384}}),
                    ),
                )
                .await;
            assert_eq!(s, StatusCode::CREATED);
        }
        let (s, _) = self
            .json(
                Method::POST,
                "/v1/vms",
                Some(json!({"name": "v1", "spec": {"vcpus": 1, "memory_mib": 1024}, "host": "h1"})),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
        self.manager
            .execute(Command::VmStarted {
                vm: "v1".into(),
                host: "h1".into(),
            })
            .unwrap();
        // Finished migrations for `GET /v1/migrations/1`: v1 to h2 and back.
        for (id, to) in [(1, "h2"), (2, "h1")] {
            self.manager
                .execute(Command::MigrateVm {
                    name: "v1".into(),
                    to: Some(to.into()),
                    policy: None,
                })
                .unwrap();
            self.manager
                .execute(Command::MigrationDone {
                    id,
                    result: tern_manager::state::MigrationResult::Succeeded {
                        total_ms: 900,
                        downtime_ms: 40,
                    },
                })
                .unwrap();
        }
    }
}

fn doc() -> Value {
    serde_json::from_str(&tern_manager::api::OPENAPI).expect("the OpenAPI document is JSON")
}

/// `(method, path with examples filled in, example body, documented statuses, secured)`.
type Operation = (Method, String, Option<String>, Vec<u16>, bool);

/// The documented operations, reads before writes and deletes last, so the examples stay
/// valid in sequence.
fn operations(doc: &Value) -> Vec<Operation> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let mut url = path.clone();
            let mut query = Vec::new();
            for p in op["parameters"].as_array().into_iter().flatten() {
                let ex = p["example"].to_string().trim_matches('"').to_owned();
                let name = p["name"].as_str().unwrap();
                match p["in"].as_str().unwrap() {
                    "path" => url = url.replace(&format!("{{{name}}}"), &ex),
                    _ => query.push(format!("{name}={ex}")),
                }
            }
            if !query.is_empty() {
                url = format!("{url}?{}", query.join("&"));
            }
            let body = op["requestBody"]["content"]["application/json"]["example"].clone();
            let body = (!body.is_null()).then(|| body.to_string());
            let codes = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .map(|k| k.parse().unwrap())
                .collect();
            let secured = op
                .get("security")
                .is_none_or(|s| !s.as_array().unwrap().is_empty());
            ops.push((
                method.to_uppercase().parse().unwrap(),
                url,
                body,
                codes,
                secured,
            ));
        }
    }
    let rank = |m: &Method| match *m {
        Method::GET => 0,
        Method::DELETE => 2,
        _ => 1,
    };
    ops.sort_by(|a, b| (rank(&a.0), &a.1).cmp(&(rank(&b.0), &b.1)));
    ops
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let srv = Server::start().await;
    srv.fixture().await;
    let doc = doc();
    let ops = operations(&doc);
    assert!(ops.len() >= 18, "{} operations documented", ops.len());
    for (method, url, body, codes, secured) in ops {
        // Enrolment needs a cluster CA, which this server has not: tests/enrol.rs.
        if url == "/v1/join" || url == "/v1/ca/crl" {
            continue;
        }
        // A trace records on a real agent's host (the refusals are tested below); a
        // taint report comes from a real guest's agent (crates/tern/tests/vm_cli.rs
        // tests the refusal of a simulated host).
        if url.ends_with("/trace") || url.ends_with("/taint") {
            continue;
        }
        // Image files are bytes, not JSON examples: tests/catalog.rs. Lifecycle actions
        // are carried out by the VM's host, which this server has none of
        // (crates/tern/tests/vm_cli.rs drives them on simulated hosts).
        let actions = [
            "start", "stop", "reboot", "pause", "resume", "suspend", "restore", "resize",
        ];
        if url.contains("/files/") || actions.iter().any(|a| url.ends_with(&format!("/{a}"))) {
            continue;
        }
        let (s, text) = srv.call(method.clone(), &url, None, body.as_deref()).await;
        if secured {
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{method} {url} without a token"
            );
            assert!(text.contains("bearer token"), "{text}");
            let (s, _) = srv
                .call(method.clone(), &url, Some("wrong"), body.as_deref())
                .await;
            assert_eq!(
                s,
                StatusCode::UNAUTHORIZED,
                "{method} {url} with a wrong token"
            );
        } else {
            assert!(s.is_success(), "{method} {url} without a token: {s}");
        }
        // The console is a WebSocket to a real agent's VM (crates/tern/tests/catalog_lab.rs);
        // without the upgrade it answers 400 saying so.
        if url.ends_with("/console") {
            let (s, text) = srv.call(method.clone(), &url, Some(TOKEN), None).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{text}");
            assert!(text.contains("WebSocket"), "{text}");
            continue;
        }
        let (s, text) = srv
            .call(method.clone(), &url, Some(TOKEN), body.as_deref())
            .await;
        assert!(
            s.is_success(),
            "{method} {url} with the example: {s} {text}"
        );
        assert!(
            codes.contains(&s.as_u16()),
            "{method} {url}: {s} is not documented"
        );
    }
    // The server's own copy of the document is the checked-in one.
    let (_, text) = srv.call(Method::GET, "/openapi.json", None, None).await;
    assert_eq!(serde_json::from_str::<Value>(&text).unwrap(), doc);
    srv.stop().await;
}

#[tokio::test]
async fn a_trace_is_refused_for_bad_durations_unknown_and_not_running_vms() {
    let srv = Server::start().await;
    srv.fixture().await;
    let trace = |vm: &'static str, body: Value| {
        let srv = &srv;
        async move {
            srv.json(Method::POST, &format!("/v1/vms/{vm}/trace"), Some(body))
                .await
        }
    };
    for bad in [
        json!({"duration_ms": 0}),
        json!({"duration_ms": 3_600_001}),
        json!({}),
    ] {
        let (s, v) = trace("v1", bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
    }
    let (s, v) = trace("nope", json!({"duration_ms": 100})).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{v}");
    // A VM that is placed but was never seen running is not traced.
    let (s, _) = srv
        .json(
            Method::POST,
            "/v1/vms",
            Some(json!({"name": "v9", "spec": {"vcpus": 1, "memory_mib": 512}, "host": "h2"})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, v) = trace("v9", json!({"duration_ms": 100})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert!(v.to_string().contains("not running"), "{v}");
    // A running VM, but no control loop to reach its agent with.
    let (s, v) = trace("v1", json!({"duration_ms": 100})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    srv.stop().await;
}

#[tokio::test]
async fn a_vcpu_policy_is_recorded_with_the_vm_and_bad_ones_change_nothing() {
    let srv = Server::start().await;
    srv.fixture().await;
    let policy = |vm: &'static str| {
        let srv = &srv;
        async move {
            let (s, v) = srv
                .json(Method::GET, &format!("/v1/vms/{vm}/vcpu-policy"), None)
                .await;
            assert_eq!(s, StatusCode::OK, "{v}");
            let (_, record) = srv.json(Method::GET, &format!("/v1/vms/{vm}"), None).await;
            assert_eq!(record["spec"]["vcpu_policy"], v["policy"], "{record}");
            v["policy"].as_str().unwrap().to_owned()
        }
    };
    let put = |vm: &'static str, body: Value| {
        let srv = &srv;
        async move {
            srv.json(
                Method::PUT,
                &format!("/v1/vms/{vm}/vcpu-policy"),
                Some(body),
            )
            .await
        }
    };
    // Created without one: none. Created with one: kept in the record.
    assert_eq!(policy("v1").await, "none");
    let (s, v) = srv
        .json(
            Method::POST,
            "/v1/vms",
            Some(json!({"name": "v2", "host": "h2",
                        "spec": {"vcpus": 2, "memory_mib": 512, "vcpu_policy": "gang"}})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(policy("v2").await, "gang");
    // Set on a running VM (no control loop here: recorded only).
    let (s, v) = put("v1", json!({"policy": "pin"})).await;
    assert_eq!((s, &v), (StatusCode::OK, &json!({"policy": "pin"})));
    assert_eq!(policy("v1").await, "pin");
    for (bad, says) in [
        (json!({"policy": "fifo"}), "unknown variant"),
        (json!({}), "policy"),
        (json!({"policy": "pin", "cpus": [0]}), "cpus"),
    ] {
        let (s, v) = put("v1", bad.clone()).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}: {v}");
        assert!(v["error"].as_str().unwrap().contains(says), "{bad}: {v}");
    }
    let (s, v) = srv
        .json(
            Method::POST,
            "/v1/vms",
            Some(json!({"name": "v3", "spec": {"vcpus": 1, "memory_mib": 512, "vcpu_policy": "fifo"}})),
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    let (s, _) = put("ghost", json!({"policy": "pin"})).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // While it migrates: recorded, for the control loop to apply on the destination.
    srv.manager
        .execute(Command::MigrateVm {
            name: "v1".into(),
            to: Some("h3".into()),
            policy: None,
        })
        .unwrap();
    let (s, v) = put("v1", json!({"policy": "gang"})).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(policy("v1").await, "gang");
    // Being deleted (its host has yet to confirm): refused, and nothing recorded.
    srv.manager
        .execute(Command::VmStarted {
            vm: "v2".into(),
            host: "h2".into(),
        })
        .unwrap();
    let (s, _) = srv.json(Method::DELETE, "/v1/vms/v2", None).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    let (s, v) = put("v2", json!({"policy": "none"})).await;
    assert_eq!(s, StatusCode::CONFLICT, "{v}");
    assert_eq!(policy("v2").await, "gang");
    srv.stop().await;
}

#[tokio::test]
async fn a_simulated_host_takes_no_vcpu_policy_but_none() {
    let srv = Server::serving(HostAddresses::Sim).await;
    let (s, v) = srv
        .json(
            Method::POST,
            "/v1/hosts",
            Some(json!({"name": "s1", "address": "sim:", "capacity": {"cpus": 4, "memory_mib": 8192}})),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    let create = |name: &'static str, policy: &'static str| {
        let srv = &srv;
        async move {
            srv.json(
                Method::POST,
                "/v1/vms",
                Some(json!({"name": name, "spec": {"vcpus": 1, "memory_mib": 512, "vcpu_policy": policy}})),
            )
            .await
        }
    };
    let (s, v) = create("p1", "pin").await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("simulated host"),
        "{v}"
    );
    let (s, v) = create("n1", "none").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    for (policy, status) in [("gang", StatusCode::BAD_REQUEST), ("none", StatusCode::OK)] {
        let (s, v) = srv
            .json(
                Method::PUT,
                "/v1/vms/n1/vcpu-policy",
                Some(json!({ "policy": policy })),
            )
            .await;
        assert_eq!(s, status, "{policy}: {v}");
    }
    let (_, vms) = srv.json(Method::GET, "/v1/vms", None).await;
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    srv.stop().await;
}

#[tokio::test]
async fn undocumented_routes_are_404_with_a_json_message() {
    let srv = Server::start().await;
    let (s, text) = srv
        .call(Method::GET, "/v1/nothing", Some(TOKEN), None)
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(text.contains("/openapi.json"), "{text}");
    let documented: Vec<String> = doc()["paths"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(!documented.contains(&"/v1/nothing".to_owned()));
    srv.stop().await;
}

#[tokio::test]
async fn bad_input_is_refused_with_a_message_and_changes_nothing() {
    let srv = Server::start().await;
    srv.fixture().await;
    let before = srv.manager.read(|s| s.clone());
    let events_before = srv.manager.events_since(0, 1000).unwrap().len();
    let cases: &[(Method, &str, &str, StatusCode, &str)] = &[
        (
            Method::POST,
            "/v1/vms",
            r#"{"name": "x", "spec": {"vcpus": 0, "memory_mib": 512}}"#,
            StatusCode::BAD_REQUEST,
            "vcpus",
        ),
        (
            Method::POST,
            "/v1/vms",
            r#"{"name": "x", "spec": {"vcpus": 1, "memory_mib": 512, "colour": 1}}"#,
            StatusCode::BAD_REQUEST,
            "colour",
        ),
        (
            Method::POST,
            "/v1/vms",
            r#"{"name": "Bad Name", "spec": {"vcpus": 1, "memory_mib": 512}}"#,
            StatusCode::BAD_REQUEST,
            "invalid",
        ),
        (
            Method::POST,
            "/v1/vms",
            r#"{"name": "x", "spec": {"vcpus": 1, "memory_mib": 512}, "host": "nowhere"}"#,
            StatusCode::NOT_FOUND,
            "nowhere",
        ),
        (
            Method::POST,
            "/v1/vms",
            r#"{"name": "x", "spec": {"vcpus": 1, "memory_mib": 900000}}"#,
            StatusCode::CONFLICT,
            "no host has room",
        ),
        (
            Method::POST,
            "/v1/vms",
            r#"{"name": "v1", "spec": {"vcpus": 1, "memory_mib": 512}}"#,
            StatusCode::CONFLICT,
            "already exists",
        ),
        (
            Method::POST,
            "/v1/vms",
            r#"{"name": "x", "spec": {"vcpus": 1, "memory_mib": 512, "disks": [{"name": "d", "size_mib": 8, "bus": "ide"}]}}"#,
            StatusCode::BAD_REQUEST,
            "expected `virtio_blk` or `virtio_scsi`",
        ),
        (
            Method::POST,
            "/v1/vms",
            r#"{"name": "x", "spec": "#,
            StatusCode::BAD_REQUEST,
            "request body",
        ),
        (
            Method::POST,
            "/v1/vms",
            "[]",
            StatusCode::BAD_REQUEST,
            "request body",
        ),
        (
            Method::POST,
            "/v1/vms/v1/migrate",
            r#"{"policy": "warp"}"#,
            StatusCode::BAD_REQUEST,
            "unknown migration policy",
        ),
        (
            Method::POST,
            "/v1/vms/v1/migrate",
            r#"{"to": "h1"}"#,
            StatusCode::BAD_REQUEST,
            "already on",
        ),
        (
            Method::POST,
            "/v1/vms/nope/migrate",
            "{}",
            StatusCode::NOT_FOUND,
            "nope",
        ),
        (
            Method::POST,
            "/v1/hosts",
            r#"{"name": "h3", "address": "", "capacity": {"cpus": 1, "memory_mib": 1}}"#,
            StatusCode::BAD_REQUEST,
            "address",
        ),
        (
            Method::POST,
            "/v1/hosts",
            r#"{"name": "h1", "address": "http://x", "capacity": {"cpus": 1, "memory_mib": 1}}"#,
            StatusCode::CONFLICT,
            "already registered",
        ),
        (
            Method::POST,
            "/v1/hosts/h9/heartbeat",
            r#"{"cpu_used": 1}"#,
            StatusCode::NOT_FOUND,
            "h9",
        ),
        (
            Method::POST,
            "/v1/hosts/h1/heartbeat",
            r#"{"cpu_used": -1}"#,
            StatusCode::BAD_REQUEST,
            "cpu_used",
        ),
        (
            Method::PUT,
            "/v1/balancer",
            r#"{"enabled": true}"#,
            StatusCode::BAD_REQUEST,
            "missing field",
        ),
        (
            Method::DELETE,
            "/v1/vms/ghost",
            "",
            StatusCode::NOT_FOUND,
            "ghost",
        ),
        (
            Method::GET,
            "/v1/events?since=abc",
            "",
            StatusCode::BAD_REQUEST,
            "since",
        ),
        (
            Method::GET,
            "/v1/migrations?limit=0",
            "",
            StatusCode::BAD_REQUEST,
            "limit",
        ),
    ];
    for (method, path, body, status, needle) in cases {
        let body = (!body.is_empty()).then_some(*body);
        let (s, text) = srv.call(method.clone(), path, Some(TOKEN), body).await;
        assert_eq!(s, *status, "{method} {path} {body:?}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        let msg = v["error"].as_str().unwrap();
        assert!(
            msg.contains(needle),
            "{method} {path}: {msg:?} lacks {needle:?}"
        );
    }
    assert_eq!(srv.manager.read(|s| s.clone()), before);
    assert_eq!(
        srv.manager.events_since(0, 1000).unwrap().len(),
        events_before
    );
    srv.stop().await;
}

#[tokio::test]
async fn the_event_stream_sends_the_backlog_then_live_events() {
    let srv = Server::start().await;
    srv.fixture().await;
    let resp = srv
        .http
        .get(format!("{}/v1/events/stream?since=1", srv.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    srv.json(Method::POST, "/v1/hosts/h2/drain", None).await;
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !text.contains("host_state_changed") {
        let chunk = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the drain event arrives")
            .unwrap()
            .unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    // Event 1 (h1 registered) is before `since`; 2 onwards are sent.
    assert!(!text.contains("id: 1\n"), "{text}");
    assert!(
        text.contains("id: 2\n") && text.contains("\"host\":\"h2\""),
        "{text}"
    );
    drop(stream);
    srv.stop().await;
}

#[tokio::test]
async fn metrics_are_prometheus_text() {
    let srv = Server::start().await;
    srv.fixture().await;
    let (s, text) = srv.call(Method::GET, "/metrics", Some(TOKEN), None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(text.contains("# TYPE tern_hosts gauge"), "{text}");
    assert!(text.contains("tern_vms{state=\"running\"} 1"), "{text}");
    srv.stop().await;
}
