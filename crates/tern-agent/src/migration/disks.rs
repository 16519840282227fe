//! Local disks moving with a migration (the QMP side is `tern_hv::disk::mirror`): the
//! destination's TLS-only NBD export of its new overlays, and the source's block
//! mirror into it.
//!
//! ```text
//!  prepare: destination makes empty overlays, exports them (NBD, TLS, only the source's
//!           certificate let in); source adds NBD nodes and starts blockdev-mirror
//!  before the memory streams: source waits until every mirror is ready
//!  in the pause: source ends the mirrors (the last writes go), drops the NBD nodes
//!  resume: destination stops its NBD server, then runs the guest
//! ```
//!
//! QEMU reads its TLS credentials from a directory with its own file names; each end
//! copies the host identity there (private to the agent's user), has QEMU load it, and
//! removes the copy again.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_api::migration::DiskCopyProgress;
use tern_hv::disk::mirror::{self, Endpoint, LocalDisk, Mirrors};

use super::MigrationError;
use crate::state::AppState;

/// How often the mirrors are polled while they catch up.
const POLL_READY: Duration = Duration::from_millis(100);
/// How often inside the pause: every millisecond there is downtime.
const POLL_FINISH: Duration = Duration::from_millis(2);
/// How long a rollback waits for cancelled mirrors to end before it goes on: the
/// source's guest may be paused until the rollback is through.
const ABANDON_WAIT: Duration = Duration::from_secs(5);
/// Tries at a free port for the NBD server (QEMU binds it itself).
const PORT_TRIES: usize = 5;

fn err(step: &str) -> impl FnOnce(tern_hv::HvError) -> MigrationError + '_ {
    move |e| MigrationError::Disks(format!("{step}: {e}"))
}

/// Copies the host identity in `identity` into a new directory `dir` under the names
/// QEMU expects for `endpoint` (and the revocation list, when there is one, so a
/// revoked host is refused here too).
fn write_creds(identity: &Path, dir: &Path, endpoint: Endpoint) -> Result<(), MigrationError> {
    let io = |e: std::io::Error| MigrationError::Disks(format!("QEMU's TLS credentials: {e}"));
    let _ = std::fs::remove_dir_all(dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let files = tern_pki::identity::IdentityFiles::in_dir(identity);
    let [ca, cert, key] = endpoint.file_names();
    let mut copies = vec![(files.ca, ca), (files.cert, cert), (files.key, key)];
    if files.crl.is_file() {
        copies.push((files.crl, "ca-crl.pem".into()));
    }
    for (from, to) in copies {
        let bytes = std::fs::read(&from).map_err(io)?;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(to))
            .map_err(io)?;
        std::io::Write::write_all(&mut f, &bytes).map_err(io)?;
    }
    Ok(())
}

/// Has the QEMU of `vm` load a TLS credential for `endpoint` from the host identity.
async fn add_creds(
    state: &AppState,
    vm: &str,
    migration: &str,
    endpoint: Endpoint,
) -> Result<(), MigrationError> {
    let identity = state.identity_dir.as_ref().ok_or_else(|| {
        MigrationError::Disks(
            "local disks move only between agents with a host identity (--tls-dir): the NBD link is guarded by TLS from the cluster CA"
                .into(),
        )
    })?;
    let dir = creds_dir(&state.host.state_dir, migration);
    write_creds(identity, &dir, endpoint)?;
    let added = state
        .hv
        .disk_qmp(
            vm,
            "object-add",
            Some(mirror::tls_creds(
                &mirror::tls_id(migration),
                &dir,
                endpoint,
            )),
        )
        .await;
    // QEMU read the files when it made the object: the copy of the key goes at once.
    let _ = std::fs::remove_dir_all(&dir);
    added
        .map(drop)
        .map_err(err("loading QEMU's TLS credentials"))
}

fn creds_dir(state_dir: &Path, migration: &str) -> PathBuf {
    state_dir.join("migration").join(format!("{migration}.tls"))
}

/// A port on `ip` nobody listens on right now, for QEMU to bind.
fn free_port(ip: std::net::IpAddr) -> Result<u16, MigrationError> {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| MigrationError::Disks(format!("finding a port for the NBD server: {e}")))
}

/// Destination: exports the local disks' new overlays of `vm` over NBD on the agent's
/// stream address, TLS only, for host `source` alone. Returns the port. On error the
/// caller destroys the VM (and with it the overlays and anything QEMU holds).
pub async fn export(
    state: &AppState,
    vm: &str,
    migration: &str,
    disks: &[LocalDisk],
    source: Option<&str>,
) -> Result<u16, MigrationError> {
    let source = source.ok_or_else(|| {
        MigrationError::Disks(
            "local disks move only between agents with host identities: the request carried no host certificate".into(),
        )
    })?;
    let authz =
        mirror::authz(&mirror::authz_id(migration), source).map_err(MigrationError::Disks)?;
    add_creds(state, vm, migration, Endpoint::Server).await?;
    state
        .hv
        .disk_qmp(vm, "object-add", Some(authz))
        .await
        .map_err(err("adding the NBD peer check"))?;
    let (tls, authz) = (mirror::tls_id(migration), mirror::authz_id(migration));
    // QEMU binds the port itself: one that was free a moment ago is taken by someone
    // else only rarely, and then the next one is tried.
    let mut last = None;
    let mut port = 0;
    for _ in 0..PORT_TRIES {
        port = free_port(state.stream_ip)?;
        let args = mirror::nbd_server_start(state.stream_ip, port, &tls, &authz);
        match state.hv.disk_qmp(vm, "nbd-server-start", Some(args)).await {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        return Err(err("starting the NBD server")(e));
    }
    for d in disks {
        state
            .hv
            .disk_qmp(vm, "block-export-add", Some(mirror::export_add(d)))
            .await
            .map_err(err("exporting a local disk"))?;
    }
    Ok(port)
}

/// Destination, before the guest runs: the NBD server and its exports go, and with
/// them the source's connections.
pub async fn unexport(state: &AppState, vm: &str, migration: &str) -> Result<(), MigrationError> {
    state
        .hv
        .disk_qmp(vm, "nbd-server-stop", None)
        .await
        .map_err(err("stopping the NBD server"))?;
    for id in [mirror::tls_id(migration), mirror::authz_id(migration)] {
        let _ = state
            .hv
            .disk_qmp(vm, "object-del", Some(serde_json::json!({ "id": id })))
            .await;
    }
    Ok(())
}

/// Source: the block mirrors of one migration's local disks.
pub struct Mirror {
    migration: String,
    disks: Vec<LocalDisk>,
    /// NBD client nodes added (and so to delete), by disk.
    nodes: usize,
    /// Mirror jobs started, by disk.
    jobs: usize,
    creds: bool,
    /// The jobs ended cleanly inside the pause; nothing is left to cancel.
    finished: bool,
}

impl Mirror {
    pub fn new(migration: &str, disks: Vec<LocalDisk>) -> Mirror {
        Mirror {
            migration: migration.to_string(),
            disks,
            nodes: 0,
            jobs: 0,
            creds: false,
            finished: false,
        }
    }

    fn job_ids(&self) -> Vec<String> {
        self.disks.iter().map(LocalDisk::target).collect()
    }

    /// Connects to the destination's exports at `host:port` and starts a mirror per
    /// disk. What was made is remembered for [`Mirror::abandon`].
    pub async fn start(
        &mut self,
        state: &AppState,
        vm: &str,
        host: &str,
        port: u16,
    ) -> Result<(), MigrationError> {
        add_creds(state, vm, &self.migration, Endpoint::Client).await?;
        self.creds = true;
        let tls = mirror::tls_id(&self.migration);
        for d in &self.disks {
            let node = mirror::nbd_client(d, host, port, &tls);
            state
                .hv
                .disk_qmp(vm, "blockdev-add", Some(node))
                .await
                .map_err(err("connecting to the destination's disk export"))?;
            self.nodes += 1;
        }
        for d in &self.disks {
            state
                .hv
                .disk_qmp(vm, "blockdev-mirror", Some(mirror::mirror(d)))
                .await
                .map_err(err("starting the block mirror"))?;
            self.jobs += 1;
        }
        Ok(())
    }

    async fn poll(&self, state: &AppState, vm: &str) -> Result<Mirrors, MigrationError> {
        let v: Value = state
            .hv
            .disk_qmp(vm, "query-jobs", None)
            .await
            .map_err(err("querying the block mirror"))?;
        mirror::mirrors(&mirror::parse_jobs(&v), &self.job_ids()).map_err(MigrationError::Disks)
    }

    /// Waits, at most `within`, until every mirror has caught up and mirrors each write
    /// as it happens; `progress` sees each poll, `cancelled` ends the wait.
    pub async fn wait_ready(
        &self,
        state: &AppState,
        vm: &str,
        within: Duration,
        progress: &(dyn Fn(DiskCopyProgress) + Sync),
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), MigrationError> {
        let deadline = Instant::now() + within;
        loop {
            let m = self.poll(state, vm).await?;
            progress(view(&m));
            if m.ready {
                return Ok(());
            }
            if cancelled() {
                return Err(MigrationError::Cancelled);
            }
            if Instant::now() > deadline {
                return Err(MigrationError::Disks(format!(
                    "the block mirror did not catch up within {within:?} ({} of {} bytes copied)",
                    m.copied, m.total
                )));
            }
            tokio::time::sleep(POLL_READY).await;
        }
    }

    /// Inside the pause: ends every mirror once the last writes reached the destination
    /// (the source keeps its own disks), and drops the NBD nodes, which flushes them.
    pub async fn finish(
        &mut self,
        state: &AppState,
        vm: &str,
        within: Duration,
    ) -> Result<DiskCopyProgress, MigrationError> {
        for d in &self.disks {
            state
                .hv
                .disk_qmp(vm, "block-job-cancel", Some(mirror::cancel(d, false)))
                .await
                .map_err(err("completing the block mirror"))?;
        }
        let deadline = Instant::now() + within;
        let m = loop {
            let m = self.poll(state, vm).await?;
            if m.concluded {
                break m;
            }
            if Instant::now() > deadline {
                return Err(MigrationError::Disks(format!(
                    "the block mirror did not complete within {within:?} of the pause"
                )));
            }
            tokio::time::sleep(POLL_FINISH).await;
        };
        self.finished = true;
        self.dismiss_and_drop(state, vm).await?;
        // Concluded after a cancel of ready jobs: the copy is whole.
        Ok(DiskCopyProgress {
            ready: true,
            ..view(&m)
        })
    }

    async fn dismiss_and_drop(&mut self, state: &AppState, vm: &str) -> Result<(), MigrationError> {
        let mut first = None;
        for id in self.job_ids().into_iter().take(self.jobs) {
            let r = state
                .hv
                .disk_qmp(vm, "job-dismiss", Some(serde_json::json!({ "id": id })))
                .await;
            first = first.or(r.err());
        }
        self.jobs = 0;
        for id in self.job_ids().into_iter().take(self.nodes) {
            let r = state
                .hv
                .disk_qmp(
                    vm,
                    "blockdev-del",
                    Some(serde_json::json!({ "node-name": id })),
                )
                .await;
            first = first.or(r.err());
        }
        self.nodes = 0;
        if std::mem::take(&mut self.creds) {
            let id = mirror::tls_id(&self.migration);
            let _ = state
                .hv
                .disk_qmp(vm, "object-del", Some(serde_json::json!({ "id": id })))
                .await;
        }
        match first {
            Some(e) if self.finished => Err(err("closing the link to the destination's disks")(e)),
            _ => Ok(()),
        }
    }

    /// Whether none of jobs `ids` is still running (QEMU unreachable counts as ended).
    async fn ended(&self, state: &AppState, vm: &str, ids: &[String]) -> bool {
        let v = state.hv.disk_qmp(vm, "query-jobs", None).await;
        let jobs = v.map(|v| mirror::parse_jobs(&v)).unwrap_or_default();
        !jobs
            .iter()
            .any(|j| ids.contains(&j.id) && j.status != "concluded")
    }

    /// Rollback: stops the mirrors without waiting for them and lets go of the
    /// destination. The source never stopped using its own disks.
    pub async fn abandon(&mut self, state: &AppState, vm: &str) {
        for d in self.disks.iter().take(self.jobs) {
            let _ = state
                .hv
                .disk_qmp(vm, "block-job-cancel", Some(mirror::cancel(d, true)))
                .await;
        }
        // A forced cancel ends the job at once or after its requests in flight; the job
        // can be dismissed only once it concluded.
        let deadline = Instant::now() + ABANDON_WAIT;
        let ids = self.job_ids();
        while self.jobs > 0 && !self.ended(state, vm, &ids).await {
            if Instant::now() > deadline {
                // A target that stopped answering (a cut link) holds the job until QEMU's
                // NBD client gives up; the guest runs on regardless.
                tracing::warn!(
                    vm,
                    "a cancelled block mirror has not ended; its NBD node stays until it does"
                );
                break;
            }
            tokio::time::sleep(POLL_READY).await;
        }
        self.finished = false;
        let _ = self.dismiss_and_drop(state, vm).await;
    }
}

fn view(m: &Mirrors) -> DiskCopyProgress {
    DiskCopyProgress {
        copied_bytes: m.copied,
        total_bytes: m.total,
        ready: m.ready,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creds_are_a_private_copy_under_qemus_names() {
        let d = tempfile::tempdir().unwrap();
        let id = d.path().join("tls");
        std::fs::create_dir(&id).unwrap();
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(id.join(f), f).unwrap();
        }
        let out = creds_dir(d.path(), "in-1");
        write_creds(&id, &out, Endpoint::Server).unwrap();
        let dir_mode = std::fs::metadata(&out).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(
            std::fs::read_to_string(out.join("server-key.pem")).unwrap(),
            "key.pem"
        );
        assert_eq!(
            std::fs::read_to_string(out.join("ca-cert.pem")).unwrap(),
            "ca.pem"
        );
        let key_mode = std::fs::metadata(out.join("server-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);
        assert!(!out.join("ca-crl.pem").exists());
        // Made again from scratch (a left-over directory of the same name is replaced),
        // now with a revocation list.
        std::fs::write(id.join("crl.pem"), "crl").unwrap();
        write_creds(&id, &out, Endpoint::Client).unwrap();
        assert!(out.join("client-cert.pem").is_file() && !out.join("server-cert.pem").exists());
        assert_eq!(
            std::fs::read_to_string(out.join("ca-crl.pem")).unwrap(),
            "crl"
        );
    }
}
