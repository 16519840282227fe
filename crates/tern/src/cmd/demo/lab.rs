//! `tern demo` on real QEMU guests: a 3-host lab with 1 Gbit/s links, the manager in
//! process (SQLite in a temporary directory) over the agents' HTTP API, VMs created on
//! host 1 with CPU-heavy workloads, balancing rounds that live-migrate VMs off the
//! overloaded host with tern's engine, per-host load before and after, and a teardown
//! that also runs on Ctrl-C, SIGTERM, errors and panics.
//!
//! ```text
//!  image ─► lab up (h1 h2 h3) ─► manager + control loop ─► VMs on h1 ─► `cpu` workloads
//!     ─► load before ─► rounds (balance ─► migrate) ─► load after ─► guests checked
//!     ─► lab down (always)
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_trait::async_trait;
use serde::Serialize;
use serde_json::Value;
use tern_agent::client::AgentClient;
use tern_agent::vms::CreateVm;
use tern_api::guest::{Command as GuestCommand, WorkloadSpec};
use tern_hv::image::GuestImage;
use tern_lab::{self as lab, LabOptions, LabState};
use tern_manager::client::http::HttpConnector;
use tern_manager::client::{Connector, HostClient, ProgressFn};
use tern_manager::control::Control;
use tern_manager::decide::balance::BalancePlan;
use tern_manager::decide::{self, Command, LoadReport, NewVm};
use tern_manager::manager::system_clock;
use tern_manager::state::{
    BalancerSettings, Capacity, Host, Migration, MigrationResult, Snapshot, VmSpec, VmState,
};
use tern_manager::store::SqliteStore;
use tern_manager::Manager;

use super::RoundLine;
use crate::cmd::bad_input;

/// Lab hosts; the VMs all start on the first.
const HOSTS: u32 = 3;
/// VMs created on host 1.
const VMS: usize = 4;
const VM_MEMORY_MIB: u64 = 256;
/// Each VM's workload: busy this much of every 100 ms.
const CPU_PERCENT: u32 = 90;
const LINK_MBIT: u32 = 1000;
/// Rounds at most; the demo stops at the first round that plans nothing.
const ROUNDS: usize = 6;
/// How long a guest may take to boot to its agent (TCG, several boots at once).
const BOOT_PATIENCE: Duration = Duration::from_secs(180);

/// One host's load as the manager sees it (smoothed over the agents' reports).
#[derive(Clone, Debug, Serialize)]
pub struct HostLoad {
    pub host: String,
    pub vms: usize,
    pub cpu_cores: f64,
    pub capacity_cpus: f64,
}

/// One migration the balancer made, and whether its guest is healthy afterwards.
#[derive(Clone, Debug, Serialize)]
pub struct MigrationLine {
    pub vm: String,
    pub from: String,
    pub to: String,
    pub policy: String,
    pub total_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub error: Option<String>,
    /// The guest's verifier advanced with its checksum intact and its console is clean.
    pub guest_ok: bool,
    pub guest_note: Option<String>,
}

impl RoundLine {
    fn new(round: usize, plan: &BalancePlan) -> Self {
        Self {
            round,
            planned: plan.moves.len(),
            decision_ms: plan.planning_ms.unwrap_or(0.0),
            score_before: plan.score_before,
            score_after: plan.score_after,
            skipped: plan.skipped.clone(),
        }
    }
}

#[derive(Serialize)]
pub struct Report {
    pub hosts: u32,
    pub vms: usize,
    pub link_mbit: u32,
    pub lab_namespaces: Vec<String>,
    pub boot_s: f64,
    pub before: Vec<HostLoad>,
    pub after: Vec<HostLoad>,
    pub rounds: Vec<RoundLine>,
    pub migrations: Vec<MigrationLine>,
    /// Lab namespaces still present after the teardown (should be none).
    pub left_behind: Vec<String>,
    pub wall_s: f64,
}

/// The flags of `a` that only the sim demo reads and that differ from their defaults.
fn sim_only_flags(a: &super::Args) -> Vec<&'static str> {
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        a: super::Args,
    }
    let d = <Defaults as clap::Parser>::parse_from(["demo"]).a;
    [
        ("--hosts", a.hosts != d.hosts),
        ("--vms", a.vms != d.vms),
        ("--rounds", a.rounds != d.rounds),
        ("--seed", a.seed != d.seed),
        ("--db", a.db.is_some()),
    ]
    .into_iter()
    .filter_map(|(flag, given)| given.then_some(flag))
    .collect()
}

/// Runs the demo with `a.aggressiveness` (1-5) and `a.json`; the other flags belong to
/// `--sim` and are refused here.
pub fn run(a: &super::Args) -> anyhow::Result<()> {
    let (aggressiveness, json) = (a.aggressiveness, a.json);
    let sim_only = sim_only_flags(a);
    if !sim_only.is_empty() {
        return Err(bad_input(format!(
            "these flags only work with --sim: {}; the QEMU demo always runs {HOSTS} hosts and {VMS} VMs",
            sim_only.join(", ")
        )));
    }
    if !(1..=5).contains(&aggressiveness) {
        return Err(bad_input("--aggressiveness must be 1 to 5"));
    }
    lab::require_root().map_err(|_| {
        bad_input(
            "tern demo builds a lab of network namespaces and QEMU guests and needs root: \
             run it with sudo, or run `tern demo --sim` (needs nothing)",
        )
    })?;
    let started = Instant::now();
    let img = tern_hv::image::ensure_image(&tern_hv::image::default_cache_dir(), &mut |s| {
        eprintln!("image: {s}")
    })
    .context("building the guest image")?;
    let tmp = tempfile::Builder::new().prefix("tern-demo-").tempdir()?;
    let opts = LabOptions {
        hosts: HOSTS,
        link_mbit: Some(LINK_MBIT),
        dir: tmp.path().join("lab"),
        tern_binary: std::env::current_exe()?,
        host_memory_mib: Some(VM_MEMORY_MIB * (VMS as u64 + 2)),
        host_cpus: None,
        image_dir: tern_hv::image::default_cache_dir(),
        manager_port: None,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let mut guard = Teardown {
        dir: Some(opts.dir.clone()),
    };
    let progress = |s: &str| eprintln!("demo: {s}");
    let result = rt.block_on(async {
        tokio::select! {
            r = async {
                let lab = lab::up(&opts, &progress).await?;
                demo(&lab, &img, aggressiveness, &tmp.path().join("demo.db")).await
            } => r,
            s = interrupted() => Err(anyhow::anyhow!("interrupted by {s}; tearing down")),
        }
    });
    let made = lab::load(&opts.dir).ok().flatten();
    eprintln!("demo: tearing the lab down");
    let down = rt.block_on(lab::down(&opts.dir, &progress));
    guard.dir = None;
    down.context("tearing the lab down")?;
    let mut report = result?;
    if let Some(made) = made {
        report.left_behind = left_behind(&made, &observe());
        report.lab_namespaces = made.shape().namespaces();
    }
    report.wall_s = started.elapsed().as_secs_f64();
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    if !report.left_behind.is_empty() {
        anyhow::bail!("namespaces left behind: {:?}", report.left_behind);
    }
    Ok(())
}

/// Resolves at the first SIGINT or SIGTERM, naming it.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Takes the lab down if the demo unwinds before its own teardown ran (a panic).
struct Teardown {
    dir: Option<PathBuf>,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        // A fresh runtime on its own thread: this may run while another runtime unwinds.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(lab::down(&dir, &|s| eprintln!("demo: {s}")))
                .map_err(std::io::Error::other)
                .map(drop)
        })
        .join();
    }
}

/// What the machine shows after the teardown: `ip netns list`, `ip -o link show` and
/// every process's command line.
struct Observed {
    netns: String,
    links: String,
    cmdlines: Vec<String>,
}

fn observe() -> Observed {
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let cmdlines = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .collect()
        })
        .unwrap_or_default();
    Observed {
        netns: ip(&["netns", "list"]),
        links: ip(&["-o", "link", "show"]),
        cmdlines,
    }
}

/// What of the lab `made` is still there: its namespaces (which hold the taps and
/// bridges), its root link, and processes using its directories (agents, QEMUs).
fn left_behind(made: &LabState, seen: &Observed) -> Vec<String> {
    let present = lab::plan::parse_netns_list(&seen.netns);
    let mut left: Vec<String> = made
        .shape()
        .namespaces()
        .into_iter()
        .filter(|n| present.contains(n))
        .map(|n| format!("namespace {n}"))
        .collect();
    let link = format!(": {}@", made.root_link);
    let link_bare = format!(": {}:", made.root_link);
    if seen
        .links
        .lines()
        .any(|l| l.contains(&link) || l.contains(&link_bare))
    {
        left.push(format!("link {}", made.root_link));
    }
    let dirs = [
        made.dir.display().to_string(),
        made.mem_root.display().to_string(),
    ];
    for c in &seen.cmdlines {
        if dirs.iter().any(|d| c.contains(d.as_str())) {
            left.push(format!("process {}", c.trim()));
        }
    }
    left
}

/// The manager's agents, with VMs created from tern's guest image: the manager's VM spec
/// carries only sizes, so this fills in the kernel, initramfs and command line.
struct ImageConnector {
    http: HttpConnector,
    /// The lab CA's client certificate: agents answer mutual TLS only.
    tls: rustls::ClientConfig,
    img: GuestImage,
}

struct ImageHost {
    inner: Arc<dyn HostClient>,
    agent: AgentClient,
    host: String,
    img: GuestImage,
}

impl Connector for ImageConnector {
    fn client(&self, host: &Host) -> tern_manager::error::Result<Arc<dyn HostClient>> {
        let tls = Some(self.tls.clone());
        let agent = AgentClient::new_tls(&host.address, "", Duration::from_secs(60), tls)
            .map_err(|e| agent_err(&host.name, e))?;
        Ok(Arc::new(ImageHost {
            inner: self.http.client(host)?,
            agent,
            host: host.name.clone(),
            img: self.img.clone(),
        }))
    }
}

fn agent_err(host: &str, e: impl std::fmt::Display) -> tern_manager::error::Error {
    tern_manager::error::Error::Agent {
        host: host.to_owned(),
        message: e.to_string(),
    }
}

#[async_trait]
impl HostClient for ImageHost {
    async fn create_vm(
        &self,
        vm: &str,
        spec: &VmSpec,
        _image: Option<&tern_manager::state::Image>,
        _reuse_disks: bool,
    ) -> tern_manager::error::Result<()> {
        let req = CreateVm {
            id: vm.parse()?,
            spec: self.img.vm_spec(spec.vcpus, spec.memory_mib, vm),
            start: true,
            reuse_disks: false,
        };
        self.agent
            .create_vm(&req)
            .await
            .map(drop)
            .map_err(|e| agent_err(&self.host, e))
    }

    async fn delete_vm(&self, vm: &str) -> tern_manager::error::Result<()> {
        self.inner.delete_vm(vm).await
    }

    async fn migrate_vm(
        &self,
        vm: &str,
        spec: &VmSpec,
        to: &Host,
        policy: tern_api::migration::PolicyKind,
        progress: ProgressFn<'_>,
    ) -> tern_manager::error::Result<MigrationResult> {
        eprintln!(
            "demo: migrating {vm}: {} -> {} ({policy})",
            self.host, to.name
        );
        self.inner.migrate_vm(vm, spec, to, policy, progress).await
    }

    async fn load_report(&self) -> tern_manager::error::Result<LoadReport> {
        self.inner.load_report().await
    }
}

/// Sends a guest request until the guest answers `ok` or `patience` runs out (a guest
/// booting, or reconnecting its channel after a move, does not answer for a while).
async fn guest(
    agent: &AgentClient,
    vm: &str,
    req: GuestCommand,
    patience: Duration,
) -> anyhow::Result<Value> {
    let t0 = Instant::now();
    loop {
        match agent.guest(vm, &req).await {
            Ok(a) if a["ok"] == true => return Ok(a["result"].clone()),
            Ok(a) => anyhow::bail!("guest {vm} answered {a}"),
            Err(e) if t0.elapsed() < patience => {
                tracing::debug!(error = %e, vm, "guest not answering yet");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            Err(e) => anyhow::bail!("guest {vm} does not answer: {e}"),
        }
    }
}

/// Per-host load as the manager holds it, with VMs counted where they run now.
fn loads(s: &Snapshot) -> Vec<HostLoad> {
    s.hosts
        .values()
        .map(|h| HostLoad {
            host: h.name.clone(),
            vms: s
                .vms
                .values()
                .filter(|v| v.observed_host.as_deref() == Some(h.name.as_str()))
                .count(),
            cpu_cores: h.cpu_smoothed.or(h.cpu_used).unwrap_or(0.0),
            capacity_cpus: h.capacity.cpus,
        })
        .collect()
}

/// A few load reports a second apart, so the smoothed loads reflect the present.
async fn measure(control: &Arc<Control>, reports: usize) -> anyhow::Result<()> {
    for _ in 0..reports {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        control.collect_reports().await?;
    }
    Ok(())
}

async fn demo(
    lab: &LabState,
    img: &GuestImage,
    aggressiveness: u8,
    db: &Path,
) -> anyhow::Result<Report> {
    let tls = lab
        .tls()?
        .ok_or_else(|| anyhow::anyhow!("the demo's lab has no CA"))?;
    let agents: Vec<AgentClient> = lab
        .hosts
        .iter()
        .map(|h| lab.client(&h.url, Duration::from_secs(60)))
        .collect::<Result<_, _>>()?;
    let manager = Arc::new(Manager::open(
        Box::new(SqliteStore::open(db)?),
        system_clock(),
    )?);
    let mut cmds = Vec::new();
    for (h, a) in lab.hosts.iter().zip(&agents) {
        let r = a.host().await?;
        cmds.push(Command::RegisterHost {
            name: h.name.clone(),
            address: h.url.clone(),
            capacity: Capacity {
                cpus: f64::from(r.capacity.cpus),
                memory_mib: r.capacity.memory_mib,
            },
        });
    }
    cmds.push(Command::PutSettings(BalancerSettings {
        aggressiveness,
        // One migration at a time per host: they share this machine's cores.
        max_per_host: 1,
        max_per_cluster: 2,
        cooldown_s: 600,
        smoothing_window: 3,
        default_policy: tern_api::migration::PolicyKind::Adaptive,
        ..Default::default()
    }));
    for r in manager.execute_many(cmds)? {
        r?;
    }
    let connector = Arc::new(ImageConnector {
        http: HttpConnector::with_tls(Duration::from_secs(120), tls.clone()),
        tls,
        img: img.clone(),
    });
    let control = Control::new(manager.clone(), connector);
    let first = lab.hosts[0].name.clone();
    let reqs: Vec<NewVm> = (1..=VMS)
        .map(|i| NewVm {
            name: format!("demo-{i}"),
            spec: VmSpec::sized(1, VM_MEMORY_MIB),
            host: Some(first.clone()),
        })
        .collect();
    let names: Vec<String> = reqs.iter().map(|r| r.name.clone()).collect();
    eprintln!("demo: creating {VMS} VMs ({VM_MEMORY_MIB} MiB, 1 vCPU) on {first}");
    for r in manager.step(|s, _| decide::create_vms(s, reqs))? {
        r?;
    }
    let boot = Instant::now();
    control.settle().await?;
    let not_running: Vec<String> = manager.read(|s| {
        s.vms
            .values()
            .filter(|v| v.state != VmState::Running)
            .map(|v| format!("{} ({:?})", v.name, v.state))
            .collect()
    });
    if !not_running.is_empty() {
        anyhow::bail!("VMs did not start: {not_running:?} (agent logs under the lab directory)");
    }
    let work = format!("cpu --percent {CPU_PERCENT}");
    let started = futures_util::future::join_all(names.iter().map(|vm| {
        let agent = &agents[0];
        let workload = WorkloadSpec::Cpu {
            percent: f64::from(CPU_PERCENT),
            threads: 1,
        };
        async move {
            guest(agent, vm, GuestCommand::Ping, BOOT_PATIENCE).await?;
            guest(
                agent,
                vm,
                GuestCommand::Start { workload },
                Duration::from_secs(10),
            )
            .await
        }
    }))
    .await;
    for r in started {
        r?;
    }
    let boot_s = boot.elapsed().as_secs_f64();
    eprintln!("demo: {VMS} guests booted and running `{work}` in {boot_s:.1} s; measuring load");
    measure(&control, 4).await?;
    let before = manager.read(loads);
    print_loads("before", &before);
    let mut rounds = Vec::new();
    for round in 1..=ROUNDS {
        let r = control.round().await?;
        let line = RoundLine::new(round, &r.plan);
        eprintln!(
            "demo: round {round}: {} planned, spread {:.4} -> {:.4}, not moved: {:?}",
            line.planned, line.score_before, line.score_after, line.skipped
        );
        rounds.push(line);
        if r.plan.moves.is_empty() {
            break;
        }
        // Fresh samples from the hosts the VMs now run on before the next decision.
        measure(&control, 2).await?;
    }
    measure(&control, 3).await?;
    let after = manager.read(loads);
    let mut records: Vec<Migration> = manager.migrations(1000)?;
    records.reverse();
    let mut migrations = Vec::new();
    for m in records {
        migrations.push(check(&m, lab, &agents).await);
    }
    Ok(Report {
        hosts: HOSTS,
        vms: VMS,
        link_mbit: LINK_MBIT,
        lab_namespaces: Vec::new(),
        boot_s,
        before,
        after,
        rounds,
        migrations,
        left_behind: Vec::new(),
        wall_s: 0.0,
    })
}

/// A migration record with its guest checked on the host it went to.
async fn check(m: &Migration, lab: &LabState, agents: &[AgentClient]) -> MigrationLine {
    let mut line = MigrationLine {
        vm: m.vm.clone(),
        from: m.from.clone(),
        to: m.to.clone(),
        policy: m.policy.to_string(),
        total_ms: None,
        downtime_ms: None,
        error: None,
        guest_ok: false,
        guest_note: None,
    };
    match &m.result {
        MigrationResult::Succeeded {
            total_ms,
            downtime_ms,
        } => {
            line.total_ms = Some(*total_ms);
            line.downtime_ms = Some(*downtime_ms);
        }
        MigrationResult::Failed { error } => line.error = Some(error.clone()),
        MigrationResult::Running => line.error = Some("still running".into()),
    }
    let Some(agent) = lab
        .hosts
        .iter()
        .position(|h| h.name == m.to)
        .map(|i| &agents[i])
    else {
        line.guest_note = Some(format!("unknown host {}", m.to));
        return line;
    };
    if line.error.is_some() {
        return line;
    }
    match guest_health(agent, &m.vm).await {
        Ok(()) => line.guest_ok = true,
        Err(e) => line.guest_note = Some(e.to_string()),
    }
    line
}

/// The guest's memory verifier advances with an intact checksum, its console shows no
/// kernel trouble, and its `cpu` workload still runs.
async fn guest_health(agent: &AgentClient, vm: &str) -> anyhow::Result<()> {
    let patience = Duration::from_secs(30);
    let v1 = guest(agent, vm, GuestCommand::Verify, patience).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v2 = guest(agent, vm, GuestCommand::Verify, patience).await?;
    if v1["ok"] != true || v2["ok"] != true {
        anyhow::bail!("memory checksum mismatch: {v2}");
    }
    if v2["counter"].as_u64() <= v1["counter"].as_u64() {
        anyhow::bail!("verifier stalled: {v1} then {v2}");
    }
    let h = guest(agent, vm, GuestCommand::Health, patience).await?;
    if h["ok"] != true {
        anyhow::bail!("guest reports trouble: {}", h["findings"]);
    }
    let s = guest(agent, vm, GuestCommand::Status, patience).await?;
    let cpu_runs = s["workloads"]
        .as_array()
        .is_some_and(|w| w.iter().any(|w| w["name"] == "cpu" && w["running"] == true));
    if !cpu_runs {
        anyhow::bail!("the cpu workload no longer runs: {}", s["workloads"]);
    }
    Ok(())
}

fn print_loads(label: &str, loads: &[HostLoad]) {
    let line: Vec<String> = loads
        .iter()
        .map(|l| {
            format!(
                "{} {:.2}/{:.0} cores ({} VMs)",
                l.host, l.cpu_cores, l.capacity_cpus, l.vms
            )
        })
        .collect();
    eprintln!("demo: load {label}: {}", line.join(", "));
}

fn print_report(r: &Report) {
    println!(
        "{} lab hosts ({} Mbit/s links), {} VMs of {VM_MEMORY_MIB} MiB running `cpu --percent {CPU_PERCENT}`, booted in {:.1} s\n",
        r.hosts, r.link_mbit, r.vms, r.boot_s
    );
    println!("host   load before        load after");
    for (b, a) in r.before.iter().zip(&r.after) {
        println!(
            "{:<6} {:>5.2} cores {} VMs   {:>5.2} cores {} VMs",
            b.host, b.cpu_cores, b.vms, a.cpu_cores, a.vms
        );
    }
    println!("\nround  planned  spread score before -> after");
    for l in &r.rounds {
        println!(
            "{:>5} {:>8}  {:.4} -> {:.4}",
            l.round, l.planned, l.score_before, l.score_after
        );
    }
    println!("\n{} migrations:", r.migrations.len());
    println!(
        "  {:<8} {:<5} {:<5} {:<9} {:>9} {:>9}  guest",
        "vm", "from", "to", "policy", "total", "downtime"
    );
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |x| format!("{x} ms"));
    for m in &r.migrations {
        println!(
            "  {:<8} {:<5} {:<5} {:<9} {:>9} {:>9}  {}{}",
            m.vm,
            m.from,
            m.to,
            m.policy,
            ms(m.total_ms),
            ms(m.downtime_ms),
            if m.guest_ok { "ok" } else { "NOT OK" },
            m.error
                .as_ref()
                .or(m.guest_note.as_ref())
                .map_or(String::new(), |n| format!(" ({n})"))
        );
    }
    println!(
        "\nlab torn down ({} namespaces removed); wall time {:.1} s",
        r.lab_namespaces.len(),
        r.wall_s
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn made() -> LabState {
        serde_json::from_value(json!({
            "index": 3, "link_mbit": 1000, "dir": "/tmp/x/lab", "token_file": "/tmp/x/lab/token",
            "mem_root": "/dev/shm/tern-lab-3", "switch_netns": "tern-3-sw",
            "root_link": "tern-3-r", "root_addr": "198.18.3.254",
            "hosts": [{"name": "h1", "netns": "tern-3-h1", "addr": "198.18.3.1",
                       "url": "http://198.18.3.1:7070", "pid": 10,
                       "state_dir": "/tmp/x/lab/hosts/h1", "mem_dir": "/dev/shm/tern-lab-3/h1"}]
        }))
        .unwrap()
    }

    #[test]
    fn flags_of_the_sim_demo_are_refused_before_anything_is_made() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: super::super::Args,
        }
        let parse = |args: &[&str]| {
            <Cli as clap::Parser>::parse_from(std::iter::once("demo").chain(args.iter().copied())).a
        };
        assert!(sim_only_flags(&parse(&["--json", "--aggressiveness", "5"])).is_empty());
        assert_eq!(
            sim_only_flags(&parse(&["--hosts", "3", "--vms", "4", "--db", "x.db"])),
            ["--hosts", "--vms", "--db"]
        );
        let err = run(&parse(&["--seed", "9"])).unwrap_err();
        assert_eq!(crate::cmd::exit_code(&err), 2);
        assert!(
            err.to_string().contains("only work with --sim: --seed"),
            "{err}"
        );
        let err = run(&parse(&["--aggressiveness", "0"])).unwrap_err();
        assert_eq!(crate::cmd::exit_code(&err), 2, "{err}");
    }

    #[test]
    fn a_clean_machine_leaves_nothing_behind() {
        let seen = Observed {
            netns: "tern-4-h1 (id: 2)\nother\n".into(),
            links: "1: lo: <LOOPBACK>\n7: tern-4-r@if2: <UP>\n".into(),
            cmdlines: vec![
                "qemu-system-x86_64 -object mem-path=/dev/shm/tern-lab-4/h1/a.ram".into(),
            ],
        };
        assert!(left_behind(&made(), &seen).is_empty());
    }

    #[test]
    fn namespaces_links_and_processes_of_the_lab_are_reported() {
        let seen = Observed {
            netns: "tern-3-sw (id: 1)\ntern-3-h1\n".into(),
            links: "7: tern-3-r@if2: <BROADCAST,UP>\n".into(),
            cmdlines: vec![
                "qemu-system-x86_64 mem-path=/dev/shm/tern-lab-3/h1/demo-1.ram".into(),
                "bash".into(),
            ],
        };
        let left = left_behind(&made(), &seen);
        assert_eq!(left.len(), 4, "{left:?}");
        assert!(left.iter().any(|l| l == "namespace tern-3-sw"));
        assert!(left.iter().any(|l| l == "link tern-3-r"));
        assert!(left.iter().any(|l| l.starts_with("process qemu")));
    }
}
