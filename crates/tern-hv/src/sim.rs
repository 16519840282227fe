//! The in-process driver: VMs are table entries that follow the same state machine and
//! report CPU time from a configured utilisation, for the no-dependency demo and for
//! tests of code above the driver (agent, manager) at a scale QEMU cannot reach here.
//!
//! A simulated migration completes at once: `migrate` leaves the source paused
//! (QEMU's `postmigrate`), and an incoming VM is complete as soon as it listens.

use crate::driver::{Hypervisor, MigrationState, MigrationStatus, VcpuSample, VmInfo, VmMetrics};
use crate::error::{HvError, Result};
use crate::spec::{derived_mac, VmSpec};
use crate::state::{transition, Action, VmState};
use async_trait::async_trait;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;
use tern_model::VmName;

/// Simulated thread ids start here so they never look like a real small pid.
const SIM_TID_BASE: u32 = 1_000_000;

struct SimVm {
    spec: VmSpec,
    macs: Vec<String>,
    state: VmState,
    /// Fraction of each vCPU the guest keeps busy while running, 0..=1.
    utilisation: f64,
    /// CPU time accumulated before the current running stretch.
    cpu_ns: u64,
    running_since: Option<Instant>,
    migration: Option<MigrationStatus>,
    tid_base: u32,
}

impl SimVm {
    fn cpu_ns_now(&self) -> u64 {
        let live = self.running_since.map_or(0.0, |t| {
            t.elapsed().as_nanos() as f64 * self.utilisation * f64::from(self.spec.vcpus)
        });
        self.cpu_ns + live as u64
    }

    /// Folds the running stretch into `cpu_ns` and sets the new state.
    fn set_state(&mut self, s: VmState) {
        self.cpu_ns = self.cpu_ns_now();
        self.running_since = (s == VmState::Running).then(Instant::now);
        self.state = s;
    }
}

/// The in-process driver.
#[derive(Default)]
pub struct SimDriver {
    vms: Mutex<BTreeMap<String, SimVm>>,
    next_tid: Mutex<u32>,
}

impl SimDriver {
    pub fn new() -> SimDriver {
        SimDriver::default()
    }

    /// Sets how busy a VM's vCPUs are (0..=1, clamped); drives its reported CPU time.
    pub fn set_utilisation(&self, id: &str, utilisation: f64) -> Result<()> {
        self.with(id, |vm| {
            vm.cpu_ns = vm.cpu_ns_now();
            if vm.running_since.is_some() {
                vm.running_since = Some(Instant::now());
            }
            vm.utilisation = utilisation.clamp(0.0, 1.0);
            Ok(())
        })
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut SimVm) -> Result<T>) -> Result<T> {
        let mut vms = self.vms.lock().expect("sim VM table lock");
        let vm = vms
            .get_mut(id)
            .ok_or_else(|| HvError::UnknownVm(id.to_string()))?;
        f(vm)
    }

    fn act(&self, id: &str, action: Action) -> Result<VmInfo> {
        self.with(id, |vm| {
            let next = transition(vm.state, action).ok_or(HvError::Conflict {
                id: id.to_string(),
                action: action.verb(),
                state: vm.state,
            })?;
            vm.set_state(next);
            Ok(info(id, vm))
        })
    }
}

fn info(id: &str, vm: &SimVm) -> VmInfo {
    VmInfo {
        id: id.to_string(),
        state: vm.state,
        spec: vm.spec.clone(),
        macs: vm.macs.clone(),
        memory_file: None,
        control_socket: None,
        console_log: None,
        console_socket: None,
        pid: None,
    }
}

#[async_trait]
impl Hypervisor for SimDriver {
    fn kind(&self) -> &'static str {
        "sim"
    }

    async fn create(&self, id: &str, spec: VmSpec, incoming: bool) -> Result<VmInfo> {
        VmName::check(id)?;
        crate::spec::check_paths(&spec)?;
        let mut vms = self.vms.lock().expect("sim VM table lock");
        if vms.contains_key(id) {
            return Err(HvError::AlreadyExists(id.to_string()));
        }
        let tid_base = {
            let mut n = self.next_tid.lock().expect("sim tid lock");
            let base = SIM_TID_BASE + *n;
            *n += spec.vcpus;
            base
        };
        let vm = SimVm {
            macs: (0..spec.nics.len())
                .map(|i| {
                    spec.nics[i]
                        .mac
                        .clone()
                        .unwrap_or_else(|| derived_mac(id, i))
                })
                .collect(),
            spec,
            state: if incoming {
                VmState::Incoming
            } else {
                VmState::Created
            },
            utilisation: 0.0,
            cpu_ns: 0,
            running_since: None,
            migration: None,
            tid_base,
        };
        let out = info(id, &vm);
        vms.insert(id.to_string(), vm);
        Ok(out)
    }

    async fn start(&self, id: &str) -> Result<VmInfo> {
        self.act(id, Action::Start)
    }
    async fn pause(&self, id: &str) -> Result<VmInfo> {
        self.act(id, Action::Pause)
    }
    async fn resume(&self, id: &str) -> Result<VmInfo> {
        self.act(id, Action::Resume)
    }
    async fn stop(&self, id: &str) -> Result<VmInfo> {
        self.act(id, Action::Stop)
    }

    /// A simulated guest obeys the power button at once.
    async fn powerdown(&self, id: &str) -> Result<()> {
        self.act(id, Action::Stop).map(drop)
    }
    async fn wait_stopped(&self, id: &str, _timeout: std::time::Duration) -> Result<VmInfo> {
        self.info(id).await
    }
    async fn reboot(&self, id: &str) -> Result<VmInfo> {
        self.act(id, Action::Reboot)
    }
    async fn suspended(&self, id: &str) -> Result<VmInfo> {
        self.act(id, Action::Suspend)
    }
    async fn restore(&self, id: &str) -> Result<VmInfo> {
        self.act(id, Action::Restore)
    }
    async fn abandon_restore(&self, id: &str) -> Result<VmInfo> {
        self.act(id, Action::AbandonRestore)
    }

    async fn destroy(&self, id: &str) -> Result<()> {
        self.vms
            .lock()
            .expect("sim VM table lock")
            .remove(id)
            .map(drop)
            .ok_or_else(|| HvError::UnknownVm(id.to_string()))
    }

    async fn list(&self) -> Result<Vec<VmInfo>> {
        let vms = self.vms.lock().expect("sim VM table lock");
        Ok(vms.iter().map(|(id, vm)| info(id, vm)).collect())
    }

    async fn info(&self, id: &str) -> Result<VmInfo> {
        self.with(id, |vm| Ok(info(id, vm)))
    }

    async fn metrics(&self, id: &str) -> Result<VmMetrics> {
        self.with(id, |vm| {
            let total = vm.cpu_ns_now();
            let n = u64::from(vm.spec.vcpus);
            let vcpus: Vec<VcpuSample> = (0..vm.spec.vcpus)
                .map(|i| VcpuSample {
                    index: i,
                    thread_id: vm.tid_base + i,
                    cpu_ns: total / n,
                })
                .collect();
            let memory_bytes = vm.spec.memory_mib * 1024 * 1024;
            Ok(VmMetrics {
                vcpu_cpu_ns: vcpus.iter().map(|v| v.cpu_ns).sum(),
                vcpus,
                memory_bytes,
                rss_bytes: if matches!(vm.state, VmState::Stopped | VmState::Suspended) {
                    0
                } else {
                    memory_bytes
                },
            })
        })
    }

    async fn vcpu_threads(&self, id: &str) -> Result<Vec<u32>> {
        self.with(id, |vm| {
            Ok((0..vm.spec.vcpus).map(|i| vm.tid_base + i).collect())
        })
    }

    async fn refresh(&self, id: &str) -> Result<VmInfo> {
        self.info(id).await
    }

    async fn migrate_incoming(&self, id: &str, _uri: &str) -> Result<()> {
        self.act(id, Action::IncomingDone).map(drop)
    }

    async fn set_migration_capabilities(&self, id: &str, _caps: &[(&str, bool)]) -> Result<()> {
        self.with(id, |_| Ok(()))
    }

    async fn migrate(&self, id: &str, _uri: &str) -> Result<()> {
        self.with(id, |vm| {
            if !matches!(vm.state, VmState::Running | VmState::Paused) {
                return Err(HvError::Conflict {
                    id: id.to_string(),
                    action: "migrate",
                    state: vm.state,
                });
            }
            vm.set_state(VmState::Paused);
            vm.migration = Some(MigrationStatus {
                state: MigrationState::Completed,
                transferred_bytes: 0,
                downtime_ms: Some(0),
                total_time_ms: Some(0),
                error: None,
            });
            Ok(())
        })
    }

    async fn query_migrate(&self, id: &str) -> Result<MigrationStatus> {
        self.with(id, |vm| {
            Ok(vm.migration.clone().unwrap_or(MigrationStatus {
                state: MigrationState::None,
                transferred_bytes: 0,
                downtime_ms: None,
                total_time_ms: None,
                error: None,
            }))
        })
    }

    async fn migrate_cancel(&self, id: &str) -> Result<()> {
        self.with(id, |_| Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        serde_json::from_str(r#"{"vcpus": 2, "memory_mib": 128}"#).unwrap()
    }

    #[tokio::test]
    async fn lifecycle_and_conflicts() {
        let d = SimDriver::new();
        d.create("a", spec(), false).await.unwrap();
        assert!(matches!(
            d.create("a", spec(), false).await,
            Err(HvError::AlreadyExists(_))
        ));
        assert!(matches!(d.pause("a").await, Err(HvError::Conflict { .. })));
        assert_eq!(d.start("a").await.unwrap().state, VmState::Running);
        assert_eq!(d.pause("a").await.unwrap().state, VmState::Paused);
        assert_eq!(d.resume("a").await.unwrap().state, VmState::Running);
        assert_eq!(d.stop("a").await.unwrap().state, VmState::Stopped);
        assert!(matches!(d.reboot("a").await, Err(HvError::Conflict { .. })));
        d.start("a").await.unwrap();
        assert_eq!(d.reboot("a").await.unwrap().state, VmState::Running);
        assert_eq!(d.suspended("a").await.unwrap().state, VmState::Suspended);
        assert!(matches!(d.start("a").await, Err(HvError::Conflict { .. })));
        assert_eq!(d.restore("a").await.unwrap().state, VmState::Restoring);
        assert_eq!(
            d.abandon_restore("a").await.unwrap().state,
            VmState::Suspended
        );
        d.destroy("a").await.unwrap();
        assert!(matches!(d.info("a").await, Err(HvError::UnknownVm(_))));
        assert!(matches!(d.destroy("a").await, Err(HvError::UnknownVm(_))));
    }

    #[tokio::test]
    async fn cpu_time_follows_utilisation() {
        let d = SimDriver::new();
        d.create("a", spec(), false).await.unwrap();
        d.set_utilisation("a", 1.0).unwrap();
        d.start("a").await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        d.pause("a").await.unwrap();
        let m1 = d.metrics("a").await.unwrap();
        // Two vCPUs fully busy for at least 30 ms.
        assert!(m1.vcpu_cpu_ns >= 59_000_000, "{}", m1.vcpu_cpu_ns);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(
            d.metrics("a").await.unwrap().vcpu_cpu_ns,
            m1.vcpu_cpu_ns,
            "paused"
        );
        assert_eq!(d.vcpu_threads("a").await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn bad_spec_is_refused() {
        let d = SimDriver::new();
        let no_mem: VmSpec = serde_json::from_str(r#"{"vcpus": 1}"#).unwrap();
        assert!(d
            .create("a", no_mem, false)
            .await
            .unwrap_err()
            .is_bad_input());
        assert!(d.list().await.unwrap().is_empty(), "nothing created");
    }

    #[tokio::test]
    async fn a_bad_name_is_refused_as_bad_input() {
        let d = SimDriver::new();
        let e = d.create("Web", spec(), false).await.unwrap_err();
        assert!(matches!(e, HvError::BadName(_)) && e.is_bad_input(), "{e}");
        assert!(d.list().await.unwrap().is_empty(), "nothing created");
    }

    #[tokio::test]
    async fn simulated_migration() {
        let d = SimDriver::new();
        d.create("src", spec(), false).await.unwrap();
        d.create("dst", spec(), true).await.unwrap();
        assert!(matches!(
            d.start("dst").await,
            Err(HvError::Conflict { .. })
        ));
        d.start("src").await.unwrap();
        d.migrate("src", "tcp:x:1").await.unwrap();
        assert_eq!(
            d.query_migrate("src").await.unwrap().state,
            MigrationState::Completed
        );
        assert_eq!(d.info("src").await.unwrap().state, VmState::Paused);
        d.migrate_incoming("dst", "tcp:x:1").await.unwrap();
        assert_eq!(d.resume("dst").await.unwrap().state, VmState::Running);
    }
}
