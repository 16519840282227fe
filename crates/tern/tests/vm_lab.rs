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

mod cli_lab;

use cli_lab::{json, tern, Teardown};

/// Bytes of data written into the guest's memory.
const FILLED: u64 = 384 << 20;

/// Writes [`FILLED`] bytes of non-zero pages into `vm`'s RAM file on `host`, from 64 MiB
/// up: SeaBIOS, all a kernel-less guest runs, lives in the first megabyte and the top
/// of RAM, which this leaves alone.
fn fill_guest_memory(st: &std::path::Path, up: &Value, host: &str, vm: &str) {
    let view = agent_view(st, up, host, "show", vm);
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

/// `tern agent vm WHAT VM --json` (`show`, `metrics`) against the agent of `host`.
fn agent_view(st: &std::path::Path, up: &Value, host: &str, what: &str, vm: &str) -> Value {
    let h = up["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["name"] == host)
        .unwrap();
    json(&tern(
        st,
        &[
            "agent",
            "vm",
            what,
            vm,
            "--agent",
            h["url"].as_str().unwrap(),
            "--tls-dir",
            h["tls_dir"].as_str().unwrap(),
            "--json",
        ],
    ))
}

/// The CPU lists (`Cpus_allowed_list`) of the vCPU threads of `vm`'s QEMU on `host`, in
/// vCPU order: what the kernel lets them run on, whatever any agent says.
fn vcpu_affinity(st: &std::path::Path, up: &Value, host: &str, vm: &str) -> Vec<String> {
    let metrics = agent_view(st, up, host, "metrics", vm);
    let mut vcpus: Vec<(u64, u64)> = metrics["vcpus"]
        .as_array()
        .expect("vCPU samples")
        .iter()
        .map(|v| {
            (
                v["index"].as_u64().unwrap(),
                v["thread_id"].as_u64().unwrap(),
            )
        })
        .collect();
    vcpus.sort();
    vcpus
        .into_iter()
        .map(|(_, tid)| {
            let status = std::fs::read_to_string(format!("/proc/{tid}/status")).unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|l| l.trim().to_owned())
                .expect("Cpus_allowed_list")
        })
        .collect()
}

/// Waits up to `secs` for `vm`'s vCPU threads on `host` to have CPU lists `want`.
fn await_affinity(lab: &Lab, host: &str, vm: &str, want: &[String], secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let got = vcpu_affinity(lab.st(), &lab.up, host, vm);
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{vm} on {host}: vCPU CPU lists {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
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

    /// [`Lab::cli`] in the background, its output piped.
    fn spawn(&self, args: &[&str]) -> Child {
        let (url, ca) = (self.url(), self.ca_cert());
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(args)
            .args(["--manager", &url, "--token-file", self.token_file()])
            .args(["--ca-cert", &ca])
            .env("TERN_STATE", self.st())
            .env_remove("TERN_TOKEN")
            .env_remove("TERN_MANAGER")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
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
        Lab::with(&[])
    }

    /// [`Lab::new`], with `create` added to `tern vm create g`'s arguments.
    fn with(create: &[&str]) -> Option<Lab> {
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
        let args = ["vm", "create", "g", "--memory-mib", "512", "--host", "h1"];
        json(&lab.cli(&[&args[..], create, &["--json"]].concat()));
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

/// A VM created with `--vcpu-policy pin` runs pinned on its host, arrives pinned on the
/// destination of a live migration through the manager, and `tern vm vcpu-policy` takes
/// the policy off again; one set while the VM migrates back is applied on arrival.
/// Judged by the kernel's CPU lists of the QEMU vCPU threads.
#[test]
fn a_pinned_vm_arrives_pinned_after_a_live_migration() {
    let Some(lab) = Lab::with(&["--vcpus", "2", "--vcpu-policy", "pin"]) else {
        return;
    };
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap();
    let online = tern_agent::vcpu::parse_cpu_list(&text).unwrap();
    let pinned: Vec<String> = (0..2)
        .map(|i| tern_agent::vcpu::pin_cpu(i, &online).unwrap().to_string())
        .collect();
    let free = cpu_list(&online);
    assert!(
        online.len() < 2 || pinned.iter().all(|p| *p != free),
        "this host's CPUs cannot tell pinned from free: {online:?}"
    );
    let started = Instant::now();
    let v = json(&lab.cli(&["vm", "show", "g", "--json"]));
    assert_eq!(v["spec"]["vcpu_policy"], "pin", "{v}");
    await_affinity(&lab, "h1", "g", &pinned, 20);
    let r = json(&lab.cli(&["vm", "migrate", "g", "--to", "h2", "--json"]));
    assert_eq!(r["result"]["status"], "succeeded", "{r}");
    await_affinity(&lab, "h2", "g", &pinned, 10);
    eprintln!(
        "pinned on h1, migrated ({} ms, {} ms down) and pinned on h2 after {:?}",
        r["result"]["total_ms"],
        r["result"]["downtime_ms"],
        started.elapsed()
    );
    let o = lab.cli(&["vm", "vcpu-policy", "g", "none", "--json"]);
    assert_eq!(json(&o)["policy"], "none");
    await_affinity(&lab, "h2", "g", &[free.clone(), free], 10);
    let v = json(&lab.cli(&["vm", "show", "g", "--json"]));
    assert_eq!(v["spec"]["vcpu_policy"], "none", "{v}");
    // Set while it migrates back: recorded, and applied on the destination by the
    // manager once the migration is done (the source carried `none`).
    let back = lab.spawn(&["vm", "migrate", "g", "--to", "h1", "--json"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while json(&lab.cli(&["vm", "show", "g", "--json"]))["state"] != "migrating" {
        assert!(Instant::now() < deadline, "g never migrated back");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        json(&lab.cli(&["vm", "vcpu-policy", "g", "pin", "--json"]))["policy"],
        "pin"
    );
    let still = json(&lab.cli(&["vm", "show", "g", "--json"]));
    let r = json(&back.wait_with_output().unwrap());
    assert_eq!(r["result"]["status"], "succeeded", "{r}");
    await_affinity(&lab, "h1", "g", &pinned, 10);
    eprintln!(
        "set to pin while {}, pinned on h1 after the migration",
        still["state"]
    );
    let bad = lab.cli(&["vm", "vcpu-policy", "g", "fifo"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("none, pin, gang"));
}

/// The kernel's CPU list of every online CPU (`0-1`), as a free thread shows it.
fn cpu_list(online: &[usize]) -> String {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for &c in online {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == c => *end = c,
            _ => runs.push((c, c)),
        }
    }
    let run = |&(a, b): &(usize, usize)| match a == b {
        true => a.to_string(),
        false => format!("{a}-{b}"),
    };
    runs.iter().map(run).collect::<Vec<_>>().join(",")
}

/// `tern trace` through the manager keeps recording when the VM migrates during the
/// window: the rest is recorded on the destination, the report has both hosts' parts
/// and the Perfetto file one core process per host, with tracks named apart.
#[test]
fn a_trace_follows_its_vm_across_a_live_migration() {
    let Some(lab) = Lab::with(&["--vcpus", "2"]) else {
        return;
    };
    let out = lab.st().join("trace.json");
    let mut args = vec!["trace", "g", "--duration", "8s", "--host-only", "--json"];
    args.extend(["--out", out.to_str().unwrap()]);
    let trace = lab.spawn(&args);
    std::thread::sleep(Duration::from_millis(1500));
    let m = json(&lab.cli(&["vm", "migrate", "g", "--to", "h2", "--json"]));
    assert_eq!(m["result"]["status"], "succeeded", "{m}");
    let r = json(&trace.wait_with_output().unwrap());
    let segments = r["segments"].as_array().expect("a trace in segments");
    let hosts: Vec<&str> = segments
        .iter()
        .map(|s| s["host"].as_str().unwrap())
        .collect();
    assert_eq!(hosts, ["h1", "h2"], "{r}");
    for s in segments {
        assert!(s["summary"]["events"].as_u64().unwrap() > 0, "{s}");
    }
    let events = |s: &Value| s["summary"]["events"].as_u64().unwrap();
    assert_eq!(
        r["events"].as_u64().unwrap(),
        segments.iter().map(events).sum::<u64>()
    );
    let file: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let evs = file["traceEvents"].as_array().unwrap();
    // Each host's cores: a process of their own, tracks named after the host, and
    // vCPU slices on them.
    for (pid, host) in [(1, "h1"), (11, "h2")] {
        let tracks: Vec<&str> = evs
            .iter()
            .filter(|e| e["name"] == "thread_name" && e["pid"] == pid)
            .map(|e| e["args"]["name"].as_str().unwrap())
            .collect();
        assert!(
            !tracks.is_empty()
                && tracks
                    .iter()
                    .all(|t| t.starts_with(&format!("{host} cpu "))),
            "{host}: {tracks:?}"
        );
        let slices = evs
            .iter()
            .filter(|e| e["ph"] == "X" && e["pid"] == pid)
            .count();
        assert!(slices > 0, "no vCPU ran on {host}'s cores in the trace");
    }
    let offset = segments[1]["offset_ns"].as_u64().unwrap() as f64 / 1e6;
    eprintln!(
        "trace: {} events on h1, {} on h2 from {offset:.0} ms; migration {} ms, {} ms down",
        events(&segments[0]),
        events(&segments[1]),
        m["result"]["total_ms"],
        m["result"]["downtime_ms"]
    );
}
