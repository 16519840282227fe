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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::precopy::{Throttle, ThrottleHold};

/// The scheduler period the quota is expressed in, microseconds (the model's too).
const PERIOD_US: u64 = tern_migrate::precopy::THROTTLE_PERIOD_US;

/// How often the watch reads the cgroup's period count and the vCPUs' run time.
const WATCH_EVERY: Duration = Duration::from_millis(1);
/// The longest a watch runs: a migration's own limit ends it long before.
const WATCH_LIMIT: Duration = Duration::from_secs(3600);
/// How often [`CgroupThrottle::hold`] looks at what the watch saw.
const HOLD_POLL: Duration = Duration::from_micros(250);

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
    /// The percent in effect (0: none).
    percent: u8,
    /// Watches the throttled threads while a throttle is set up.
    watch: Option<PeriodWatch>,
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
            percent: 0,
            watch: None,
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

    /// The throttled threads' `cpu.stat`, once a throttle was set up.
    fn stat_path(&self) -> Option<PathBuf> {
        let dir = self.made.as_ref()?;
        Some(match &self.hierarchy {
            Ok(Hierarchy::V2(_)) => dir.join("vcpus").join("cpu.stat"),
            _ => dir.join("cpu.stat"),
        })
    }

    /// How many scheduler periods the kernel has throttled the threads so far (the
    /// `nr_throttled` of the cgroup's `cpu.stat`); `None` before a throttle was set up.
    pub fn throttled_periods(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.stat_path()?).ok()?;
        stat_value(&text, "nr_throttled")
    }

    /// What the watch saw, for the log: how long ago a period began and the threads
    /// last ran, in milliseconds.
    pub fn seen_ms_ago(&self) -> Option<(Option<f64>, Option<f64>)> {
        let seen = self.watch.as_ref()?.seen();
        let ago = |t: Option<Instant>| t.map(|t| t.elapsed().as_secs_f64() * 1000.0);
        Some((ago(seen.period_began), ago(seen.last_ran)))
    }

    /// Lifts the throttle and moves the threads back where cgroups started them.
    pub fn remove(&mut self) {
        self.percent = 0;
        self.watch = None;
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
            Ok(()) => {
                self.percent = percent;
                if percent > 0 && self.watch.is_none() {
                    self.watch = self
                        .stat_path()
                        .map(|stat| PeriodWatch::start(stat, self.tids.clone()));
                }
                percent
            }
            Err(reason) => {
                if !self.warned {
                    tracing::warn!(%reason, "cannot throttle the guest's vCPUs; migrating without a throttle");
                    self.warned = true;
                }
                0
            }
        }
    }

    /// A period begins when the cgroup's `nr_periods` moves; the kernel's period timer
    /// keeps its phase while the threads want CPU, so one seen beginning places the
    /// next. The threads are held once they ran in this period and their run time has
    /// since stood still longer than a scheduler tick: whether they spent their quota
    /// or ran into a debt from overrunning the last one, they do not run again before
    /// the next period.
    fn hold(&mut self, limit: Duration, at_least: Duration) -> Option<ThrottleHold> {
        if self.percent == 0 {
            return None;
        }
        let watch = self.watch.as_ref()?;
        let period = Duration::from_micros(PERIOD_US);
        let still = Duration::from_micros(tern_migrate::precopy::HELD_AFTER_STILL_US);
        let start = Instant::now();
        while start.elapsed() < limit {
            let seen = watch.seen();
            let now = Instant::now();
            if let (Some(began), Some(ran)) = (seen.period_began, seen.last_ran) {
                // The watch sees a period begin up to a reading late.
                let left = until_next_period(began, now, period).saturating_sub(WATCH_EVERY);
                let this_began = now + left + WATCH_EVERY - period;
                // Run time standing still since before this period began says nothing:
                // the threads may be about to get their share.
                let held = ran > this_began && now.saturating_duration_since(ran) >= still;
                if held && left >= at_least {
                    return Some(ThrottleHold {
                        waited: start.elapsed(),
                        held_for: left,
                    });
                }
            }
            std::thread::sleep(HOLD_POLL);
        }
        let (period_began, last_ran) = self.seen_ms_ago().unwrap_or_default();
        tracing::debug!(
            period_began_ms_ago = period_began,
            last_ran_ms_ago = last_ran,
            "the throttled vCPUs were not seen held with room"
        );
        None
    }

    /// Whether the watch saw the threads' run time move after `at`. A running thread's
    /// clock is brought up to date at the scheduler's tick, so a run that began in the
    /// last few milliseconds may not show yet.
    fn ran_since(&self, at: Instant) -> Option<bool> {
        let seen = self.watch.as_ref()?.seen();
        Some(seen.last_ran? > at)
    }
}

/// From `now` to the start of the next scheduler period, one of which began at `began`.
fn until_next_period(began: Instant, now: Instant, period: Duration) -> Duration {
    let since = now.saturating_duration_since(began).as_nanos();
    let period_ns = period.as_nanos().max(1);
    Duration::from_nanos((period_ns - since % period_ns) as u64)
}

/// A counter of a `cpu.stat` text (`nr_periods`, `nr_throttled`).
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
        .and_then(|n| n.trim().parse().ok())
}

/// What the watch saw last.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    /// When the cgroup's period count last moved (to within [`WATCH_EVERY`]).
    period_began: Option<Instant>,
    /// When the threads' run time last moved.
    last_ran: Option<Instant>,
}

/// A light thread that reads, every [`WATCH_EVERY`], the throttle cgroup's period count
/// and the throttled threads' run time (`/proc/<tid>/schedstat`), so that the stop
/// knows at once where the period stands and whether the guest is running. Stops when
/// dropped.
struct PeriodWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<JoinHandle<()>>,
}

impl PeriodWatch {
    fn start(stat: PathBuf, tids: Vec<u32>) -> PeriodWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let thread = {
            let (stop, seen) = (stop.clone(), seen.clone());
            std::thread::Builder::new()
                .name("throttle-watch".into())
                .spawn(move || watch(&stat, &tids, &stop, &seen))
                .map_err(|e| tracing::warn!(error = %e, "cannot watch the throttled vCPUs"))
                .ok()
        };
        PeriodWatch { stop, seen, thread }
    }

    fn seen(&self) -> Seen {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for PeriodWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn watch(stat: &Path, tids: &[u32], stop: &AtomicBool, seen: &Mutex<Seen>) {
    let run_ns = || -> Option<u64> {
        tids.iter().try_fold(0u64, |sum, tid| {
            let s = std::fs::read_to_string(format!("/proc/{tid}/schedstat")).ok()?;
            Some(sum + s.split_whitespace().next()?.parse::<u64>().ok()?)
        })
    };
    let periods = || stat_value(&std::fs::read_to_string(stat).ok()?, "nr_periods");
    let (mut last_periods, mut last_run) = (periods(), run_ns());
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < WATCH_LIMIT {
        std::thread::sleep(WATCH_EVERY);
        let (p, r) = (periods(), run_ns());
        let now = Instant::now();
        let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
        if p.is_some() && p != last_periods {
            // The first reading only says a period began some time before.
            if last_periods.is_some() {
                s.period_began = Some(now);
            }
            last_periods = p;
        }
        if r != last_run || s.last_ran.is_none() {
            s.last_ran = Some(now);
            last_run = r;
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
            percent: 0,
            watch: None,
            warned: false,
        };
        assert_eq!(t.apply(50), 0);
        // Nothing throttled: the stop does not wait for a share.
        let at = Instant::now();
        assert!(t.hold(Duration::from_secs(5), Duration::ZERO).is_none());
        assert!(at.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn the_next_period_follows_from_any_seen_beginning() {
        let began = Instant::now();
        let period = Duration::from_millis(100);
        let at = |ms| began + Duration::from_millis(ms);
        assert_eq!(
            until_next_period(began, at(30), period),
            Duration::from_millis(70)
        );
        assert_eq!(
            until_next_period(began, at(230), period),
            Duration::from_millis(70)
        );
        assert_eq!(until_next_period(began, at(0), period), period);
    }

    #[test]
    fn cpu_stat_counters_are_read_by_name() {
        let text = "nr_periods 12\nnr_throttled 5\nthrottled_time 9\n";
        assert_eq!(stat_value(text, "nr_periods"), Some(12));
        assert_eq!(stat_value(text, "nr_throttled"), Some(5));
        assert_eq!(stat_value(text, "nr_"), None);
    }
}
