//! `tern agent vm trace` and `tern trace` refuse bad input with exit status 2 and leave nothing in the
//! output directory: a duration of 0 or over an hour, an output path that cannot be
//! written, an unknown VM, a VM on a driver without host threads. (Recording a real
//! guest is tested in `tern-trace` and `tern-agent`.)

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::sync::Arc;
use tern_agent::host::Capacity;
use tern_agent::{AppState, HostConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_traces_exit_2_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = AppState::new(
        Arc::new(tern_hv::sim::SimDriver::new()),
        HostConfig {
            name: "h1".into(),
            capacity: Capacity {
                cpus: 2,
                memory_mib: 1024,
            },
            token: "tok".into(),
            state_dir: dir.path().join("state"),
            image_dir: dir.path().join("images"),
        },
    );
    let spec = serde_json::from_value(serde_json::json!({"vcpus": 2, "memory_mib": 64}));
    state
        .create_vm("simvm", spec.unwrap(), false, true)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tern_agent::server::serve(listener, state, async {
        let _ = rx.await;
    }));
    let token = dir.path().join("token");
    std::fs::write(&token, "tok\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("trace.json");

    let cases: [(&str, &str, &str, &str); 5] = [
        ("simvm", "0s", "x", "out of range"),
        ("simvm", "61m", "x", "out of range"),
        (
            "simvm",
            "1s",
            "/nonexistent-dir/trace.json",
            "cannot write there",
        ),
        ("ghost", "1s", "x", "404"),
        ("simvm", "1s", "x", "sim driver"),
    ];
    for (vm, duration, path, says) in cases {
        let path = if path == "x" {
            out.to_str().unwrap()
        } else {
            path
        };
        let args = [
            "agent",
            "vm",
            "--agent",
            &url,
            "--token-file",
            token.to_str().unwrap(),
            "trace",
            vm,
            "--duration",
            duration,
            "--out",
            path,
        ];
        let o = tokio::task::spawn_blocking({
            let args = args.map(str::to_string);
            move || {
                Command::new(env!("CARGO_BIN_EXE_tern"))
                    .args(&args)
                    .output()
                    .unwrap()
            }
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{vm} {duration} {path}: {stderr}");
        assert!(stderr.contains(says), "{vm} {duration} {path}: {stderr}");
        let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
        assert!(left.is_empty(), "{vm} {duration} {path} left {left:?}");
    }
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}

/// `tern trace` through the manager: the same refusals, exit 2 and nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_manager_traces_exit_2_and_write_nothing() {
    use tern_manager::decide::Command as M;
    let dir = tempfile::tempdir().unwrap();
    let store = tern_manager::store::SqliteStore::open(&dir.path().join("tern.db")).unwrap();
    let manager = Arc::new(
        tern_manager::Manager::open(Box::new(store), tern_manager::manager::system_clock())
            .unwrap(),
    );
    manager
        .execute(M::RegisterHost {
            name: "h1".into(),
            address: "http://127.0.0.1:9".into(),
            capacity: tern_manager::state::Capacity {
                cpus: 2.0,
                memory_mib: 4096,
            },
        })
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tern_manager::api::serve(
        listener,
        manager.clone(),
        vec!["tok".into()],
        async {
            let _ = rx.await;
        },
    ));
    let c = reqwest::Client::new();
    let created = c
        .post(format!("{url}/v1/vms"))
        .bearer_auth("tok")
        .json(&serde_json::json!({"name": "v1", "spec": {"vcpus": 2, "memory_mib": 512}}))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{created:?}");
    let token = dir.path().join("token");
    std::fs::write(&token, "tok\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("trace.json");
    let cases = [
        ("v1", "0s", "out of range"),
        ("v1", "2h", "out of range"),
        ("ghost", "1s", "no VM named"),
        ("v1", "1s", "not running"),
    ];
    for (vm, duration, says) in cases {
        let args = [
            "trace",
            "--manager",
            &url,
            "--token-file",
            token.to_str().unwrap(),
            vm,
            "--duration",
            duration,
            "--out",
            out.to_str().unwrap(),
        ]
        .map(str::to_string);
        let o = tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_tern"))
                .args(&args)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{vm} {duration}: {stderr}");
        assert!(stderr.contains(says), "{vm} {duration}: {stderr}");
        let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().collect();
        assert!(left.is_empty(), "{vm} {duration} left {left:?}");
    }
    tx.send(()).unwrap();
    server.await.unwrap().unwrap();
}
