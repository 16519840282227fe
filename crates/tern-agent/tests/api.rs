//! The agent's HTTP API end to end over a real socket, with the in-process driver:
//! lifecycle, host report, and every refusal (bad token, unknown VM, bad spec, no room).

use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tern_agent::client::AgentClient;
use tern_agent::client::ClientError;
use tern_agent::host::Capacity;
use tern_agent::vms::CreateVm;
use tern_agent::{AgentError, AppState, HostConfig};
use tern_hv::sim::SimDriver;
use tern_hv::{Action, VmState};

struct Agent {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
    _dir: tempfile::TempDir,
}

/// Host h1 of 4 CPUs and `memory_mib` with its state in `dir` and its images in
/// `dir/images`, on the in-process driver.
fn state(dir: &std::path::Path, memory_mib: u64) -> AppState {
    AppState::new(
        Arc::new(SimDriver::new()),
        HostConfig {
            name: "h1".into(),
            capacity: Capacity {
                cpus: 4,
                memory_mib,
            },
            token: "s3cret".into(),
            state_dir: dir.to_path_buf(),
            image_dir: dir.join("images"),
        },
    )
}

async fn start_agent(memory_mib: u64) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let state = state(dir.path(), memory_mib);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(tern_agent::server::serve(listener, state, async {
        let _ = rx.await;
    }));
    Agent {
        url,
        stop: Some(tx),
        task,
        _dir: dir,
    }
}

fn client(a: &Agent, token: &str) -> AgentClient {
    AgentClient::new(&a.url, token, Duration::from_secs(10)).unwrap()
}

fn create(id: &str, mib: u64) -> CreateVm {
    serde_json::from_value(json!({"id": id, "spec": {"vcpus": 1, "memory_mib": mib}})).unwrap()
}

fn remote_status(e: ClientError) -> u16 {
    e.status()
        .unwrap_or_else(|| panic!("expected an HTTP error, got {e}"))
}

#[tokio::test]
async fn lifecycle_and_host_report() {
    let mut a = start_agent(1024).await;
    let c = client(&a, "s3cret");
    let h = c.host().await.unwrap();
    assert_eq!(h.name, "h1");
    assert_eq!(h.hypervisor, "sim");
    assert_eq!(h.capacity.memory_mib, 1024);
    assert_eq!(h.load.vms, 0);

    let v = c.create_vm(&create("web", 256)).await.unwrap();
    assert_eq!(v.info.state, VmState::Running);
    assert_eq!(c.list_vms().await.unwrap().len(), 1);
    assert_eq!(
        c.act("web", Action::Pause).await.unwrap().info.state,
        VmState::Paused
    );
    assert_eq!(
        c.act("web", Action::Resume).await.unwrap().info.state,
        VmState::Running
    );
    assert_eq!(
        c.act("web", Action::Stop).await.unwrap().info.state,
        VmState::Stopped
    );
    assert_eq!(c.show_vm("web").await.unwrap().info.state, VmState::Stopped);
    assert_eq!(c.metrics("web").await.unwrap().memory_bytes, 256 << 20);
    let h = c.host().await.unwrap();
    assert_eq!((h.load.vms, h.load.vm_memory_mib), (1, 256));
    c.delete_vm("web").await.unwrap();
    assert!(c.list_vms().await.unwrap().is_empty());

    a.stop.take().unwrap().send(()).unwrap();
    a.task.await.unwrap().unwrap();
}

/// Stop's body, reboot, and what a host without memory files or a store refuses.
#[tokio::test]
async fn stop_reboot_suspend_and_restore_requests() {
    let mut a = start_agent(1024).await;
    let c = client(&a, "s3cret");
    c.create_vm(&create("web", 256)).await.unwrap();
    assert_eq!(
        c.act("web", Action::Reboot).await.unwrap().info.state,
        VmState::Running
    );
    let raw = |body: serde_json::Value| {
        let c = c.clone();
        async move {
            c.http()
                .post::<_, serde_json::Value>("/v1/vms/web/stop", &body)
                .await
        }
    };
    for (body, says) in [
        (json!({"timeout_s": 0}), "between 1 and 600"),
        (json!({"timeout_s": 601}), "between 1 and 600"),
        (json!({"wait": 5}), "wait"),
    ] {
        let e = raw(body.clone()).await.unwrap_err();
        let text = e.to_string();
        assert_eq!(remote_status(e), 400, "{body}: {text}");
        assert!(text.contains(says), "{body}: {text}");
    }
    assert_eq!(c.show_vm("web").await.unwrap().info.state, VmState::Running);
    // The simulated guest obeys the power button.
    let stopped = c
        .stop_vm("web", &tern_api::agent::StopRequest::default())
        .await
        .unwrap();
    assert_eq!(stopped.stopped, tern_api::agent::StopOutcome::Graceful);
    assert_eq!(stopped.vm.info.state, VmState::Stopped);
    let e = c.act("web", Action::Reboot).await.unwrap_err();
    let text = e.to_string();
    assert_eq!(remote_status(e), 409, "{text}");
    assert!(text.contains("it is stopped"), "{text}");

    // No store on this host: nothing to suspend to or restore from.
    c.act("web", Action::Start).await.unwrap();
    for e in [
        c.suspend_vm("web").await.unwrap_err(),
        c.restore_vm("other").await.unwrap_err(),
    ] {
        let text = e.to_string();
        assert_eq!(remote_status(e), 400, "{text}");
        assert!(text.contains("no disk store"), "{text}");
    }
    assert_eq!(c.show_vm("web").await.unwrap().info.state, VmState::Running);

    a.stop.take().unwrap().send(()).unwrap();
    a.task.await.unwrap().unwrap();
}

#[tokio::test]
async fn refusals_change_nothing() {
    let a = start_agent(512).await;
    let c = client(&a, "s3cret");

    // Bad or missing token: 401 with a JSON body, for every route.
    let bad = client(&a, "wrong");
    assert_eq!(remote_status(bad.host().await.unwrap_err()), 401);
    assert_eq!(
        remote_status(bad.create_vm(&create("x", 64)).await.unwrap_err()),
        401
    );
    let raw = reqwest::get(format!("{}/v1/vms", a.url)).await.unwrap();
    assert_eq!(raw.status().as_u16(), 401);
    let body: serde_json::Value = raw.json().await.unwrap();
    assert_eq!(body["kind"], "unauthorized");

    // Unknown VM: 404.
    assert_eq!(remote_status(c.show_vm("ghost").await.unwrap_err()), 404);
    assert_eq!(remote_status(c.delete_vm("ghost").await.unwrap_err()), 404);
    assert_eq!(
        remote_status(c.act("ghost", Action::Pause).await.unwrap_err()),
        404
    );

    // Spec without memory, a kernel that does not exist, junk JSON: 400 naming the problem.
    let no_mem = json!({"id": "x", "spec": {"vcpus": 1}});
    match c
        .http()
        .send::<_, serde_json::Value>(reqwest::Method::POST, "/v1/vms", Some(&no_mem))
        .await
        .unwrap_err()
    {
        ClientError::Remote {
            status,
            message: body,
            ..
        } => {
            assert_eq!(status, 400);
            assert!(body.contains("memory_mib"), "{body}");
        }
        e => panic!("{e}"),
    }
    let no_kernel = json!({"id": "x", "spec": {"memory_mib": 64, "kernel": "/no/such/vmlinuz"}});
    let e = c
        .http()
        .send::<_, serde_json::Value>(reqwest::Method::POST, "/v1/vms", Some(&no_kernel))
        .await
        .unwrap_err();
    assert_eq!(remote_status(e), 400);
    let junk = reqwest::Client::new()
        .post(format!("{}/v1/vms", a.url))
        .bearer_auth("s3cret")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(junk.status().as_u16(), 400);

    // No room: 507, and the VM that would not fit does not exist.
    c.create_vm(&create("big", 400)).await.unwrap();
    let e = c.create_vm(&create("more", 200)).await.unwrap_err();
    assert_eq!(remote_status(e), 507);
    // Same id twice: 409. Pausing a paused VM: 409.
    assert_eq!(
        remote_status(c.create_vm(&create("big", 1)).await.unwrap_err()),
        409
    );
    c.act("big", Action::Pause).await.unwrap();
    assert_eq!(
        remote_status(c.act("big", Action::Pause).await.unwrap_err()),
        409
    );
    let ids: Vec<String> = c
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.info.id)
        .collect();
    assert_eq!(ids, vec!["big".to_string()]);

    // The sim driver has no guest channel: a clear 502, not a hang.
    let e = c.guest("big", &json!({"cmd": "ping"})).await.unwrap_err();
    assert_eq!(remote_status(e), 502);
    // A malformed guest request is the caller's fault.
    let e = c.guest("big", &json!(["ping"])).await.unwrap_err();
    assert_eq!(remote_status(e), 400);
}

fn read_doc(name: &str) -> String {
    std::fs::read_to_string(format!("{}/../../docs/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// (METHOD, path) of every operation in the checked-in OpenAPI document.
fn openapi_routes(doc: &serde_json::Value) -> std::collections::BTreeSet<(String, String)> {
    let mut out = std::collections::BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            if method != "parameters" {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    out
}

/// The fields a schema requires, those of the schemas it combines (`allOf`, `$ref`)
/// included.
fn required_fields(schemas: &serde_json::Value, schema: &serde_json::Value) -> Vec<String> {
    if let Some(name) = schema["$ref"].as_str() {
        let name = name.rsplit('/').next().unwrap_or(name);
        return required_fields(schemas, &schemas[name]);
    }
    let own = schema["required"].as_array().into_iter().flatten();
    let mut fields: Vec<String> = own.filter_map(|f| f.as_str().map(str::to_owned)).collect();
    for part in schema["allOf"].as_array().into_iter().flatten() {
        fields.extend(required_fields(schemas, part));
    }
    fields
}

/// The checked-in OpenAPI document, the route table of docs/agent-api.md and the server
/// agree: the same routes in both documents, each served (not the unknown-route
/// fallback), and real answers carry every field their schema requires.
#[tokio::test]
async fn openapi_document_matches_the_server() {
    let doc: serde_json::Value = serde_json::from_str(&read_doc("agent-openapi.json")).unwrap();
    let routes = openapi_routes(&doc);
    let table: std::collections::BTreeSet<(String, String)> = read_doc("agent-api.md")
        .lines()
        .filter_map(|l| {
            let cell = l.strip_prefix("| `")?.split('`').next()?;
            let (method, path) = cell.split_once(' ')?;
            path.starts_with("/v1/")
                .then(|| (method.to_string(), path.to_string()))
        })
        .collect();
    assert_eq!(
        routes, table,
        "docs/agent-openapi.json and docs/agent-api.md differ"
    );

    let a = start_agent(512).await;
    let http = reqwest::Client::new();
    for (method, path) in &routes {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let resp = http
            .request(m, format!("{}{}", a.url, path.replace("{id}", "ghost")))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        let body = resp.text().await.unwrap();
        assert!(
            !body.contains("no such route"),
            "{method} {path} is documented but not served"
        );
    }

    let schemas = &doc["components"]["schemas"];
    let has_required = |schema: &str, v: &serde_json::Value| {
        let required = required_fields(schemas, &schemas[schema]);
        assert!(!required.is_empty(), "{schema} requires nothing");
        for f in required {
            assert!(v.get(&f).is_some(), "{schema} answer lacks {f}: {v}");
        }
    };
    let c = client(&a, "s3cret");
    let vm = c.create_vm(&create("doc", 64)).await.unwrap();
    has_required("VmView", &serde_json::to_value(&vm).unwrap());
    has_required(
        "HostReport",
        &serde_json::to_value(c.host().await.unwrap()).unwrap(),
    );
    has_required(
        "VmMetrics",
        &serde_json::to_value(c.metrics("doc").await.unwrap()).unwrap(),
    );
    let err = http
        .get(format!("{}/v1/vms/ghost", a.url))
        .bearer_auth("s3cret")
        .send()
        .await
        .unwrap();
    has_required("Error", &err.json().await.unwrap());
}

/// The console route checks the token before it looks at the request, so no caller
/// without one gets the WebSocket (or learns which VMs exist); then it refuses a VM
/// without a console and a request that is not a WebSocket.
#[tokio::test]
async fn console_refusals_come_before_the_upgrade() {
    use tern_api::client::console::connect;
    let mut a = start_agent(1024).await;
    let c = client(&a, "s3cret");
    c.create_vm(&create("web", 256)).await.unwrap();
    let t = Duration::from_secs(10);
    for token in ["", "wrong"] {
        for vm in ["web", "nope"] {
            let e = connect(&a.url, &format!("/v1/vms/{vm}/console"), token, None, t)
                .await
                .err()
                .unwrap_or_else(|| panic!("{token:?} {vm}: the upgrade was granted"));
            let text = e.to_string();
            assert_eq!(remote_status(e), 401, "{token:?} {vm}: {text}");
        }
    }
    let e = connect(&a.url, "/v1/vms/nope/console", "s3cret", None, t)
        .await
        .err()
        .unwrap();
    assert_eq!(remote_status(e), 404);
    // The in-process driver has no serial console.
    let e = connect(&a.url, "/v1/vms/web/console", "s3cret", None, t)
        .await
        .err()
        .unwrap();
    let text = e.to_string();
    assert_eq!(remote_status(e), 409, "{text}");
    assert!(text.contains("no serial console"), "{text}");
    c.act("web", Action::Stop).await.unwrap();
    let e = connect(&a.url, "/v1/vms/web/console", "s3cret", None, t)
        .await
        .err()
        .unwrap();
    let text = e.to_string();
    assert_eq!(remote_status(e), 409, "{text}");
    assert!(text.contains("it is stopped"), "{text}");
    let e = c
        .http()
        .get::<serde_json::Value>("/v1/vms/web/console")
        .await
        .unwrap_err();
    let text = e.to_string();
    assert_eq!(remote_status(e), 400, "{text}");
    assert!(text.contains("WebSocket"), "{text}");

    a.stop.take().unwrap().send(()).unwrap();
    a.task.await.unwrap().unwrap();
}

/// `resume?thaw=` takes a boolean and nothing else, and neither resume nor thaw of a
/// migration this host never prepared touches anything.
#[tokio::test]
async fn resume_and_thaw_of_an_unknown_migration_are_refused() {
    let a = start_agent(512).await;
    let c = client(&a, "s3cret");
    let post = |path: &str| {
        let path = path.to_string();
        let c = c.clone();
        async move {
            c.http()
                .send::<serde_json::Value, serde_json::Value>(reqwest::Method::POST, &path, None)
                .await
                .unwrap_err()
        }
    };
    match post("/v1/incoming/in-1/resume?thaw=maybe").await {
        ClientError::Remote {
            status, message, ..
        } => {
            assert_eq!(status, 400);
            assert!(message.contains("thaw"), "{message}");
        }
        e => panic!("{e}"),
    }
    match post("/v1/incoming/in-1/resume?thaw=true&now=1").await {
        ClientError::Remote { status, .. } => assert_eq!(status, 400),
        e => panic!("{e}"),
    }
    assert_eq!(
        remote_status(c.resume_incoming("in-1", true).await.unwrap_err()),
        404
    );
    assert_eq!(
        remote_status(c.thaw_incoming("in-1").await.unwrap_err()),
        404
    );
    assert!(c.list_vms().await.unwrap().is_empty());
}

/// A host whose own image directory does not exist (a fresh machine before anything
/// filled it) still starts a kernel from the store's `images/`, and still refuses one
/// from anywhere else; a kernel that is not there at all is named as missing.
#[tokio::test]
async fn a_store_image_starts_on_a_host_without_an_image_directory() {
    let dir = tempfile::tempdir().unwrap();
    let store = tern_hv::disk::Store::open(&dir.path().join("store")).unwrap();
    let kernel = store.images_dir().join("vmlinuz");
    std::fs::write(&kernel, b"kernel").unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::write(elsewhere.join("vmlinuz"), b"kernel").unwrap();
    // `dir/images` is never made.
    let state = state(dir.path(), 1024).with_store(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(tern_agent::server::serve(
        listener,
        state,
        std::future::pending(),
    ));
    let c = AgentClient::new(&url, "s3cret", Duration::from_secs(10)).unwrap();
    let with_kernel = |id: &str, path: &std::path::Path| -> CreateVm {
        serde_json::from_value(
            json!({"id": id, "spec": {"memory_mib": 64, "kernel": path.display().to_string()}}),
        )
        .unwrap()
    };
    c.create_vm(&with_kernel("from-store", &kernel))
        .await
        .unwrap();
    for (id, path, word) in [
        ("outside", elsewhere.join("vmlinuz"), "image"),
        ("missing", elsewhere.join("gone"), "gone"),
    ] {
        let e = c.create_vm(&with_kernel(id, &path)).await.unwrap_err();
        let text = e.to_string();
        assert_eq!(remote_status(e), 400, "{text}");
        assert!(text.contains(word), "{id}: {text}");
    }
}
