//! The Debian image: a real Debian 12 root disk (systemd, sshd, the cloud kernel) with
//! `tern-guest` as a service, booted by direct kernel boot with the kernel and initrd
//! taken out of it. Built with `debootstrap`, cached by content like the minimal image.
//!
//! ```text
//!  debootstrap bookworm (cache: $TERN_CACHE/debootstrap) ─► rootfs
//!  + guest files (units, sshd, fstab, module lists) + tern-guest  ─► chroot: systemctl
//!    enable, update-initramfs (virtio modules only)
//!  rootfs ─► mkfs.ext4 -d (2 GiB, sparse) ─► qemu-img convert -c ─► root.qcow2
//!  boot/vmlinuz-*, boot/initrd.img-* ─► $TERN_CACHE/images/debian-KEY/{root.qcow2,
//!                                       vmlinuz, initrd.img, manifest.json}
//! ```
//!
//! The key covers what tern chooses (suite, mirror, packages, the files it writes, the
//! `tern-guest` binary, disk size, builder version), not the archive's state on the
//! day: a cached image keeps the package versions it was built with until an input
//! changes or the image directory is deleted.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{guest_bin, read_manifest, sha256_hex, writable_dir, ImageError, CONTROL_PORT};

/// Bumped when the builder changes what it puts into the image in a way the key does
/// not already see.
const DEBIAN_BUILDER_VERSION: u32 = 1;

/// Debian 12.
pub const SUITE: &str = "bookworm";

/// Where debootstrap fetches packages.
pub const MIRROR: &str = "http://deb.debian.org/debian";

/// Packages on top of debootstrap's `minbase` variant.
pub const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "udev",
    "kmod",
    "initramfs-tools",
    "linux-image-cloud-amd64",
    "openssh-server",
    "iproute2",
];

/// Virtual size of the root disk.
pub const DISK_MIB: u64 = 2048;

/// Kernel command line. The root is the whole first virtio disk (no partition table);
/// `net.ifnames=0` keeps the first NIC `eth0`, which the fw_cfg address goes to;
/// a panic is held by QEMU's pvpanic device (udev loads `pvpanic_pci`), and `panic=-1`
/// with QEMU's `-no-reboot` ends the QEMU of a guest that panics before it is loaded,
/// as for the minimal image.
pub const CMDLINE: &str = "root=/dev/vda rw console=ttyS0 net.ifnames=0 panic=-1 mitigations=off";

/// Where `tern-guest` is installed in the image.
pub const GUEST_BIN_PATH: &str = "usr/local/bin/tern-guest";

/// A built Debian image, as described by its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DebianImage {
    /// Content key: sha256 over all inputs (hex).
    pub key: String,
    /// `debian`.
    pub kind: String,
    pub suite: String,
    /// The root filesystem (ext4 on the whole disk, qcow2, compressed).
    pub root_disk: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub manifest: PathBuf,
    /// `uname -r` of the guest kernel.
    pub kernel_version: String,
    /// Kernel command line to boot with.
    pub cmdline: String,
    /// virtio-serial port name `tern-guest` serves.
    pub control_port: String,
    /// Size the guest sees, in MiB.
    pub disk_virtual_mib: u64,
    pub root_disk_sha256: String,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    pub tern_guest_sha256: String,
    pub packages: Vec<String>,
    /// When it was built (RFC 3339, UTC).
    pub built_at: String,
    /// How long the build took, in seconds.
    pub build_seconds: f64,
}

impl DebianImage {
    /// The file name the root disk goes by in an agent's image store
    /// (`STORE/images/NAME`): the suite and the key, so two builds never collide.
    pub fn store_name(&self) -> String {
        format!("debian-12-{}.qcow2", &self.key[..16])
    }

    fn is_complete(&self, key: &str) -> bool {
        self.key == key
            && self.root_disk.is_file()
            && self.kernel.is_file()
            && self.initrd.is_file()
    }
}

/// One file the builder writes into the root filesystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFile {
    /// Relative to the root.
    pub path: &'static str,
    pub content: String,
    pub mode: u32,
}

const TERN_GUEST_UNIT: &str = "\
[Unit]
Description=tern guest agent (virtio-serial port org.tern.guest)
After=systemd-modules-load.service

[Service]
ExecStart=/usr/local/bin/tern-guest
# An agent stopped in the middle of a dependency-aware migration leaves nothing frozen.
ExecStopPost=-/usr/local/bin/tern-guest thaw
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
";

// Before the network and sshd: the address and keys must be in place when they start.
// `-` on modprobe: a kernel with the driver built in has no module to load.
const TERN_CONFIG_UNIT: &str = "\
[Unit]
Description=Apply tern's fw_cfg configuration (host name, ssh keys, address)
DefaultDependencies=no
After=local-fs.target systemd-modules-load.service
Before=sysinit.target network-pre.target systemd-networkd.service ssh.service
Wants=network-pre.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStartPre=-/sbin/modprobe qemu_fw_cfg
ExecStart=/usr/local/bin/tern-guest apply-config

[Install]
WantedBy=sysinit.target
";

// Host keys are made on each VM's first boot, so VMs from one image do not share them;
// only ed25519, since an RSA key takes seconds under TCG. The drop-in replaces the
// unit's `sshd -t`, which would fail before the key exists, and runs it after.
const SSH_DROP_IN: &str = "\
[Unit]
After=tern-config.service

[Service]
ExecStartPre=
ExecStartPre=/bin/sh -c 'test -f /etc/ssh/ssh_host_ed25519_key || ssh-keygen -q -t ed25519 -N \"\" -f /etc/ssh/ssh_host_ed25519_key'
ExecStartPre=/usr/sbin/sshd -t
";

const SSHD_CONFIG: &str = "\
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
";

/// The files the builder writes into the root filesystem, besides `tern-guest` (pure:
/// they are part of the image's key).
pub fn guest_files() -> Vec<GuestFile> {
    let f = |path, content: &str, mode| GuestFile {
        path,
        content: content.to_string(),
        mode,
    };
    vec![
        f("etc/hostname", "debian\n", 0o644),
        f(
            "etc/hosts",
            "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n::1\tlocalhost ip6-localhost ip6-loopback\n",
            0o644,
        ),
        // debootstrap copies the build host's; the guest gets its own from fw_cfg.
        f("etc/resolv.conf", "", 0o644),
        f(
            "etc/fstab",
            "/dev/vda / ext4 rw,errors=remount-ro 0 1\n",
            0o644,
        ),
        // Empty: systemd makes a new id on each VM's first boot.
        f("etc/machine-id", "", 0o444),
        f(
            "etc/modules-load.d/tern.conf",
            "qemu_fw_cfg\nvirtio_console\n",
            0o644,
        ),
        // A small initrd (only what finds the root) boots faster under TCG than
        // initramfs-tools' default of most modules.
        f(
            "etc/initramfs-tools/conf.d/tern.conf",
            "MODULES=list\n",
            0o644,
        ),
        f(
            "etc/initramfs-tools/modules",
            "virtio_pci\nvirtio_blk\nvirtio_scsi\nsd_mod\n",
            0o644,
        ),
        f(
            "etc/systemd/system/tern-guest.service",
            TERN_GUEST_UNIT,
            0o644,
        ),
        f(
            "etc/systemd/system/tern-config.service",
            TERN_CONFIG_UNIT,
            0o644,
        ),
        f(
            "etc/systemd/system/ssh.service.d/tern.conf",
            SSH_DROP_IN,
            0o644,
        ),
        f("etc/ssh/sshd_config.d/tern.conf", SSHD_CONFIG, 0o644),
    ]
}

/// Units enabled in the image.
const ENABLE: &[&str] = &[
    "tern-guest.service",
    "tern-config.service",
    "systemd-networkd.service",
];

/// Units masked in the image. `systemd-firstboot` would ask for a locale and a root
/// password on the console on the first boot and wait; the timers would run apt and
/// filesystem scrubs at random times inside guests whose CPU and memory tern measures;
/// `getty-static` starts gettys on virtual terminals the VM has no display for.
const MASK: &[&str] = &[
    "systemd-firstboot.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "getty-static.service",
];

/// The content key of a Debian image (pure).
pub fn debian_key(tern_guest_sha256: &str) -> String {
    let mut text = format!(
        "tern-debian-image v{DEBIAN_BUILDER_VERSION}\nsuite {SUITE}\nmirror {MIRROR}\npackages {}\ndisk {DISK_MIB}\ncmdline {CMDLINE}\nenable {}\nmask {}\ntern-guest {tern_guest_sha256}\n",
        PACKAGES.join(","),
        ENABLE.join(","),
        MASK.join(","),
    );
    for f in guest_files() {
        text.push_str(&format!(
            "file {} {:o} {}\n",
            f.path,
            f.mode,
            sha256_hex(f.content.as_bytes())
        ));
    }
    sha256_hex(text.as_bytes())
}

/// Runs a tool, its stdout lines going to `progress` as they come (debootstrap prints
/// one per step); a failure carries the end of its stderr.
fn run_streaming(
    cmd: &mut Command,
    tool: &'static str,
    package: &'static str,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let what = format!("{cmd:?}");
    let errors = tempfile::tempfile().map_err(|e| ImageError::io(Path::new("/tmp"), e))?;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(
            errors
                .try_clone()
                .map_err(|e| ImageError::io(Path::new("/tmp"), e))?,
        )
        .spawn()
        .map_err(|e| spawn_error(e, tool, package))?;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if !line.trim().is_empty() {
                progress(&format!("{tool}: {}", line.trim()));
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| ImageError::io(Path::new(tool), e))?;
    if status.success() {
        return Ok(());
    }
    let mut text = String::new();
    let mut errors = errors;
    std::io::Seek::rewind(&mut errors).ok();
    errors.read_to_string(&mut text).ok();
    let tail: Vec<&str> = text.lines().rev().take(20).collect();
    Err(ImageError::CommandFailed {
        what,
        detail: format!(
            "{status}\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        ),
    })
}

fn spawn_error(e: std::io::Error, tool: &'static str, package: &'static str) -> ImageError {
    if e.kind() == std::io::ErrorKind::NotFound {
        ImageError::MissingTool { tool, package }
    } else {
        ImageError::io(Path::new(tool), e)
    }
}

fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(path).map_err(|e| ImageError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| ImageError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The one file in `dir` whose name starts with `prefix` (`vmlinuz-`, `initrd.img-`).
fn boot_file(dir: &Path, prefix: &str) -> Result<(PathBuf, String), ImageError> {
    let mut found: Vec<(PathBuf, String)> = std::fs::read_dir(dir)
        .map_err(|e| ImageError::io(dir, e))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let release = name.strip_prefix(prefix)?.to_string();
            Some((e.path(), release))
        })
        .collect();
    if found.len() != 1 {
        return Err(ImageError::Kernel(format!(
            "expected one {prefix}* in {}, found {}",
            dir.display(),
            found.len()
        )));
    }
    Ok(found.remove(0))
}

/// Whether this process runs as root: `/proc/self` belongs to the effective user.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Returns the Debian image for the current inputs, building it under `cache_dir` if
/// it is not there yet (a few minutes; needs root for debootstrap and chroot). Cached
/// builds return at once. `progress` gets one line per step.
pub fn ensure_debian_image(
    cache_dir: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<DebianImage, ImageError> {
    writable_dir(cache_dir)?;
    let images = cache_dir.join("images");
    let packages_cache = cache_dir.join("debootstrap");
    writable_dir(&images)?;
    writable_dir(&packages_cache)?;

    let (guest_path, guest) = guest_bin::find(progress)?;
    progress(&format!("tern-guest: {}", guest_path.display()));
    let guest_sha256 = sha256_hex(&guest);
    let key = debian_key(&guest_sha256);
    let dir = images.join(format!("debian-{}", &key[..16]));
    let manifest_path = dir.join("manifest.json");
    if let Some(image) =
        read_manifest::<DebianImage>(&manifest_path)?.filter(|m| m.is_complete(&key))
    {
        progress(&format!("image debian-{} is up to date", &key[..16]));
        return Ok(image);
    }
    if !is_root() {
        return Err(ImageError::NeedsRoot(
            "building the Debian image runs debootstrap and chroot".into(),
        ));
    }
    for (tool, package) in [
        ("debootstrap", "debootstrap"),
        ("mkfs.ext4", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
    ] {
        if !on_path(tool) {
            return Err(ImageError::MissingTool { tool, package });
        }
    }

    let started = Instant::now();
    let scratch = tempfile::Builder::new()
        .prefix(".build-debian-")
        .tempdir_in(&images)
        .map_err(|e| ImageError::io(&images, e))?;
    let rootfs = scratch.path().join("rootfs");
    // Declared after `scratch`, so it runs first when the build ends either way.
    let _unmount = UnmountGuard(rootfs.clone());
    let out = scratch.path().join("out");
    std::fs::create_dir(&out).map_err(|e| ImageError::io(&out, e))?;

    progress(&format!(
        "debootstrap {SUITE} from {MIRROR} (packages cached in {})",
        packages_cache.display()
    ));
    run_streaming(
        Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", PACKAGES.join(",")))
            .arg(format!("--cache-dir={}", packages_cache.display()))
            .arg(SUITE)
            .arg(&rootfs)
            .arg(MIRROR),
        "debootstrap",
        "debootstrap",
        progress,
    )?;

    progress("installing tern-guest, its units and the guest configuration");
    install_guest_files(&rootfs, &guest)?;
    let chroot = |args: &[&str]| {
        let mut c = Command::new("chroot");
        c.arg(&rootfs).args(args);
        c
    };
    let mut enable = vec!["systemctl", "enable", "--quiet"];
    enable.extend(ENABLE);
    run_streaming(&mut chroot(&enable), "chroot", "coreutils", progress)?;
    let mut mask = vec!["systemctl", "mask", "--quiet"];
    mask.extend(MASK);
    run_streaming(&mut chroot(&mask), "chroot", "coreutils", progress)?;
    progress("update-initramfs (virtio modules only)");
    run_streaming(
        &mut chroot(&["update-initramfs", "-u", "-k", "all"]),
        "chroot",
        "coreutils",
        progress,
    )?;
    trim(&rootfs)?;

    let boot = rootfs.join("boot");
    let (vmlinuz, release) = boot_file(&boot, "vmlinuz-")?;
    let (initrd, _) = boot_file(&boot, "initrd.img-")?;
    let copy = |from: &Path, name: &str| {
        let to = out.join(name);
        std::fs::copy(from, &to).map_err(|e| ImageError::io(&to, e))?;
        Ok::<PathBuf, ImageError>(to)
    };
    copy(&vmlinuz, "vmlinuz")?;
    copy(&initrd, "initrd.img")?;

    progress(&format!(
        "mkfs.ext4 -d: {DISK_MIB} MiB root filesystem from the tree"
    ));
    let raw = scratch.path().join("root.raw");
    run_streaming(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", "tern-root", "-E", "root_owner=0:0", "-d"])
            .arg(&rootfs)
            .arg(&raw)
            .arg(format!("{DISK_MIB}M")),
        "mkfs.ext4",
        "e2fsprogs",
        progress,
    )?;
    progress("qemu-img convert -c: compressed qcow2");
    run_streaming(
        Command::new("qemu-img")
            .args(["convert", "-c", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(out.join("root.qcow2")),
        "qemu-img",
        "qemu-utils",
        progress,
    )?;
    let _ = std::fs::remove_file(&raw);

    progress("hashing the files for the manifest");
    let image = DebianImage {
        key: key.clone(),
        kind: "debian".into(),
        suite: SUITE.into(),
        root_disk: dir.join("root.qcow2"),
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
        manifest: manifest_path.clone(),
        kernel_version: release,
        cmdline: CMDLINE.into(),
        control_port: CONTROL_PORT.into(),
        disk_virtual_mib: DISK_MIB,
        root_disk_sha256: sha256_file(&out.join("root.qcow2"))?,
        kernel_sha256: sha256_file(&out.join("vmlinuz"))?,
        initrd_sha256: sha256_file(&out.join("initrd.img"))?,
        tern_guest_sha256: guest_sha256,
        packages: PACKAGES.iter().map(|p| p.to_string()).collect(),
        built_at: now_rfc3339(),
        build_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
    };
    let json = serde_json::to_vec_pretty(&image).map_err(|source| ImageError::Manifest {
        path: manifest_path.clone(),
        source,
    })?;
    let mpath = out.join("manifest.json");
    std::fs::write(&mpath, json).map_err(|e| ImageError::io(&mpath, e))?;

    // Renamed into place whole, as the minimal image: of two builders one wins.
    if dir.exists() {
        if let Some(done) =
            read_manifest::<DebianImage>(&manifest_path)?.filter(|m| m.is_complete(&key))
        {
            return Ok(done);
        }
        std::fs::remove_dir_all(&dir).map_err(|e| ImageError::io(&dir, e))?;
    }
    if let Err(e) = std::fs::rename(&out, &dir) {
        return read_manifest::<DebianImage>(&manifest_path)?
            .filter(|m| m.is_complete(&key))
            .ok_or_else(|| ImageError::io(&dir, e));
    }
    progress(&format!(
        "image debian-{} built in {:.0} s: root disk {} MB (qcow2, {} MiB virtual), kernel {}",
        &key[..16],
        image.build_seconds,
        std::fs::metadata(&image.root_disk)
            .map(|m| m.len() / 1_000_000)
            .unwrap_or(0),
        DISK_MIB,
        image.kernel_version
    ));
    Ok(image)
}

/// [`ensure_debian_image`] from async code, on a blocking thread.
pub async fn ensure_debian_image_async(
    cache_dir: PathBuf,
    mut progress: impl FnMut(&str) + Send + 'static,
) -> Result<DebianImage, ImageError> {
    tokio::task::spawn_blocking(move || ensure_debian_image(&cache_dir, &mut progress))
        .await
        .expect("the image build thread does not panic")
}

/// Unmounts whatever is still mounted under the tree (debootstrap mounts `/proc` and
/// `/sys` in it and could leave them after a failure) before the scratch directory is
/// deleted, so the deletion never reaches into the host's filesystems.
struct UnmountGuard(PathBuf);

impl Drop for UnmountGuard {
    fn drop(&mut self) {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        for point in mounts_under(&mounts, &self.0) {
            let _ = Command::new("umount")
                .args(["--recursive", "--lazy"])
                .arg(&point)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// The mount points in `/proc/self/mounts` text that lie under `root`, deepest first
/// (pure). Spaces and such in the file are octal escapes (`\040`); a root with them
/// simply matches nothing, which the scratch directory's name never has.
pub fn mounts_under(mounts: &str, root: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(root))
        .collect();
    found.sort_by(|a, b| (b.components().count(), a).cmp(&(a.components().count(), b)));
    found.dedup();
    found
}

fn install_guest_files(rootfs: &Path, guest: &[u8]) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    let put = |rel: &str, data: &[u8], mode: u32| {
        let p = rootfs.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).map_err(|e| ImageError::io(d, e))?;
        }
        // Replace links (debootstrap's resolv.conf may be one) instead of following them.
        let _ = std::fs::remove_file(&p);
        std::fs::write(&p, data).map_err(|e| ImageError::io(&p, e))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(|e| ImageError::io(&p, e))
    };
    for f in guest_files() {
        put(f.path, f.content.as_bytes(), f.mode)?;
    }
    put(GUEST_BIN_PATH, guest, 0o755)
}

/// Removes what the image does not need: the build host's host keys (each VM makes its
/// own), apt's package files and lists (an `apt-get update` in the guest brings the
/// lists back).
fn trim(rootfs: &Path) -> Result<(), ImageError> {
    let ssh = rootfs.join("etc/ssh");
    for e in std::fs::read_dir(&ssh)
        .map_err(|e| ImageError::io(&ssh, e))?
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("ssh_host_") {
            std::fs::remove_file(e.path()).map_err(|err| ImageError::io(&e.path(), err))?;
        }
    }
    for d in ["var/cache/apt", "var/lib/apt/lists"] {
        let d = rootfs.join(d);
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let r = if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(|err| ImageError::io(&p, err))?;
        }
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .chain(["/usr/sbin".into(), "/sbin".into()])
                .any(|d| d.join(tool).is_file())
        })
        .unwrap_or(false)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_follows_the_guest_binary_and_is_stable() {
        assert_eq!(debian_key("a"), debian_key("a"));
        assert_ne!(debian_key("a"), debian_key("b"));
    }

    #[test]
    fn guest_files_are_relative_and_unique() {
        let files = guest_files();
        let mut paths: Vec<_> = files.iter().map(|f| f.path).collect();
        paths.sort();
        paths.dedup();
        assert_eq!(paths.len(), files.len());
        assert!(files.iter().all(|f| !f.path.starts_with('/')));
    }

    #[test]
    fn the_units_start_what_the_host_expects() {
        // The agent talks to the port the minimal image uses.
        assert!(TERN_GUEST_UNIT.contains(CONTROL_PORT));
        assert!(TERN_GUEST_UNIT.contains("ExecStopPost=-/usr/local/bin/tern-guest thaw"));
        // The config is applied before the services that read it.
        for after in ["ssh.service", "systemd-networkd.service"] {
            assert!(TERN_CONFIG_UNIT.contains(after));
        }
        assert!(TERN_CONFIG_UNIT.contains("modprobe qemu_fw_cfg"));
        assert!(CMDLINE.contains("root=/dev/vda") && CMDLINE.contains("console=ttyS0"));
    }

    #[test]
    fn only_mounts_under_the_tree_are_unmounted_deepest_first() {
        let mounts = "proc /proc proc rw 0 0\n\
            proc /b/rootfs/proc proc rw 0 0\n\
            sysfs /b/rootfs/sys sysfs rw 0 0\n\
            binfmt /b/rootfs/proc/sys/fs/binfmt_misc binfmt_misc rw 0 0\n\
            tmpfs /b/rootfs2 tmpfs rw 0 0\n";
        let got = mounts_under(mounts, Path::new("/b/rootfs"));
        assert_eq!(got[0], Path::new("/b/rootfs/proc/sys/fs/binfmt_misc"));
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(!got.contains(&PathBuf::from("/b/rootfs2")));
    }

    #[test]
    fn boot_files_are_found_once() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vmlinuz-6.1.0-9-cloud-amd64"), b"k").unwrap();
        std::fs::write(d.path().join("config-6.1.0-9-cloud-amd64"), b"c").unwrap();
        let (p, release) = boot_file(d.path(), "vmlinuz-").unwrap();
        assert_eq!(release, "6.1.0-9-cloud-amd64");
        assert!(p.ends_with("vmlinuz-6.1.0-9-cloud-amd64"));
        assert!(boot_file(d.path(), "initrd.img-").is_err());
    }
}
