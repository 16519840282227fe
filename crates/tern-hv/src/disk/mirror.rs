//! Local disks moving with a live migration (see `docs/storage.md`, "Local disks"): the
//! destination QEMU exports new, empty overlays over NBD, guarded by TLS with the
//! cluster CA, and the source QEMU mirrors its disks into them.
//!
//! ```text
//!  source QEMU                                      destination QEMU (-incoming defer)
//!  diskN ─blockdev-mirror─► nbd client node ══TLS══► NBD server ─► export ─► diskN
//!  (sync=top over an image: only the overlay's own data travels)
//! ```
//!
//! Everything here is pure: the QMP commands and their arguments, and what the answers
//! of `query-jobs` mean. The agent's migration code runs them through
//! [`crate::Hypervisor::disk_qmp`], which refuses any command not in [`COMMANDS`].

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::{DiskSpec, DiskStore};

/// The QMP commands the disk mirror needs, and all [`crate::Hypervisor::disk_qmp`] runs.
pub const COMMANDS: &[&str] = &[
    "object-add",
    "object-del",
    "nbd-server-start",
    "nbd-server-stop",
    "block-export-add",
    "blockdev-add",
    "blockdev-del",
    "blockdev-mirror",
    "block-job-cancel",
    "job-dismiss",
    "query-jobs",
];

/// How long the source waits for its mirrors to catch up before the memory streams
/// start; the destination waits as long (and its usual window) for those streams.
pub const READY_TIMEOUT: Duration = Duration::from_secs(600);
/// How long, inside the pause, the last writes may take to reach the destination.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(30);

/// A disk of the VM that lives in the local store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDisk {
    /// Its place in the spec: QEMU's node is `disk{index}` (see `qemu::args`).
    pub index: usize,
    pub name: String,
    /// An overlay on an image (which the destination has too): only the overlay's own
    /// clusters are copied (`sync=top`).
    pub on_image: bool,
}

impl LocalDisk {
    /// QEMU's qcow2 node of the disk, on both hosts.
    pub fn node(&self) -> String {
        format!("disk{}", self.index)
    }

    /// The source's NBD client node the mirror writes to, the mirror job's id and the
    /// destination's export id. A VM migrates once at a time, and QEMU's node names
    /// are at most 31 bytes, so the index alone tells them apart.
    pub fn target(&self) -> String {
        format!("tern-mirror{}", self.index)
    }
}

/// The local disks of a VM, in spec order.
pub fn local_disks(disks: &[DiskSpec]) -> Vec<LocalDisk> {
    disks
        .iter()
        .enumerate()
        .filter(|(_, d)| d.store == DiskStore::Local)
        .map(|(index, d)| LocalDisk {
            index,
            name: d.name.clone(),
            on_image: d.image.is_some(),
        })
        .collect()
}

/// Which end of the NBD link a QEMU TLS credential is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Server,
    Client,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        }
    }

    /// The files QEMU reads in a credential directory: the CA, the certificate and
    /// the key, under the names QEMU expects for this end.
    pub fn file_names(self) -> [String; 3] {
        let e = self.as_str();
        [
            "ca-cert.pem".into(),
            format!("{e}-cert.pem"),
            format!("{e}-key.pem"),
        ]
    }
}

/// The QEMU object id of the TLS credential of migration `migration`.
pub fn tls_id(migration: &str) -> String {
    format!("tern-{migration}-tls")
}

/// The QEMU object id of the destination's peer check of migration `migration`.
pub fn authz_id(migration: &str) -> String {
    format!("tern-{migration}-authz")
}

/// `object-add` of a TLS credential from the files in `dir` (QEMU reads them at once;
/// the directory may go right after). Both ends check the other's certificate against
/// the cluster CA.
pub fn tls_creds(id: &str, dir: &Path, endpoint: Endpoint) -> Value {
    json!({
        "qom-type": "tls-creds-x509",
        "id": id,
        "dir": dir.display().to_string(),
        "endpoint": endpoint.as_str(),
        "verify-peer": true,
    })
}

/// `object-add` of the check that only host `source`'s certificate may open the
/// export: its subject as QEMU (GnuTLS) writes it, `CN=NAME,OU=host`. A name with
/// characters the subject would escape is refused rather than matched loosely.
pub fn authz(id: &str, source: &str) -> Result<Value, String> {
    let plain = !source.is_empty()
        && source
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !plain {
        return Err(format!(
            "host name {source:?} cannot be matched in a certificate subject: local disks move only between hosts named with letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(json!({
        "qom-type": "authz-simple",
        "id": id,
        "identity": format!("CN={source},OU=host"),
    }))
}

/// `nbd-server-start` on `host:port`, TLS only, for the peer `authz` lets in.
pub fn nbd_server_start(host: IpAddr, port: u16, tls: &str, authz: &str) -> Value {
    json!({
        "addr": {"type": "inet", "data": {"host": host.to_string(), "port": port.to_string()}},
        "tls-creds": tls,
        "tls-authz": authz,
    })
}

/// `block-export-add`: the destination's overlay of `disk`, writable, named as the disk.
pub fn export_add(disk: &LocalDisk) -> Value {
    json!({
        "type": "nbd",
        "id": disk.target(),
        "node-name": disk.node(),
        "name": disk.name,
        "writable": true,
    })
}

/// `blockdev-add` on the source: an NBD client node for `disk`'s export on the
/// destination `host:port`, over TLS (QEMU checks the server's certificate names
/// `host`).
pub fn nbd_client(disk: &LocalDisk, host: &str, port: u16, tls: &str) -> Value {
    json!({
        "driver": "nbd",
        "node-name": disk.target(),
        "server": {"type": "inet", "host": host, "port": port.to_string()},
        "export": disk.name,
        "tls-creds": tls,
    })
}

/// `blockdev-mirror` of `disk` into its NBD node. Over an image only the overlay's own
/// clusters go (`sync=top`; the destination's overlay sits on the same image); a blank
/// disk goes whole, its unwritten stretches as NBD write-zeroes requests rather than
/// data. Not `target-is-zero`: QEMU before 10.1 refuses the whole command for it. The
/// job stays listed when it ends (`auto-dismiss` off), so its error can be read.
pub fn mirror(disk: &LocalDisk) -> Value {
    let id = disk.target();
    json!({
        "job-id": id,
        "device": disk.node(),
        "target": id,
        "sync": if disk.on_image { "top" } else { "full" },
        "auto-dismiss": false,
    })
}

/// `block-job-cancel` of a ready mirror: QEMU copies what is still dirty and ends the
/// job with the target equal to the source, which keeps running on its own disk (no
/// pivot). `force` drops a job that is not wanted any more (a rollback).
pub fn cancel(disk: &LocalDisk, force: bool) -> Value {
    json!({"device": disk.target(), "force": force})
}

/// One job of `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub id: String,
    pub status: String,
    pub current: u64,
    pub total: u64,
    pub error: Option<String>,
}

/// Reads `query-jobs`' answer.
pub fn parse_jobs(v: &Value) -> Vec<Job> {
    v.as_array()
        .map(|jobs| {
            jobs.iter()
                .map(|j| Job {
                    id: j["id"].as_str().unwrap_or_default().to_string(),
                    status: j["status"].as_str().unwrap_or_default().to_string(),
                    current: j["current-progress"].as_u64().unwrap_or(0),
                    total: j["total-progress"].as_u64().unwrap_or(0),
                    error: j["error"].as_str().map(str::to_string),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Where the mirrors of a migration stand, from `query-jobs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrors {
    pub copied: u64,
    pub total: u64,
    /// Every job mirrors each write as it happens.
    pub ready: bool,
    /// Every job ended without an error (after [`cancel`]).
    pub concluded: bool,
}

/// Sums the jobs of `wanted` (pure); a job that failed, or is gone while it should
/// run, is the error.
pub fn mirrors(jobs: &[Job], wanted: &[String]) -> Result<Mirrors, String> {
    let mut m = Mirrors {
        copied: 0,
        total: 0,
        ready: true,
        concluded: true,
    };
    for id in wanted {
        let Some(j) = jobs.iter().find(|j| &j.id == id) else {
            return Err(format!("mirror job {id} is gone"));
        };
        if let Some(e) = &j.error {
            return Err(format!("mirror job {id} failed: {e}"));
        }
        if matches!(j.status.as_str(), "aborting" | "null") {
            return Err(format!("mirror job {id} is {}", j.status));
        }
        m.copied += j.current;
        m.total += j.total;
        m.ready &= j.status == "ready";
        m.concluded &= j.status == "concluded";
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskBus;

    fn disk(name: &str, image: bool, store: DiskStore) -> DiskSpec {
        DiskSpec {
            name: name.into(),
            size_mib: Some(16),
            image: image.then(|| "base.qcow2".to_string()),
            bus: DiskBus::VirtioBlk,
            store,
        }
    }

    #[test]
    fn only_local_disks_move_and_keep_their_node_index() {
        let d = [
            disk("root", true, DiskStore::Shared),
            disk("data", false, DiskStore::Local),
            disk("os", true, DiskStore::Local),
        ];
        let l = local_disks(&d);
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].node(), l[0].on_image), ("disk1".to_string(), false));
        assert_eq!((l[1].node(), l[1].on_image), ("disk2".to_string(), true));
        assert_eq!(l[1].target(), "tern-mirror2");
    }

    #[test]
    fn the_mirror_copies_only_the_overlay_over_an_image_and_keeps_its_job() {
        let l = local_disks(&[
            disk("os", true, DiskStore::Local),
            disk("data", false, DiskStore::Local),
        ]);
        let over = mirror(&l[0]);
        assert_eq!(over["sync"], "top");
        assert_eq!(over["device"], "disk0");
        assert_eq!(over["target"], "tern-mirror0");
        assert_eq!(over["auto-dismiss"], false);
        assert!(over.get("target-is-zero").is_none());
        let blank = mirror(&l[1]);
        assert_eq!(blank["sync"], "full");
        // QEMU 7.2 (Debian 12) refuses blockdev-mirror with target-is-zero.
        assert!(blank.get("target-is-zero").is_none());
        assert_eq!(cancel(&l[0], false)["force"], false);
    }

    #[test]
    fn the_export_is_tls_only_for_the_source_host() {
        let s = nbd_server_start("198.18.0.2".parse().unwrap(), 4000, "t", "a");
        assert_eq!(s["addr"]["data"]["port"], "4000");
        assert_eq!(
            (s["tls-creds"].as_str(), s["tls-authz"].as_str()),
            (Some("t"), Some("a"))
        );
        let a = authz("a", "h1").unwrap();
        assert_eq!(a["identity"], "CN=h1,OU=host");
        for bad in ["", "h,1", "h=1", "h 1", "OU=host,CN=h1"] {
            assert!(authz("a", bad).is_err(), "{bad:?}");
        }
        let c = tls_creds("t", Path::new("/d"), Endpoint::Server);
        assert_eq!(
            (c["endpoint"].as_str(), c["verify-peer"].as_bool()),
            (Some("server"), Some(true))
        );
        assert_eq!(Endpoint::Client.file_names()[2], "client-key.pem");
        let l = &local_disks(&[disk("os", true, DiskStore::Local)])[0];
        let e = export_add(l);
        assert_eq!(
            (e["node-name"].as_str(), e["writable"].as_bool()),
            (Some("disk0"), Some(true))
        );
        let n = nbd_client(l, "198.18.0.3", 4000, "t");
        assert_eq!(n["export"], "os");
        assert_eq!(n["tls-creds"], "t");
        assert_eq!(n["server"]["port"], "4000");
    }

    #[test]
    fn jobs_sum_and_a_failed_or_missing_one_is_an_error() {
        let v = json!([
            {"id": "a", "type": "mirror", "status": "ready", "current-progress": 10, "total-progress": 10},
            {"id": "b", "type": "mirror", "status": "running", "current-progress": 5, "total-progress": 20},
            {"id": "c", "type": "mirror", "status": "concluded", "current-progress": 1, "total-progress": 1, "error": "Input/output error"},
            {"id": "d", "type": "mirror", "status": "concluded", "current-progress": 3, "total-progress": 3},
        ]);
        let jobs = parse_jobs(&v);
        let m = mirrors(&jobs, &["a".into(), "b".into()]).unwrap();
        assert_eq!(
            (m.copied, m.total, m.ready, m.concluded),
            (15, 30, false, false)
        );
        assert!(mirrors(&jobs, &["a".into()]).unwrap().ready);
        assert!(mirrors(&jobs, &["d".into()]).unwrap().concluded);
        assert!(mirrors(&jobs, &["c".into()])
            .unwrap_err()
            .contains("Input/output"));
        assert!(mirrors(&jobs, &["x".into()]).unwrap_err().contains("gone"));
        assert!(parse_jobs(&json!({})).is_empty());
    }
}
