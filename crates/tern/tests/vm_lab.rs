//! `tern vm` through a `tern manager` process driving real agents (needs root and QEMU):
//! a 2-host lab, a VM created on a named host, migrated there and back with tern's
//! engine while the manager relays the source agent's telemetry, and the VM's record
//! following it. The guest has no kernel (its memory stays zero pages), so the test is
//! about the control path, not the guest.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn tern(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env("TERN_STATE", state)
        .env_remove("TERN_TOKEN")
        .env_remove("TERN_MANAGER")
        .output()
        .expect("tern runs")
}

fn json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "tern failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

/// Tears down what the test started, however it ends.
struct Teardown {
    state: std::path::PathBuf,
    manager: Option<Child>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if let Some(mut m) = self.manager.take() {
            let _ = m.kill();
            let _ = m.wait();
        }
        let _ = tern(&self.state, &["lab", "down"]);
    }
}

#[test]
fn a_vm_migrates_through_the_manager_with_relayed_progress() {
    if !tern_agent::lab::require_lab("the vm lab test", &[]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path();
    let up = json(&tern(
        st,
        &["lab", "up", "--hosts", "2", "--link-mbit", "1000", "--json"],
    ));
    let mut down = Teardown {
        state: st.to_path_buf(),
        manager: None,
    };
    let token = std::fs::read_to_string(up["token_file"].as_str().unwrap()).unwrap();
    let token = token.lines().next().unwrap().to_owned();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let db = st.join("manager.db");
    down.manager = Some(
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["manager", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--db", db.to_str().unwrap(), "--token", &token])
            .env_remove("TERN_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let cli = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(["--manager", &url, "--token", &token]);
        tern(st, &a)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cli(&["host", "list"]).status.success() {
        assert!(Instant::now() < deadline, "the manager did not answer");
        std::thread::sleep(Duration::from_millis(100));
    }
    for h in up["hosts"].as_array().unwrap() {
        let name = h["name"].as_str().unwrap();
        let address = h["url"].as_str().unwrap();
        let reg = ["host", "register", name, "--address", address];
        json(&cli(&[
            &reg[..],
            &["--cpus", "2", "--memory-mib", "4096", "--json"],
        ]
        .concat()));
    }

    json(&cli(&[
        "vm",
        "create",
        "g",
        "--memory-mib",
        "512",
        "--host",
        "h1",
        "--json",
    ]));
    let deadline = Instant::now() + Duration::from_secs(30);
    while json(&cli(&["vm", "show", "g", "--json"]))["state"] != "running" {
        assert!(Instant::now() < deadline, "g never ran on h1");
        std::thread::sleep(Duration::from_millis(200));
    }
    for (from, to) in [("h1", "h2"), ("h2", "h1")] {
        let r = json(&cli(&["vm", "migrate", "g", "--to", to, "--json"]));
        assert_eq!(r["result"]["status"], "succeeded", "{r}");
        assert_eq!(
            (r["from"].as_str(), r["to"].as_str()),
            (Some(from), Some(to))
        );
        // What the CLI saw (if the migration outlived a poll) came from the source agent.
        let p = &r["last_progress"];
        if !p.is_null() {
            let phase = p["phase"].as_str().unwrap();
            let known = [
                "preparing",
                "connecting",
                "pre_copy",
                "stop_and_copy",
                "device_state",
                "resuming",
            ];
            assert!(known.contains(&phase), "{p}");
            assert!(p["bytes_remaining"].as_u64().unwrap() <= 512 << 20, "{p}");
        }
        let v = json(&cli(&["vm", "show", "g", "--json"]));
        assert_eq!(v["observed_host"], to, "{v}");
        eprintln!(
            "{from} -> {to}: {} ms total, {} ms down, {} progress updates seen",
            r["result"]["total_ms"], r["result"]["downtime_ms"], r["progress_updates"]
        );
    }
    let bad = cli(&["vm", "migrate", "g", "--to", "h9"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("h9"));
    drop(down);
}
