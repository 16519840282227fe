//! The control loop against in-process hosts on the `sim` hypervisor driver and a real
//! SQLite store: placement, balancing by migration, a host dying and coming back.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tern_manager::decide::HostAddresses;

use tern_manager::control::Control;
use tern_manager::decide::{self, Command, NewVm};
use tern_manager::state::{BalancerSettings, Capacity, EventKind, HostState, VmSpec, VmState};
use tern_manager::store::SqliteStore;
use tern_manager::Manager;
use tern_simhost::SimCluster;

struct Lab {
    manager: Arc<Manager>,
    sim: Arc<SimCluster>,
    control: Arc<Control>,
    clock: Arc<AtomicU64>,
    _dir: tempfile::TempDir,
}

fn spec(vcpus: u32) -> VmSpec {
    VmSpec::sized(vcpus, 1024)
}

impl Lab {
    async fn new(hosts: usize, settings: BalancerSettings) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("tern.db")).unwrap();
        let clock = Arc::new(AtomicU64::new(1_000_000));
        let c = clock.clone();
        let manager = Arc::new(
            Manager::open(Box::new(store), Arc::new(move || c.load(Ordering::SeqCst)))
                .unwrap()
                .serving(HostAddresses::Sim),
        );
        let sim = SimCluster::new();
        for i in 0..hosts {
            let name = format!("h{i}");
            sim.add_host(&name);
            manager
                .execute(Command::RegisterHost {
                    name,
                    address: "sim:".into(),
                    capacity: Capacity {
                        cpus: 8.0,
                        memory_mib: 32768,
                    },
                })
                .unwrap();
        }
        manager.execute(Command::PutSettings(settings)).unwrap();
        let control = Control::new(manager.clone(), sim.clone());
        Lab {
            manager,
            sim,
            control,
            clock,
            _dir: dir,
        }
    }

    fn advance(&self, ms: u64) {
        self.clock.fetch_add(ms, Ordering::SeqCst);
    }

    /// Which sim host holds each VM (a VM on two hosts appears twice).
    async fn placement(&self, hosts: usize) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for i in 0..hosts {
            let h = format!("h{i}");
            for vm in self.sim.host(&h).unwrap().vm_names().await {
                out.entry(vm).or_default().push(h.clone());
            }
        }
        out
    }
}

#[tokio::test]
async fn vms_piled_on_one_host_are_spread_by_live_migration() {
    let settings = BalancerSettings {
        aggressiveness: 5,
        max_per_host: 2,
        max_per_cluster: 4,
        cooldown_s: 600,
        ..Default::default()
    };
    let lab = Lab::new(4, settings).await;
    let reqs = (0..12)
        .map(|i| NewVm {
            name: format!("vm-{i}"),
            spec: spec(1),
            host: Some("h0".into()),
        })
        .collect();
    let created = lab
        .manager
        .step(|s, _| decide::create_vms(s, reqs))
        .unwrap();
    assert!(created.iter().all(|r| r.is_ok()));
    lab.control.settle().await.unwrap();
    for i in 0..12 {
        lab.sim
            .set_utilisation(&format!("vm-{i}"), 0.6)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut moved = 0;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        lab.advance(1_000);
        let r = lab.control.round().await.unwrap();
        assert_eq!(r.unreachable, 0);
        moved += r.plan.moves.len();
        assert!(r.plan.moves.len() <= 4, "cluster limit");
    }
    assert!(moved >= 4, "only {moved} moves");
    let snap = lab.manager.read(|s| s.clone());
    let per_host: BTreeMap<String, usize> = snap.vms.values().fold(BTreeMap::new(), |mut m, v| {
        *m.entry(v.observed_host.clone().unwrap()).or_default() += 1;
        m
    });
    assert!(per_host["h0"] <= 8, "{per_host:?}");
    // What the manager believes is exactly what the hosts run: no VM lost or doubled.
    let placement = lab.placement(4).await;
    assert_eq!(placement.len(), 12);
    for (vm, hosts) in &placement {
        assert_eq!(hosts.len(), 1, "{vm} on {hosts:?}");
        assert_eq!(snap.vms[vm].observed_host.as_ref(), Some(&hosts[0]));
        assert_eq!(snap.vms[vm].state, VmState::Running);
    }
    assert!(snap.running.is_empty());
    let done = lab.manager.migrations(100).unwrap();
    assert_eq!(done.len(), moved);
    assert!(done.iter().all(|m| matches!(m.result, tern_manager::state::MigrationResult::Succeeded { total_ms, .. } if total_ms > 0)));
}

#[tokio::test]
async fn a_dead_hosts_vms_restart_once_and_its_stale_copies_go_when_it_returns() {
    let settings = BalancerSettings {
        dead_after_s: 10,
        enabled: false,
        ..Default::default()
    };
    let lab = Lab::new(3, settings).await;
    let reqs = (0..6)
        .map(|i| NewVm {
            name: format!("vm-{i}"),
            spec: spec(1),
            host: Some(format!("h{}", i % 2)),
        })
        .collect();
    lab.manager
        .step(|s, _| decide::create_vms(s, reqs))
        .unwrap();
    lab.control.round().await.unwrap();
    lab.sim.host("h1").unwrap().set_down(true);
    for _ in 0..4 {
        lab.advance(5_000);
        let r = lab.control.round().await.unwrap();
        assert_eq!(r.unreachable, 1);
    }
    let snap = lab.manager.read(|s| s.clone());
    assert_eq!(snap.hosts["h1"].state, HostState::Dead);
    let events = lab.manager.events_since(0, 10_000).unwrap();
    let restarts: Vec<&str> = events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::VmRestarted { vm, from, .. } if from == "h1" => Some(vm.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(
        restarts,
        ["vm-1", "vm-3", "vm-5"],
        "each restarted exactly once"
    );
    for vm in restarts {
        let v = &snap.vms[vm];
        assert_eq!(v.state, VmState::Running);
        assert_ne!(v.observed_host.as_deref(), Some("h1"));
    }
    // h1 returns with its old copies: they are destroyed before it takes work again.
    lab.sim.host("h1").unwrap().set_down(false);
    lab.advance(1_000);
    let r = lab.control.round().await.unwrap();
    assert_eq!(r.stale_destroyed, 3);
    assert!(lab.sim.host("h1").unwrap().vm_names().await.is_empty());
    lab.advance(1_000);
    lab.control.round().await.unwrap();
    assert_eq!(lab.manager.read(|s| s.hosts["h1"].state), HostState::Active);
    let placement = lab.placement(3).await;
    assert_eq!(placement.len(), 6);
    assert!(placement.values().all(|h| h.len() == 1), "{placement:?}");
}

#[tokio::test]
async fn a_restarted_manager_settles_migrations_left_open_without_losing_or_doubling_vms() {
    let lab = Lab::new(
        2,
        BalancerSettings {
            enabled: false,
            ..Default::default()
        },
    )
    .await;
    let reqs = ["done-while-down", "never-started"]
        .iter()
        .map(|n| NewVm {
            name: n.to_string(),
            spec: spec(1),
            host: Some("h0".into()),
        })
        .collect();
    lab.manager
        .step(|s, _| decide::create_vms(s, reqs))
        .unwrap();
    lab.control.settle().await.unwrap();
    for vm in ["done-while-down", "never-started"] {
        lab.manager
            .execute(Command::MigrateVm {
                name: vm.into(),
                to: Some("h1".into()),
                policy: None,
            })
            .unwrap();
    }
    // The first migration runs to its end on the hosts, but the manager dies before it
    // records the answer; the second was never started.
    let h1 = lab.manager.read(|s| s.hosts["h1"].clone());
    use tern_manager::client::HostClient;
    let r = lab
        .sim
        .host("h0")
        .unwrap()
        .migrate_vm(
            "done-while-down",
            &spec(1),
            &h1,
            tern_manager::state::PolicyKind::Adaptive,
            &|_| (),
        )
        .await
        .unwrap();
    assert!(matches!(
        r,
        tern_manager::state::MigrationResult::Succeeded { .. }
    ));

    let path = lab._dir.path().join("tern.db");
    let c = lab.clock.clone();
    let manager = Arc::new(
        Manager::open(
            Box::new(SqliteStore::open(&path).unwrap()),
            Arc::new(move || c.load(Ordering::SeqCst)),
        )
        .unwrap(),
    );
    assert_eq!(
        manager.read(|s| s.running.len()),
        2,
        "both migrations are open in the store"
    );
    let control = Control::new(manager.clone(), lab.sim.clone());
    assert_eq!(control.recover().await.unwrap(), 1);
    let snap = manager.read(|s| s.clone());
    assert_eq!(snap.vms["done-while-down"].state, VmState::Running);
    assert_eq!(
        snap.vms["done-while-down"].observed_host.as_deref(),
        Some("h1")
    );
    assert_eq!(snap.running.len(), 1);
    // The other is dispatched as usual and completes.
    assert_eq!(control.settle().await.unwrap(), 1);
    let placement = lab.placement(2).await;
    assert_eq!(placement.len(), 2);
    for (vm, hosts) in placement {
        assert_eq!(hosts, ["h1"], "{vm}");
        assert_eq!(
            manager
                .read(|s| s.vms[&vm].observed_host.clone())
                .as_deref(),
            Some("h1")
        );
    }
    assert!(manager.read(|s| s.running.is_empty()));
}

/// An interval shortened while the loop waits out a long one applies from the last round
/// at once: rounds every hour, changed to every second, must not wait out the hour.
#[tokio::test]
async fn a_shortened_interval_applies_without_waiting_out_the_old_one() {
    let lab = Lab::new(
        1,
        BalancerSettings {
            interval_s: 3600,
            ..BalancerSettings::default()
        },
    )
    .await;
    let beat = |lab: &Lab| lab.manager.read(|s| s.hosts["h0"].last_heartbeat);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(lab.control.clone().run(async {
        let _ = stopped.await;
    }));
    // The first round comes at once and records the host's report.
    let t0 = std::time::Instant::now();
    while beat(&lab).is_none() {
        assert!(t0.elapsed() < Duration::from_secs(10), "no first round");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Whatever the first round still commits has landed; the clock moves on, so a
    // new round's report carries a new time.
    tokio::time::sleep(Duration::from_millis(600)).await;
    lab.advance(5_000);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let first = beat(&lab);
    let mut settings = lab.manager.read(|s| s.settings.clone());
    settings.interval_s = 1;
    lab.manager.execute(Command::PutSettings(settings)).unwrap();
    let t0 = std::time::Instant::now();
    while beat(&lab) == first {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no round within 5 s of shortening the interval from an hour to a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = stop.send(());
    run.await.unwrap();
}

#[tokio::test]
async fn a_host_that_refuses_a_vm_leaves_it_pending_with_its_reason_logged_once() {
    let lab = Lab::new(2, BalancerSettings::default()).await;
    lab.sim.host("h0").unwrap().set_down(true);
    let created = lab
        .manager
        .step(|s, _| {
            decide::create_vms(
                s,
                vec![NewVm {
                    name: "web".into(),
                    spec: spec(1),
                    host: Some("h0".into()),
                }],
            )
        })
        .unwrap();
    assert!(created[0].is_ok());
    // Asked three times, refused three times.
    for _ in 0..3 {
        lab.control.settle().await.unwrap();
    }
    let v = lab.manager.read(|s| s.vms["web"].clone());
    assert_eq!(v.state, VmState::Pending);
    let reason = v.start_error.expect("the refusal is recorded");
    assert!(reason.contains("host is down"), "{reason}");
    let refusals = |lab: &Lab| {
        lab.manager
            .events_since(0, 100)
            .unwrap()
            .into_iter()
            .filter(|e| matches!(&e.kind, EventKind::VmStartFailed { vm, host, .. } if vm == "web" && host == "h0"))
            .count()
    };
    assert_eq!(refusals(&lab), 1);
    // Back up: it starts, and the reason goes.
    lab.sim.host("h0").unwrap().set_down(false);
    lab.control.settle().await.unwrap();
    let v = lab.manager.read(|s| s.vms["web"].clone());
    assert_eq!((v.state, v.start_error), (VmState::Running, None));
    assert_eq!(refusals(&lab), 1);
}
