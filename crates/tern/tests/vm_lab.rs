//! `tern vm` through a `tern manager` process driving real agents (needs root and QEMU):
//! a 2-host lab, a VM created on a named host, migrated there and back with tern's
//! engine while the manager relays the source agent's telemetry, and the VM's record
//! following it. The guest has no kernel, so the test is about the control path, not the
//! guest: it writes 384 MiB of data into the guest's RAM file, above what the firmware
//! uses, so that round 1 takes seconds on the 1 Gbit/s link and its progress is seen
//! while it runs. The lab is made as `tern lab up` makes it (a lab CA, agents serving
//! mutual TLS only); the manager adopts the lab's CA and serves HTTPS.

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

/// Bytes of data written into the guest's memory.
const FILLED: u64 = 384 << 20;

/// Writes [`FILLED`] bytes of non-zero pages into `vm`'s RAM file on `host`, from 64 MiB
/// up: SeaBIOS, all a kernel-less guest runs, lives in the first megabyte and the top
/// of RAM, which this leaves alone.
fn fill_guest_memory(st: &std::path::Path, up: &Value, host: &str, vm: &str) {
    let h = up["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == host)
        .unwrap();
    let view = json(&tern(
        st,
        &[
            "agent",
            "vm",
            "show",
            vm,
            "--agent",
            h["url"].as_str().unwrap(),
            "--tls-dir",
            h["tls_dir"].as_str().unwrap(),
            "--json",
        ],
    ));
    let path = view["memory_file"]
        .as_str()
        .expect("the VM has a memory file");
    let mut f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    use std::io::{Seek, SeekFrom, Write};
    f.seek(SeekFrom::Start(64 << 20)).unwrap();
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251 + 1) as u8).collect();
    for _ in 0..FILLED >> 20 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_data().unwrap();
}

/// A 2-host lab, a `tern manager` process over it with both hosts registered, and VM
/// `g` running on h1 with [`FILLED`] bytes of data in its memory.
struct Lab {
    // Dropped first: the lab is torn down while its state directory still exists.
    down: Teardown,
    tmp: tempfile::TempDir,
    up: Value,
    port: u16,
}

impl Lab {
    fn st(&self) -> &std::path::Path {
        self.tmp.path()
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The lab CA's certificate, which the manager's HTTPS certificate comes from.
    fn ca_cert(&self) -> String {
        format!("{}/ca.pem", self.up["ca_dir"].as_str().unwrap())
    }

    fn token_file(&self) -> &str {
        self.up["token_file"].as_str().unwrap()
    }

    fn cli(&self, args: &[&str]) -> Output {
        let url = self.url();
        let mut a = args.to_vec();
        let ca = self.ca_cert();
        a.extend(["--manager", &url, "--token-file", self.token_file()]);
        a.extend(["--ca-cert", &ca]);
        tern(self.st(), &a)
    }

    /// Starts the manager on the lab's database and waits for it.
    fn start_manager(&mut self) {
        let db = self.st().join("manager.db");
        self.down.manager = Some(
            Command::new(env!("CARGO_BIN_EXE_tern"))
                .args(["manager", "--listen", &format!("127.0.0.1:{}", self.port)])
                .args(["--ca", self.up["ca_dir"].as_str().unwrap()])
                .args([
                    "--db",
                    db.to_str().unwrap(),
                    "--token-file",
                    self.token_file(),
                ])
                .env_remove("TERN_TOKEN")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.cli(&["host", "list"]).status.success() {
            assert!(Instant::now() < deadline, "the manager did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn new() -> Option<Lab> {
        if !tern_testkit::require_lab("the vm lab test", &[]) {
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let st = tmp.path().to_path_buf();
        let up = json(&tern(
            &st,
            &["lab", "up", "--hosts", "2", "--link-mbit", "1000", "--json"],
        ));
        let down = Teardown {
            state: st.clone(),
            manager: None,
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut lab = Lab {
            down,
            tmp,
            up,
            port,
        };
        lab.start_manager();
        for h in lab.up["hosts"].as_array().unwrap().clone() {
            let name = h["name"].as_str().unwrap();
            let address = h["url"].as_str().unwrap();
            let reg = ["host", "register", name, "--address", address];
            json(
                &lab.cli(&[&reg[..], &["--cpus", "2", "--memory-mib", "4096", "--json"]].concat()),
            );
        }
        json(&lab.cli(&[
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
        while json(&lab.cli(&["vm", "show", "g", "--json"]))["state"] != "running" {
            assert!(Instant::now() < deadline, "g never ran on h1");
            std::thread::sleep(Duration::from_millis(200));
        }
        fill_guest_memory(&st, &lab.up, "h1", "g");
        Some(lab)
    }
}

#[test]
fn a_vm_migrates_through_the_manager_with_relayed_progress() {
    let Some(lab) = Lab::new() else {
        return;
    };
    let (st, token_file, url) = (lab.st(), lab.token_file(), lab.url());
    let cli = |args: &[&str]| lab.cli(args);
    for (from, to) in [("h1", "h2"), ("h2", "h1")] {
        // The CLI follows the migration; beside it, the VM's record is read as an
        // operator's `tern vm show` would, to see the progress while round 1 runs.
        let mut a = vec!["vm", "migrate", "g", "--to", to, "--json"];
        let ca = lab.ca_cert();
        a.extend([
            "--manager",
            &url,
            "--token-file",
            token_file,
            "--ca-cert",
            &ca,
        ]);
        let mut migrate = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(&a)
            .env("TERN_STATE", st)
            .env_remove("TERN_TOKEN")
            .env_remove("TERN_MANAGER")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen: Vec<Value> = Vec::new();
        while Instant::now() < deadline && migrate.try_wait().unwrap().is_none() {
            let v = json(&cli(&["vm", "show", "g", "--json"]));
            let p = &v["migration"]["progress"];
            if p.is_object() {
                seen.push(p.clone());
            } else if !seen.is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let r = json(&migrate.wait_with_output().unwrap());
        let num = |p: &Value, k: &str| p[k].as_u64().unwrap_or(0);
        let in_round_one: Vec<&Value> = seen
            .iter()
            .filter(|p| {
                num(p, "round") == 0
                    && num(p, "running_round") == 1
                    && (1..FILLED).contains(&num(p, "bytes_transferred"))
            })
            .collect();
        assert!(
            !in_round_one.is_empty(),
            "{from} -> {to}: no progress seen while round 1 ran: {seen:?}"
        );
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
            "{from} -> {to}: {} ms total, {} ms down, {} progress updates seen by the CLI, \
             {} of {} reads of the record inside round 1",
            r["result"]["total_ms"],
            r["result"]["downtime_ms"],
            r["progress_updates"],
            in_round_one.len(),
            seen.len()
        );
    }
    let bad = cli(&["vm", "migrate", "g", "--to", "h9"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("h9"));
}
