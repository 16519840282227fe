//! The SQLite store: one file, WAL journal (readers never block the writer), every commit
//! one transaction. Enums are stored by name and nested values as JSON so the file stays
//! readable with the `sqlite3` shell.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};

use super::{schema, Store, StoreRead};
use crate::error::{Error, Result};
use crate::state::{
    BalancerSettings, Capacity, Change, Event, EventKind, Host, HostState, Image, Migration,
    MigrationReason, MigrationResult, Millis, Snapshot, Template, Vm, VmState,
};

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

/// How long a connection waits for a lock another one holds (only a checkpoint that
/// resets the WAL takes one a reader must wait for).
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Self> {
        let mut conn = Connection::open(path)?;
        // WAL: API reads go on while the balancer commits. NORMAL sync is durable across
        // process crashes, which is what a manager restart needs.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        schema::migrate(&mut conn)?;
        Ok(Self {
            conn,
            path: path.to_owned(),
        })
    }

    /// The schema version the file is at.
    pub fn schema_version(&self) -> Result<u32> {
        Ok(self
            .conn
            .query_row("SELECT version FROM schema_version", [], |r| r.get(0))?)
    }
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("manager state types serialise to JSON")
}

fn from_json<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| Error::Corrupt(format!("{what} {s:?}: {e}")))
}

/// serde names of simple enums, e.g. `"balance"` for [`MigrationReason::Balance`].
fn enum_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => unreachable!("unit enum variants serialise to strings"),
    }
}

fn host_from(r: &Row) -> rusqlite::Result<(Host, String)> {
    let state: String = r.get(4)?;
    Ok((
        Host {
            name: r.get(0)?,
            address: r.get(1)?,
            capacity: Capacity {
                cpus: r.get(2)?,
                memory_mib: r.get(3)?,
            },
            state: HostState::Active,
            last_heartbeat: r.get(5)?,
            cpu_used: r.get(6)?,
            cpu_smoothed: r.get(7)?,
            store_free_mib: None,
        },
        state,
    ))
}

struct VmRow {
    vm: Vm,
    spec: String,
    state: String,
    /// JSON; NULL: none.
    guest: Option<String>,
    restarts: Option<String>,
}

fn vm_from(r: &Row) -> rusqlite::Result<VmRow> {
    Ok(VmRow {
        vm: Vm {
            name: r.get(0)?,
            spec: crate::state::VmSpec::sized(0, 0),
            desired_host: r.get(2)?,
            observed_host: r.get(3)?,
            state: VmState::Pending,
            cpu_used: r.get(5)?,
            last_moved: r.get(6)?,
            cpu_measured: r.get(7)?,
            disks_made: r.get(8)?,
            guest: None,
            restarts: Default::default(),
            start_error: r.get(11)?,
        },
        spec: r.get(1)?,
        state: r.get(4)?,
        guest: r.get(9)?,
        restarts: r.get(10)?,
    })
}

struct MigrationRow {
    m: Migration,
    reason: String,
    result: String,
}

fn migration_from(r: &Row) -> rusqlite::Result<MigrationRow> {
    Ok(MigrationRow {
        m: Migration {
            id: r.get(0)?,
            vm: r.get(1)?,
            from: r.get(2)?,
            to: r.get(3)?,
            policy: r.get::<_, String>(4)?.parse().map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    4,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?,
            reason: MigrationReason::Manual,
            started: r.get(6)?,
            finished: r.get(7)?,
            result: MigrationResult::Running,
        },
        reason: r.get(5)?,
        result: r.get(8)?,
    })
}

impl MigrationRow {
    fn finish(mut self) -> Result<Migration> {
        self.m.reason = from_json("migration reason", &to_json(&self.reason))?;
        self.m.result = from_json("migration result", &self.result)?;
        Ok(self.m)
    }
}

const MIGRATION_COLUMNS: &str =
    "id, vm, from_host, to_host, policy, reason, started, finished, result";

impl Store for SqliteStore {
    fn load(&self) -> Result<Snapshot> {
        let mut snap = Snapshot::default();
        let mut st = self.conn.prepare(
            "SELECT name, address, cpus, memory_mib, state, last_heartbeat, cpu_used, \
             cpu_smoothed FROM hosts",
        )?;
        for row in st.query_map([], host_from)? {
            let (mut h, state) = row?;
            h.state = HostState::parse(&state)
                .ok_or_else(|| Error::Corrupt(format!("host state {state:?}")))?;
            snap.hosts.insert(h.name.clone(), h);
        }
        let mut st = self.conn.prepare(
            "SELECT name, spec, desired_host, observed_host, state, cpu_used, last_moved, \
             cpu_measured, disks_made, guest, restarts, start_error FROM vms",
        )?;
        for row in st.query_map([], vm_from)? {
            let VmRow {
                mut vm,
                spec,
                state,
                guest,
                restarts,
            } = row?;
            vm.spec = from_json("VM spec", &spec)?;
            if let Some(g) = guest {
                vm.guest = Some(from_json("VM guest health", &g)?);
            }
            if let Some(r) = restarts {
                vm.restarts = from_json("VM guest restarts", &r)?;
            }
            vm.state = VmState::parse(&state)
                .ok_or_else(|| Error::Corrupt(format!("VM state {state:?}")))?;
            snap.vms.insert(vm.name.clone(), vm);
        }
        let mut st = self.conn.prepare(&format!(
            "SELECT {MIGRATION_COLUMNS} FROM migrations WHERE finished IS NULL"
        ))?;
        for row in st.query_map([], migration_from)? {
            let m = row?.finish()?;
            snap.running.insert(m.id, m);
        }
        snap.next_migration =
            self.conn
                .query_row("SELECT COALESCE(MAX(id), 0) + 1 FROM migrations", [], |r| {
                    r.get(0)
                })?;
        snap.last_event =
            self.conn
                .query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?;
        let settings: Option<String> = self
            .conn
            .query_row("SELECT body FROM settings WHERE id = 1", [], |r| r.get(0))
            .optional()?;
        if let Some(body) = settings {
            snap.settings = from_json::<BalancerSettings>("balancer settings", &body)?;
        }
        let mut st = self.conn.prepare("SELECT kind, body FROM catalog")?;
        for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
            let (kind, body) = row?;
            match kind.as_str() {
                "image" => {
                    let i: Image = from_json("catalogue image", &body)?;
                    snap.images.insert(i.name.clone(), i);
                }
                "template" => {
                    let t: Template = from_json("catalogue template", &body)?;
                    snap.templates.insert(t.name.to_string(), t);
                }
                other => return Err(Error::Corrupt(format!("catalogue entry kind {other:?}"))),
            }
        }
        Ok(snap)
    }

    fn commit(&mut self, time: Millis, changes: &[Change]) -> Result<Vec<Event>> {
        let tx = self.conn.transaction()?;
        let mut events = Vec::new();
        for c in changes {
            match c {
                Change::PutHost(h) => {
                    tx.prepare_cached(
                        "INSERT INTO hosts (name, address, cpus, memory_mib, state, \
                         last_heartbeat, cpu_used, cpu_smoothed) VALUES (?1,?2,?3,?4,?5,?6,?7,?8) \
                         ON CONFLICT (name) DO UPDATE SET address = ?2, cpus = ?3, \
                         memory_mib = ?4, state = ?5, last_heartbeat = ?6, cpu_used = ?7, \
                         cpu_smoothed = ?8",
                    )?
                    .execute(params![
                        h.name,
                        h.address,
                        h.capacity.cpus,
                        h.capacity.memory_mib,
                        h.state.as_str(),
                        h.last_heartbeat,
                        h.cpu_used,
                        h.cpu_smoothed
                    ])?;
                }
                Change::PutVm(v) => {
                    tx.prepare_cached(
                        "INSERT INTO vms (name, spec, desired_host, observed_host, state, \
                         cpu_used, last_moved, cpu_measured, disks_made, guest, restarts, \
                         start_error) \
                         VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12) \
                         ON CONFLICT (name) DO UPDATE SET spec = ?2, desired_host = ?3, \
                         observed_host = ?4, state = ?5, cpu_used = ?6, last_moved = ?7, \
                         cpu_measured = ?8, disks_made = ?9, guest = ?10, restarts = ?11, \
                         start_error = ?12",
                    )?
                    .execute(params![
                        v.name,
                        to_json(&v.spec),
                        v.desired_host,
                        v.observed_host,
                        v.state.as_str(),
                        v.cpu_used,
                        v.last_moved,
                        v.cpu_measured,
                        v.disks_made,
                        v.guest.as_ref().map(to_json),
                        (!v.restarts.is_empty()).then(|| to_json(&v.restarts)),
                        v.start_error
                    ])?;
                }
                Change::RemoveVm(name) => {
                    tx.prepare_cached("DELETE FROM vms WHERE name = ?1")?
                        .execute([name])?;
                }
                Change::RemoveHost(name) => {
                    tx.prepare_cached("DELETE FROM hosts WHERE name = ?1")?
                        .execute([name])?;
                }
                Change::PutMigration(m) => {
                    tx.prepare_cached(&format!(
                        "INSERT OR REPLACE INTO migrations ({MIGRATION_COLUMNS}) \
                         VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)"
                    ))?
                    .execute(params![
                        m.id,
                        m.vm,
                        m.from,
                        m.to,
                        m.policy.as_str(),
                        enum_name(&m.reason),
                        m.started,
                        m.finished,
                        to_json(&m.result)
                    ])?;
                }
                Change::PutImage(i) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO catalog (kind, name, body) VALUES ('image', ?1, ?2)",
                    )?
                    .execute(params![i.name, to_json(i)])?;
                }
                Change::RemoveImage(name) => {
                    tx.prepare_cached("DELETE FROM catalog WHERE kind = 'image' AND name = ?1")?
                        .execute([name])?;
                }
                Change::PutTemplate(t) => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO catalog (kind, name, body) VALUES ('template', ?1, ?2)",
                    )?
                    .execute(params![t.name.as_str(), to_json(t)])?;
                }
                Change::RemoveTemplate(name) => {
                    tx.prepare_cached("DELETE FROM catalog WHERE kind = 'template' AND name = ?1")?
                        .execute([name])?;
                }
                Change::PutSettings(s) => {
                    tx.prepare_cached("INSERT OR REPLACE INTO settings (id, body) VALUES (1, ?1)")?
                        .execute([to_json(s)])?;
                }
                Change::Event(kind) => {
                    tx.prepare_cached("INSERT INTO events (time, kind) VALUES (?1, ?2)")?
                        .execute(params![time, to_json(kind)])?;
                    events.push(Event {
                        seq: tx.last_insert_rowid() as u64,
                        time,
                        kind: kind.clone(),
                    });
                }
            }
        }
        tx.commit()?;
        Ok(events)
    }

    fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        events_since(&self.conn, since, limit)
    }

    fn migrations(&self, limit: usize) -> Result<Vec<Migration>> {
        migrations(&self.conn, limit)
    }

    fn reader(&self) -> Result<Option<Arc<dyn StoreRead>>> {
        Ok(Some(Arc::new(SqliteReader {
            path: self.path.clone(),
            idle: Mutex::new(Vec::new()),
        })))
    }
}

fn events_since(conn: &Connection, since: u64, limit: usize) -> Result<Vec<Event>> {
    let mut st = conn.prepare_cached(
        "SELECT seq, time, kind FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = st.query_map(params![since, limit as i64], |r| {
        Ok((
            r.get::<_, u64>(0)?,
            r.get::<_, u64>(1)?,
            r.get::<_, String>(2)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, time, kind) = row?;
        out.push(Event {
            seq,
            time,
            kind: from_json::<EventKind>("event", &kind)?,
        });
    }
    Ok(out)
}

fn migrations(conn: &Connection, limit: usize) -> Result<Vec<Migration>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {MIGRATION_COLUMNS} FROM migrations ORDER BY id DESC LIMIT ?1"
    ))?;
    let rows = st.query_map([limit as i64], migration_from)?;
    rows.map(|r| r?.finish()).collect()
}

/// Read connections kept open between reads. Readers run on the blocking pool, so how
/// many are open at once is bounded by that pool; beyond this many, a connection is
/// closed when its read ends.
const MAX_IDLE_READERS: usize = 8;

/// Read-only connections to the store's file. In WAL mode a reader sees the last commit
/// and neither waits for the writer nor holds it up; each read takes an idle connection
/// (opening one when all are busy) and gives it back.
struct SqliteReader {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl SqliteReader {
    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let taken = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match taken {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                c.busy_timeout(BUSY_TIMEOUT)?;
                c
            }
        };
        let out = f(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // A burst of readers opens a connection each; only a few are kept for the next.
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        out
    }
}

impl StoreRead for SqliteReader {
    fn events_since(&self, since: u64, limit: usize) -> Result<Vec<Event>> {
        self.with(|c| events_since(c, since, limit))
    }

    fn migrations(&self, limit: usize) -> Result<Vec<Migration>> {
        self.with(|c| migrations(c, limit))
    }
}
