//! The agent's shared state: the driver, the host's identity and capacity, the load
//! samples and the guest channels. Cloned into every request handler.

use crate::error::AgentError;
use crate::guest::GuestChannels;
use crate::host::{cpu_cores, Capacity};
use crate::migration::session::Registry;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tern_hv::Hypervisor;

/// Fixed facts about this host's agent.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Shown in reports; the lab names hosts `h1`, `h2`, ...
    pub name: String,
    pub capacity: Capacity,
    /// The bearer token every request must carry.
    pub token: String,
    /// VM records live under `state_dir/vms/`.
    pub state_dir: PathBuf,
    /// Kernels and initramfs images must lie under this directory (after symlinks are
    /// resolved): a caller of the API names files QEMU opens as root.
    pub image_dir: PathBuf,
}

/// Reads a token file: the first line, trimmed; empty is refused, and so is a file
/// that group or others can read.
pub fn read_token(path: &Path) -> Result<String, AgentError> {
    tern_pki::files::read_token(path).map_err(|e| AgentError::BadRequest(e.to_string()))
}

/// The last CPU sample of one VM.
#[derive(Debug, Clone, Copy)]
struct Sample {
    cpu_ns: u64,
    at_ns: u64,
    cores: f64,
}

/// Per-VM CPU use, updated by the sampler and read by reports.
#[derive(Debug, Default)]
pub struct LoadTable {
    samples: HashMap<String, Sample>,
}

impl LoadTable {
    /// Records a cumulative CPU sample and returns the rate since the previous one.
    pub fn record(&mut self, id: &str, cpu_ns: u64, at_ns: u64) -> f64 {
        let cores = self
            .samples
            .get(id)
            .map_or(0.0, |p| cpu_cores((p.cpu_ns, p.at_ns), (cpu_ns, at_ns)));
        self.samples.insert(
            id.to_string(),
            Sample {
                cpu_ns,
                at_ns,
                cores,
            },
        );
        cores
    }

    /// The VM's CPU use at the last sample, in cores.
    pub fn cores(&self, id: &str) -> Option<f64> {
        self.samples.get(id).map(|s| s.cores)
    }

    /// Forgets VMs that are gone.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.samples.retain(|k, _| keep(k));
    }
}

/// Everything a request handler needs.
#[derive(Clone)]
pub struct AppState {
    pub hv: Arc<dyn Hypervisor>,
    pub host: Arc<HostConfig>,
    pub load: Arc<Mutex<LoadTable>>,
    pub guests: Arc<GuestChannels>,
    /// Serialises VM admission so two concurrent creates cannot both take the last room.
    pub admission: Arc<tokio::sync::Mutex<()>>,
    /// Every migration this agent takes part in.
    pub migrations: Arc<Registry>,
    /// Held from the check that a VM is not migrating to the end of a lifecycle action,
    /// and from a send's checks to its registration, so neither slips past the other.
    pub lifecycle: Arc<tokio::sync::Mutex<()>>,
    /// The VMs a long lifecycle action (a graceful stop, a suspend, a restore) is under
    /// way on, and which: other actions on them are refused meanwhile, without holding
    /// [`AppState::lifecycle`] (and with it every other VM's actions) for that long.
    pub busy: Arc<Mutex<HashMap<String, &'static str>>>,
    /// The zero of the sampler's clock.
    pub epoch: Instant,
    /// The address migration streams are received on: the agent's own, the one it
    /// serves its API on. Loopback until [`AppState::with_stream_ip`] says otherwise,
    /// so nothing listens beyond the host unless asked to.
    pub stream_ip: std::net::IpAddr,
    /// With a host identity: how this agent calls other agents (mutual TLS). Requests
    /// to it are then authenticated by their client certificate, not a bearer token.
    pub tls: Option<rustls::ClientConfig>,
    /// With a host identity: how this agent receives migration streams (mutual TLS,
    /// clients with a certificate from the cluster CA only). `None`: plain TCP.
    pub stream_tls: Option<Arc<rustls::ServerConfig>>,
    /// The vCPU scheduling policies of this host's VMs.
    pub vcpu: Arc<crate::vcpu::Policies>,
    /// Where VM disks are made (see `docs/storage.md`); `None`: VMs with disks are
    /// refused.
    pub store: Option<tern_hv::disk::Store>,
    /// Where catalogue image files missing from the store are copied from.
    pub images: crate::images::ImageSource,
    /// Where VM local disks are made (`--local-store`); `None`: local disks are refused.
    pub local_store: Option<tern_hv::disk::Store>,
    /// How running guests are watched, and what was last seen of each.
    pub watch: crate::watch::WatchConfig,
    pub watches: Arc<Mutex<crate::watch::Watches>>,
    /// The host identity's directory (`ca.pem`, `cert.pem`, `key.pem`): QEMU is given
    /// copies to guard the NBD link that moves local disks. `None`: local disks do not
    /// move.
    pub identity_dir: Option<std::path::PathBuf>,
}

impl AppState {
    pub fn new(hv: Arc<dyn Hypervisor>, host: HostConfig) -> AppState {
        AppState {
            hv,
            host: Arc::new(host),
            load: Arc::default(),
            guests: Arc::default(),
            admission: Arc::default(),
            migrations: Arc::default(),
            lifecycle: Arc::default(),
            busy: Arc::default(),
            epoch: Instant::now(),
            stream_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            tls: None,
            stream_tls: None,
            vcpu: Arc::default(),
            store: None,
            images: Default::default(),
            local_store: None,
            watch: Default::default(),
            watches: Arc::default(),
            identity_dir: None,
        }
    }

    /// Watches guests with `cfg` instead of the defaults.
    pub fn with_guest_watch(mut self, cfg: crate::watch::WatchConfig) -> AppState {
        self.watch = cfg;
        self
    }

    /// Makes local disks in `store` (the driver must open them from the same store).
    pub fn with_local_store(mut self, store: tern_hv::disk::Store) -> AppState {
        self.local_store = Some(store);
        self
    }

    /// The host identity in `dir` may be handed to QEMU for moving local disks.
    pub fn with_identity_dir(mut self, dir: std::path::PathBuf) -> AppState {
        self.identity_dir = Some(dir);
        self
    }

    /// The host's disk stores.
    pub fn stores(&self) -> tern_hv::disk::Stores<'_> {
        tern_hv::disk::Stores {
            shared: self.store.as_ref(),
            local: self.local_store.as_ref(),
        }
    }

    /// Makes VM disks in `store` (the driver must open them from the same store).
    pub fn with_store(mut self, store: tern_hv::disk::Store) -> AppState {
        self.store = Some(store);
        self
    }

    /// Copies catalogue image files missing from the store from these managers.
    pub fn with_image_source(mut self, managers: Vec<tern_api::client::ManagerClient>) -> AppState {
        self.images = crate::images::ImageSource { managers };
        self
    }

    /// Receives migration streams on `ip`, the address the agent serves on.
    pub fn with_stream_ip(mut self, ip: std::net::IpAddr) -> AppState {
        self.stream_ip = ip;
        self
    }

    /// Refuses `action` on a VM that takes part in a migration here: pausing, stopping or
    /// destroying it under the engine would leave the two copies disagreeing.
    /// A long lifecycle action under way on it is refused the same way.
    pub fn refuse_if_migrating(&self, id: &str, action: &'static str) -> Result<(), AgentError> {
        if self.migrations.busy(id) {
            return Err(AgentError::Migrating {
                vm: id.to_owned(),
                action,
            });
        }
        self.refuse_if_busy(id, action)
    }

    /// Refuses `action` on a VM a long lifecycle action is under way on.
    pub fn refuse_if_busy(&self, id: &str, action: &'static str) -> Result<(), AgentError> {
        match self.busy.lock().expect("busy table lock").get(id) {
            Some(doing) => Err(AgentError::Busy {
                vm: id.to_owned(),
                action,
                doing,
            }),
            None => Ok(()),
        }
    }

    /// Marks VM `id` busy with the long action `action` until the guard is dropped,
    /// after the checks every lifecycle action passes.
    pub async fn begin_long(
        &self,
        id: &str,
        action: &'static str,
    ) -> Result<BusyGuard, AgentError> {
        let _gate = self.lifecycle.lock().await;
        self.refuse_if_migrating(id, action)?;
        self.busy
            .lock()
            .expect("busy table lock")
            .insert(id.to_owned(), action);
        Ok(BusyGuard {
            busy: self.busy.clone(),
            id: id.to_owned(),
        })
    }

    /// The agent with a host identity: it serves mutual TLS (see
    /// `server::Serving`) and calls other agents with `client`.
    pub fn with_tls(mut self, client: rustls::ClientConfig) -> Self {
        self.tls = Some(client);
        self
    }

    /// Receives migration streams over mutual TLS with `server` (see
    /// `migration::secure`); the source side uses [`AppState::with_tls`]'s client.
    pub fn with_stream_tls(mut self, server: Arc<rustls::ServerConfig>) -> Self {
        self.stream_tls = Some(server);
        self
    }

    /// Where the record of VM `id` is kept.
    pub fn vm_record(&self, id: &str) -> PathBuf {
        self.host.state_dir.join("vms").join(format!("{id}.json"))
    }
}

/// A VM marked busy by [`AppState::begin_long`]; dropping it ends the mark.
pub struct BusyGuard {
    busy: Arc<Mutex<HashMap<String, &'static str>>>,
    id: String,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.busy.lock().expect("busy table lock").remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t");
        tern_pki::files::write_private(&p, b"  abc \nignored\n").unwrap();
        assert_eq!(read_token(&p).unwrap(), "abc");
        tern_pki::files::write_private(&p, b"\n").unwrap();
        assert_eq!(read_token(&p).unwrap_err().status().as_u16(), 400);
        assert!(read_token(&d.path().join("none")).is_err());
    }

    #[test]
    fn load_table_rates() {
        let mut t = LoadTable::default();
        assert_eq!(t.record("a", 0, 0), 0.0, "first sample has no rate");
        assert_eq!(t.record("a", 1_000, 2_000), 0.5);
        assert_eq!(t.cores("a"), Some(0.5));
        t.retain(|k| k != "a");
        assert_eq!(t.cores("a"), None);
    }
}
