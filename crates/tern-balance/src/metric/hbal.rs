//! `hbal`: Ganeti's cluster score, kept incrementally for live-migration planning.
//!
//! Same components, weights and aggregation as [`super::ganeti`] (Ganeti 3.0's
//! `Cluster/Metrics.hs`, the score `hinfo` prints), computed from each node's
//! [`NodeLoad`] so the planner can re-score a move in O(K). Components that a live migration cannot change
//! (free disk, spindles) are taken once from the snapshot. Not modelled: the
//! location and location-exclusion scores (they need node location tags, which
//! tern's files do not use; both stay 0) and forthcoming instances' disk.

use tern_model::{Cluster, NodeId};

use super::ganeti::COMPONENTS;
use super::{Component, Metric, NodeLoad};

/// Per-node values that live migration leaves alone.
#[derive(Clone, Copy, Debug, Default)]
struct Fixed {
    free_disk: f64,
    spindles: f64,
}

/// Ganeti's score over one cluster's nodes.
#[derive(Clone, Debug)]
pub struct Hbal {
    fixed: Vec<Fixed>,
}

impl Hbal {
    /// Precomputes the parts of the score no live migration changes.
    pub fn new(cluster: &Cluster) -> Hbal {
        let mut spindle_use = vec![0.0; cluster.nodes.len()];
        for inst in &cluster.instances {
            if !inst.disk_template.is_shared() && !inst.forthcoming {
                spindle_use[inst.primary.index()] += inst.spindle_use as f64;
                if let Some(s) = inst.secondary {
                    spindle_use[s.index()] += inst.spindle_use as f64;
                }
            }
        }
        let fixed = cluster
            .nodes
            .iter()
            .zip(&spindle_use)
            .map(|(n, &used)| {
                let group_ratio = cluster
                    .groups
                    .get(n.group.index())
                    .map_or(cluster.ipolicy.spindle_ratio, |g| g.ipolicy.spindle_ratio);
                let hi = group_ratio * n.spindles as f64;
                let free_disk = if n.exclusive_storage {
                    ratio_or_one(n.free_spindles as f64, n.spindles as f64)
                } else {
                    ratio_or_one(n.free_disk as f64, n.total_disk)
                };
                Fixed {
                    free_disk,
                    spindles: if hi > 0.0 { used / hi } else { 0.0 },
                }
            })
            .collect();
        Hbal { fixed }
    }
}

fn ratio_or_one(free: f64, total: f64) -> f64 {
    if total == 0.0 {
        1.0
    } else {
        free / total
    }
}

impl Metric for Hbal {
    fn name(&self) -> &'static str {
        "ganeti"
    }

    fn components(&self) -> &[Component] {
        &COMPONENTS
    }

    fn node_values(&self, cluster: &Cluster, node: NodeId, l: &NodeLoad, out: &mut [f64]) {
        let n = cluster.node(node);
        let fixed = self.fixed[node.index()];
        let t_mem = n.total_mem;
        let cpu = n.pcpus * n.cpu_speed;
        let failn1 = l.free_mem <= l.reserved_mem;
        let hosted = f64::from(l.primaries + l.secondaries);
        let res = l.reserved_mem / t_mem;
        out[0] = l.free_mem / t_mem;
        out[1] = fixed.free_disk;
        out[2] = if failn1 { hosted } else { 0.0 };
        out[3] = res;
        out[4] = hosted;
        out[5] = f64::from(l.primaries);
        out[6] = l.vcpus / cpu;
        out[7] = l.util.cpu;
        out[8] = l.util.mem;
        out[9] = l.util.disk;
        out[10] = l.util.net;
        out[11] = f64::from(l.tag_conflicts);
        out[12] = fixed.spindles;
        out[13] = l.free_mem_forth / t_mem;
        out[14] = fixed.free_disk;
        out[15] = l.vcpus_forth / cpu;
        out[16] = fixed.spindles;
        out[17] = 0.0;
        out[18] = 0.0;
        out[19] = res;
    }
}
