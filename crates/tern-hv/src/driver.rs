//! The [`Hypervisor`] trait and the values it returns.

use crate::error::Result;
use crate::spec::VmSpec;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
pub use tern_api::agent::{VcpuSample, VmInfo, VmMetrics};

/// QEMU's migration state (its QAPI `MigrationStatus` word), parsed once so callers
/// match on variants instead of comparing strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum MigrationState {
    /// No migration has run on this VM.
    None,
    Setup,
    Active,
    /// The guest is stopped and QEMU sends what is left, device state last.
    PreSwitchover,
    Device,
    Cancelling,
    Cancelled,
    Completed,
    Failed,
    /// A state tern does not act on (postcopy, COLO, a newer QEMU's addition): still
    /// under way as far as tern is concerned.
    Other(String),
}

impl MigrationState {
    const NAMED: [(MigrationState, &'static str); 9] = [
        (MigrationState::None, "none"),
        (MigrationState::Setup, "setup"),
        (MigrationState::Active, "active"),
        (MigrationState::PreSwitchover, "pre-switchover"),
        (MigrationState::Device, "device"),
        (MigrationState::Cancelling, "cancelling"),
        (MigrationState::Cancelled, "cancelled"),
        (MigrationState::Completed, "completed"),
        (MigrationState::Failed, "failed"),
    ];

    /// QEMU's word for the state.
    pub fn as_str(&self) -> &str {
        match self {
            MigrationState::Other(word) => word,
            named => {
                Self::NAMED
                    .iter()
                    .find(|(s, _)| s == named)
                    .expect("every named state is in the table")
                    .1
            }
        }
    }

    /// The migration ended and will not change state again on its own.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            MigrationState::Completed | MigrationState::Failed | MigrationState::Cancelled
        )
    }
}

impl From<&str> for MigrationState {
    fn from(word: &str) -> Self {
        MigrationState::NAMED
            .iter()
            .find(|(_, w)| *w == word)
            .map_or_else(
                || MigrationState::Other(word.to_string()),
                |(s, _)| s.clone(),
            )
    }
}

impl From<String> for MigrationState {
    fn from(word: String) -> Self {
        MigrationState::from(word.as_str())
    }
}

impl From<MigrationState> for String {
    fn from(state: MigrationState) -> Self {
        state.as_str().to_string()
    }
}

impl std::fmt::Display for MigrationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What `query-migrate` says, reduced to what the migration engine uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub state: MigrationState,
    /// Bytes QEMU itself sent (device state only when `x-ignore-shared` is on).
    pub transferred_bytes: u64,
    /// QEMU's own downtime figure, when it has one.
    pub downtime_ms: Option<u64>,
    pub total_time_ms: Option<u64>,
    /// QEMU's reason when `state` is `Failed`.
    pub error: Option<String>,
}

/// A hypervisor driver. Every method is keyed by VM id; ids are unique per driver.
///
/// A created VM exists but has not run (`Created`); `start` runs it. A VM created with
/// `incoming` waits for a migration (`Incoming`): `migrate_incoming` starts listening and
/// it becomes `Paused` when the migration completed (see [`Hypervisor::refresh`]); the
/// caller then resumes it.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// `qemu` or `sim`.
    fn kind(&self) -> &'static str;
    /// Defines the VM and prepares its process, without running the guest.
    async fn create(&self, id: &str, spec: VmSpec, incoming: bool) -> Result<VmInfo>;
    /// [`Hypervisor::create`] of a VM that waits for a migration, in two steps: the VM is
    /// defined (`Incoming`) and its memory file made at once, so a migration's memory
    /// can arrive while [`Hypervisor::launch`] starts its process. Until that start ends,
    /// every other call on the VM waits for it. Drivers without a separate start do
    /// both here.
    async fn define_incoming(&self, id: &str, spec: VmSpec) -> Result<VmInfo> {
        self.create(id, spec, true).await
    }
    /// Starts the process of a VM [`Hypervisor::define_incoming`] defined; a VM whose
    /// process runs is left as it is. A start that fails leaves no VM behind.
    async fn launch(&self, id: &str) -> Result<VmInfo> {
        self.info(id).await
    }
    async fn start(&self, id: &str) -> Result<VmInfo>;
    async fn pause(&self, id: &str) -> Result<VmInfo>;
    async fn resume(&self, id: &str) -> Result<VmInfo>;
    /// Powers the VM off; the definition stays and `start` boots it again.
    async fn stop(&self, id: &str) -> Result<VmInfo>;
    /// Presses the guest's ACPI power button (QMP `system_powerdown`). The VM keeps its
    /// state until the guest powers off, which [`Hypervisor::wait_stopped`] waits for.
    async fn powerdown(&self, id: &str) -> Result<()>;
    /// Waits at most `timeout` for the VM's process to end on its own (a guest that
    /// powered itself off); the VM's info then, `Stopped` when it did.
    async fn wait_stopped(&self, id: &str, timeout: std::time::Duration) -> Result<VmInfo>;
    /// A hard reset of the running guest, which boots again from its disks; it stays
    /// running (the QEMU driver power-cycles it in a new process).
    async fn reboot(&self, id: &str) -> Result<VmInfo>;
    /// The VM's memory and device state were saved (it is paused and QEMU's migration
    /// of its device state completed): ends its process and frees its RAM file. The
    /// VM is `Suspended`.
    async fn suspended(&self, id: &str) -> Result<VmInfo>;
    /// Starts the process of a suspended VM waiting for its saved state (`Restoring`),
    /// fed like an incoming migration ([`Hypervisor::migrate_incoming`]).
    async fn restore(&self, id: &str) -> Result<VmInfo>;
    /// Gives up a restore: ends the process; the VM is `Suspended` again.
    async fn abandon_restore(&self, id: &str) -> Result<VmInfo>;
    /// Ends the VM and removes everything the driver made for it.
    async fn destroy(&self, id: &str) -> Result<()>;
    async fn list(&self) -> Result<Vec<VmInfo>>;
    async fn info(&self, id: &str) -> Result<VmInfo>;
    async fn metrics(&self, id: &str) -> Result<VmMetrics>;
    /// Host thread ids of the vCPUs, in vCPU order.
    async fn vcpu_threads(&self, id: &str) -> Result<Vec<u32>>;
    /// Re-reads the hypervisor's view (e.g. an incoming migration that completed, a guest
    /// that powered itself off) and returns the VM's current info.
    async fn refresh(&self, id: &str) -> Result<VmInfo>;

    /// Destination: start listening for QEMU's migration stream on `uri` (`tcp:HOST:PORT`).
    async fn migrate_incoming(&self, id: &str, uri: &str) -> Result<()>;
    /// Sets migration capabilities (e.g. `x-ignore-shared`) on either end.
    async fn set_migration_capabilities(&self, id: &str, caps: &[(&str, bool)]) -> Result<()>;
    /// Source: send the VM's state (device state only with `x-ignore-shared`) to `uri`.
    async fn migrate(&self, id: &str, uri: &str) -> Result<()>;
    async fn query_migrate(&self, id: &str) -> Result<MigrationStatus>;
    async fn migrate_cancel(&self, id: &str) -> Result<()>;
    /// Runs one of the QMP commands that move local disks with a migration
    /// ([`crate::disk::mirror::COMMANDS`]; any other is refused). A driver without
    /// QEMU cannot move disks.
    async fn disk_qmp(
        &self,
        id: &str,
        command: &str,
        args: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let _ = args;
        Err(crate::HvError::Qemu(format!(
            "VM {id:?}: the {} driver cannot run {command:?}: it moves no local disks",
            self.kind()
        )))
    }
    /// Whether the guest of running VM `id` panicked, as its hypervisor saw it (QEMU's
    /// pvpanic device: the guest is then held, not rebooted). A driver without a panic
    /// device knows nothing of panics.
    async fn guest_panicked(&self, id: &str) -> Result<bool> {
        let _ = id;
        Ok(false)
    }
    /// Lets go of every VM without stopping it, for an agent that exits while its
    /// guests run on; a later driver adopts them. Returns the ids let go. A driver whose
    /// guests cannot outlive its process (the simulator) has nothing to let go.
    async fn release(&self) -> Vec<String> {
        Vec::new()
    }
}
