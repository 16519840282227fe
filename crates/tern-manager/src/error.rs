//! The one error type of the manager; the API maps each variant to an HTTP status in
//! one place (`api::error`).

/// What can go wrong in the manager. Each message says what was wrong and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request itself is wrong (a field, a name, a value out of range).
    #[error("{0}")]
    BadInput(String),
    /// A VM, host or group name that breaks the naming rule.
    #[error(transparent)]
    BadName(#[from] tern_model::NameError),
    #[error("no host named {0:?}; `GET /v1/hosts` lists the registered hosts")]
    UnknownHost(String),
    #[error("no VM named {0:?}; `GET /v1/vms` lists the VMs")]
    UnknownVm(String),
    #[error(
        "no image named {0:?} in the catalogue; `tern image list` (GET /v1/images) lists them"
    )]
    UnknownImage(String),
    #[error("no template named {0:?}; `tern template list` (GET /v1/templates) lists them")]
    UnknownTemplate(String),
    /// The request clashes with the current state (a name taken, a VM mid-migration).
    #[error("{0}")]
    Conflict(String),
    #[error("no host has room for VM {vm:?}: {reason}")]
    NoRoom { vm: String, reason: String },
    #[error("agent of host {host:?}: {message}")]
    Agent { host: String, message: String },
    /// A migration ran past its deadline and did not end within the grace after it was
    /// cancelled; where the VM runs is known only once the source agent reports it.
    #[error(
        "migration {migration} of VM {vm:?} on host {host:?} is still {phase:?} after \
         {waited:?}, although cancelled: check `GET /v1/migrations/{migration}` on the \
         source agent and the VM on both hosts before acting on it"
    )]
    MigrationStuck {
        host: String,
        vm: String,
        migration: String,
        waited: std::time::Duration,
        phase: tern_api::migration::Phase,
    },
    #[error("state database: {0}")]
    Sqlite(rusqlite::Error),
    /// The disk holding the state database has no room: the write was not made.
    #[error(
        "the disk holding the state database (--db) is full ({0}): nothing was changed; \
         free space on it and retry"
    )]
    DiskFull(rusqlite::Error),
    #[error(
        "state database holds a value it cannot read ({0}); was it written by another program?"
    )]
    Corrupt(String),
    #[error(
        "state database has schema version {found}, newer than this tern knows ({known}); \
         run a newer tern or point --db at another file"
    )]
    SchemaTooNew { found: u32, known: u32 },
    #[error("etcd: {0}")]
    Etcd(String),
    /// Only the leader of several managers changes the state.
    #[error("not the leader; {}", match .0 { Some(url) => format!("the leader is at {url}"), None => "no leader is elected right now, retry in a few seconds".into() })]
    NotLeader(Option<String>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DiskFull) => Error::DiskFull(e),
            _ => Error::Sqlite(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_told_apart_from_other_database_errors() {
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        let e = Error::from(full);
        assert!(matches!(e, Error::DiskFull(_)), "{e:?}");
        assert!(e.to_string().contains("free space"), "{e}");
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        assert!(matches!(Error::from(busy), Error::Sqlite(_)));
    }
}
