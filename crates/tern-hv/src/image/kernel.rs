//! The guest kernel: finding Debian's cloud kernel package, fetching it, and taking
//! `vmlinuz` and the modules the guest needs (with their dependencies) out of it.
//!
//! Debian's kernel packages ship no `modules.dep` (it is made by `depmod` at install
//! time), so dependencies come from each module's own `.modinfo` `depends=` list.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::elf;
use super::ImageError;

/// The meta-package that always depends on the current cloud kernel.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the guest loads; their dependencies are added. Block is optional for the
/// guest (it runs from its initramfs) but cheap, and lets a host attach a disk on
/// either bus (`virtio_scsi` finds the controller, `sd_mod` makes its disks `sdX`).
/// `pvpanic_pci` tells QEMU when the kernel panics, so the host sees the panic.
/// `unix_diag` lets the agent see which unix socket is connected to which (taint
/// tracking).
pub const WANTED_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_console",
    "virtio_blk",
    "qemu_fw_cfg",
    "pvpanic_pci",
    "virtio_scsi",
    "sd_mod",
    "unix_diag",
];

/// The concrete kernel package behind the meta-package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    /// e.g. `linux-image-6.1.0-56-cloud-amd64`.
    pub name: String,
    /// Debian version, e.g. `6.1.192-2`.
    pub version: String,
}

impl KernelPackage {
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub fn release(&self) -> &str {
        self.name.strip_prefix("linux-image-").unwrap_or(&self.name)
    }

    /// The file name `apt-get download` gives the package (`:` in versions becomes `%3a`).
    pub fn deb_file_name(&self) -> String {
        format!(
            "{}_{}_amd64.deb",
            self.name,
            self.version.replace(':', "%3a")
        )
    }
}

/// The first `Version:` in `apt-cache show` output.
pub fn parse_version(output: &str) -> Option<String> {
    output
        .lines()
        .find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_string()))
}

fn run(cmd: &mut Command, tool: &'static str, package: &'static str) -> Result<String, ImageError> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            ImageError::MissingTool { tool, package }
        } else {
            ImageError::Io {
                path: PathBuf::from(tool),
                source: e,
            }
        }
    })?;
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            what: format!("{cmd:?}"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The kernel package a meta-package's `apt-cache show` pins, e.g. from
/// `Depends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)`; the version is `None`
/// when the dependency is not pinned.
pub fn parse_meta_show(output: &str) -> Option<(String, Option<String>)> {
    let deps = output.lines().find_map(|l| l.strip_prefix("Depends:"))?;
    deps.split([',', '|']).find_map(|dep| {
        let dep = dep.trim();
        let (name, rest) = dep.split_once(' ').unwrap_or((dep, ""));
        let version = rest
            .trim()
            .strip_prefix("(=")
            .and_then(|v| v.strip_suffix(')'))
            .map(|v| v.trim().to_string());
        name.starts_with("linux-image-")
            .then(|| (name.to_string(), version))
    })
}

/// Asks apt which kernel package the meta-package stands for, and its version. One
/// `apt-cache` call where the meta-package pins the version (Debian's does), because
/// each call rebuilds apt's cache in memory on hosts that keep none (seconds).
pub fn resolve() -> Result<KernelPackage, ImageError> {
    let missing = |detail: String| ImageError::MissingPackage {
        package: META_PACKAGE.to_string(),
        detail,
    };
    let meta = run(
        Command::new("apt-cache").args(["show", "--no-all-versions", META_PACKAGE]),
        "apt-cache",
        "apt",
    )
    .map_err(|e| missing(e.to_string()))?;
    let (name, pinned) = parse_meta_show(&meta).ok_or_else(|| {
        missing(format!(
            "apt-cache shows no linux-image-* dependency:\n{meta}"
        ))
    })?;
    if let Some(version) = pinned {
        return Ok(KernelPackage { name, version });
    }
    let show = run(
        Command::new("apt-cache").args(["show", "--no-all-versions", &name]),
        "apt-cache",
        "apt",
    )
    .map_err(|e| ImageError::MissingPackage {
        package: name.clone(),
        detail: e.to_string(),
    })?;
    let version = parse_version(&show).ok_or_else(|| ImageError::MissingPackage {
        package: name.clone(),
        detail: "apt-cache shows no Version".into(),
    })?;
    Ok(KernelPackage { name, version })
}

/// Fetches the package into `dir` unless it is there already; returns its path.
pub fn download(pkg: &KernelPackage, dir: &Path) -> Result<PathBuf, ImageError> {
    let path = dir.join(pkg.deb_file_name());
    if path.is_file() {
        return Ok(path);
    }
    // Download into a scratch directory and rename, so a second builder running at
    // the same time never sees half a file.
    let scratch = tempfile::Builder::new()
        .prefix(".download-")
        .tempdir_in(dir)
        .map_err(|e| ImageError::io(dir, e))?;
    let spec = format!("{}={}", pkg.name, pkg.version);
    run(
        Command::new("apt-get")
            .args(["download", "-q", &spec])
            .current_dir(scratch.path()),
        "apt-get",
        "apt",
    )
    .map_err(|e| ImageError::MissingPackage {
        package: pkg.name.clone(),
        detail: e.to_string(),
    })?;
    let got = std::fs::read_dir(scratch.path())
        .map_err(|e| ImageError::io(scratch.path(), e))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| ImageError::MissingPackage {
            package: pkg.name.clone(),
            detail: "apt-get download produced no .deb".into(),
        })?;
    std::fs::rename(&got, &path).map_err(|e| ImageError::io(&path, e))?;
    Ok(path)
}

/// The package file's SHA-256, kept beside it in `NAME.deb.sha256`: the file name
/// carries the version and the file is only ever renamed into place whole, so the
/// hash is computed once instead of on every (cached) build.
pub fn deb_sha256(deb: &Path) -> Result<String, ImageError> {
    let mut side = deb.as_os_str().to_owned();
    side.push(".sha256");
    let side = PathBuf::from(side);
    if let Ok(h) = std::fs::read_to_string(&side) {
        let h = h.trim();
        if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(h.to_string());
        }
    }
    let bytes = std::fs::read(deb).map_err(|e| ImageError::io(deb, e))?;
    let h = super::sha256_hex(&bytes);
    let dir = deb.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(|e| ImageError::io(dir, e))?;
    std::io::Write::write_all(&mut tmp, h.as_bytes()).map_err(|e| ImageError::io(&side, e))?;
    tmp.persist(&side)
        .map_err(|e| ImageError::io(&side, e.error))?;
    Ok(h)
}

/// How a module file in the package is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Xz,
    Zstd,
}

impl Compression {
    fn of(path: &str) -> Option<Compression> {
        if path.ends_with(".ko") {
            Some(Compression::None)
        } else if path.ends_with(".ko.xz") {
            Some(Compression::Xz)
        } else if path.ends_with(".ko.zst") {
            Some(Compression::Zstd)
        } else {
            None
        }
    }
}

/// What the builder takes from the kernel package.
pub struct KernelFiles {
    pub vmlinuz: Vec<u8>,
    /// Module name (underscores) to its bytes as packed.
    pub modules: BTreeMap<String, (Compression, Vec<u8>)>,
    /// Names of modules built into the kernel (nothing to load).
    pub builtin: BTreeSet<String>,
}

/// Module names use `_`; file names sometimes `-` (`virtio-rng.ko`).
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Reads the package's file tree through `dpkg-deb --fsys-tarfile`.
pub fn read_deb(deb: &Path, release: &str) -> Result<KernelFiles, ImageError> {
    let mut child = Command::new("dpkg-deb")
        .arg("--fsys-tarfile")
        .arg(deb)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ImageError::MissingTool {
                tool: "dpkg-deb",
                package: "dpkg",
            },
            _ => ImageError::io(deb, e),
        })?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| ImageError::io(deb, std::io::Error::other("no stdout")))?;
    let files = read_tar(stdout, release).map_err(|e| ImageError::io(deb, e))?;
    let out = child
        .wait_with_output()
        .map_err(|e| ImageError::io(deb, e))?;
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            what: format!("dpkg-deb --fsys-tarfile {}", deb.display()),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    files.ok_or_else(|| {
        ImageError::Kernel(format!("{} holds no boot/vmlinuz-{release}", deb.display()))
    })
}

fn read_tar(input: impl Read, release: &str) -> std::io::Result<Option<KernelFiles>> {
    let vmlinuz_path = format!("boot/vmlinuz-{release}");
    let mod_dir = format!("lib/modules/{release}/");
    let mut vmlinuz = None;
    let mut modules = BTreeMap::new();
    let mut builtin = BTreeSet::new();
    let mut archive = tar::Archive::new(input);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry
            .path()?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        if path == vmlinuz_path {
            let mut b = Vec::new();
            entry.read_to_end(&mut b)?;
            vmlinuz = Some(b);
        } else if let Some(rel) = path.strip_prefix(&mod_dir) {
            if rel == "modules.builtin" {
                let mut s = String::new();
                entry.read_to_string(&mut s)?;
                builtin.extend(s.lines().map(module_name));
            } else if let Some(c) = Compression::of(rel) {
                let mut b = Vec::new();
                entry.read_to_end(&mut b)?;
                modules.insert(module_name(rel), (c, b));
            }
        }
    }
    Ok(vmlinuz.map(|vmlinuz| KernelFiles {
        vmlinuz,
        modules,
        builtin,
    }))
}

/// The module's uncompressed bytes (via `xz`/`zstd` for compressed modules).
pub fn decompress(name: &str, c: Compression, bytes: &[u8]) -> Result<Vec<u8>, ImageError> {
    let (tool, package) = match c {
        Compression::None => return Ok(bytes.to_vec()),
        Compression::Xz => ("xz", "xz-utils"),
        Compression::Zstd => ("zstd", "zstd"),
    };
    let mut child = Command::new(tool)
        .args(["-d", "-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|_| ImageError::MissingTool { tool, package })?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| ImageError::Kernel(format!("{tool}: no stdin")))?;
    let input = bytes.to_vec();
    // Feed from a thread so a full stdout pipe cannot deadlock against our write.
    let feeder = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &input));
    let out = child
        .wait_with_output()
        .map_err(|e| ImageError::Kernel(format!("{tool} on {name}: {e}")))?;
    let _ = feeder.join();
    if !out.status.success() {
        return Err(ImageError::Kernel(format!(
            "{tool} could not decompress module {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// A module's direct dependencies, `None` if there is no such module.
type DependsOf<'a> = dyn FnMut(&str) -> Result<Option<Vec<String>>, ImageError> + 'a;

/// Orders `wanted` and everything they depend on so each module comes after its
/// dependencies; built-in modules are left out. `depends_of` returns a module's
/// direct dependencies, or `None` if the package has no such module.
pub fn load_order(
    wanted: &[&str],
    builtin: &BTreeSet<String>,
    mut depends_of: impl FnMut(&str) -> Result<Option<Vec<String>>, ImageError>,
) -> Result<Vec<String>, ImageError> {
    fn visit(
        name: &str,
        builtin: &BTreeSet<String>,
        depends_of: &mut DependsOf<'_>,
        done: &mut BTreeSet<String>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), ImageError> {
        if done.contains(name) || builtin.contains(name) {
            return Ok(());
        }
        if stack.iter().any(|s| s == name) {
            return Err(ImageError::Kernel(format!(
                "module dependency cycle: {} -> {name}",
                stack.join(" -> ")
            )));
        }
        let deps = depends_of(name)?.ok_or_else(|| {
            ImageError::Kernel(format!(
                "the kernel package has no module {name} and it is not built in{}",
                match stack.last() {
                    Some(parent) => format!(" (needed by {parent})"),
                    None => String::new(),
                }
            ))
        })?;
        stack.push(name.to_string());
        for d in deps {
            visit(&d, builtin, depends_of, done, stack, order)?;
        }
        stack.pop();
        done.insert(name.to_string());
        order.push(name.to_string());
        Ok(())
    }
    let (mut done, mut stack, mut order) = (BTreeSet::new(), Vec::new(), Vec::new());
    for w in wanted {
        visit(
            w,
            builtin,
            &mut depends_of,
            &mut done,
            &mut stack,
            &mut order,
        )?;
    }
    Ok(order)
}

/// The wanted modules, uncompressed, in load order.
pub fn guest_modules(files: &KernelFiles) -> Result<Vec<(String, Vec<u8>)>, ImageError> {
    let mut plain: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let order = load_order(WANTED_MODULES, &files.builtin, |name| {
        let Some((c, bytes)) = files.modules.get(name) else {
            return Ok(None);
        };
        let ko = decompress(name, *c, bytes)?;
        let info = elf::modinfo(&ko)
            .ok_or_else(|| ImageError::Kernel(format!("module {name} has no readable .modinfo")))?;
        plain.insert(name.to_string(), ko);
        Ok(Some(info.depends))
    })?;
    Ok(order
        .into_iter()
        .filter_map(|n| plain.remove(&n).map(|b| (n, b)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn apt_output_parses() {
        let meta = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-2\nDepends: linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)\n";
        assert_eq!(
            parse_meta_show(meta),
            Some((
                "linux-image-6.1.0-56-cloud-amd64".into(),
                Some("6.1.192-2".into())
            ))
        );
        assert_eq!(
            parse_meta_show("Depends: initramfs-tools | linux-initramfs-tool, linux-image-6.1.0-9-cloud-amd64\n"),
            Some(("linux-image-6.1.0-9-cloud-amd64".into(), None))
        );
        assert_eq!(parse_meta_show("Depends: libc6 (>= 2.36)\n"), None);
        assert_eq!(parse_meta_show("Package: x\n"), None);
        assert_eq!(
            parse_version("Package: a\nVersion: 6.1.192-2\nVersion: 1\n").as_deref(),
            Some("6.1.192-2")
        );
        let k = KernelPackage {
            name: "linux-image-6.1.0-56-cloud-amd64".into(),
            version: "1:6.1.192-2".into(),
        };
        assert_eq!(k.release(), "6.1.0-56-cloud-amd64");
        assert_eq!(
            k.deb_file_name(),
            "linux-image-6.1.0-56-cloud-amd64_1%3a6.1.192-2_amd64.deb"
        );
    }

    #[test]
    fn deb_hash_is_computed_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let deb = dir.path().join("k_1_amd64.deb");
        std::fs::write(&deb, b"abc").unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(deb_sha256(&deb).unwrap(), want);
        let side = dir.path().join("k_1_amd64.deb.sha256");
        assert_eq!(std::fs::read_to_string(&side).unwrap(), want);
        // The kept hash is what counts now; a broken one is recomputed.
        std::fs::write(&side, "f".repeat(64)).unwrap();
        assert_eq!(deb_sha256(&deb).unwrap(), "f".repeat(64));
        std::fs::write(&side, "junk").unwrap();
        assert_eq!(deb_sha256(&deb).unwrap(), want);
    }

    #[test]
    fn module_names_normalise() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko"),
            "virtio_rng"
        );
        assert_eq!(
            module_name("kernel/drivers/net/virtio_net.ko.zst"),
            "virtio_net"
        );
        assert_eq!(Compression::of("a.ko.xz"), Some(Compression::Xz));
        assert_eq!(Compression::of("modules.order"), None);
    }

    fn graph() -> BTreeMap<&'static str, Vec<String>> {
        BTreeMap::from([
            (
                "virtio_net",
                vec!["net_failover".to_string(), "virtio".to_string()],
            ),
            ("net_failover", vec!["failover".to_string()]),
            ("failover", vec![]),
            ("virtio", vec![]),
            (
                "virtio_pci",
                vec!["virtio".to_string(), "virtio_ring".to_string()],
            ),
            ("virtio_ring", vec![]),
        ])
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let g = graph();
        let order = load_order(&["virtio_pci", "virtio_net"], &BTreeSet::new(), |n| {
            Ok(g.get(n).cloned())
        })
        .unwrap();
        assert_eq!(
            order,
            [
                "virtio",
                "virtio_ring",
                "virtio_pci",
                "failover",
                "net_failover",
                "virtio_net"
            ]
        );
        let builtin = BTreeSet::from(["virtio".to_string(), "virtio_ring".to_string()]);
        let order = load_order(&["virtio_pci"], &builtin, |n| Ok(g.get(n).cloned())).unwrap();
        assert_eq!(order, ["virtio_pci"]);
    }

    #[test]
    fn missing_modules_and_cycles_are_named() {
        let g = graph();
        let err =
            load_order(&["virtio_gpu"], &BTreeSet::new(), |n| Ok(g.get(n).cloned())).unwrap_err();
        assert!(err.to_string().contains("no module virtio_gpu"), "{err}");
        let cyc = BTreeMap::from([("a", vec!["b".to_string()]), ("b", vec!["a".to_string()])]);
        let err = load_order(&["a"], &BTreeSet::new(), |n| Ok(cyc.get(n).cloned())).unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
    }

    proptest! {
        /// On any acyclic graph (edges only to lower numbers), every module comes
        /// after all of its dependencies and appears once.
        #[test]
        fn order_respects_every_edge(edges in proptest::collection::vec(proptest::collection::vec(0usize..20, 0..4), 1..20)) {
            let deps: Vec<Vec<String>> = edges.iter().enumerate()
                .map(|(i, ds)| ds.iter().filter(|&&d| d < i).map(|d| format!("m{d}")).collect())
                .collect();
            let wanted: Vec<String> = (0..deps.len()).rev().map(|i| format!("m{i}")).collect();
            let wanted_refs: Vec<&str> = wanted.iter().map(String::as_str).collect();
            let order = load_order(&wanted_refs, &BTreeSet::new(), |n| {
                Ok(n[1..].parse::<usize>().ok().and_then(|i| deps.get(i).cloned()))
            }).unwrap();
            prop_assert_eq!(order.len(), deps.len());
            let pos = |n: &str| order.iter().position(|o| o == n).unwrap();
            for (i, ds) in deps.iter().enumerate() {
                for d in ds {
                    let me = format!("m{}", i);
                    prop_assert!(pos(d) < pos(&me));
                }
            }
        }
    }
}
