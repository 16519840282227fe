//! The manager's write path against a real SQLite file: heartbeats from many threads at
//! once are committed in groups, yet each counts exactly as if they ran one by one.

use std::sync::Arc;
use tern_manager::decide::HostAddresses;

use tern_manager::decide::{Command, LoadReport, VmLoad};
use tern_manager::manager::system_clock;
use tern_manager::state::{Capacity, Snapshot, VmSpec, VmState};
use tern_manager::store::{SqliteStore, Store};
use tern_manager::Manager;

const HOSTS: usize = 4;
const VMS_PER_HOST: usize = 3;
const THREADS: usize = 8;
/// Heartbeats each thread sends to each host.
const ROUNDS: usize = 5;

fn report(host: usize, cpu: f64) -> Command {
    Command::Heartbeat {
        host: format!("h{host}"),
        report: LoadReport {
            cpu_used: cpu,
            vms: (0..VMS_PER_HOST)
                .map(|i| VmLoad {
                    name: format!("v{host}-{i}").parse().unwrap(),
                    cpu_used: cpu,
                    guest: None,
                    powered_off: false,
                })
                .collect(),
            store_free_mib: None,
        },
    }
}

/// A manager over SQLite at `path` with [`HOSTS`] hosts of [`VMS_PER_HOST`] VMs each,
/// every host reported once.
fn cluster(path: &std::path::Path) -> Manager {
    let manager = Manager::open(Box::new(SqliteStore::open(path).unwrap()), system_clock())
        .unwrap()
        .serving(HostAddresses::Sim);
    for h in 0..HOSTS {
        manager
            .execute(Command::RegisterHost {
                name: format!("h{h}"),
                address: "sim:".into(),
                capacity: Capacity {
                    cpus: 8.0,
                    memory_mib: 16384,
                },
            })
            .unwrap();
        for i in 0..VMS_PER_HOST {
            manager
                .execute(Command::CreateVm {
                    name: format!("v{h}-{i}"),
                    spec: VmSpec::sized(1, 512),
                    host: Some(format!("h{h}")),
                    template: None,
                })
                .unwrap();
        }
        // The first report is taken as it is: everything starts at 0 cores.
        manager.execute(report(h, 0.0)).unwrap();
    }
    manager
}

#[test]
fn concurrent_heartbeats_each_count_once_and_are_all_committed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.db");
    let manager = Arc::new(cluster(&path));
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let m = manager.clone();
            s.spawn(move || {
                for _ in 0..ROUNDS {
                    for h in 0..HOSTS {
                        m.execute(report(h, 1.0)).unwrap();
                    }
                }
            });
        }
    });
    // Identical reports smooth to the same value in any order, but only if none of
    // them was decided from a state that missed another.
    let alpha = manager.read(|s| s.settings.ewma_alpha());
    let mut expected = 0.0;
    for _ in 0..THREADS * ROUNDS {
        expected = alpha * 1.0 + (1.0 - alpha) * expected;
    }
    let snap: Snapshot = manager.read(Clone::clone);
    for h in snap.hosts.values() {
        assert_eq!(h.cpu_smoothed, Some(expected), "host {}", h.name);
    }
    for v in snap.vms.values() {
        assert_eq!(v.state, VmState::Running, "{}", v.name);
        assert_eq!(v.cpu_used, expected, "VM {}", v.name);
    }
    // Every answered heartbeat was committed before its answer.
    drop(manager);
    assert_eq!(SqliteStore::open(&path).unwrap().load().unwrap(), snap);
}

/// Heartbeats that come while another thread commits step after step (a balancing
/// round commits its migrations in parts) are answered after the step under way, not
/// after the whole run of them.
#[test]
fn heartbeats_wait_for_one_step_not_for_a_run_of_them() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;
    const STEPS: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let manager = cluster(&dir.path().join("tern.db"));
    let steps = AtomicUsize::new(0);
    let stepping = AtomicBool::new(true);
    let waited = std::thread::scope(|s| {
        let (manager, steps, stepping) = (&manager, &steps, &stepping);
        s.spawn(move || {
            for _ in 0..STEPS {
                manager
                    .step(|_, _| {
                        // Work under the store, as a part of a round's commit does.
                        std::thread::sleep(Duration::from_millis(10));
                        (Vec::new(), ())
                    })
                    .unwrap();
                steps.fetch_add(1, Ordering::SeqCst);
            }
            stepping.store(false, Ordering::SeqCst);
        });
        let writers: Vec<_> = (0..THREADS)
            .map(|t| {
                s.spawn(move || {
                    let mut most = 0;
                    while stepping.load(Ordering::SeqCst) {
                        let before = steps.load(Ordering::SeqCst);
                        manager.execute(report(t % HOSTS, 1.0)).unwrap();
                        most = most.max(steps.load(Ordering::SeqCst) - before);
                    }
                    most
                })
            })
            .collect();
        writers
            .into_iter()
            .map(|w| w.join().unwrap())
            .max()
            .unwrap()
    });
    assert!(
        waited <= 5,
        "a heartbeat waited for {waited} of {STEPS} steps"
    );
}
