//! The SQLite store against a real database file.

use tern_manager::state::*;
use tern_manager::store::{schema, SqliteStore, Store};

fn host(name: &str) -> Host {
    Host {
        name: name.into(),
        address: format!("http://198.18.0.1:7000/{name}"),
        capacity: Capacity {
            cpus: 8.0,
            memory_mib: 16384,
        },
        state: HostState::Active,
        last_heartbeat: Some(1234),
        cpu_used: Some(1.5),
        cpu_smoothed: None,
        store_free_mib: None,
    }
}

fn vm(name: &str, on: &str) -> Vm {
    Vm {
        name: name.into(),
        spec: VmSpec {
            pinned: true,
            anti_affinity: Some("db".into()),
            ..VmSpec::sized(2, 1024)
        },
        desired_host: Some(on.into()),
        observed_host: None,
        state: VmState::Pending,
        cpu_used: 0.25,
        cpu_measured: true,
        last_moved: None,
        disks_made: false,
        guest: None,
        restarts: Default::default(),
        start_error: None,
    }
}

#[test]
fn everything_committed_is_loaded_back_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.db");
    let mig = Migration {
        id: 1,
        vm: "a".into(),
        from: "h1".into(),
        to: "h2".into(),
        policy: tern_api::migration::PolicyKind::Adaptive,
        reason: MigrationReason::Balance,
        started: 10,
        finished: None,
        result: MigrationResult::Running,
    };
    let settings = BalancerSettings {
        aggressiveness: 5,
        ..Default::default()
    };
    let changes = vec![
        Change::PutHost(host("h1")),
        Change::PutHost(Host {
            state: HostState::Maintenance,
            ..host("h2")
        }),
        Change::PutVm(vm("a", "h1")),
        Change::PutVm(vm("b", "h2")),
        Change::RemoveVm("b".into()),
        // Guest health and HA restarts are kept too (schema version 5), and why a
        // host refused to start it (6).
        Change::PutVm(Vm {
            start_error: Some("no such kernel".into()),
            guest: Some(tern_api::health::GuestHealth {
                state: tern_api::health::GuestState::Panicked,
                reason: "pvpanic".into(),
                since_ms: 5,
            }),
            restarts: tern_api::health::GuestRestarts {
                at_ms: vec![3, 4],
                pending: true,
                failed: Some("again".into()),
            },
            ..vm("c", "h1")
        }),
        Change::PutMigration(mig.clone()),
        Change::PutSettings(settings.clone()),
        Change::Event(EventKind::HostRegistered { host: "h1".into() }),
        Change::Event(EventKind::VmDeleted { vm: "b".into() }),
    ];
    let mut expected = Snapshot::default();
    {
        let mut store = SqliteStore::open(&path).unwrap();
        let events = store.commit(99, &changes).unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
        expected.apply(&changes, &events);
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), schema::latest());
    let loaded = store.load().unwrap();
    assert_eq!(loaded, expected);
    assert_eq!(loaded.next_migration, 2);
    assert_eq!(loaded.settings, settings);
    assert_eq!(loaded.vms.keys().collect::<Vec<_>>(), ["a", "c"]);

    // A finished migration leaves the running set but stays on record.
    let mut store = store;
    let done = Migration {
        finished: Some(20),
        result: MigrationResult::Succeeded {
            total_ms: 900,
            downtime_ms: 40,
        },
        ..mig
    };
    store
        .commit(100, &[Change::PutMigration(done.clone())])
        .unwrap();
    assert!(store.load().unwrap().running.is_empty());
    assert_eq!(store.migrations(10).unwrap(), [done]);
}

#[test]
fn events_are_numbered_in_order_and_listed_since_a_number() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = SqliteStore::open(&dir.path().join("tern.db")).unwrap();
    for i in 0..5u64 {
        let e = store
            .commit(
                i,
                &[Change::Event(EventKind::VmDeleted {
                    vm: format!("v{i}"),
                })],
            )
            .unwrap();
        assert_eq!(e[0].seq, i + 1);
    }
    let since = store.events_since(2, 2).unwrap();
    assert_eq!(since.iter().map(|e| e.seq).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(since[0].time, 2);
    assert!(store.events_since(5, 10).unwrap().is_empty());
}

#[test]
fn a_failed_commit_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.db");
    let mut store = SqliteStore::open(&path).unwrap();
    store.commit(1, &[Change::PutHost(host("h1"))]).unwrap();
    // Make the second statement of the batch fail: a read-only connection cannot write,
    // so break the table from the side instead.
    let side = rusqlite::Connection::open(&path).unwrap();
    side.execute_batch("DROP TABLE events").unwrap();
    let err = store
        .commit(
            2,
            &[
                Change::PutHost(host("h2")),
                Change::Event(EventKind::HostRegistered { host: "h2".into() }),
            ],
        )
        .unwrap_err();
    assert!(err.to_string().contains("events"), "{err}");
    let names: Vec<String> = side
        .prepare("SELECT name FROM hosts")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(names, ["h1"]);
}

#[test]
fn a_database_from_a_newer_tern_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.db");
    drop(SqliteStore::open(&path).unwrap());
    let side = rusqlite::Connection::open(&path).unwrap();
    side.execute("UPDATE schema_version SET version = 999", [])
        .unwrap();
    let err = SqliteStore::open(&path).err().unwrap().to_string();
    assert!(err.contains("schema version 999"), "{err}");
}

#[test]
fn the_journal_is_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.db");
    drop(SqliteStore::open(&path).unwrap());
    let side = rusqlite::Connection::open(&path).unwrap();
    let mode: String = side
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
}

#[test]
fn a_version_1_database_is_migrated_forward_keeping_its_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(schema::MIGRATIONS[0].1).unwrap();
        conn.execute_batch(
            "CREATE TABLE schema_version (version INTEGER NOT NULL);
             INSERT INTO schema_version VALUES (1);
             INSERT INTO vms VALUES ('a', '{\"vcpus\":1,\"memory_mib\":512}', 'h1', 'h1',
                                     'running', 0.5, NULL);",
        )
        .unwrap();
    }
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.schema_version().unwrap(), schema::latest());
    assert!(schema::latest() >= 2);
    let a = &store.load().unwrap().vms["a"];
    assert_eq!(
        (a.state, a.cpu_used, a.cpu_measured),
        (VmState::Running, 0.5, false)
    );
}

#[test]
fn the_reader_sees_each_commit_and_reads_while_a_write_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.db");
    let mut store = SqliteStore::open(&path).unwrap();
    let reader = store.reader().unwrap().expect("SQLite has a reader");
    assert!(reader.events_since(0, 10).unwrap().is_empty());
    store
        .commit(
            5,
            &[
                Change::PutHost(host("h1")),
                Change::Event(EventKind::HostRegistered { host: "h1".into() }),
            ],
        )
        .unwrap();
    assert_eq!(reader.events_since(0, 10).unwrap()[0].time, 5);
    // Another writer holding its write transaction open does not hold the reader up,
    // and what it has not committed is not seen.
    let other = rusqlite::Connection::open(&path).unwrap();
    other
        .execute_batch(
            "BEGIN IMMEDIATE; INSERT INTO events (time, kind) VALUES (6, '{\"type\":\"settings_changed\"}');",
        )
        .unwrap();
    assert_eq!(reader.events_since(0, 10).unwrap().len(), 1);
    assert!(reader.migrations(10).unwrap().is_empty());
    other.execute_batch("COMMIT").unwrap();
    assert_eq!(reader.events_since(1, 10).unwrap()[0].time, 6);
}

#[test]
fn rewriting_a_host_or_vm_keeps_one_row_with_the_new_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tern.db");
    let mut store = SqliteStore::open(&path).unwrap();
    store
        .commit(
            1,
            &[Change::PutHost(host("h1")), Change::PutVm(vm("a", "h1"))],
        )
        .unwrap();
    let moved = Vm {
        observed_host: Some("h1".into()),
        state: VmState::Running,
        cpu_used: 0.75,
        ..vm("a", "h2")
    };
    let busy = Host {
        cpu_used: Some(7.0),
        cpu_smoothed: Some(6.0),
        state: HostState::Dead,
        ..host("h1")
    };
    store
        .commit(
            2,
            &[Change::PutHost(busy.clone()), Change::PutVm(moved.clone())],
        )
        .unwrap();
    let snap = store.load().unwrap();
    assert_eq!(snap.hosts.len(), 1);
    assert_eq!(snap.hosts["h1"], busy);
    assert_eq!(snap.vms.len(), 1);
    assert_eq!(snap.vms["a"], moved);
}
