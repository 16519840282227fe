//! VM disks in the host's store (see `docs/storage.md`): qcow2 files made with
//! `qemu-img`, blank or as copy-on-write overlays on read-only images.
//!
//! ```text
//! STORE/images/NAME         read-only images (qcow2 or raw) disks may start from
//! STORE/vms/VM/DISK.qcow2   one file per disk; an overlay names its image relatively
//! ```
//!
//! A host has up to two stores: the shared one (`--store`), which every host that may
//! run the VM mounts, and a local one (`--local-store`), whose disks a live migration
//! copies to the destination's local store ([`Stores`] picks a disk's by its
//! [`DiskStore`]).
//!
//! The decisions (names, sizes, room, the `qemu-img` command) are pure functions; the
//! [`Store`] methods stat files and run `qemu-img`.

pub mod mirror;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
pub use tern_api::agent::{
    check_store_name, DiskBus, DiskSpec, DiskStore, MAX_DISKS, MAX_DISK_MIB,
};

const MIB: u64 = 1 << 20;

/// How long one `qemu-img` call may take (creating an overlay is a few metadata writes).
const QEMU_IMG_TIMEOUT: Duration = Duration::from_secs(30);

/// What can go wrong with a VM's disks.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// A disk spec that fails the checks of [`DiskSpec::validate`].
    #[error("invalid VM spec: {0}")]
    Invalid(String),
    /// The named image is not in the store's image directory.
    #[error("invalid VM spec: disk {disk:?}: image {image:?} is not in this host's image store {}: copy it there first", dir.display())]
    NoImage {
        disk: String,
        image: String,
        dir: PathBuf,
    },
    /// The image name resolves (through a symbolic link) to a file outside the image
    /// directory.
    #[error("invalid VM spec: disk {disk:?}: image {image:?} resolves to {}, outside this host's image store {}", real.display(), dir.display())]
    OutsideStore {
        disk: String,
        image: String,
        real: PathBuf,
        dir: PathBuf,
    },
    /// The image is not a format a disk can start from.
    #[error("invalid VM spec: disk {disk:?}: image {image:?} is {why}")]
    BadImage {
        disk: String,
        image: String,
        why: String,
    },
    /// The disk would be smaller than its image.
    #[error("invalid VM spec: disk {disk:?}: size_mib {size_mib} is below the size of image {image:?} ({image_mib} MiB)")]
    SmallerThanImage {
        disk: String,
        image: String,
        size_mib: u64,
        image_mib: u64,
    },
    /// The disks together are larger than the store's free space.
    #[error("not enough room in the disk store {}: the disks need {need_mib} MiB, {free_mib} MiB are free", store.display())]
    NoSpace {
        store: PathBuf,
        need_mib: u64,
        free_mib: u64,
    },
    /// A disk file of this VM exists already (another VM of the same name on a host
    /// that shares the store, or one left behind).
    #[error("disk file {} exists already: another VM named {vm:?} uses this store, or its disks were left behind (delete them or pick another name)", path.display())]
    Exists { vm: String, path: PathBuf },
    /// A migration destination does not see the source's disk file.
    #[error("disk file {} is not in this host's store: live migration keeps disks in place, so both hosts must share the store (--store on one NFS or CephFS mount)", path.display())]
    NotShared { path: PathBuf },
    /// The host was started without a store and a VM asks for disks.
    #[error("VM {0:?} asks for disks but this host has no disk store")]
    NoStore(String),
    /// A VM asks for a local disk on a host started without `--local-store`.
    #[error("VM {0:?} asks for a local disk but this host has no local store (tern agent --local-store DIR)")]
    NoLocalStore(String),
    /// A local disk whose size is not a whole number of MiB cannot be described to a
    /// migration destination, which makes its copy from the spec.
    #[error(
        "local disk {disk:?} is {bytes} bytes, not a whole number of MiB: it cannot be migrated"
    )]
    OddSize { disk: String, bytes: u64 },
    /// `qemu-img` failed or could not run.
    #[error("`{command}` failed: {detail}")]
    QemuImg { command: String, detail: String },
    /// Filesystem error in the store.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl DiskError {
    /// True when the caller asked for something this host cannot or will not do, as
    /// opposed to the host failing.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            DiskError::Invalid(_)
                | DiskError::NoImage { .. }
                | DiskError::OutsideStore { .. }
                | DiskError::BadImage { .. }
                | DiskError::SmallerThanImage { .. }
                | DiskError::NoSpace { .. }
                | DiskError::NotShared { .. }
                | DiskError::NoStore(_)
                | DiskError::NoLocalStore(_)
                | DiskError::OddSize { .. }
        )
    }

    /// True when the request clashes with what exists.
    pub fn is_conflict(&self) -> bool {
        matches!(self, DiskError::Exists { .. })
    }

    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DiskError {
        let context = context.into();
        move |source| DiskError::Io { context, source }
    }
}

/// An image's format as `qemu-img info` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }
}

/// What a disk needs to know about its image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The image's path relative to the store's root, after symbolic links.
    pub rel_path: PathBuf,
    pub format: ImageFormat,
    pub virtual_bytes: u64,
}

/// Reads the parts of `qemu-img info --output=json` a disk depends on (pure). An image
/// that has a backing file of its own is refused: it could name any file on the host.
pub fn parse_image_info(v: &Value) -> Result<(ImageFormat, u64), String> {
    let format = match v.get("format").and_then(Value::as_str) {
        Some("qcow2") => ImageFormat::Qcow2,
        Some("raw") => ImageFormat::Raw,
        Some(other) => return Err(format!("in format {other:?}; only qcow2 and raw are used")),
        None => return Err("not an image qemu-img can read".into()),
    };
    if let Some(b) = v.get("backing-filename").and_then(Value::as_str) {
        return Err(format!(
            "an overlay on {b:?}; images must stand alone (qemu-img convert makes one)"
        ));
    }
    let size = v
        .get("virtual-size")
        .and_then(Value::as_u64)
        .ok_or_else(|| "without a virtual size".to_string())?;
    Ok((format, size))
}

/// The size of a disk in bytes: its `size_mib`, or its image's size (pure).
pub fn disk_bytes(d: &DiskSpec, image: Option<&ImageInfo>) -> Result<u64, DiskError> {
    match (d.size_mib, image) {
        (Some(mib), Some(img)) if mib * MIB < img.virtual_bytes => {
            Err(DiskError::SmallerThanImage {
                disk: d.name.clone(),
                image: d.image.clone().unwrap_or_default(),
                size_mib: mib,
                image_mib: img.virtual_bytes.div_ceil(MIB),
            })
        }
        (Some(mib), _) => Ok(mib * MIB),
        (None, Some(img)) => Ok(img.virtual_bytes),
        (None, None) => Err(DiskError::Invalid(format!(
            "disk {:?} has neither size_mib nor image",
            d.name
        ))),
    }
}

/// Refuses disks whose sizes add up to more than the store's free space (pure). Files
/// are sparse, but a guest that fills its disks must not fill the store under its
/// neighbours, so the whole size counts.
pub fn check_room(store: &Path, need_bytes: u64, free_bytes: u64) -> Result<(), DiskError> {
    if need_bytes > free_bytes {
        return Err(DiskError::NoSpace {
            store: store.to_path_buf(),
            need_mib: need_bytes.div_ceil(MIB),
            free_mib: free_bytes / MIB,
        });
    }
    Ok(())
}

/// The `qemu-img` arguments that make one disk file (pure). An overlay names its image
/// by a path relative to its own directory (`../../images/NAME`), so a store mounted at
/// another path on another host still finds it, and states the image's format, so QEMU
/// never guesses it from the content.
pub fn create_args(path: &Path, bytes: u64, image: Option<&ImageInfo>) -> Vec<String> {
    let mut a: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    if let Some(img) = image {
        a.extend([
            "-b".into(),
            Path::new("../..").join(&img.rel_path).display().to_string(),
            "-F".into(),
            img.format.as_str().into(),
        ]);
    }
    a.push(path.display().to_string());
    a.push(bytes.to_string());
    a
}

/// The host's disk store: a directory, on one filesystem every host that may run the
/// VM mounts (the lab's hosts all see one folder).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// A store rooted at `root`; [`Store::open`] makes and resolves the directory.
    pub fn new(root: PathBuf) -> Store {
        Store { root }
    }

    /// Makes the store's directories and resolves its root, so every path checked
    /// against it later is compared with a canonical one.
    pub fn open(root: &Path) -> Result<Store, DiskError> {
        for d in [root.join("images"), root.join("vms")] {
            std::fs::create_dir_all(&d).map_err(DiskError::io(format!(
                "creating the disk store {}",
                d.display()
            )))?;
        }
        let root = root
            .canonicalize()
            .map_err(DiskError::io(format!("resolving {}", root.display())))?;
        Ok(Store { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the images disks may start from lie.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// The directory of VM `vm`'s disks.
    pub fn vm_dir(&self, vm: &str) -> PathBuf {
        self.root.join("vms").join(vm)
    }

    /// The file of disk `disk` of VM `vm` (both names checked by the spec's validation).
    pub fn disk_path(&self, vm: &str, disk: &str) -> PathBuf {
        self.vm_dir(vm).join(format!("{disk}.qcow2"))
    }

    /// Free bytes for an unprivileged writer (`statvfs`'s `f_bavail`).
    pub fn free_bytes(&self) -> Result<u64, DiskError> {
        let st = rustix::fs::statvfs(&self.root).map_err(|e| DiskError::Io {
            context: format!("statvfs {}", self.root.display()),
            source: e.into(),
        })?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    /// Finds image `name` for disk `disk`: it must resolve, after symbolic links, to a
    /// file under the image directory, and be a standalone qcow2 or raw image.
    pub async fn image(&self, disk: &str, name: &str) -> Result<ImageInfo, DiskError> {
        check_store_name("image", name).map_err(DiskError::Invalid)?;
        let dir = self.images_dir();
        let real = dir
            .join(name)
            .canonicalize()
            .map_err(|_| DiskError::NoImage {
                disk: disk.into(),
                image: name.into(),
                dir: dir.clone(),
            })?;
        let rel_path = match real.strip_prefix(&self.root) {
            Ok(rel) if real.starts_with(&dir) && real.is_file() => rel.to_path_buf(),
            _ => {
                return Err(DiskError::OutsideStore {
                    disk: disk.into(),
                    image: name.into(),
                    real,
                    dir,
                })
            }
        };
        let real_text = real.display().to_string();
        // `-U`: running VMs hold their images open (shared, read-only); reading the
        // header needs no lock.
        let out = qemu_img(&["info", "-U", "--output=json", &real_text]).await?;
        let v: Value = serde_json::from_str(&out).map_err(|e| DiskError::BadImage {
            disk: disk.into(),
            image: name.into(),
            why: format!("not described by qemu-img ({e})"),
        })?;
        let (format, virtual_bytes) = parse_image_info(&v).map_err(|why| DiskError::BadImage {
            disk: disk.into(),
            image: name.into(),
            why,
        })?;
        Ok(ImageInfo {
            rel_path,
            format,
            virtual_bytes,
        })
    }

    /// Makes the disk files of VM `vm`. Everything is checked before the first file is
    /// made (names, images, sizes, the store's room, no file already there); on a
    /// failure half-way the files made are removed again.
    pub async fn create_disks(&self, vm: &str, disks: &[DiskSpec]) -> Result<(), DiskError> {
        let planned = self.plan(vm, disks).await?;
        self.make(vm, &planned).await
    }

    /// Checks disks `disks` of VM `vm` could be made here, without making anything.
    pub async fn plan(&self, vm: &str, disks: &[DiskSpec]) -> Result<Vec<Planned>, DiskError> {
        let mut planned = Vec::with_capacity(disks.len());
        for d in disks {
            d.validate().map_err(DiskError::Invalid)?;
            let image = match &d.image {
                Some(name) => Some(self.image(&d.name, name).await?),
                None => None,
            };
            let bytes = disk_bytes(d, image.as_ref())?;
            let path = self.disk_path(vm, &d.name);
            if path.exists() {
                return Err(DiskError::Exists {
                    vm: vm.into(),
                    path,
                });
            }
            planned.push(Planned { path, bytes, image });
        }
        if !planned.is_empty() {
            let need: u64 = planned.iter().map(|p| p.bytes).sum();
            check_room(&self.root, need, self.free_bytes()?)?;
        }
        Ok(planned)
    }

    /// Makes the files [`Store::plan`] checked; on a failure half-way the files made are
    /// removed again.
    pub async fn make(&self, vm: &str, planned: &[Planned]) -> Result<(), DiskError> {
        if planned.is_empty() {
            return Ok(());
        }
        let dir = self.vm_dir(vm);
        std::fs::create_dir_all(&dir)
            .map_err(DiskError::io(format!("creating {}", dir.display())))?;
        let mut made = Vec::new();
        for p in planned {
            let args = create_args(&p.path, p.bytes, p.image.as_ref());
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            if let Err(e) = qemu_img_in(&dir, &argv).await {
                self.remove_files(vm, &made);
                let _ = std::fs::remove_file(&p.path);
                return Err(e);
            }
            made.push(p.path.clone());
        }
        Ok(())
    }

    /// The size the guest sees of disk `disk` of VM `vm` (`qemu-img info -U`: the
    /// running QEMU holds the file).
    pub async fn virtual_bytes(&self, vm: &str, disk: &str) -> Result<u64, DiskError> {
        let path = self.disk_path(vm, disk).display().to_string();
        let out = qemu_img(&["info", "-U", "--output=json", &path]).await?;
        serde_json::from_str::<Value>(&out)
            .ok()
            .and_then(|v| v.get("virtual-size").and_then(Value::as_u64))
            .ok_or_else(|| DiskError::QemuImg {
                command: format!("qemu-img info {path}"),
                detail: "no virtual size in its answer".into(),
            })
    }

    /// Grows disk `disk` of VM `vm` to `mib` MiB (`qemu-img resize`): the guest sees the
    /// larger disk at its next boot. A size below the current one is refused (the
    /// guest's file systems would be cut), as is growth the store has no room for.
    pub async fn resize_disk(&self, vm: &str, disk: &str, mib: u64) -> Result<(), DiskError> {
        if mib == 0 || mib > tern_api::agent::MAX_DISK_MIB {
            return Err(DiskError::Invalid(format!(
                "disk {disk:?}: size_mib {mib} is outside 1..={}",
                tern_api::agent::MAX_DISK_MIB
            )));
        }
        let now = self.virtual_bytes(vm, disk).await?;
        let want = mib * MIB;
        if want < now {
            return Err(DiskError::Invalid(format!(
                "disk {disk:?} is {} MiB; it only grows (shrinking would cut the guest's file \
                 systems)",
                now / MIB
            )));
        }
        check_room(&self.root, want - now, self.free_bytes()?)?;
        let path = self.disk_path(vm, disk).display().to_string();
        qemu_img(&["resize", &path, &want.to_string()]).await?;
        Ok(())
    }

    /// Checks that the disk files of VM `vm` are here (a migration destination opens
    /// the source's files, it makes none).
    pub fn check_disks_exist(&self, vm: &str, disks: &[DiskSpec]) -> Result<(), DiskError> {
        for d in disks {
            let path = self.disk_path(vm, &d.name);
            if !path.is_file() {
                return Err(DiskError::NotShared { path });
            }
        }
        Ok(())
    }

    /// Deletes the disk files of VM `vm`, and its directory once empty.
    pub fn remove_disks(&self, vm: &str, disks: &[DiskSpec]) {
        let paths: Vec<PathBuf> = disks.iter().map(|d| self.disk_path(vm, &d.name)).collect();
        self.remove_files(vm, &paths);
    }

    fn remove_files(&self, vm: &str, paths: &[PathBuf]) {
        for p in paths {
            if let Err(e) = std::fs::remove_file(p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %p.display(), error = %e, "could not remove a disk file");
                }
            }
        }
        // Only when empty: a file someone else put there stays.
        let _ = std::fs::remove_dir(self.vm_dir(vm));
    }
}

/// A disk file [`Store::plan`] found room and an image for.
#[derive(Debug, Clone)]
pub struct Planned {
    path: PathBuf,
    bytes: u64,
    image: Option<ImageInfo>,
}

/// Which files a VM's teardown deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remove {
    /// Every disk: the VM is deleted.
    All,
    /// The local store's only: this host's copy of a migrating VM ends, and the shared
    /// store's files belong to the copy on the other host (a destination that failed
    /// drops its partial local copies; a source that handed over drops its old ones).
    LocalOnly,
}

/// The host's stores, as a VM's disks pick them by their `store`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stores<'a> {
    pub shared: Option<&'a Store>,
    pub local: Option<&'a Store>,
}

impl<'a> Stores<'a> {
    fn get(&self, kind: DiskStore) -> Option<&'a Store> {
        match kind {
            DiskStore::Shared => self.shared,
            DiskStore::Local => self.local,
        }
    }

    /// The store of disk `d` of VM `vm`.
    pub fn of(&self, vm: &str, d: &DiskSpec) -> Result<&'a Store, DiskError> {
        self.get(d.store).ok_or_else(|| match d.store {
            DiskStore::Shared => DiskError::NoStore(vm.into()),
            DiskStore::Local => DiskError::NoLocalStore(vm.into()),
        })
    }

    /// The file of disk `d` of VM `vm`.
    pub fn disk_path(&self, vm: &str, d: &DiskSpec) -> Result<PathBuf, DiskError> {
        Ok(self.of(vm, d)?.disk_path(vm, &d.name))
    }

    /// The disks of `disks` in `store`.
    fn split(disks: &[DiskSpec], store: DiskStore) -> Vec<DiskSpec> {
        disks.iter().filter(|d| d.store == store).cloned().collect()
    }

    /// Makes the disk files of VM `vm` in their stores. Both stores' disks are checked
    /// before the first file is made; nothing is left behind on error.
    pub async fn create_disks(&self, vm: &str, disks: &[DiskSpec]) -> Result<(), DiskError> {
        self.create(vm, disks, &[DiskStore::Shared, DiskStore::Local])
            .await
    }

    /// A migration destination's disks: the shared store's must be here already (the
    /// source's files, opened in place); the local store's are made as new overlays of
    /// the spec's size on the spec's image, which the source's block mirror fills. True
    /// when files were made.
    pub async fn prepare_incoming(&self, vm: &str, disks: &[DiskSpec]) -> Result<bool, DiskError> {
        let shared = Self::split(disks, DiskStore::Shared);
        if !shared.is_empty() {
            self.of(vm, &shared[0])?.check_disks_exist(vm, &shared)?;
        }
        let local = Self::split(disks, DiskStore::Local);
        if local.is_empty() {
            return Ok(false);
        }
        if let Some(d) = local.iter().find(|d| d.size_mib.is_none()) {
            // The source states every local disk's size: an image of another size here
            // would make a copy the mirror cannot fill.
            return Err(DiskError::Invalid(format!(
                "local disk {:?} of an incoming VM has no size_mib",
                d.name
            )));
        }
        self.create(vm, disks, &[DiskStore::Local]).await?;
        Ok(true)
    }

    async fn create(
        &self,
        vm: &str,
        disks: &[DiskSpec],
        which: &[DiskStore],
    ) -> Result<(), DiskError> {
        let mut plans = Vec::new();
        for &kind in which {
            let these = Self::split(disks, kind);
            if these.is_empty() {
                continue;
            }
            let store = self.of(vm, &these[0])?;
            plans.push((store, these.clone(), store.plan(vm, &these).await?));
        }
        for (i, (store, _, planned)) in plans.iter().enumerate() {
            if let Err(e) = store.make(vm, planned).await {
                for (made, specs, _) in &plans[..i] {
                    made.remove_disks(vm, specs);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Deletes the disk files of VM `vm` that `remove` names; a store this host lacks
    /// has nothing to delete.
    pub fn remove_disks(&self, vm: &str, disks: &[DiskSpec], remove: Remove) {
        for kind in [DiskStore::Shared, DiskStore::Local] {
            if kind == DiskStore::Shared && remove == Remove::LocalOnly {
                continue;
            }
            let these = Self::split(disks, kind);
            if let (false, Some(store)) = (these.is_empty(), self.get(kind)) {
                store.remove_disks(vm, &these);
            }
        }
    }
}

async fn qemu_img(args: &[&str]) -> Result<String, DiskError> {
    run_qemu_img(None, args).await
}

async fn qemu_img_in(dir: &Path, args: &[&str]) -> Result<String, DiskError> {
    run_qemu_img(Some(dir), args).await
}

/// Runs `qemu-img` with a timeout; its stdout, or its stderr as the error.
async fn run_qemu_img(dir: Option<&Path>, args: &[&str]) -> Result<String, DiskError> {
    let command = format!("qemu-img {}", args.join(" "));
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(args).kill_on_drop(true);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = match tokio::time::timeout(QEMU_IMG_TIMEOUT, cmd.output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return Err(DiskError::QemuImg {
                command,
                detail: format!("cannot run it: {e} (install qemu-utils)"),
            })
        }
        Err(_) => {
            return Err(DiskError::QemuImg {
                command,
                detail: format!("no answer within {QEMU_IMG_TIMEOUT:?}"),
            })
        }
    };
    if !out.status.success() {
        return Err(DiskError::QemuImg {
            command,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn disk(name: &str, size_mib: Option<u64>, image: Option<&str>) -> DiskSpec {
        DiskSpec {
            name: name.into(),
            size_mib,
            image: image.map(str::to_string),
            bus: DiskBus::VirtioBlk,
            store: DiskStore::Shared,
        }
    }

    fn img(bytes: u64) -> ImageInfo {
        ImageInfo {
            rel_path: "images/base.qcow2".into(),
            format: ImageFormat::Qcow2,
            virtual_bytes: bytes,
        }
    }

    #[test]
    fn names_cannot_leave_the_store() {
        for bad in [
            "..",
            "../x",
            "a/b",
            "/etc/passwd",
            ".hidden",
            "",
            "a..b",
            "-x",
            "a b",
        ] {
            assert!(check_store_name("image", bad).is_err(), "{bad:?}");
        }
        for good in ["base.qcow2", "debian-12_amd64.raw", "d0"] {
            assert!(check_store_name("image", good).is_ok(), "{good:?}");
        }
        assert!(check_store_name("image", &"x".repeat(65)).is_err());
        assert!(disk("root.qcow2", Some(1), None).validate().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(
            disk_bytes(&disk("d", Some(2), None), None).unwrap(),
            2 * MIB
        );
        assert_eq!(
            disk_bytes(&disk("d", None, Some("b")), Some(&img(3 * MIB))).unwrap(),
            3 * MIB
        );
        assert!(matches!(
            disk_bytes(&disk("d", Some(2), Some("b")), Some(&img(3 * MIB))),
            Err(DiskError::SmallerThanImage { image_mib: 3, .. })
        ));
        assert!(disk("d", Some(0), None).validate().is_err());
        assert!(disk("d", Some(MAX_DISK_MIB + 1), None).validate().is_err());
        assert!(disk("d", None, None).validate().is_err());
        assert!(disk("d", None, Some("base")).validate().is_ok());
    }

    #[test]
    fn room_names_the_numbers() {
        let e = check_room(Path::new("/s"), 3 * MIB, 2 * MIB).unwrap_err();
        assert!(e.is_bad_input());
        let text = e.to_string();
        assert!(
            text.contains("need 3 MiB") && text.contains("2 MiB are free"),
            "{text}"
        );
        assert!(check_room(Path::new("/s"), 2 * MIB, 2 * MIB).is_ok());
    }

    #[test]
    fn overlay_names_its_image_relatively_with_its_format() {
        let a = create_args(Path::new("/s/vms/v/root.qcow2"), 4 * MIB, Some(&img(MIB)));
        assert_eq!(
            a.join(" "),
            "create -q -f qcow2 -b ../../images/base.qcow2 -F qcow2 /s/vms/v/root.qcow2 4194304"
        );
        let blank = create_args(Path::new("/s/vms/v/data.qcow2"), MIB, None);
        assert_eq!(
            blank.join(" "),
            "create -q -f qcow2 /s/vms/v/data.qcow2 1048576"
        );
    }

    #[test]
    fn image_info() {
        let q = json!({"format": "qcow2", "virtual-size": 1024});
        assert_eq!(parse_image_info(&q).unwrap(), (ImageFormat::Qcow2, 1024));
        let r = json!({"format": "raw", "virtual-size": 7});
        assert_eq!(parse_image_info(&r).unwrap(), (ImageFormat::Raw, 7));
        let vmdk = json!({"format": "vmdk", "virtual-size": 7});
        assert!(parse_image_info(&vmdk).unwrap_err().contains("vmdk"));
        let chained =
            json!({"format": "qcow2", "virtual-size": 7, "backing-filename": "/etc/shadow"});
        assert!(parse_image_info(&chained)
            .unwrap_err()
            .contains("stand alone"));
        assert!(parse_image_info(&json!({})).is_err());
    }

    #[test]
    fn a_disk_picks_its_store_and_a_missing_one_is_named() {
        let (shared, local) = (Store::new("/s".into()), Store::new("/l".into()));
        let both = Stores {
            shared: Some(&shared),
            local: Some(&local),
        };
        let mut d = disk("root", Some(1), None);
        assert_eq!(
            both.disk_path("v", &d).unwrap(),
            Path::new("/s/vms/v/root.qcow2")
        );
        d.store = DiskStore::Local;
        assert_eq!(
            both.disk_path("v", &d).unwrap(),
            Path::new("/l/vms/v/root.qcow2")
        );
        let shared_only = Stores {
            shared: Some(&shared),
            local: None,
        };
        let e = shared_only.of("v", &d).unwrap_err();
        assert!(
            e.is_bad_input() && e.to_string().contains("--local-store"),
            "{e}"
        );
        assert!(matches!(
            Stores::default().of("v", &disk("root", Some(1), None)),
            Err(DiskError::NoStore(_))
        ));
    }

    #[test]
    fn a_copy_that_ends_deletes_only_its_local_disks() {
        let dir = tempfile::tempdir().unwrap();
        let shared = Store::open(&dir.path().join("shared")).unwrap();
        let local = Store::open(&dir.path().join("local")).unwrap();
        let stores = Stores {
            shared: Some(&shared),
            local: Some(&local),
        };
        let mut data = disk("data", Some(1), None);
        data.store = DiskStore::Local;
        let disks = [disk("root", Some(1), None), data];
        for d in &disks {
            let p = stores.disk_path("v", d).unwrap();
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, b"x").unwrap();
        }
        stores.remove_disks("v", &disks, Remove::LocalOnly);
        assert!(
            shared.disk_path("v", "root").is_file(),
            "the shared disk went"
        );
        assert!(!local.vm_dir("v").exists(), "the local disk stayed");
        stores.remove_disks("v", &disks, Remove::All);
        assert!(!shared.vm_dir("v").exists());
    }

    #[test]
    fn old_specs_mean_the_shared_store_and_new_shared_ones_read_as_before() {
        let old: DiskSpec = serde_json::from_value(json!({"name": "root", "size_mib": 1})).unwrap();
        assert_eq!(old.store, DiskStore::Shared);
        assert!(serde_json::to_value(&old).unwrap().get("store").is_none());
        let local: DiskSpec =
            serde_json::from_value(json!({"name": "d", "size_mib": 1, "store": "local"})).unwrap();
        assert_eq!(serde_json::to_value(&local).unwrap()["store"], "local");
        assert!(serde_json::from_value::<DiskSpec>(
            json!({"name": "d", "size_mib": 1, "store": "nfs"})
        )
        .is_err());
    }

    #[test]
    fn layout() {
        let s = Store::new("/s".into());
        assert_eq!(
            s.disk_path("vm1", "root"),
            Path::new("/s/vms/vm1/root.qcow2")
        );
        assert_eq!(s.images_dir(), Path::new("/s/images"));
    }
}
