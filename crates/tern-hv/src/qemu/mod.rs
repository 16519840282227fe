//! The QEMU driver: one `qemu-system-x86_64` process per VM, driven over QMP.
//!
//! Guest RAM lives in a shared memory-backend file under the host's tmpfs directory
//! (`mem_dir/ID.ram`); sockets, logs and the pid file under `run_dir/ID/`. A VM's process
//! starts with `-S` (guest stopped) and `cont` runs it; `stop` quits QEMU and keeps the
//! definition; `destroy` also removes its files and taps. Disks are files in the store
//! the caller made; the driver only opens them.

pub mod args;
pub mod net;

use crate::accel::Accel;
use crate::driver::{Hypervisor, MigrationState, MigrationStatus, VcpuSample, VmInfo, VmMetrics};
use crate::error::{HvError, Result};
use crate::procfs;
use crate::qmp::Qmp;
use crate::spec::{derived_mac, VmSpec};
use crate::state::{state_after_exit, transition, Action, VmState};
use args::{qemu_args, tap_name, DiskArg, LaunchPlan, NicArg, VmPaths};
use async_trait::async_trait;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;
use tern_model::VmName;
use tokio::process::Child;
use tokio::sync::Mutex;

/// How the driver runs QEMU on this host.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    /// Per-VM sockets, logs and pid files go under `run_dir/ID/`.
    pub run_dir: PathBuf,
    /// Guest RAM files; should be on tmpfs so mapping them costs no disk I/O.
    pub mem_dir: PathBuf,
    /// The bridge guest NICs attach to; `None`: VMs with NICs are refused.
    pub bridge: Option<String>,
    /// Where VM disks live (`crate::disk`); `None`: VMs with disks are refused. The
    /// driver opens the files; making and deleting them is its caller's decision (a
    /// migration's two ends share one file).
    pub store: Option<crate::disk::Store>,
    /// Where the VM's local disks live (`--local-store`); `None`: local disks are refused.
    pub local_store: Option<crate::disk::Store>,
    pub binary: PathBuf,
    pub accel: Accel,
    /// Time QEMU gets to answer one QMP command.
    pub qmp_timeout: Duration,
    /// Time a new QEMU gets to open its QMP socket.
    pub launch_timeout: Duration,
}

impl QemuConfig {
    /// Defaults for this host: `qemu-system-x86_64` from `PATH`, accelerator probed.
    pub fn new(run_dir: PathBuf, mem_dir: PathBuf, bridge: Option<String>) -> QemuConfig {
        QemuConfig {
            run_dir,
            mem_dir,
            bridge,
            store: None,
            local_store: None,
            binary: "qemu-system-x86_64".into(),
            accel: crate::accel::detect(),
            qmp_timeout: crate::qmp::DEFAULT_TIMEOUT,
            launch_timeout: Duration::from_secs(15),
        }
    }
}

struct Vm {
    id: String,
    spec: VmSpec,
    macs: Vec<String>,
    state: VmState,
    paths: VmPaths,
    child: Option<Child>,
    /// The pid of a QEMU an earlier driver started and this one adopted: not a child,
    /// so it is watched through `/proc` instead of waited for.
    adopted: Option<u32>,
    qmp: Option<Qmp>,
}

impl Vm {
    fn info(&self) -> VmInfo {
        VmInfo {
            id: self.id.clone(),
            state: self.state,
            spec: self.spec.clone(),
            macs: self.macs.clone(),
            memory_file: Some(self.paths.memory_file.clone()),
            control_socket: Some(self.paths.control_socket.clone()),
            console_log: Some(self.paths.console_log.clone()),
            console_socket: Some(self.paths.console_socket.clone()),
            pid: self.pid(),
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id).or(self.adopted)
    }

    fn check(&self, action: Action) -> Result<VmState> {
        transition(self.state, action).ok_or(HvError::Conflict {
            id: self.id.clone(),
            action: action.verb(),
            state: self.state,
        })
    }

    fn qmp(&mut self) -> Result<&mut Qmp> {
        let id = &self.id;
        self.qmp
            .as_mut()
            .ok_or_else(|| HvError::Qemu(format!("VM {id:?} has no running QEMU")))
    }

    fn taps(&self) -> Vec<String> {
        (0..self.macs.len())
            .map(|i| tap_name(&self.id, i))
            .collect()
    }
}

/// The QEMU driver.
pub struct QemuDriver {
    cfg: QemuConfig,
    vms: StdMutex<HashMap<String, Arc<Mutex<Vm>>>>,
}

impl QemuDriver {
    pub fn new(cfg: QemuConfig) -> QemuDriver {
        QemuDriver {
            cfg,
            vms: StdMutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &QemuConfig {
        &self.cfg
    }

    /// What an earlier driver left running for VM `id`: the pid of its QEMU (checked
    /// against the command line) and QEMU's run state over QMP, when it answers.
    pub async fn left_behind(&self, id: &str) -> Result<(Option<u32>, Option<String>)> {
        VmName::check(id)?;
        let paths = VmPaths::new(&self.cfg.run_dir, &self.cfg.mem_dir, id);
        let Some(pid) = qemu_pid(&paths) else {
            return Ok((None, None));
        };
        let runstate = match Qmp::connect(&paths.qmp_socket, self.cfg.qmp_timeout).await {
            Ok(mut q) => runstate(&mut q).await.ok(),
            Err(_) => None,
        };
        Ok((Some(pid), runstate))
    }

    /// Manages again the QEMU an earlier driver (an agent that crashed or was
    /// restarted) left running for VM `id` defined by `spec`, without touching the
    /// guest: it connects to the QMP socket named on that QEMU's command line.
    pub async fn adopt(&self, id: &str, spec: VmSpec) -> Result<VmInfo> {
        VmName::check(id)?;
        let paths = VmPaths::new(&self.cfg.run_dir, &self.cfg.mem_dir, id);
        let pid = qemu_pid(&paths).ok_or_else(|| {
            HvError::Qemu(format!(
                "no QEMU of VM {id:?} runs (pid file {})",
                paths.pid_file.display()
            ))
        })?;
        let mut qmp = Qmp::connect(&paths.qmp_socket, self.cfg.qmp_timeout).await?;
        let run = runstate(&mut qmp).await?;
        let macs = macs_of(id, &spec);
        let vm = Vm {
            id: id.to_string(),
            paths,
            spec,
            macs,
            state: state_from_runstate(VmState::Created, &run),
            child: None,
            adopted: Some(pid),
            qmp: Some(qmp),
        };
        let info = vm.info();
        let mut vms = self.vms.lock().expect("VM table lock");
        if vms.contains_key(id) {
            return Err(HvError::AlreadyExists(id.to_string()));
        }
        vms.insert(id.to_string(), Arc::new(Mutex::new(vm)));
        Ok(info)
    }

    /// Removes what a previous driver left for VM `id` when it did not end cleanly (its
    /// process was killed): the QEMU named by the pid file, the taps, the RAM file and the
    /// run directory. Returns whether a QEMU was still running. A VM this driver knows is
    /// left alone.
    pub async fn reclaim(&self, id: &str) -> Result<bool> {
        VmName::check(id)?;
        if self.vms.lock().expect("VM table lock").contains_key(id) {
            return Err(HvError::AlreadyExists(id.to_string()));
        }
        let paths = VmPaths::new(&self.cfg.run_dir, &self.cfg.mem_dir, id);
        let pid = qemu_pid(&paths);
        if let Some(p) = pid {
            let _ = net::run("kill", &["-KILL", &p.to_string()]).await;
        }
        // Taps are named after the id; without the spec we try the first few indices.
        let taps: Vec<String> = (0..8).map(|i| tap_name(id, i)).collect();
        for t in &taps {
            let _ = net::remove_tap(t).await;
        }
        let _ = tokio::fs::remove_file(&paths.memory_file).await;
        let _ = tokio::fs::remove_dir_all(&paths.run_dir).await;
        Ok(pid.is_some())
    }

    /// Enters VM `id` in the table, not started, and returns it locked: a concurrent
    /// create of the same id fails, and every call on it waits until the caller lets go.
    async fn define(
        &self,
        id: &str,
        spec: VmSpec,
        incoming: bool,
    ) -> Result<tokio::sync::OwnedMutexGuard<Vm>> {
        VmName::check(id)?;
        crate::spec::check_paths(&spec)?;
        if !spec.nics.is_empty() && self.cfg.bridge.is_none() {
            return Err(HvError::NoBridge(id.to_string()));
        }
        let stores = self.stores();
        for d in &spec.disks {
            stores.of(id, d)?;
        }
        let macs = macs_of(id, &spec);
        let vm = Arc::new(Mutex::new(Vm {
            id: id.to_string(),
            paths: VmPaths::new(&self.cfg.run_dir, &self.cfg.mem_dir, id),
            spec,
            macs,
            state: if incoming {
                VmState::Incoming
            } else {
                VmState::Created
            },
            child: None,
            adopted: None,
            qmp: None,
        }));
        let guard = vm.clone().lock_owned().await;
        let mut vms = self.vms.lock().expect("VM table lock");
        if vms.contains_key(id) {
            return Err(HvError::AlreadyExists(id.to_string()));
        }
        vms.insert(id.to_string(), vm);
        Ok(guard)
    }

    /// Starts a defined VM's process; one that fails to start leaves nothing behind.
    async fn launch_or_undefine(&self, vm: &mut Vm, incoming: bool) -> Result<VmInfo> {
        match self.launch_process(vm, incoming).await {
            Ok(()) => Ok(vm.info()),
            Err(e) => {
                self.undefine(vm).await;
                Err(e)
            }
        }
    }

    /// Takes a VM whose start failed out of the table, with its files.
    async fn undefine(&self, vm: &Vm) {
        self.vms.lock().expect("VM table lock").remove(&vm.id);
        let _ = tokio::fs::remove_file(&vm.paths.memory_file).await;
        let _ = tokio::fs::remove_dir_all(&vm.paths.run_dir).await;
    }

    fn get(&self, id: &str) -> Result<Arc<Mutex<Vm>>> {
        self.vms
            .lock()
            .expect("VM table lock")
            .get(id)
            .cloned()
            .ok_or_else(|| HvError::UnknownVm(id.to_string()))
    }

    /// Starts QEMU for `vm` (guest stopped) and connects QMP.
    async fn launch_process(&self, vm: &mut Vm, incoming: bool) -> Result<()> {
        vm.paths.check_socket_lengths().map_err(HvError::Qemu)?;
        for d in [&vm.paths.run_dir, &self.cfg.mem_dir] {
            tokio::fs::create_dir_all(d)
                .await
                .map_err(HvError::io(format!("creating {}", d.display())))?;
        }
        for p in [
            &vm.paths.qmp_socket,
            &vm.paths.control_socket,
            &vm.paths.console_socket,
        ] {
            let _ = tokio::fs::remove_file(p).await;
        }
        ensure_private_memory_file(&vm.paths.memory_file, vm.spec.memory_mib << 20).await?;
        if let Some(cfg) = &vm.spec.guest_config {
            // Written on every launch (a migration's destination too): QEMU reads the
            // file once at start and the guest sees the same item wherever it runs.
            let json = serde_json::to_vec(cfg).map_err(|e| HvError::Qemu(e.to_string()))?;
            tokio::fs::write(&vm.paths.guest_config, json)
                .await
                .map_err(HvError::io(format!(
                    "writing {}",
                    vm.paths.guest_config.display()
                )))?;
        }
        // The console log is appended to across this VM's QEMUs: a line marks where
        // this one's output begins, so a reader (the guest-health watch, an operator)
        // does not take the boot before's panic for this one's.
        {
            use tokio::io::AsyncWriteExt;
            let log = &vm.paths.console_log;
            let mut f = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .await
                .map_err(HvError::io(format!("opening {}", log.display())))?;
            f.write_all(format!("\r\n{CONSOLE_BOOT_MARKER}\r\n").as_bytes())
                .await
                .map_err(HvError::io(format!("writing {}", log.display())))?;
        }
        let mut nics = Vec::new();
        for (i, mac) in vm.macs.iter().enumerate() {
            let bridge = self
                .cfg
                .bridge
                .as_deref()
                .ok_or_else(|| HvError::NoBridge(vm.id.clone()))?;
            let tap = tap_name(&vm.id, i);
            net::create_tap(&tap, bridge).await?;
            nics.push(NicArg {
                tap,
                mac: mac.clone(),
            });
        }
        let disks = match self.disk_args(vm) {
            Ok(d) => d,
            Err(e) => {
                remove_taps(&vm.taps()).await;
                return Err(e);
            }
        };
        let argv = qemu_args(&LaunchPlan {
            id: &vm.id,
            spec: &vm.spec,
            paths: &vm.paths,
            nics: &nics,
            disks: &disks,
            accel: self.cfg.accel,
            incoming,
        });
        let log = std::fs::File::create(&vm.paths.qemu_log).map_err(HvError::io(format!(
            "creating {}",
            vm.paths.qemu_log.display()
        )))?;
        let log2 = log
            .try_clone()
            .map_err(HvError::io("duplicating the QEMU log handle"))?;
        tracing::info!(vm = %vm.id, ?argv, "starting QEMU");
        let spawned = tokio::process::Command::new(&self.cfg.binary)
            .args(&argv)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            // A driver dropped without `release` (a test that panics, an agent told to
            // stop its VMs) takes its guests with it rather than leaving orphans that
            // hold tmpfs memory.
            .kill_on_drop(true)
            // Its own process group: a Ctrl-C or a signal meant for the agent's group
            // stops the agent, not its guests.
            .process_group(0)
            .spawn();
        let mut child = match spawned {
            Ok(c) => c,
            Err(source) => {
                remove_taps(&vm.taps()).await;
                return Err(HvError::Spawn {
                    binary: self.cfg.binary.clone(),
                    source,
                });
            }
        };
        match self.connect_qmp(&mut child, &vm.paths).await {
            Ok(q) => {
                vm.qmp = Some(q);
                vm.child = Some(child);
                Ok(())
            }
            Err(e) => {
                let _ = child.kill().await;
                remove_taps(&vm.taps()).await;
                Err(e)
            }
        }
    }

    fn stores(&self) -> crate::disk::Stores<'_> {
        crate::disk::Stores {
            shared: self.cfg.store.as_ref(),
            local: self.cfg.local_store.as_ref(),
        }
    }

    /// The files of `vm`'s disks in their stores.
    fn disk_args(&self, vm: &Vm) -> Result<Vec<DiskArg>> {
        let stores = self.stores();
        vm.spec
            .disks
            .iter()
            .map(|d| {
                Ok(DiskArg {
                    path: stores.disk_path(&vm.id, d)?,
                    bus: d.bus,
                    name: d.name.clone(),
                })
            })
            .collect()
    }

    async fn connect_qmp(&self, child: &mut Child, paths: &VmPaths) -> Result<Qmp> {
        let deadline = tokio::time::Instant::now() + self.cfg.launch_timeout;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&paths.qemu_log).unwrap_or_default();
                return Err(HvError::Qemu(format!(
                    "QEMU exited at start ({status}): {}",
                    log.trim()
                )));
            }
            if paths.qmp_socket.exists() {
                if let Ok(q) = Qmp::connect(&paths.qmp_socket, self.cfg.qmp_timeout).await {
                    return Ok(q);
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HvError::Qemu(format!(
                    "QEMU did not open {} within {:?}",
                    paths.qmp_socket.display(),
                    self.cfg.launch_timeout
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ends the QEMU process: `quit` politely, then kill.
    async fn shutdown_process(&self, vm: &mut Vm) {
        if let Some(q) = vm.qmp.as_mut() {
            let _ = q
                .execute_timeout("quit", None, Duration::from_secs(2))
                .await;
        }
        vm.qmp = None;
        if let Some(mut child) = vm.child.take() {
            let waited = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            if waited.is_err() {
                let _ = child.kill().await;
            }
        }
        if let Some(pid) = vm.adopted.take() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while is_our_qemu(pid, &vm.paths.qmp_socket) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if is_our_qemu(pid, &vm.paths.qmp_socket) {
                let _ = net::run("kill", &["-KILL", &pid.to_string()]).await;
            }
        }
        remove_taps(&vm.taps()).await;
    }

    /// Checks `action` against the state machine, then runs the QMP `command` that does it.
    async fn act(&self, id: &str, action: Action, command: &str) -> Result<VmInfo> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        let next = vm.check(action)?;
        vm.qmp()?.execute(command, None).await?;
        vm.state = next;
        Ok(vm.info())
    }

    async fn qmp_cmd(&self, id: &str, cmd: &str, args: Option<Value>) -> Result<Value> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        vm.qmp()?.execute(cmd, args).await
    }

    /// Applies the process's fate: a QEMU that exited means the VM is stopped.
    async fn reap(vm: &mut Vm) {
        let exited = match (vm.child.as_mut(), vm.adopted) {
            (Some(c), _) => matches!(c.try_wait(), Ok(Some(_))),
            (None, Some(pid)) => !is_our_qemu(pid, &vm.paths.qmp_socket),
            (None, None) => false,
        };
        if exited {
            vm.child = None;
            vm.adopted = None;
            vm.qmp = None;
            vm.state = state_after_exit(vm.state);
            remove_taps(&vm.taps()).await;
        }
    }
}

/// Each NIC's MAC: the spec's, else one derived from the VM's id and the NIC's place.
fn macs_of(id: &str, spec: &VmSpec) -> Vec<String> {
    spec.nics
        .iter()
        .enumerate()
        .map(|(i, n)| n.mac.clone().unwrap_or_else(|| derived_mac(id, i)))
        .collect()
}

/// Makes sure QEMU maps a memory file only this user can read: QEMU would create a
/// missing one under the process umask (readable by every local user, with the guest's
/// memory in it). A missing file is made private and sparse; one already there (an
/// incoming VM's, written by the streams, or a stopped VM's) keeps its content and
/// loses any wider permission.
async fn ensure_private_memory_file(path: &Path, bytes: u64) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match tokio::fs::metadata(path).await {
        Ok(_) => tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .await
            .map_err(HvError::io(format!("making {} private", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => make_memory_file(path, bytes).await,
        Err(e) => Err(HvError::io(format!("checking {}", path.display()))(e)),
    }
}

/// Creates `path` readable by this user only (it holds guest memory), `bytes` long and
/// sparse. A file already there is left over from a VM of this id that no longer is (the
/// caller holds the id): it goes first, so nothing of its memory reaches the new VM.
async fn make_memory_file(path: &Path, bytes: u64) -> Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::OpenOptionsExt;
        let io = |e| HvError::io(format!("making the memory file {}", path.display()))(e);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(io)?;
        f.set_len(bytes).map_err(io)
    })
    .await
    .map_err(|e| HvError::Qemu(format!("making a memory file: {e}")))?
}

/// The line written to a VM's console log before each of its QEMUs starts.
pub const CONSOLE_BOOT_MARKER: &str = "-- tern: QEMU started --";

/// The pid of the QEMU running VM `paths` according to its pid file, when that process
/// is alive and really is this VM's QEMU.
pub fn qemu_pid(paths: &VmPaths) -> Option<u32> {
    std::fs::read_to_string(&paths.pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|&p| is_our_qemu(p, &paths.qmp_socket))
}

async fn runstate(qmp: &mut Qmp) -> Result<String> {
    let st = qmp.execute("query-status", None).await?;
    Ok(st
        .get("status")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string())
}

/// True when `pid` is a QEMU serving `qmp_socket`: a pid file can outlive its process and
/// the number be reused, so the command line must name this VM's socket.
fn is_our_qemu(pid: u32, qmp_socket: &std::path::Path) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            let cmd = String::from_utf8_lossy(&b);
            cmd.contains("qemu") && cmd.contains(&*qmp_socket.to_string_lossy())
        })
        .unwrap_or(false)
}

async fn remove_taps(taps: &[String]) {
    for t in taps {
        if let Err(e) = net::remove_tap(t).await {
            tracing::warn!(tap = %t, error = %e, "could not remove tap");
        }
    }
}

/// The driver's state for a QEMU run state (pure). `current` decides the ambiguous ones.
pub fn state_from_runstate(current: VmState, runstate: &str) -> VmState {
    match runstate {
        "running" => VmState::Running,
        "inmigrate" if current == VmState::Restoring => VmState::Restoring,
        "inmigrate" => VmState::Incoming,
        "prelaunch" => current,
        // Held by `-action panic=pause` after a guest panic: the VM is still on as far as
        // its lifecycle goes; the guest's health says what happened to it.
        "guest-panicked" => current,
        // A destination with `-S` lands in `paused` when its migration completed.
        _ => VmState::Paused,
    }
}

#[async_trait]
impl Hypervisor for QemuDriver {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    async fn create(&self, id: &str, spec: VmSpec, incoming: bool) -> Result<VmInfo> {
        let mut guard = self.define(id, spec, incoming).await?;
        self.launch_or_undefine(&mut guard, incoming).await
    }

    async fn define_incoming(&self, id: &str, spec: VmSpec) -> Result<VmInfo> {
        let guard = self.define(id, spec, true).await?;
        // Made here, before QEMU: it maps the file as it finds it (a file of the right
        // size is neither truncated nor cleared), and an incoming QEMU writes no guest
        // memory at start-up, so what the streams wrote before it came stays.
        let made = make_memory_file(&guard.paths.memory_file, guard.spec.memory_mib << 20).await;
        if let Err(e) = made {
            self.undefine(&guard).await;
            return Err(e);
        }
        Ok(guard.info())
    }

    async fn launch(&self, id: &str) -> Result<VmInfo> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        if vm.pid().is_some() {
            return Ok(vm.info());
        }
        let incoming = vm.state == VmState::Incoming;
        self.launch_or_undefine(&mut vm, incoming).await
    }

    async fn start(&self, id: &str) -> Result<VmInfo> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        let next = vm.check(Action::Start)?;
        if vm.pid().is_none() {
            self.launch_process(&mut vm, false).await?;
        }
        vm.qmp()?.execute("cont", None).await?;
        vm.state = next;
        Ok(vm.info())
    }

    async fn pause(&self, id: &str) -> Result<VmInfo> {
        self.act(id, Action::Pause, "stop").await
    }

    async fn resume(&self, id: &str) -> Result<VmInfo> {
        self.act(id, Action::Resume, "cont").await
    }

    async fn stop(&self, id: &str) -> Result<VmInfo> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        let next = vm.check(Action::Stop)?;
        self.shutdown_process(&mut vm).await;
        vm.state = next;
        Ok(vm.info())
    }

    async fn powerdown(&self, id: &str) -> Result<()> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        vm.check(Action::Stop)?;
        vm.qmp()?.execute("system_powerdown", None).await.map(drop)
    }

    async fn wait_stopped(&self, id: &str, timeout: Duration) -> Result<VmInfo> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = {
                let vm = self.get(id)?;
                let mut vm = vm.lock().await;
                Self::reap(&mut vm).await;
                vm.info()
            };
            if info.state == VmState::Stopped || tokio::time::Instant::now() >= deadline {
                return Ok(info);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A power cycle: QEMU ends and a new one boots the guest from its disks. Not QMP
    /// `system_reset`: QEMU runs with `-no-reboot` (a guest that panics must end its
    /// QEMU, not reboot unnoticed), and after a `system_reset` the firmware resets the
    /// machine again itself, which `-no-reboot` turns into QEMU's exit; allowing resets
    /// until the firmware is done would need to know when it is.
    async fn reboot(&self, id: &str) -> Result<VmInfo> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        let next = vm.check(Action::Reboot)?;
        self.shutdown_process(&mut vm).await;
        vm.state = VmState::Stopped;
        self.launch_process(&mut vm, false).await?;
        vm.qmp()?.execute("cont", None).await?;
        vm.state = next;
        Ok(vm.info())
    }

    async fn suspended(&self, id: &str) -> Result<VmInfo> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        let next = vm.check(Action::Suspend)?;
        self.shutdown_process(&mut vm).await;
        // The memory is in the store now; the tmpfs copy would only hold host RAM.
        let _ = tokio::fs::remove_file(&vm.paths.memory_file).await;
        vm.state = next;
        Ok(vm.info())
    }

    async fn restore(&self, id: &str) -> Result<VmInfo> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        let next = vm.check(Action::Restore)?;
        // A fresh file: the saved memory is written into it and must land on zeros.
        let _ = tokio::fs::remove_file(&vm.paths.memory_file).await;
        self.launch_process(&mut vm, true).await?;
        vm.state = next;
        Ok(vm.info())
    }

    async fn abandon_restore(&self, id: &str) -> Result<VmInfo> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        // A process that ended by itself already left the VM suspended.
        if vm.state != VmState::Suspended {
            let next = vm.check(Action::AbandonRestore)?;
            self.shutdown_process(&mut vm).await;
            vm.state = next;
        }
        let _ = tokio::fs::remove_file(&vm.paths.memory_file).await;
        Ok(vm.info())
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        // Nobody waits on a VM being destroyed: its exit and the freeing of its memory
        // take only CPU time the host's running guests leave.
        if let Some(pid) = vm.pid() {
            crate::teardown::lower_process(pid);
        }
        self.shutdown_process(&mut vm).await;
        self.vms.lock().expect("VM table lock").remove(id);
        let _ = crate::teardown::remove_file(vm.paths.memory_file.clone()).await;
        let _ = tokio::fs::remove_dir_all(&vm.paths.run_dir).await;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<VmInfo>> {
        let all: Vec<_> = self
            .vms
            .lock()
            .expect("VM table lock")
            .values()
            .cloned()
            .collect();
        let mut out = Vec::with_capacity(all.len());
        for vm in all {
            let mut vm = vm.lock().await;
            Self::reap(&mut vm).await;
            out.push(vm.info());
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn info(&self, id: &str) -> Result<VmInfo> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        Ok(vm.info())
    }

    async fn metrics(&self, id: &str) -> Result<VmMetrics> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        let memory_bytes = vm.spec.memory_mib * 1024 * 1024;
        let Some(pid) = vm.pid() else {
            return Ok(VmMetrics {
                vcpus: vec![],
                vcpu_cpu_ns: 0,
                memory_bytes,
                rss_bytes: 0,
            });
        };
        let threads = query_vcpu_threads(vm.qmp()?).await?;
        let mut vcpus = Vec::with_capacity(threads.len());
        for (index, tid) in threads.into_iter().enumerate() {
            vcpus.push(VcpuSample {
                index: index as u32,
                thread_id: tid,
                cpu_ns: procfs::thread_cpu_ns(pid, tid)?,
            });
        }
        Ok(VmMetrics {
            vcpu_cpu_ns: vcpus.iter().map(|v| v.cpu_ns).sum(),
            vcpus,
            memory_bytes,
            rss_bytes: procfs::process_rss_bytes(pid)?,
        })
    }

    async fn guest_panicked(&self, id: &str) -> Result<bool> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        if vm.state != VmState::Running || vm.qmp.is_none() {
            return Ok(false);
        }
        Ok(runstate(vm.qmp()?).await? == "guest-panicked")
    }

    async fn vcpu_threads(&self, id: &str) -> Result<Vec<u32>> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        query_vcpu_threads(vm.qmp()?).await
    }

    async fn refresh(&self, id: &str) -> Result<VmInfo> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        Self::reap(&mut vm).await;
        if vm.qmp.is_some() {
            let run = runstate(vm.qmp()?).await?;
            vm.state = state_from_runstate(vm.state, &run);
        }
        Ok(vm.info())
    }

    async fn migrate_incoming(&self, id: &str, uri: &str) -> Result<()> {
        let vm = self.get(id)?;
        let mut vm = vm.lock().await;
        if !matches!(vm.state, VmState::Incoming | VmState::Restoring) {
            return Err(HvError::Conflict {
                id: id.to_string(),
                action: "receive a migration into",
                state: vm.state,
            });
        }
        vm.qmp()?
            .execute("migrate-incoming", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    async fn set_migration_capabilities(&self, id: &str, caps: &[(&str, bool)]) -> Result<()> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({ "capability": c, "state": on }))
            .collect();
        self.qmp_cmd(
            id,
            "migrate-set-capabilities",
            Some(json!({ "capabilities": caps })),
        )
        .await
        .map(drop)
    }

    async fn migrate(&self, id: &str, uri: &str) -> Result<()> {
        self.qmp_cmd(id, "migrate", Some(json!({ "uri": uri })))
            .await
            .map(drop)
    }

    async fn query_migrate(&self, id: &str) -> Result<MigrationStatus> {
        let v = self.qmp_cmd(id, "query-migrate", None).await?;
        Ok(parse_query_migrate(&v))
    }

    async fn migrate_cancel(&self, id: &str) -> Result<()> {
        self.qmp_cmd(id, "migrate_cancel", None).await.map(drop)
    }

    async fn disk_qmp(&self, id: &str, command: &str, args: Option<Value>) -> Result<Value> {
        if !crate::disk::mirror::COMMANDS.contains(&command) {
            return Err(HvError::Qemu(format!(
                "{command:?} is not a disk-moving QMP command"
            )));
        }
        self.qmp_cmd(id, command, args).await
    }

    async fn release(&self) -> Vec<String> {
        let all: Vec<_> = self.vms.lock().expect("VM table lock").drain().collect();
        let mut ids = Vec::with_capacity(all.len());
        for (id, vm) in all {
            let mut vm = vm.lock().await;
            if let Some(child) = vm.child.take() {
                // Dropping the handle would kill QEMU (`kill_on_drop`); forgetting it
                // leaves the process to the next agent, which finds it by its pid file.
                std::mem::forget(child);
            }
            vm.qmp = None;
            ids.push(id);
        }
        ids.sort();
        ids
    }
}

async fn query_vcpu_threads(qmp: &mut Qmp) -> Result<Vec<u32>> {
    let v = qmp.execute("query-cpus-fast", None).await?;
    parse_cpus_fast(&v)
}

/// Thread ids in vCPU order from a `query-cpus-fast` reply (pure).
pub fn parse_cpus_fast(v: &Value) -> Result<Vec<u32>> {
    let arr = v
        .as_array()
        .ok_or_else(|| HvError::Protocol(format!("query-cpus-fast returned {v}")))?;
    let mut cpus: Vec<(u64, u32)> = arr
        .iter()
        .map(|c| {
            let idx = c.get("cpu-index").and_then(Value::as_u64);
            let tid = c.get("thread-id").and_then(Value::as_u64);
            match (idx, tid) {
                (Some(i), Some(t)) => Ok((i, t as u32)),
                _ => Err(HvError::Protocol(format!("bad query-cpus-fast entry {c}"))),
            }
        })
        .collect::<Result<_>>()?;
    cpus.sort_unstable();
    Ok(cpus.into_iter().map(|(_, t)| t).collect())
}

/// The parts of a `query-migrate` reply the engine uses (pure).
pub fn parse_query_migrate(v: &Value) -> MigrationStatus {
    let u = |k: &str| v.get(k).and_then(Value::as_u64);
    MigrationStatus {
        state: v
            .get("status")
            .and_then(Value::as_str)
            .map_or(MigrationState::None, MigrationState::from),
        transferred_bytes: v
            .get("ram")
            .and_then(|r| r.get("transferred"))
            .and_then(Value::as_u64)
            .unwrap_or(0),
        downtime_ms: u("downtime"),
        total_time_ms: u("total-time"),
        error: v
            .get("error-desc")
            .and_then(Value::as_str)
            .map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runstates() {
        assert_eq!(
            state_from_runstate(VmState::Incoming, "inmigrate"),
            VmState::Incoming
        );
        assert_eq!(
            state_from_runstate(VmState::Incoming, "paused"),
            VmState::Paused
        );
        assert_eq!(
            state_from_runstate(VmState::Created, "prelaunch"),
            VmState::Created
        );
        assert_eq!(
            state_from_runstate(VmState::Running, "postmigrate"),
            VmState::Paused
        );
        assert_eq!(
            state_from_runstate(VmState::Paused, "running"),
            VmState::Running
        );
        assert_eq!(
            state_from_runstate(VmState::Running, "guest-panicked"),
            VmState::Running,
            "a panicked guest's VM is still on"
        );
        assert_eq!(
            state_from_runstate(VmState::Restoring, "inmigrate"),
            VmState::Restoring
        );
        assert_eq!(
            state_from_runstate(VmState::Restoring, "paused"),
            VmState::Paused,
            "a restore whose saved state loaded"
        );
    }

    #[test]
    fn cpus_fast_sorted_by_index() {
        let v = json!([
            {"cpu-index": 1, "thread-id": 200, "qom-path": "x"},
            {"cpu-index": 0, "thread-id": 100}
        ]);
        assert_eq!(parse_cpus_fast(&v).unwrap(), vec![100, 200]);
        assert!(parse_cpus_fast(&json!({})).is_err());
        assert!(parse_cpus_fast(&json!([{"cpu-index": 0}])).is_err());
    }

    #[test]
    fn query_migrate_fields() {
        let v = json!({"status": "completed", "downtime": 12, "total-time": 150,
                       "ram": {"transferred": 4096}});
        let s = parse_query_migrate(&v);
        assert_eq!(s.state, MigrationState::Completed);
        assert_eq!(s.transferred_bytes, 4096);
        assert_eq!(s.downtime_ms, Some(12));
        let f = parse_query_migrate(&json!({"status": "failed", "error-desc": "boom"}));
        assert_eq!(f.error.as_deref(), Some("boom"));
        assert_eq!(parse_query_migrate(&json!({})).state, MigrationState::None);
        let d = parse_query_migrate(&json!({"status": "device"}));
        assert_eq!(d.state, MigrationState::Device);
        let p = parse_query_migrate(&json!({"status": "postcopy-active"}));
        assert_eq!(p.state, MigrationState::Other("postcopy-active".into()));
        assert!(!p.state.is_final() && MigrationState::Cancelled.is_final());
    }
}
