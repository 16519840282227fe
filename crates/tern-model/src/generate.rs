//! Synthetic clusters for tests and benchmarks: a seed and a size give a
//! reproducible cluster that exercises every field of the model and every
//! feature of the Ganeti score (offline and master nodes, node groups,
//! exclusive storage, DRBD pairs, forthcoming and offline instances,
//! exclusion and location tags, policies).
//!
//! Values are ones the Ganeti text format represents exactly (whole MiB,
//! whole CPUs, CPU speeds in quarters), so a generated cluster survives a
//! round trip through `serialize` and `parse` unchanged.

use crate::{
    AllocPolicy, Cluster, Demand, DiskTemplate, DynUtil, Group, GroupId, IPolicy, Instance,
    InstanceStatus, Node, NodeId,
};

/// A small deterministic generator (SplitMix64); no dependency needed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// What to generate.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub groups: usize,
    pub nodes: usize,
    pub instances: usize,
    /// Add the htools tags (exclusion, location, desired location).
    pub tagged: bool,
}

/// A cluster of the given shape, fully determined by `seed`.
pub fn cluster(seed: u64, shape: Shape) -> Cluster {
    let mut r = Rng(seed);
    let groups: Vec<Group> = (0..shape.groups.max(1))
        .map(|g| {
            let mut ipolicy = IPolicy::default();
            if r.chance(30) {
                ipolicy.vcpu_ratio = r.pick(&[2.0, 2.5, 8.0]);
                ipolicy.spindle_ratio = r.pick(&[4.0, 16.0]);
            }
            Group {
                name: format!("group-{g:02}"),
                uuid: format!("uuid-{g:02}"),
                alloc_policy: r.pick(&AllocPolicy::ALL),
                tags: if r.chance(20) {
                    vec![format!("gtag{g}")]
                } else {
                    Vec::new()
                },
                networks: Vec::new(),
                ipolicy,
            }
        })
        .collect();
    let mut nodes: Vec<Node> = (0..shape.nodes)
        .map(|i| {
            let total_mem = r.range(4, 64) * 1024;
            let node_mem = r.range(0, 1024);
            let exclusive_storage = r.chance(10);
            let spindles = r.range(1, 12);
            let mut tags = Vec::new();
            if shape.tagged {
                tags.push(format!("power:{}", r.pick(&["a", "b", "c"])));
                if r.chance(50) {
                    tags.push(format!("rack:{}", r.range(1, 3)));
                }
            }
            Node {
                name: format!("node-{i:03}"),
                total_mem: total_mem as f64,
                node_mem,
                free_mem: total_mem - node_mem,
                total_disk: (r.range(100, 2000) * 1024) as f64,
                free_disk: 0,
                pcpus: r.range(2, 64) as f64,
                offline: r.chance(8),
                master: false,
                group: GroupId::from_index(i % groups.len()),
                spindles,
                tags,
                exclusive_storage,
                free_spindles: spindles,
                os_cpus: r.range(0, 2),
                cpu_speed: r.range(2, 8) as f64 / 4.0,
                cpu_capacity: None,
            }
        })
        .collect();
    if let Some(n) = nodes.iter_mut().find(|n| !n.offline) {
        n.master = true;
    }
    for n in &mut nodes {
        n.free_disk = n.total_disk as i64;
    }
    let mut instances = Vec::with_capacity(shape.instances);
    if !nodes.is_empty() {
        for i in 0..shape.instances {
            let p = r.range(0, nodes.len() as i64 - 1) as usize;
            let disk_template = r.pick(&DiskTemplate::ALL);
            // DRBD needs a second node in the same group; fall back to plain.
            let peer = (0..nodes.len())
                .map(|k| (p + 1 + k) % nodes.len())
                .find(|&k| k != p && nodes[k].group == nodes[p].group);
            let (disk_template, secondary) = match (disk_template, peer) {
                (DiskTemplate::Drbd, Some(s)) => (DiskTemplate::Drbd, Some(NodeId::from_index(s))),
                (DiskTemplate::Drbd, None) => (DiskTemplate::Plain, None),
                (t, _) => (t, None),
            };
            let mem = r.range(1, 16) * 256;
            let disk = r.range(1, 40) * 1024;
            let status = if r.chance(80) {
                InstanceStatus::Running
            } else {
                r.pick(&InstanceStatus::ALL)
            };
            let forthcoming = r.chance(5);
            let mut tags = Vec::new();
            if shape.tagged {
                if r.chance(40) {
                    tags.push(format!("service:{}", r.pick(&["web", "db", "dns"])));
                }
                if r.chance(20) {
                    tags.push(format!("power:{}", r.pick(&["a", "b"])));
                }
            }
            let inst = Instance {
                name: format!("inst-{i:04}"),
                mem,
                disk,
                vcpus: r.range(1, 8),
                status,
                auto_balance: r.chance(90),
                primary: NodeId::from_index(p),
                secondary,
                disk_template,
                tags,
                spindle_use: r.range(0, 3),
                spindles: if r.chance(70) {
                    Some(r.range(1, 2))
                } else {
                    None
                },
                forthcoming,
                util: DynUtil::BASE,
                demand: Demand::default(),
            };
            // Reported free values reflect real instances, as a live node reports them.
            if !forthcoming {
                let uses_mem = !matches!(
                    status,
                    InstanceStatus::AdminDown
                        | InstanceStatus::AdminOffline
                        | InstanceStatus::ErrorDown
                        | InstanceStatus::UserDown
                );
                if uses_mem {
                    nodes[p].free_mem -= mem;
                }
                let local = matches!(disk_template, DiskTemplate::Drbd | DiskTemplate::Plain);
                for n in std::iter::once(p).chain(secondary.map(NodeId::index)) {
                    if local {
                        nodes[n].free_disk -= disk;
                    }
                    if let (true, Some(s)) = (nodes[n].exclusive_storage, inst.spindles) {
                        nodes[n].free_spindles -= s;
                    }
                }
            }
            instances.push(inst);
        }
    }
    // Some nodes report more or less free memory than the record says.
    for n in &mut nodes {
        if r.chance(15) {
            n.free_mem -= r.range(0, 2048);
        }
    }
    let mut tags = Vec::new();
    if shape.tagged {
        tags.push("htools:iextags:service".to_owned());
        tags.push("htools:nlocation:power".to_owned());
        if r.chance(50) {
            tags.push("htools:nlocation:rack".to_owned());
        }
        tags.push("htools:desiredlocation:power".to_owned());
    }
    Cluster {
        groups,
        nodes,
        instances,
        tags,
        ipolicy: IPolicy::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_cluster_and_different_seeds_differ() {
        let shape = Shape {
            groups: 2,
            nodes: 10,
            instances: 40,
            tagged: true,
        };
        assert_eq!(cluster(7, shape), cluster(7, shape));
        assert_ne!(cluster(7, shape), cluster(8, shape));
    }

    #[test]
    fn drbd_secondaries_are_distinct_nodes_of_the_same_group() {
        let c = cluster(
            3,
            Shape {
                groups: 3,
                nodes: 12,
                instances: 200,
                tagged: false,
            },
        );
        for i in &c.instances {
            if let Some(s) = i.secondary {
                assert_ne!(s, i.primary);
                assert_eq!(c.node(s).group, c.node(i.primary).group);
            }
        }
    }
}
