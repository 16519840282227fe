//! The agent's routes (`docs/agent-api.md`), typed.

use serde::Serialize;

use std::time::Duration;

use super::{Client, ClientError, ClientOptions};
use crate::agent::{
    Action, CreateVm, HostReport, SavedStateAnswer, StopAnswer, StopRequest, VmMetrics, VmView,
};
use crate::migration::{IncomingView, MigrationView, PrepareRequest, SendRequest, Ticket};

/// A connection to one agent: the CLI's, the lab's, the manager's, and a migration
/// source's to its destination.
#[derive(Clone)]
pub struct AgentClient {
    http: Client,
}

impl From<Client> for AgentClient {
    fn from(http: Client) -> Self {
        AgentClient { http }
    }
}

/// Largest list an agent answers with: one host's VMs, or its running and 64 finished
/// migrations (each at most 60 rounds of telemetry), are far below this.
pub const AGENT_LIST_MAX_BYTES: usize = 16 << 20;

/// The answer of `DELETE /v1/vms/{id}`.
#[derive(serde::Deserialize)]
struct Deleted {}

impl AgentClient {
    /// Every call waits at most `timeout`; `From<Client>` takes other options.
    pub fn new(base: &str, token: &str, timeout: Duration) -> Result<Self, ClientError> {
        let options = ClientOptions {
            max_list_bytes: AGENT_LIST_MAX_BYTES,
            ..ClientOptions::with_timeout(timeout)
        };
        Client::new(base, token, options).map(Self::from)
    }

    /// Over mutual TLS with `tls` (see [`Client::with_tls`]).
    pub fn new_tls(
        base: &str,
        token: &str,
        timeout: Duration,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Self, ClientError> {
        Client::with_tls(base, token, ClientOptions::with_timeout(timeout), tls).map(Self::from)
    }

    pub fn base(&self) -> &str {
        self.http.base()
    }

    /// The one client underneath, for a route not typed here.
    pub fn http(&self) -> &Client {
        &self.http
    }

    pub async fn host(&self) -> Result<HostReport, ClientError> {
        self.http.get("/v1/host").await
    }

    pub async fn list_vms(&self) -> Result<Vec<VmView>, ClientError> {
        self.http.get_list("/v1/vms").await
    }

    pub async fn create_vm(&self, req: &CreateVm) -> Result<VmView, ClientError> {
        self.http.post("/v1/vms", req).await
    }

    pub async fn show_vm(&self, id: &str) -> Result<VmView, ClientError> {
        self.http.get(&format!("/v1/vms/{id}")).await
    }

    pub async fn delete_vm(&self, id: &str) -> Result<(), ClientError> {
        self.http
            .delete::<Deleted>(&format!("/v1/vms/{id}"))
            .await
            .map(drop)
    }

    /// Destroys this host's copy of a VM and leaves its disk files in the store.
    pub async fn delete_copy(&self, id: &str) -> Result<(), ClientError> {
        self.http
            .delete::<Deleted>(&format!("/v1/vms/{id}?disks=keep"))
            .await
            .map(drop)
    }

    /// A lifecycle action; [`Action::IncomingDone`] is the driver's own and has no route.
    pub async fn act(&self, id: &str, action: Action) -> Result<VmView, ClientError> {
        let verb = match action {
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Stop => "stop",
            Action::Reboot => "reboot",
            Action::Suspend => "suspend",
            Action::Restore => "restore",
            Action::IncomingDone | Action::AbandonRestore => {
                return Err(ClientError::NoRoute {
                    what: format!("{action:?} is not an API action"),
                })
            }
        };
        self.http.post_empty(&format!("/v1/vms/{id}/{verb}")).await
    }

    /// Stops VM `id` as `req` says (graceful within a timeout, or forced).
    pub async fn stop_vm(&self, id: &str, req: &StopRequest) -> Result<StopAnswer, ClientError> {
        // The agent may wait for the guest as long as the request allows.
        let wait = req.timeout().unwrap_or_default() + std::time::Duration::from_secs(30);
        self.http
            .send_within(
                reqwest::Method::POST,
                &format!("/v1/vms/{id}/stop"),
                Some(req),
                Some(wait),
            )
            .await
    }

    /// Suspends VM `id` to the store.
    pub async fn suspend_vm(&self, id: &str) -> Result<SavedStateAnswer, ClientError> {
        self.http.post_empty(&format!("/v1/vms/{id}/suspend")).await
    }

    /// Runs suspended VM `id` again here from its saved state.
    pub async fn restore_vm(&self, id: &str) -> Result<SavedStateAnswer, ClientError> {
        self.http.post_empty(&format!("/v1/vms/{id}/restore")).await
    }

    pub async fn metrics(&self, id: &str) -> Result<VmMetrics, ClientError> {
        self.http.get(&format!("/v1/vms/{id}/metrics")).await
    }

    /// One request to the VM's guest agent (a `tern_api::guest::Command`, or its JSON);
    /// the guest's answer.
    pub async fn guest<R: Serialize + ?Sized>(
        &self,
        id: &str,
        req: &R,
    ) -> Result<serde_json::Value, ClientError> {
        self.http.post(&format!("/v1/vms/{id}/guest"), req).await
    }

    /// Records the scheduler events of the VM's vCPU threads for `req.duration_ms`; the
    /// client's timeout must be longer than that.
    pub async fn trace(
        &self,
        id: &str,
        req: &crate::trace::TraceRequest,
    ) -> Result<crate::trace::VmTrace, ClientError> {
        self.http.post(&format!("/v1/vms/{id}/trace"), req).await
    }

    /// Sets how the host schedules the VM's vCPU threads (`none`, `pin`, `gang`).
    pub async fn set_vcpu_policy(
        &self,
        id: &str,
        policy: crate::vcpu::VcpuPolicy,
    ) -> Result<crate::vcpu::VcpuPolicySetting, ClientError> {
        let body = crate::vcpu::VcpuPolicySetting { policy };
        self.http
            .put(&format!("/v1/vms/{id}/vcpu-policy"), &body)
            .await
    }

    /// The vCPU policy applied to the VM on this host.
    pub async fn vcpu_policy(
        &self,
        id: &str,
    ) -> Result<crate::vcpu::VcpuPolicySetting, ClientError> {
        self.http.get(&format!("/v1/vms/{id}/vcpu-policy")).await
    }

    /// Source: starts sending a VM.
    pub async fn send_migration(&self, req: &SendRequest) -> Result<MigrationView, ClientError> {
        self.http.post("/v1/migrations", req).await
    }

    pub async fn list_migrations(&self) -> Result<Vec<MigrationView>, ClientError> {
        self.http.get_list("/v1/migrations").await
    }

    pub async fn show_migration(&self, id: &str) -> Result<MigrationView, ClientError> {
        self.http.get(&format!("/v1/migrations/{id}")).await
    }

    pub async fn cancel_migration(&self, id: &str) -> Result<MigrationView, ClientError> {
        self.http
            .post_empty(&format!("/v1/migrations/{id}/cancel"))
            .await
    }

    /// Destination: prepares to receive a VM.
    pub async fn prepare_incoming(&self, req: &PrepareRequest) -> Result<Ticket, ClientError> {
        self.http.post("/v1/incoming", req).await
    }

    pub async fn show_incoming(&self, id: &str) -> Result<IncomingView, ClientError> {
        self.http.get(&format!("/v1/incoming/{id}")).await
    }

    /// Destination: runs the VM there; `thaw`: and thaws its guest as soon as it runs
    /// (collected with [`AgentClient::thaw_incoming`]).
    pub async fn resume_incoming(&self, id: &str, thaw: bool) -> Result<IncomingView, ClientError> {
        let query = if thaw { "?thaw=true" } else { "" };
        self.http
            .post_empty(&format!("/v1/incoming/{id}/resume{query}"))
            .await
    }

    /// Destination: thaws the guest of a migration that runs there (`dependency-aware`);
    /// the guest's account of the freeze.
    pub async fn thaw_incoming(&self, id: &str) -> Result<crate::guest::ThawReport, ClientError> {
        self.http
            .post_empty(&format!("/v1/incoming/{id}/thaw"))
            .await
    }

    /// Every process of the VM's guest with its taint class and why.
    pub async fn taint(&self, id: &str) -> Result<crate::guest::TaintReport, ClientError> {
        self.http.get(&format!("/v1/vms/{id}/taint")).await
    }

    /// Destination: abandons the migration and destroys the waiting VM.
    pub async fn abort_incoming(&self, id: &str) -> Result<IncomingView, ClientError> {
        self.http.delete(&format!("/v1/incoming/{id}")).await
    }
}
