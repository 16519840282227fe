//! vCPU scheduling policies (`PUT /v1/vms/{id}/vcpu-policy`): how this host schedules a
//! VM's vCPU threads (thread ids from QMP `query-cpus-fast`).
//!
//! - `none`: the threads may run on every online CPU; the host's scheduler decides.
//! - `pin`: vCPU *i*'s thread may run only on online CPU *i* mod their number
//!   (`sched_setaffinity`).
//! - `gang`: pinned as with `pin`, and the VM's vCPU threads sit in a threaded cgroup
//!   (v2) of their own whose `cgroup.freeze` a scheduler thread toggles: the host's gang
//!   VMs take turns of [`SLICE`], one thawed at a time, so a VM's vCPUs run together or
//!   not at all. Only the vCPU threads are frozen; QEMU's main loop and I/O threads run.
//!
//! The decisions (which CPU, whose turn) are pure functions below; the rest writes them
//! to the kernel. A VM's policy is recorded beside its spec (`vms/ID.vcpu`), so an agent
//! that adopts a running QEMU applies it again (the cgroups and affinities outlive the
//! agent, but the scheduler thread does not).

use crate::api::{parse, Body, Id, VmId};
use crate::error::AgentError;
use crate::state::AppState;
use axum::extract::State;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Json, Router};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_api::vcpu::{VcpuPolicy, VcpuPolicySetting};
use tern_hv::{HvError, VmState};

/// One gang VM's turn. Freezing takes from 0.2 ms to over 20 ms on a loaded host (every
/// thread must reach the freezer), and the next gang is thawed only once the last one is
/// frozen, so a turn must be long beside that; short enough that a guest's timers and
/// I/O barely notice.
pub const SLICE: Duration = Duration::from_millis(50);

/// How often the scheduler looks whether a gang it froze is frozen yet.
const FROZEN_POLL: Duration = Duration::from_micros(200);

/// The nice value of a vCPU thread under `policy`. A gang VM's turn is only worth
/// something if its vCPUs get the cores during it: at -20 a thread weighs about 87
/// times a nice-0 one, so the host's other threads barely delay it, and the freezer
/// still bounds what it takes (nothing else of the host's starves, as it could under a
/// real-time class).
pub fn vcpu_nice(policy: VcpuPolicy) -> i32 {
    match policy {
        VcpuPolicy::None | VcpuPolicy::Pin => 0,
        VcpuPolicy::Gang => -20,
    }
}

/// The online CPU vCPU `vcpu` is pinned to: the `vcpu mod n`-th of the `n` online CPUs.
pub fn pin_cpu(vcpu: usize, online: &[usize]) -> Option<usize> {
    online.get(vcpu % online.len().max(1)).copied()
}

/// Which of `gangs` gang VMs (in name order) runs `elapsed` after the scheduler started.
pub fn gang_turn(elapsed: Duration, slice: Duration, gangs: usize) -> Option<usize> {
    if gangs == 0 || slice.is_zero() {
        return None;
    }
    let n = elapsed.as_nanos() / slice.as_nanos();
    Some((n % gangs as u128) as usize)
}

/// The time left until the next slice boundary.
pub fn until_next_slice(elapsed: Duration, slice: Duration) -> Duration {
    if slice.is_zero() {
        return Duration::ZERO;
    }
    let into = elapsed.as_nanos() % slice.as_nanos();
    Duration::from_nanos((slice.as_nanos() - into) as u64)
}

/// The CPUs of a kernel CPU list (`/sys/devices/system/cpu/online`: `0-3,6,8-9`).
pub fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (a, b): (usize, usize) = match part.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let a = part.parse().ok()?;
                (a, a)
            }
        };
        if b < a || b - a > 4096 {
            return None;
        }
        cpus.extend(a..=b);
    }
    (!cpus.is_empty()).then_some(cpus)
}

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo` (on a hybrid
/// host it is `/sys/fs/cgroup/unified`, beside the v1 controllers).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        (post.split_whitespace().next()? == "cgroup2")
            .then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// A process's cgroup v2 path, from `/proc/PID/cgroup` (the `0::/path` line).
pub fn cgroup2_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Where this process sees the cgroup v2 hierarchy. An agent in a mount namespace whose
/// `/sys` was mounted afresh (as `ip netns exec` does) sees none, and mounts the
/// hierarchy under its state directory: it is one hierarchy, wherever it is mounted.
fn cgroup2_root(state_dir: &Path) -> Result<PathBuf, AgentError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io("reading /proc/self/mountinfo".into()))?;
    if let Some(root) = cgroup2_mount(&mountinfo) {
        return Ok(root);
    }
    let dir = state_dir.join("cgroup2");
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    rustix::mount::mount(
        "cgroup2",
        &dir,
        "cgroup2",
        rustix::mount::MountFlags::empty(),
        None,
    )
    .map_err(|e| {
        AgentError::BadRequest(format!(
            "gang scheduling needs the cgroup v2 hierarchy; mounting it at {} failed: {e} \
                 (run the agent as root on a kernel with cgroup v2)",
            dir.display()
        ))
    })?;
    Ok(dir)
}

/// The gang cgroups of one VM: the QEMU process in `domain`, its vCPU threads in the
/// threaded child `vcpus`, the process's own cgroup in `home` to go back to.
#[derive(Debug, Clone)]
struct GangCgroup {
    domain: PathBuf,
    vcpus: PathBuf,
    home: PathBuf,
    pid: u32,
    /// The vCPU threads' cgroup of the v1 `cpu` controller, weighted up (see [`CpuBoost`]).
    boost: Option<CpuBoost>,
}

/// A gang VM's vCPU threads in a v1 `cpu` cgroup of their own with the largest weight
/// (`cpu.shares`). With autogroups (`kernel.sched_autogroup_enabled`) a nice value only
/// ranks a thread within its session, so the host's other sessions (a compiler, a
/// backup) still take half a core from a vCPU in its turn; a cgroup's weight ranks it
/// against them. The freezer still bounds what a gang VM takes: half the time or less.
#[derive(Debug, Clone)]
struct CpuBoost {
    root: PathBuf,
    dir: PathBuf,
    tids: Vec<u32>,
}

/// The largest `cpu.shares` the kernel accepts.
const MAX_SHARES: u32 = 262_144;

/// Where the v1 `cpu` controller is mounted, from `/proc/self/mountinfo`.
pub fn cgroup1_cpu_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mut f = post.split_whitespace();
        let is_cpu = f.next()? == "cgroup" && f.nth(1)?.split(',').any(|o| o == "cpu");
        is_cpu.then(|| pre.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

impl CpuBoost {
    /// Moves `tids` into a weighted-up `cpu` cgroup; `None` where there is no v1 `cpu`
    /// controller to use (a pure cgroup v2 host, a kernel without it).
    fn create(state_dir: &Path, name: &str, tids: &[u32]) -> Option<CpuBoost> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let root = match cgroup1_cpu_mount(&mountinfo) {
            Some(r) => r,
            None => {
                let dir = state_dir.join("cgroup-cpu");
                std::fs::create_dir_all(&dir).ok()?;
                let flags = rustix::mount::MountFlags::empty();
                rustix::mount::mount("cgroup", &dir, "cgroup", flags, c"cpu").ok()?;
                dir
            }
        };
        let b = CpuBoost {
            dir: root.join(format!("tern.{name}")),
            root,
            tids: tids.to_vec(),
        };
        let set_up = (|| {
            std::fs::create_dir_all(&b.dir).ok()?;
            write(&b.dir.join("cpu.shares"), &MAX_SHARES.to_string()).ok()?;
            for t in tids {
                write(&b.dir.join("tasks"), &t.to_string()).ok()?;
            }
            Some(())
        })();
        if set_up.is_none() {
            b.release();
            return None;
        }
        Some(b)
    }

    fn release(&self) {
        for t in &self.tids {
            let _ = write(&self.root.join("tasks"), &t.to_string());
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[derive(Debug)]
struct Entry {
    policy: VcpuPolicy,
    gang: Option<GangCgroup>,
}

#[derive(Debug, Default)]
struct Table {
    vms: BTreeMap<String, Entry>,
    /// Whether the gang scheduler thread runs; it ends when no gang VM is left.
    scheduler: bool,
}

/// The policies of this agent's VMs, and the gang scheduler.
#[derive(Debug, Default)]
pub struct Policies {
    table: Arc<Mutex<Table>>,
    /// Held while a policy is being applied: changes are applied in the order they
    /// were asked, so the last one asked is the one that stays.
    changing: Arc<tokio::sync::Mutex<()>>,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> AgentError {
    AgentError::io(context)
}

fn write(path: &Path, value: &str) -> Result<(), AgentError> {
    std::fs::write(path, value).map_err(io(format!("writing {value:?} to {}", path.display())))
}

fn online_cpus() -> Result<Vec<usize>, AgentError> {
    let path = "/sys/devices/system/cpu/online";
    let text = std::fs::read_to_string(path).map_err(io(format!("reading {path}")))?;
    parse_cpu_list(&text)
        .ok_or_else(|| AgentError::BadRequest(format!("{path} is not a CPU list: {text:?}")))
}

/// Lets thread `tid` run on `cpus` only.
fn set_affinity(tid: u32, cpus: &[usize]) -> Result<(), AgentError> {
    let mut set = rustix::thread::CpuSet::new();
    for &c in cpus {
        set.set(c);
    }
    let pid = i32::try_from(tid)
        .ok()
        .and_then(rustix::thread::Pid::from_raw);
    rustix::thread::sched_setaffinity(pid, &set)
        .map_err(|e| io(format!("sched_setaffinity of vCPU thread {tid}"))(e.into()))
}

/// Sets thread `tid`'s nice value (`setpriority` on a thread id acts on that thread).
fn set_nice(tid: u32, nice: i32) -> Result<(), AgentError> {
    let pid = i32::try_from(tid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    rustix::process::setpriority_process(pid, nice)
        .map_err(|e| io(format!("setpriority {nice} of vCPU thread {tid}"))(e.into()))
}

impl GangCgroup {
    /// Moves QEMU `pid` into a cgroup of its own and its vCPU threads into a threaded
    /// child of it, thawed.
    fn create(
        state_dir: &Path,
        host: &str,
        vm: &str,
        pid: u32,
        tids: &[u32],
    ) -> Result<GangCgroup, AgentError> {
        let root = cgroup2_root(state_dir)?;
        let cg = format!("/proc/{pid}/cgroup");
        let text = std::fs::read_to_string(&cg).map_err(io(format!("reading {cg}")))?;
        let home = cgroup2_path(&text)
            .map(|p| root.join(p.trim_start_matches('/')))
            .ok_or_else(|| AgentError::BadRequest(format!("{cg} names no cgroup v2 path")))?;
        let domain = root.join("tern").join(format!("{host}.{vm}"));
        let vcpus = domain.join("vcpus");
        std::fs::create_dir_all(&vcpus).map_err(io(format!("creating {}", vcpus.display())))?;
        let g = GangCgroup {
            domain,
            vcpus,
            home,
            pid,
            boost: CpuBoost::create(state_dir, &format!("{host}.{vm}"), tids),
        };
        let set_up = (|| {
            write(&g.domain.join("cgroup.procs"), &pid.to_string())?;
            write(&g.vcpus.join("cgroup.type"), "threaded")?;
            for t in tids {
                write(&g.vcpus.join("cgroup.threads"), &t.to_string())?;
            }
            g.freeze(false)
        })();
        if let Err(e) = set_up {
            g.release();
            return Err(e);
        }
        Ok(g)
    }

    /// Whether every thread in `vcpus` has stopped (`frozen 1` in `cgroup.events`).
    fn is_frozen(&self) -> bool {
        std::fs::read_to_string(self.vcpus.join("cgroup.events"))
            .is_ok_and(|t| t.lines().any(|l| l == "frozen 1"))
    }

    fn freeze(&self, frozen: bool) -> Result<(), AgentError> {
        write(
            &self.vcpus.join("cgroup.freeze"),
            if frozen { "1" } else { "0" },
        )
    }

    /// Thaws the threads and puts the whole process back where it was. A QEMU that is
    /// gone has left the cgroups empty, and they are removed all the same.
    fn release(&self) {
        if let Some(b) = &self.boost {
            b.release();
        }
        let _ = self.freeze(false);
        let _ = write(&self.home.join("cgroup.procs"), &self.pid.to_string());
        let _ = std::fs::remove_dir(&self.vcpus);
        let _ = std::fs::remove_dir(&self.domain);
    }
}

/// Toggles the gang VMs' freezers in turns until none is left.
fn gang_scheduler(table: Arc<Mutex<Table>>) {
    // A late switch is time both gangs lose, so the switching thread must not wait
    // behind the host's other threads.
    let _ = set_nice(rustix::thread::gettid().as_raw_nonzero().get() as u32, -20);
    let start = Instant::now();
    let mut frozen: BTreeMap<String, bool> = BTreeMap::new();
    loop {
        let gangs: Vec<(String, GangCgroup)> = {
            let mut t = table.lock().expect("policy table lock");
            let gangs: Vec<_> = t
                .vms
                .iter()
                .filter_map(|(vm, e)| Some((vm.clone(), e.gang.clone()?)))
                .collect();
            if gangs.is_empty() {
                t.scheduler = false;
                return;
            }
            gangs
        };
        frozen.retain(|vm, _| gangs.iter().any(|(g, _)| g == vm));
        let elapsed = start.elapsed();
        let turn = gang_turn(elapsed, SLICE, gangs.len());
        // Freeze, wait until frozen, then thaw: two gangs never share the cores. The
        // wait is bounded by half a slice, so a gang that does not freeze (a thread
        // stuck in the kernel) costs the next one time, never its whole turn.
        let mut froze = Vec::new();
        let mut thaw = None;
        for (i, (vm, g)) in gangs.iter().enumerate() {
            let f = Some(i) != turn;
            if frozen.get(vm) == Some(&f) {
                continue;
            }
            if !f {
                thaw = Some((vm, g));
            } else if g.freeze(true).is_ok() {
                frozen.insert(vm.clone(), true);
                froze.push(g);
            }
        }
        if let Some((vm, g)) = thaw {
            let until = Instant::now() + SLICE / 2;
            while !froze.iter().all(|g| g.is_frozen()) && Instant::now() < until {
                std::thread::sleep(FROZEN_POLL);
            }
            if g.freeze(false).is_ok() {
                frozen.insert(vm.clone(), false);
            }
        }
        std::thread::sleep(until_next_slice(start.elapsed(), SLICE));
    }
}

impl Policies {
    /// VM `vm`'s policy (`none` when none was set).
    pub fn get(&self, vm: &str) -> VcpuPolicy {
        let t = self.table.lock().expect("policy table lock");
        t.vms.get(vm).map_or(VcpuPolicy::None, |e| e.policy)
    }

    /// Undoes VM `vm`'s policy's cgroups (affinities go with the threads).
    fn release(&self, vm: &str) {
        let old = self.table.lock().expect("policy table lock").vms.remove(vm);
        if let Some(g) = old.and_then(|e| e.gang) {
            g.release();
        }
    }

    /// Applies `policy` to the VM whose QEMU is `pid` and whose vCPU threads are `tids`.
    fn apply(
        &self,
        state_dir: &Path,
        host: &str,
        vm: &str,
        policy: VcpuPolicy,
        pid: u32,
        tids: &[u32],
    ) -> Result<(), AgentError> {
        self.release(vm);
        let online = online_cpus()?;
        for (i, &tid) in tids.iter().enumerate() {
            let cpus = match policy {
                VcpuPolicy::None => online.clone(),
                VcpuPolicy::Pin | VcpuPolicy::Gang => pin_cpu(i, &online).into_iter().collect(),
            };
            set_affinity(tid, &cpus)?;
            set_nice(tid, vcpu_nice(policy))?;
        }
        let gang = match policy {
            VcpuPolicy::Gang => Some(GangCgroup::create(state_dir, host, vm, pid, tids)?),
            _ => None,
        };
        let start = gang.is_some();
        let mut t = self.table.lock().expect("policy table lock");
        t.vms.insert(vm.to_string(), Entry { policy, gang });
        if start && !t.scheduler {
            t.scheduler = true;
            let table = self.table.clone();
            std::thread::Builder::new()
                .name("gang-scheduler".into())
                .spawn(move || gang_scheduler(table))
                .map_err(io("starting the gang scheduler thread".into()))?;
        }
        Ok(())
    }
}

impl AppState {
    fn vcpu_record(&self, id: &str) -> PathBuf {
        self.host.state_dir.join("vms").join(format!("{id}.vcpu"))
    }

    /// Sets VM `id`'s vCPU policy: it must be running under QEMU (the policy acts on
    /// its threads). Recorded, so an agent adopting the VM applies it again.
    pub async fn set_vcpu_policy(&self, id: &str, policy: VcpuPolicy) -> Result<(), AgentError> {
        let _turn = self.vcpu.changing.lock().await;
        self.apply_vcpu_policy(id, policy).await
    }

    /// Applies `policy` to VM `id` in a task of its own, ahead of any change asked after
    /// this returns (a migration's destination, whose resume must not wait for it). A
    /// failure is logged.
    pub async fn set_vcpu_policy_soon(&self, id: &str, policy: VcpuPolicy) {
        let turn = self.vcpu.changing.clone().lock_owned().await;
        let (state, id) = (self.clone(), id.to_owned());
        tokio::spawn(async move {
            let _turn = turn;
            match state.apply_vcpu_policy(&id, policy).await {
                Ok(()) => tracing::info!(vm = id, %policy, "vCPU policy applied"),
                Err(e) => tracing::warn!(vm = id, %policy, error = %e, "vCPU policy not applied"),
            }
        });
    }

    async fn apply_vcpu_policy(&self, id: &str, policy: VcpuPolicy) -> Result<(), AgentError> {
        // `none` is every VM's state: nothing to do where there are no threads.
        if self.hv.kind() != "qemu" && policy.is_none() {
            self.hv.refresh(id).await?;
            return Ok(());
        }
        if self.hv.kind() != "qemu" {
            return Err(AgentError::BadRequest(format!(
                "VM {id:?} runs on the {} driver, which has no vCPU threads to schedule",
                self.hv.kind()
            )));
        }
        let info = self.hv.refresh(id).await?;
        if info.state != VmState::Running {
            return Err(HvError::Conflict {
                id: id.to_string(),
                action: "set the vCPU policy of",
                state: info.state,
            }
            .into());
        }
        let pid = info.pid.ok_or_else(|| {
            AgentError::BadRequest(format!("VM {id:?} is running but has no QEMU pid"))
        })?;
        let tids = self.hv.vcpu_threads(id).await?;
        self.vcpu
            .apply(
                &self.host.state_dir,
                &self.host.name,
                id,
                policy,
                pid,
                &tids,
            )
            .inspect_err(|_| self.vcpu.release(id))?;
        let path = self.vcpu_record(id);
        if policy == VcpuPolicy::None {
            let _ = std::fs::remove_file(&path);
            return Ok(());
        }
        write(&path, policy.name())
    }

    /// Applies the policy recorded for VM `id` again (after adopting its QEMU).
    pub async fn reapply_vcpu_policy(&self, id: &str) -> Result<VcpuPolicy, AgentError> {
        let Ok(text) = std::fs::read_to_string(self.vcpu_record(id)) else {
            return Ok(VcpuPolicy::None);
        };
        let policy: VcpuPolicy = text.trim().parse().map_err(AgentError::BadRequest)?;
        self.set_vcpu_policy(id, policy).await?;
        Ok(policy)
    }

    /// Forgets VM `id`'s policy (the VM is gone or leaving).
    pub fn forget_vcpu_policy(&self, id: &str) {
        self.vcpu.release(id);
        let _ = std::fs::remove_file(self.vcpu_record(id));
    }
}

/// The policy routes, behind the token check.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/vms/:id/vcpu-policy", put(set_policy).get(show_policy))
        .layer(middleware::from_fn_with_state(state, crate::api::auth))
}

#[utoipa::path(put, path = "/v1/vms/{id}/vcpu-policy",
    summary = "set how the host schedules a running VM's vCPU threads: none, pin or gang",
    params(Id), request_body = VcpuPolicySetting,
    responses((status = 200, description = "the policy now applied", body = VcpuPolicySetting)))]
pub async fn set_policy(
    State(state): State<AppState>,
    VmId(id): VmId,
    Body(body): Body,
) -> Response {
    let id = id.into_string();
    let set = match parse::<VcpuPolicySetting>(&body) {
        Ok(s) => s,
        Err(e) => return e.into_response(),
    };
    match state.set_vcpu_policy(&id, set.policy).await {
        Ok(()) => Json(set).into_response(),
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(get, path = "/v1/vms/{id}/vcpu-policy",
    summary = "the vCPU policy applied to a VM on this host",
    params(Id),
    responses((status = 200, description = "the policy", body = VcpuPolicySetting)))]
pub async fn show_policy(State(state): State<AppState>, VmId(id): VmId) -> Response {
    let id = id.into_string();
    match state.hv.refresh(&id).await {
        Ok(_) => Json(VcpuPolicySetting {
            policy: state.vcpu.get(&id),
        })
        .into_response(),
        Err(e) => AgentError::from(e).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn cpu_lists_and_mounts_parse() {
        assert_eq!(
            parse_cpu_list("0-3,6,8-9\n"),
            Some(vec![0, 1, 2, 3, 6, 8, 9])
        );
        assert_eq!(parse_cpu_list("0\n"), Some(vec![0]));
        assert_eq!(parse_cpu_list(""), None);
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
        let mi = "30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                  35 25 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("30 25 0:26 / /x rw - cgroup c rw\n"), None);
        assert_eq!(
            cgroup1_cpu_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/cpu"))
        );
        let both = "31 25 0:27 / /c rw - cgroup cgroup rw,cpu,cpuacct\n";
        assert_eq!(cgroup1_cpu_mount(both), Some(PathBuf::from("/c")));
        let acct = "32 25 0:28 / /a rw - cgroup cgroup rw,cpuacct\n";
        assert_eq!(cgroup1_cpu_mount(acct), None);
        assert_eq!(cgroup2_path("4:memory:/a\n0::/b/c\n"), Some("/b/c"));
    }

    #[test]
    fn vcpus_are_spread_over_the_online_cpus_in_order() {
        let online = [0, 2, 5];
        let got: Vec<_> = (0..5).map(|i| pin_cpu(i, &online)).collect();
        assert_eq!(got, [Some(0), Some(2), Some(5), Some(0), Some(2)]);
        assert_eq!(pin_cpu(0, &[]), None);
    }

    proptest! {
        /// Over any run of whole rounds every gang gets the same number of slices, one
        /// gang at a time, and a turn changes only at a slice boundary.
        #[test]
        fn gangs_take_equal_turns(gangs in 1usize..6, slice_ms in 1u64..50, rounds in 1u64..20) {
            let slice = Duration::from_millis(slice_ms);
            let mut count = vec![0u64; gangs];
            for k in 0..rounds * gangs as u64 {
                let at = slice * k as u32 + Duration::from_nanos(k % (slice.as_nanos() as u64));
                let turn = gang_turn(at, slice, gangs).unwrap();
                prop_assert_eq!(turn, (k % gangs as u64) as usize);
                count[turn] += 1;
                let left = until_next_slice(at, slice);
                prop_assert!(!left.is_zero() && left <= slice);
                prop_assert_eq!(gang_turn(at + left, slice, gangs), Some(((k + 1) % gangs as u64) as usize));
            }
            prop_assert!(count.iter().all(|&c| c == rounds));
        }
    }

    #[test]
    fn only_gang_vcpus_are_favoured() {
        assert_eq!(vcpu_nice(VcpuPolicy::None), 0);
        assert_eq!(vcpu_nice(VcpuPolicy::Pin), 0);
        assert_eq!(vcpu_nice(VcpuPolicy::Gang), -20);
    }

    #[test]
    fn no_gang_no_turn() {
        assert_eq!(gang_turn(Duration::from_secs(1), SLICE, 0), None);
        assert_eq!(gang_turn(Duration::from_secs(1), Duration::ZERO, 2), None);
    }
}
