//! How long a migration takes. The simulator asks a `MigrationTiming` for the total time
//! and downtime of moving a VM's memory at the bandwidth it has now; when that bandwidth
//! changes (another migration on the same link starts or ends) it asks again for the
//! part that is left.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cloudsim_delay_is_ram_over_half_a_gigabit() {
        // 870 MB at 1 Gbit/s, half for migration: 62.5 MB/s.
        let e = CloudSimTiming.estimate(870.0, 10.0, 62.5).unwrap();
        assert!((e.total_s - 13.92).abs() < 1e-9);
        assert_eq!(e.downtime_s, 0.0);
    }
}
