//! A suspended VM's saved state in the disk store, beside its disks:
//!
//! ```text
//! STORE/vms/VM/suspend/memory          guest RAM (sparse: untouched memory is a hole)
//! STORE/vms/VM/suspend/device-state    QEMU's CPU and device state (its migration stream)
//! STORE/vms/VM/suspend/spec.json       the VM spec the state belongs to
//! STORE/vms/VM/suspend/host            the host that suspended it
//! ```
//!
//! The directory only ever appears whole: a suspend writes `suspend.partial/` and
//! renames it to `suspend/` once every file is synced, so a crash leaves a partial
//! directory no restore takes for a saved state. A restore first renames `suspend/` to
//! `restoring.HOST/` (its claim): a rename succeeds for one host only, so two hosts
//! sharing the store never both run the guest from one saved state. A failed restore
//! renames the claim back; a successful one removes it once the guest runs.

use crate::spec::VmSpec;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::disk::Store;

/// The name of a complete saved state in a VM's store directory.
pub const SAVED_DIR: &str = "suspend";
/// Where a suspend writes before the state is complete.
const PARTIAL_DIR: &str = "suspend.partial";
pub const MEMORY_FILE: &str = "memory";
pub const DEVICE_STATE_FILE: &str = "device-state";
pub const SPEC_FILE: &str = "spec.json";
pub const HOST_FILE: &str = "host";

/// Copy buffer for memory files.
const COPY_BUFFER: usize = 1 << 20;

/// Saving or loading a VM's saved state failed.
#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    /// No saved state to restore (or to delete with the VM).
    #[error("VM {vm:?} has no saved state in the store ({}): it was not suspended, was restored already, or another host is restoring it", dir.display())]
    NotSaved { vm: String, dir: PathBuf },
    /// A suspend would overwrite a saved state.
    #[error("VM {vm:?} has a saved state in the store already ({}): restore it or delete the VM", dir.display())]
    Exists { vm: String, dir: PathBuf },
    /// The saved spec cannot be read.
    #[error("saved VM spec {}: {why}", path.display())]
    BadSpec { path: PathBuf, why: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl SavedError {
    /// True when the request clashes with what the store holds (answered 409).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            SavedError::NotSaved { .. } | SavedError::Exists { .. }
        )
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SavedError {
    let context = context.into();
    move |source| SavedError::Io { context, source }
}

impl Store {
    /// The complete saved state of VM `vm`, when it was suspended.
    pub fn saved_dir(&self, vm: &str) -> PathBuf {
        self.vm_dir(vm).join(SAVED_DIR)
    }

    /// True when VM `vm` has a complete saved state nobody claimed.
    pub fn has_saved_state(&self, vm: &str) -> bool {
        self.saved_dir(vm).join(SPEC_FILE).is_file()
    }
}

/// A saved state being written; [`Writing::commit`] makes it the VM's saved state.
#[derive(Debug)]
pub struct Writing {
    dir: PathBuf,
    vm_dir: PathBuf,
}

/// Starts writing VM `vm`'s saved state; refused when it has one. A partial directory
/// left by an earlier suspend that failed or crashed is removed.
pub fn begin(store: &Store, vm: &str) -> Result<Writing, SavedError> {
    let vm_dir = store.vm_dir(vm);
    let saved = store.saved_dir(vm);
    if saved.exists() {
        return Err(SavedError::Exists {
            vm: vm.into(),
            dir: saved,
        });
    }
    let dir = vm_dir.join(PARTIAL_DIR);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    Ok(Writing { dir, vm_dir })
}

impl Writing {
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    pub fn device_state_path(&self) -> PathBuf {
        self.dir.join(DEVICE_STATE_FILE)
    }

    /// Records the spec the state belongs to and the host that saved it.
    pub fn write_spec(&self, spec: &VmSpec, host: &str) -> Result<(), SavedError> {
        let path = self.dir.join(SPEC_FILE);
        let text = serde_json::to_vec_pretty(spec).expect("a spec serialises");
        write_synced(&path, &text)?;
        write_synced(&self.dir.join(HOST_FILE), host.as_bytes())
    }

    /// Syncs every file and renames the directory to the saved state: from here a
    /// restore finds it whole.
    pub fn commit(self) -> Result<PathBuf, SavedError> {
        for name in [MEMORY_FILE, DEVICE_STATE_FILE, SPEC_FILE, HOST_FILE] {
            sync_file(&self.dir.join(name))?;
        }
        sync_file(&self.dir)?;
        let saved = self.vm_dir.join(SAVED_DIR);
        std::fs::rename(&self.dir, &saved).map_err(io(format!(
            "renaming {} to {}",
            self.dir.display(),
            saved.display()
        )))?;
        sync_file(&self.vm_dir)?;
        Ok(saved)
    }

    /// Removes what was written.
    pub fn abandon(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A saved state one host took (to restore it, or to delete it with the VM).
#[derive(Debug)]
pub struct Claimed {
    dir: PathBuf,
    vm_dir: PathBuf,
    vm: String,
}

/// The name of `who`'s claim: `restoring.WHO`, with anything but letters, digits, `-`
/// and `_` in `who` replaced, so it stays one file name.
fn claim_name(who: &str) -> String {
    let who: String = who
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("restoring.{who}")
}

/// Takes VM `vm`'s saved state for `who` (a host name): renames it out of the way of
/// every other claimer. A claim of `who`'s own left by a crash is taken again.
pub fn claim(store: &Store, vm: &str, who: &str) -> Result<Claimed, SavedError> {
    let vm_dir = store.vm_dir(vm);
    let dir = vm_dir.join(claim_name(who));
    let saved = store.saved_dir(vm);
    if saved.exists() && dir.exists() {
        // A claim of ours that outlived its restore (the agent stopped between the guest
        // running and the claim's removal): the VM was suspended again since, so the
        // state in `suspend/` is the newer one.
        tracing::warn!(vm, dir = %dir.display(), "removing a stale claim of this host");
        std::fs::remove_dir_all(&dir).map_err(io(format!("removing {}", dir.display())))?;
    }
    match std::fs::rename(&saved, &dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.join(SPEC_FILE).is_file() => {
            tracing::warn!(vm, dir = %dir.display(), "taking up a restore this host left unfinished");
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SavedError::NotSaved {
                vm: vm.into(),
                dir: saved,
            })
        }
        Err(e) => {
            return Err(io(format!(
                "renaming {} to {}",
                saved.display(),
                dir.display()
            ))(e))
        }
    }
    Ok(Claimed {
        dir,
        vm_dir,
        vm: vm.into(),
    })
}

impl Claimed {
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    pub fn device_state_path(&self) -> PathBuf {
        self.dir.join(DEVICE_STATE_FILE)
    }

    /// The spec the state was saved with.
    pub fn spec(&self) -> Result<VmSpec, SavedError> {
        let path = self.dir.join(SPEC_FILE);
        let text = std::fs::read(&path).map_err(io(format!("reading {}", path.display())))?;
        serde_json::from_slice(&text).map_err(|e| SavedError::BadSpec {
            path,
            why: e.to_string(),
        })
    }

    /// The host that saved the state, when it says.
    pub fn suspended_by(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(HOST_FILE)).ok()
    }

    /// Gives the state back: it is the VM's saved state again.
    pub fn release(self) -> Result<(), SavedError> {
        let saved = self.vm_dir.join(SAVED_DIR);
        std::fs::rename(&self.dir, &saved).map_err(io(format!(
            "renaming {} back to {} (VM {})",
            self.dir.display(),
            saved.display(),
            self.vm
        )))
    }

    /// Removes the state: the guest runs from it, or the VM is deleted. The VM's
    /// directory goes too when nothing else is in it (a VM without disks).
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "could not remove a saved state");
        }
        let _ = std::fs::remove_dir(&self.vm_dir);
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SavedError> {
    std::fs::write(path, bytes).map_err(io(format!("writing {}", path.display())))?;
    sync_file(path)
}

fn sync_file(path: &Path) -> Result<(), SavedError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("syncing {}", path.display())))
}

/// The byte ranges of `file` (of `len` bytes) that hold data: everything but holes.
/// A filesystem that cannot tell is taken as all data, which is only slower.
pub fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{seek, SeekFrom};
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let start = match seek(file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => {
                out.push((pos, len));
                break;
            }
        };
        let end = seek(file, SeekFrom::Hole(start)).map_or(len, |e| e.min(len));
        if end > start {
            out.push((start, end));
        }
        pos = end.max(start + 1);
    }
    out
}

/// Copies the data of `src` into `dst` at the same offsets and sizes `dst` to `src`'s
/// length; `dst`'s other bytes must already be zero (a new file). Returns the bytes
/// copied. Reading a tmpfs hole would allocate nothing, but writing its zeros would
/// store them: only data extents are copied, so the copy stays as sparse as guest RAM.
pub fn copy_data(src: &Path, dst: &Path) -> Result<u64, SavedError> {
    let from = File::open(src).map_err(io(format!("opening {}", src.display())))?;
    let len = from
        .metadata()
        .map_err(io(format!("reading {}", src.display())))?
        .len();
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dst)
        .map_err(io(format!("opening {}", dst.display())))?;
    to.set_len(len)
        .map_err(io(format!("sizing {}", dst.display())))?;
    let mut buf = vec![0u8; COPY_BUFFER];
    let mut copied = 0u64;
    for (start, end) in data_extents(&from, len) {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            from.read_exact_at(&mut buf[..n], at)
                .map_err(io(format!("reading {}", src.display())))?;
            to.write_all_at(&buf[..n], at)
                .map_err(io(format!("writing {}", dst.display())))?;
            at += n as u64;
        }
        copied += end - start;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&d.path().join("store")).unwrap();
        (d, s)
    }

    fn spec() -> VmSpec {
        serde_json::from_str(r#"{"memory_mib": 64}"#).unwrap()
    }

    fn write_state(s: &Store, vm: &str) -> PathBuf {
        let w = begin(s, vm).unwrap();
        std::fs::write(w.memory_path(), b"mem").unwrap();
        std::fs::write(w.device_state_path(), b"dev").unwrap();
        w.write_spec(&spec(), "h0").unwrap();
        w.commit().unwrap()
    }

    #[test]
    fn a_saved_state_appears_only_when_committed() {
        let (_d, s) = store();
        let w = begin(&s, "v").unwrap();
        std::fs::write(w.memory_path(), b"mem").unwrap();
        assert!(!s.has_saved_state("v"), "half written");
        assert!(matches!(
            claim(&s, "v", "h1"),
            Err(SavedError::NotSaved { .. })
        ));
        // A commit without every file fails and publishes nothing.
        assert!(w.commit().is_err());
        assert!(!s.saved_dir("v").exists());
        let saved = write_state(&s, "v");
        assert!(s.has_saved_state("v"));
        assert_eq!(std::fs::read(saved.join(MEMORY_FILE)).unwrap(), b"mem");
        let again = begin(&s, "v").unwrap_err();
        assert!(again.is_conflict(), "{again}");
    }

    #[test]
    fn abandoning_a_write_leaves_nothing() {
        let (_d, s) = store();
        let w = begin(&s, "v").unwrap();
        std::fs::write(w.memory_path(), b"mem").unwrap();
        w.abandon();
        assert!(!s.vm_dir("v").join(PARTIAL_DIR).exists());
        // A partial directory a crash left is no obstacle either.
        std::fs::create_dir_all(s.vm_dir("v").join(PARTIAL_DIR)).unwrap();
        write_state(&s, "v");
    }

    #[test]
    fn one_host_claims_a_saved_state() {
        let (_d, s) = store();
        write_state(&s, "v");
        let c = claim(&s, "v", "h1").unwrap();
        assert!(!s.has_saved_state("v"));
        let e = claim(&s, "v", "h2").unwrap_err();
        assert!(e.is_conflict(), "{e}");
        assert_eq!(c.spec().unwrap(), spec());
        assert_eq!(c.suspended_by().as_deref(), Some("h0"));
        c.release().unwrap();
        assert!(
            s.has_saved_state("v"),
            "a failed restore gives the state back"
        );
        let c = claim(&s, "v", "h2").unwrap();
        drop(c); // a crash: the claim stays on disk
        assert!(claim(&s, "v", "h1").is_err(), "h2's claim is not h1's");
        let c = claim(&s, "v", "h2").unwrap();
        assert_eq!(std::fs::read(c.memory_path()).unwrap(), b"mem");
        // A claim left behind while the VM was suspended again: the newer state wins.
        let stale = c;
        let w = begin(&s, "v").unwrap();
        std::fs::write(w.memory_path(), b"newer").unwrap();
        std::fs::write(w.device_state_path(), b"dev").unwrap();
        w.write_spec(&spec(), "h2").unwrap();
        w.commit().unwrap();
        drop(stale);
        let c = claim(&s, "v", "h2").unwrap();
        assert_eq!(std::fs::read(c.memory_path()).unwrap(), b"newer");
        c.remove();
        assert!(claim(&s, "v", "h2").is_err(), "removed after the guest ran");
        assert!(
            !s.vm_dir("v").exists(),
            "nothing else was in the VM's directory"
        );
    }

    #[test]
    fn claim_names_stay_one_file_name() {
        assert_eq!(claim_name("h1"), "restoring.h1");
        assert_eq!(claim_name("../x y"), "restoring.___x_y");
    }

    #[test]
    fn copies_only_data_and_keeps_offsets() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"head", 0).unwrap();
        f.write_all_at(&[7u8; 5000], 5 << 20).unwrap();
        drop(f);
        let dst = d.path().join("dst");
        let copied = copy_data(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        assert!(copied >= 5004, "{copied}");
        // Where the filesystem reports holes, the copy skipped them.
        let extents = data_extents(&File::open(&src).unwrap(), 8 << 20);
        if extents.len() > 1 {
            assert!(copied < 8 << 20, "{copied}");
        }
    }
}
