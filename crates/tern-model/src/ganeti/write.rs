//! Writing the text format the way Ganeti's `serializeCluster` does, so that
//! `hbal -t` and `hinfo -t` read tern's output.

use std::fmt::Write;

use crate::{Cluster, IPolicy, ISpec};

fn ispec(s: &ISpec) -> String {
    format!(
        "{},{},{},{},{},{}",
        s.mem_size, s.cpu_count, s.disk_size, s.disk_count, s.nic_count, s.spindle_use
    )
}

fn ipolicy(owner: &str, p: &IPolicy) -> String {
    let min_max: Vec<String> = p
        .min_max
        .iter()
        .flat_map(|mm| [ispec(&mm.min), ispec(&mm.max)])
        .collect();
    let templates: Vec<&str> = p.disk_templates.iter().map(|t| t.as_str()).collect();
    // `{:?}` prints `4.0` for 4, which Haskell's `read` accepts as a Double.
    format!(
        "{owner}|{}|{}|{}|{:?}|{:?}",
        ispec(&p.std),
        min_max.join(";"),
        templates.join(","),
        p.vcpu_ratio,
        p.spindle_ratio
    )
}

/// The cluster as a Ganeti htools text file. Dynamic fields (`util`, `demand`,
/// `cpu_capacity`) are not part of the format and are left out.
pub fn serialize(c: &Cluster) -> String {
    let mut out = String::new();
    for g in &c.groups {
        let _ = writeln!(
            out,
            "{}|{}|{}|{}|{}",
            g.name,
            g.uuid,
            g.alloc_policy.as_str(),
            g.tags.join(","),
            g.networks.join(",")
        );
    }
    out.push('\n');
    for n in &c.nodes {
        let flag = if n.offline {
            'Y'
        } else if n.master {
            'M'
        } else {
            'N'
        };
        let _ = writeln!(
            out,
            "{}|{:.0}|{}|{}|{:.0}|{}|{:.0}|{}|{}|{}|{}|{}|{}|{}|{:.6}",
            n.name,
            n.total_mem,
            n.node_mem,
            n.free_mem,
            n.total_disk,
            n.free_disk,
            n.pcpus,
            flag,
            c.group(n.group).uuid,
            n.spindles,
            n.tags.join(","),
            if n.exclusive_storage { 'Y' } else { 'N' },
            n.free_spindles,
            n.os_cpus,
            n.cpu_speed
        );
    }
    out.push('\n');
    let yn = |b: bool| if b { 'Y' } else { 'N' };
    for i in &c.instances {
        let _ = writeln!(
            out,
            "{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}|{}",
            i.name,
            i.mem,
            i.disk,
            i.vcpus,
            i.status.as_str(),
            yn(i.auto_balance),
            c.node(i.primary).name,
            i.secondary.map_or("", |s| c.node(s).name.as_str()),
            i.disk_template.as_str(),
            i.tags.join(","),
            i.spindle_use,
            i.spindles.map_or_else(|| "-".to_owned(), |s| s.to_string()),
            yn(i.forthcoming)
        );
    }
    out.push('\n');
    for t in &c.tags {
        let _ = writeln!(out, "{t}");
    }
    out.push('\n');
    let _ = writeln!(out, "{}", ipolicy("", &c.ipolicy));
    for g in &c.groups {
        let _ = writeln!(out, "{}", ipolicy(&g.name, &g.ipolicy));
    }
    out
}
