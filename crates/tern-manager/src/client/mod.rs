//! Agents as the manager sees them: one small trait, [`HostClient`], with a real HTTP
//! implementation ([`http`]) for `tern agent`; the `tern-simhost` crate implements it in
//! process over the `sim` hypervisor driver, for the demo and for tests at scale.
//!
//! A [`Connector`] finds the client of a host from its record, so the control loop does
//! not care which kind it talks to.

pub mod http;

use std::sync::Arc;

use async_trait::async_trait;
pub use tern_api::manager::Progress;

use crate::decide::LoadReport;
use crate::error::Result;
use crate::state::{Host, Image, MigrationResult, PolicyKind, VmSpec};
use tern_api::manager::{VmAction, VmActionRequest};
use tern_api::trace::{TraceRequest, VmTrace};
use tern_api::vcpu::VcpuPolicy;

/// What the manager asks of a host's agent.
#[async_trait]
pub trait HostClient: Send + Sync {
    /// Creates and starts `vm`; `image` is its catalogue image (`spec.image`), looked up
    /// by the caller. With `reuse_disks`, its disk files already in the store are used
    /// as they are (it ran elsewhere before).
    async fn create_vm(
        &self,
        vm: &str,
        spec: &VmSpec,
        image: Option<&Image>,
        reuse_disks: bool,
    ) -> Result<()>;
    /// Destroys `vm`; a VM the host does not have counts as destroyed.
    async fn delete_vm(&self, vm: &str) -> Result<()>;
    /// Destroys a stale copy of `vm` (the VM runs elsewhere now) and leaves its disk
    /// files, which the running copy uses.
    async fn delete_copy(&self, vm: &str) -> Result<()> {
        self.delete_vm(vm).await
    }
    /// Live-migrates `vm` from this host to `to` with the termination policy `policy`;
    /// on failure the VM keeps running here. `progress` is told the telemetry each time
    /// it changes while the migration runs.
    async fn migrate_vm(
        &self,
        vm: &str,
        spec: &VmSpec,
        to: &Host,
        policy: PolicyKind,
        progress: ProgressFn<'_>,
    ) -> Result<MigrationResult>;
    /// The host's current load and the VMs it runs.
    async fn load_report(&self) -> Result<LoadReport>;
    /// Applies vCPU policy `policy` to running `vm` (how the host schedules its
    /// threads). `none`, the state of every VM, is accepted by a host without threads.
    async fn set_vcpu_policy(&self, vm: &str, policy: VcpuPolicy) -> Result<()> {
        if policy.is_none() {
            return Ok(());
        }
        Err(crate::error::Error::BadInput(format!(
            "VM {vm:?} runs on a host with no vCPU threads to schedule (a simulated host)"
        )))
    }
    /// Carries out lifecycle `action` on `vm` (`req`: a stop's timeout); a refusal of
    /// the host's (the VM's state there) is the caller's to fix.
    async fn act(&self, vm: &str, action: VmAction, req: &VmActionRequest) -> Result<()> {
        let _ = req;
        Err(crate::error::Error::BadInput(format!(
            "VM {vm:?} runs on a host that cannot {} it",
            action.as_str()
        )))
    }
    /// Grows disk `disk` of stopped `vm` to `size_mib`.
    async fn resize_disk(&self, vm: &str, disk: &str, size_mib: u64) -> Result<()> {
        let _ = (disk, size_mib);
        Err(crate::error::Error::BadInput(format!(
            "VM {vm:?} runs on a host with no disks (a simulated host)"
        )))
    }
    /// Records `vm`'s scheduler events (its vCPU threads, and its guest's processes
    /// unless `req.host_only`) for `req.duration_ms`.
    async fn trace_vm(&self, vm: &str, req: &TraceRequest) -> Result<VmTrace> {
        let _ = req;
        Err(crate::error::Error::BadInput(format!(
            "VM {vm:?} runs on a host with no scheduler to trace (a simulated host)"
        )))
    }
    /// Running `vm`'s guest processes as its guest agent classifies them for
    /// dependency-aware migration.
    async fn taint(&self, vm: &str) -> Result<tern_api::guest::TaintReport> {
        Err(crate::error::Error::Conflict(format!(
            "VM {vm:?} runs on a host with no guest agent to ask (a simulated host)"
        )))
    }
    /// Attaches to running `vm`'s serial console (a WebSocket from the host's agent),
    /// first replaying up to `log` bytes of its console log.
    async fn console(
        &self,
        vm: &str,
        log: Option<u64>,
    ) -> Result<tern_api::client::console::ConsoleStream> {
        let _ = log;
        Err(crate::error::Error::Conflict(format!(
            "VM {vm:?} runs on a host with no serial console (a simulated host)"
        )))
    }
}

/// Finds the client for a host.
pub trait Connector: Send + Sync {
    fn client(&self, host: &Host) -> Result<Arc<dyn HostClient>>;
}

/// Where a running migration's telemetry goes.
pub type ProgressFn<'a> = &'a (dyn Fn(Progress) + Send + Sync);
