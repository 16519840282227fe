//! How long a migration takes. The simulator asks a `MigrationTiming` for the total time
//! and downtime of moving a VM's memory at the bandwidth it has now; when that bandwidth
//! changes (another migration on the same link starts or ends) it asks again for the
//! part that is left.

use tern_migrate::model::{simulate, DirtyModel, MigrationParams};
use tern_migrate::policy::PolicyKind;

/// Duration of one migration at a constant bandwidth.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Estimate {
    /// Seconds from start to the VM running on the destination.
    pub total_s: f64,
    /// Seconds the VM is paused (the stop-and-copy).
    pub downtime_s: f64,
}

/// A model of migration time.
pub trait MigrationTiming {
    /// Time to move `ram_mb` of memory that the guest re-dirties at `dirty_mb_s`, over a
    /// link giving `bandwidth_mb_s`; `None` when the migration would never finish.
    fn estimate(&self, ram_mb: f64, dirty_mb_s: f64, bandwidth_mb_s: f64) -> Option<Estimate>;
    /// Whether concurrent migrations share a host's link (else each gets it whole).
    fn shares_links(&self) -> bool;
    fn name(&self) -> &'static str;
}

/// CloudSim's `PowerDatacenter`: RAM over half the destination link, no dirtying, no
/// downtime, no sharing between concurrent migrations.
pub struct CloudSimTiming;

impl MigrationTiming for CloudSimTiming {
    fn estimate(&self, ram_mb: f64, _dirty_mb_s: f64, bandwidth_mb_s: f64) -> Option<Estimate> {
        Some(Estimate {
            total_s: ram_mb / bandwidth_mb_s,
            downtime_s: 0.0,
        })
    }

    fn shares_links(&self) -> bool {
        false
    }

    fn name(&self) -> &'static str {
        "cloudsim"
    }
}

/// tern's pre-copy model (`tern_migrate::simulate`, analytic) with the costs of tern's
/// engine (`MigrationParams::engine`: achieved share of the link, a scan of memory per
/// round, setup, device state and resume, the round-1 probe), all of memory taken as
/// holding data: rounds until the termination policy stops, then a stop-and-copy. The
/// guest dirties a working set (`working_set_fraction` of its memory) at random;
/// concurrent migrations share links.
pub struct PreCopyTiming {
    pub policy: PolicyKind,
    pub working_set_fraction: f64,
}

impl PreCopyTiming {
    pub fn new(policy: PolicyKind) -> PreCopyTiming {
        PreCopyTiming {
            policy,
            working_set_fraction: 0.25,
        }
    }
}

impl MigrationTiming for PreCopyTiming {
    fn estimate(&self, ram_mb: f64, dirty_mb_s: f64, bandwidth_mb_s: f64) -> Option<Estimate> {
        let memory_bytes = (ram_mb * 1e6) as u64;
        let dirty = if dirty_mb_s > 0.0 {
            DirtyModel::Uniform {
                rate_bytes_per_s: dirty_mb_s * 1e6,
                working_set_bytes: (memory_bytes as f64 * self.working_set_fraction) as u64,
            }
        } else {
            DirtyModel::None
        };
        let params = MigrationParams::engine(memory_bytes, memory_bytes, bandwidth_mb_s * 1e6)
            .with_dirty(dirty);
        // The model refuses only impossible inputs (no memory, no bandwidth): such a
        // migration never finishes.
        let outcome = simulate(&params, &self.policy).ok()?;
        Some(Estimate {
            total_s: outcome.total_time_s,
            downtime_s: outcome.downtime_s,
        })
    }

    fn shares_links(&self) -> bool {
        true
    }

    fn name(&self) -> &'static str {
        self.policy.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_migrate::Policy;

    #[test]
    fn precopy_of_an_idle_guest_is_memory_over_what_the_engine_gets_of_the_link() {
        let p = MigrationParams::engine(1_000_000_000, 1_000_000_000, 100e6);
        for policy in PolicyKind::ALL {
            let e = PreCopyTiming::new(policy)
                .estimate(1000.0, 0.0, 100.0)
                .unwrap();
            // A scan ends round 1 and another starts the stop-and-copy; stop-copy runs
            // no round.
            let scans = if policy == PolicyKind::StopCopy {
                1.0
            } else {
                2.0
            };
            // A policy that freezes the guest's untainted processes waits for that too.
            let freeze = if policy.freezes_untainted() {
                p.freeze_s
            } else {
                0.0
            };
            let expected = 10.0 / p.link_efficiency
                + p.setup_s
                + freeze
                + scans * p.scan_s()
                + p.stop_overhead_s;
            assert!((e.total_s - expected).abs() < 0.05, "{policy}: {e:?}");
        }
    }

    #[test]
    fn dirtying_makes_precopy_slower_and_bandwidth_faster() {
        let t = PreCopyTiming::new(PolicyKind::Qemu);
        let idle = t.estimate(1740.0, 0.0, 62.5).unwrap();
        let busy = t.estimate(1740.0, 20.0, 62.5).unwrap();
        let wide = t.estimate(1740.0, 20.0, 125.0).unwrap();
        assert!(busy.total_s > idle.total_s);
        assert!(wide.total_s < busy.total_s);
        assert!(t.estimate(0.0, 0.0, 62.5).is_none());
    }

    #[test]
    fn cloudsim_delay_is_ram_over_half_a_gigabit() {
        // 870 MB at 1 Gbit/s, half for migration: 62.5 MB/s.
        let e = CloudSimTiming.estimate(870.0, 10.0, 62.5).unwrap();
        assert!((e.total_s - 13.92).abs() < 1e-9);
        assert_eq!(e.downtime_s, 0.0);
    }
}
