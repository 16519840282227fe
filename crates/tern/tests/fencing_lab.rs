//! Fencing and re-adoption with real QEMU guests (TCG): a 3-host lab whose agents renew
//! their leases with a `tern manager` process (lease 8 s, renewed every 2 s). Every QEMU
//! process of the lab is sampled every 50 ms for the whole run, and no VM may ever run
//! on two hosts at once. In order:
//!
//! 1. `agent_restarted_within_its_lease_keeps_its_vms`: h1's agent is killed with
//!    SIGKILL and started again at once: the guest's QEMU keeps its pid, its counter
//!    advances, and the manager restarts nothing. Then
//!    `agent_stopped_with_sigterm_keeps_its_vms`: h1's agent gets SIGTERM (an
//!    upgrade's clean stop): the guests keep running, the lease and the watchdog stay,
//!    and the agent started again adopts the same QEMUs.
//! 2. `agent_killed_for_good_is_fenced_and_its_vms_restart_once`: h1's agent is killed
//!    for good: its watchdog stops its guests, and the manager restarts its two VMs
//!    elsewhere within the lease plus detection time.
//! 3. `host_cut_off_stops_its_own_vms_first`: a host's link is set down: it stops its
//!    own guests before the manager restarts them on the last host.
//! 4. `destination_agent_killed_mid_move_leaves_no_copy`: the destination agent of a
//!    migration is killed while memory flows: restarted, it destroys the incoming copy
//!    instead of adopting it; not restarted, its watchdog stops it within the lease.
//!
//! Needs root, iproute2 and QEMU; without them it says why and passes, except under
//! `CI`, where it must run.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tern_agent::client::AgentClient;
use tern_agent::vms::CreateVm;
use tern_api::client::{Client, ClientOptions, ManagerClient};
use tern_lab::{self as lab, LabOptions, LabState};

mod support;

const LEASE_S: u64 = 8;
const RENEW_S: u64 = 2;
const MANAGER_PORT: u16 = 7080;

/// Every sample in which a VM ran on more than one host: (time, VM, hosts).
type Twice = Vec<(Duration, String, Vec<String>)>;

/// The VMs' QEMUs on this lab's hosts, from `/proc`: the VM comes from `-name tern-ID`,
/// the host from the state directory in its QMP socket path. Migration destinations
/// (`-incoming`) are left out: no move in this test completes, so they never run the
/// guest; they hold its memory until they are destroyed, which the test checks itself.
fn qemus(lab: &LabState) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !args.first().is_some_and(|a| a.contains("qemu"))
            || args.iter().any(|a| a == "-incoming")
        {
            continue;
        }
        let vm = args
            .windows(2)
            .find(|w| w[0] == "-name")
            .and_then(|w| w[1].strip_prefix("tern-"));
        let host = lab.hosts.iter().find(|h| {
            let dir = h.state_dir.to_string_lossy().into_owned();
            args.iter().any(|a| a.contains(&format!("{dir}/")))
        });
        if let (Some(vm), Some(h)) = (vm, host) {
            out.entry(vm.to_string())
                .or_default()
                .insert(h.name.clone());
        }
    }
    out
}

/// Samples [`qemus`] every 50 ms until `stop`.
fn sampler(lab: LabState, twice: Arc<Mutex<Twice>>, stop: Arc<AtomicBool>) {
    let t0 = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        for (vm, hosts) in qemus(&lab) {
            if hosts.len() > 1 {
                let hosts = hosts.into_iter().collect();
                twice.lock().unwrap().push((t0.elapsed(), vm, hosts));
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Fixture {
    lab: LabState,
    agents: Vec<AgentClient>,
    manager: ManagerClient,
    /// The agents' current process ids (they change when the test restarts one).
    pids: Arc<Mutex<Vec<u32>>>,
    /// Each agent's command line, to start it again.
    argv: Vec<Vec<String>>,
}

impl Fixture {
    fn ns(&self, i: usize) -> &str {
        &self.lab.hosts[i].netns
    }

    /// The hosts whose QEMUs run VM `vm` right now.
    fn hosts_of(&self, vm: &str) -> Vec<String> {
        qemus(&self.lab)
            .remove(vm)
            .map(|h| h.into_iter().collect())
            .unwrap_or_default()
    }

    fn kill_agent(&self, i: usize) {
        self.signal_agent(i, "KILL");
    }

    /// Sends `signal` to host `i`'s agent and waits until it has exited (30 s at most).
    fn signal_agent(&self, i: usize, signal: &str) -> Duration {
        let pid = self.pids.lock().unwrap()[i];
        let t0 = Instant::now();
        assert!(Command::new("kill")
            .args([&format!("-{signal}"), &pid.to_string()])
            .status()
            .unwrap()
            .success());
        while Path::new(&format!("/proc/{pid}/cmdline")).exists()
            && !std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .is_empty()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "agent h{} did not exit on SIG{signal}",
                i + 1
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        t0.elapsed()
    }

    /// Starts host `i`'s agent again, as the lab did, and waits until it answers.
    // Like the lab's own agents, it runs until killed; its pid is kept and it is
    // stopped when the test ends.
    #[allow(clippy::zombie_processes)]
    async fn start_agent(&self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.lab.hosts[i].state_dir.join("agent.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns(i)])
            .args(&self.argv[i])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .unwrap();
        self.pids.lock().unwrap()[i] = child.id();
        let t0 = Instant::now();
        while self.agents[i].host().await.is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "agent h{} not up",
                i + 1
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn manager_json(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        self.manager
            .http()
            .send(method, path, body.as_ref())
            .await
            .unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Waits until the manager records each of `vms` running where its QEMU runs: a cut
    /// made while its create call is unanswered would hold the VM until that call
    /// times out.
    async fn wait_recorded(&self, vms: &[&str]) {
        let t0 = Instant::now();
        for vm in vms {
            loop {
                let v = self
                    .manager_json(Method::GET, &format!("/v1/vms/{vm}"), None)
                    .await;
                let on = self.hosts_of(vm);
                if v["state"] == "running" && on.len() == 1 && v["observed_host"] == on[0] {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "{vm} not recorded: {v}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Waits until `cond` holds, polling every 50 ms; panics after `limit`.
    async fn wait(&self, what: &str, limit: Duration, mut cond: impl FnMut() -> bool) -> Duration {
        let t0 = Instant::now();
        while !cond() {
            assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        t0.elapsed()
    }

    /// The guest's verifier counter, checked.
    async fn counter(&self, host: usize, vm: &str) -> u64 {
        support::guest_counter(&self.agents[host], vm).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_and_readoption_on_a_lab() {
    if !tern_testkit::require_lab("fencing lab test", &[]) {
        return;
    }
    let img = tern_hv::image::ensure_image_async(tern_testkit::test_cache_dir(), |s| {
        eprintln!("image: {s}")
    })
    .await
    .expect("guest image builds");
    let dir = tempfile::tempdir().unwrap();
    let opts = LabOptions {
        hosts: 3,
        link_mbit: None,
        dir: dir.path().join("lab"),
        tern_binary: PathBuf::from(env!("CARGO_BIN_EXE_tern")),
        host_memory_mib: Some(1024),
        host_cpus: Some(2),
        manager_port: Some(MANAGER_PORT),
        image_dir: tern_testkit::test_cache_dir(),
    };
    // Hosts enrolled with a lab CA, which the manager adopts: leases are renewed over HTTPS.
    let state = lab::up(&opts, &|s| eprintln!("{s}")).await.expect("lab up");
    let token = state.token().unwrap();
    let manager: Arc<Mutex<Option<Child>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let twice = Arc::new(Mutex::new(Twice::new()));
    let sampling = {
        let (lab, twice, stop) = (state.clone(), twice.clone(), stop.clone());
        std::thread::spawn(move || sampler(lab, twice, stop))
    };
    let lab_dir = state.dir.clone();
    let manager_url = state.manager_url.clone().unwrap();
    let manager_token = token.clone();
    let lab_for_dump = state.clone();
    // The agents as the test restarts them: stopped at the end, which `lab down` (it
    // knows only those it started) would not do.
    let pids: Arc<Mutex<Vec<u32>>> = Arc::default();
    let agents = pids.clone();
    let (started, manager_dir) = (manager.clone(), dir.path().to_path_buf());
    let outcome = tokio::spawn(async move {
        // The guest g1 is not the manager's: its first round of load reports, 30 s
        // after it starts, destroys it as a stale copy. Booted before the manager,
        // the guest is ready when the first step starts, which then ends in time.
        boot_g1(&state, &img).await;
        *started.lock().unwrap() = Some(start_manager(&state, &token, &manager_dir));
        let f = fixture(state, token, agents).await;
        scenario(&f, &img).await;
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    sampling.join().unwrap();
    if outcome.is_err() {
        let c = manager_client(&lab_for_dump, &manager_url, &manager_token, 5);
        for path in ["/v1/events?limit=200", "/v1/hosts", "/v1/vms"] {
            let v: Result<Value, _> = c.http().get(path).await;
            eprintln!("== {path}: {v:?}");
        }
    }
    if let Some(mut m) = manager.lock().unwrap().take() {
        let _ = m.kill();
        let _ = m.wait();
    }
    if outcome.is_err() {
        // What the processes said, before the lab and its logs go.
        let mut logs = vec![dir.path().join("manager.log")];
        for h in ["h1", "h2", "h3"] {
            let d = lab_dir.join("hosts").join(h);
            logs.extend([d.join("agent.log"), d.join("watchdog.log")]);
        }
        for l in logs {
            let text = std::fs::read_to_string(&l).unwrap_or_default();
            // The repeated complaints about unreachable hosts say little.
            let tail: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("no load report") && !l.contains("lease not renewed host"))
                .rev()
                .take(40)
                .collect();
            eprintln!("== {}", l.display());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
    // Down destroys the VMs through the agents (the ones the test restarted too, which
    // the lab does not know and which are stopped after it).
    lab::down(&lab_dir, &|s| eprintln!("{s}"))
        .await
        .expect("lab down");
    for pid in pids.lock().unwrap().iter() {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    let left = tern_testkit::qemus_under(&lab_dir);
    assert!(left.is_empty(), "QEMUs left after lab down: {left:?}");
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    let twice = twice.lock().unwrap();
    assert!(twice.is_empty(), "VMs ran on two hosts at once: {twice:?}");
}

fn start_manager(lab: &LabState, token: &str, dir: &Path) -> Child {
    let log = std::fs::File::create(dir.join("manager.log")).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(["manager", "--listen"])
        .arg(format!("{}:{MANAGER_PORT}", lab.root_addr))
        .arg("--db")
        .arg(dir.join("manager.db"))
        .arg("--ca")
        .arg(lab.ca_dir.as_ref().expect("a lab with a CA"))
        .env("TERN_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// The manager's API over HTTPS, checked against the lab CA, with the API token.
fn manager_client(lab: &LabState, url: &str, token: &str, timeout_s: u64) -> ManagerClient {
    let tls = lab.tls().unwrap();
    Client::with_tls(
        url,
        token,
        ClientOptions::with_timeout(Duration::from_secs(timeout_s)),
        tls,
    )
    .map(ManagerClient::from)
    .unwrap()
}

async fn fixture(lab: LabState, token: String, pids: Arc<Mutex<Vec<u32>>>) -> Fixture {
    let url = lab.manager_url.clone().expect("a lab made for a manager");
    let manager = manager_client(&lab, &url, &token, 20);
    let t0 = Instant::now();
    while manager.hosts().await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(20), "manager not up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let agents = lab
        .hosts
        .iter()
        .map(|h| lab.client(&h.url, Duration::from_secs(30)).unwrap())
        .collect();
    *pids.lock().unwrap() = lab.hosts.iter().map(|h| h.pid.unwrap()).collect();
    let argv = pids
        .lock()
        .unwrap()
        .iter()
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap();
            cmd.split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .collect();
    let f = Fixture {
        lab,
        agents,
        manager,
        pids,
        argv,
    };
    let mut settings = f.manager_json(Method::GET, "/v1/balancer", None).await;
    settings["enabled"] = json!(false);
    settings["interval_s"] = json!(1);
    settings["lease_s"] = json!(LEASE_S);
    settings["renew_s"] = json!(RENEW_S);
    f.manager_json(Method::PUT, "/v1/balancer", Some(settings))
        .await;
    for h in &f.lab.hosts {
        let body = json!({"name": h.name, "address": h.url,
                          "capacity": {"cpus": 2.0, "memory_mib": 1024}});
        f.manager_json(Method::POST, "/v1/hosts", Some(body)).await;
    }
    // Every agent holds a lease before anything is tested.
    for h in &f.lab.hosts {
        let lease = tern_agent::fence::lease_file(&h.state_dir);
        f.wait("lease granted", Duration::from_secs(20), || lease.exists())
            .await;
    }
    f
}

/// Boots guest g1 on h1 straight through its agent and starts its memory writer.
async fn boot_g1(lab: &LabState, img: &tern_hv::image::GuestImage) {
    let agent = lab
        .client(&lab.hosts[0].url, Duration::from_secs(30))
        .unwrap();
    let req: CreateVm = serde_json::from_value(json!({
        "id": "g1",
        "spec": {"vcpus": 1, "memory_mib": 256, "kernel": img.kernel,
                 "initramfs": img.initramfs,
                 "cmdline": format!("{} tern.hostname=g1", img.cmdline)}
    }))
    .unwrap();
    agent.create_vm(&req).await.unwrap();
    let t0 = Instant::now();
    while agent.guest("g1", &json!({"cmd": "ping"})).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "guest never answered"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let started = agent
        .guest(
            "g1",
            &json!({"cmd": "start", "workload": "memdirty --mib 8 --mbps 5"}),
        )
        .await
        .unwrap();
    assert_eq!(started["ok"], true, "{started}");
}

async fn scenario(f: &Fixture, img: &tern_hv::image::GuestImage) {
    agent_restarted_within_its_lease_keeps_its_vms(f).await;
    agent_killed_for_good_is_fenced_and_its_vms_restart_once(f).await;
    let cut = host_cut_off_stops_its_own_vms_first(f).await;
    destination_agent_killed_mid_move_leaves_no_copy(f, img, cut).await;
}

fn host_index(f: &Fixture, name: &str) -> usize {
    f.lab.hosts.iter().position(|h| h.name == name).unwrap()
}

/// g1 runs on h1 already ([`boot_g1`]).
async fn agent_restarted_within_its_lease_keeps_its_vms(f: &Fixture) {
    // Two VMs the manager places on h1 (kernel-less: firmware only).
    for vm in ["fa", "fb"] {
        let body = json!({"name": vm, "spec": {"vcpus": 1, "memory_mib": 128}, "host": "h1"});
        f.manager_json(Method::POST, "/v1/vms", Some(body)).await;
    }
    f.wait("fa and fb run on h1", Duration::from_secs(30), || {
        f.hosts_of("fa") == ["h1"] && f.hosts_of("fb") == ["h1"]
    })
    .await;
    f.wait_recorded(&["fa", "fb"]).await;
    let pid_of = |list: &[tern_agent::vms::VmView], id: &str| {
        list.iter()
            .find(|v| v.info.id == id)
            .and_then(|v| v.info.pid)
    };
    let before = f.agents[0].list_vms().await.unwrap();
    let c0 = f.counter(0, "g1").await;

    f.kill_agent(0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.start_agent(0).await;
    let after = f.agents[0].list_vms().await.unwrap();
    for vm in ["g1", "fa", "fb"] {
        let (p0, p1) = (pid_of(&before, vm), pid_of(&after, vm));
        assert!(
            p0.is_some() && p0 == p1,
            "{vm}: QEMU {p0:?} before, {p1:?} after"
        );
        let v = after.iter().find(|v| v.info.id == vm).unwrap();
        assert_eq!(v.info.state, tern_hv::VmState::Running, "{vm}");
    }
    let c1 = f.counter(0, "g1").await;
    assert!(
        c1 > c0,
        "the guest's counter advanced across the restart: {c0} -> {c1}"
    );
    // Here rather than as a step of its own: the whole of it must end before the
    // manager's first round of load reports destroys g1 (see `boot_g1`).
    let c1 = agent_stopped_with_sigterm_keeps_its_vms(f, c1).await;
    // Well past the lease: the manager restarted nothing, the host fenced nothing.
    tokio::time::sleep(Duration::from_secs(LEASE_S + 3)).await;
    let c2 = f.counter(0, "g1").await;
    assert!(c2 > c1, "counter {c1} -> {c2}");
    for vm in ["g1", "fa", "fb"] {
        assert_eq!(f.hosts_of(vm), ["h1"], "{vm}");
    }
    assert!(!tern_agent::fence::fenced_file(&f.lab.hosts[0].state_dir).exists());
    eprintln!("restart within the lease: 3 VMs adopted, counter {c0} -> {c2}");
}

/// A clean stop (SIGTERM, as a service manager sends for an upgrade) ends the agent
/// only: its QEMUs keep running with their pids, its lease file stays and its watchdog
/// keeps watching it, and the agent started again adopts them. Returns the guest's
/// counter, which went on from `c0`.
async fn agent_stopped_with_sigterm_keeps_its_vms(f: &Fixture, c0: u64) -> u64 {
    let dir = &f.lab.hosts[0].state_dir;
    let before = f.agents[0].list_vms().await.unwrap();
    let watchdog = std::fs::read_to_string(tern_agent::fence::watchdog_pid_file(dir)).unwrap();
    let took = f.signal_agent(0, "TERM");
    for vm in ["g1", "fa", "fb"] {
        assert_eq!(f.hosts_of(vm), ["h1"], "{vm} stopped with its agent");
    }
    assert!(
        tern_agent::fence::lease_file(dir).exists(),
        "the lease was dropped: nothing would fence the guests"
    );
    let watching = std::fs::read(format!("/proc/{}/cmdline", watchdog.trim())).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&watching).contains("watchdog"),
        "the watchdog stopped with the agent"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.start_agent(0).await;
    let after = f.agents[0].list_vms().await.unwrap();
    let pid_of = |list: &[tern_agent::vms::VmView], id: &str| {
        list.iter()
            .find(|v| v.info.id == id)
            .and_then(|v| v.info.pid)
    };
    for vm in ["g1", "fa", "fb"] {
        let (p0, p1) = (pid_of(&before, vm), pid_of(&after, vm));
        assert!(
            p0.is_some() && p0 == p1,
            "{vm}: QEMU {p0:?} before, {p1:?} after"
        );
    }
    let c1 = f.counter(0, "g1").await;
    assert!(c1 > c0, "counter {c0} -> {c1}");
    assert!(!tern_agent::fence::fenced_file(dir).exists());
    eprintln!("SIGTERM: agent stopped in {took:?}, 3 VMs adopted, counter {c0} -> {c1}");
    c1
}

async fn agent_killed_for_good_is_fenced_and_its_vms_restart_once(f: &Fixture) {
    f.kill_agent(0);
    let t0 = Instant::now();
    let limit = Duration::from_secs(LEASE_S + 10);
    let stopped = f
        .wait("h1 stops its guests", limit, || {
            ["g1", "fa", "fb"]
                .iter()
                .all(|vm| !f.hosts_of(vm).contains(&"h1".to_string()))
        })
        .await;
    assert!(
        stopped < Duration::from_secs(LEASE_S),
        "h1's guests stopped {stopped:?} after its agent died, not within the {LEASE_S} s lease"
    );
    f.wait("fa and fb restarted elsewhere", limit, || {
        ["fa", "fb"].iter().all(|vm| {
            let h = f.hosts_of(vm);
            h.len() == 1 && h[0] != "h1"
        })
    })
    .await;
    let restarted = t0.elapsed();
    eprintln!(
        "agent killed: guests stopped after {stopped:?}, restarted elsewhere after {restarted:?}"
    );
    assert!(
        restarted > stopped,
        "restarted before h1 stopped its copies"
    );
    f.wait_recorded(&["fa", "fb"]).await;
    assert!(tern_agent::fence::fenced_file(&f.lab.hosts[0].state_dir).exists());
}

/// Returns the index of the host cut off (its link is up again, its agent alive).
async fn host_cut_off_stops_its_own_vms_first(f: &Fixture) -> usize {
    let on = f.hosts_of("fa")[0].clone();
    let x = host_index(f, &on);
    let link = |updown: &str| {
        assert!(Command::new("ip")
            .args(["-n", f.ns(x), "link", "set", "eth0", updown])
            .status()
            .unwrap()
            .success())
    };
    link("down");
    let t0 = Instant::now();
    let limit = Duration::from_secs(LEASE_S + 10);
    let stopped = f
        .wait("the cut-off host stops fa", limit, || {
            !f.hosts_of("fa").contains(&on)
        })
        .await;
    f.wait("fa restarted on the last host", limit, || {
        let h = f.hosts_of("fa");
        h.len() == 1 && h[0] != on && h[0] != "h1"
    })
    .await;
    let moved = t0.elapsed();
    eprintln!("{on} cut off: its guests stopped after {stopped:?}, restarted after {moved:?}");
    assert!(
        stopped < Duration::from_secs(LEASE_S),
        "stopped after {stopped:?}"
    );
    assert!(moved > stopped);
    link("up");
    // Back on the network it renews again, destroys its stale copies, and is active.
    let path = format!("/v1/hosts/{on}");
    let t0 = Instant::now();
    loop {
        let h = f.manager_json(Method::GET, &path, None).await;
        if h["state"] == "active" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{on} not active again: {h}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    x
}

async fn destination_agent_killed_mid_move_leaves_no_copy(
    f: &Fixture,
    img: &tern_hv::image::GuestImage,
    x: usize,
) {
    let y = (0..f.lab.hosts.len()).find(|&i| i != 0 && i != x).unwrap();
    // The firmware-only VMs have served: they go, and leave the CPUs to the guest.
    for vm in ["fa", "fb"] {
        f.manager_json(Method::DELETE, &format!("/v1/vms/{vm}"), None)
            .await;
    }
    f.wait("fa and fb deleted", Duration::from_secs(30), || {
        f.hosts_of("fa").is_empty() && f.hosts_of("fb").is_empty()
    })
    .await;
    // The manager destroys VMs it does not know at its next round of load reports: no
    // more rounds for this part (leases are watched apart from them).
    let mut settings = f.manager_json(Method::GET, "/v1/balancer", None).await;
    settings["interval_s"] = json!(3600);
    f.manager_json(Method::PUT, "/v1/balancer", Some(settings))
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // A guest dirtying memory faster than the 40 Mbit/s the moves are capped at, so
    // each move stays in pre-copy until something ends it.
    let req: CreateVm = serde_json::from_value(json!({
        "id": "mv",
        "spec": {"vcpus": 1, "memory_mib": 256, "kernel": img.kernel,
                 "initramfs": img.initramfs,
                 "cmdline": format!("{} tern.hostname=mv", img.cmdline)}
    }))
    .unwrap();
    f.agents[y].create_vm(&req).await.unwrap();
    let t0 = Instant::now();
    while f.agents[y]
        .guest("mv", &json!({"cmd": "ping"}))
        .await
        .is_err()
    {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "guest never answered"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let started = f.agents[y]
        .guest(
            "mv",
            &json!({"cmd": "start", "workload": "memdirty --mib 32 --mbps 20"}),
        )
        .await
        .unwrap();
    assert_eq!(started["ok"], true, "{started}");
    let mut counter = f.counter(y, "mv").await;
    for restart in [true, false] {
        // Agents call each other with their host certificates: no token.
        let body = json!({"vm": "mv", "destination": f.lab.hosts[x].url, "token": "",
                          "policy": "adaptive", "options": {"max_mbit": 40}});
        let m: Value = f.agents[y]
            .http()
            .send(Method::POST, "/v1/migrations", Some(&body))
            .await
            .unwrap();
        let id = m["id"].as_str().unwrap().to_string();
        let t0 = Instant::now();
        let incoming = loop {
            if let Ok(v) = f.agents[x].show_vm("mv").await {
                if let Some(pid) = v.info.pid {
                    break pid;
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "no incoming copy");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status: Value = f.agents[y]
            .http()
            .get(&format!("/v1/migrations/{id}"))
            .await
            .unwrap();
        assert_eq!(status["phase"], "pre_copy", "{status}");
        f.kill_agent(x);
        let alive = || {
            !std::fs::read(format!("/proc/{incoming}/cmdline"))
                .unwrap_or_default()
                .is_empty()
        };
        if restart {
            assert!(alive(), "the incoming copy outlived its agent");
            f.start_agent(x).await;
            let gone = f
                .wait(
                    "the restarted agent destroys the copy",
                    Duration::from_secs(5),
                    || !alive(),
                )
                .await;
            assert!(!f.agents[x]
                .list_vms()
                .await
                .unwrap()
                .iter()
                .any(|v| v.info.id == "mv"));
            eprintln!("destination restarted: its incoming copy destroyed ({gone:?} after start)");
        } else {
            let gone = f
                .wait(
                    "the isolated host stops the copy",
                    Duration::from_secs(LEASE_S),
                    || !alive(),
                )
                .await;
            eprintln!("destination not restarted: its watchdog stopped the copy after {gone:?}");
        }
        let t0 = Instant::now();
        loop {
            let s: Value = f.agents[y]
                .http()
                .get(&format!("/v1/migrations/{id}"))
                .await
                .unwrap();
            if s["phase"] == "rolled_back" {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "not rolled back: {s}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let here = &f.lab.hosts[y].name;
        assert_eq!(
            &f.hosts_of("mv"),
            std::slice::from_ref(here),
            "the guest stays on its source"
        );
        let next = f.counter(y, "mv").await;
        assert!(
            next > counter,
            "the guest's counter advanced: {counter} -> {next}"
        );
        counter = next;
    }
}
