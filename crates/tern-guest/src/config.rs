//! Applying the configuration the host hands the guest through QEMU's fw_cfg
//! (`tern_api::guest_config`): `tern-guest apply-config` in the Debian image, run once
//! at boot before the network and sshd start.
//!
//! [`plan`] turns a config into the files to write (pure, tested); [`apply`] writes
//! them under a root directory and sets the running host name.

use std::path::{Path, PathBuf};

use tern_api::guest_config::{parse_cidr, GuestConfig};

/// Where the kernel's `qemu_fw_cfg` module shows the host's item.
pub const FW_CFG_RAW: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/tern/config/raw";

/// The interface the config's address goes to: the image boots with `net.ifnames=0`, so
/// the first virtio NIC is `eth0`.
pub const FIRST_NIC: &str = "eth0";

/// systemd-networkd's file for the first NIC.
pub const NETWORK_FILE: &str = "etc/systemd/network/10-tern-eth0.network";

/// One file to write, relative to the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWrite {
    pub path: PathBuf,
    pub content: String,
    pub mode: u32,
}

/// The files `cfg` asks for. Nothing for fields that are absent, so an image's own
/// defaults (its host name, no network) stay.
pub fn plan(cfg: &GuestConfig) -> Result<Vec<FileWrite>, String> {
    cfg.validate()?;
    let mut out = Vec::new();
    let file = |path: &str, content: String, mode: u32| FileWrite {
        path: PathBuf::from(path),
        content,
        mode,
    };
    if let Some(h) = &cfg.hostname {
        out.push(file("etc/hostname", format!("{h}\n"), 0o644));
        let short = h.split('.').next().unwrap_or(h);
        let alias = if short == h {
            h.clone()
        } else {
            format!("{h} {short}")
        };
        out.push(file(
            "etc/hosts",
            format!("127.0.0.1\tlocalhost\n127.0.1.1\t{alias}\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
            0o644,
        ));
    }
    if !cfg.ssh_authorized_keys.is_empty() {
        let mut keys = cfg.ssh_authorized_keys.join("\n");
        keys.push('\n');
        out.push(file("root/.ssh/authorized_keys", keys, 0o600));
    }
    if let Some(addr) = &cfg.address {
        let cidr = parse_cidr(addr)?;
        let mut net = format!(
            "[Match]\nName={FIRST_NIC}\n\n[Network]\nAddress={cidr}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"
        );
        if let Some(gw) = &cfg.gateway {
            net.push_str(&format!("Gateway={gw}\n"));
        }
        out.push(file(NETWORK_FILE, net, 0o644));
    }
    if !cfg.dns.is_empty() {
        // No resolved in the image: the resolver reads this file directly.
        let text: String = cfg
            .dns
            .iter()
            .map(|d| format!("nameserver {d}\n"))
            .collect();
        out.push(file("etc/resolv.conf", text, 0o644));
    }
    Ok(out)
}

/// Parses the fw_cfg item (JSON) into a config, checked.
pub fn parse(raw: &[u8]) -> Result<GuestConfig, String> {
    let cfg: GuestConfig =
        serde_json::from_slice(raw).map_err(|e| format!("the configuration is not valid: {e}"))?;
    cfg.validate()?;
    Ok(cfg)
}

/// Writes the planned files under `root` (each through a temporary file and a rename,
/// so a crash leaves the old file or the new one). Directories are made as needed
/// (`root/.ssh` with mode 0700, others 0755).
pub fn write_files(root: &Path, files: &[FileWrite]) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    for f in files {
        let path = root.join(&f.path);
        let dir = path.parent().unwrap_or(root);
        // A private file's new directories are private too (`.ssh`); others must stay
        // readable to the services that read them (networkd runs as its own user).
        let dir_mode = if f.mode & 0o077 == 0 { 0o700 } else { 0o755 };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(dir_mode)
            .create(dir)?;
        let tmp = dir.join(format!(
            ".{}.tern-new",
            path.file_name().unwrap_or_default().to_string_lossy()
        ));
        // A stale symlink or file of that name is replaced, never followed.
        let _ = std::fs::remove_file(&tmp);
        std::fs::write(&tmp, &f.content)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(f.mode))?;
        // /etc/resolv.conf may be a dangling symlink to resolved's file: replace the link.
        let _ = std::fs::remove_file(&path);
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

/// Sets the running kernel's host name (the file is for the next boot and for tools).
pub fn set_hostname(name: &str) -> std::io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The parts of `cfg` an init script without systemd applies itself, as shell
/// assignments (`tern_hostname`, `tern_address`, `tern_gateway`; empty when absent),
/// each value single-quoted so that `eval` only assigns (pure).
pub fn shell_vars(cfg: &GuestConfig) -> String {
    let q = |v: &Option<String>| format!("'{}'", v.as_deref().unwrap_or("").replace('\'', r"'\''"));
    format!(
        "tern_hostname={}\ntern_address={}\ntern_gateway={}\n",
        q(&cfg.hostname),
        q(&cfg.address),
        q(&cfg.gateway)
    )
}

/// Reads the fw_cfg item at `source` and applies it under `root`. `Ok(None)` when the
/// host gave no configuration (the item does not exist).
pub fn apply(source: &Path, root: &Path) -> Result<Option<GuestConfig>, String> {
    let raw = match std::fs::read(source) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", source.display())),
    };
    let cfg = parse(&raw)?;
    let files = plan(&cfg)?;
    write_files(root, &files).map_err(|e| format!("writing under {}: {e}", root.display()))?;
    if let Some(h) = &cfg.hostname {
        if root == Path::new("/") {
            set_hostname(h).map_err(|e| format!("sethostname {h:?}: {e}"))?;
        }
    }
    Ok(Some(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHa9Hj3bcM6Y2tF2h0s5p3pQH0d8s0m6V7v1l2kq3Xz0 me";

    fn full() -> GuestConfig {
        GuestConfig {
            hostname: Some("web-1.example".into()),
            ssh_authorized_keys: vec![KEY.into(), KEY.replace(" me", " you")],
            address: Some("198.18.1.10/15".into()),
            gateway: Some("198.18.0.1".into()),
            dns: vec!["198.18.0.1".into()],
        }
    }

    fn content<'a>(files: &'a [FileWrite], path: &str) -> Option<&'a FileWrite> {
        files.iter().find(|f| f.path == Path::new(path))
    }

    #[test]
    fn a_full_config_plans_every_file() {
        let files = plan(&full()).unwrap();
        assert_eq!(
            content(&files, "etc/hostname").unwrap().content,
            "web-1.example\n"
        );
        assert!(content(&files, "etc/hosts")
            .unwrap()
            .content
            .contains("127.0.1.1\tweb-1.example web-1\n"));
        let keys = content(&files, "root/.ssh/authorized_keys").unwrap();
        assert_eq!(keys.mode, 0o600);
        assert_eq!(keys.content.lines().count(), 2);
        let net = &content(&files, NETWORK_FILE).unwrap().content;
        assert!(net.contains("Name=eth0\n"), "{net}");
        assert!(net.contains("Address=198.18.1.10/15\n"), "{net}");
        assert!(net.contains("Gateway=198.18.0.1\n"), "{net}");
        assert_eq!(
            content(&files, "etc/resolv.conf").unwrap().content,
            "nameserver 198.18.0.1\n"
        );
    }

    #[test]
    fn shell_vars_only_assign() {
        assert_eq!(
            shell_vars(&full()),
            "tern_hostname='web-1.example'\ntern_address='198.18.1.10/15'\ntern_gateway='198.18.0.1'\n"
        );
        assert_eq!(
            shell_vars(&GuestConfig::default()),
            "tern_hostname=''\ntern_address=''\ntern_gateway=''\n"
        );
        // Validation refuses such a name; the quoting holds even so.
        let odd = GuestConfig {
            hostname: Some("a'; reboot; '".into()),
            ..GuestConfig::default()
        };
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{}printf %s \"$tern_hostname\"", shell_vars(&odd)))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a'; reboot; '");
    }

    #[test]
    fn an_empty_config_writes_nothing() {
        assert!(plan(&GuestConfig::default()).unwrap().is_empty());
        let only_name = GuestConfig {
            hostname: Some("solo".into()),
            ..GuestConfig::default()
        };
        let files = plan(&only_name).unwrap();
        assert_eq!(files.len(), 2, "{files:?}");
        assert!(content(&files, "etc/hosts")
            .unwrap()
            .content
            .contains("\tsolo\n"));
    }

    #[test]
    fn a_bad_config_is_refused_not_half_applied() {
        let raw = br#"{"hostname": "ok", "ssh_authorized_keys": ["rm -rf /"]}"#;
        let e = parse(raw).unwrap_err();
        assert!(e.contains("ssh_authorized_keys[0]"), "{e}");
        assert!(parse(b"not json").unwrap_err().contains("not valid"));
    }

    #[test]
    fn apply_writes_under_a_root_and_ignores_a_missing_item() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(
            apply(&root.path().join("no-such-item"), root.path()).unwrap(),
            None
        );
        let src = root.path().join("raw");
        std::fs::write(&src, serde_json::to_vec(&full()).unwrap()).unwrap();
        // An existing dangling link, as resolved leaves /etc/resolv.conf, is replaced.
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/nonexistent", root.path().join("etc/resolv.conf")).unwrap();
        let cfg = apply(&src, root.path()).unwrap().unwrap();
        assert_eq!(cfg, full());
        let keys = root.path().join("root/.ssh/authorized_keys");
        assert!(std::fs::read_to_string(&keys).unwrap().starts_with(KEY));
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&keys), 0o600);
        assert_eq!(mode(&root.path().join("root/.ssh")), 0o700);
        let resolv = root.path().join("etc/resolv.conf");
        assert!(!resolv.is_symlink());
        assert_eq!(
            std::fs::read_to_string(resolv).unwrap(),
            "nameserver 198.18.0.1\n"
        );
    }
}
