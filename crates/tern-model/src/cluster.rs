//! The cluster snapshot: groups, nodes (hosts) and instances (VMs) in `Vec`s,
//! referring to each other by index. Every loader (Ganeti text file, live
//! agents, simulator) produces this one type.

use serde::{Deserialize, Serialize};

use crate::{GroupId, IPolicy, InstId, NodeId};

/// Whether a group takes new instances (Ganeti's `AllocPolicy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllocPolicy {
    Preferred,
    LastResort,
    Unallocable,
}

impl AllocPolicy {
    pub const ALL: [AllocPolicy; 3] = [Self::Preferred, Self::LastResort, Self::Unallocable];

    /// The spelling in Ganeti files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Preferred => "preferred",
            Self::LastResort => "last_resort",
            Self::Unallocable => "unallocable",
        }
    }
}

/// How an instance's disks are stored, which decides where it can move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskTemplate {
    Diskless,
    File,
    SharedFile,
    Plain,
    Blockdev,
    Drbd,
    Rbd,
    Ext,
    Gluster,
}

impl DiskTemplate {
    /// In Ganeti's order (the order of its default policy's template list).
    pub const ALL: [DiskTemplate; 9] = [
        Self::Diskless,
        Self::File,
        Self::SharedFile,
        Self::Plain,
        Self::Blockdev,
        Self::Drbd,
        Self::Rbd,
        Self::Ext,
        Self::Gluster,
    ];

    /// The spelling in Ganeti files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Diskless => "diskless",
            Self::File => "file",
            Self::SharedFile => "sharedfile",
            Self::Plain => "plain",
            Self::Blockdev => "blockdev",
            Self::Drbd => "drbd",
            Self::Rbd => "rbd",
            Self::Ext => "ext",
            Self::Gluster => "gluster",
        }
    }

    /// Disks reachable from every node, so the instance can live-migrate anywhere.
    pub fn is_shared(self) -> bool {
        matches!(
            self,
            Self::Diskless
                | Self::SharedFile
                | Self::Blockdev
                | Self::Rbd
                | Self::Ext
                | Self::Gluster
        )
    }

    /// Whether instances with this template have a secondary node (DRBD mirror).
    pub fn has_secondary(self) -> bool {
        self == Self::Drbd
    }
}

/// An instance's run state (Ganeti's `InstanceStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InstanceStatus {
    AdminDown,
    AdminOffline,
    ErrorDown,
    ErrorUp,
    NodeDown,
    NodeOffline,
    Running,
    UserDown,
    WrongNode,
}

impl InstanceStatus {
    pub const ALL: [InstanceStatus; 9] = [
        Self::AdminDown,
        Self::AdminOffline,
        Self::ErrorDown,
        Self::ErrorUp,
        Self::NodeDown,
        Self::NodeOffline,
        Self::Running,
        Self::UserDown,
        Self::WrongNode,
    ];

    /// The spelling in Ganeti files.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AdminDown => "ADMIN_down",
            Self::AdminOffline => "ADMIN_offline",
            Self::ErrorDown => "ERROR_down",
            Self::ErrorUp => "ERROR_up",
            Self::NodeDown => "ERROR_nodedown",
            Self::NodeOffline => "ERROR_nodeoffline",
            Self::Running => "running",
            Self::UserDown => "USER_down",
            Self::WrongNode => "ERROR_wrongnode",
        }
    }

    /// Whether the instance holds memory on its primary node; Ganeti counts
    /// only these (`notOffline`) against a node's free memory.
    pub fn uses_memory(self) -> bool {
        !matches!(self, Self::AdminOffline | Self::NodeOffline)
    }
}

/// Dynamic utilisation, Ganeti's `DynUtil`: unitless weights for CPU, memory,
/// disk I/O and network. Ganeti assumes 1 for each when it has no data; the live
/// balancer and simulator may fill in measured values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DynUtil {
    pub cpu: f64,
    pub mem: f64,
    pub disk: f64,
    pub net: f64,
}

impl DynUtil {
    pub const ZERO: DynUtil = DynUtil {
        cpu: 0.0,
        mem: 0.0,
        disk: 0.0,
        net: 0.0,
    };
    /// What Ganeti assumes for an instance without utilisation data.
    pub const BASE: DynUtil = DynUtil {
        cpu: 1.0,
        mem: 1.0,
        disk: 1.0,
        net: 1.0,
    };
}

impl Default for DynUtil {
    fn default() -> Self {
        Self::BASE
    }
}

/// Measured demand of a running instance, filled by live agents and the
/// simulator (zero for a Ganeti file, which carries no measurements).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Demand {
    /// Physical cores' worth of CPU the instance uses now.
    pub cpu_cores: f64,
    /// Guest memory actually in use, MiB.
    pub mem_used_mib: f64,
}

/// A node group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub uuid: String,
    pub alloc_policy: AllocPolicy,
    pub tags: Vec<String>,
    pub networks: Vec<String>,
    pub ipolicy: IPolicy,
}

/// A node (host). Memory and disk in MiB, as in Ganeti.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    /// Total memory; a float because Ganeti keeps it as one.
    pub total_mem: f64,
    /// Memory used by the node itself (hypervisor, dom0).
    pub node_mem: i64,
    /// Memory free as reported by the node.
    pub free_mem: i64,
    pub total_disk: f64,
    pub free_disk: i64,
    /// Physical CPUs.
    pub pcpus: f64,
    pub offline: bool,
    pub master: bool,
    pub group: GroupId,
    pub spindles: i64,
    pub tags: Vec<String>,
    pub exclusive_storage: bool,
    pub free_spindles: i64,
    /// CPUs reserved for the node's own OS.
    pub os_cpus: i64,
    /// Relative CPU speed (1.0 = reference).
    pub cpu_speed: f64,
    /// Cores available to instances, measured by a live agent or set by the
    /// simulator; `None` means "use `pcpus`".
    #[serde(default)]
    pub cpu_capacity: Option<f64>,
}

impl Node {
    /// A host known only by its cores and memory, as live agents and the simulator see it.
    /// Disk and spindles are unbounded because live migration over shared storage never
    /// moves disks, so they must never be what refuses a move.
    pub fn live(
        name: String,
        cores: f64,
        total_mem_mib: f64,
        free_mem_mib: i64,
        offline: bool,
    ) -> Node {
        Node {
            name,
            total_mem: total_mem_mib,
            node_mem: 0,
            free_mem: free_mem_mib,
            total_disk: 1e12,
            free_disk: 1 << 40,
            pcpus: cores,
            offline,
            master: false,
            group: GroupId(0),
            spindles: 1 << 20,
            tags: Vec::new(),
            exclusive_storage: false,
            free_spindles: 1 << 20,
            os_cpus: 0,
            cpu_speed: 1.0,
            cpu_capacity: Some(cores),
        }
    }

    /// Cores instances may use: the measured capacity if known, else `pcpus`.
    pub fn effective_cpu_capacity(&self) -> f64 {
        self.cpu_capacity.unwrap_or(self.pcpus)
    }
}

/// An instance (VM).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    /// Memory, MiB.
    pub mem: i64,
    /// Disk, MiB (all disks summed).
    pub disk: i64,
    pub vcpus: i64,
    pub status: InstanceStatus,
    /// Whether the balancer may move it.
    pub auto_balance: bool,
    pub primary: NodeId,
    pub secondary: Option<NodeId>,
    pub disk_template: DiskTemplate,
    pub tags: Vec<String>,
    pub spindle_use: i64,
    /// Spindles of its disks, summed; `None` when unknown (`-` in the file).
    pub spindles: Option<i64>,
    /// Planned but not yet created: reserves resources in the `_forth` scores.
    pub forthcoming: bool,
    #[serde(default)]
    pub util: DynUtil,
    #[serde(default)]
    pub demand: Demand,
}

/// Where an instance can live-migrate to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mobility {
    /// Shared storage: any other node.
    AnyNode,
    /// DRBD: only to its secondary, which then becomes the primary.
    SecondaryOnly(NodeId),
    /// Local storage (`plain`, `file`) or DRBD without a secondary.
    Immovable,
}

/// One snapshot of a cluster.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    pub groups: Vec<Group>,
    pub nodes: Vec<Node>,
    pub instances: Vec<Instance>,
    pub tags: Vec<String>,
    /// The cluster-wide instance policy.
    pub ipolicy: IPolicy,
}

/// Instances per node, by role; build once with [`Cluster::instances_by_node`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInstances {
    pub primaries: Vec<Vec<InstId>>,
    pub secondaries: Vec<Vec<InstId>>,
}

impl Cluster {
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.index()]
    }

    pub fn instance(&self, id: InstId) -> &Instance {
        &self.instances[id.index()]
    }

    pub fn group(&self, id: GroupId) -> &Group {
        &self.groups[id.index()]
    }

    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        (0..self.nodes.len()).map(NodeId::from_index)
    }

    pub fn instance_ids(&self) -> impl Iterator<Item = InstId> + '_ {
        (0..self.instances.len()).map(InstId::from_index)
    }

    pub fn find_node(&self, name: &str) -> Option<NodeId> {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .map(NodeId::from_index)
    }

    pub fn find_instance(&self, name: &str) -> Option<InstId> {
        self.instances
            .iter()
            .position(|i| i.name == name)
            .map(InstId::from_index)
    }

    /// Primary and secondary instance lists of every node, in instance order.
    pub fn instances_by_node(&self) -> NodeInstances {
        let mut out = NodeInstances {
            primaries: vec![Vec::new(); self.nodes.len()],
            secondaries: vec![Vec::new(); self.nodes.len()],
        };
        for (id, inst) in self.instance_ids().zip(&self.instances) {
            out.primaries[inst.primary.index()].push(id);
            if let Some(s) = inst.secondary {
                out.secondaries[s.index()].push(id);
            }
        }
        out
    }

    /// Where `inst` can live-migrate, judged by its disk template alone
    /// (capacity and policy are the planner's business).
    pub fn mobility(&self, inst: InstId) -> Mobility {
        let i = self.instance(inst);
        if i.disk_template.is_shared() {
            Mobility::AnyNode
        } else if i.disk_template == DiskTemplate::Drbd {
            i.secondary
                .map_or(Mobility::Immovable, Mobility::SecondaryOnly)
        } else {
            Mobility::Immovable
        }
    }

    /// Whether a live migration of `inst` to `to` is possible by disk template.
    pub fn can_migrate_to(&self, inst: InstId, to: NodeId) -> bool {
        if to == self.instance(inst).primary {
            return false;
        }
        match self.mobility(inst) {
            Mobility::AnyNode => true,
            Mobility::SecondaryOnly(s) => s == to,
            Mobility::Immovable => false,
        }
    }
}
