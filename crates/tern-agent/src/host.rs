//! The host's capacity and load, and the admission rule for new VMs. The rules and the
//! rate arithmetic are pure; [`detect_capacity`] reads `/proc`.

use crate::error::AgentError;
pub use tern_api::agent::{Capacity, HostReport, Load};

/// The host's CPUs and memory as the kernel reports them.
pub fn detect_capacity() -> Result<Capacity, AgentError> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let mem = tern_hv::procfs::host_memory_bytes(std::path::Path::new("/proc"))?;
    Ok(Capacity {
        cpus,
        memory_mib: mem >> 20,
    })
}

/// Refuses a VM of `want_mib` when the VMs already defined (`used_mib`) leave too little.
pub fn admit(capacity: Capacity, used_mib: u64, want_mib: u64) -> Result<(), AgentError> {
    let free = capacity.memory_mib.saturating_sub(used_mib);
    if want_mib > free {
        Err(AgentError::NoRoom(format!(
            "the VM needs {want_mib} MiB, {free} MiB of {} MiB are free",
            capacity.memory_mib
        )))
    } else {
        Ok(())
    }
}

/// CPU use in cores between two cumulative samples `(cpu_ns, wall_ns)`. A counter that went
/// backwards (a VM restarted) gives 0 rather than a huge number.
pub fn cpu_cores(prev: (u64, u64), now: (u64, u64)) -> f64 {
    let wall = now.1.saturating_sub(prev.1);
    if wall == 0 {
        return 0.0;
    }
    now.0.saturating_sub(prev.0) as f64 / wall as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn admission() {
        let c = Capacity {
            cpus: 2,
            memory_mib: 1024,
        };
        assert!(admit(c, 512, 512).is_ok());
        let e = admit(c, 768, 512).unwrap_err();
        assert_eq!(e.status().as_u16(), 507);
        assert!(e.to_string().contains("256 MiB of 1024 MiB"), "{e}");
        assert!(admit(c, 2048, 1).is_err(), "overcommitted host");
    }

    #[test]
    fn rates() {
        assert_eq!(cpu_cores((0, 0), (500, 1000)), 0.5);
        assert_eq!(cpu_cores((900, 0), (100, 1000)), 0.0);
        assert_eq!(cpu_cores((0, 5), (100, 5)), 0.0);
    }

    proptest! {
        #[test]
        fn admitted_never_exceeds(cap in 0u64..1<<20, used in 0u64..1<<20, want in 0u64..1<<20) {
            let c = Capacity { cpus: 1, memory_mib: cap };
            if admit(c, used, want).is_ok() { prop_assert!(used + want <= cap.max(used)); }
        }
    }
}
