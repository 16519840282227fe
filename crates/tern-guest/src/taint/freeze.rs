//! The guest's cgroup v2 freezer: untainted processes are moved into a cgroup of their
//! own (`tern-freeze`), which is frozen; thawing one process moves it back where it
//! came from (a task leaving a frozen cgroup thaws), thawing all unfreezes the group
//! and moves everyone back.
//!
//! cgroup v2 is mounted at `/sys/fs/cgroup` when nothing is (the minimal image mounts
//! no cgroups). On a systemd guest, a service's process is taken out of its unit's
//! cgroup for the freeze and put back after it.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tern_api::guest::FrozenProcess;

/// The freezer cgroup's name, under the cgroup root.
pub const GROUP: &str = "tern-freeze";
/// How long a freeze waits for the kernel to report the group frozen (a task in an
/// uninterruptible sleep holds it up; under TCG everything is slow).
pub const FROZEN_WAIT: Duration = Duration::from_secs(3);
/// Where cgroup v2 is mounted when it is not yet.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// The cgroup v2 mount point in `/proc/self/mounts`, if any.
pub fn parse_mounts(text: &str) -> Option<PathBuf> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    })
}

/// A process's cgroup v2 path from `/proc/PID/cgroup` (`0::/system.slice/x.service`).
pub fn parse_cgroup(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

/// Whether `cgroup.events` says the group is frozen.
pub fn parse_frozen(events: &str) -> bool {
    events
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["frozen", "1"])
}

/// Finds (or mounts) cgroup v2.
pub fn root() -> io::Result<PathBuf> {
    if let Some(p) = std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|t| parse_mounts(&t))
    {
        return Ok(p);
    }
    std::fs::create_dir_all(DEFAULT_ROOT)?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fs) = (c("cgroup2"), c(DEFAULT_ROOT), c("cgroup2"));
    // SAFETY: NUL-terminated strings that outlive the call; no data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fs.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("mounting cgroup2 at {DEFAULT_ROOT}: {e}"),
        ));
    }
    Ok(PathBuf::from(DEFAULT_ROOT))
}

/// Ends a freeze an agent that died left behind: unfreezes its group and moves every
/// process in it to the root cgroup (where each came from died with that agent).
/// Returns how many it thawed. With no cgroup v2 mounted nothing can be frozen.
pub fn recover() -> io::Result<usize> {
    let Some(root) = std::fs::read_to_string("/proc/self/mounts")
        .ok()
        .and_then(|t| parse_mounts(&t))
    else {
        return Ok(0);
    };
    recover_group(&root, GROUP)
}

fn recover_group(root: &Path, name: &str) -> io::Result<usize> {
    let group = root.join(name);
    if !group.is_dir() {
        return Ok(0);
    }
    let n = empty_into_root(root, &group);
    write(&group.join("cgroup.freeze"), "0")?;
    let _ = std::fs::remove_dir(&group);
    Ok(n)
}

/// Moves every process left in `group` to the root cgroup (each thaws as it leaves),
/// until none is left: one that was not frozen yet may fork meanwhile, its child
/// landing in the group. Returns how many it moved.
fn empty_into_root(root: &Path, group: &Path) -> usize {
    let mut n = 0;
    // Each round takes the processes there now; a handful of rounds outlasts any
    // fork in flight.
    for _ in 0..20 {
        let pids = std::fs::read_to_string(group.join("cgroup.procs")).unwrap_or_default();
        let pids: Vec<&str> = pids
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if write(&root.join("cgroup.procs"), pid).is_ok() {
                n += 1;
            }
        }
    }
    n
}

struct Member {
    comm: String,
    /// The cgroup it came from, relative to the root.
    origin: String,
    since: Instant,
    /// When it left the freezer early.
    thawed: Option<Instant>,
    /// Already back in its own cgroup.
    moved: bool,
}

/// A freeze under way.
pub struct Freezer {
    root: PathBuf,
    group: PathBuf,
    members: BTreeMap<u32, Member>,
    started: Instant,
    /// The kernel said the group is frozen within [`FROZEN_WAIT`].
    pub settled: bool,
}

fn write(path: &Path, value: &str) -> io::Result<()> {
    std::fs::write(path, value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", path.display()),
        )
    })
}

impl Freezer {
    /// Moves `procs` (pid, comm) into the freezer group under `root` and freezes it.
    /// Processes that exit meanwhile are skipped.
    pub fn freeze(root: &Path, name: &str, procs: &[(u32, String)]) -> io::Result<Freezer> {
        let group = root.join(name);
        match std::fs::create_dir(&group) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("creating {}: {e}", group.display()),
                ))
            }
        }
        // A group left frozen by an agent that died must not freeze newcomers at once.
        write(&group.join("cgroup.freeze"), "0")?;
        let mut f = Freezer {
            root: root.to_path_buf(),
            group,
            members: BTreeMap::new(),
            started: Instant::now(),
            settled: false,
        };
        for (pid, comm) in procs {
            let Some(origin) = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .ok()
                .and_then(|t| parse_cgroup(&t))
            else {
                continue;
            };
            if write(&f.group.join("cgroup.procs"), &pid.to_string()).is_ok() {
                f.members.insert(
                    *pid,
                    Member {
                        comm: comm.clone(),
                        origin,
                        since: Instant::now(),
                        thawed: None,
                        moved: false,
                    },
                );
            }
        }
        if let Err(e) = write(&f.group.join("cgroup.freeze"), "1") {
            f.thaw_all();
            f.tidy();
            return Err(e);
        }
        let deadline = Instant::now() + FROZEN_WAIT;
        while Instant::now() < deadline {
            if std::fs::read_to_string(f.group.join("cgroup.events"))
                .is_ok_and(|t| parse_frozen(&t))
            {
                f.settled = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(f)
    }

    /// The pids frozen now.
    pub fn frozen(&self) -> Vec<u32> {
        self.members
            .iter()
            .filter(|(_, m)| m.thawed.is_none())
            .map(|(p, _)| *p)
            .collect()
    }

    pub fn is_frozen(&self, pid: u32) -> bool {
        self.members.get(&pid).is_some_and(|m| m.thawed.is_none())
    }

    /// Moves one process back to its own cgroup, which thaws it. Returns whether it
    /// was frozen here.
    pub fn thaw_one(&mut self, pid: u32) -> bool {
        let Some(m) = self.members.get_mut(&pid).filter(|m| m.thawed.is_none()) else {
            return false;
        };
        m.thawed = Some(Instant::now());
        m.moved = true;
        move_back(&self.root, pid, &m.origin);
        true
    }

    /// Unfreezes the group and returns what the freeze held; [`Freezer::tidy`] then
    /// moves every process back and removes the group.
    pub fn thaw_all(&mut self) -> Vec<FrozenProcess> {
        // The whole group thaws with one write, before any move back: each move out of
        // a cgroup waits for the kernel's RCU grace periods, which on a slow vCPU would
        // hold the last process frozen for tens of ms per process before it, and the
        // host waits for this answer.
        let _ = write(&self.group.join("cgroup.freeze"), "0");
        let now = Instant::now();
        let mut out = Vec::new();
        for (pid, m) in &self.members {
            let end = m.thawed.unwrap_or(now);
            out.push(FrozenProcess {
                pid: *pid,
                comm: m.comm.clone(),
                frozen_ms: end.duration_since(m.since).as_secs_f64() * 1e3,
                thawed_early: m.thawed.is_some(),
            });
        }
        for m in self.members.values_mut() {
            m.thawed.get_or_insert(now);
        }
        out
    }

    /// After [`Freezer::thaw_all`]: every process back in its own cgroup and the group
    /// removed. Children forked in the group (between a process's move and the freeze,
    /// or since the thaw) go to the root cgroup.
    pub fn tidy(self) {
        for (pid, m) in &self.members {
            if !m.moved {
                move_back(&self.root, *pid, &m.origin);
            }
        }
        empty_into_root(&self.root, &self.group);
        let _ = std::fs::remove_dir(&self.group);
    }

    pub fn started(&self) -> Instant {
        self.started
    }
}

/// Puts `pid` back into `origin`, else (the group went away) into the root.
fn move_back(root: &Path, pid: u32, origin: &str) {
    let to = root.join(origin.trim_start_matches('/'));
    if write(&to.join("cgroup.procs"), &pid.to_string()).is_err() {
        let _ = write(&root.join("cgroup.procs"), &pid.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mounts_cgroup_files_and_events() {
        assert_eq!(
            parse_mounts("proc /proc proc rw 0 0\ncgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(parse_mounts("proc /proc proc rw 0 0\n"), None);
        assert_eq!(
            parse_cgroup("0::/system.slice/ssh.service\n").as_deref(),
            Some("/system.slice/ssh.service")
        );
        assert_eq!(parse_cgroup("1:name=systemd:/\n"), None);
        assert!(parse_frozen("populated 1\nfrozen 1\n"));
        assert!(!parse_frozen("populated 1\nfrozen 0\n"));
    }

    fn lines(path: &Path) -> usize {
        std::fs::read_to_string(path)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// Whether `path` grows past `n` lines within 5 s (a loaded host may not run the
    /// writer for a while).
    fn grows(path: &Path, n: usize) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if lines(path) > n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// A real freeze of a child of this test: it stops writing while frozen and
    /// writes again once thawed, and again after a freeze left behind is recovered.
    /// Needs root and cgroup v2 (skipped otherwise).
    #[test]
    fn a_frozen_process_stops_and_runs_again_after_thaw() {
        let Some(root) = std::fs::read_to_string("/proc/self/mounts")
            .ok()
            .and_then(|t| parse_mounts(&t))
            .filter(|r| tern_is_root() && r.join("cgroup.procs").exists())
        else {
            eprintln!("SKIP: needs root and cgroup v2");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ticks");
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while :; do echo x >> {}; sleep 0.02; done",
                file.display()
            ))
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let name = format!("tern-freeze-test-{}", std::process::id());
        let mut f = Freezer::freeze(&root, &name, &[(child.id(), "sh".into())]).unwrap();
        assert!(f.settled, "the kernel reports the group frozen");
        assert_eq!(f.frozen(), vec![child.id()]);
        let n = lines(&file);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(lines(&file), n, "no writes while frozen");
        assert!(f.thaw_one(child.id()));
        assert!(!f.thaw_one(child.id()), "thawed once");
        assert!(grows(&file, n), "writes again once thawed");
        let held = f.thaw_all();
        f.tidy();
        assert_eq!(held.len(), 1);
        assert!(
            held[0].thawed_early && held[0].frozen_ms >= 250.0,
            "{held:?}"
        );
        assert!(!root.join(&name).exists(), "the group is removed");

        // A freeze whose agent died (the Freezer is forgotten, nothing thawed): the
        // next agent's recovery thaws it.
        let f = Freezer::freeze(&root, &name, &[(child.id(), "sh".into())]).unwrap();
        std::mem::forget(f);
        let n = lines(&file);
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(lines(&file), n, "frozen and left behind");
        assert_eq!(recover_group(&root, &name).unwrap(), 1);
        let ran = grows(&file, n);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(ran, "runs again after the recovery");
        assert!(!root.join(&name).exists(), "the group is removed");
        assert_eq!(recover_group(&root, &name).unwrap(), 0, "nothing left");
    }

    fn tern_is_root() -> bool {
        // SAFETY: no arguments, no memory.
        unsafe { libc::geteuid() == 0 }
    }
}
