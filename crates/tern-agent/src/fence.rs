//! Fencing: a host that cannot renew its lease with the manager stops its own guests
//! before the lease runs out, so the manager may restart them elsewhere once it has.
//!
//! ```text
//!  agent ── renews every renew_ms ──► manager          (the agent: [`renew_loop`])
//!    │ writes fence_at to STATE/lease
//!    ▼
//!  watchdog (own process, outlives the agent) ── polls STATE/lease; at fence_at it kills
//!  every QEMU under STATE/run/ and renames the file to lease.fenced   ([`watchdog`])
//! ```
//!
//! Times are on the host's boot clock (`/proc/uptime`): the agent and its watchdog read
//! the same clock, which counts a suspended host too. The lease is counted from just
//! before the renewal was sent, so the host's count ends before the manager's, and the
//! guests stop [`stop_margin_ms`] before that.
//!
//! The decisions ([`fence_at`], [`due`], [`fate`]) are pure; the rest reads files,
//! kills processes and calls the manager.

use crate::error::AgentError;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_api::client::ManagerClient;
use tern_api::manager::LeaseGrant;

/// How often the watchdog looks at the lease file.
pub const WATCH_EVERY: Duration = Duration::from_millis(200);
/// How soon an agent that could not renew tries again.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// The lease file under the state directory: the boot-clock millisecond at which the
/// watchdog stops the guests. Absent: the host holds no lease, nothing is fenced.
pub fn lease_file(state_dir: &Path) -> PathBuf {
    state_dir.join("lease")
}

/// Where a lease file goes once the watchdog acted on it (kept for the operator).
pub fn fenced_file(state_dir: &Path) -> PathBuf {
    state_dir.join("lease.fenced")
}

/// The watchdog's pid file under the state directory.
pub fn watchdog_pid_file(state_dir: &Path) -> PathBuf {
    state_dir.join("watchdog.pid")
}

/// Time the watchdog keeps between stopping the guests and the lease's end: a poll, a
/// kill and its effect, with room to spare; a fifth of the lease, at most 3 s.
pub fn stop_margin_ms(lease_ms: u64) -> u64 {
    (lease_ms / 5).min(3_000)
}

/// The boot-clock time at which the guests must be stopped, for a renewal sent at
/// `sent_ms` and answered with `grant` (pure).
pub fn fence_at(sent_ms: u64, grant: LeaseGrant) -> u64 {
    sent_ms.saturating_add(grant.lease_ms - stop_margin_ms(grant.lease_ms))
}

/// Whether the watchdog must stop the guests now (pure): the host holds a lease and
/// its time to fence has come.
pub fn due(now_ms: u64, fence_at: Option<u64>) -> bool {
    fence_at.is_some_and(|f| now_ms >= f)
}

/// The boot clock in milliseconds from the text of `/proc/uptime` (pure).
pub fn parse_uptime_ms(text: &str) -> Option<u64> {
    let secs = text.split_whitespace().next()?;
    let (whole, frac) = secs.split_once('.').unwrap_or((secs, "0"));
    let whole: u64 = whole.parse().ok()?;
    let frac = format!("{frac:0<3}");
    let ms: u64 = frac.get(..3)?.parse().ok()?;
    whole.checked_mul(1000)?.checked_add(ms)
}

/// The host's boot clock in milliseconds.
pub fn boot_ms() -> Result<u64, AgentError> {
    let text =
        std::fs::read_to_string("/proc/uptime").map_err(AgentError::io("reading /proc/uptime"))?;
    parse_uptime_ms(&text)
        .ok_or_else(|| AgentError::BadRequest(format!("cannot parse /proc/uptime: {text:?}")))
}

/// The fence time in a lease file's text (pure); unreadable text counts as due at once,
/// so a damaged file errs on the side of stopping the guests.
pub fn parse_lease(text: &str) -> u64 {
    text.trim().parse().unwrap_or(0)
}

/// Reads the lease file: `None` when the host holds no lease.
pub fn read_lease(state_dir: &Path) -> Option<u64> {
    std::fs::read_to_string(lease_file(state_dir))
        .ok()
        .map(|t| parse_lease(&t))
}

/// Writes the lease file atomically (a reader never sees half a number).
pub fn write_lease(state_dir: &Path, fence_at: u64) -> Result<(), AgentError> {
    let path = lease_file(state_dir);
    let tmp = state_dir.join("lease.tmp");
    std::fs::write(&tmp, format!("{fence_at}\n"))
        .map_err(AgentError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(AgentError::io(format!("writing {}", path.display())))
}

/// What a restarted agent finds of one VM recorded by an earlier agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    /// The pid file names a live process whose command line is this VM's QEMU.
    pub qemu_alive: bool,
    /// The VM was created as a migration destination and not yet resumed here.
    pub incoming: bool,
    /// QEMU's run state over QMP (`running`, `paused`, `inmigrate`, ...), if it answered.
    pub runstate: Option<String>,
}

/// What a restarted agent does with a VM an earlier agent left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fate {
    /// Keep the running QEMU and manage it again.
    Adopt,
    /// Remove what is left; the reason is logged.
    Destroy(&'static str),
}

/// Decides a recorded VM's fate (pure). A destination copy that never ran here is
/// destroyed: its source kept the guest (it resumes only while the destination is known
/// not to run it). One that runs was resumed here and is the guest now.
pub fn fate(found: &Found) -> Fate {
    if !found.qemu_alive {
        return Fate::Destroy("its QEMU is gone");
    }
    match (found.runstate.as_deref(), found.incoming) {
        (None, _) => Fate::Destroy("its QEMU does not answer on its QMP socket"),
        (Some("running"), _) => Fate::Adopt,
        (Some(_), true) => Fate::Destroy("an incoming migration copy that never ran here"),
        (Some("inmigrate"), false) => Fate::Destroy("an incoming migration copy"),
        (Some(_), false) => Fate::Adopt,
    }
}

/// Renews the lease with the first manager that answers, for ever: every grant moves
/// the lease file's fence time on; while no manager answers, the file stays as it is
/// and the watchdog acts when its time comes.
pub async fn renew_loop(managers: Vec<ManagerClient>, host: String, state_dir: PathBuf) {
    loop {
        let wait = match renew_once(&managers, &host, &state_dir).await {
            Ok(grant) => Duration::from_millis(grant.renew_ms.max(100)),
            Err(e) => {
                tracing::warn!(host, error = %e, "lease not renewed");
                RETRY_EVERY
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn renew_once(
    managers: &[ManagerClient],
    host: &str,
    state_dir: &Path,
) -> Result<LeaseGrant, AgentError> {
    let sent = boot_ms()?;
    let mut last = None;
    for m in managers {
        match m.renew_lease(host).await {
            Ok(grant) => {
                // A late answer to an earlier renewal must not pull the fence time back.
                let at = fence_at(sent, grant).max(read_lease(state_dir).unwrap_or(0));
                write_lease(state_dir, at)?;
                return Ok(grant);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.map_or_else(
        || AgentError::BadRequest("no manager to renew the lease with".into()),
        AgentError::from,
    ))
}

/// The watchdog: runs until the state directory goes away, stopping every QEMU under
/// `state_dir/run/` when the lease's fence time comes. It is its own process, started
/// by the agent, so it outlives an agent that crashed.
pub fn watchdog(state_dir: &Path) -> Result<(), AgentError> {
    let pid_file = watchdog_pid_file(state_dir);
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))
        .map_err(AgentError::io(format!("writing {}", pid_file.display())))?;
    eprintln!(
        "tern agent watchdog: watching {}",
        lease_file(state_dir).display()
    );
    while state_dir.exists() {
        if due(boot_ms()?, read_lease(state_dir)) {
            let killed = stop_guests(&state_dir.join("run"));
            let _ = std::fs::rename(lease_file(state_dir), fenced_file(state_dir));
            eprintln!(
                "tern agent watchdog: lease not renewed in time, stopped {} guests (QEMU pids {killed:?})",
                killed.len()
            );
        }
        std::thread::sleep(WATCH_EVERY);
    }
    Ok(())
}

/// Kills every QEMU whose pid file lies under `run_dir` and whose command line names its
/// own QMP socket there (a pid file can outlive its process, and the number be reused).
pub fn stop_guests(run_dir: &Path) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut killed = Vec::new();
    for e in rd.flatten() {
        let paths = tern_hv::qemu::args::VmPaths::new(
            run_dir,
            Path::new("/"),
            &e.file_name().to_string_lossy(),
        );
        let Some(pid) = tern_hv::qemu::qemu_pid(&paths) else {
            continue;
        };
        let ok = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            killed.push(pid);
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn uptime() {
        assert_eq!(parse_uptime_ms("12345.67 54321.00\n"), Some(12_345_670));
        assert_eq!(parse_uptime_ms("5.1 1"), Some(5_100));
        assert_eq!(parse_uptime_ms("7 1"), Some(7_000));
        assert_eq!(parse_uptime_ms(""), None);
        assert_eq!(parse_uptime_ms("x.5"), None);
        assert!(boot_ms().unwrap() > 0);
    }

    #[test]
    fn lease_files() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_lease(d.path()), None, "no lease, nothing to fence");
        write_lease(d.path(), 42).unwrap();
        assert_eq!(read_lease(d.path()), Some(42));
        std::fs::write(lease_file(d.path()), "garbage").unwrap();
        assert!(due(1, read_lease(d.path())), "a damaged lease fences");
        assert!(!due(u64::MAX, None));
    }

    #[test]
    fn fates() {
        let f = |alive, incoming, run: Option<&str>| {
            fate(&Found {
                qemu_alive: alive,
                incoming,
                runstate: run.map(str::to_string),
            })
        };
        assert_eq!(f(true, false, Some("running")), Fate::Adopt);
        assert_eq!(f(true, false, Some("paused")), Fate::Adopt);
        assert_eq!(f(true, true, Some("running")), Fate::Adopt, "resumed here");
        assert!(matches!(f(true, true, Some("inmigrate")), Fate::Destroy(_)));
        assert!(matches!(f(true, true, Some("paused")), Fate::Destroy(_)));
        assert!(matches!(
            f(true, false, Some("inmigrate")),
            Fate::Destroy(_)
        ));
        assert!(matches!(f(true, false, None), Fate::Destroy(_)));
        assert!(matches!(f(false, false, Some("running")), Fate::Destroy(_)));
    }

    proptest! {
        // The guests stop before the host's count of the lease ends, and so before the
        // manager's, which starts later.
        #[test]
        fn guests_stop_before_the_lease_ends(sent in 0u64..1 << 40, lease_ms in 1_000u64..600_000) {
            let g = LeaseGrant { lease_ms, renew_ms: lease_ms / 2 };
            let at = fence_at(sent, g);
            prop_assert!(at < sent + lease_ms);
            prop_assert!(at + 200 <= sent + lease_ms, "room for a poll");
            prop_assert!(!due(at - 1, Some(at)) && due(at, Some(at)));
        }

        #[test]
        fn uptime_parser_never_panics(text in ".{0,40}") {
            let _ = parse_uptime_ms(&text);
            let _ = parse_lease(&text);
        }
    }
}
