//! Seeded synthetic clusters for benchmarks and tests: unbalanced, shared-storage
//! (`ext`) instances piled unevenly on nodes of varied sizes.
//!
//! Every placement is valid (memory fits with headroom, vCPU ratio within the
//! default policy), so a planner starts from a legal but lopsided state.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tern_model::{
    AllocPolicy, Cluster, Demand, DiskTemplate, DynUtil, Group, GroupId, IPolicy, Instance,
    InstanceStatus, Node, NodeId,
};

/// Memory each node keeps for itself (MiB).
const NODE_MEM: i64 = 1024;
/// Fraction of a node's memory the generator fills at most.
const FILL: f64 = 0.9;

/// An unbalanced shared-storage cluster of `nodes` nodes and `instances` instances.
/// The same arguments always give the same cluster.
pub fn unbalanced(nodes: usize, instances: usize, seed: u64) -> Cluster {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let policy = IPolicy::default();
    let group = Group {
        name: "default".into(),
        uuid: "00000000-0000-0000-0000-000000000001".into(),
        alloc_policy: AllocPolicy::Preferred,
        tags: Vec::new(),
        networks: Vec::new(),
        ipolicy: policy.clone(),
    };
    let mut node_list: Vec<Node> = (0..nodes)
        .map(|i| {
            let mem = *[65536.0, 131072.0, 262144.0].choose(&mut rng).unwrap();
            let cpus = *[16.0, 32.0, 64.0].choose(&mut rng).unwrap();
            let disk = 4.0 * 1024.0 * 1024.0;
            Node {
                name: format!("node-{i:04}"),
                total_mem: mem,
                node_mem: NODE_MEM,
                free_mem: 0,
                total_disk: disk,
                free_disk: disk as i64,
                pcpus: cpus,
                offline: false,
                master: false,
                group: GroupId(0),
                spindles: 1,
                tags: Vec::new(),
                exclusive_storage: false,
                free_spindles: 0,
                os_cpus: 1,
                cpu_speed: 1.0,
                cpu_capacity: None,
            }
        })
        .collect();
    // Cubed uniform weights: a few nodes attract most instances.
    let weights: Vec<f64> = (0..nodes)
        .map(|_| rng.gen::<f64>().powi(3) + 1e-3)
        .collect();
    let total_weight: f64 = weights.iter().sum();
    let mut used_mem = vec![0i64; nodes];
    let mut used_cpu = vec![0i64; nodes];
    let mut list = Vec::with_capacity(instances);
    for j in 0..instances {
        let mem = *[512, 1024, 2048, 4096, 8192].choose(&mut rng).unwrap();
        let vcpus = *[1, 1, 2, 4].choose(&mut rng).unwrap();
        let disk = *[10240, 20480, 40960].choose(&mut rng).unwrap();
        let fits = |k: usize, used_mem: &[i64], used_cpu: &[i64]| {
            let n = &node_list[k];
            (NODE_MEM + used_mem[k] + mem) as f64 <= n.total_mem * FILL
                && (1 + used_cpu[k] + vcpus) as f64 <= n.pcpus * policy.vcpu_ratio
        };
        let mut chosen = None;
        for _ in 0..64 {
            let mut x = rng.gen::<f64>() * total_weight;
            let k = weights
                .iter()
                .position(|w| {
                    x -= w;
                    x <= 0.0
                })
                .unwrap_or(nodes - 1);
            if fits(k, &used_mem, &used_cpu) {
                chosen = Some(k);
                break;
            }
        }
        let k = chosen
            .or_else(|| (0..nodes).find(|&k| fits(k, &used_mem, &used_cpu)))
            .unwrap_or_else(|| {
                panic!("{nodes} nodes cannot hold {instances} instances; use fewer instances")
            });
        used_mem[k] += mem;
        used_cpu[k] += vcpus;
        list.push(Instance {
            name: format!("inst-{j:05}"),
            mem,
            disk,
            vcpus,
            status: InstanceStatus::Running,
            auto_balance: true,
            primary: NodeId::from_index(k),
            secondary: None,
            disk_template: DiskTemplate::Ext,
            tags: Vec::new(),
            spindle_use: 1,
            spindles: None,
            forthcoming: false,
            util: DynUtil::BASE,
            demand: Demand::default(),
        });
    }
    for (n, used) in node_list.iter_mut().zip(&used_mem) {
        n.free_mem = n.total_mem as i64 - NODE_MEM - used;
    }
    Cluster {
        groups: vec![group],
        nodes: node_list,
        instances: list,
        tags: Vec::new(),
        ipolicy: policy,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_cluster_and_valid() {
        let a = unbalanced(20, 300, 7);
        assert_eq!(a, unbalanced(20, 300, 7));
        assert_ne!(a, unbalanced(20, 300, 8));
        assert!(a.nodes.iter().all(|n| n.free_mem > 0));
    }
}
