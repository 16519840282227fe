//! Throttling a guest's vCPU threads through a cgroup while it migrates.
//!
//! `tern-migrate` decides the percent and renders the cgroup v2 `cpu.max` line; this
//! module finds a cgroup hierarchy with the `cpu` controller and applies it:
//!
//! - cgroup v2 (`/sys/fs/cgroup` is `cgroup2` with `cpu` available): the VM's process
//!   goes into `tern-<vm>/`, its vCPU threads into the threaded child `tern-<vm>/vcpus`,
//!   whose `cpu.max` carries the quota;
//! - cgroup v1 with a writable `cpu` hierarchy: the vCPU threads go into
//!   `cpu/tern-<vm>/tasks`, with `cpu.cfs_quota_us`/`cpu.cfs_period_us`.
//!
//! Anything else (read-only, no `cpu` controller) means no throttle: the reason is
//! logged once and [`CgroupThrottle::apply`] returns 0, which the policy loop treats as
//! "cannot throttle".

use std::path::{Path, PathBuf};

use super::precopy::Throttle;

/// The scheduler period the quota is expressed in, microseconds (the model's too).
const PERIOD_US: u64 = tern_migrate::precopy::THROTTLE_PERIOD_US;

/// Where and how a throttle can be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The unified hierarchy's root.
    V2(PathBuf),
    /// The v1 `cpu` controller's root.
    V1(PathBuf),
}

/// Picks the hierarchy from `/proc/self/mountinfo` text (pure): v2 at `/sys/fs/cgroup`
/// when it offers `cpu` (`v2_controllers` is its `cgroup.controllers`), else a v1 mount
/// carrying the `cpu` option.
pub fn choose(mountinfo: &str, v2_controllers: Option<&str>) -> Result<Hierarchy, String> {
    let mut v1 = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split_whitespace().nth(4).unwrap_or("");
        let mut r = right.split_whitespace();
        let fstype = r.next().unwrap_or("");
        let options = r.nth(1).unwrap_or("");
        if fstype == "cgroup2" && mount_point == "/sys/fs/cgroup" {
            if v2_controllers.is_some_and(|c| c.split_whitespace().any(|x| x == "cpu")) {
                return Ok(Hierarchy::V2(PathBuf::from(mount_point)));
            }
        } else if fstype == "cgroup" && options.split(',').any(|o| o == "cpu") {
            v1 = Some(PathBuf::from(mount_point));
        }
    }
    v1.map(Hierarchy::V1)
        .ok_or_else(|| "no cgroup hierarchy with the cpu controller (cgroup2 at /sys/fs/cgroup without cpu, and no v1 cpu mount)".into())
}

/// Mounts the host's cgroup hierarchy with the cpu controller at `/sys/fs/cgroup`, when
/// this process sees none there (a private mount namespace). The host's mounts are read
/// from process 1's view.
fn mount_like_host() -> Result<(), String> {
    let host = std::fs::read_to_string("/proc/1/mountinfo")
        .map_err(|e| format!("reading /proc/1/mountinfo: {e}"))?;
    let controllers = std::fs::read_to_string("/proc/1/root/sys/fs/cgroup/cgroup.controllers").ok();
    let args: &[&str] = match choose(&host, controllers.as_deref())? {
        Hierarchy::V2(_) => &["-t", "cgroup2", "cgroup2", "/sys/fs/cgroup"],
        Hierarchy::V1(_) => &["-t", "cgroup", "-o", "cpu", "cgroup", "/sys/fs/cgroup"],
    };
    let out = std::process::Command::new("mount")
        .args(args)
        .output()
        .map_err(|e| format!("running mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mount {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Splits a `cpu.max` line into v1's quota and period (`-1` quota for "max").
pub fn v1_values(cpu_max: &str) -> (i64, u64) {
    let mut it = cpu_max.split_whitespace();
    let quota = it.next().and_then(|q| q.parse::<i64>().ok()).unwrap_or(-1);
    let period = it.next().and_then(|p| p.parse().ok()).unwrap_or(PERIOD_US);
    (quota, period)
}

/// A throttle over one VM's vCPU threads; removed (threads moved back) on drop.
pub struct CgroupThrottle {
    hierarchy: Result<Hierarchy, String>,
    name: String,
    pid: Option<u32>,
    tids: Vec<u32>,
    /// Where the threads go back to, and the cgroup we made, once set up.
    made: Option<PathBuf>,
    warned: bool,
}

impl CgroupThrottle {
    /// A throttle for VM `vm` (process `pid`, vCPU threads `tids`); nothing is touched
    /// until the first [`Throttle::apply`] with a non-zero percent.
    pub fn new(vm: &str, pid: Option<u32>, tids: Vec<u32>) -> CgroupThrottle {
        let find = || {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            let controllers = std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers").ok();
            choose(&mountinfo, controllers.as_deref())
        };
        let hierarchy = find().or_else(|first| {
            // `ip netns exec` (how lab hosts run their agent) remounts /sys without the
            // cgroup mounts; the host's hierarchy can be mounted again in that private
            // mount namespace.
            mount_like_host().map_err(|e| format!("{first}; mounting one: {e}"))?;
            find()
        });
        CgroupThrottle {
            hierarchy,
            name: format!("tern-{vm}"),
            pid,
            tids,
            made: None,
            warned: false,
        }
    }

    fn set(&mut self, percent: u8) -> Result<(), String> {
        let hierarchy = self.hierarchy.clone()?;
        if self.tids.is_empty() {
            return Err("the VM has no known vCPU threads".into());
        }
        let line = tern_migrate::cpu_max(percent, self.tids.len() as u32, PERIOD_US);
        let w = |p: &Path, v: &str| {
            std::fs::write(p, v).map_err(|e| format!("writing {v:?} to {}: {e}", p.display()))
        };
        match hierarchy {
            Hierarchy::V1(root) => {
                let dir = root.join(&self.name);
                if self.made.is_none() {
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                    self.made = Some(dir.clone());
                    for tid in &self.tids {
                        w(&dir.join("tasks"), &tid.to_string())?;
                    }
                }
                let (quota, period) = v1_values(&line);
                w(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                w(&dir.join("cpu.cfs_quota_us"), &quota.to_string())
            }
            Hierarchy::V2(root) => {
                let dir = root.join(&self.name);
                let vcpus = dir.join("vcpus");
                if self.made.is_none() {
                    let pid = self.pid.ok_or("the VM's process id is unknown")?;
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                    self.made = Some(dir.clone());
                    w(&root.join("cgroup.subtree_control"), "+cpu")?;
                    w(&dir.join("cgroup.procs"), &pid.to_string())?;
                    std::fs::create_dir_all(&vcpus)
                        .map_err(|e| format!("creating {}: {e}", vcpus.display()))?;
                    w(&vcpus.join("cgroup.type"), "threaded")?;
                    w(&dir.join("cgroup.subtree_control"), "+cpu")?;
                    for tid in &self.tids {
                        w(&vcpus.join("cgroup.threads"), &tid.to_string())?;
                    }
                }
                w(&vcpus.join("cpu.max"), &line)
            }
        }
    }

    /// How many scheduler periods the kernel has throttled the threads so far (the
    /// `nr_throttled` of the cgroup's `cpu.stat`); `None` before a throttle was set up.
    pub fn throttled_periods(&self) -> Option<u64> {
        let dir = self.made.as_ref()?;
        let stat = match &self.hierarchy {
            Ok(Hierarchy::V2(_)) => dir.join("vcpus").join("cpu.stat"),
            _ => dir.join("cpu.stat"),
        };
        let text = std::fs::read_to_string(stat).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("nr_throttled "))
            .and_then(|n| n.trim().parse().ok())
    }

    /// Lifts the throttle and moves the threads back where cgroups started them.
    pub fn remove(&mut self) {
        let Some(dir) = self.made.take() else { return };
        match &self.hierarchy {
            Ok(Hierarchy::V1(root)) => {
                for tid in &self.tids {
                    let _ = std::fs::write(root.join("tasks"), tid.to_string());
                }
                let _ = std::fs::remove_dir(&dir);
            }
            Ok(Hierarchy::V2(root)) => {
                if let Some(pid) = self.pid {
                    let _ = std::fs::write(root.join("cgroup.procs"), pid.to_string());
                }
                let _ = std::fs::remove_dir(dir.join("vcpus"));
                let _ = std::fs::remove_dir(&dir);
            }
            Err(_) => {}
        }
    }
}

impl Throttle for CgroupThrottle {
    fn apply(&mut self, percent: u8) -> u8 {
        match self.set(percent) {
            Ok(()) => percent,
            Err(reason) => {
                if !self.warned {
                    tracing::warn!(%reason, "cannot throttle the guest's vCPUs; migrating without a throttle");
                    self.warned = true;
                }
                0
            }
        }
    }
}

impl Drop for CgroupThrottle {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1_HOST: &str =
        "30 25 0:26 / /sys/fs/cgroup/unified rw,relatime shared:8 - cgroup2 cgroup2 rw\n\
        31 25 0:27 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu\n\
        32 25 0:28 / /sys/fs/cgroup/memory rw,relatime shared:10 - cgroup cgroup rw,memory\n";
    const V2_HOST: &str =
        "30 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn picks_v2_only_when_it_offers_cpu_else_v1_cpu() {
        assert_eq!(
            choose(V2_HOST, Some("cpuset cpu io memory pids")),
            Ok(Hierarchy::V2("/sys/fs/cgroup".into()))
        );
        assert!(choose(V2_HOST, Some("memory pids")).is_err());
        assert_eq!(
            choose(V1_HOST, None),
            Ok(Hierarchy::V1("/sys/fs/cgroup/cpu".into()))
        );
        assert!(choose("", None).unwrap_err().contains("cpu controller"));
    }

    #[test]
    fn v1_values_follow_cpu_max() {
        assert_eq!(
            v1_values(&tern_migrate::cpu_max(75, 2, PERIOD_US)),
            (50_000, PERIOD_US)
        );
        assert_eq!(
            v1_values(&tern_migrate::cpu_max(0, 2, PERIOD_US)),
            (-1, PERIOD_US)
        );
    }

    #[test]
    fn a_host_without_cgroups_reports_no_throttle() {
        let mut t = CgroupThrottle {
            hierarchy: Err("none here".into()),
            name: "tern-x".into(),
            pid: None,
            tids: vec![1],
            made: None,
            warned: false,
        };
        assert_eq!(t.apply(50), 0);
    }
}
