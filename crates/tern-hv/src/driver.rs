//! The [`Hypervisor`] trait and the values it returns.

use crate::error::Result;
use crate::spec::VmSpec;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
pub use tern_api::agent::{VcpuSample, VmInfo, VmMetrics};

/// What `query-migrate` says, reduced to what the migration engine uses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// QEMU's status word: `none`, `setup`, `active`, `completed`, `failed`, `cancelled`, ...
    pub status: String,
    /// Bytes QEMU itself sent (device state only when `x-ignore-shared` is on).
    pub transferred_bytes: u64,
    /// QEMU's own downtime figure, when it has one.
    pub downtime_ms: Option<u64>,
    pub total_time_ms: Option<u64>,
    /// QEMU's reason when `status` is `failed`.
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
    async fn start(&self, id: &str) -> Result<VmInfo>;
    async fn pause(&self, id: &str) -> Result<VmInfo>;
    async fn resume(&self, id: &str) -> Result<VmInfo>;
    /// Powers the VM off; the definition stays and `start` boots it again.
    async fn stop(&self, id: &str) -> Result<VmInfo>;
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
}
