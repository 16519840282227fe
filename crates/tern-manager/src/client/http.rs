//! [`HostClient`] over the `tern agent` HTTP API (`crates/tern-agent/src/api.rs`):
//! `POST /v1/vms`, `DELETE /v1/vms/{id}`, `GET /v1/host`, `GET /v1/vms`, and the migration
//! API (`POST /v1/migrations`, `GET /v1/migrations/{id}`). Only the fields
//! the manager needs are read, so the two sides can grow apart without breaking this.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{Connector, HostClient, Progress, ProgressFn};
use crate::decide::{LoadReport, VmLoad};
use crate::error::{Error, Result};
use crate::state::{Host, MigrationResult, VmSpec};

/// How often a running migration is polled.
const MIGRATION_POLL: Duration = Duration::from_millis(200);

/// One agent.
pub struct HttpHost {
    host: String,
    base: String,
    token: String,
    http: reqwest::Client,
}

#[derive(Deserialize)]
struct AgentHost {
    load: AgentLoad,
}

#[derive(Deserialize)]
struct AgentLoad {
    vm_cpu_cores: f64,
}

#[derive(Deserialize)]
struct AgentVm {
    id: String,
    #[serde(default)]
    cpu_cores: Option<f64>,
}

impl HttpHost {
    pub fn new(host: &Host, token: &str, timeout: Duration) -> Result<Self> {
        let base = host.address.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(Error::BadInput(format!(
                "host {:?} has address {base:?}; an agent's address starts with http://",
                host.name
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| Error::Agent {
                host: host.name.clone(),
                message: e.to_string(),
            })?;
        Ok(Self {
            host: host.name.clone(),
            base,
            token: token.to_owned(),
            http,
        })
    }

    fn fail(&self, message: impl std::fmt::Display) -> Error {
        Error::Agent {
            host: self.host.clone(),
            message: message.to_string(),
        }
    }

    /// Sends a request; a non-2xx answer becomes an error carrying the agent's message.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, T)> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.fail(format!("{method} {url}: {e}")))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| self.fail(e))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(self.fail(format!("{method} {url}: {status}: {msg}")));
        }
        let v = serde_json::from_slice(&bytes)
            .map_err(|e| self.fail(format!("{method} {url}: unreadable answer: {e}")))?;
        Ok((status.as_u16(), v))
    }
}

#[async_trait]
impl HostClient for HttpHost {
    async fn create_vm(&self, vm: &str, spec: &VmSpec) -> Result<()> {
        let body = json!({
            "id": vm,
            "spec": {"vcpus": spec.vcpus, "memory_mib": spec.memory_mib},
            "start": true,
        });
        self.call::<Value>(Method::POST, "/v1/vms", Some(body))
            .await
            .map(drop)
    }

    async fn delete_vm(&self, vm: &str) -> Result<()> {
        match self
            .call::<Value>(Method::DELETE, &format!("/v1/vms/{vm}"), None)
            .await
        {
            Ok(_) => Ok(()),
            // Already gone is what we wanted.
            Err(Error::Agent { message, .. }) if message.contains("404") => Ok(()),
            Err(e) => Err(e),
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
        policy: &str,
        progress: ProgressFn<'_>,
    ) -> Result<MigrationResult> {
        let body =
            json!({"vm": vm, "destination": to.address, "token": self.token, "policy": policy});
        let id = match self
            .call::<Value>(Method::POST, "/v1/migrations", Some(body))
            .await
        {
            Ok((_, started)) => started["id"]
                .as_str()
                .ok_or_else(|| self.fail("the agent's migration answer has no id"))?
                .to_owned(),
            // A manager that restarted mid-migration asks again; the agent refuses a
            // second migration of the VM, and the one it runs is the one to follow.
            // Failing instead would let the manager treat the arriving copy as stale.
            Err(refused) => {
                let (_, running): (u16, Value) =
                    self.call(Method::GET, "/v1/migrations", None).await?;
                match running_migration(&running, vm, &to.address) {
                    Some(id) => {
                        tracing::info!(vm, host = %self.host, migration = %id, "following the migration the agent already runs");
                        id
                    }
                    None => return Err(refused),
                }
            }
        };
        loop {
            let (_, v): (u16, Value) = self
                .call(Method::GET, &format!("/v1/migrations/{id}"), None)
                .await?;
            match v["phase"].as_str() {
                Some("completed") => {
                    return Ok(MigrationResult::Succeeded {
                        total_ms: v["result"]["total_ms"].as_u64().unwrap_or(0),
                        downtime_ms: v["result"]["downtime_ms"].as_u64().unwrap_or(0),
                    })
                }
                Some("rolled_back") => {
                    return Ok(MigrationResult::Failed {
                        error: v["error"].as_str().unwrap_or("rolled back").to_owned(),
                    })
                }
                _ => {
                    progress(progress_of(&v, spec.memory_mib << 20));
                    tokio::time::sleep(MIGRATION_POLL).await
                }
            }
        }
    }

    async fn load_report(&self) -> Result<LoadReport> {
        let (_, host): (u16, AgentHost) = self.call(Method::GET, "/v1/host", None).await?;
        let (_, vms): (u16, Vec<AgentVm>) = self.call(Method::GET, "/v1/vms", None).await?;
        Ok(LoadReport {
            cpu_used: host.load.vm_cpu_cores,
            vms: vms
                .into_iter()
                .map(|v| VmLoad {
                    name: v.id,
                    cpu_used: v.cpu_cores.unwrap_or(0.0),
                })
                .collect(),
        })
    }
}

/// The id of the migration of `vm` to `destination` still under way in an agent's
/// `GET /v1/migrations` answer (pure).
fn running_migration(list: &Value, vm: &str, destination: &str) -> Option<String> {
    list.as_array()?
        .iter()
        .find(|m| {
            m["vm"] == vm
                && m["destination"] == destination
                && !matches!(m["phase"].as_str(), Some("completed" | "rolled_back"))
        })
        .and_then(|m| m["id"].as_str())
        .map(str::to_owned)
}

/// The telemetry in an agent's `GET /v1/migrations/{id}` answer (pure): its completed
/// `rounds` and the round under way, `current`. Rounds or a current round this side
/// cannot read only leave the totals where the rest puts them.
fn progress_of(view: &Value, memory_bytes: u64) -> Progress {
    let rounds: Vec<tern_migrate::RoundTelemetry> =
        serde_json::from_value(view["rounds"].clone()).unwrap_or_default();
    let current: Option<tern_migrate::RoundProgress> =
        serde_json::from_value(view["current"].clone()).ok();
    Progress::during(
        serde_json::from_value(view["phase"].clone()).unwrap_or_default(),
        memory_bytes,
        &rounds,
        current.as_ref(),
    )
}

/// Clients for agents reached over HTTP, one per address, all with the same token.
pub struct HttpConnector {
    token: String,
    timeout: Duration,
    cache: Mutex<BTreeMap<String, Arc<HttpHost>>>,
}

impl HttpConnector {
    pub fn new(token: &str, timeout: Duration) -> Self {
        Self {
            token: token.to_owned(),
            timeout,
            cache: Mutex::new(BTreeMap::new()),
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
        let c = Arc::new(HttpHost::new(host, &self.token, self.timeout)?);
        cache.insert(key, c.clone());
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migration_to_follow_is_the_vms_unfinished_one_to_that_destination() {
        let list = json!([
            {"id": "mig-1", "vm": "g", "destination": "http://h2:7070", "phase": "rolled_back"},
            {"id": "mig-2", "vm": "g", "destination": "http://h3:7070", "phase": "pre_copy"},
            {"id": "mig-3", "vm": "f", "destination": "http://h2:7070", "phase": "pre_copy"},
            {"id": "mig-4", "vm": "g", "destination": "http://h2:7070", "phase": "pre_copy"},
        ]);
        assert_eq!(
            running_migration(&list, "g", "http://h2:7070").as_deref(),
            Some("mig-4")
        );
        assert_eq!(running_migration(&list, "f", "http://h3:7070"), None);
        assert_eq!(running_migration(&list, "e", "http://h2:7070"), None);
        assert_eq!(running_migration(&json!({"error": "x"}), "g", "h2"), None);
    }

    #[test]
    fn an_agents_view_maps_to_progress_with_the_round_under_way() {
        // As `GET /v1/migrations/{id}` answers part way into round 1 of a 64 MiB guest.
        let v = json!({
            "id": "mig-1", "vm": "g", "destination": "http://h2:7070", "policy": "adaptive",
            "phase": "pre_copy", "error": null, "rounds": [], "result": null,
            "current": {"round": 1, "pages_planned": 16384, "pages_sent": 4096,
                        "bytes_sent": 16 << 20, "duration_s": 0.5, "elapsed_s": 0.5}});
        let p = progress_of(&v, 64 << 20);
        assert_eq!(
            (p.phase, p.round, p.running_round),
            (tern_api::migration::Phase::PreCopy, 0, 1)
        );
        assert_eq!(p.bytes_transferred, 16 << 20);
        assert_eq!(p.bytes_remaining, 48 << 20);
        assert_eq!(p.elapsed_ms, 500);

        // Between rounds (no current) and from an agent that has no `current` at all.
        let mut between = v.clone();
        between["current"] = Value::Null;
        let p = progress_of(&between, 64 << 20);
        assert_eq!((p.running_round, p.bytes_transferred), (0, 0));
        assert_eq!(p.bytes_remaining, 64 << 20);
        let mut older = v.clone();
        older.as_object_mut().unwrap().remove("current");
        assert_eq!(progress_of(&older, 64 << 20), p);
        // A current round this side cannot read is left out, not an error.
        let mut odd = v;
        odd["current"] = json!({"round": "one"});
        assert_eq!(progress_of(&odd, 64 << 20), p);
    }
}
