//! The manager's API (`docs/openapi.json`): hosts, VMs, migrations with their live
//! telemetry, the balancer's settings and plan, events, and the heartbeat agents send.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::migration::{Phase, PolicyKind, RoundProgress, RoundTelemetry};
use tern_model::{HostName, TemplateName, VmName};

/// Milliseconds since the Unix epoch; decisions take the time as a value, never read a clock.
pub type Millis = u64;

/// Whether a host takes VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    Active,
    /// Drained by an operator: keeps no VMs, takes no new ones, still heartbeats.
    Maintenance,
    /// Missed heartbeats for longer than the limit; its VMs were restarted elsewhere.
    Dead,
}

impl HostState {
    pub const ALL: [HostState; 3] = [Self::Active, Self::Maintenance, Self::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Maintenance => "maintenance",
            Self::Dead => "dead",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// The most cores a host may offer, or report in use: far above any machine, low enough
/// that sums over a cluster stay exact.
pub const MAX_HOST_CPUS: f64 = 4096.0;

/// The most memory a host may offer, MiB (64 TiB).
pub const MAX_HOST_MEMORY_MIB: u64 = 1 << 26;

/// What a host offers to VMs.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capacity {
    /// Physical cores available to guests.
    #[cfg_attr(feature = "openapi", schema(exclusive_minimum = 0, maximum = 4096))]
    pub cpus: f64,
    /// Memory available to guests, MiB; VMs never overcommit it.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 67108864))]
    pub memory_mib: u64,
}

/// A host as the manager knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Host {
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9][a-z0-9-]{0,47}$"))]
    pub name: String,
    /// Where its agent answers (`http://ADDR:PORT`, or `sim:` for an in-process host).
    pub address: String,
    pub capacity: Capacity,
    pub state: HostState,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>))]
    pub last_heartbeat: Option<Millis>,
    /// Cores in use at the last heartbeat.
    pub cpu_used: Option<f64>,
    /// Cores in use, smoothed (EWMA) so one noisy report does not trigger migrations.
    pub cpu_smoothed: Option<f64>,
    /// Free space in its disk store, in MiB, as last reported; new VMs' disks must fit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_free_mib: Option<u64>,
}

/// What an operator asks for when creating a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmSpec {
    /// 0 or absent in a create request: the template's.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 64))]
    pub vcpus: u32,
    /// 0 or absent in a create request: the template's.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 1048576))]
    pub memory_mib: u64,
    /// Pinned VMs stay where they are placed: the balancer never moves them.
    #[serde(default)]
    pub pinned: bool,
    /// VMs sharing an affinity group are kept on one host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    /// VMs sharing an anti-affinity group are kept on different hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_affinity: Option<String>,
    /// How its host schedules its vCPU threads (`docs/trace.md`); applied by the
    /// manager wherever the VM is started and carried along by live migrations.
    /// Absent in records written before it existed: `none`.
    #[serde(default)]
    pub vcpu_policy: crate::vcpu::VcpuPolicy,
    /// What the manager does when its guest panics or stops answering (`docs/manager.md`,
    /// "Guest health"). Absent: `restart`.
    #[serde(default)]
    pub ha_policy: crate::health::HaPolicy,
    /// The live-migration policy its moves use when a migration names none
    /// (`docs/manager.md`, "Migration policy"). Absent: the cluster's
    /// (`evacuation_policy` for drains, `default_policy` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_policy: Option<PolicyKind>,
    /// The catalogue image it boots (`docs/images.md`). Absent in a create request: the
    /// template's; absent on a VM: the host's default guest, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Its disks; empty in a create request: the template's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<crate::catalog::VmDisk>,
    /// Kernel command line added after the image's (and the template's).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cmdline: String,
    /// The template it was made from, for people; the VM keeps its own copy of the
    /// values, so a template changed later does not change it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Public keys (`authorized_keys` lines) root of the guest accepts; the image
    /// applies them at boot (the Debian image does; `docs/guest-image.md`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// A NIC on the hosts' network with a static address the manager hands out from
    /// its `--guest-network` (recorded in `address`), kept across moves.
    #[serde(default)]
    pub nic: bool,
    /// The NIC's address (CIDR), handed out by the manager at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The default gateway the guest is given with its address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

impl VmSpec {
    /// A spec of only a size, as a VM that boots the host's default guest has.
    pub fn sized(vcpus: u32, memory_mib: u64) -> VmSpec {
        VmSpec {
            vcpus,
            memory_mib,
            pinned: false,
            affinity: None,
            anti_affinity: None,
            vcpu_policy: Default::default(),
            ha_policy: Default::default(),
            migration_policy: None,
            image: None,
            disks: Vec::new(),
            cmdline: String::new(),
            template: None,
            ssh_keys: Vec::new(),
            nic: false,
            address: None,
            gateway: None,
        }
    }

    /// What host is asked to run for VM `name`: its size, its disks and the files of
    /// `image` (its catalogue image, which the caller looked up), which the host
    /// fetches into its store when they are missing. Without an image: no kernel of
    /// its own (the host's default guest) and no disks from an image. Placement fields
    /// stay with the manager.
    pub fn host_spec(
        &self,
        name: &str,
        image: Option<&crate::catalog::Image>,
    ) -> crate::agent::VmSpec {
        use crate::catalog::FileRole;
        let disk_file = image.and_then(|i| i.file(FileRole::Disk).map(|f| f.stored_name(&i.name)));
        let disks = self
            .disks
            .iter()
            .map(|d| crate::agent::DiskSpec {
                name: d.name.clone(),
                size_mib: d.size_mib,
                image: if d.from_image {
                    disk_file.clone()
                } else {
                    None
                },
                bus: d.bus.unwrap_or_default(),
                store: d.store.unwrap_or_default(),
            })
            .collect();
        let image_ref = image.and_then(|i| {
            Some(crate::catalog::ImageRef {
                name: i.name.parse().ok()?,
                files: i.files.clone(),
            })
        });
        let cmdline = match image {
            Some(i) => [
                i.cmdline.as_str(),
                self.cmdline.as_str(),
                &format!("tern.hostname={name}"),
            ]
            .iter()
            .filter(|s| !s.is_empty())
            .copied()
            .collect::<Vec<_>>()
            .join(" "),
            None => self.cmdline.clone(),
        };
        crate::agent::VmSpec {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            kernel: None,
            initramfs: None,
            cmdline,
            disks,
            image: image_ref,
            guest_config: self.guest_config(name),
            nics: match self.nic {
                true => vec![crate::agent::Nic { mac: None }],
                false => Vec::new(),
            },
        }
    }
}

impl VmSpec {
    /// What the guest is told at create: its name, keys and address; none when there
    /// is nothing to tell beyond the name (an image that ignores it loses nothing).
    fn guest_config(&self, name: &str) -> Option<Box<crate::guest_config::GuestConfig>> {
        if self.ssh_keys.is_empty() && self.address.is_none() {
            return None;
        }
        Some(Box::new(crate::guest_config::GuestConfig {
            hostname: Some(name.to_owned()),
            ssh_authorized_keys: self.ssh_keys.clone(),
            address: self.address.clone(),
            gateway: self.gateway.clone(),
            dns: Vec::new(),
        }))
    }
}

/// Largest VM the manager accepts; catches typos such as an extra zero.
pub const MAX_VCPUS: u32 = 64;

pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Where a VM is in its life (the state machine: `docs/manager.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Recorded with a desired host; not yet seen running there.
    Pending,
    Running,
    /// A live migration to the desired host is under way.
    Migrating,
    /// Deleted by an operator; removed once its host confirms.
    Deleting,
    /// No host could take it (e.g. after its host died); waits for room.
    Unplaced,
    /// Powered off on its host; its disks kept. HA leaves it off.
    Stopped,
    /// Its vCPUs stopped on its host; its memory kept. Not migrated.
    Paused,
    /// Its memory and device state saved to the shared store and its QEMU ended;
    /// restorable on any host that sees the store. Not migrated, not restarted by HA.
    Suspended,
}

impl VmState {
    pub const ALL: [VmState; 8] = [
        Self::Pending,
        Self::Running,
        Self::Migrating,
        Self::Deleting,
        Self::Unplaced,
        Self::Stopped,
        Self::Paused,
        Self::Suspended,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Migrating => "migrating",
            Self::Deleting => "deleting",
            Self::Unplaced => "unplaced",
            Self::Stopped => "stopped",
            Self::Paused => "paused",
            Self::Suspended => "suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// What an operator asks of a VM's life (`POST /v1/vms/{name}/ACTION`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum VmAction {
    /// Boot a stopped VM again from its disks.
    Start,
    /// Ask the guest to power off (ACPI and tern-guest), power it off after a timeout.
    Stop,
    /// Reset the guest: it boots again from its disks.
    Reboot,
    Pause,
    Resume,
    /// Save memory and device state to the store and end its QEMU.
    Suspend,
    /// Run a suspended VM again, on its host or another that sees the store.
    Restore,
}

impl VmAction {
    pub const ALL: [VmAction; 7] = [
        Self::Start,
        Self::Stop,
        Self::Reboot,
        Self::Pause,
        Self::Resume,
        Self::Suspend,
        Self::Restore,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Reboot => "reboot",
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Suspend => "suspend",
            Self::Restore => "restore",
        }
    }
}

/// The optional body of `POST /v1/vms/{name}/ACTION`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VmActionRequest {
    /// `stop`: seconds the guest gets to power off before it is powered off (1 to 600;
    /// default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// `stop`: power off at once.
    #[serde(default)]
    pub force: bool,
    /// `restore`: the host to run it on (default: the host it was suspended on, or the
    /// manager's choice when that one is not active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub host: Option<HostName>,
}

/// A VM: what was asked (spec, desired host) beside what agents report (observed host, load).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Vm {
    #[cfg_attr(feature = "openapi", schema(pattern = "^[a-z0-9][a-z0-9-]{0,47}$"))]
    pub name: String,
    pub spec: VmSpec,
    pub desired_host: Option<String>,
    pub observed_host: Option<String>,
    pub state: VmState,
    /// Cores it uses, smoothed over its host's reports like the host's own load.
    pub cpu_used: f64,
    /// Whether `cpu_used` comes from a report yet; the first report is taken as it is
    /// instead of being averaged with the 0 a new VM starts from.
    #[serde(default)]
    pub cpu_measured: bool,
    /// When it last moved; the balancer leaves it alone for the cooldown after that.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>))]
    pub last_moved: Option<Millis>,
    /// Whether its disks were made: once it ran somewhere, a create on another host (a
    /// restart after its host died, or after it was lost) uses the disk files already
    /// in the shared store, so its data survives.
    #[serde(default)]
    pub disks_made: bool,
    /// Its guest's health as its host last reported it, since when the manager saw it
    /// so. Absent: not running, or its host reports no guest health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::health::GuestHealth>,
    /// What HA did to its guest lately (`spec.ha_policy`).
    #[serde(
        default,
        skip_serializing_if = "crate::health::GuestRestarts::is_empty"
    )]
    pub restarts: crate::health::GuestRestarts,
    /// Why the host it was placed on last refused to start it (`vm_start_failed`); it
    /// stays `pending` and is asked again. Cleared once it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_error: Option<String>,
}

/// The longest `start_error` kept: an agent's answer, cut at a character boundary.
pub const MAX_START_ERROR_BYTES: usize = 1000;

/// Why a migration was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MigrationReason {
    Manual,
    Balance,
    Evacuate,
}

/// How a migration ended, or that it has not yet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum MigrationResult {
    Running,
    Succeeded { total_ms: u64, downtime_ms: u64 },
    Failed { error: String },
}

/// One live migration, kept after it ends as a record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Migration {
    pub id: u64,
    pub vm: String,
    pub from: String,
    pub to: String,
    /// The termination policy of the pre-copy rounds.
    pub policy: PolicyKind,
    pub reason: MigrationReason,
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub started: Millis,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<u64>))]
    pub finished: Option<Millis>,
    pub result: MigrationResult,
}

/// How aggressively the balancer acts, and its safety limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalancerSettings {
    pub enabled: bool,
    /// Record plans as events without migrating anything.
    pub dry_run: bool,
    /// 1 (only fix severe imbalance) to 5 (act on small gains), as in VMware DRS.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 5))]
    pub aggressiveness: u8,
    /// Seconds between balancing rounds.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86400))]
    pub interval_s: u64,
    /// A VM that moved is not moved again for this many seconds.
    #[cfg_attr(feature = "openapi", schema(maximum = 604800))]
    pub cooldown_s: u64,
    /// Migrations at once touching one host (as source or destination).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1024))]
    pub max_per_host: u32,
    /// Migrations at once in the whole cluster.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 65536))]
    pub max_per_cluster: u32,
    /// A host silent this long is declared dead and its VMs restarted elsewhere. A host
    /// that holds a lease is declared dead only when its lease has run out instead.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 86400))]
    pub dead_after_s: u64,
    /// Length of the lease a host's agent renews: a host that cannot renew stops its own
    /// guests before it runs out, and the manager restarts them elsewhere only after.
    #[serde(default = "default_lease_s")]
    #[cfg_attr(feature = "openapi", schema(minimum = 2, maximum = 3600, example = 15))]
    pub lease_s: u64,
    /// How often an agent renews its lease; at most half of `lease_s`, so one lost
    /// renewal does not cost the lease.
    #[serde(default = "default_renew_s")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1800, example = 3))]
    pub renew_s: u64,
    /// Load reports the EWMA smooths over (its alpha is 2 / (window + 1)).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 1000))]
    pub smoothing_window: u32,
    /// Termination policy used when a migration names none.
    pub default_policy: PolicyKind,
    /// The policy of the moves that empty a host being drained (maintenance), when
    /// neither the migration nor the VM names one. Absent or null: `default_policy`.
    #[serde(default)]
    pub evacuation_policy: Option<PolicyKind>,
}

impl Default for BalancerSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            dry_run: false,
            aggressiveness: 3,
            interval_s: 30,
            cooldown_s: 300,
            max_per_host: 1,
            max_per_cluster: 8,
            dead_after_s: 30,
            lease_s: default_lease_s(),
            renew_s: default_renew_s(),
            smoothing_window: 5,
            default_policy: PolicyKind::Adaptive,
            evacuation_policy: None,
        }
    }
}

// Settings stored before leases existed read as the defaults.
fn default_lease_s() -> u64 {
    15
}

fn default_renew_s() -> u64 {
    3
}

/// The body of `PUT /v1/vms/{name}/migration-policy`: a policy, or null for the
/// cluster's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MigrationPolicySetting {
    pub policy: Option<PolicyKind>,
}

impl BalancerSettings {
    /// The policy of a migration started for `reason` of a VM whose spec names
    /// `vm_policy`, when the request names `requested` (pure): the request's, else the
    /// VM's, else `evacuation_policy` for a drain's moves, else `default_policy`.
    pub fn migration_policy(
        &self,
        requested: Option<PolicyKind>,
        vm_policy: Option<PolicyKind>,
        reason: MigrationReason,
    ) -> PolicyKind {
        let cluster = match reason {
            MigrationReason::Evacuate => self.evacuation_policy.unwrap_or(self.default_policy),
            MigrationReason::Manual | MigrationReason::Balance => self.default_policy,
        };
        requested.or(vm_policy).unwrap_or(cluster)
    }

    /// Weight of a new report in the EWMA.
    pub fn ewma_alpha(&self) -> f64 {
        2.0 / (f64::from(self.smoothing_window) + 1.0)
    }
}

/// What happened, in the order it happened; the event log is append-only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    HostRegistered {
        host: String,
    },
    /// Removed from the cluster (`DELETE /v1/hosts/{name}`); its certificate revoked.
    HostRemoved {
        host: String,
    },
    HostStateChanged {
        host: String,
        from: HostState,
        to: HostState,
    },
    VmCreated {
        vm: String,
        host: String,
    },
    VmRunning {
        vm: String,
        host: String,
    },
    VmDeleted {
        vm: String,
    },
    VmRestarted {
        vm: String,
        from: String,
        to: String,
    },
    VmUnplaced {
        vm: String,
        reason: String,
    },
    /// The host it was placed on refused to start it (recorded once per distinct
    /// error); it stays pending and is asked again.
    VmStartFailed {
        vm: String,
        host: String,
        error: String,
    },
    /// Its host stopped reporting it; it is created again.
    VmLost {
        vm: String,
        host: String,
    },
    /// Its host reports it powered off though it was running (the guest shut itself
    /// down, or its QEMU ended): it is recorded stopped, its disks kept, and HA leaves it.
    VmPoweredOff {
        vm: String,
        host: String,
    },
    /// Its guest's health changed (`from` absent: the first report).
    VmGuestHealth {
        vm: String,
        from: Option<crate::health::GuestState>,
        to: crate::health::GuestState,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        reason: String,
    },
    /// HA powers its stopped guest off and starts it again on `host` (`attempt` of the
    /// restart window), because of `reason`.
    VmGuestRestart {
        vm: String,
        host: String,
        attempt: u32,
        reason: String,
    },
    /// HA gave up restarting its guest: it failed again after every allowed restart.
    VmGuestFailed {
        vm: String,
        reason: String,
    },
    MigrationStarted {
        id: u64,
        vm: String,
        from: String,
        to: String,
        policy: PolicyKind,
    },
    MigrationFinished {
        id: u64,
        vm: String,
        result: MigrationResult,
    },
    PlanRecorded {
        moves: usize,
        score_before: f64,
        score_after: f64,
    },
    SettingsChanged,
    /// An operator's lifecycle action took effect.
    VmStateChanged {
        vm: String,
        action: VmAction,
        from: VmState,
        to: VmState,
        host: String,
    },
    /// Recorded in the catalogue; its files are being uploaded.
    ImageAdded {
        image: String,
    },
    /// Every file of it arrived: VMs can boot it.
    ImageReady {
        image: String,
    },
    ImageDeleted {
        image: String,
    },
    TemplateCreated {
        template: String,
    },
    TemplateDeleted {
        template: String,
    },
}

/// A numbered event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Event {
    pub seq: u64,
    #[cfg_attr(feature = "openapi", schema(value_type = u64))]
    pub time: Millis,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
/// `POST /v1/hosts`.
pub struct RegisterHost {
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z0-9][a-z0-9-]{0,47}$"))]
    pub name: HostName,
    pub address: String,
    pub capacity: Capacity,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
/// `POST /v1/join`: a host enrols with a one-time join token. The manager signs the
/// host's certificate signing request (its key never leaves the host) for the host's
/// name and the address in `address`, and registers the host.
pub struct JoinRequest {
    /// The join token (`ID.SECRET`) from `tern ca join-token`.
    pub token: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z0-9][a-z0-9-]{0,47}$"))]
    pub name: HostName,
    /// The agent's URL, `https://IP:PORT`.
    pub address: String,
    pub capacity: Capacity,
    /// A PEM certificate signing request for the host's key.
    pub csr_pem: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
/// The answer of `POST /v1/join`: the host's certificate and what it checks peers with.
pub struct JoinReply {
    pub cert_pem: String,
    pub ca_pem: String,
    /// The revocation list as of now; `GET /v1/ca/crl` has the latest.
    pub crl_pem: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
/// `POST /v1/vms`.
pub struct CreateVm {
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z0-9][a-z0-9-]{0,47}$"))]
    pub name: VmName,
    pub spec: VmSpec,
    /// Absent: the manager places it.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9-]{0,47}$"))]
    pub host: Option<HostName>,
    /// The template whose values fill what the spec leaves out (0 sizes, no image, no
    /// disks). Absent: the template named `default`, if the catalogue has one.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub template: Option<TemplateName>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
/// `POST /v1/vms/{name}/migrate`.
pub struct MigrateVm {
    /// Absent: the manager picks the best other host.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, pattern = "^[a-z0-9][a-z0-9-]{0,47}$"))]
    pub to: Option<HostName>,
    /// Absent: the balancer's default policy.
    #[serde(default)]
    pub policy: Option<PolicyKind>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
/// The query of `GET /v1/events` and `/v1/events/stream`.
pub struct Page {
    #[serde(default)]
    pub since: u64,
    #[serde(default = "default_limit")]
    pub limit: usize,
}

/// Items a list answers with when the query gives no `limit`.
pub const DEFAULT_LIMIT: usize = 1000;

fn default_limit() -> usize {
    DEFAULT_LIMIT
}

/// A migration record and, while it runs, its telemetry.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MigrationView {
    #[serde(flatten)]
    pub record: Migration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

/// The query of `GET /v1/migrations`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default = "default_limit")]
    pub limit: usize,
    /// Only the migrations under way.
    #[serde(default)]
    pub running: bool,
}

/// A host's load report, sent with each heartbeat.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct LoadReport {
    /// Cores in use on the host.
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 4096))]
    pub cpu_used: f64,
    /// The VMs running there and the cores each uses.
    #[serde(default)]
    pub vms: Vec<VmLoad>,
    /// Free space in the host's disk store, in MiB; absent: no store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_free_mib: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct VmLoad {
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z0-9][a-z0-9-]{0,47}$"))]
    pub name: VmName,
    /// Cores it uses.
    #[cfg_attr(feature = "openapi", schema(minimum = 0, maximum = 4096))]
    pub cpu_used: f64,
    /// Its guest's health; absent from agents that do not watch it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::health::GuestHealth>,
    /// The host keeps its definition but nothing runs it: its QEMU ended (the guest
    /// powered itself off) or was stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub powered_off: bool,
}

/// What the manager answers a heartbeat with.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatReply {
    /// VMs the host reported that belong elsewhere (it came back after being declared
    /// dead and they were restarted): the agent destroys these before taking new work.
    pub stale: Vec<String>,
}

/// What the manager answers a lease renewal with: the lease the host now holds,
/// counted by the host from just before it sent the renewal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseGrant {
    /// The lease's length in milliseconds.
    #[cfg_attr(feature = "openapi", schema(example = 15000))]
    pub lease_ms: u64,
    /// When to renew next, in milliseconds.
    #[cfg_attr(feature = "openapi", schema(example = 3000))]
    pub renew_ms: u64,
}

/// A move the round keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlannedMove {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// Peak CPU utilisation of the two hosts removed, times the cooldown (host-seconds).
    pub gain: f64,
    /// Estimated migration time times the share of the two hosts it keeps busy
    /// (host-seconds).
    pub cost: f64,
}

/// A round's plan and what was left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BalancePlan {
    pub score_before: f64,
    pub score_after: f64,
    pub moves: Vec<PlannedMove>,
    /// Planner proposals dropped and planner refusals, counted by reason.
    pub skipped: BTreeMap<NotMoved, u64>,
    /// Wall time of planning, filled in by the caller (decisions have no clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planning_ms: Option<f64>,
}

/// Why the balancer did not move a VM it could have: the planner's refusals (as
/// `tern-balance` names them) and the manager's own reasons for dropping a proposal.
/// Declared in the order of their names, so maps keyed by them list them as before.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NotMoved {
    /// The instance's `auto_balance` flag is off.
    AutoBalanceOff,
    /// The cluster already has its share of concurrent migrations.
    ClusterLimit,
    /// The migration would cost more host time than the imbalance it removes.
    CostExceedsGain,
    /// The target already runs an instance with a shared exclusion tag.
    ExclusionTag,
    /// A host already has its share of concurrent migrations.
    HostLimit,
    /// `plain`/`file` disks, or DRBD without a secondary.
    Immovable,
    /// The target would fail N+1.
    NPlusOne,
    /// Not enough free memory on the target.
    NoMemory,
    /// DRBD instances only move to their secondary.
    NotSecondary,
    /// Target lies in another node group.
    OtherGroup,
    Pinned,
    /// Planned on a snapshot the cluster has since left behind: the VM was deleted,
    /// moved or started migrating, or the destination lost its room or went inactive.
    Stale,
    /// The proposal was planned on a move the manager dropped.
    Superseded,
    /// Target is offline or drained.
    TargetOffline,
    /// The target's vCPU ratio would exceed its limit.
    VcpuRatio,
}

/// Printed as its quoted name, so a map of counts reads as the JSON does.
impl std::fmt::Debug for NotMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl std::fmt::Display for NotMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl NotMoved {
    pub const ALL: [NotMoved; 15] = [
        NotMoved::AutoBalanceOff,
        NotMoved::ClusterLimit,
        NotMoved::CostExceedsGain,
        NotMoved::ExclusionTag,
        NotMoved::HostLimit,
        NotMoved::Immovable,
        NotMoved::NPlusOne,
        NotMoved::NoMemory,
        NotMoved::NotSecondary,
        NotMoved::OtherGroup,
        NotMoved::Pinned,
        NotMoved::Stale,
        NotMoved::Superseded,
        NotMoved::TargetOffline,
        NotMoved::VcpuRatio,
    ];

    /// The name the API and the events use.
    pub fn as_str(self) -> &'static str {
        match self {
            NotMoved::CostExceedsGain => "cost_exceeds_gain",
            NotMoved::HostLimit => "host_limit",
            NotMoved::ClusterLimit => "cluster_limit",
            NotMoved::Superseded => "superseded",
            NotMoved::Stale => "stale",
            NotMoved::NoMemory => "no_memory",
            NotMoved::Immovable => "immovable",
            NotMoved::NotSecondary => "not_secondary",
            NotMoved::Pinned => "pinned",
            NotMoved::AutoBalanceOff => "auto_balance_off",
            NotMoved::TargetOffline => "target_offline",
            NotMoved::OtherGroup => "other_group",
            NotMoved::NPlusOne => "n_plus_one",
            NotMoved::VcpuRatio => "vcpu_ratio",
            NotMoved::ExclusionTag => "exclusion_tag",
        }
    }
}

/// Bytes per guest page, in the agent's engine and in the model alike.
const PAGE_BYTES: u64 = 4096;

/// A running migration's latest telemetry, as its source reports it: the same shape
/// whether it comes from a real agent's engine or from the pre-copy model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Progress {
    /// The source's phase: `preparing`, `connecting`, `pre_copy`, `stop_and_copy`,
    /// `device_state` or `resuming`.
    pub phase: Phase,
    /// Pre-copy rounds completed.
    pub round: u32,
    /// The round being sent right now (the stop-and-copy pass is the one after the last
    /// live round); 0 between rounds, before the first and after the last.
    #[serde(default)]
    pub running_round: u32,
    /// Bytes put on the wire so far, the running round's included.
    pub bytes_transferred: u64,
    /// Bytes that differ from the destination's copy: what a stop now would send. While
    /// a round runs, its pages not yet sent plus, from round 2 on, what the guest is
    /// likely to have dirtied since it began (the last round's dirty rate).
    pub bytes_remaining: u64,
    /// How fast the guest dirtied memory in the last round.
    pub dirty_rate_bytes_per_s: f64,
    /// The link's throughput in the last round (during round 1: so far in it).
    pub bandwidth_bytes_per_s: f64,
    /// The downtime if the VM were paused at the last round's end.
    pub predicted_downtime_ms: f64,
    /// Since the migration started, at the last report.
    pub elapsed_ms: u64,
}

impl Progress {
    /// The telemetry after `rounds` of a guest with `memory_bytes` (pure): totals over
    /// every round, rates from the last; before the first round all memory remains.
    pub fn after_rounds(phase: Phase, memory_bytes: u64, rounds: &[RoundTelemetry]) -> Self {
        Self::during(phase, memory_bytes, rounds, None)
    }

    /// The telemetry after `rounds` and part of the round `running` (the agent's `current`, or a point inside a model round; pure): its bytes
    /// count as transferred, its unsent pages as remaining, so the figures move while a
    /// long round (round 1 carries all non-zero memory) runs.
    pub fn during(
        phase: Phase,
        memory_bytes: u64,
        rounds: &[RoundTelemetry],
        running: Option<&RoundProgress>,
    ) -> Self {
        let last = rounds.last();
        // A round number at or below the last completed one is stale: that round is over.
        let running = running.filter(|c| c.round > last.map_or(0, |r| r.round));
        let completed: u64 = rounds.iter().map(|r| r.bytes_sent).sum();
        let mut p = Self {
            phase,
            round: last.map_or(0, |r| r.round),
            running_round: 0,
            bytes_transferred: completed,
            bytes_remaining: last.map_or(memory_bytes, |r| r.remaining_pages * PAGE_BYTES),
            dirty_rate_bytes_per_s: last.map_or(0.0, |r| r.dirty_rate_bytes_per_s),
            bandwidth_bytes_per_s: last.map_or(0.0, |r| r.bandwidth_bytes_per_s),
            predicted_downtime_ms: last.map_or(0.0, |r| r.predicted_downtime_s * 1e3),
            elapsed_ms: last.map_or(0, |r| (r.elapsed_s * 1e3).round() as u64),
        };
        let Some(c) = running else {
            return p;
        };
        p.running_round = c.round;
        p.bytes_transferred = completed + c.bytes_sent;
        // What differed when the round began: the last round's remainder, held-back
        // pages included (round 1: every page it plans).
        let differing = last.map_or(c.pages_planned, |r| r.remaining_pages.max(c.pages_planned));
        let unsent = differing.saturating_sub(c.pages_sent) * PAGE_BYTES;
        // Only a running guest dirties more; the stop-and-copy pass runs paused.
        let redirtied = match last {
            Some(r) if phase == Phase::PreCopy => (r.dirty_rate_bytes_per_s * c.duration_s) as u64,
            _ => 0,
        };
        p.bytes_remaining = (unsent + redirtied).min(memory_bytes.max(unsent));
        if last.is_none() && c.duration_s > 0.0 {
            p.bandwidth_bytes_per_s = c.bytes_sent as f64 / c.duration_s;
        }
        p.elapsed_ms = (c.elapsed_s * 1e3).round() as u64;
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_beats_the_vm_which_beats_the_cluster_and_only_drains_use_the_evacuation_policy()
    {
        use MigrationReason::*;
        use PolicyKind::*;
        let plain = BalancerSettings::default();
        let evac = BalancerSettings {
            default_policy: Xen,
            evacuation_policy: Some(DependencyAware),
            ..BalancerSettings::default()
        };
        for reason in [Manual, Balance, Evacuate] {
            for s in [&plain, &evac] {
                assert_eq!(
                    s.migration_policy(Some(StopCopy), Some(Qemu), reason),
                    StopCopy
                );
                assert_eq!(s.migration_policy(None, Some(Qemu), reason), Qemu);
            }
            assert_eq!(plain.migration_policy(None, None, reason), Adaptive);
        }
        assert_eq!(evac.migration_policy(None, None, Evacuate), DependencyAware);
        assert_eq!(evac.migration_policy(None, None, Balance), Xen);
        assert_eq!(evac.migration_policy(None, None, Manual), Xen);
    }

    #[test]
    fn settings_and_specs_stored_before_migration_policies_read_as_none() {
        let mut v = serde_json::to_value(BalancerSettings::default()).unwrap();
        assert!(v["evacuation_policy"].is_null());
        v.as_object_mut().unwrap().remove("evacuation_policy");
        let s: BalancerSettings = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(s.evacuation_policy, None);
        v["evacuation_policy"] = "dependency-aware".into();
        let s: BalancerSettings = serde_json::from_value(v).unwrap();
        assert_eq!(s.evacuation_policy, Some(PolicyKind::DependencyAware));
        let spec: VmSpec = serde_json::from_str(r#"{"vcpus":1,"memory_mib":64}"#).unwrap();
        assert_eq!(spec.migration_policy, None);
        let body: MigrationPolicySetting = serde_json::from_str(r#"{"policy":null}"#).unwrap();
        assert_eq!(body.policy, None);
        assert!(serde_json::from_str::<MigrationPolicySetting>(r#"{"policy":"fast"}"#).is_err());
    }

    #[test]
    fn a_spec_recorded_before_vcpu_policies_reads_as_none_and_a_set_one_round_trips() {
        let old: VmSpec = serde_json::from_str(r#"{"vcpus": 1, "memory_mib": 512}"#).unwrap();
        assert_eq!(old.vcpu_policy, crate::vcpu::VcpuPolicy::None);
        let gang = VmSpec {
            vcpu_policy: crate::vcpu::VcpuPolicy::Gang,
            ..old
        };
        let json = serde_json::to_value(&gang).unwrap();
        assert_eq!(json["vcpu_policy"], "gang");
        assert_eq!(serde_json::from_value::<VmSpec>(json).unwrap(), gang);
        let bad = serde_json::from_str::<VmSpec>(
            r#"{"vcpus": 1, "memory_mib": 512, "vcpu_policy": "fifo"}"#,
        )
        .unwrap_err();
        assert!(bad.to_string().contains("gang"), "{bad}");
    }

    #[test]
    fn a_request_with_a_bad_name_is_refused_when_it_is_read() {
        let spec = r#""spec": {"vcpus": 1, "memory_mib": 512}"#;
        let ok: CreateVm =
            serde_json::from_str(&format!(r#"{{"name": "web-1", "host": "h1", {spec}}}"#)).unwrap();
        assert_eq!(
            (ok.name.as_str(), ok.host.as_ref().map(HostName::as_str)),
            ("web-1", Some("h1"))
        );
        let e = serde_json::from_str::<CreateVm>(&format!(r#"{{"name": "Web 1", {spec}}}"#))
            .unwrap_err();
        assert!(
            e.to_string().contains("VM name \"Web 1\" is invalid"),
            "{e}"
        );
        let e = serde_json::from_str::<MigrateVm>(r#"{"to": "h.1"}"#).unwrap_err();
        assert!(
            e.to_string().contains("host name \"h.1\" is invalid"),
            "{e}"
        );
    }

    #[test]
    fn not_moved_reasons_are_named_and_ordered_as_their_strings() {
        for w in NotMoved::ALL.windows(2) {
            assert!(w[0] < w[1] && w[0].as_str() < w[1].as_str(), "{w:?}");
        }
        for r in NotMoved::ALL {
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
        let counts: BTreeMap<NotMoved, u64> = [(NotMoved::HostLimit, 2)].into();
        assert_eq!(
            serde_json::to_string(&counts).unwrap(),
            r#"{"host_limit":2}"#
        );
    }

    fn round(n: u32, sent: u64, remaining_pages: u64) -> RoundTelemetry {
        RoundTelemetry {
            round: n,
            pages_sent: sent / PAGE_BYTES,
            bytes_sent: sent,
            pages_changed: 0,
            dirty_rate_bytes_per_s: f64::from(n) * 1e6,
            bandwidth_bytes_per_s: 1e8,
            remaining_pages,
            held_back_pages: 0,
            predicted_downtime_s: 0.25,
            duration_s: 1.0,
            elapsed_s: f64::from(n) * 1.5,
            throttle_percent: 0,
        }
    }

    #[test]
    fn progress_sums_bytes_and_takes_rates_from_the_last_round() {
        let p = Progress::after_rounds(
            Phase::PreCopy,
            1 << 20,
            &[round(1, 8192, 10), round(2, 4096, 3)],
        );
        assert_eq!(p.round, 2);
        assert_eq!(p.bytes_transferred, 12288);
        assert_eq!(p.bytes_remaining, 3 * 4096);
        assert_eq!(p.dirty_rate_bytes_per_s, 2e6);
        assert_eq!(p.predicted_downtime_ms, 250.0);
        assert_eq!(p.elapsed_ms, 3000);
        let none = Progress::after_rounds(Phase::Connecting, 1 << 20, &[]);
        assert_eq!((none.round, none.bytes_transferred), (0, 0));
        assert_eq!(none.bytes_remaining, 1 << 20);
        assert_eq!(none.phase, Phase::Connecting);
    }

    fn running(round: u32, planned: u64, sent: u64, duration_s: f64) -> RoundProgress {
        RoundProgress {
            round,
            pages_planned: planned,
            pages_sent: sent,
            bytes_sent: sent * PAGE_BYTES / 2,
            duration_s,
            elapsed_s: 10.0 + duration_s,
        }
    }

    #[test]
    fn a_running_round_moves_the_totals_before_it_ends() {
        // Round 1 of a 1 MiB guest (256 pages), 100 sent.
        let r1 = running(1, 256, 100, 0.5);
        let p = Progress::during(Phase::PreCopy, 1 << 20, &[], Some(&r1));
        assert_eq!((p.round, p.running_round), (0, 1));
        assert_eq!(p.bytes_transferred, 100 * PAGE_BYTES / 2);
        assert_eq!(p.bytes_remaining, 156 * PAGE_BYTES);
        assert_eq!(p.bandwidth_bytes_per_s, (100 * PAGE_BYTES) as f64);
        assert_eq!(p.elapsed_ms, 10_500);
        assert_eq!(p.dirty_rate_bytes_per_s, 0.0, "no rate before a round ends");

        // Round 3 after two (10 pages were left after round 2, 8 of them planned, 2 held
        // back): the unsent pages, plus what round 2's dirty rate (2 MB/s) adds in 1 ms.
        let done = [round(1, 8192, 40), round(2, 4096, 10)];
        let r3 = running(3, 8, 5, 0.001);
        let p = Progress::during(Phase::PreCopy, 1 << 20, &done, Some(&r3));
        assert_eq!((p.round, p.running_round), (2, 3));
        assert_eq!(p.bytes_transferred, 8192 + 4096 + 5 * PAGE_BYTES / 2);
        assert_eq!(p.bytes_remaining, 5 * PAGE_BYTES + 2000);
        assert_eq!(p.bandwidth_bytes_per_s, 1e8, "the last round's");
        // Stopped: nothing more is dirtied.
        let p = Progress::during(Phase::StopAndCopy, 1 << 20, &done, Some(&r3));
        assert_eq!(p.bytes_remaining, 5 * PAGE_BYTES);
        // Never more than the guest's memory.
        let long = running(3, 8, 0, 1e6);
        let p = Progress::during(Phase::PreCopy, 1 << 20, &done, Some(&long));
        assert_eq!(p.bytes_remaining, 1 << 20);

        // A round already among the completed ones is ignored.
        let stale = running(2, 8, 8, 0.3);
        let p = Progress::during(Phase::PreCopy, 1 << 20, &done, Some(&stale));
        assert_eq!(p, Progress::after_rounds(Phase::PreCopy, 1 << 20, &done));
        assert_eq!(p.running_round, 0);
    }
}
