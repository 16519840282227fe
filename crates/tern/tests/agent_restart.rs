//! Restarting `tern agent` under running guests, with real QEMU (TCG) on loopback:
//!
//! - `sigterm_stops_the_agent_only_and_the_next_agent_adopts_its_vms`: a guest runs a
//!   memory-dirtying workload; the agent gets SIGTERM and exits, the guest's QEMU keeps
//!   its pid; an agent started again on the same state directory adopts it, and the
//!   guest's counter went on meanwhile. Then the same with SIGINT (a Ctrl-C, sent to the
//!   agent's whole process group, which QEMU is not part of).
//! - `stop_vms_on_exit_destroys_the_vms_with_the_agent`: an agent started with
//!   `--stop-vms-on-exit` takes its guests down with it on SIGTERM; nothing is left.
//!
//! - `an_adopted_vms_console_works_on_a_terminal`: after an agent restart the adopted
//!   guest's serial console is reached with `tern agent vm console` on a pseudo-terminal:
//!   it answers what is typed, Ctrl-] detaches, and the terminal's settings are back;
//!   without a terminal `--timeout` ends an attach.
//!
//! Needs QEMU; without it the tests say why and pass (under `CI` they must run).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use tern_agent::client::AgentClient;
use tern_agent::vms::CreateVm;

mod support;

const TOKEN: &str = "agent-restart-token";

/// One agent directory, and the agent process while it runs; killed however the test ends.
struct Agent {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
    client: AgentClient,
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Whatever QEMU the test left behind goes with it.
        tern_agent::fence::stop_guests(&self.dir.path().join("state/run"));
    }
}

impl Agent {
    fn new() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let port = tern_testkit::free_port();
        let client = AgentClient::new(
            &format!("http://127.0.0.1:{port}"),
            TOKEN,
            Duration::from_secs(30),
        )
        .unwrap();
        Agent {
            dir,
            port,
            child: None,
            client,
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Starts the agent (with `extra` flags) and waits until it answers.
    async fn start(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["agent", "--listen", &format!("127.0.0.1:{}", self.port)])
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--token-file")
            .arg(self.dir.path().join("token"))
            .arg("--mem-dir")
            .arg(self.dir.path().join("mem"))
            .arg("--image-dir")
            .arg(tern_testkit::test_cache_dir())
            .args(["--name", "h1", "--cpus", "2", "--memory-mib", "1024"])
            .args(extra)
            .env("TERN_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let t0 = Instant::now();
        while self.client.host().await.is_err() {
            assert!(t0.elapsed() < Duration::from_secs(20), "agent not up");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends `signal` to the agent and waits until it has exited, within 30 s.
    fn stop(&mut self, signal: &str) -> Duration {
        let mut child = self.child.take().expect("the agent runs");
        let t0 = Instant::now();
        assert!(Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status()
            .unwrap()
            .success());
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "the agent exited with {status}");
                return t0.elapsed();
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "agent still runs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The guest's verifier counter, checked.
    async fn counter(&self, vm: &str) -> u64 {
        support::guest_counter(&self.client, vm).await
    }
}

/// Whether `pid` is a live QEMU process (not a zombie).
fn qemu_alive(pid: u32) -> bool {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    !cmd.is_empty() && String::from_utf8_lossy(&cmd).contains("qemu")
}

async fn guest(a: &Agent, img: &tern_hv::image::GuestImage, id: &str) -> u32 {
    let req: CreateVm = serde_json::from_value(json!({
        "id": id,
        "spec": {"vcpus": 1, "memory_mib": 256, "kernel": img.kernel,
                 "initramfs": img.initramfs,
                 "cmdline": format!("{} tern.hostname={id}", img.cmdline)}
    }))
    .unwrap();
    let pid = a.client.create_vm(&req).await.unwrap().info.pid.unwrap();
    let t0 = Instant::now();
    while a.client.guest(id, &json!({"cmd": "ping"})).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "guest never answered"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let started = a
        .client
        .guest(
            id,
            &json!({"cmd": "start", "workload": "memdirty --mib 8 --mbps 5"}),
        )
        .await
        .unwrap();
    assert_eq!(started["ok"], true, "{started}");
    pid
}

async fn image() -> Option<tern_hv::image::GuestImage> {
    if !tern_testkit::require_qemu() {
        return None;
    }
    Some(
        tern_hv::image::ensure_image_async(tern_testkit::test_cache_dir(), |s| {
            eprintln!("image: {s}")
        })
        .await
        .expect("guest image builds"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_agent_only_and_the_next_agent_adopts_its_vms() {
    let Some(img) = image().await else {
        return;
    };
    let mut a = Agent::new();
    a.start(&[]).await;
    let pid = guest(&a, &img, "g1").await;
    for signal in ["TERM", "INT"] {
        let c0 = a.counter("g1").await;
        let took = a.stop(signal);
        assert!(qemu_alive(pid), "SIG{signal} to the agent ended its guest");
        assert!(
            a.log().contains("leaving this host's VMs running"),
            "{}",
            a.log()
        );
        // The guest runs on with no agent at all for a while.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(qemu_alive(pid));
        a.start(&[]).await;
        let vms = a.client.list_vms().await.unwrap();
        assert_eq!(vms.len(), 1, "{vms:?}");
        assert_eq!(vms[0].info.pid, Some(pid), "the same QEMU, adopted");
        assert_eq!(vms[0].info.state, tern_hv::VmState::Running);
        let c1 = a.counter("g1").await;
        assert!(c1 > c0, "the guest's counter went on: {c0} -> {c1}");
        eprintln!(
            "SIG{signal}: agent stopped in {took:?}, QEMU {pid} adopted, counter {c0} -> {c1}"
        );
    }
    // Stopping the VM is explicit: delete it, and nothing is left.
    a.client.delete_vm("g1").await.unwrap();
    a.stop("TERM");
    assert!(tern_testkit::qemus_under(&a.state_dir()).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_vms_on_exit_destroys_the_vms_with_the_agent() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let mut a = Agent::new();
    a.start(&["--stop-vms-on-exit"]).await;
    // A firmware-only VM: no guest to wait for.
    let req: CreateVm =
        serde_json::from_value(json!({"id": "f1", "spec": {"vcpus": 1, "memory_mib": 64}}))
            .unwrap();
    let pid = a.client.create_vm(&req).await.unwrap().info.pid.unwrap();
    assert!(qemu_alive(pid));
    a.stop("TERM");
    assert!(!qemu_alive(pid), "QEMU {pid} outlived --stop-vms-on-exit");
    assert!(tern_testkit::qemus_under(&a.state_dir()).is_empty());
    assert!(
        a.log().contains("destroying this host's VMs"),
        "{}",
        a.log()
    );
    // The next agent finds nothing to adopt.
    a.start(&[]).await;
    assert!(a.client.list_vms().await.unwrap().is_empty());
    a.stop("TERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_vms_console_works_on_a_terminal() {
    use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    let Some(img) = image().await else {
        return;
    };
    let mut a = Agent::new();
    a.start(&[]).await;
    guest(&a, &img, "g1").await;
    a.stop("TERM");
    a.start(&[]).await;

    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).unwrap();
    grantpt(&master).unwrap();
    unlockpt(&master).unwrap();
    let name = ptsname(&master, Vec::new()).unwrap();
    let tty = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_str().unwrap())
            .unwrap()
    };
    let slave = tty();
    let before = rustix::termios::tcgetattr(&slave).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args([
            "agent",
            "vm",
            "--agent",
            &format!("http://127.0.0.1:{}", a.port),
        ])
        .arg("--token-file")
        .arg(a.dir.path().join("token"))
        .args(["console", "g1"])
        .env_remove("TERN_TOKEN")
        .stdin(tty())
        .stdout(tty())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut master = std::fs::File::from(master);
    let seen = Arc::new(Mutex::new(Vec::new()));
    {
        // Left blocked in a read when the test ends: the pty stays open until then.
        let seen = seen.clone();
        let mut m = master.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = m.read(&mut buf) {
                seen.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
    }
    let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
    let t0 = Instant::now();
    'typing: loop {
        // Raw mode: Enter is a carriage return, as a terminal sends it.
        master.write_all(b"echo pty-$((3*3))\r").unwrap();
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if text().contains("pty-9") {
                break 'typing;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60) && child.try_wait().unwrap().is_none(),
            "no answer on the console: {}",
            text()
        );
    }
    // While attached the terminal is raw: no echo, no line editing.
    let raw = rustix::termios::tcgetattr(&slave).unwrap();
    assert!(!raw
        .local_modes
        .intersects(rustix::termios::LocalModes::ECHO | rustix::termios::LocalModes::ICANON));
    master.write_all(&[0x1d]).unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "Ctrl-] did not detach"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("detach with Ctrl-]"), "{err}");
    let after = rustix::termios::tcgetattr(&slave).unwrap();
    assert_eq!(
        (after.local_modes, after.input_modes, after.output_modes),
        (before.local_modes, before.input_modes, before.output_modes),
        "the terminal's settings are restored"
    );
    // The console is free again (once the agent has seen the detach): without a
    // terminal, with stdin open and silent, `--timeout` ends the attach, after the log's
    // tail was printed.
    let t1 = Instant::now();
    loop {
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args([
                "agent",
                "vm",
                "--agent",
                &format!("http://127.0.0.1:{}", a.port),
            ])
            .arg("--token-file")
            .arg(a.dir.path().join("token"))
            .args(["console", "g1", "--timeout", "2", "--log", "300"])
            .env_remove("TERN_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Held open (and silent) until it has exited: only the timeout can end it.
        let stdin = child.stdin.take();
        let o = child.wait_with_output().unwrap();
        drop(stdin);
        let err = String::from_utf8_lossy(&o.stderr);
        if o.status.code() == Some(2)
            && err.contains("attached")
            && t1.elapsed() < Duration::from_secs(10)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert!(o.status.success(), "{o:?}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(15),
            "{took:?}"
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("pty-9"),
            "{o:?}"
        );
        break;
    }
    a.client.delete_vm("g1").await.unwrap();
    a.stop("TERM");
}
