//! The manager's decisions, all pure: a [`Command`] and a snapshot (and the time) in,
//! [`Change`]s and a [`Reply`] out. Nothing here touches the store, the network or a clock.
//!
//! - [`placement`]: which host takes a VM.
//! - [`balance`]: one balancing round: planner, cost/benefit, limits.
//! - [`catalog`]: images and templates, and a new VM's spec filled from its template.
//! - [`health`]: dead hosts, restarting their VMs once, evacuating drained hosts.
//! - [`guest`]: guest health as hosts report it, and each VM's HA policy applied to it.
//! - [`lease`]: host leases, and when a host's guests are surely stopped.
//! - [`lifecycle`]: start, stop, reboot, pause, resume, suspend and restore.
//! - [`network`]: guest addresses handed out on the hosts' network.
//! - [`reconcile`]: what to ask the agents to do so observed state meets desired state.

pub mod balance;
pub mod catalog;
pub mod guest;
pub mod health;
pub mod lease;
pub mod lifecycle;
pub mod network;
pub mod placement;
pub mod reconcile;

use crate::error::{Error, Result};
use crate::state::Validate;
use crate::state::{
    BalancerSettings, Capacity, Change, EventKind, Host, HostState, Migration, MigrationReason,
    MigrationResult, Millis, PolicyKind, Snapshot, Vm, VmSpec, VmState,
};
use placement::Placer;
pub use tern_api::manager::{HeartbeatReply, LoadReport, VmLoad};
use tern_api::manager::{MAX_HOST_CPUS, MAX_HOST_MEMORY_MIB};
use tern_api::vcpu::VcpuPolicy;
use tern_model::{HostName, VmName};

/// Everything that changes cluster state, from the API or from the agents' answers.
#[derive(Clone, Debug, PartialEq)]
pub enum Command {
    RegisterHost {
        name: String,
        address: String,
        capacity: Capacity,
    },
    Heartbeat {
        host: String,
        report: LoadReport,
    },
    /// Removes a host that runs no VM and takes part in no migration.
    RemoveHost {
        host: String,
    },
    /// Drain into maintenance (`true`) or bring back (`false`).
    SetMaintenance {
        host: String,
        on: bool,
    },
    CreateVm {
        name: String,
        spec: VmSpec,
        host: Option<String>,
        /// Fills what `spec` leaves out; absent: the `default` template, if any.
        template: Option<String>,
    },
    DeleteVm {
        name: String,
    },
    MigrateVm {
        name: String,
        to: Option<String>,
        policy: Option<PolicyKind>,
    },
    /// Records how the VM's host schedules its vCPU threads (the API applies it on a
    /// running VM's host first; the control loop wherever it starts the VM next).
    SetVcpuPolicy {
        name: String,
        policy: VcpuPolicy,
    },
    /// Records what the manager does when the VM's guest panics or stops answering;
    /// clears a given-up restart record, so HA tries again.
    SetHaPolicy {
        name: String,
        policy: tern_api::health::HaPolicy,
    },
    /// Records the live-migration policy the VM's moves use when a migration names
    /// none; `None`: the cluster's.
    SetMigrationPolicy {
        name: String,
        policy: Option<PolicyKind>,
    },
    /// The VM's host power-cycled it for HA (see [`guest`]).
    GuestRestarted {
        vm: String,
    },
    PutSettings(BalancerSettings),
    /// Records an image whose files are uploaded next.
    AddImage(tern_api::catalog::NewImage),
    /// One file of an image arrived whole and matched its hash.
    ImageFileReceived {
        image: String,
        role: tern_api::catalog::FileRole,
    },
    DeleteImage {
        name: String,
    },
    CreateTemplate(tern_api::catalog::Template),
    DeleteTemplate {
        name: String,
    },
    /// `host` carried out an operator's lifecycle `action` on the VM.
    VmActed {
        name: String,
        action: tern_api::manager::VmAction,
        host: String,
    },
    /// The host of stopped VM `name` grew its disk `disk` to `size_mib`.
    DiskResized {
        name: String,
        disk: String,
        size_mib: u64,
    },
    /// An agent confirmed the VM runs on `host`.
    VmStarted {
        vm: String,
        host: String,
    },
    /// `host`'s agent refused to start the VM, saying `error`.
    VmStartFailed {
        vm: String,
        host: String,
        error: String,
    },
    /// An agent confirmed the VM is gone.
    VmRemoved {
        vm: String,
    },
    MigrationDone {
        id: u64,
        result: MigrationResult,
    },
}

/// What a command answers.
// A reply lives from a decision to its answer, one at a time: boxing the VM record to
// make the other variants smaller would cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Reply {
    Host(Host),
    Heartbeat(HeartbeatReply),
    Vm(Vm),
    Migration(Migration),
    Settings(BalancerSettings),
    Image(tern_api::catalog::Image),
    Template(tern_api::catalog::Template),
    Done,
}

/// The outcome of a command: changes to commit, then the reply.
pub type Decision = (Vec<Change>, Reply);

fn host<'a>(snap: &'a Snapshot, name: &str) -> Result<&'a Host> {
    snap.hosts
        .get(name)
        .ok_or_else(|| Error::UnknownHost(name.to_owned()))
}

fn vm<'a>(snap: &'a Snapshot, name: &str) -> Result<&'a Vm> {
    snap.vms
        .get(name)
        .ok_or_else(|| Error::UnknownVm(name.to_owned()))
}

/// Decides one command.
pub fn decide(snap: &Snapshot, now: Millis, cmd: Command) -> Result<Decision> {
    match cmd {
        Command::RegisterHost {
            name,
            address,
            capacity,
        } => register(snap, now, name, address, capacity),
        Command::Heartbeat { host, report } => heartbeat(snap, now, &host, &report),
        Command::RemoveHost { host: name } => remove_host(snap, name),
        Command::SetMaintenance { host: h, on } => {
            let h = host(snap, &h)?;
            let to = if on {
                HostState::Maintenance
            } else {
                HostState::Active
            };
            if h.state == HostState::Dead && !on {
                return Err(Error::Conflict(format!(
                    "host {:?} is dead; it becomes active again by itself once its agent \
                     heartbeats with no stale VMs",
                    h.name
                )));
            }
            let mut changes = Vec::new();
            if h.state != to {
                changes.push(Change::PutHost(Host {
                    state: to,
                    ..h.clone()
                }));
                changes.push(Change::Event(EventKind::HostStateChanged {
                    host: h.name.clone(),
                    from: h.state,
                    to,
                }));
            }
            Ok((
                changes,
                Reply::Host(Host {
                    state: to,
                    ..h.clone()
                }),
            ))
        }
        Command::CreateVm {
            name,
            spec,
            host,
            template,
        } => create_vm(snap, name, spec, host, template),
        Command::AddImage(new) => catalog::add_image(snap, now, new),
        Command::VmActed { name, action, host } => lifecycle::acted(snap, &name, action, &host),
        Command::DiskResized {
            name,
            disk,
            size_mib,
        } => lifecycle::disk_resized(snap, &name, &disk, size_mib),
        Command::ImageFileReceived { image, role } => catalog::file_received(snap, &image, role),
        Command::DeleteImage { name } => catalog::delete_image(snap, &name),
        Command::CreateTemplate(t) => catalog::create_template(snap, t),
        Command::DeleteTemplate { name } => catalog::delete_template(snap, &name),
        Command::DeleteVm { name } => {
            let v = vm(snap, &name)?;
            if !lifecycle::may_delete(v.state) {
                return Err(Error::Conflict(format!(
                    "VM {name:?} is migrating; delete it once the migration ends"
                )));
            }
            let deleting = Vm {
                state: VmState::Deleting,
                desired_host: None,
                ..v.clone()
            };
            let changes = if v.observed_host.is_none() {
                vec![
                    Change::RemoveVm(name.clone()),
                    Change::Event(EventKind::VmDeleted { vm: name }),
                ]
            } else {
                vec![Change::PutVm(deleting.clone())]
            };
            Ok((changes, Reply::Vm(deleting)))
        }
        Command::MigrateVm { name, to, policy } => {
            let v = vm(snap, &name)?;
            let policy = snap.settings.migration_policy(
                policy,
                v.spec.migration_policy,
                MigrationReason::Manual,
            );
            if v.spec.pinned {
                return Err(Error::Conflict(format!(
                    "VM {name:?} is pinned to its host; it does not migrate"
                )));
            }
            let placer = Placer::new(snap);
            let to = match to {
                Some(t) => {
                    host(snap, &t)?;
                    if v.desired_host.as_deref() == Some(t.as_str()) {
                        return Err(Error::BadInput(format!("VM {name:?} is already on {t:?}")));
                    }
                    placer.check(&name, &v.spec, &t)?;
                    t
                }
                None => placer.choose(&name, &v.spec, v.desired_host.as_deref())?,
            };
            let (changes, m) = start_migration(snap, now, v, &to, policy, MigrationReason::Manual)?;
            Ok((changes, Reply::Migration(m)))
        }
        Command::SetVcpuPolicy { name, policy } => {
            let v = vm(snap, &name)?;
            if v.state == VmState::Deleting {
                return Err(Error::Conflict(format!(
                    "VM {name:?} is being deleted: it has no vCPU policy to set"
                )));
            }
            if let Some(h) = &v.desired_host {
                policy_fits(&name, policy, host(snap, h)?)?;
            }
            let set = Vm {
                spec: VmSpec {
                    vcpu_policy: policy,
                    ..v.spec.clone()
                },
                ..v.clone()
            };
            let changes = match v.spec.vcpu_policy == policy {
                true => Vec::new(),
                false => vec![Change::PutVm(set.clone())],
            };
            Ok((changes, Reply::Vm(set)))
        }
        Command::SetHaPolicy { name, policy } => {
            let v = vm(snap, &name)?;
            if v.state == VmState::Deleting {
                return Err(Error::Conflict(format!(
                    "VM {name:?} is being deleted: it has no HA policy to set"
                )));
            }
            let mut set = v.clone();
            set.spec.ha_policy = policy;
            set.restarts.failed = None;
            let changes = match set == *v {
                true => Vec::new(),
                false => vec![Change::PutVm(set.clone())],
            };
            Ok((changes, Reply::Vm(set)))
        }
        Command::SetMigrationPolicy { name, policy } => {
            let v = vm(snap, &name)?;
            if v.state == VmState::Deleting {
                return Err(Error::Conflict(format!(
                    "VM {name:?} is being deleted: it has no migration policy to set"
                )));
            }
            let mut set = v.clone();
            set.spec.migration_policy = policy;
            let changes = match set == *v {
                true => Vec::new(),
                false => vec![Change::PutVm(set.clone())],
            };
            Ok((changes, Reply::Vm(set)))
        }
        Command::GuestRestarted { vm: name } => {
            let v = vm(snap, &name)?;
            let changes = match v.restarts.pending {
                true => vec![Change::PutVm(guest::restarted(v, now))],
                false => Vec::new(),
            };
            Ok((changes, Reply::Done))
        }
        Command::PutSettings(s) => {
            s.validate().map_err(|e| Error::BadInput(e.to_string()))?;
            let changes = if s == snap.settings {
                Vec::new()
            } else {
                vec![
                    Change::PutSettings(s.clone()),
                    Change::Event(EventKind::SettingsChanged),
                ]
            };
            Ok((changes, Reply::Settings(s)))
        }
        Command::VmStarted { vm: name, host } => {
            let v = vm(snap, &name)?;
            let mut changes = Vec::new();
            if v.desired_host.as_deref() == Some(host.as_str()) && v.state == VmState::Pending {
                changes.push(Change::PutVm(guest::gone(Vm {
                    observed_host: Some(host.clone()),
                    state: VmState::Running,
                    disks_made: true,
                    start_error: None,
                    ..v.clone()
                })));
                changes.push(Change::Event(EventKind::VmRunning { vm: name, host }));
            }
            Ok((changes, Reply::Done))
        }
        Command::VmStartFailed {
            vm: name,
            host,
            error,
        } => {
            let v = vm(snap, &name)?;
            let error = bounded_start_error(error);
            // An agent asked again says the same again: the log gets each reason once.
            let changes = if v.desired_host.as_deref() == Some(host.as_str())
                && v.state == VmState::Pending
                && v.start_error.as_deref() != Some(error.as_str())
            {
                vec![
                    Change::PutVm(Vm {
                        start_error: Some(error.clone()),
                        ..v.clone()
                    }),
                    Change::Event(EventKind::VmStartFailed {
                        vm: name,
                        host,
                        error,
                    }),
                ]
            } else {
                Vec::new()
            };
            Ok((changes, Reply::Done))
        }
        Command::VmRemoved { vm: name } => {
            let v = vm(snap, &name)?;
            let changes = if v.state == VmState::Deleting {
                vec![
                    Change::RemoveVm(name.clone()),
                    Change::Event(EventKind::VmDeleted { vm: name }),
                ]
            } else {
                Vec::new()
            };
            Ok((changes, Reply::Done))
        }
        Command::MigrationDone { id, result } => finish_migration(snap, now, id, result),
    }
}

/// Which host addresses a manager can serve: its agents' clients decide. A host at
/// any other address would be registered, placed on, and never reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HostAddresses {
    /// `http://ADDR:PORT` or `https://ADDR:PORT`: `tern agent`s.
    #[default]
    Agents,
    /// `sim:`: in-process hosts over the `sim` driver (`tern-simhost`).
    Sim,
}

impl HostAddresses {
    /// Whether `address` is one this manager can serve (pure); the error says what is.
    pub fn check(self, address: &str) -> Result<()> {
        match self {
            HostAddresses::Sim if address == "sim:" => Ok(()),
            HostAddresses::Sim => Err(Error::BadInput(format!(
                "address {address:?}: this manager runs in-process hosts only; give \"sim:\""
            ))),
            HostAddresses::Agents => check_agent_url(address),
        }
    }
}

/// An agent's base URL: http(s), a host, nothing after the port (pure).
fn check_agent_url(address: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(Error::BadInput(format!(
            "address {address:?} {why}: give the agent's URL, e.g. http://198.18.0.2:7070"
        )))
    };
    let Ok(url) = reqwest::Url::parse(address) else {
        return bad("is not a URL");
    };
    if !matches!(url.scheme(), "http" | "https") {
        return bad("is not an http:// or https:// URL, the only agents this manager calls");
    }
    if url.host_str().is_none_or(str::is_empty) {
        return bad("names no host");
    }
    if !url.username().is_empty() || url.password().is_some() {
        return bad("carries credentials, which would be sent in the clear");
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return bad("has a path, query or fragment");
    }
    Ok(())
}

/// A host goes only once nothing is on it: its VMs would be lost with it.
fn remove_host(snap: &Snapshot, name: String) -> Result<Decision> {
    let h = host(snap, &name)?;
    let on_it = snap
        .vms
        .values()
        .filter(|v| {
            v.observed_host.as_deref() == Some(name.as_str())
                || v.desired_host.as_deref() == Some(name.as_str())
        })
        .count();
    let moving = snap
        .running
        .values()
        .any(|m| m.from == name || m.to == name);
    if on_it > 0 || moving {
        return Err(Error::Conflict(format!(
            "host {name:?} still has {on_it} VM(s) or a migration; drain it first \
             (`tern host drain {name}`) and remove it once it is empty"
        )));
    }
    Ok((
        vec![
            Change::RemoveHost(name.clone()),
            Change::Event(EventKind::HostRemoved { host: name }),
        ],
        Reply::Host(h.clone()),
    ))
}

fn register(
    snap: &Snapshot,
    now: Millis,
    name: String,
    address: String,
    capacity: Capacity,
) -> Result<Decision> {
    HostName::check(&name)?;
    if address.is_empty() {
        return Err(Error::BadInput(
            "address is empty: give the agent's URL, e.g. http://198.18.0.2:7070".into(),
        ));
    }
    let cpus_ok = capacity.cpus > 0.0 && capacity.cpus <= MAX_HOST_CPUS;
    if !cpus_ok || !(1..=MAX_HOST_MEMORY_MIB).contains(&capacity.memory_mib) {
        return Err(Error::BadInput(format!(
            "capacity needs cpus in (0, {MAX_HOST_CPUS}] and memory_mib in 1..={MAX_HOST_MEMORY_MIB}, \
             got {} cpus and {} MiB",
            capacity.cpus, capacity.memory_mib
        )));
    }
    if let Some(old) = snap.hosts.get(&name) {
        if old.address != address || old.capacity != capacity {
            return Err(Error::Conflict(format!(
                "host {name:?} is already registered with another address or capacity"
            )));
        }
        return Ok((Vec::new(), Reply::Host(old.clone())));
    }
    let h = Host {
        name: name.clone(),
        address,
        capacity,
        state: HostState::Active,
        last_heartbeat: Some(now),
        cpu_used: None,
        cpu_smoothed: None,
        store_free_mib: None,
    };
    Ok((
        vec![
            Change::PutHost(h.clone()),
            Change::Event(EventKind::HostRegistered { host: name }),
        ],
        Reply::Host(h),
    ))
}

/// Cores in use, on the host or one VM: a number from 0 to [`MAX_HOST_CPUS`] (pure).
fn check_cores(what: &str, cores: f64) -> Result<()> {
    if (0.0..=MAX_HOST_CPUS).contains(&cores) {
        return Ok(());
    }
    Err(Error::BadInput(format!(
        "{what} must be a number from 0 to {MAX_HOST_CPUS} cores, got {cores}"
    )))
}

/// A load report's numbers are in range before any of it is smoothed into the state.
fn check_load(report: &LoadReport) -> Result<()> {
    check_cores("cpu_used", report.cpu_used)?;
    for l in &report.vms {
        check_cores(&format!("cpu_used of VM {:?}", l.name.as_str()), l.cpu_used)?;
    }
    Ok(())
}

fn heartbeat(snap: &Snapshot, now: Millis, name: &str, report: &LoadReport) -> Result<Decision> {
    let h = host(snap, name)?;
    check_load(report)?;
    let alpha = snap.settings.ewma_alpha();
    let smoothed = match h.cpu_smoothed {
        Some(s) => alpha * report.cpu_used + (1.0 - alpha) * s,
        None => report.cpu_used,
    };
    let stale: Vec<String> = report
        .vms
        .iter()
        .filter(|l| {
            snap.vms.get(l.name.as_str()).is_none_or(|v| {
                v.desired_host.as_deref() != Some(name) && v.observed_host.as_deref() != Some(name)
            })
        })
        .map(|l| l.name.to_string())
        .collect();
    let mut state = h.state;
    let mut changes = Vec::new();
    // A dead host comes back only once it holds nothing that was restarted elsewhere.
    if h.state == HostState::Dead && stale.is_empty() {
        state = HostState::Active;
        changes.push(Change::Event(EventKind::HostStateChanged {
            host: name.to_owned(),
            from: HostState::Dead,
            to: HostState::Active,
        }));
    }
    changes.push(Change::PutHost(Host {
        state,
        last_heartbeat: Some(now),
        cpu_used: Some(report.cpu_used),
        cpu_smoothed: Some(smoothed),
        store_free_mib: report.store_free_mib,
        ..h.clone()
    }));
    for l in &report.vms {
        let Some(v) = snap.vms.get(l.name.as_str()) else {
            continue;
        };
        if stale.iter().any(|s| l.name == s.as_str()) {
            continue;
        }
        let mut next = v.clone();
        next.cpu_used = if v.cpu_measured {
            alpha * l.cpu_used + (1.0 - alpha) * v.cpu_used
        } else {
            l.cpu_used
        };
        next.cpu_measured = true;
        next.guest = guest::merge(v.guest.as_ref(), l.guest.as_ref(), now);
        changes.extend(
            guest::health_event(&v.name, v.guest.as_ref(), next.guest.as_ref()).map(Change::Event),
        );
        // Running where it should be, though its create was never answered (the answer
        // was lost, or the manager restarted): it is running.
        if v.state == VmState::Pending && v.desired_host.as_deref() == Some(name) && !l.powered_off
        {
            next.state = VmState::Running;
            next.disks_made = true;
            next.start_error = None;
            next.observed_host = Some(name.to_owned());
            changes.push(Change::Event(EventKind::VmRunning {
                vm: v.name.clone(),
                host: name.to_owned(),
            }));
        }
        // Running or paused here by our record, yet nothing runs it: the guest shut
        // itself down (or its QEMU ended). Recorded stopped with its disks, as an
        // operator's stop would leave it; HA does not restart a stopped VM.
        if l.powered_off
            && matches!(v.state, VmState::Running | VmState::Paused)
            && v.observed_host.as_deref() == Some(name)
            && v.desired_host.as_deref() == Some(name)
        {
            next = guest::gone(next);
            next.state = VmState::Stopped;
            changes.push(Change::Event(EventKind::VmPoweredOff {
                vm: v.name.clone(),
                host: name.to_owned(),
            }));
        }
        if next != *v {
            changes.push(Change::PutVm(next));
        }
    }
    // Running here by our record but not in the report: the VM is gone (crashed, or
    // destroyed behind the manager's back), so it is created again where it belongs.
    let reported: std::collections::BTreeSet<&str> =
        report.vms.iter().map(|l| l.name.as_str()).collect();
    for v in snap.vms_observed_on(name) {
        if v.state == VmState::Running
            && v.observed_host.as_deref() == Some(name)
            && !reported.contains(v.name.as_str())
        {
            changes.push(Change::PutVm(guest::gone(Vm {
                state: VmState::Pending,
                observed_host: None,
                ..v.clone()
            })));
            changes.push(Change::Event(EventKind::VmLost {
                vm: v.name.clone(),
                host: name.to_owned(),
            }));
        }
    }
    Ok((changes, Reply::Heartbeat(HeartbeatReply { stale })))
}

/// `error` cut to [`tern_api::manager::MAX_START_ERROR_BYTES`] at a character boundary:
/// it is an agent's text, kept in the record and the event log.
fn bounded_start_error(mut error: String) -> String {
    error.truncate(error.floor_char_boundary(tern_api::manager::MAX_START_ERROR_BYTES));
    error
}

fn create_vm(
    snap: &Snapshot,
    name: String,
    spec: VmSpec,
    host: Option<String>,
    template: Option<String>,
) -> Result<Decision> {
    let mut placer = Placer::for_new_vms(snap);
    let mut spec = catalog::resolve_spec(snap, spec, template.as_deref())?;
    guest_access(snap, &mut spec)?;
    let (changes, v) = create_one(snap, &mut placer, name, spec, host)?;
    Ok((changes, Reply::Vm(v)))
}

/// Checks a new VM's ssh keys and hands its NIC an address (pure).
fn guest_access(snap: &Snapshot, spec: &mut VmSpec) -> Result<()> {
    use tern_api::guest_config::{check_ssh_key, MAX_SSH_KEYS};
    if spec.ssh_keys.len() > MAX_SSH_KEYS {
        return Err(Error::BadInput(format!(
            "{} ssh keys; at most {MAX_SSH_KEYS}",
            spec.ssh_keys.len()
        )));
    }
    for (i, k) in spec.ssh_keys.iter().enumerate() {
        check_ssh_key(k).map_err(|e| Error::BadInput(format!("ssh_keys[{i}]: {e}")))?;
    }
    if spec.address.is_some() || spec.gateway.is_some() {
        return Err(Error::BadInput(
            "address and gateway are handed out by the manager: ask for \"nic\": true".into(),
        ));
    }
    if spec.nic {
        let net = snap.guest_network.ok_or_else(|| {
            Error::BadInput(
                "this manager hands out no guest addresses: start it with --guest-network \
                 CIDR (the hosts' network), or create the VM without a NIC"
                    .into(),
            )
        })?;
        spec.address = Some(net.allocate(snap)?);
        spec.gateway = net.gateway.map(|g| g.to_string());
    }
    Ok(())
}

/// A VM creation request.
#[derive(Clone, Debug, PartialEq)]
pub struct NewVm {
    pub name: String,
    pub spec: VmSpec,
    /// Absent: placed automatically.
    pub host: Option<String>,
}

/// Creates many VMs with one placement pass (each sees the ones before it), so creating
/// thousands stays linear. Requests that fail are answered with their error and left out.
pub fn create_vms(snap: &Snapshot, reqs: Vec<NewVm>) -> (Vec<Change>, Vec<Result<Vm>>) {
    let mut placer = Placer::for_new_vms(snap);
    let mut seen = std::collections::BTreeSet::new();
    let mut changes = Vec::new();
    let mut out = Vec::with_capacity(reqs.len());
    for r in reqs {
        if !seen.insert(r.name.clone()) {
            out.push(Err(Error::Conflict(format!(
                "VM {:?} is named twice in one request",
                r.name
            ))));
            continue;
        }
        match create_one(snap, &mut placer, r.name, r.spec, r.host) {
            Ok((c, v)) => {
                changes.extend(c);
                out.push(Ok(v));
            }
            Err(e) => out.push(Err(e)),
        }
    }
    (changes, out)
}

fn create_one(
    snap: &Snapshot,
    placer: &mut Placer,
    name: String,
    spec: VmSpec,
    host: Option<String>,
) -> Result<(Vec<Change>, Vm)> {
    // Refused here rather than by the agent, which names the VM's files after it.
    VmName::check(&name)?;
    spec.validate()?;
    if snap.vms.contains_key(&name) {
        return Err(Error::Conflict(format!(
            "a VM named {name:?} already exists; pick another name or delete it first"
        )));
    }
    let target = match host {
        Some(h) => {
            placer.check(&name, &spec, &h)?;
            h
        }
        None => placer.choose(&name, &spec, None)?,
    };
    policy_fits(&name, spec.vcpu_policy, self::host(snap, &target)?)?;
    placer.take(&spec, &target);
    let v = Vm {
        name: name.clone(),
        spec,
        desired_host: Some(target.clone()),
        observed_host: None,
        state: VmState::Pending,
        cpu_used: 0.0,
        cpu_measured: false,
        last_moved: None,
        disks_made: false,
        guest: None,
        restarts: Default::default(),
        start_error: None,
    };
    let changes = vec![
        Change::PutVm(v.clone()),
        Change::Event(EventKind::VmCreated {
            vm: name,
            host: target,
        }),
    ];
    Ok((changes, v))
}

/// Refuses a vCPU policy other than `none` on an in-process simulated host, whose VMs
/// have no threads to schedule (pure). An agent over the `sim` driver refuses it itself.
pub fn policy_fits(vm: &str, policy: VcpuPolicy, on: &Host) -> Result<()> {
    if policy.is_none() || on.address != "sim:" {
        return Ok(());
    }
    Err(Error::BadInput(format!(
        "VM {vm:?} is on simulated host {:?}, which has no vCPU threads to schedule: \
         only vcpu_policy \"none\" fits there",
        on.name
    )))
}

/// Records a migration of running VM `v` to `to`. Shared by the operator's command, the
/// balancer and evacuation.
pub fn start_migration(
    snap: &Snapshot,
    now: Millis,
    v: &Vm,
    to: &str,
    policy: PolicyKind,
    reason: MigrationReason,
) -> Result<(Vec<Change>, Migration)> {
    let from = match (v.state, &v.observed_host) {
        (VmState::Running, Some(from)) => from.clone(),
        _ => {
            return Err(Error::Conflict(format!(
                "VM {:?} is {}, not running on a host; only a running VM migrates",
                v.name,
                v.state.as_str()
            )))
        }
    };
    let m = Migration {
        id: snap.next_migration,
        vm: v.name.clone(),
        from: from.clone(),
        to: to.to_owned(),
        policy,
        reason,
        started: now,
        finished: None,
        result: MigrationResult::Running,
    };
    let changes = vec![
        Change::PutVm(Vm {
            desired_host: Some(to.to_owned()),
            state: VmState::Migrating,
            ..v.clone()
        }),
        Change::PutMigration(m.clone()),
        Change::Event(EventKind::MigrationStarted {
            id: m.id,
            vm: v.name.clone(),
            from,
            to: to.to_owned(),
            policy,
        }),
    ];
    Ok((changes, m))
}

fn finish_migration(
    snap: &Snapshot,
    now: Millis,
    id: u64,
    result: MigrationResult,
) -> Result<Decision> {
    let Some(m) = snap.running.get(&id) else {
        return Err(Error::Conflict(format!("migration {id} is not running")));
    };
    let mut changes = Vec::new();
    if let Some(v) = snap.vms.get(&m.vm) {
        let ok = matches!(result, MigrationResult::Succeeded { .. });
        let at = if ok { &m.to } else { &m.from };
        changes.push(Change::PutVm(Vm {
            desired_host: Some(at.clone()),
            observed_host: Some(at.clone()),
            state: VmState::Running,
            last_moved: if ok { Some(now) } else { v.last_moved },
            ..v.clone()
        }));
    }
    let done = Migration {
        finished: Some(now),
        result: result.clone(),
        ..m.clone()
    };
    changes.push(Change::PutMigration(done.clone()));
    changes.push(Change::Event(EventKind::MigrationFinished {
        id,
        vm: m.vm.clone(),
        result,
    }));
    Ok((changes, Reply::Migration(done)))
}

#[cfg(test)]
pub(crate) mod testing {
    //! Small snapshots for the decision tests.
    use super::*;

    pub fn spec(vcpus: u32, memory_mib: u64) -> VmSpec {
        VmSpec::sized(vcpus, memory_mib)
    }

    /// Hosts `h0..` with the given cores and the same memory, active, heard from at 0.
    pub fn cluster(cpus: &[f64], memory_mib: u64) -> Snapshot {
        let mut snap = Snapshot {
            next_migration: 1,
            ..Default::default()
        };
        for (i, c) in cpus.iter().enumerate() {
            let name = format!("h{i}");
            snap.hosts.insert(
                name.clone(),
                Host {
                    name,
                    address: "sim:".into(),
                    capacity: Capacity {
                        cpus: *c,
                        memory_mib,
                    },
                    state: HostState::Active,
                    last_heartbeat: Some(0),
                    cpu_used: None,
                    cpu_smoothed: None,
                    store_free_mib: None,
                },
            );
        }
        snap
    }

    /// Adds a running VM on `host`.
    pub fn running(snap: &mut Snapshot, name: &str, host: &str, s: VmSpec) {
        snap.vms.insert(
            name.into(),
            Vm {
                name: name.into(),
                spec: s,
                desired_host: Some(host.into()),
                observed_host: Some(host.into()),
                state: VmState::Running,
                cpu_used: 0.0,
                cpu_measured: true,
                last_moved: None,
                disks_made: false,
                guest: None,
                restarts: Default::default(),
                start_error: None,
            },
        );
    }

    /// An operator's create of VM `name` (1 vCPU, 512 MiB) on `host`.
    pub fn create_on(name: &str, host: &str) -> Command {
        Command::CreateVm {
            name: name.into(),
            spec: spec(1, 512),
            host: Some(host.into()),
            template: None,
        }
    }

    /// An agent's answer that VM `vm` runs on `host`.
    pub fn started(vm: &str, host: &str) -> Command {
        Command::VmStarted {
            vm: vm.into(),
            host: host.into(),
        }
    }

    /// Decides and applies, as the manager does (events get numbers in order).
    pub fn run(snap: &mut Snapshot, now: Millis, cmd: Command) -> Result<Reply> {
        let (changes, reply) = decide(snap, now, cmd)?;
        apply(snap, now, &changes);
        Ok(reply)
    }

    pub fn apply(snap: &mut Snapshot, now: Millis, changes: &[Change]) {
        let mut seq = snap.last_event;
        let events: Vec<_> = changes
            .iter()
            .filter_map(|c| match c {
                Change::Event(k) => {
                    seq += 1;
                    Some(crate::state::Event {
                        seq,
                        time: now,
                        kind: k.clone(),
                    })
                }
                _ => None,
            })
            .collect();
        snap.apply(changes, &events);
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn a_refused_start_is_recorded_once_per_reason_and_cleared_when_it_runs() {
        let mut snap = cluster(&[4.0, 4.0], 4096);
        run(&mut snap, 1, create_on("a", "h0")).unwrap();
        let failed = |error: &str| Command::VmStartFailed {
            vm: "a".into(),
            host: "h0".into(),
            error: error.into(),
        };
        let events = |snap: &Snapshot, c: Command| -> Vec<EventKind> {
            let (changes, _) = decide(snap, 2, c).unwrap();
            changes
                .into_iter()
                .filter_map(|c| match c {
                    Change::Event(e) => Some(e),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(
            events(&snap, failed("kernel missing")),
            [EventKind::VmStartFailed {
                vm: "a".into(),
                host: "h0".into(),
                error: "kernel missing".into(),
            }]
        );
        run(&mut snap, 2, failed("kernel missing")).unwrap();
        assert_eq!(snap.vms["a"].state, VmState::Pending);
        assert_eq!(snap.vms["a"].start_error.as_deref(), Some("kernel missing"));
        // Asked again, the same answer: nothing new in the log.
        assert!(events(&snap, failed("kernel missing")).is_empty());
        assert_eq!(events(&snap, failed("out of memory")).len(), 1);
        // From a host it was not placed on: not its answer.
        let elsewhere = Command::VmStartFailed {
            vm: "a".into(),
            host: "h1".into(),
            error: "x".into(),
        };
        assert!(events(&snap, elsewhere).is_empty());
        // An agent's text is kept bounded.
        run(&mut snap, 3, failed(&"é".repeat(2000))).unwrap();
        let kept = snap.vms["a"].start_error.clone().unwrap();
        assert!(kept.len() <= tern_api::manager::MAX_START_ERROR_BYTES && kept.len() > 900);
        run(&mut snap, 4, started("a", "h0")).unwrap();
        assert_eq!(snap.vms["a"].state, VmState::Running);
        assert_eq!(snap.vms["a"].start_error, None);
        // Once it runs, a late refusal changes nothing.
        assert!(events(&snap, failed("late")).is_empty());
    }

    #[test]
    fn a_vm_goes_from_pending_to_running_and_migrates_back_on_failure() {
        let mut snap = cluster(&[4.0, 4.0], 4096);
        let Reply::Vm(v) = run(&mut snap, 1, create_on("a", "h0")).unwrap() else {
            panic!()
        };
        assert_eq!(
            (v.state, v.desired_host.as_deref()),
            (VmState::Pending, Some("h0"))
        );
        let err = decide(
            &snap,
            2,
            Command::MigrateVm {
                name: "a".into(),
                to: None,
                policy: None,
            },
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("only a running VM migrates"),
            "{err}"
        );
        run(&mut snap, 2, started("a", "h0")).unwrap();
        assert_eq!(snap.vms["a"].state, VmState::Running);
        let Reply::Migration(m) = run(
            &mut snap,
            3,
            Command::MigrateVm {
                name: "a".into(),
                to: None,
                policy: Some(PolicyKind::Xen),
            },
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(
            (m.from.as_str(), m.to.as_str(), m.policy.as_str()),
            ("h0", "h1", "xen")
        );
        assert_eq!(snap.vms["a"].state, VmState::Migrating);
        run(
            &mut snap,
            4,
            Command::MigrationDone {
                id: m.id,
                result: MigrationResult::Failed { error: "x".into() },
            },
        )
        .unwrap();
        let a = &snap.vms["a"];
        assert_eq!(
            (a.state, a.desired_host.as_deref()),
            (VmState::Running, Some("h0"))
        );
        assert!(snap.running.is_empty());
    }

    #[test]
    fn bad_requests_change_nothing() {
        let mut snap = cluster(&[4.0], 1024);
        running(&mut snap, "a", "h0", spec(1, 512));
        let cases = [
            Command::CreateVm {
                name: "Bad Name".into(),
                spec: spec(1, 1),
                host: None,
                template: None,
            },
            Command::CreateVm {
                name: "b".into(),
                spec: spec(0, 1),
                host: None,
                template: None,
            },
            Command::CreateVm {
                name: "b".into(),
                spec: spec(1, 1),
                host: Some("nope".into()),
                template: None,
            },
            Command::CreateVm {
                name: "b".into(),
                spec: spec(1, 4096),
                host: None,
                template: None,
            },
            Command::CreateVm {
                name: "a".into(),
                spec: spec(1, 1),
                host: None,
                template: None,
            },
            Command::MigrateVm {
                name: "a".into(),
                to: None,
                policy: None,
            },
            Command::DeleteVm { name: "zz".into() },
            Command::Heartbeat {
                host: "h9".into(),
                report: LoadReport::default(),
            },
            Command::PutSettings(BalancerSettings {
                aggressiveness: 0,
                ..Default::default()
            }),
        ];
        for c in cases {
            assert!(decide(&snap, 1, c.clone()).is_err(), "{c:?} was accepted");
        }
    }

    #[test]
    fn heartbeats_smooth_load_and_name_stale_vms() {
        let mut snap = cluster(&[4.0, 4.0], 4096);
        running(&mut snap, "a", "h1", spec(1, 512));
        snap.settings.smoothing_window = 3; // alpha 0.5
        let report = |cpu| LoadReport {
            cpu_used: cpu,
            vms: vec![VmLoad {
                name: "a".parse().unwrap(),
                cpu_used: 0.5,
                guest: None,
                powered_off: false,
            }],
            store_free_mib: None,
        };
        let Reply::Heartbeat(r) = run(
            &mut snap,
            5,
            Command::Heartbeat {
                host: "h0".into(),
                report: report(2.0),
            },
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(r.stale, ["a"]);
        run(
            &mut snap,
            6,
            Command::Heartbeat {
                host: "h0".into(),
                report: report(4.0),
            },
        )
        .unwrap();
        assert_eq!(snap.hosts["h0"].cpu_smoothed, Some(3.0));
        assert_eq!(snap.hosts["h0"].last_heartbeat, Some(6));
        // The stale report did not change the VM's load.
        assert_eq!(snap.vms["a"].cpu_used, 0.0);
    }

    #[test]
    fn a_vm_its_host_reports_powered_off_is_recorded_stopped_once() {
        let mut snap = cluster(&[4.0, 4.0], 4096);
        running(&mut snap, "off", "h0", spec(1, 512));
        running(&mut snap, "on", "h0", spec(1, 512));
        // Reported by a host it does not run on: that host's copy, not this VM.
        running(&mut snap, "elsewhere", "h1", spec(1, 512));
        let load = |name: &str, powered_off| VmLoad {
            name: name.parse().unwrap(),
            cpu_used: 0.0,
            guest: None,
            powered_off,
        };
        let report = LoadReport {
            cpu_used: 0.0,
            vms: vec![
                load("off", true),
                load("on", false),
                load("elsewhere", true),
            ],
            store_free_mib: None,
        };
        let beat = |snap: &Snapshot, t| {
            let cmd = Command::Heartbeat {
                host: "h0".into(),
                report: report.clone(),
            };
            let (changes, _) = decide(snap, t, cmd).unwrap();
            changes
        };
        let offs = |changes: &[Change]| {
            changes
                .iter()
                .filter(|c| {
                    matches!(c, Change::Event(EventKind::VmPoweredOff { vm, host })
                        if vm == "off" && host == "h0")
                })
                .count()
        };
        assert_eq!(offs(&beat(&snap, 1)), 1);
        run(
            &mut snap,
            1,
            Command::Heartbeat {
                host: "h0".into(),
                report: report.clone(),
            },
        )
        .unwrap();
        assert_eq!(snap.vms["off"].state, VmState::Stopped);
        assert_eq!(snap.vms["off"].observed_host.as_deref(), Some("h0"));
        assert_eq!(snap.vms["on"].state, VmState::Running);
        assert_eq!(snap.vms["elsewhere"].state, VmState::Running);
        // Reported so again: nothing new; an operator's stop that raced the report is
        // done, not refused.
        assert_eq!(offs(&beat(&snap, 2)), 0);
        let (changes, _) =
            lifecycle::acted(&snap, "off", tern_api::manager::VmAction::Stop, "h0").unwrap();
        assert!(changes.is_empty(), "{changes:?}");
        assert!(lifecycle::acted(&snap, "off", tern_api::manager::VmAction::Pause, "h0").is_err());
    }

    #[test]
    fn a_vm_missing_from_its_hosts_report_is_created_again_and_a_found_one_runs() {
        let mut snap = cluster(&[4.0], 4096);
        running(&mut snap, "gone", "h0", spec(1, 512));
        run(
            &mut snap,
            0,
            Command::CreateVm {
                name: "found".into(),
                spec: spec(1, 512),
                host: None,
                template: None,
            },
        )
        .unwrap();
        let report = LoadReport {
            cpu_used: 0.5,
            vms: vec![VmLoad {
                name: "found".parse().unwrap(),
                cpu_used: 0.5,
                guest: None,
                powered_off: false,
            }],
            store_free_mib: None,
        };
        run(
            &mut snap,
            1,
            Command::Heartbeat {
                host: "h0".into(),
                report,
            },
        )
        .unwrap();
        let (gone, found) = (&snap.vms["gone"], &snap.vms["found"]);
        assert_eq!(
            (gone.state, gone.observed_host.as_deref()),
            (VmState::Pending, None)
        );
        assert_eq!(gone.desired_host.as_deref(), Some("h0"));
        assert_eq!(
            (found.state, found.observed_host.as_deref()),
            (VmState::Running, Some("h0"))
        );
        assert_eq!(found.cpu_used, 0.5);
        assert_eq!(
            crate::decide::reconcile::actions(&snap),
            [crate::decide::reconcile::Action::Create {
                vm: "gone".into(),
                host: "h0".into()
            }]
        );
    }
}
