//! What the simulated data centre is made of: host and VM types, and which type each
//! host and VM has. Per-entity data is a `u16` type index, so a cluster of 10,000 hosts
//! and 100,000 VMs costs a few hundred kilobytes here.

use serde::Serialize;

use crate::power::PowerModel;

/// A kind of physical host.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HostType {
    pub name: String,
    pub cores: u32,
    /// MIPS of one core; a VM's vCPU never gets more than this.
    pub core_mips: f64,
    pub ram_mb: f64,
    /// Link speed in Mbit/s.
    pub link_mbps: f64,
    pub power: PowerModel,
}

impl HostType {
    pub fn mips(&self) -> f64 {
        f64::from(self.cores) * self.core_mips
    }
}

/// A kind of VM (one vCPU, as in CloudSim's PlanetLab setup).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VmType {
    pub name: String,
    pub mips: f64,
    pub ram_mb: f64,
    /// Bandwidth reserved on the host for the VM's own traffic, Mbit/s.
    pub bw_mbps: f64,
}

/// Hosts and VMs by type, in index order (index order breaks placement ties).
#[derive(Clone, Debug, Default)]
pub struct ClusterSpec {
    pub host_types: Vec<HostType>,
    pub hosts: Vec<u16>,
    pub vm_types: Vec<VmType>,
    pub vms: Vec<u16>,
}

impl ClusterSpec {
    pub fn host(&self, h: usize) -> &HostType {
        &self.host_types[usize::from(self.hosts[h])]
    }

    pub fn vm(&self, v: usize) -> &VmType {
        &self.vm_types[usize::from(self.vms[v])]
    }
}
