//! Where the static `tern-guest` binary for the image comes from.
//!
//! In order: the file named by `TERN_GUEST_BIN`; a build from this source tree (when
//! the tree that built this library is still there), with glibc linked statically into
//! a target directory of its own so the flags do not invalidate the main build; a
//! `tern-guest` next to the running executable. Whatever is found must be a static
//! ELF, because the guest has no libraries.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{elf, ImageError};

/// Environment variable naming a prebuilt static `tern-guest`.
pub const ENV_GUEST_BIN: &str = "TERN_GUEST_BIN";

/// The workspace that built this crate, if its sources are still there.
fn source_tree() -> Option<PathBuf> {
    let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .ok()?;
    ws.join("crates/tern-guest/Cargo.toml")
        .is_file()
        .then_some(ws)
}

/// Builds `tern-guest` statically from `workspace`; returns the binary's path.
fn build(workspace: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, ImageError> {
    let target_dir = workspace.join("target/guest");
    progress(
        "building the static tern-guest (cargo, target/guest; a minute or two the first time)",
    );
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            "tern-guest",
            "--target",
            "x86_64-unknown-linux-gnu",
            "--target-dir",
        ])
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        // The unit separator is how cargo takes several flags in one variable.
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-C\x1ftarget-feature=+crt-static\x1f-C\x1fstrip=debuginfo",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|_| ImageError::MissingTool {
            tool: "cargo",
            package: "the Rust toolchain (rustup)",
        })?;
    if !out.status.success() {
        return Err(ImageError::CommandFailed {
            what: "cargo build --release -p tern-guest (static)".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(target_dir.join("x86_64-unknown-linux-gnu/release/tern-guest"))
}

/// The bytes of a static `tern-guest`.
pub fn find(progress: &mut dyn FnMut(&str)) -> Result<(PathBuf, Vec<u8>), ImageError> {
    let path = if let Some(p) = std::env::var_os(ENV_GUEST_BIN) {
        PathBuf::from(p)
    } else if let Some(ws) = source_tree() {
        build(&ws, progress)?
    } else {
        let sibling = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("tern-guest")))
            .filter(|p| p.is_file());
        sibling.ok_or_else(|| {
            ImageError::GuestBinary(format!(
                "no tern-guest binary: set {ENV_GUEST_BIN} to a statically linked tern-guest \
                 or put one next to this executable"
            ))
        })?
    };
    let bytes = std::fs::read(&path).map_err(|e| {
        ImageError::GuestBinary(format!("cannot read tern-guest at {}: {e}", path.display()))
    })?;
    check_static(&path, &bytes)?;
    Ok((path, bytes))
}

/// Refuses a binary that needs a dynamic loader the guest does not have.
pub fn check_static(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    match elf::is_static(bytes) {
        Some(true) => Ok(()),
        Some(false) => Err(ImageError::GuestBinary(format!(
            "{} is dynamically linked; the guest has no libraries. Build it with \
             RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p tern-guest \
             --target x86_64-unknown-linux-gnu",
            path.display()
        ))),
        None => Err(ImageError::GuestBinary(format!(
            "{} is not an x86-64 ELF program",
            path.display()
        ))),
    }
}
