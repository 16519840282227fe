//! The test workloads and the table of running ones. Each workload runs on its own
//! threads, counts its work in [`Stats`], and stops when its flag is set.

pub mod barrier;
pub mod cpu;
pub mod diskverify;
pub mod echo;
pub mod memdirty;
pub mod process;
pub mod verifier;
pub mod wakeup;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::GuestError;
use tern_api::guest::{DiskReport, VerifyReport, WorkloadSpec, WorkloadStatus};

/// Progress of one workload, shared between its threads and the agent.
#[derive(Debug, Default)]
pub struct Stats {
    /// Units of work done: pages, busy milliseconds, barriers, handoffs or bytes, by
    /// workload.
    pub work: AtomicU64,
    /// `batch`: pages checked before being rewritten.
    pub checked: AtomicU64,
    /// Set when a workload thread ended with an error.
    pub error: Mutex<Option<String>>,
    /// When the paced phase began (after memdirty's initial fill), so the reported
    /// rate is the steady one, not diluted by the warm-up.
    pub paced_since: Mutex<Option<Instant>>,
}

impl Stats {
    pub fn add(&self, n: u64) {
        self.work.fetch_add(n, Ordering::Relaxed);
    }

    pub fn mark_paced(&self, at: Instant) {
        if let Ok(mut p) = self.paced_since.lock() {
            *p = Some(at);
        }
    }

    pub fn fail(&self, msg: String) {
        if let Ok(mut e) = self.error.lock() {
            *e = Some(msg);
        }
    }
}

/// Everything a workload thread gets: its stop flag and its counters.
#[derive(Clone, Debug, Default)]
pub struct Ctl {
    pub stop: Arc<AtomicBool>,
    pub stats: Arc<Stats>,
}

impl Ctl {
    pub fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps `d`, in short steps so a stop request is seen quickly. False once stopped.
    pub fn sleep(&self, d: Duration) -> bool {
        let end = Instant::now() + d;
        loop {
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= end {
                return true;
            }
            std::thread::sleep((end - now).min(Duration::from_millis(50)));
        }
    }
}

struct Running {
    spec: WorkloadSpec,
    ctl: Ctl,
    threads: Vec<JoinHandle<()>>,
    started: Instant,
    stopped_after: Option<Duration>,
    /// Only the verifier has state the host can query after the fact.
    verifier: Option<Arc<verifier::Shared>>,
    /// ... and `diskverify`, whose disk the check reads with the writer held.
    disk: Option<Arc<diskverify::Shared>>,
}

impl Running {
    fn halt(&mut self) {
        self.ctl.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.stopped_after.get_or_insert(self.started.elapsed());
    }
}

/// The workloads of this guest, at most one per kind.
#[derive(Default)]
pub struct Workloads {
    table: BTreeMap<&'static str, Running>,
}

impl Workloads {
    /// Starts `spec`, replacing a workload of the same kind.
    pub fn start(&mut self, spec: WorkloadSpec) -> Result<&'static str, GuestError> {
        spec.validate()?;
        let name = spec.name();
        if let Some(mut old) = self.table.remove(name) {
            old.halt();
        }
        let ctl = Ctl::default();
        let mut verifier_state = None;
        let mut disk_state = None;
        let threads = match spec {
            WorkloadSpec::Memdirty { mib, mbps } => vec![memdirty::spawn(mib, mbps, ctl.clone())?],
            WorkloadSpec::Cpu { percent, threads } => cpu::spawn(percent, threads, ctl.clone())?,
            WorkloadSpec::Barrier { threads } => barrier::spawn(threads, ctl.clone())?,
            WorkloadSpec::Wakeup { threads } => wakeup::spawn(threads, ctl.clone())?,
            WorkloadSpec::EchoServer { port } => vec![echo::spawn(port, ctl.clone())?],
            WorkloadSpec::Batch { .. } | WorkloadSpec::Service { .. } => {
                vec![process::spawn(&spec, ctl.clone())?]
            }
            WorkloadSpec::Verifier { mib, pages_per_sec } => {
                let shared = Arc::new(verifier::Shared::new(mib)?);
                verifier_state = Some(shared.clone());
                vec![verifier::spawn(shared, pages_per_sec, ctl.clone())?]
            }
            WorkloadSpec::Diskverify {
                ref device,
                mib,
                blocks_per_sec,
            } => {
                let shared = Arc::new(diskverify::Shared::new(device, mib)?);
                disk_state = Some(shared.clone());
                vec![diskverify::spawn(shared, blocks_per_sec, ctl.clone())?]
            }
        };
        self.table.insert(
            name,
            Running {
                spec,
                ctl,
                threads,
                started: Instant::now(),
                stopped_after: None,
                verifier: verifier_state,
                disk: disk_state,
            },
        );
        Ok(name)
    }

    /// Stops the workload called `name`; it stays listed (not running) until replaced.
    pub fn stop(&mut self, name: &str) -> Result<&'static str, GuestError> {
        let names = self.names().join(", ");
        let (key, running) = self
            .table
            .iter_mut()
            .find(|(k, _)| **k == name)
            .ok_or_else(|| {
                GuestError::BadRequest(format!(
                    "no workload {name:?} was started; started: {names}"
                ))
            })?;
        running.halt();
        Ok(key)
    }

    fn names(&self) -> Vec<&'static str> {
        self.table.keys().copied().collect()
    }

    /// The counter and checksums of the verifier (running or stopped).
    pub fn verify(&self) -> Result<VerifyReport, GuestError> {
        let v = self
            .table
            .get("verifier")
            .and_then(|r| r.verifier.as_ref())
            .ok_or_else(|| {
                GuestError::BadRequest(
                    "no verifier was started; start one with \"verifier --mib 4\"".into(),
                )
            })?;
        Ok(v.report())
    }

    /// Reads back the disk `diskverify` writes: by default the one started in this boot
    /// (its writer held meanwhile), else `device` (default `/dev/vda`) with `mib`.
    pub fn disk_check(
        &self,
        device: Option<String>,
        mib: Option<u64>,
    ) -> Result<DiskReport, GuestError> {
        let running = self.table.get("diskverify").and_then(|r| r.disk.as_ref());
        if let Some(d) = running {
            if device.as_ref().is_none_or(|want| *want == d.device()) && mib.is_none() {
                return d.report();
            }
        }
        let device = device.unwrap_or_else(|| tern_api::guest::DEFAULT_DISK_DEVICE.into());
        tern_api::guest::check_device(&device)?;
        let mib = mib.ok_or_else(|| {
            GuestError::BadRequest(
                "disk-check: no diskverify runs in this boot; give \"mib\" (and \"device\")".into(),
            )
        })?;
        diskverify::check(&device, mib)
    }

    /// The status of every workload, in name order.
    pub fn status(&self) -> Vec<WorkloadStatus> {
        self.table
            .iter()
            .map(|(name, r)| {
                let running =
                    r.stopped_after.is_none() && r.threads.iter().all(|t| !t.is_finished());
                let seconds = r
                    .stopped_after
                    .unwrap_or_else(|| r.started.elapsed())
                    .as_secs_f64();
                let work = r.ctl.stats.work.load(Ordering::Relaxed);
                let paced_since = r.ctl.stats.paced_since.lock().ok().and_then(|p| *p);
                let end = r.started + r.stopped_after.unwrap_or_else(|| r.started.elapsed());
                let paced_s =
                    paced_since.map_or(seconds, |p| end.saturating_duration_since(p).as_secs_f64());
                WorkloadStatus {
                    name: name.to_string(),
                    spec: r.spec.to_args(),
                    running,
                    seconds,
                    work,
                    rate: rate(&r.spec, work, paced_s),
                    checked: matches!(r.spec, WorkloadSpec::Batch { .. })
                        .then(|| r.ctl.stats.checked.load(Ordering::Relaxed)),
                    error: r.ctl.stats.error.lock().ok().and_then(|e| e.clone()),
                }
            })
            .collect()
    }

    /// Stops everything (before power-off).
    pub fn stop_all(&mut self) {
        for r in self.table.values_mut() {
            r.halt();
        }
    }
}

/// The workload's achieved rate, in the unit its spec is given in.
fn rate(spec: &WorkloadSpec, work: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        return 0.0;
    }
    match spec {
        WorkloadSpec::Memdirty { .. } | WorkloadSpec::Batch { .. } => {
            work as f64 * crate::PAGE_SIZE as f64 / 1e6 / seconds
        }
        WorkloadSpec::Cpu { threads, .. } => {
            work as f64 / 10.0 / seconds / f64::from((*threads).max(1))
        }
        WorkloadSpec::EchoServer { .. } | WorkloadSpec::Service { .. } => work as f64 / seconds,
        WorkloadSpec::Verifier { .. } => work as f64 / seconds,
        WorkloadSpec::Barrier { .. } => work as f64 / seconds,
        WorkloadSpec::Wakeup { .. } => work as f64 / seconds,
        WorkloadSpec::Diskverify { .. } => work as f64 / seconds,
    }
}

impl Drop for Workloads {
    fn drop(&mut self) {
        self.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_status_stop() {
        let mut w = Workloads::default();
        w.start(WorkloadSpec::Memdirty { mib: 1, mbps: 20.0 })
            .unwrap();
        w.start(WorkloadSpec::Verifier {
            mib: 1,
            pages_per_sec: 2000.0,
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let st = w.status();
        assert_eq!(st.len(), 2);
        assert!(st.iter().all(|s| s.running && s.work > 0), "{st:?}");
        let a = w.verify().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let b = w.verify().unwrap();
        assert!(b.counter > a.counter && a.ok && b.ok, "{a:?} {b:?}");
        assert_eq!(w.stop("memdirty").unwrap(), "memdirty");
        assert!(!w.status()[0].running);
        assert!(w
            .stop("nothing")
            .unwrap_err()
            .to_string()
            .contains("memdirty"));
    }

    #[test]
    fn verify_without_verifier_explains() {
        let w = Workloads::default();
        assert!(w
            .verify()
            .unwrap_err()
            .to_string()
            .contains("verifier --mib"));
    }
}
