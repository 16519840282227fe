//! The one lab every case runs against: three hosts enrolled with a lab CA, a `tern
//! manager --ca` process whose database lies on a small tmpfs, an agent client per host,
//! the manager's client, the guest image, and a sampler that looks at every QEMU
//! process of the lab every 50 ms.
//!
//! Cases inject their faults through it (kill or restart an agent or the manager, cut a
//! link, fill the manager's disk) and [`Fixture::reset`] undoes whatever a case did.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tern_agent::client::AgentClient;
use tern_api::client::{Client, ClientOptions, ManagerClient};
use tern_hv::image::GuestImage;
pub use tern_lab::alive;
use tern_lab::{LabOptions, LabState};

use crate::FaultError;

/// The lease the manager grants in the suite, and how often agents renew it: short, so
/// the fencing cases take seconds, not minutes.
pub const LEASE_S: u64 = 8;
pub const RENEW_S: u64 = 2;
/// The manager's port on the lab's root address.
pub const MANAGER_PORT: u16 = 7080;
/// The lab's hosts, each offering 2 CPUs and 1 GiB to guests.
pub const HOSTS: usize = 3;
const HOST_MEMORY_MIB: u64 = 1024;
/// Every host's link is shaped to this.
pub const LINK_MBIT: u32 = 1000;
const HOST_CPUS: u32 = 2;
/// The manager's database directory is a tmpfs of this size, which the disk-full case
/// fills.
pub const DB_TMPFS_MIB: u64 = 16;
/// How often the sampler looks at the lab's QEMU processes.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);
/// Two copies of one VM seen together for less than this are a completed move's
/// handover: the source's QEMU, paused, is destroyed right after the destination
/// resumes, and `/proc` cannot tell a paused QEMU from a running one.
pub const HANDOVER_GRACE: Duration = Duration::from_secs(2);

/// Where the suite builds its lab and which binary and images it uses.
#[derive(Clone)]
pub struct FixtureOptions {
    /// A fresh directory for the lab, the manager's database and the logs.
    pub dir: PathBuf,
    /// The `tern` binary the agents and the manager run.
    pub tern_binary: PathBuf,
    /// The image cache (kernels and initramfs images the guests boot).
    pub image_dir: PathBuf,
    /// Receives one line per setup step.
    pub progress: Arc<dyn Fn(&str) + Send + Sync>,
}

/// One sample in which a VM ran on more than one host.
#[derive(Debug, Clone)]
pub struct Twice {
    /// Since the sampler started.
    pub at: Duration,
    pub vm: String,
    pub hosts: Vec<String>,
}

/// The running lab, its manager and its observers.
pub struct Fixture {
    pub lab: LabState,
    /// One client per host, in host order (mutual TLS with the operator certificate).
    pub agents: Vec<AgentClient>,
    /// The manager's API over HTTPS with the API token.
    pub manager: ManagerClient,
    /// The lab's API token (the manager's `TERN_TOKEN`).
    pub token: String,
    pub image: GuestImage,
    pub tern_binary: PathBuf,
    /// The suite's directory (the lab is under `DIR/lab`).
    pub dir: PathBuf,
    /// The manager's database directory: a tmpfs of [`DB_TMPFS_MIB`].
    pub db_dir: PathBuf,
    pids: Mutex<Vec<u32>>,
    argv: Vec<Vec<String>>,
    manager_proc: Mutex<Option<Child>>,
    /// VMs the suite started on agents itself, which should be running at a case's end.
    booted: Mutex<BTreeSet<String>>,
    /// Whether the shared guest is up (see [`Fixture::shared_guest`]).
    shared: Mutex<bool>,
    twice: Arc<Mutex<Vec<Twice>>>,
    stop_sampler: Arc<AtomicBool>,
    sampler: Mutex<Option<std::thread::JoinHandle<()>>>,
    progress: Arc<dyn Fn(&str) + Send + Sync>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A case that panicked while holding a lock leaves plain data behind: still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn cmdline(pid: &str) -> Option<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// The VMs whose guests run on this lab's hosts, from `/proc`: the VM comes from
/// `-name tern-ID`, the host from the state directory in its QMP socket path. A
/// migration destination (`-incoming`) counts once it was resumed, that is once its
/// agent removed the VM's `.incoming` marker; before that it holds memory, not a guest.
pub fn qemus(lab: &LabState) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Some(args) = cmdline(&pid) else { continue };
        if !args.first().is_some_and(|a| a.contains("qemu")) {
            continue;
        }
        let Some(vm) = args
            .windows(2)
            .find(|w| w[0] == "-name")
            .and_then(|w| w[1].strip_prefix("tern-"))
        else {
            continue;
        };
        let Some(h) = lab.hosts.iter().find(|h| {
            let dir = format!("{}/", h.state_dir.display());
            args.iter().any(|a| a.contains(&dir))
        }) else {
            continue;
        };
        let incoming = args.iter().any(|a| a == "-incoming");
        let marker = h.state_dir.join("vms").join(format!("{vm}.incoming"));
        if incoming && marker.exists() {
            continue;
        }
        out.entry(vm.to_string())
            .or_default()
            .insert(h.name.clone());
    }
    out
}

/// Samples [`qemus`] every [`SAMPLE_EVERY`] until `stop`.
fn sampler(lab: LabState, twice: Arc<Mutex<Vec<Twice>>>, stop: Arc<AtomicBool>) {
    let t0 = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        for (vm, hosts) in qemus(&lab) {
            if hosts.len() > 1 {
                let hosts = hosts.into_iter().collect();
                lock(&twice).push(Twice {
                    at: t0.elapsed(),
                    vm,
                    hosts,
                });
            }
        }
        std::thread::sleep(SAMPLE_EVERY);
    }
}

/// The VMs among `samples` that ran on two hosts for at least [`HANDOVER_GRACE`]
/// without a break of more than a few samples (pure).
pub fn running_twice(samples: &[Twice]) -> BTreeSet<String> {
    let mut spans: BTreeMap<&str, (Duration, Duration)> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for s in samples {
        let span = spans.entry(&s.vm).or_insert((s.at, s.at));
        if s.at.saturating_sub(span.1) > SAMPLE_EVERY * 4 {
            *span = (s.at, s.at);
        }
        span.1 = s.at;
        if span.1 - span.0 >= HANDOVER_GRACE {
            out.insert(s.vm.clone());
        }
    }
    out
}

impl Fixture {
    /// Builds the lab, starts the manager with the lab CA, registers the hosts with a
    /// short lease and waits until every agent holds one.
    pub async fn start(opts: FixtureOptions) -> Result<Fixture, FaultError> {
        let progress = opts.progress.clone();
        let p = progress.clone();
        let image = tern_hv::image::ensure_image_async(opts.image_dir.clone(), move |s| {
            p(&format!("image: {s}"))
        })
        .await?;
        std::fs::create_dir_all(&opts.dir)
            .map_err(FaultError::io(format!("creating {}", opts.dir.display())))?;
        let db_dir = opts.dir.join("manager-db");
        std::fs::create_dir_all(&db_dir)
            .map_err(FaultError::io(format!("creating {}", db_dir.display())))?;
        let size = format!("size={DB_TMPFS_MIB}m,mode=0700");
        tern_hv::qemu::net::run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &size,
                "tern-faults",
                &db_dir.to_string_lossy(),
            ],
        )
        .await?;
        let lab_opts = LabOptions {
            hosts: HOSTS as u32,
            // The pace the migration cases' promises were measured at.
            link_mbit: Some(LINK_MBIT),
            dir: opts.dir.join("lab"),
            tern_binary: opts.tern_binary.clone(),
            host_memory_mib: Some(HOST_MEMORY_MIB),
            host_cpus: Some(HOST_CPUS),
            manager_port: Some(MANAGER_PORT),
            image_dir: opts.image_dir.clone(),
        };
        let lab = match tern_lab::up(&lab_opts, &|s| progress(s)).await {
            Ok(l) => l,
            Err(e) => {
                let _ = umount(&db_dir).await;
                return Err(e.into());
            }
        };
        let f = match Fixture::assemble(lab.clone(), image, &opts, db_dir.clone()) {
            Ok(f) => f,
            Err(e) => {
                let _ = tern_lab::down(&lab.dir, &|s| progress(s)).await;
                let _ = umount(&db_dir).await;
                return Err(e);
            }
        };
        match f.settle_first().await {
            Ok(()) => Ok(f),
            Err(e) => {
                f.stop().await;
                Err(e)
            }
        }
    }

    fn assemble(
        lab: LabState,
        image: GuestImage,
        opts: &FixtureOptions,
        db_dir: PathBuf,
    ) -> Result<Fixture, FaultError> {
        let token = lab.token()?;
        let url = lab
            .manager_url
            .clone()
            .ok_or_else(|| FaultError::Setup("the lab was made without a manager URL".into()))?;
        let manager = manager_client(&lab, &url, &token, Duration::from_secs(20))?;
        let agents = lab
            .hosts
            .iter()
            .map(|h| lab.client(&h.url, Duration::from_secs(30)))
            .collect::<Result<Vec<_>, _>>()?;
        let pids: Vec<u32> = lab
            .hosts
            .iter()
            .map(|h| {
                h.pid
                    .ok_or_else(|| FaultError::Setup(format!("agent {} has no pid", h.name)))
            })
            .collect::<Result<_, _>>()?;
        let argv = pids
            .iter()
            .map(|p| {
                cmdline(&p.to_string())
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| FaultError::Setup(format!("agent process {p} is gone")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let twice = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let (lab, twice, stop) = (lab.clone(), twice.clone(), stop.clone());
            std::thread::spawn(move || sampler(lab, twice, stop))
        };
        Ok(Fixture {
            lab,
            agents,
            manager,
            token,
            image,
            tern_binary: opts.tern_binary.clone(),
            dir: opts.dir.clone(),
            db_dir,
            pids: Mutex::new(pids),
            argv,
            manager_proc: Mutex::new(None),
            booted: Mutex::new(BTreeSet::new()),
            shared: Mutex::new(false),
            twice,
            stop_sampler: stop,
            sampler: Mutex::new(Some(handle)),
            progress: opts.progress.clone(),
        })
    }

    /// The manager up, the hosts registered with the suite's lease, every lease held.
    async fn settle_first(&self) -> Result<(), FaultError> {
        self.start_manager().await?;
        self.configure_manager().await?;
        for h in &self.lab.hosts {
            let body = json!({"name": h.name, "address": h.url,
                              "capacity": {"cpus": HOST_CPUS as f64, "memory_mib": HOST_MEMORY_MIB}});
            self.manager_json(Method::POST, "/v1/hosts", Some(body))
                .await?;
        }
        self.wait_leases().await
    }

    /// Balancer off, the suite's lease, control rounds every second, or none while the
    /// shared guest is up: a round destroys every VM the manager does not know, as a
    /// stale copy, and the shared guest and the incoming copies of its moves are such
    /// VMs. Leases are watched apart from the rounds.
    async fn configure_manager(&self) -> Result<(), FaultError> {
        let interval = if *lock(&self.shared) { 3600 } else { 1 };
        let mut settings = self.manager_json(Method::GET, "/v1/balancer", None).await?;
        settings["enabled"] = json!(false);
        settings["interval_s"] = json!(interval);
        settings["lease_s"] = json!(LEASE_S);
        settings["renew_s"] = json!(RENEW_S);
        self.manager_json(Method::PUT, "/v1/balancer", Some(settings))
            .await?;
        Ok(())
    }

    /// Holds the manager's control rounds off (an hour apart, which applies at once) so
    /// that a guest booted straight on an agent is not destroyed as a stale copy; leases
    /// are still watched and commands still dispatched. [`Fixture::reset`] sets the
    /// suite's interval again.
    pub async fn hold_rounds(&self) -> Result<(), FaultError> {
        let mut settings = self.manager_json(Method::GET, "/v1/balancer", None).await?;
        settings["interval_s"] = json!(3600);
        self.manager_json(Method::PUT, "/v1/balancer", Some(settings))
            .await?;
        // The control loop picks a new interval up within its 200 ms tick.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }

    /// Waits until every agent holds a lease.
    pub async fn wait_leases(&self) -> Result<(), FaultError> {
        for h in &self.lab.hosts {
            let lease = tern_agent::fence::lease_file(&h.state_dir);
            self.wait(
                &format!("{} holds a lease", h.name),
                Duration::from_secs(20),
                || lease.exists(),
            )
            .await?;
        }
        Ok(())
    }

    pub fn say(&self, line: &str) {
        (self.progress)(line)
    }

    /// Host `i`'s network namespace.
    pub fn ns(&self, i: usize) -> &str {
        &self.lab.hosts[i].netns
    }

    pub fn host_index(&self, name: &str) -> Option<usize> {
        self.lab.hosts.iter().position(|h| h.name == name)
    }

    /// The hosts whose QEMUs run VM `vm` right now.
    pub fn hosts_of(&self, vm: &str) -> Vec<String> {
        qemus(&self.lab)
            .remove(vm)
            .map(|h| h.into_iter().collect())
            .unwrap_or_default()
    }

    /// Host `i`'s agent process id.
    pub fn agent_pid(&self, i: usize) -> u32 {
        lock(&self.pids)[i]
    }

    /// Kills host `i`'s agent with SIGKILL (its QEMUs and watchdog live on) and waits
    /// until it is gone.
    pub async fn kill_agent(&self, i: usize) -> Result<(), FaultError> {
        self.signal_agent(i, "KILL").await.map(|_| ())
    }

    /// Sends `signal` (`KILL`, `TERM`, ...) to host `i`'s agent and waits until it has
    /// exited; returns how long that took.
    pub async fn signal_agent(&self, i: usize, signal: &str) -> Result<Duration, FaultError> {
        let pid = self.agent_pid(i);
        if !alive(pid) {
            return Ok(Duration::ZERO);
        }
        let t0 = Instant::now();
        tern_hv::qemu::net::run("kill", &[&format!("-{signal}"), &pid.to_string()]).await?;
        self.wait(
            &format!("agent {} exits on SIG{signal}", self.lab.hosts[i].name),
            Duration::from_secs(30),
            || !alive(pid),
        )
        .await?;
        Ok(t0.elapsed())
    }

    /// Starts host `i`'s agent again with the lab's command line and waits until it
    /// answers.
    pub async fn start_agent(&self, i: usize) -> Result<Duration, FaultError> {
        let h = &self.lab.hosts[i];
        let path = h.state_dir.join("agent.log");
        let (log, log2) = open_log(&path)?;
        let child = Command::new("ip")
            .args(["netns", "exec", self.ns(i)])
            .args(&self.argv[i])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own group, like the lab's agents; it runs until killed and `stop`
            // ends it.
            .process_group(0)
            .spawn()
            .map_err(FaultError::io("starting `ip netns exec ... tern agent`"))?;
        lock(&self.pids)[i] = child.id();
        // The child is reaped by `stop` through its pid; dropping the handle does not
        // kill it.
        drop(child);
        let t0 = Instant::now();
        loop {
            if self.agents[i].host().await.is_ok() {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(20) {
                return Err(FaultError::Timeout {
                    what: format!("agent {} answers after its start", h.name),
                    limit: Duration::from_secs(20),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn manager_log(&self) -> PathBuf {
        self.dir.join("manager.log")
    }

    /// Starts `tern manager --ca LAB_CA` on the lab's root address, with its database on
    /// [`Fixture::db_dir`], and waits until it answers.
    pub async fn start_manager(&self) -> Result<Duration, FaultError> {
        let ca = self
            .lab
            .ca_dir
            .as_ref()
            .ok_or_else(|| FaultError::Setup("the lab was made without a CA".into()))?;
        let path = self.manager_log();
        let (log, log2) = open_log(&path)?;
        let child = Command::new(&self.tern_binary)
            .args(["manager", "--listen"])
            .arg(format!("{}:{MANAGER_PORT}", self.lab.root_addr))
            .arg("--db")
            .arg(self.db_dir.join("manager.db"))
            .arg("--ca")
            .arg(ca)
            .env("TERN_TOKEN", &self.token)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .spawn()
            .map_err(FaultError::io("starting `tern manager`"))?;
        *lock(&self.manager_proc) = Some(child);
        let t0 = Instant::now();
        loop {
            if self.manager.hosts().await.is_ok() {
                return Ok(t0.elapsed());
            }
            let exited = lock(&self.manager_proc)
                .as_mut()
                .map(|c| c.try_wait().ok().flatten().is_some())
                .unwrap_or(true);
            if exited || t0.elapsed() > Duration::from_secs(20) {
                return Err(FaultError::Setup(format!(
                    "the manager did not come up; its log ends: {}",
                    tail(&self.manager_log(), 5)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the manager with SIGKILL and waits until it is gone.
    pub async fn kill_manager(&self) -> Result<(), FaultError> {
        let child = lock(&self.manager_proc).take();
        if let Some(mut c) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
        Ok(())
    }

    /// Whether the manager process the fixture started is running.
    pub fn manager_running(&self) -> bool {
        lock(&self.manager_proc)
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Sets host `i`'s link down or up.
    pub async fn set_link(&self, i: usize, up: bool) -> Result<(), FaultError> {
        let state = if up { "up" } else { "down" };
        tern_hv::qemu::net::run("ip", &["-n", self.ns(i), "link", "set", "eth0", state]).await?;
        Ok(())
    }

    /// A request to the manager's API, its answer as JSON.
    pub async fn manager_json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, FaultError> {
        Ok(self
            .manager
            .http()
            .send(method, path, body.as_ref())
            .await?)
    }

    /// Polls `cond` every 50 ms until it holds; returns how long that took.
    pub async fn wait(
        &self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut() -> bool,
    ) -> Result<Duration, FaultError> {
        let t0 = Instant::now();
        while !cond() {
            if t0.elapsed() > limit {
                return Err(FaultError::Timeout {
                    what: what.to_string(),
                    limit,
                });
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
        Ok(t0.elapsed())
    }

    /// Waits until the manager records each of `vms` running where its QEMU runs.
    pub async fn wait_recorded(&self, vms: &[&str], limit: Duration) -> Result<(), FaultError> {
        let t0 = Instant::now();
        for vm in vms {
            loop {
                let v = self
                    .manager_json(Method::GET, &format!("/v1/vms/{vm}"), None)
                    .await?;
                let on = self.hosts_of(vm);
                if v["state"] == "running" && on.len() == 1 && v["observed_host"] == on[0] {
                    break;
                }
                if t0.elapsed() > limit {
                    return Err(FaultError::Timeout {
                        what: format!("the manager records {vm} running where it runs ({v})"),
                        limit,
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Boots the guest image as VM `id` on host `i` and waits until its guest agent
    /// answers; with `workload`, starts it (e.g. `memdirty --mib 8 --mbps 5`).
    pub async fn boot_guest(
        &self,
        i: usize,
        id: &str,
        memory_mib: u64,
        workload: Option<&str>,
    ) -> Result<(), FaultError> {
        let img = &self.image;
        let req: tern_agent::vms::CreateVm = serde_json::from_value(json!({
            "id": id,
            "spec": {"vcpus": 1, "memory_mib": memory_mib, "kernel": img.kernel,
                     "initramfs": img.initramfs,
                     "cmdline": format!("{} tern.hostname={id}", img.cmdline)}
        }))
        .map_err(|e| FaultError::Setup(format!("a VM request: {e}")))?;
        self.agents[i].create_vm(&req).await?;
        lock(&self.booted).insert(id.to_string());
        let t0 = Instant::now();
        while self.agents[i]
            .guest(id, &json!({"cmd": "ping"}))
            .await
            .is_err()
        {
            if t0.elapsed() > Duration::from_secs(180) {
                return Err(FaultError::Timeout {
                    what: format!("guest {id} answers"),
                    limit: Duration::from_secs(180),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        if let Some(w) = workload {
            let started = self.agents[i]
                .guest(id, &json!({"cmd": "start", "workload": w}))
                .await?;
            if started["ok"] != true {
                return Err(FaultError::Setup(format!(
                    "guest {id} did not start {w}: {started}"
                )));
            }
        }
        Ok(())
    }

    /// The guest cases share, booted on first use and kept across cases while it runs
    /// healthy on its host: [`SharedGuest::MEMORY_MIB`] of memory, dirtying
    /// [`SharedGuest::WORKLOAD`] throughout. A case may move it away and back or break
    /// moves of it; [`Fixture::reset`] destroys it when it is anywhere but its host.
    ///
    /// While it is up the manager runs no control rounds (see
    /// [`Fixture::configure_manager`]); a case that needs them calls
    /// [`Fixture::manager_rounds`], which destroys it.
    pub async fn shared_guest(&self) -> Result<SharedGuest, FaultError> {
        let g = SharedGuest::default();
        if !*lock(&self.shared) {
            *lock(&self.shared) = true;
            self.configure_manager().await?;
            // A round already under way ends before the guest exists.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let booted = self
                .boot_guest(
                    g.host,
                    g.id,
                    SharedGuest::MEMORY_MIB,
                    Some(SharedGuest::WORKLOAD),
                )
                .await;
            if let Err(e) = booted {
                *lock(&self.shared) = false;
                return Err(e);
            }
        }
        Ok(g)
    }

    /// The manager's control rounds, every second, with every host active: destroys the
    /// shared guest first if it is up. Cases that need the manager to restart, create
    /// or record VMs call it.
    pub async fn manager_rounds(&self) -> Result<(), FaultError> {
        if *lock(&self.shared) {
            let g = SharedGuest::default();
            self.destroy_guest(g.host, g.id).await?;
            *lock(&self.shared) = false;
        }
        self.configure_manager().await?;
        // Hosts declared dead while there were no rounds come back with the first
        // heartbeats.
        let t0 = Instant::now();
        let limit = Duration::from_secs(20);
        loop {
            let hosts = self.manager.hosts().await?;
            if hosts
                .iter()
                .all(|h| h.state == tern_api::manager::HostState::Active)
            {
                return Ok(());
            }
            if t0.elapsed() > limit {
                let states: Vec<String> = hosts
                    .iter()
                    .map(|h| format!("{} {:?}", h.name, h.state))
                    .collect();
                return Err(FaultError::Timeout {
                    what: format!("every host active ({})", states.join(", ")),
                    limit,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the shared guest is up and where it belongs, with no move under way.
    async fn shared_guest_intact(&self) -> bool {
        let g = SharedGuest::default();
        if !*lock(&self.shared) || self.hosts_of(g.id) != [self.lab.hosts[g.host].name.as_str()] {
            return false;
        }
        let moving = match self.agents[g.host].list_migrations().await {
            Ok(list) => list.iter().any(|m| {
                m.vm == g.id
                    && !matches!(
                        m.phase,
                        tern_api::migration::Phase::Completed
                            | tern_api::migration::Phase::RolledBack
                    )
            }),
            Err(_) => true,
        };
        let running = match self.agents[g.host].show_vm(g.id).await {
            Ok(v) => v.info.state == tern_hv::VmState::Running,
            Err(_) => false,
        };
        running && !moving
    }

    /// Destroys VM `id`, which the suite booted on host `i`, and stops expecting it.
    pub async fn destroy_guest(&self, i: usize, id: &str) -> Result<(), FaultError> {
        lock(&self.booted).remove(id);
        match self.agents[i].delete_vm(id).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The guest's verifier counter on host `i`, checked: `Ok(None)` when its memory
    /// checksum fails.
    pub async fn counter(&self, i: usize, vm: &str) -> Result<Option<u64>, FaultError> {
        let t0 = Instant::now();
        loop {
            match self.agents[i].guest(vm, &json!({"cmd": "verify"})).await {
                Ok(v) if v["ok"] == true => {
                    if v["result"]["ok"] != true {
                        return Ok(None);
                    }
                    return v["result"]["counter"].as_u64().map(Some).ok_or_else(|| {
                        FaultError::Setup(format!("guest {vm}: no counter in {v}"))
                    });
                }
                r if t0.elapsed() < Duration::from_secs(30) => {
                    let _ = r;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(v) => {
                    return Err(FaultError::Setup(format!("guest {vm} answers {v}")));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// How many samples of two copies the sampler has taken so far: a mark for
    /// [`Fixture::running_twice_since`].
    pub fn twice_mark(&self) -> usize {
        lock(&self.twice).len()
    }

    /// The VMs seen running on two hosts since `mark` (beyond a move's handover).
    pub fn running_twice_since(&self, mark: usize) -> BTreeSet<String> {
        let samples = lock(&self.twice);
        running_twice(samples.get(mark..).unwrap_or_default())
    }

    /// The VMs that should run somewhere now and run nowhere: every VM the manager
    /// knows and is not deleting, and every guest the suite booted on an agent and
    /// did not destroy. A VM is given `settle` to show up (a restart under way).
    pub async fn vms_lost(&self, settle: Duration) -> Result<BTreeSet<String>, FaultError> {
        let mut expected: BTreeSet<String> = lock(&self.booted).clone();
        if self.manager_running() {
            let vms = self.manager_json(Method::GET, "/v1/vms", None).await?;
            for v in vms.as_array().into_iter().flatten() {
                if v["state"] != "deleting" {
                    if let Some(n) = v["name"].as_str() {
                        expected.insert(n.to_string());
                    }
                }
            }
        }
        let t0 = Instant::now();
        loop {
            let running = qemus(&self.lab);
            let lost: BTreeSet<String> = expected
                .iter()
                .filter(|vm| !running.contains_key(*vm))
                .cloned()
                .collect();
            if lost.is_empty() || t0.elapsed() >= settle {
                return Ok(lost);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Puts the lab back as a case expects to find it: every link up, every agent and
    /// the manager running with the suite's settings, no VM anywhere, every lease held.
    pub async fn reset(&self) -> Result<(), FaultError> {
        for i in 0..self.lab.hosts.len() {
            self.set_link(i, true).await?;
        }
        let _ = std::fs::remove_file(self.db_dir.join("filler"));
        if !self.manager_running() {
            self.kill_manager().await?;
            self.start_manager().await?;
        }
        for i in 0..self.lab.hosts.len() {
            if !alive(self.agent_pid(i)) {
                self.start_agent(i).await?;
            }
        }
        let vms = self.manager_json(Method::GET, "/v1/vms", None).await?;
        for v in vms.as_array().into_iter().flatten() {
            if let Some(n) = v["name"].as_str() {
                match self.manager.delete_vm(n).await {
                    Ok(_) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.wait_manager_empty().await?;
        let keep = self.shared_guest_intact().await;
        *lock(&self.shared) = keep;
        self.configure_manager().await?;
        let shared = SharedGuest::default();
        {
            let mut booted = lock(&self.booted);
            booted.clear();
            if keep {
                booted.insert(shared.id.to_string());
            }
        }
        for (i, a) in self.agents.iter().enumerate() {
            for v in a.list_vms().await? {
                if keep && i == shared.host && v.info.id == shared.id {
                    continue;
                }
                match a.delete_vm(&v.info.id).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => {
                        return Err(FaultError::Setup(format!(
                            "reset: {} does not destroy {}: {e}",
                            self.lab.hosts[i].name, v.info.id
                        )))
                    }
                }
            }
        }
        let left = usize::from(keep);
        self.wait("no QEMU left in the lab", Duration::from_secs(30), || {
            qemus(&self.lab).len() == left && qemus_under(&self.lab) == left
        })
        .await?;
        self.wait_leases().await
    }

    async fn wait_manager_empty(&self) -> Result<(), FaultError> {
        let t0 = Instant::now();
        loop {
            let vms = self.manager_json(Method::GET, "/v1/vms", None).await?;
            if vms.as_array().is_none_or(|a| a.is_empty()) {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                return Err(FaultError::Timeout {
                    what: format!("the manager forgets its VMs ({vms})"),
                    limit: Duration::from_secs(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last `n` lines of every process's log, for a failed run's report.
    pub fn logs(&self, n: usize) -> String {
        let mut out = format!("== manager\n{}\n", tail(&self.manager_log(), n));
        for h in &self.lab.hosts {
            for f in ["agent.log", "watchdog.log"] {
                let p = h.state_dir.join(f);
                out.push_str(&format!("== {} {f}\n{}\n", h.name, tail(&p, n)));
            }
        }
        out
    }

    /// Stops the sampler, the manager and every agent, takes the lab down and unmounts
    /// the manager's tmpfs: no QEMU, agent or watchdog is left.
    pub async fn stop(&self) {
        self.stop_sampler.store(true, Ordering::SeqCst);
        if let Some(h) = lock(&self.sampler).take() {
            let _ = h.join();
        }
        let _ = self.kill_manager().await;
        // Agents the suite restarted are not the lab's: `lab down` knows only its own.
        let pids = lock(&self.pids).clone();
        for (i, pid) in pids.iter().enumerate() {
            if self.lab.hosts[i].pid != Some(*pid) && alive(*pid) {
                let _ = tern_hv::qemu::net::run("kill", &["-TERM", &pid.to_string()]).await;
            }
        }
        let progress = self.progress.clone();
        if let Err(e) = tern_lab::down(&self.lab.dir, &|s| progress(s)).await {
            self.say(&format!("lab down: {e}"));
        }
        if let Err(e) = umount(&self.db_dir).await {
            self.say(&format!("unmounting {}: {e}", self.db_dir.display()));
        }
    }
}

/// How many QEMU pid files under the hosts' `run` directories name a live process
/// (migration destinations included).
fn qemus_under(lab: &LabState) -> usize {
    lab.hosts
        .iter()
        .filter_map(|h| std::fs::read_dir(h.state_dir.join("run")).ok())
        .flat_map(|rd| rd.flatten())
        .filter(|e| {
            std::fs::read_to_string(e.path().join("qemu.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .is_some_and(alive)
        })
        .count()
}

/// The guest the migration cases share.
#[derive(Debug, Clone, Copy)]
pub struct SharedGuest {
    /// Its home: host index.
    pub host: usize,
    pub id: &'static str,
}

impl SharedGuest {
    pub const MEMORY_MIB: u64 = 512;
    /// Faster than the 40 Mbit/s the moves that must stay in pre-copy are capped at,
    /// and than the 1 Gbit/s link the rollback promise was measured on.
    pub const WORKLOAD: &'static str = "memdirty --mib 128 --mbps 60";
}

impl Default for SharedGuest {
    fn default() -> Self {
        // h2: the fencing cases kill h1's agent and cut h3 off.
        SharedGuest {
            host: 1,
            id: "shared",
        }
    }
}

/// A process's log, appended to: its stdout and its stderr.
fn open_log(path: &Path) -> Result<(std::fs::File, std::fs::File), FaultError> {
    let err = || FaultError::io(format!("opening {}", path.display()));
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(err())?;
    let log2 = log.try_clone().map_err(err())?;
    Ok((log, log2))
}

async fn umount(dir: &Path) -> Result<(), FaultError> {
    tern_hv::qemu::net::run("umount", &[&dir.to_string_lossy()]).await?;
    Ok(())
}

fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The manager's API over HTTPS, checked against the lab CA, with the API token.
pub fn manager_client(
    lab: &LabState,
    url: &str,
    token: &str,
    timeout: Duration,
) -> Result<ManagerClient, FaultError> {
    let tls = lab
        .tls()?
        .ok_or_else(|| FaultError::Setup("the lab was made without a CA".into()))?;
    Ok(
        Client::with_tls(url, token, ClientOptions::with_timeout(timeout), Some(tls))
            .map(ManagerClient::from)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ms: u64, vm: &str) -> Twice {
        Twice {
            at: Duration::from_millis(ms),
            vm: vm.into(),
            hosts: vec!["h1".into(), "h2".into()],
        }
    }

    #[test]
    fn a_handover_is_not_running_twice() {
        let s: Vec<Twice> = (0..20).map(|i| at(i * 50, "a")).collect();
        assert!(running_twice(&s).is_empty());
    }

    #[test]
    fn two_copies_for_longer_than_the_grace_are_running_twice() {
        let s: Vec<Twice> = (0..60).map(|i| at(i * 50, "a")).collect();
        assert_eq!(running_twice(&s), BTreeSet::from(["a".to_string()]));
    }

    #[test]
    fn separate_handovers_do_not_add_up() {
        let mut s: Vec<Twice> = (0..20).map(|i| at(i * 50, "a")).collect();
        s.extend((0..20).map(|i| at(5_000 + i * 50, "a")));
        assert!(running_twice(&s).is_empty());
    }
}
