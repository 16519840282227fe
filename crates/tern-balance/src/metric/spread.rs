//! `spread`: how unevenly CPU and memory utilisation are spread across hosts.
//!
//! Score = Σ weight × population std-dev of a utilisation over online hosts, with
//! CPU utilisation = instances' CPU demand / host CPU capacity and memory
//! utilisation = instances' memory in use / host memory. Demands are the measured
//! ones (`Instance::demand`) where a live agent or the simulator filled them in,
//! otherwise the configured vCPUs and memory, so a Ganeti file can be balanced too.
//!
//! The simulator and the live manager call it through [`crate::plan_spread`].

use tern_model::{Cluster, NodeId};

use super::{Aggregate, Component, Metric, NodeLoad, Over};

/// The weights of the `spread` score, in one table.
pub const WEIGHTS: [(&str, f64); 2] = [("cpu_util_cv", 1.0), ("mem_util_cv", 1.0)];

const COMPONENTS: [Component; 2] = [
    Component {
        name: WEIGHTS[0].0,
        weight: WEIGHTS[0].1,
        aggregate: Aggregate::StdDev,
        over: Over::Online,
    },
    Component {
        name: WEIGHTS[1].0,
        weight: WEIGHTS[1].1,
        aggregate: Aggregate::StdDev,
        over: Over::Online,
    },
];

/// The `spread` metric (stateless; see the module doc).
#[derive(Clone, Copy, Debug, Default)]
pub struct Spread;

impl Metric for Spread {
    fn name(&self) -> &'static str {
        "spread"
    }

    fn components(&self) -> &[Component] {
        &COMPONENTS
    }

    fn node_values(&self, cluster: &Cluster, node: NodeId, load: &NodeLoad, out: &mut [f64]) {
        let n = cluster.node(node);
        let cpu_cap = n.effective_cpu_capacity();
        out[0] = if cpu_cap > 0.0 {
            load.cpu_demand / cpu_cap
        } else {
            0.0
        };
        out[1] = if n.total_mem > 0.0 {
            load.mem_demand / n.total_mem
        } else {
            0.0
        };
    }

    /// Utilisation is demand over capacity, and demands only add up.
    fn scales(&self, cluster: &Cluster, node: NodeId, out: &mut [f64]) -> bool {
        let n = cluster.node(node);
        let inverse = |cap: f64| if cap > 0.0 { 1.0 / cap } else { 0.0 };
        out[0] = inverse(n.effective_cpu_capacity());
        out[1] = inverse(n.total_mem);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::score;

    #[test]
    fn std_dev_of_cpu_and_memory_utilisation() {
        let mut c = crate::synth::unbalanced(2, 2, 1);
        for n in &mut c.nodes {
            n.total_mem = 1000.0;
            n.pcpus = 10.0;
            n.free_mem = 900;
        }
        for (i, inst) in c.instances.iter_mut().enumerate() {
            inst.primary = NodeId(0);
            inst.mem = 100;
            inst.vcpus = 1;
            inst.demand.cpu_cores = if i == 0 { 2.0 } else { 0.0 };
        }
        // Node 0: CPU (2 + 1) / 10 = 0.3, memory 200 / 1000 = 0.2; node 1 idle.
        let want = 0.15 * WEIGHTS[0].1 + 0.1 * WEIGHTS[1].1;
        assert!((score(&c, &Spread) - want).abs() < 1e-12);
    }
}
