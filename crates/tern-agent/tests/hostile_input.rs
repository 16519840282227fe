//! Input an attacker with the agent's token would send, over a real socket against a real
//! agent (the in-process driver): each test is named after the hole it closes and fails
//! on an agent that lets the input through.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tern_agent::host::Capacity;
use tern_agent::{AppState, HostConfig};
use tern_hv::sim::SimDriver;

const TOKEN: &str = "s3cret";

struct Agent {
    url: String,
    /// The temporary directory: `state/` is the agent's state directory, `images/` its
    /// image directory, anything else lies outside both.
    root: PathBuf,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

async fn start_agent() -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    for d in ["state", "images"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let state = AppState::new(
        Arc::new(SimDriver::new()),
        HostConfig {
            name: "h1".into(),
            capacity: Capacity {
                cpus: 4,
                memory_mib: 4096,
            },
            token: TOKEN.into(),
            state_dir: root.join("state"),
            image_dir: root.join("images"),
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(tern_agent::server::serve(
        listener,
        state,
        std::future::pending(),
    ));
    Agent {
        url,
        root,
        http: reqwest::Client::new(),
        _dir: dir,
    }
}

impl Agent {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    async fn create(&self, spec: Value) -> (u16, Value) {
        self.call(
            reqwest::Method::POST,
            "/v1/vms",
            Some(json!({"id": "v1", "spec": spec})),
        )
        .await
    }
}

fn write(path: &Path) -> PathBuf {
    std::fs::write(path, b"x").unwrap();
    path.to_path_buf()
}

#[tokio::test]
async fn vm_ids_with_dot_dot_cannot_reach_files_outside_the_state_dir() {
    let a = start_agent().await;
    // state/vms/../../victim.json is the file a record path built from the id would name.
    let victim = write(&a.root.join("victim.json"));
    for method in [reqwest::Method::DELETE, reqwest::Method::GET] {
        let (status, body) = a
            .call(method.clone(), "/v1/vms/..%2F..%2Fvictim", None)
            .await;
        assert_eq!(status, 400, "{method} {body}");
        assert!(
            body["error"].as_str().unwrap().contains("VM name"),
            "{body}"
        );
    }
    for action in ["start", "pause", "resume", "stop", "metrics", "guest"] {
        let method = if action == "metrics" {
            reqwest::Method::GET
        } else {
            reqwest::Method::POST
        };
        let path = format!("/v1/vms/..%2F..%2Fvictim/{action}");
        let (status, _) = a.call(method, &path, Some(json!({"cmd": "ping"}))).await;
        assert_eq!(status, 400, "{path}");
    }
    assert!(
        victim.exists(),
        "DELETE removed a file outside the state directory"
    );
}

#[tokio::test]
async fn kernel_and_initramfs_must_lie_under_the_image_dir() {
    let a = start_agent().await;
    let kernel = write(&a.root.join("images/vmlinuz"));
    let outside = write(&a.root.join("secret"));
    std::os::unix::fs::symlink(&outside, a.root.join("images/link")).unwrap();
    let cases = [
        (
            "/etc/shadow as initramfs",
            json!(kernel),
            json!("/etc/shadow"),
        ),
        ("a kernel outside", json!(outside), Value::Null),
        (
            "dot-dot out of the image dir",
            json!(a.root.join("images/../secret")),
            Value::Null,
        ),
        (
            "a symlink out of the image dir",
            json!(kernel),
            json!(a.root.join("images/link")),
        ),
    ];
    for (what, k, i) in cases {
        let (status, body) = a
            .create(json!({"memory_mib": 64, "kernel": k, "initramfs": i}))
            .await;
        assert_eq!(status, 400, "{what}: {body}");
        let msg = body["error"].as_str().unwrap();
        assert!(msg.contains("image directory"), "{what}: {msg}");
    }
    let (status, body) = a.call(reqwest::Method::GET, "/v1/vms", None).await;
    assert_eq!((status, body), (200, json!([])), "nothing was created");
    // A kernel inside the image directory is taken.
    let (status, body) = a.create(json!({"memory_mib": 64, "kernel": kernel})).await;
    assert_eq!(status, 201, "{body}");
}

#[tokio::test]
async fn request_bodies_over_2_mib_are_refused() {
    let a = start_agent().await;
    let huge = json!({"id": "v1", "spec": {"memory_mib": 64, "cmdline": "x".repeat(3 << 20)}});
    for path in ["/v1/vms", "/v1/migrations", "/v1/incoming"] {
        let (status, body) = a
            .call(reqwest::Method::POST, path, Some(huge.clone()))
            .await;
        assert_eq!(status, 413, "{path}: {body}");
        assert_eq!(body["kind"], "too_large", "{path}: {body}");
    }
}

/// A destination that accepts connections and never answers keeps a `qemu-native`
/// migration in its prepare phase for as long as the test needs.
async fn silent_destination() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    url
}

#[tokio::test]
async fn lifecycle_actions_on_a_migrating_vm_are_refused() {
    let a = start_agent().await;
    let (status, body) = a.create(json!({"memory_mib": 64})).await;
    assert_eq!(status, 201, "{body}");
    let dest = silent_destination().await;
    let send = json!({"vm": "v1", "destination": dest, "token": "t", "policy": "qemu-native"});
    let (status, body) = a
        .call(reqwest::Method::POST, "/v1/migrations", Some(send.clone()))
        .await;
    assert_eq!(status, 202, "{body}");
    for action in ["pause", "stop"] {
        let (status, body) = a
            .call(reqwest::Method::POST, &format!("/v1/vms/v1/{action}"), None)
            .await;
        assert_eq!(status, 409, "{action}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains("migrated"),
            "{body}"
        );
    }
    let (status, body) = a.call(reqwest::Method::DELETE, "/v1/vms/v1", None).await;
    assert_eq!(status, 409, "{body}");
    let (status, body) = a.call(reqwest::Method::GET, "/v1/vms/v1", None).await;
    assert_eq!(
        (status, body["state"].as_str()),
        (200, Some("running")),
        "{body}"
    );
    // Cancelled, the migration ends and the VM is the caller's again.
    let id = a.call(reqwest::Method::GET, "/v1/migrations", None).await.1[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    a.call(
        reqwest::Method::POST,
        &format!("/v1/migrations/{id}/cancel"),
        None,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sends_of_one_vm_start_one_migration() {
    let a = Arc::new(start_agent().await);
    let (status, body) = a.create(json!({"memory_mib": 64})).await;
    assert_eq!(status, 201, "{body}");
    let dest = silent_destination().await;
    let send = json!({"vm": "v1", "destination": dest, "token": "t", "policy": "qemu-native"});
    let tries: Vec<_> = (0..32)
        .map(|_| {
            let (a, send) = (a.clone(), send.clone());
            tokio::spawn(async move {
                a.call(reqwest::Method::POST, "/v1/migrations", Some(send))
                    .await
                    .0
            })
        })
        .collect();
    let mut accepted = 0;
    for t in tries {
        match t.await.unwrap() {
            202 => accepted += 1,
            409 => {}
            s => panic!("unexpected status {s}"),
        }
    }
    assert_eq!(accepted, 1);
    let (_, list) = a.call(reqwest::Method::GET, "/v1/migrations", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    tokio::time::sleep(Duration::from_millis(10)).await;
}
