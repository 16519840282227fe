//! The consistency warnings Ganeti prints when it loads a cluster
//! (`updateMissing`): nodes whose reported free memory or disk is well below
//! what their instances account for. Informational: Ganeti loads such files,
//! and holds the missing memory back when scoring.

use crate::{Cluster, InstanceStatus};

/// One line per node missing more than 512 MiB of memory or 1 GiB of disk,
/// worded as Ganeti words them, in node order.
pub fn missing_resources(c: &Cluster) -> Vec<String> {
    let by_node = c.instances_by_node();
    c.node_ids()
        .filter_map(|id| {
            let n = c.node(id);
            let real = |list: &[crate::InstId]| -> Vec<&crate::Instance> {
                list.iter()
                    .map(|&i| c.instance(i))
                    .filter(|i| !i.forthcoming)
                    .collect()
            };
            let pri = real(&by_node.primaries[id.index()]);
            let sec = real(&by_node.secondaries[id.index()]);
            let imem: i64 = pri
                .iter()
                .filter(|i| {
                    !matches!(
                        i.status,
                        InstanceStatus::AdminDown
                            | InstanceStatus::AdminOffline
                            | InstanceStatus::ErrorDown
                            | InstanceStatus::UserDown
                    )
                })
                .map(|i| i.mem)
                .sum();
            let idsk: i64 = pri.iter().chain(&sec).map(|i| i.disk).sum();
            let delta_mem = n.total_mem.trunc() as i64 - n.node_mem - imem - n.free_mem;
            let delta_dsk = n.total_disk.trunc() as i64 - n.free_disk - idsk;
            (delta_mem > 512 || delta_dsk > 1024).then(|| {
                format!(
                    "node {} is missing {} MB ram and {} GB disk",
                    n.name,
                    delta_mem,
                    delta_dsk.div_euclid(1024)
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_what_ganeti_reports() {
        // From Ganeti's missing-resources.data; hinfo -v prints exactly this line.
        let text = "default|fake-uuid-01|preferred||\n\n\
                    node1|1024|0|1024|95367|95367|4|N|fake-uuid-01|1\n\
                    node2|1024|0|0|95367|0|4|N|fake-uuid-01|1\n\n\n\n";
        let c = crate::ganeti::parse(text).unwrap();
        assert_eq!(
            missing_resources(&c),
            vec!["node node2 is missing 1024 MB ram and 93 GB disk".to_owned()]
        );
    }

    #[test]
    fn instances_account_for_used_memory_and_disk() {
        let text = "g|u|preferred||\n\n\
                    a|4096|0|2048|10240|0|4|N|u|1\n\n\
                    i|2048|10240|1|running|Y|a||plain||1\n\n\n";
        let c = crate::ganeti::parse(text).unwrap();
        assert!(missing_resources(&c).is_empty());
    }
}
