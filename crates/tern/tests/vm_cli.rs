//! `tern vm` against a real manager (SQLite state, HTTP API on loopback, control loop)
//! whose hosts are in-process sim hosts with migrations paced to take real time: create
//! placed and on a named host, list, show, a migration whose progress the CLI sees
//! before it completes, one to a host the manager picks, one started with `--no-wait`
//! and followed with `show`, delete, and bad input (unknown VM or host) exiting with 2.

use std::process::Output;
use std::sync::Arc;
use std::time::Duration;
use tern_manager::decide::HostAddresses;

use serde_json::Value;
use tern_manager::control::Control;
use tern_manager::decide::Command;
use tern_manager::manager::system_clock;
use tern_manager::state::{BalancerSettings, Capacity};
use tern_manager::store::SqliteStore;
use tern_manager::Manager;
use tern_simhost::SimCluster;

const TOKEN: &str = "vm-cli-token";

struct Served {
    base: String,
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    sim: Arc<SimCluster>,
    _dir: tempfile::TempDir,
}

async fn serve() -> Served {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("tern.db")).unwrap();
    let manager = Arc::new(
        Manager::open(Box::new(store), system_clock())
            .unwrap()
            .serving(HostAddresses::Sim),
    );
    let sim = SimCluster::new();
    let mut cmds = vec![Command::PutSettings(BalancerSettings {
        enabled: false,
        interval_s: 1,
        ..BalancerSettings::default()
    })];
    for h in ["alpha", "beta", "gamma"] {
        sim.add_host(h);
        cmds.push(Command::RegisterHost {
            name: h.into(),
            address: "sim:".into(),
            capacity: Capacity {
                cpus: 8.0,
                memory_mib: 32768,
            },
        });
    }
    for r in manager.execute_many(cmds).unwrap() {
        r.unwrap();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, rx) = tokio::sync::watch::channel(false);
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let control = Control::new(manager.clone(), sim.clone());
    let looping = tokio::spawn(control.run(wait(rx.clone())));
    let api = tokio::spawn({
        let stopped = wait(rx);
        async move {
            tern_manager::api::serve(listener, manager, vec![TOKEN.into()], stopped)
                .await
                .unwrap()
        }
    });
    Served {
        base,
        stop,
        tasks: vec![looping, api],
        sim,
        _dir: dir,
    }
}

impl Served {
    /// Runs `tern vm ARGS` off the async threads; stdout is a pipe, so no bar is drawn.
    async fn tern(&self, args: &[&str]) -> Output {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tern"));
        cmd.arg("vm")
            .args(args)
            .args(["--manager", &self.base])
            .env("TERN_TOKEN", TOKEN)
            .env_remove("TERN_MANAGER");
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    async fn json(&self, args: &[&str]) -> Value {
        let out = self.tern(args).await;
        assert!(
            out.status.success(),
            "tern vm {args:?}: {}",
            text(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("tern vm {args:?}: {e}: {}", text(&out.stdout)))
    }

    /// Waits until the VM runs (the control loop created it on its host).
    async fn running(&self, vm: &str) -> Value {
        for _ in 0..100 {
            let v = self.json(&["show", vm, "--json"]).await;
            if v["state"] == "running" {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{vm} never ran");
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_are_created_listed_migrated_with_progress_and_deleted() {
    let srv = serve().await;
    // A tenth of the model's time: a busy 2 GiB guest takes a few seconds to move.
    srv.sim.set_migration_pace(0.1);

    let placed = srv
        .json(&[
            "create",
            "web",
            "--vcpus",
            "2",
            "--memory-mib",
            "2048",
            "--json",
        ])
        .await;
    assert!(placed["desired_host"].is_string(), "placed: {placed}");
    let named = srv
        .json(&[
            "create",
            "db",
            "--host",
            "gamma",
            "--vcpus",
            "1",
            "--memory-mib",
            "1024",
            "--json",
        ])
        .await;
    assert_eq!(named["desired_host"], "gamma");
    let web = srv.running("web").await;
    srv.running("db").await;
    srv.sim.set_utilisation("web", 0.8).await.unwrap();

    let list = srv.tern(&["list"]).await;
    assert!(list.status.success());
    let table = text(&list.stdout);
    assert!(table.starts_with("NAME"), "{table}");
    for needle in ["web", "db", "gamma", "running"] {
        assert!(
            table.contains(needle),
            "{needle} not in the table:\n{table}"
        );
    }

    let from = web["observed_host"].as_str().unwrap().to_owned();
    let to = if from == "alpha" { "beta" } else { "alpha" };
    let result = srv
        .json(&[
            "migrate", "web", "--to", to, "--policy", "adaptive", "--json",
        ])
        .await;
    assert_eq!(result["result"]["status"], "succeeded", "{result}");
    assert_eq!(
        (result["from"].as_str(), result["to"].as_str()),
        (Some(from.as_str()), Some(to))
    );
    assert!(
        result["progress_updates"].as_u64().unwrap() >= 1,
        "no progress seen before the migration completed: {result}"
    );
    let last = &result["last_progress"];
    for key in [
        "round",
        "bytes_transferred",
        "bytes_remaining",
        "dirty_rate_bytes_per_s",
    ] {
        assert!(last[key].is_number(), "{key} missing in {last}");
    }
    let moved = srv.json(&["show", "web", "--json"]).await;
    assert_eq!(moved["observed_host"], to);
    // Without --to the manager picks the destination; stop-copy has no rounds to watch.
    let picked = srv
        .json(&["migrate", "web", "--policy", "stop-copy", "--json"])
        .await;
    assert_eq!(picked["result"]["status"], "succeeded", "{picked}");
    assert_eq!(picked["from"], to);
    let to = picked["to"].as_str().unwrap().to_owned();
    assert_ne!(to, picked["from"].as_str().unwrap());
    let to = to.as_str();
    // --no-wait returns at once; `show` then tells how far the migration got.
    let back = if to == "gamma" { "alpha" } else { "gamma" };
    let started = srv
        .json(&["migrate", "web", "--to", back, "--no-wait", "--json"])
        .await;
    assert_eq!(started["result"]["status"], "running", "{started}");
    let mut seen = String::new();
    for _ in 0..100 {
        let out = srv.tern(&["show", "web"]).await;
        let shown = text(&out.stdout);
        if shown.contains("remaining") {
            seen = shown;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        seen.contains(&format!("{to} -> {back} (adaptive)")),
        "no telemetry in `tern vm show` while it migrated: {seen}"
    );
    let moved = srv.running("web").await;
    assert_eq!(moved["observed_host"], back);
    let to = back;

    // Bad input: a message naming the problem, exit status 2, nothing changed.
    for (args, needle) in [
        (vec!["migrate", "nosuch", "--to", "beta"], "nosuch"),
        (vec!["migrate", "web", "--to", "nowhere"], "nowhere"),
        (vec!["show", "nosuch"], "nosuch"),
        (
            vec![
                "create",
                "x",
                "--host",
                "nowhere",
                "--vcpus",
                "1",
                "--memory-mib",
                "64",
            ],
            "nowhere",
        ),
        (
            vec!["create", "x", "--template", "nope"],
            "no template named",
        ),
        (vec!["delete", "nosuch"], "nosuch"),
        (vec!["create", "Web_1"], "VM name \"Web_1\" is invalid"),
        (
            vec!["migrate", "web", "--to", "a/b"],
            "host name \"a/b\" is invalid",
        ),
    ] {
        let out = srv.tern(&args).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed {}",
            text(&out.stdout)
        );
    }
    let after = srv.json(&["show", "web", "--json"]).await;
    assert_eq!(after["observed_host"], to);

    let deleted = srv.json(&["delete", "db", "--json"]).await;
    assert_eq!(deleted["state"], "deleting");
    srv.stop().await;
}

/// The lifecycle through the CLI on simulated hosts: every action in the state it needs,
/// a 409 naming the state otherwise (exit 2, the VM unchanged), and an action its host
/// cannot do (suspend: a simulated host keeps no memory) refused with the VM as it was.
#[tokio::test(flavor = "multi_thread")]
async fn the_lifecycle_follows_its_state_machine() {
    let srv = serve().await;
    let made = srv
        .json(&[
            "create",
            "box",
            "--vcpus",
            "1",
            "--memory-mib",
            "512",
            "--json",
        ])
        .await;
    assert_eq!(made["spec"]["vcpus"], 1);
    srv.running("box").await;
    let state = |v: &Value| v["state"].as_str().unwrap().to_owned();
    for (action, want) in [
        ("pause", "paused"),
        ("resume", "running"),
        ("reboot", "running"),
        ("stop", "stopped"),
    ] {
        let v = srv.json(&[action, "box", "--json"]).await;
        assert_eq!(state(&v), want, "{action}: {v}");
    }
    // Stopped: what needs it running is refused, naming the state.
    for action in ["pause", "resume", "reboot", "suspend", "stop", "restore"] {
        let out = srv.tern(&[action, "box"]).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{action}: {}",
            text(&out.stderr)
        );
        let err = text(&out.stderr);
        assert!(
            err.contains("is stopped") && err.contains("409"),
            "{action}: {err}"
        );
    }
    assert_eq!(
        state(&srv.json(&["show", "box", "--json"]).await),
        "stopped"
    );
    // It stays stopped (the control loop does not start it again), then starts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        state(&srv.json(&["show", "box", "--json"]).await),
        "stopped"
    );
    let v = srv.json(&["start", "box", "--json"]).await;
    assert_eq!(state(&v), "running");
    // A host that cannot do it: refused, the VM as it was.
    let out = srv.tern(&["suspend", "box"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("keeps no guest memory"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        state(&srv.json(&["show", "box", "--json"]).await),
        "running"
    );
    let out = srv.tern(&["stop", "box", "--timeout", "0"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vms_migration_policy_is_set_shown_and_used_and_taint_needs_a_guest_agent() {
    let srv = serve().await;
    let made = srv
        .json(&[
            "create",
            "dep",
            "--vcpus",
            "1",
            "--memory-mib",
            "256",
            "--migration-policy",
            "dependency-aware",
            "--json",
        ])
        .await;
    assert_eq!(made["spec"]["migration_policy"], "dependency-aware");
    srv.running("dep").await;
    // A migration that names no policy takes the VM's.
    let m = srv.json(&["migrate", "dep", "--json"]).await;
    assert_eq!(m["policy"], "dependency-aware", "{m}");
    let set = srv
        .json(&["migration-policy", "dep", "xen", "--json"])
        .await;
    assert_eq!(set["spec"]["migration_policy"], "xen");
    let shown = srv.tern(&["show", "dep"]).await;
    assert!(
        text(&shown.stdout).contains("migration policy: xen"),
        "{}",
        text(&shown.stdout)
    );
    let m = srv.json(&["migrate", "dep", "--json"]).await;
    assert_eq!(m["policy"], "xen", "{m}");
    // The request's own policy comes first.
    let m = srv
        .json(&["migrate", "dep", "--policy", "stop-copy", "--json"])
        .await;
    assert_eq!(m["policy"], "stop-copy", "{m}");
    let cleared = srv
        .json(&["migration-policy", "dep", "default", "--json"])
        .await;
    assert!(
        cleared["spec"].get("migration_policy").is_none(),
        "{cleared}"
    );
    let bad = srv.tern(&["migration-policy", "dep", "fast"]).await;
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        text(&bad.stderr).contains("dependency-aware"),
        "{}",
        text(&bad.stderr)
    );
    let unknown = srv.tern(&["migration-policy", "nope", "xen"]).await;
    assert_eq!(unknown.status.code(), Some(2));
    assert!(
        text(&unknown.stderr).contains("nope"),
        "{}",
        text(&unknown.stderr)
    );
    // A simulated host has no guest agent to ask.
    let taint = srv.tern(&["taint", "dep"]).await;
    assert_eq!(taint.status.code(), Some(2), "{}", text(&taint.stderr));
    assert!(
        text(&taint.stderr).contains("guest agent"),
        "{}",
        text(&taint.stderr)
    );
    srv.stop().await;
}
