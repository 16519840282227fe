//! The schemas of `docs/openapi.json` (manager) and `docs/agent-openapi.json` (agent)
//! against the types in this crate: every documented object names exactly the fields its
//! type writes, and every documented enum exactly the names its type has. A field added,
//! renamed or removed in Rust fails here until the document says the same.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;
use tern_api::agent::{self, Capacity as AgentCapacity, ErrorBody, Load, Nic};
use tern_api::manager::{self as m, BalancerSettings, HostState, Progress};
use tern_api::migration::{self as mig, Phase, RoundProgress, RoundTelemetry, StopReason};

/// A VM or host name written as a literal.
fn name<T: std::str::FromStr>(s: &str) -> T
where
    T::Err: std::fmt::Debug,
{
    s.parse().expect("a valid name")
}

fn doc(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../docs")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn keys<T: Serialize>(values: &[T]) -> BTreeSet<String> {
    values
        .iter()
        .flat_map(|v| match serde_json::to_value(v).unwrap() {
            Value::Object(o) => o.keys().cloned().collect::<Vec<_>>(),
            other => panic!("not an object: {other}"),
        })
        .collect()
}

fn names<T: Serialize>(values: &[T]) -> BTreeSet<String> {
    values
        .iter()
        .map(|v| {
            serde_json::to_value(v)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// Differences between the document and the code, one line each.
struct Check {
    doc: Value,
    file: &'static str,
    wrong: Vec<String>,
}

impl Check {
    fn new(file: &'static str) -> Self {
        Check {
            doc: doc(file),
            file,
            wrong: Vec::new(),
        }
    }

    fn schema(&self, name: &str) -> &Value {
        &self.doc["components"]["schemas"][name]
    }

    fn object(&mut self, name: &str, code: BTreeSet<String>) {
        let documented: BTreeSet<String> = self.schema(name)["properties"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        if documented != code {
            self.wrong.push(format!(
                "{}: schema {name}: documented {documented:?}, the type writes {code:?}",
                self.file
            ));
        }
    }

    fn enumeration(&mut self, name: &str, code: BTreeSet<String>) {
        let documented: BTreeSet<String> = self.schema(name)["enum"]
            .as_array()
            .map(|e| {
                e.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if documented != code {
            self.wrong.push(format!(
                "{}: enum {name}: documented {documented:?}, the type has {code:?}",
                self.file
            ));
        }
    }
}

fn spec() -> m::VmSpec {
    m::VmSpec {
        vcpus: 1,
        memory_mib: 64,
        pinned: false,
        affinity: Some("a".into()),
        anti_affinity: Some("b".into()),
    }
}

fn migration() -> m::Migration {
    m::Migration {
        id: 1,
        vm: "v".into(),
        from: "a".into(),
        to: "b".into(),
        policy: "adaptive".into(),
        reason: m::MigrationReason::Manual,
        started: 0,
        finished: None,
        result: m::MigrationResult::Running,
    }
}

#[test]
fn manager_schemas_match_the_types() {
    let mut c = Check::new("openapi.json");
    let capacity = m::Capacity {
        cpus: 1.0,
        memory_mib: 1,
    };
    c.object("Capacity", keys(&[capacity]));
    c.enumeration("HostState", names(&HostState::ALL));
    c.object(
        "Host",
        keys(&[m::Host {
            name: "h".into(),
            address: "http://h".into(),
            capacity,
            state: HostState::Active,
            last_heartbeat: Some(1),
            cpu_used: Some(1.0),
            cpu_smoothed: Some(1.0),
        }]),
    );
    c.object(
        "RegisterHost",
        keys(&[m::RegisterHost {
            name: name("h"),
            address: "http://h".into(),
            capacity,
        }]),
    );
    c.object("LoadReport", keys(&[m::LoadReport::default()]));
    c.object("HeartbeatReply", keys(&[m::HeartbeatReply::default()]));
    c.object("VmSpec", keys(&[spec()]));
    c.enumeration("VmState", names(&m::VmState::ALL));
    c.object(
        "Vm",
        keys(&[m::Vm {
            name: "v".into(),
            spec: spec(),
            desired_host: None,
            observed_host: None,
            state: m::VmState::Running,
            cpu_used: 0.0,
            cpu_measured: false,
            last_moved: None,
        }]),
    );
    c.object(
        "CreateVm",
        keys(&[m::CreateVm {
            name: name("v"),
            spec: spec(),
            host: Some(name("h")),
        }]),
    );
    c.object(
        "MigrateVm",
        keys(&[m::MigrateVm {
            to: Some(name("h")),
            policy: Some("xen".into()),
        }]),
    );
    c.object(
        "MigrationResult",
        keys(&[
            m::MigrationResult::Running,
            m::MigrationResult::Succeeded {
                total_ms: 1,
                downtime_ms: 1,
            },
            m::MigrationResult::Failed { error: "e".into() },
        ]),
    );
    // The document's Migration is the record as the API shows it, progress included.
    c.object(
        "Migration",
        keys(&[m::MigrationView {
            record: migration(),
            progress: Some(Progress::default()),
        }]),
    );
    c.object("BalancerSettings", keys(&[BalancerSettings::default()]));
    c.object(
        "PlannedMove",
        keys(&[m::PlannedMove {
            vm: "v".into(),
            from: "a".into(),
            to: "b".into(),
            gain: 1.0,
            cost: 0.5,
        }]),
    );
    c.object(
        "BalancePlan",
        keys(&[m::BalancePlan {
            planning_ms: Some(1.0),
            ..m::BalancePlan::default()
        }]),
    );
    c.object("Progress", keys(&[Progress::default()]));
    assert!(c.wrong.is_empty(), "{}", c.wrong.join("\n"));
}

fn agent_spec() -> agent::VmSpec {
    agent::VmSpec {
        vcpus: 1,
        memory_mib: 64,
        kernel: Some("/k".into()),
        initramfs: Some("/i".into()),
        cmdline: String::new(),
        nics: vec![Nic { mac: None }],
    }
}

#[test]
fn agent_schemas_match_the_types() {
    let mut c = Check::new("agent-openapi.json");
    c.object(
        "Error",
        keys(&[ErrorBody {
            error: "e".into(),
            kind: "k".into(),
        }]),
    );
    c.object("Nic", keys(&[Nic { mac: None }]));
    c.object("VmSpec", keys(&[agent_spec()]));
    c.object(
        "CreateVm",
        keys(&[agent::CreateVm {
            id: name("v"),
            spec: agent_spec(),
            start: true,
        }]),
    );
    use agent::VmState as S;
    c.enumeration(
        "VmState",
        names(&[S::Created, S::Running, S::Paused, S::Stopped, S::Incoming]),
    );
    let info = agent::VmInfo {
        id: "v".into(),
        state: S::Running,
        spec: agent_spec(),
        macs: vec![],
        memory_file: None,
        control_socket: None,
        console_log: None,
        pid: None,
    };
    c.object(
        "VmView",
        keys(&[agent::VmView {
            info,
            cpu_cores: None,
        }]),
    );
    let sample = agent::VcpuSample {
        index: 0,
        thread_id: 1,
        cpu_ns: 2,
    };
    c.object("VcpuSample", keys(&[sample]));
    c.object(
        "VmMetrics",
        keys(&[agent::VmMetrics {
            vcpus: vec![sample],
            vcpu_cpu_ns: 2,
            memory_bytes: 3,
            rss_bytes: 4,
        }]),
    );
    c.object(
        "HostReport",
        keys(&[agent::HostReport {
            name: "h".into(),
            hypervisor: "sim".into(),
            capacity: AgentCapacity {
                cpus: 1,
                memory_mib: 1,
            },
            load: Load {
                vm_cpu_cores: 0.0,
                vm_memory_mib: 0,
                vms: 0,
            },
            version: "0".into(),
        }]),
    );
    let telemetry = RoundTelemetry {
        round: 1,
        pages_sent: 1,
        bytes_sent: 1,
        pages_changed: 1,
        dirty_rate_bytes_per_s: 1.0,
        bandwidth_bytes_per_s: 1.0,
        remaining_pages: 1,
        held_back_pages: 0,
        predicted_downtime_s: 0.1,
        duration_s: 1.0,
        elapsed_s: 1.0,
        throttle_percent: 0,
    };
    c.object("RoundTelemetry", keys(std::slice::from_ref(&telemetry)));
    let progress = RoundProgress {
        round: 2,
        pages_planned: 1,
        pages_sent: 1,
        bytes_sent: 1,
        duration_s: 0.1,
        elapsed_s: 1.1,
    };
    c.object("RoundProgress", keys(std::slice::from_ref(&progress)));
    use Phase as P;
    c.enumeration(
        "MigrationPhase",
        names(&[
            P::Preparing,
            P::Connecting,
            P::PreCopy,
            P::StopAndCopy,
            P::DeviceState,
            P::Resuming,
            P::Completed,
            P::RolledBack,
        ]),
    );
    let mut view = mig::MigrationView::new("mig-1", "v", "http://h", "adaptive");
    view.rounds.push(telemetry);
    view.current = Some(progress);
    view.result = Some(mig::MigrationResult {
        total_ms: 1,
        downtime_ms: 1,
        bytes: 1,
        rounds: 1,
        nonzero_bytes: None,
        converged: true,
        policy: "adaptive".into(),
        stop_reason: StopReason::FitsDowntime,
        max_throttle_percent: 0,
        downtime_parts_ms: None,
        guest_ok: None,
    });
    c.object("MigrationView", keys(&[view]));
    assert!(c.wrong.is_empty(), "{}", c.wrong.join("\n"));
}
