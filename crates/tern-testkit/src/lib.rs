//! Helpers for tern's tests: whether this machine can run a test that boots QEMU guests
//! or builds a lab, and where tests share their guest image. Only ever a
//! dev-dependency; no production code calls it.
//!
//! A test that cannot run here says what is missing on stderr and passes, except under
//! `CI`, where `scripts/setup` installs everything and a missing piece is a failure.
//!
//! # Layout
//! - [`test_cache_dir`]: the image and kernel cache all tests share.
//! - [`require_qemu`], [`require_lab`]: skip, or fail under `CI`; [`is_root`].
//! - [`assert_generated`]: a checked-in file equals what the code generates.
//! - [`qemus_under`]: the QEMU processes a test left, [`free_port`]: a loopback port.

use std::path::{Path, PathBuf};
use std::process::Command;

/// `$TERN_CACHE`, else `target/tern-cache` in this build tree, so every test run shares
/// one image and one kernel download.
pub fn test_cache_dir() -> PathBuf {
    match std::env::var_os("TERN_CACHE").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/tern-cache"),
    }
}

/// Whether `qemu-system-x86_64` runs here. When it does not, says so on stderr and
/// returns false, except under `CI`, where a missing QEMU is a failure.
pub fn require_qemu() -> bool {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-system-x86_64 is missing but CI is set: scripts/setup installs it"
        );
        eprintln!("SKIP: qemu-system-x86_64 is not installed (Debian: qemu-system-x86)");
    }
    found
}

/// For tests that build a lab: whether this machine can (root, `ip`, `ping`, QEMU, and
/// the caller's `extra` needs as `(what, present)`). When it cannot, prints what is
/// missing and returns false, except under `CI`, where a missing piece is a failure.
pub fn require_lab(test: &str, extra: &[(&str, bool)]) -> bool {
    let runs = |p: &str| Command::new(p).arg("-V").output().is_ok();
    let mut needs = vec![
        ("root", is_root()),
        ("ip (iproute2)", runs("ip")),
        ("ping (iputils-ping)", runs("ping")),
        ("qemu-system-x86_64", runs("qemu-system-x86_64")),
    ];
    needs.extend_from_slice(extra);
    let missing: Vec<&str> = needs
        .into_iter()
        .filter_map(|(what, ok)| (!ok).then_some(what))
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs {missing:?}, which CI must provide (scripts/setup)"
    );
    eprintln!("SKIP: {test} needs {missing:?}");
    false
}

/// Whether the effective uid (the third field of `Uid:` in `/proc/self/status`) is 0.
/// Whether this process runs as root.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// Checks that the checked-in file `path` (relative to the repository root) holds
/// `generated`; under `TERN_BLESS=1` writes it instead. The failure says `regenerate`,
/// the command that rewrites it.
pub fn assert_generated(path: &str, generated: &str, regenerate: &str) {
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    if std::env::var_os("TERN_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&file, generated).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        return;
    }
    let committed = std::fs::read_to_string(&file).unwrap_or_default();
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        panic!(
            "{path} differs from what the code generates (first at line {}); regenerate it \
             with `{regenerate}` and commit it",
            line + 1
        );
    }
}

/// Every QEMU process whose command line names `dir` (a test's state directory: QEMU's
/// sockets and pid file lie under it), from `/proc`; zombies have no command line.
pub fn qemus_under(dir: &Path) -> Vec<u32> {
    let dir = dir.to_string_lossy().into_owned();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("qemu-system") && cmd.contains(&dir)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// A loopback port free at the time of the call.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_dir_follows_tern_cache() {
        // Only this test in this binary touches TERN_CACHE.
        std::env::set_var("TERN_CACHE", "/tmp/tern-testkit-cache");
        assert_eq!(test_cache_dir(), PathBuf::from("/tmp/tern-testkit-cache"));
        std::env::set_var("TERN_CACHE", "");
        assert!(test_cache_dir().ends_with("../../target/tern-cache"));
    }
}
