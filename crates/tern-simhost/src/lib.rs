//! Simulated hosts in process: the manager's [`HostClient`] over the `sim` hypervisor
//! driver, one [`SimDriver`] per host, so the manager, the balancer and the control loop
//! run unchanged against a thousand hosts in one process (`tern demo --sim`, `tern bench
//! api|balance`, the manager's tests at scale).
//!
//! A migration walks the driver's migration steps as the agent does for QEMU (destination
//! created incoming, source migrated and left paused, destination resumed, source
//! destroyed); its rounds, duration and downtime come from `tern-migrate`'s analytic
//! pre-copy model under the requested policy, since the sim driver moves no memory. The
//! model's rounds are reported as progress, in the model's time scaled by the cluster's
//! pace ([`SimCluster::set_migration_pace`]): at the default 0 a migration ends at once.
//! A round that lasts in real time is also reported part way, every 200 ms, as an
//! agent reports the round it sends.
//!
//! It lives outside `tern-manager` so that the manager does not depend on a hypervisor.
//!
//! # Layout
//! - [`SimHost`]: one host, its driver and the load it reports; implements [`HostClient`].
//! - [`SimCluster`]: the hosts by name, the migration pace; implements [`Connector`].
//! - feature `testing`: [`SimHost::set_down`] and [`SimHost::vm_names`], for tests that
//!   cut a host off and look at what it holds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tern_api::migration::Phase;
use tern_hv::sim::SimDriver;
use tern_hv::Hypervisor;
use tern_migrate::{DirtyModel, MigrationParams};

use tern_manager::client::{Connector, HostClient, Progress, ProgressFn};
use tern_manager::decide::balance::{DIRTY_BYTES_PER_CORE_S, LINK_BYTES_PER_S};
use tern_manager::decide::{LoadReport, VmLoad};
use tern_manager::error::{Error, Result};
use tern_manager::state::{Host, Image, MigrationResult, PolicyKind, VmSpec};

/// One simulated host.
pub struct SimHost {
    name: String,
    driver: SimDriver,
    /// Each VM's CPU time at the last report, to turn cumulative time into cores.
    samples: Mutex<BTreeMap<String, (u64, Instant)>>,
    /// Each VM's configured busy fraction, which travels with it when it migrates.
    utilisation: Mutex<BTreeMap<String, f64>>,
    cluster: std::sync::Weak<SimCluster>,
    /// A host switched off answers nothing, as if its agent died; its VMs stay defined,
    /// as they would on a host cut off from the network.
    down: std::sync::atomic::AtomicBool,
}

fn hv_err(host: &str, e: impl std::fmt::Display) -> Error {
    Error::Agent {
        host: host.to_owned(),
        message: e.to_string(),
    }
}

impl SimHost {
    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets how busy `vm`'s vCPUs are (0..=1); it keeps that load when it migrates.
    pub async fn set_utilisation(&self, vm: &str, u: f64) -> Result<()> {
        self.driver
            .set_utilisation(vm, u)
            .map_err(|e| hv_err(&self.name, e))?;
        // The next report measures from here, at the new load.
        let m = self
            .driver
            .metrics(vm)
            .await
            .map_err(|e| hv_err(&self.name, e))?;
        Self::lock(&self.samples).insert(vm.to_owned(), (m.vcpu_cpu_ns, Instant::now()));
        Self::lock(&self.utilisation).insert(vm.to_owned(), u);
        Ok(())
    }

    /// Cuts the host off (`true`) or brings it back.
    #[cfg(any(test, feature = "testing"))]
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn reachable(&self) -> Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(hv_err(&self.name, "host is down"));
        }
        Ok(())
    }

    /// The VMs the driver holds, in any state.
    #[cfg(any(test, feature = "testing"))]
    pub async fn vm_names(&self) -> Vec<String> {
        self.driver
            .list()
            .await
            .map(|l| l.into_iter().map(|v| v.id).collect())
            .unwrap_or_default()
    }

    async fn forget(&self, vm: &str) {
        Self::lock(&self.samples).remove(vm);
        Self::lock(&self.utilisation).remove(vm);
    }
}

#[async_trait]
impl HostClient for SimHost {
    async fn create_vm(
        &self,
        vm: &str,
        spec: &VmSpec,
        image: Option<&Image>,
        _reuse_disks: bool,
    ) -> Result<()> {
        self.reachable()?;
        let hv_spec = spec.host_spec(vm, image);
        self.driver
            .create(vm, hv_spec, false)
            .await
            .map_err(|e| hv_err(&self.name, e))?;
        self.driver
            .start(vm)
            .await
            .map_err(|e| hv_err(&self.name, e))?;
        Self::lock(&self.samples).insert(vm.to_owned(), (0, Instant::now()));
        Ok(())
    }

    /// What the `sim` driver can do: start, stop, reboot, pause, resume. It keeps no
    /// guest memory to save, so suspend and restore are refused.
    async fn act(
        &self,
        vm: &str,
        action: tern_api::manager::VmAction,
        _req: &tern_api::manager::VmActionRequest,
    ) -> Result<()> {
        use tern_api::manager::VmAction as A;
        self.reachable()?;
        let d = &self.driver;
        let r = match action {
            A::Start => d.start(vm).await.map(drop),
            A::Stop => d.stop(vm).await.map(drop),
            A::Reboot => match d.stop(vm).await {
                Ok(_) => d.start(vm).await.map(drop),
                Err(e) => Err(e),
            },
            A::Pause => d.pause(vm).await.map(drop),
            A::Resume => d.resume(vm).await.map(drop),
            A::Suspend | A::Restore => {
                return Err(tern_manager::Error::BadInput(format!(
                    "VM {vm:?} is on simulated host {:?}, which keeps no guest memory to \
                     {}",
                    self.name,
                    action.as_str()
                )))
            }
        };
        r.map_err(|e| hv_err(&self.name, e))
    }

    async fn delete_vm(&self, vm: &str) -> Result<()> {
        self.reachable()?;
        // A VM the driver does not have is already what we want.
        let _ = self.driver.destroy(vm).await;
        self.forget(vm).await;
        Ok(())
    }

    async fn migrate_vm(
        &self,
        vm: &str,
        spec: &VmSpec,
        to: &Host,
        policy: PolicyKind,
        progress: ProgressFn<'_>,
    ) -> Result<MigrationResult> {
        self.reachable()?;
        let cluster = self
            .cluster
            .upgrade()
            .ok_or_else(|| hv_err(&self.name, "the simulated cluster is gone"))?;
        let dest = cluster.host(&to.name)?;
        dest.reachable()?;
        let util = Self::lock(&self.utilisation)
            .get(vm)
            .copied()
            .unwrap_or(0.0);
        let memory = spec.memory_mib * 1024 * 1024;
        let dirty = util * f64::from(spec.vcpus) * DIRTY_BYTES_PER_CORE_S;
        let params =
            MigrationParams::new(memory, LINK_BYTES_PER_S).with_dirty(DirtyModel::Uniform {
                rate_bytes_per_s: dirty,
                working_set_bytes: memory,
            });
        let out = tern_migrate::simulate(&params, &policy).map_err(|e| hv_err(&self.name, e))?;
        let wait = |model_s: f64| cluster.model_time(model_s);
        // The VM runs here through the live rounds, as it would under the real engine.
        progress(Progress::after_rounds(Phase::PreCopy, memory, &[]));
        for (i, r) in out.telemetry.iter().enumerate() {
            // A round is reported part way too, as an agent reports the round it sends.
            let steps = cluster.report_steps(r.duration_s);
            for step in 1..steps {
                wait(r.duration_s / steps as f64).await;
                let part = part_of_round(r, step as f64 / steps as f64);
                let done = &out.telemetry[..i];
                progress(Progress::during(Phase::PreCopy, memory, done, Some(&part)));
            }
            wait(r.duration_s / steps as f64).await;
            progress(Progress::after_rounds(
                Phase::PreCopy,
                memory,
                &out.telemetry[..=i],
            ));
        }
        if let Err(e) = dest.reachable() {
            return Ok(MigrationResult::Failed {
                error: e.to_string(),
            });
        }
        progress(Progress::after_rounds(
            Phase::StopAndCopy,
            memory,
            &out.telemetry,
        ));
        wait(out.downtime_s).await;
        let info = self
            .driver
            .info(vm)
            .await
            .map_err(|e| hv_err(&self.name, e))?;
        dest.driver
            .create(vm, info.spec.clone(), true)
            .await
            .map_err(|e| hv_err(&to.name, e))?;
        let steps = async {
            dest.driver
                .migrate_incoming(vm, "sim:")
                .await
                .map_err(|e| hv_err(&to.name, e))?;
            self.driver
                .migrate(vm, "sim:")
                .await
                .map_err(|e| hv_err(&self.name, e))?;
            dest.driver
                .resume(vm)
                .await
                .map_err(|e| hv_err(&to.name, e))?;
            Ok::<_, Error>(())
        };
        if let Err(e) = steps.await {
            // The single way back: the destination copy goes, the source runs on.
            let _ = dest.driver.destroy(vm).await;
            let _ = self.driver.resume(vm).await;
            return Ok(MigrationResult::Failed {
                error: e.to_string(),
            });
        }
        Self::lock(&dest.samples).insert(vm.to_owned(), (0, Instant::now()));
        dest.set_utilisation(vm, util).await?;
        let _ = self.driver.destroy(vm).await;
        self.forget(vm).await;
        Ok(MigrationResult::Succeeded {
            total_ms: out.total_ms(),
            downtime_ms: out.downtime_ms(),
        })
    }

    async fn load_report(&self) -> Result<LoadReport> {
        self.reachable()?;
        let vms = self
            .driver
            .list()
            .await
            .map_err(|e| hv_err(&self.name, e))?;
        let mut report = LoadReport::default();
        for v in vms {
            let m = self
                .driver
                .metrics(&v.id)
                .await
                .map_err(|e| hv_err(&self.name, e))?;
            let now = Instant::now();
            let mut samples = Self::lock(&self.samples);
            let (before, at) = samples.get(&v.id).copied().unwrap_or((0, now));
            let secs = now.duration_since(at).as_secs_f64();
            let cores = if secs > 0.0 {
                m.vcpu_cpu_ns.saturating_sub(before) as f64 / 1e9 / secs
            } else {
                0.0
            };
            samples.insert(v.id.clone(), (m.vcpu_cpu_ns, now));
            report.cpu_used += cores;
            report.vms.push(VmLoad {
                name: v.id.parse()?,
                cpu_used: cores,
                guest: None,
                powered_off: v.state == tern_hv::VmState::Stopped,
            });
        }
        Ok(report)
    }
}

/// The model's round `r` when `share` (0..=1) of it has run (pure): pages and bytes in
/// proportion, as the engine's even stream of batches would send them.
fn part_of_round(r: &tern_migrate::RoundTelemetry, share: f64) -> tern_migrate::RoundProgress {
    let duration_s = r.duration_s * share;
    tern_migrate::RoundProgress {
        round: r.round,
        pages_planned: r.pages_sent,
        pages_sent: (r.pages_sent as f64 * share) as u64,
        bytes_sent: (r.bytes_sent as f64 * share) as u64,
        duration_s,
        elapsed_s: r.elapsed_s - r.duration_s + duration_s,
    }
}

/// Real time between a sim migration's reports inside a round, as the manager polls an
/// agent.
const REPORT_EVERY: Duration = Duration::from_millis(200);

/// A set of simulated hosts, by name.
pub struct SimCluster {
    hosts: Mutex<BTreeMap<String, Arc<SimHost>>>,
    me: std::sync::Weak<SimCluster>,
    /// Real seconds per model second of a migration, as `f64` bits.
    pace: std::sync::atomic::AtomicU64,
}

impl SimCluster {
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            hosts: Mutex::new(BTreeMap::new()),
            me: me.clone(),
            pace: std::sync::atomic::AtomicU64::new(0f64.to_bits()),
        })
    }

    /// Makes migrations take `pace` real seconds per second of the model's time: 0 (the
    /// default) ends them at once, 1 lets them last as long as the model says, so their
    /// progress can be watched.
    pub fn set_migration_pace(&self, pace: f64) {
        let pace = if pace.is_finite() { pace.max(0.0) } else { 0.0 };
        self.pace
            .store(pace.to_bits(), std::sync::atomic::Ordering::Relaxed);
    }

    fn migration_pace(&self) -> f64 {
        f64::from_bits(self.pace.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Lets `model_s` seconds of model time pass at the current pace, in short slices so
    /// a change of pace applies to a migration already under way.
    async fn model_time(&self, mut model_s: f64) {
        const SLICE: Duration = Duration::from_millis(50);
        loop {
            let pace = self.migration_pace();
            if pace <= 0.0 || model_s <= 0.0 {
                return;
            }
            let real = Duration::from_secs_f64(model_s * pace).min(SLICE);
            // Rounding leaves crumbs of model time too short to sleep for.
            if real < Duration::from_micros(100) {
                return;
            }
            tokio::time::sleep(real).await;
            model_s -= real.as_secs_f64() / pace;
        }
    }

    /// How many reports a model round of `model_s` gets at the current pace: one per
    /// [`REPORT_EVERY`] of real time (at most 100), one at its end when it passes at once.
    fn report_steps(&self, model_s: f64) -> u32 {
        let real_s = model_s * self.migration_pace();
        let steps = (real_s / REPORT_EVERY.as_secs_f64()).ceil();
        if steps.is_finite() {
            steps.clamp(1.0, 100.0) as u32
        } else {
            1
        }
    }

    /// Adds a host named `name` (its `Host::address` is `sim:`).
    pub fn add_host(&self, name: &str) -> Arc<SimHost> {
        let h = Arc::new(SimHost {
            name: name.to_owned(),
            driver: SimDriver::new(),
            samples: Mutex::new(BTreeMap::new()),
            utilisation: Mutex::new(BTreeMap::new()),
            cluster: self.me.clone(),
            down: std::sync::atomic::AtomicBool::new(false),
        });
        SimHost::lock(&self.hosts).insert(name.to_owned(), h.clone());
        h
    }

    pub fn host(&self, name: &str) -> Result<Arc<SimHost>> {
        SimHost::lock(&self.hosts)
            .get(name)
            .cloned()
            .ok_or_else(|| hv_err(name, "no such simulated host"))
    }

    /// Sets how busy `vm`'s vCPUs are (0..=1) on whichever host runs it.
    pub async fn set_utilisation(&self, vm: &str, utilisation: f64) -> Result<()> {
        let hosts: Vec<Arc<SimHost>> = SimHost::lock(&self.hosts).values().cloned().collect();
        for h in hosts {
            if h.driver.info(vm).await.is_ok() {
                return h.set_utilisation(vm, utilisation).await;
            }
        }
        Err(Error::UnknownVm(vm.to_owned()))
    }
}

impl Connector for SimCluster {
    fn client(&self, host: &Host) -> Result<Arc<dyn HostClient>> {
        Ok(self.host(&host.name)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_round_is_reported_part_way_in_proportion() {
        let r = tern_migrate::RoundTelemetry {
            round: 2,
            pages_sent: 1000,
            bytes_sent: 4_096_000,
            pages_changed: 10,
            dirty_rate_bytes_per_s: 1e6,
            bandwidth_bytes_per_s: 1e8,
            remaining_pages: 10,
            held_back_pages: 0,
            predicted_downtime_s: 0.1,
            duration_s: 2.0,
            elapsed_s: 5.0,
            throttle_percent: 0,
        };
        let p = part_of_round(&r, 0.25);
        assert_eq!((p.round, p.pages_planned, p.pages_sent), (2, 1000, 250));
        assert_eq!(p.bytes_sent, 1_024_000);
        assert_eq!((p.duration_s, p.elapsed_s), (0.5, 3.5));
        let c = SimCluster::new();
        assert_eq!(c.report_steps(2.0), 1, "pace 0: at once");
        c.set_migration_pace(0.1);
        assert_eq!(c.report_steps(2.0), 1, "0.2 s real: one report");
        c.set_migration_pace(1.0);
        assert_eq!(c.report_steps(2.0), 10);
        assert_eq!(c.report_steps(1e9), 100);
    }

    #[tokio::test]
    async fn model_time_follows_the_pace() {
        let c = SimCluster::new();
        c.set_migration_pace(0.1);
        let t = Instant::now();
        c.model_time(2.0).await;
        let took = t.elapsed().as_secs_f64();
        assert!((0.19..1.0).contains(&took), "{took}");
        c.set_migration_pace(0.0);
        let t = Instant::now();
        c.model_time(1e9).await;
        assert!(t.elapsed() < Duration::from_millis(50));
    }
}
