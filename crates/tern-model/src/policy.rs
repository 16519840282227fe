//! Instance policies (Ganeti's `IPolicy`): the instance sizes and disk
//! templates a cluster or group admits. tern keeps them so that a Ganeti file
//! round-trips; the planner may consult them for what an allocation may look like.

use serde::{Deserialize, Serialize};

use crate::DiskTemplate;

/// One instance size specification (Ganeti's `ISpec`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ISpec {
    pub mem_size: i64,
    pub cpu_count: i64,
    pub disk_size: i64,
    pub disk_count: i64,
    pub nic_count: i64,
    pub spindle_use: i64,
}

/// An allowed range of instance sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MinMaxISpecs {
    pub min: ISpec,
    pub max: ISpec,
}

/// What a cluster or group admits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IPolicy {
    pub min_max: Vec<MinMaxISpecs>,
    pub std: ISpec,
    pub disk_templates: Vec<DiskTemplate>,
    /// Virtual CPUs allowed per physical CPU.
    pub vcpu_ratio: f64,
    /// Instances' spindle use allowed per physical spindle.
    pub spindle_ratio: f64,
}

impl Default for IPolicy {
    /// Ganeti's `defIPolicy`, which applies when a file has no policy section.
    fn default() -> Self {
        IPolicy {
            min_max: vec![MinMaxISpecs {
                min: ISpec {
                    mem_size: 128,
                    cpu_count: 1,
                    disk_size: 1024,
                    disk_count: 1,
                    nic_count: 1,
                    spindle_use: 1,
                },
                max: ISpec {
                    mem_size: 32768,
                    cpu_count: 8,
                    disk_size: 1024 * 1024,
                    disk_count: 16,
                    nic_count: 8,
                    spindle_use: 12,
                },
            }],
            std: ISpec {
                mem_size: 128,
                cpu_count: 1,
                disk_size: 1024,
                disk_count: 1,
                nic_count: 1,
                spindle_use: 1,
            },
            disk_templates: DiskTemplate::ALL.to_vec(),
            vcpu_ratio: 4.0,
            spindle_ratio: 32.0,
        }
    }
}
