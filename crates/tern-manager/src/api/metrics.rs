//! `/metrics` in Prometheus' text exposition format, rendered from a snapshot (pure).

use std::fmt::Write;

use crate::state::{HostState, Snapshot, VmState};

/// The exposition text for `snap`.
pub fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    let mut family = |name: &str, help: &str, samples: &mut dyn Iterator<Item = (String, f64)>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (labels, v) in samples {
            let _ = writeln!(out, "{name}{labels} {v}");
        }
    };
    family(
        "tern_hosts",
        "Hosts by state.",
        &mut HostState::ALL.iter().map(|s| {
            let n = snap.hosts.values().filter(|h| h.state == *s).count();
            (format!("{{state=\"{}\"}}", s.as_str()), n as f64)
        }),
    );
    family(
        "tern_vms",
        "VMs by state.",
        &mut VmState::ALL.iter().map(|s| {
            let n = snap.vms.values().filter(|v| v.state == *s).count();
            (format!("{{state=\"{}\"}}", s.as_str()), n as f64)
        }),
    );
    family(
        "tern_migrations_running",
        "Live migrations under way.",
        &mut std::iter::once((String::new(), snap.running.len() as f64)),
    );
    family(
        "tern_events_last_seq",
        "Sequence number of the last event.",
        &mut std::iter::once((String::new(), snap.last_event as f64)),
    );
    // Names are checked to be label-safe when hosts register.
    family(
        "tern_host_cpu_smoothed_cores",
        "Cores in use on each host, smoothed over the balancer's window.",
        &mut snap.hosts.values().filter_map(|h| {
            h.cpu_smoothed
                .map(|c| (format!("{{host=\"{}\"}}", h.name), c))
        }),
    );
    let used = snap.memory_used();
    family(
        "tern_host_memory_promised_mib",
        "Memory promised to VMs on each host, MiB.",
        &mut snap.hosts.values().map(|h| {
            let m = used.get(h.name.as_str()).copied().unwrap_or(0);
            (format!("{{host=\"{}\"}}", h.name), m as f64)
        }),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testing::*;

    #[test]
    fn every_sample_line_parses_as_name_labels_value() {
        let mut snap = cluster(&[4.0, 8.0], 4096);
        running(&mut snap, "a", "h1", spec(1, 512));
        snap.hosts.get_mut("h1").unwrap().cpu_smoothed = Some(1.5);
        let text = render(&snap);
        assert!(text.contains("tern_hosts{state=\"active\"} 2\n"), "{text}");
        assert!(text.contains("tern_vms{state=\"running\"} 1\n"));
        assert!(text.contains("tern_host_cpu_smoothed_cores{host=\"h1\"} 1.5\n"));
        assert!(text.contains("tern_host_memory_promised_mib{host=\"h1\"} 512\n"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(line.starts_with("tern_"), "{line}");
        }
    }
}
