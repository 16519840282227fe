//! CloudSim's standard PlanetLab benchmark: the cluster, the VM types and the workload.
//!
//! Hosts alternate HP ProLiant ML110 G4 (2 x 1860 MIPS) and G5 (2 x 2660 MIPS), 4 GB RAM
//! and a 1 Gbit/s link each. One VM per trace file (files sorted by name; CloudSim
//! takes them in the order the file system lists them), 1 vCPU, 100 Mbit/s reserved;
//! four VM types (MIPS, MB): (2500, 870), (2000, 1740), (1000, 1740), (500, 613), in
//! four consecutive blocks of files as CloudSim deals them. 288 five-minute samples,
//! one scheduling tick per sample.

use std::path::Path;

use crate::cluster::{ClusterSpec, HostType, VmType};
use crate::power::{HP_ML110_G4, HP_ML110_G5};
use crate::trace::Traces;
use crate::SimError;

/// Samples per PlanetLab day.
pub const SAMPLES: usize = 288;
/// Seconds per sample.
pub const INTERVAL_S: f64 = 300.0;
/// Intervals simulated and metered, as CloudSim's PlanetLab runs do: scheduling ticks
/// every 300 s, the first decision and meter reading at the first tick (300 s, before
/// it no host has a previous utilisation), the last at 86,100 s.
pub const INTERVALS: u32 = SAMPLES as u32 - 1;
/// See `INTERVALS`.
pub const WARM_UP_INTERVALS: u32 = 1;

/// How VM types are dealt out over the trace files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmTypeOrder {
    /// VM `i` gets type `i mod 4` (what the data README describes).
    Cycle,
    /// Four consecutive blocks of `ceil(n/4)` VMs (CloudSim's `Helper.createVmList`).
    Block,
}

/// The two host types, G4 then G5.
pub fn host_types() -> Vec<HostType> {
    vec![
        HostType {
            name: "hp-ml110-g4".into(),
            cores: 2,
            core_mips: 1860.0,
            ram_mb: 4096.0,
            link_mbps: 1000.0,
            power: HP_ML110_G4,
        },
        HostType {
            name: "hp-ml110-g5".into(),
            cores: 2,
            core_mips: 2660.0,
            ram_mb: 4096.0,
            link_mbps: 1000.0,
            power: HP_ML110_G5,
        },
    ]
}

/// The four VM types.
pub fn vm_types() -> Vec<VmType> {
    [
        (2500.0, 870.0),
        (2000.0, 1740.0),
        (1000.0, 1740.0),
        (500.0, 613.0),
    ]
    .iter()
    .enumerate()
    .map(|(i, &(mips, ram_mb))| VmType {
        name: format!("planetlab-{i}"),
        mips,
        ram_mb,
        bw_mbps: 100.0,
    })
    .collect()
}

/// The benchmark cluster with `hosts` hosts and `vms` VMs.
pub fn cluster(hosts: usize, vms: usize, order: VmTypeOrder) -> ClusterSpec {
    let block = vms.div_ceil(4).max(1);
    ClusterSpec {
        host_types: host_types(),
        hosts: (0..hosts).map(|i| (i % 2) as u16).collect(),
        vm_types: vm_types(),
        vms: (0..vms)
            .map(|i| match order {
                VmTypeOrder::Cycle => (i % 4) as u16,
                VmTypeOrder::Block => (i / block) as u16,
            })
            .collect(),
    }
}

/// Loads a PlanetLab day folder and builds the matching cluster.
pub fn load(
    dir: &Path,
    hosts: usize,
    order: VmTypeOrder,
) -> Result<(ClusterSpec, Traces), SimError> {
    if !dir.is_dir() {
        return Err(SimError::BadTrace(format!(
            "{} is not a folder; give a PlanetLab day folder such as data/planetlab/20110303",
            dir.display()
        )));
    }
    let traces = Traces::load_planetlab(dir, SAMPLES, INTERVAL_S)?;
    Ok((cluster(hosts, traces.vms(), order), traces))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_cycle_or_block() {
        let c = cluster(4, 10, VmTypeOrder::Cycle);
        assert_eq!(c.vms, vec![0, 1, 2, 3, 0, 1, 2, 3, 0, 1]);
        assert_eq!(c.hosts, vec![0, 1, 0, 1]);
        let b = cluster(4, 10, VmTypeOrder::Block);
        assert_eq!(b.vms, vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3]);
    }
}
