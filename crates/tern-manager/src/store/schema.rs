//! Versioned schema. Each entry of [`MIGRATIONS`] takes the database from the version
//! before it to its own; `schema_version` holds the version reached. Entries are only
//! ever appended, so an old database is brought forward step by step.

use rusqlite::{Connection, OptionalExtension};

use crate::error::{Error, Result};

/// `(version, SQL)`, in order. Never edit a released entry; append a new one.
pub const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        "CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        address TEXT NOT NULL,
        cpus REAL NOT NULL,
        memory_mib INTEGER NOT NULL,
        state TEXT NOT NULL,
        last_heartbeat INTEGER,
        cpu_used REAL,
        cpu_smoothed REAL
    );
    CREATE TABLE vms (
        name TEXT PRIMARY KEY,
        spec TEXT NOT NULL,
        desired_host TEXT,
        observed_host TEXT,
        state TEXT NOT NULL,
        cpu_used REAL NOT NULL,
        last_moved INTEGER
    );
    CREATE TABLE migrations (
        id INTEGER PRIMARY KEY,
        vm TEXT NOT NULL,
        from_host TEXT NOT NULL,
        to_host TEXT NOT NULL,
        policy TEXT NOT NULL,
        reason TEXT NOT NULL,
        started INTEGER NOT NULL,
        finished INTEGER,
        result TEXT NOT NULL
    );
    CREATE INDEX migrations_unfinished ON migrations(id) WHERE finished IS NULL;
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        time INTEGER NOT NULL,
        kind TEXT NOT NULL
    );
    CREATE TABLE settings (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        body TEXT NOT NULL
    );",
    ),
    (
        2,
        "ALTER TABLE vms ADD COLUMN cpu_measured INTEGER NOT NULL DEFAULT 0;",
    ),
    (
        3,
        "CREATE TABLE catalog (
        kind TEXT NOT NULL,
        name TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (kind, name)
    );",
    ),
    (
        4,
        "ALTER TABLE vms ADD COLUMN disks_made INTEGER NOT NULL DEFAULT 0;",
    ),
    (
        5,
        "ALTER TABLE vms ADD COLUMN guest TEXT;
         ALTER TABLE vms ADD COLUMN restarts TEXT;",
    ),
    (6, "ALTER TABLE vms ADD COLUMN start_error TEXT;"),
];

/// The version this build writes.
pub fn latest() -> u32 {
    MIGRATIONS.last().map_or(0, |m| m.0)
}

/// Brings `conn` to [`latest`], each step in its own transaction; refuses a newer database.
pub fn migrate(conn: &mut Connection) -> Result<u32> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);")?;
    let found: u32 = conn
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    if found > latest() {
        return Err(Error::SchemaTooNew {
            found,
            known: latest(),
        });
    }
    for &(version, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [version],
        )?;
        tx.commit()?;
    }
    Ok(latest())
}
