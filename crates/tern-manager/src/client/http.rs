//! [`HostClient`] over the `tern agent` HTTP API, through the one typed client
//! (`tern_api::client::AgentClient`): `POST /v1/vms`, `DELETE /v1/vms/{id}`,
//! `GET /v1/host`, `GET /v1/vms`, and the migration API (`POST /v1/migrations`,
//! `GET /v1/migrations/{id}`). The agent's answers are read as the API's types, which
//! ignore fields they do not know, so the two sides can grow apart without breaking this.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tern_api::trace::{TraceRequest, VmTrace};

use async_trait::async_trait;
use tern_api::agent::CreateVm;
use tern_api::client::{AgentClient, ClientError};
use tern_api::migration::{MigrationEngine, MigrationView, Phase, SendOptions, SendRequest};

use super::{Connector, HostClient, Progress, ProgressFn};
use crate::decide::{LoadReport, VmLoad};
use crate::error::{Error, Result};
use crate::state::{Host, Image, MigrationResult, PolicyKind, VmSpec};
use tern_api::vcpu::VcpuPolicy;

/// How often a running migration is polled.
const MIGRATION_POLL: Duration = Duration::from_millis(200);
/// How much longer than its pre-copy limit a migration may take as a whole: prepare
/// and connect (20 s at most), the final pass, the device state (15 s) and resume
/// (15 s), with room for a loaded host.
const FOLLOW_SLACK: Duration = Duration::from_secs(90);
/// Once past its deadline a migration is cancelled; this long is left for the source
/// to roll back, or to report that it finished (it was past the point of no return).
/// The source's own rollback is bounded by about 2.5 min (five tries of 30 s to reach a
/// destination that may have resumed): a migration still not over after this is
/// reported stuck, not failed, as its VM may run on either host.
const CANCEL_GRACE: Duration = Duration::from_secs(180);

/// How long a migration with `options` is followed before it is cancelled (pure).
pub fn follow_deadline(options: &SendOptions) -> Duration {
    let precopy = Duration::try_from_secs_f64(options.max_precopy_s)
        .unwrap_or(Duration::from_secs(3600))
        .min(Duration::from_secs(3600));
    precopy + FOLLOW_SLACK
}

/// What following a migration that is still under way does after a poll (pure).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Follow {
    Wait,
    /// Past the deadline: ask the source to cancel.
    Cancel,
    /// Cancelled and still not over after the grace: stop following.
    GiveUp,
}

/// `elapsed`: since the migration started; `cancelled`: since it was cancelled, if so.
fn follow(elapsed: Duration, deadline: Duration, cancelled: Option<Duration>) -> Follow {
    match cancelled {
        Some(since) if since > CANCEL_GRACE => Follow::GiveUp,
        Some(_) => Follow::Wait,
        None if elapsed > deadline => Follow::Cancel,
        None => Follow::Wait,
    }
}

/// One agent.
pub struct HttpHost {
    host: String,
    token: String,
    agent: AgentClient,
    /// For a client of its own per trace (a trace outlasts the usual timeout).
    address: String,
    tls: Option<rustls::ClientConfig>,
}

/// To reach an agent's console and have the WebSocket upgrade answered.
const CONSOLE_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest trace answer read from an agent (an hour of a busy VM's events is below).
pub const MAX_TRACE_BYTES: usize = 1 << 30;

impl HttpHost {
    pub fn new(host: &Host, token: &str, timeout: Duration) -> Result<Self> {
        Self::with_tls(host, token, timeout, None)
    }

    /// Over mutual TLS with `tls` (the manager's identity): only to `https://` addresses
    /// whose certificate the cluster CA issued, and with no bearer token.
    pub fn with_tls(
        host: &Host,
        token: &str,
        timeout: Duration,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Self> {
        let agent = AgentClient::new_tls(&host.address, token, timeout, tls.clone()).map_err(
            |e| match e {
                ClientError::BadUrl { url } => Error::BadInput(format!(
                    "host {:?} has address {url:?}; an agent's address starts with http://",
                    host.name
                )),
                e @ ClientError::NotHttps { .. } => {
                    Error::BadInput(format!("host {:?}: {e}", host.name))
                }
                e => Error::Agent {
                    host: host.name.clone(),
                    message: e.to_string(),
                },
            },
        )?;
        Ok(Self {
            host: host.name.clone(),
            token: token.to_owned(),
            agent,
            address: host.address.clone(),
            tls,
        })
    }

    fn fail(&self, e: impl std::fmt::Display) -> Error {
        Error::Agent {
            host: self.host.clone(),
            message: e.to_string(),
        }
    }

    /// An agent's answer to a request about one VM: its refusals stay the caller's to
    /// fix (a VM that stopped, one on a driver with no threads), the rest is the host's.
    fn refusal(&self, e: tern_api::client::ClientError) -> Error {
        match e.status() {
            Some(409) => Error::Conflict(format!("host {:?}: {e}", self.host)),
            Some(400) => Error::BadInput(format!("host {:?}: {e}", self.host)),
            _ => self.fail(e),
        }
    }
}

#[async_trait]
impl HostClient for HttpHost {
    async fn create_vm(
        &self,
        vm: &str,
        spec: &VmSpec,
        image: Option<&Image>,
        reuse_disks: bool,
    ) -> Result<()> {
        let req = CreateVm {
            id: vm.parse()?,
            spec: spec.host_spec(vm, image),
            reuse_disks,
            start: true,
        };
        self.agent
            .create_vm(&req)
            .await
            .map(drop)
            .map_err(|e| self.fail(e))
    }

    async fn delete_vm(&self, vm: &str) -> Result<()> {
        match self.agent.delete_vm(vm).await {
            Ok(()) => Ok(()),
            // Already gone is what we wanted.
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    async fn act(
        &self,
        vm: &str,
        action: tern_api::manager::VmAction,
        req: &tern_api::manager::VmActionRequest,
    ) -> Result<()> {
        use tern_api::agent::Action;
        use tern_api::manager::VmAction as A;
        let a = &self.agent;
        let r = match action {
            A::Stop => {
                let stop = tern_api::agent::StopRequest {
                    timeout_s: req.timeout_s,
                    force: req.force,
                };
                a.stop_vm(vm, &stop).await.map(drop)
            }
            A::Suspend => a.suspend_vm(vm).await.map(drop),
            A::Restore => a.restore_vm(vm).await.map(drop),
            A::Start => a.act(vm, Action::Start).await.map(drop),
            A::Reboot => a.act(vm, Action::Reboot).await.map(drop),
            A::Pause => a.act(vm, Action::Pause).await.map(drop),
            A::Resume => a.act(vm, Action::Resume).await.map(drop),
        };
        r.map_err(|e| self.refusal(e))
    }

    async fn resize_disk(&self, vm: &str, disk: &str, size_mib: u64) -> Result<()> {
        let path = format!("/v1/vms/{vm}/disks/{disk}/resize");
        let body = tern_api::agent::ResizeDisk { size_mib };
        self.agent
            .http()
            .post::<_, serde_json::Value>(&path, &body)
            .await
            .map(drop)
            .map_err(|e| self.refusal(e))
    }

    async fn delete_copy(&self, vm: &str) -> Result<()> {
        match self.agent.delete_copy(vm).await {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// `POST /v1/migrations` on the source agent, then polls `GET /v1/migrations/{id}`
    /// until the migration completes or rolls back (the agent's phase machine); each
    /// poll's phase, rounds and round under way go to `progress`.
    async fn migrate_vm(
        &self,
        vm: &str,
        spec: &VmSpec,
        to: &Host,
        policy: PolicyKind,
        progress: ProgressFn<'_>,
    ) -> Result<MigrationResult> {
        let req = SendRequest {
            vm: vm.parse()?,
            destination: to.address.clone(),
            token: self.token.clone(),
            policy: MigrationEngine::Tern(policy),
            options: SendOptions::default(),
        };
        let id = match self.agent.send_migration(&req).await {
            Ok(started) => started.id,
            // A manager that restarted mid-migration asks again; the agent refuses a
            // second migration of the VM, and the one it runs is the one to follow.
            // Failing instead would let the manager treat the arriving copy as stale.
            Err(refused) => {
                let running = self
                    .agent
                    .list_migrations()
                    .await
                    .map_err(|e| self.fail(e))?;
                match running_migration(&running, vm, &to.address) {
                    Some(id) => {
                        tracing::info!(vm, host = %self.host, migration = %id, "following the migration the agent already runs");
                        id
                    }
                    None => return Err(self.fail(refused)),
                }
            }
        };
        let started = Instant::now();
        let deadline = follow_deadline(&req.options);
        let mut cancelled: Option<Instant> = None;
        loop {
            let v = self
                .agent
                .show_migration(&id)
                .await
                .map_err(|e| self.fail(e))?;
            match v.phase {
                Phase::Completed => {
                    let r = v.result.as_ref();
                    return Ok(MigrationResult::Succeeded {
                        total_ms: r.map_or(0, |r| r.total_ms),
                        downtime_ms: r.map_or(0, |r| r.downtime_ms),
                    });
                }
                Phase::RolledBack => {
                    let error = v.error.unwrap_or_else(|| "rolled back".to_owned());
                    let error = match cancelled {
                        Some(_) => format!(
                            "cancelled after {deadline:?}, the deadline for a migration \
                             with max_precopy_s {}: {error}",
                            req.options.max_precopy_s
                        ),
                        None => error,
                    };
                    return Ok(MigrationResult::Failed { error });
                }
                _ => progress(progress_of(&v, spec.memory_mib << 20)),
            }
            match follow(started.elapsed(), deadline, cancelled.map(|c| c.elapsed())) {
                Follow::Wait => {}
                Follow::Cancel => {
                    tracing::warn!(vm, host = %self.host, migration = %id, ?deadline, "migration past its deadline; cancelling it");
                    if let Err(e) = self.agent.cancel_migration(&id).await {
                        tracing::warn!(vm, migration = %id, error = %e, "could not cancel the migration");
                    }
                    cancelled = Some(Instant::now());
                }
                Follow::GiveUp => {
                    return Err(Error::MigrationStuck {
                        host: self.host.clone(),
                        vm: vm.to_owned(),
                        migration: id,
                        waited: started.elapsed(),
                        phase: v.phase,
                    })
                }
            }
            tokio::time::sleep(MIGRATION_POLL).await
        }
    }

    /// `POST /v1/vms/{id}/trace` on the agent, waiting the recording's duration and a
    /// minute more.
    async fn trace_vm(&self, vm: &str, req: &TraceRequest) -> Result<VmTrace> {
        let options = tern_api::client::ClientOptions {
            max_body_bytes: MAX_TRACE_BYTES,
            ..tern_api::client::ClientOptions::with_timeout(
                Duration::from_millis(req.duration_ms) + Duration::from_secs(60),
            )
        };
        let client = tern_api::client::Client::with_tls(
            &self.address,
            &self.token,
            options,
            self.tls.clone(),
        )
        .map_err(|e| self.fail(e))?;
        AgentClient::from(client)
            .trace(vm, req)
            .await
            .map_err(|e| self.refusal(e))
    }

    /// `GET /v1/vms/{id}/console` on the agent, upgraded to a WebSocket.
    async fn console(
        &self,
        vm: &str,
        log: Option<u64>,
    ) -> Result<tern_api::client::console::ConsoleStream> {
        let path = match log {
            Some(n) => format!("/v1/vms/{vm}/console?log={n}"),
            None => format!("/v1/vms/{vm}/console"),
        };
        tern_api::client::console::connect(
            &self.address,
            &path,
            &self.token,
            self.tls.clone(),
            CONSOLE_CONNECT_TIMEOUT,
        )
        .await
        .map_err(|e| self.refusal(e))
    }

    /// `GET /v1/vms/{id}/taint` on the agent.
    async fn taint(&self, vm: &str) -> Result<tern_api::guest::TaintReport> {
        self.agent.taint(vm).await.map_err(|e| self.refusal(e))
    }

    /// `PUT /v1/vms/{id}/vcpu-policy` on the agent.
    async fn set_vcpu_policy(&self, vm: &str, policy: VcpuPolicy) -> Result<()> {
        self.agent
            .set_vcpu_policy(vm, policy)
            .await
            .map(drop)
            .map_err(|e| self.refusal(e))
    }

    async fn load_report(&self) -> Result<LoadReport> {
        let host = self.agent.host().await.map_err(|e| self.fail(e))?;
        let vms = self.agent.list_vms().await.map_err(|e| self.fail(e))?;
        Ok(LoadReport {
            cpu_used: host.load.vm_cpu_cores,
            store_free_mib: host.store_free_mib,
            // A VM whose id breaks the naming rule cannot be one the manager created:
            // it is neither its load nor a stale copy it could name to destroy.
            vms: vms
                .into_iter()
                .filter_map(|v| {
                    Some(VmLoad {
                        name: v.info.id.parse().ok()?,
                        cpu_used: v.cpu_cores.unwrap_or(0.0),
                        guest: v.guest,
                        powered_off: v.info.state == tern_api::agent::VmState::Stopped,
                    })
                })
                .collect(),
        })
    }
}

/// The id of the migration of `vm` to `destination` still under way in an agent's
/// `GET /v1/migrations` answer (pure).
fn running_migration(list: &[MigrationView], vm: &str, destination: &str) -> Option<String> {
    list.iter()
        .find(|m| m.vm == vm && m.destination == destination && !m.phase.is_final())
        .map(|m| m.id.clone())
}

/// The telemetry in an agent's `GET /v1/migrations/{id}` answer (pure): its completed
/// `rounds` and the round under way, `current`.
fn progress_of(view: &MigrationView, memory_bytes: u64) -> Progress {
    Progress::during(
        view.phase,
        memory_bytes,
        &view.rounds,
        view.current.as_ref(),
    )
}

/// Clients for agents reached over HTTP, one per address: all with the same token, or
/// all over mutual TLS with the manager's certificate and no token.
pub struct HttpConnector {
    token: String,
    timeout: Duration,
    tls: Option<rustls::ClientConfig>,
    cache: Mutex<BTreeMap<String, Arc<HttpHost>>>,
}

impl HttpConnector {
    pub fn new(token: &str, timeout: Duration) -> Self {
        Self {
            token: token.to_owned(),
            timeout,
            tls: None,
            cache: Mutex::new(BTreeMap::new()),
        }
    }

    /// Agents are called over mutual TLS with `tls`, never with a bearer token, and
    /// never at a plain-HTTP address.
    pub fn with_tls(timeout: Duration, tls: rustls::ClientConfig) -> Self {
        Self {
            tls: Some(tls),
            ..Self::new("", timeout)
        }
    }
}

impl Connector for HttpConnector {
    fn client(&self, host: &Host) -> Result<Arc<dyn HostClient>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let key = format!("{}@{}", host.name, host.address);
        if let Some(c) = cache.get(&key) {
            return Ok(c.clone());
        }
        let c = Arc::new(HttpHost::with_tls(
            host,
            &self.token,
            self.timeout,
            self.tls.clone(),
        )?);
        cache.insert(key, c.clone());
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn view(v: Value) -> MigrationView {
        serde_json::from_value(v).unwrap()
    }

    fn listed(id: &str, vm: &str, destination: &str, phase: &str) -> MigrationView {
        view(
            json!({"id": id, "vm": vm, "destination": destination, "policy": "adaptive",
                    "phase": phase, "error": null, "rounds": [], "result": null}),
        )
    }

    #[test]
    fn a_followed_migration_is_cancelled_at_its_deadline_and_given_up_after_the_grace() {
        let d = follow_deadline(&SendOptions::default());
        assert_eq!(d, Duration::from_secs(60) + FOLLOW_SLACK);
        let s = Duration::from_secs;
        assert_eq!(follow(s(10), d, None), Follow::Wait);
        assert_eq!(follow(d + s(1), d, None), Follow::Cancel);
        assert_eq!(follow(d + s(5), d, Some(s(4))), Follow::Wait);
        assert_eq!(
            follow(d + s(40), d, Some(CANCEL_GRACE + s(1))),
            Follow::GiveUp
        );
        // A limit the agent would refuse still gives a bounded deadline.
        let odd = SendOptions {
            max_precopy_s: f64::INFINITY,
            ..SendOptions::default()
        };
        assert_eq!(follow_deadline(&odd), s(3600) + FOLLOW_SLACK);
    }

    #[test]
    fn the_migration_to_follow_is_the_vms_unfinished_one_to_that_destination() {
        let list = [
            listed("mig-1", "g", "http://h2:7070", "rolled_back"),
            listed("mig-2", "g", "http://h3:7070", "pre_copy"),
            listed("mig-3", "f", "http://h2:7070", "pre_copy"),
            listed("mig-4", "g", "http://h2:7070", "pre_copy"),
        ];
        assert_eq!(
            running_migration(&list, "g", "http://h2:7070").as_deref(),
            Some("mig-4")
        );
        assert_eq!(running_migration(&list, "f", "http://h3:7070"), None);
        assert_eq!(running_migration(&list, "e", "http://h2:7070"), None);
        assert_eq!(running_migration(&[], "g", "h2"), None);
    }

    #[test]
    fn an_agents_view_maps_to_progress_with_the_round_under_way() {
        // As `GET /v1/migrations/{id}` answers part way into round 1 of a 64 MiB guest.
        let v = json!({
            "id": "mig-1", "vm": "g", "destination": "http://h2:7070", "policy": "adaptive",
            "phase": "pre_copy", "error": null, "rounds": [], "result": null,
            "current": {"round": 1, "pages_planned": 16384, "pages_sent": 4096,
                        "bytes_sent": 16 << 20, "duration_s": 0.5, "elapsed_s": 0.5}});
        let p = progress_of(&view(v.clone()), 64 << 20);
        assert_eq!((p.phase, p.round, p.running_round), (Phase::PreCopy, 0, 1));
        assert_eq!(p.bytes_transferred, 16 << 20);
        assert_eq!(p.bytes_remaining, 48 << 20);
        assert_eq!(p.elapsed_ms, 500);

        // Between rounds (no current) and from an agent that has no `current` at all.
        let mut between = v.clone();
        between["current"] = Value::Null;
        let p = progress_of(&view(between), 64 << 20);
        assert_eq!((p.running_round, p.bytes_transferred), (0, 0));
        assert_eq!(p.bytes_remaining, 64 << 20);
        let mut older = v.clone();
        older.as_object_mut().unwrap().remove("current");
        assert_eq!(progress_of(&view(older), 64 << 20), p);
        // A newer agent's fields this side does not know are ignored.
        let mut newer = v;
        newer["current"] = Value::Null;
        newer["carbon_grams"] = json!(3);
        assert_eq!(progress_of(&view(newer), 64 << 20), p);
    }
}
