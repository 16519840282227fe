//! The guest image: Debian's cloud kernel plus an initramfs with busybox, the virtio
//! modules and the static `tern-guest` agent, built once and cached by content.
//!
//! ```text
//!  apt-cache depends linux-image-cloud-amd64 ─► linux-image-X-cloud-amd64 = V
//!  apt-get download ─► $TERN_CACHE/debs/*.deb ─► vmlinuz, modules (+ .modinfo deps)
//!  /bin/busybox (busybox-static) ┐
//!  tern-guest (static)           ├─► key = sha256(all inputs) ─► $TERN_CACHE/images/KEY/
//!  /init script                  ┘        {vmlinuz, initramfs.img, manifest.json}
//! ```
//!
//! [`ensure_image`] returns at once when an image with the same key exists; any
//! changed input (kernel version, busybox, the agent binary, the init script) gives a
//! new key and a new build. How to boot the image is in `docs/guest-image.md`.

pub mod debian;
mod elf;
pub mod guest_bin;
pub mod initramfs;
pub mod kernel;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped when the builder changes what it puts into an image.
const BUILDER_VERSION: u32 = 1;

/// Where busybox-static puts its binary.
pub const BUSYBOX: &str = "/bin/busybox";

/// Name of the virtio-serial port the agent serves (`virtserialport,name=...`).
pub const CONTROL_PORT: &str = "org.tern.guest";

/// Kernel command line the image is meant to boot with; add `tern.ip=ADDR/PREFIX`
/// (and `tern.gw=`, `tern.hostname=`) per VM. `loglevel=5` keeps the console short
/// but still shows warnings such as list corruption. A panicking guest tells QEMU
/// through its pvpanic device, which holds it for the host to see; `panic=-1` with
/// QEMU's `-no-reboot` ends the QEMU of one whose kernel could not tell.
pub const BASE_CMDLINE: &str = "console=ttyS0 loglevel=5 panic=-1 mitigations=off";

/// Errors of the image builder.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("`{tool}` was not found: install the Debian package {package} (scripts/setup installs what tern needs)")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error("the Debian package {package} is not available ({detail}); run `apt-get update`, or scripts/setup")]
    MissingPackage { package: String, detail: String },
    #[error(
        "the image cache {path} is not writable ({source}); set TERN_CACHE to a writable directory"
    )]
    CacheNotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    GuestBinary(String),
    #[error("{0}: run it as root")]
    NeedsRoot(String),
    #[error("{what} failed: {detail}")]
    CommandFailed { what: String, detail: String },
    #[error("kernel package: {0}")]
    Kernel(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("manifest {path}: {source}")]
    Manifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

impl ImageError {
    fn io(path: &Path, source: std::io::Error) -> ImageError {
        ImageError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Errors the user fixes by changing the environment or input (exit status 2):
    /// an unwritable cache, a missing package or tool, an unusable agent binary.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            ImageError::MissingTool { .. }
                | ImageError::MissingPackage { .. }
                | ImageError::CacheNotWritable { .. }
                | ImageError::GuestBinary(_)
                | ImageError::NeedsRoot(_)
        )
    }
}

/// A built guest image, as described by its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestImage {
    /// Content key: sha256 over all inputs (hex).
    pub key: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub manifest: PathBuf,
    /// `uname -r` of the guest kernel.
    pub kernel_version: String,
    pub kernel_package: String,
    pub kernel_package_version: String,
    /// Modules in the initramfs, in load order.
    pub modules: Vec<String>,
    /// Kernel command line to boot with (append `tern.ip=...`).
    pub cmdline: String,
    /// virtio-serial port name the agent listens on.
    pub control_port: String,
    pub kernel_sha256: String,
    pub initramfs_sha256: String,
    pub inputs: Inputs,
}

impl GuestImage {
    /// A VM that boots this image with `vcpus` and `memory_mib`, its guest calling itself
    /// `hostname`; no NICs.
    pub fn vm_spec(&self, vcpus: u32, memory_mib: u64, hostname: &str) -> crate::VmSpec {
        crate::VmSpec {
            vcpus,
            memory_mib,
            kernel: Some(self.kernel.clone()),
            initramfs: Some(self.initramfs.clone()),
            cmdline: format!("{} tern.hostname={hostname}", self.cmdline),
            nics: Vec::new(),
            disks: Vec::new(),
            image: None,
            guest_config: None,
        }
    }
}

/// Hashes of what went into the image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inputs {
    pub kernel_deb_sha256: String,
    pub busybox_sha256: String,
    pub tern_guest_sha256: String,
    pub builder_version: u32,
}

pub(crate) fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `$TERN_CACHE`, else `~/.cache/tern` (or `$XDG_CACHE_HOME/tern`).
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TERN_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(x).join("tern");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/tern")
}

/// The content key of an image from the hashes of its inputs (pure).
pub fn image_key(
    kernel_package: &str,
    kernel_version: &str,
    inputs: &Inputs,
    init: &str,
) -> String {
    let text = format!(
        "tern-image v{}\nkernel {kernel_package} {kernel_version} {}\nbusybox {}\ntern-guest {}\nmodules {}\ninit {}\n",
        inputs.builder_version,
        inputs.kernel_deb_sha256,
        inputs.busybox_sha256,
        inputs.tern_guest_sha256,
        kernel::WANTED_MODULES.join(","),
        sha256_hex(init.as_bytes()),
    );
    sha256_hex(text.as_bytes())
}

/// Makes sure `dir` exists and can be written, as the bad-input error if not.
fn writable_dir(dir: &Path) -> Result<(), ImageError> {
    let not_writable = |source| ImageError::CacheNotWritable {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(not_writable)?;
    tempfile::Builder::new()
        .prefix(".probe-")
        .tempfile_in(dir)
        .map(drop)
        .map_err(not_writable)
}

/// [`ensure_image`] from async code: the build (apt, cpio, compression) runs on a
/// blocking thread so it does not stall the runtime.
pub async fn ensure_image_async(
    cache_dir: std::path::PathBuf,
    mut progress: impl FnMut(&str) + Send + 'static,
) -> Result<GuestImage, ImageError> {
    tokio::task::spawn_blocking(move || ensure_image(&cache_dir, &mut progress))
        .await
        .expect("the image build thread does not panic")
}

/// Returns the guest image for the current inputs, building it under `cache_dir` if
/// it is not there yet. `progress` gets one line per step.
pub fn ensure_image(
    cache_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<GuestImage, ImageError> {
    writable_dir(cache_dir)?;
    let debs = cache_dir.join("debs");
    let images = cache_dir.join("images");
    writable_dir(&debs)?;
    writable_dir(&images)?;

    progress(&format!(
        "resolving {} with apt-cache",
        kernel::META_PACKAGE
    ));
    let pkg = kernel::resolve()?;
    progress(&format!("kernel package {} {}", pkg.name, pkg.version));
    let busybox = std::fs::read(BUSYBOX).map_err(|_| ImageError::MissingTool {
        tool: BUSYBOX,
        package: "busybox-static",
    })?;
    if elf::is_static(&busybox) != Some(true) {
        return Err(ImageError::MissingTool {
            tool: "a static /bin/busybox",
            package: "busybox-static",
        });
    }
    let (guest_path, guest) = guest_bin::find(progress)?;
    progress(&format!("tern-guest: {}", guest_path.display()));

    let deb_path = debs.join(pkg.deb_file_name());
    if !deb_path.is_file() {
        progress(&format!("downloading {} with apt-get download", pkg.name));
    }
    let deb = kernel::download(&pkg, &debs)?;
    let deb_sha256 = kernel::deb_sha256(&deb)?;

    let inputs = Inputs {
        kernel_deb_sha256: deb_sha256,
        busybox_sha256: sha256_hex(&busybox),
        tern_guest_sha256: sha256_hex(&guest),
        builder_version: BUILDER_VERSION,
    };
    // The init script depends on the module list, which is a function of the kernel
    // package (already in the key), so the template with no modules stands for it.
    let init_template = initramfs::init_script(pkg.release(), &[]);
    let key = image_key(&pkg.name, &pkg.version, &inputs, &init_template);
    let dir = images.join(&key[..16]);
    let manifest_path = dir.join("manifest.json");
    if let Some(image) = read_manifest::<GuestImage>(&manifest_path)?
        .filter(|m| m.key == key && m.kernel.is_file() && m.initramfs.is_file())
    {
        progress(&format!("image {} is up to date", &key[..16]));
        return Ok(image);
    }

    progress(&format!(
        "extracting vmlinuz and modules from {}",
        deb.display()
    ));
    let files = kernel::read_deb(&deb, pkg.release())?;
    let modules = kernel::guest_modules(&files)?;
    progress(&format!(
        "modules: {}",
        modules
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    progress("packing the initramfs (cpio newc, gzip)");
    let cpio = initramfs::archive(&initramfs::Contents {
        busybox: &busybox,
        tern_guest: &guest,
        kernel_release: pkg.release(),
        modules: &modules,
    });
    let initrd = initramfs::gzip(&cpio).map_err(|e| ImageError::io(&dir, e))?;

    // Build in a scratch directory and rename it into place: readers never see a
    // half-written image, and of two concurrent builders one simply wins.
    let scratch = tempfile::Builder::new()
        .prefix(".build-")
        .tempdir_in(&images)
        .map_err(|e| ImageError::io(&images, e))?;
    let image = GuestImage {
        key: key.clone(),
        kernel: dir.join("vmlinuz"),
        initramfs: dir.join("initramfs.img"),
        manifest: manifest_path.clone(),
        kernel_version: pkg.release().to_string(),
        kernel_package: pkg.name.clone(),
        kernel_package_version: pkg.version.clone(),
        modules: modules.iter().map(|(n, _)| n.clone()).collect(),
        cmdline: BASE_CMDLINE.to_string(),
        control_port: CONTROL_PORT.to_string(),
        kernel_sha256: sha256_hex(&files.vmlinuz),
        initramfs_sha256: sha256_hex(&initrd),
        inputs,
    };
    let write = |name: &str, data: &[u8]| {
        let p = scratch.path().join(name);
        std::fs::write(&p, data).map_err(|e| ImageError::io(&p, e))
    };
    write("vmlinuz", &files.vmlinuz)?;
    write("initramfs.img", &initrd)?;
    let json = serde_json::to_vec_pretty(&image).map_err(|source| ImageError::Manifest {
        path: manifest_path.clone(),
        source,
    })?;
    write("manifest.json", &json)?;
    let built = scratch.keep();
    let usable = |m: &GuestImage| m.key == key && m.kernel.is_file() && m.initramfs.is_file();
    if dir.exists() {
        // A stale or concurrent build: keep a good one, replace a stale one.
        if let Some(done) = read_manifest::<GuestImage>(&manifest_path)?.filter(usable) {
            let _ = std::fs::remove_dir_all(&built);
            return Ok(done);
        }
        std::fs::remove_dir_all(&dir).map_err(|e| ImageError::io(&dir, e))?;
    }
    if let Err(e) = std::fs::rename(&built, &dir) {
        let _ = std::fs::remove_dir_all(&built);
        // Another builder renamed its copy in first: identical content, use it.
        return read_manifest::<GuestImage>(&manifest_path)?
            .filter(usable)
            .ok_or_else(|| ImageError::io(&dir, e));
    }
    progress(&format!(
        "image {} built: kernel {} ({} MB), initramfs {} MB",
        &key[..16],
        image.kernel_version,
        files.vmlinuz.len() / 1_000_000,
        image_size_mb(&image.initramfs)
    ));
    Ok(image)
}

fn image_size_mb(p: &Path) -> u64 {
    std::fs::metadata(p)
        .map(|m| m.len() / 1_000_000)
        .unwrap_or(0)
}

/// The manifest at `path` (either image's), or `None` if there is none (or it is
/// unreadable junk, which a rebuild will replace).
pub(crate) fn read_manifest<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, ImageError> {
    match std::fs::read(path) {
        Ok(b) => Ok(serde_json::from_slice(&b).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ImageError::io(path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> Inputs {
        Inputs {
            kernel_deb_sha256: "k".into(),
            busybox_sha256: "b".into(),
            tern_guest_sha256: "g".into(),
            builder_version: 1,
        }
    }

    #[test]
    fn key_changes_with_every_input() {
        let base = image_key("linux-image-x", "1", &inputs(), "init");
        assert_eq!(base, image_key("linux-image-x", "1", &inputs(), "init"));
        assert_ne!(base, image_key("linux-image-x", "2", &inputs(), "init"));
        assert_ne!(base, image_key("linux-image-x", "1", &inputs(), "init2"));
        for change in [
            |i: &mut Inputs| i.kernel_deb_sha256.push('x'),
            |i: &mut Inputs| i.busybox_sha256.push('x'),
            |i: &mut Inputs| i.tern_guest_sha256.push('x'),
            |i: &mut Inputs| i.builder_version += 1,
        ] {
            let mut i = inputs();
            change(&mut i);
            assert_ne!(base, image_key("linux-image-x", "1", &i, "init"));
        }
    }

    #[test]
    fn unwritable_cache_is_bad_input() {
        // A path under a regular file can never be created, even by root.
        let f = tempfile::NamedTempFile::new().unwrap();
        let err = ensure_image(&f.path().join("cache"), &mut |_| {}).unwrap_err();
        assert!(matches!(err, ImageError::CacheNotWritable { .. }), "{err}");
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("TERN_CACHE"));
    }

    #[test]
    fn sha256_is_the_standard_one() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
