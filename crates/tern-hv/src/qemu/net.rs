//! Tap devices on the host's bridge: a guest's NIC is a tap enslaved to the per-host
//! bridge, so on every host the guest sits on the same L2 segment and keeps its address.

use crate::error::{HvError, Result};

/// Runs a host command, turning a non-zero exit into an error with its stderr.
pub async fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(HvError::io(format!("running {program}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(HvError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Creates `tap` and attaches it to `bridge`, up.
pub async fn create_tap(tap: &str, bridge: &str) -> Result<()> {
    // A tap left by a QEMU that died without cleanup would make `add` fail.
    let _ = remove_tap(tap).await;
    run("ip", &["tuntap", "add", "dev", tap, "mode", "tap"]).await?;
    let attached = run("ip", &["link", "set", tap, "master", bridge, "up"]).await;
    if attached.is_err() {
        let _ = remove_tap(tap).await;
    }
    attached
}

/// Removes `tap`; an absent tap is not an error.
pub async fn remove_tap(tap: &str) -> Result<()> {
    match run("ip", &["link", "del", tap]).await {
        Err(HvError::Command { stderr, .. }) if stderr.contains("Cannot find device") => Ok(()),
        r => r,
    }
}
