//! The agent's error type, and the one place that maps errors to HTTP status codes.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
pub use tern_api::agent::ErrorBody;
use tern_hv::HvError;
use tern_trace::TraceError;

use crate::migration::memory::MemoryError;

/// Everything an agent request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The request body or a parameter is wrong.
    #[error("{0}")]
    BadRequest(String),
    /// No or wrong bearer token.
    #[error("{0}")]
    Unauthorized(String),
    /// An authenticated caller whose certificate's role may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// A request body over the agent's limit.
    #[error("the request body is larger than {limit} bytes; no agent request needs that much")]
    TooLarge { limit: usize },
    /// A lifecycle action on a VM that is being migrated to or from this host.
    #[error("cannot {action} VM {vm:?}: it is being migrated; wait until the migration ends (GET /v1/migrations) or cancel it (POST /v1/migrations/{{id}}/cancel)")]
    Migrating { vm: String, action: &'static str },
    /// A lifecycle action on a VM another long one (a stop waiting for the guest, a
    /// suspend, a restore) is under way on.
    #[error("cannot {action} VM {vm:?}: a {doing} of it is under way; wait until it ends")]
    Busy {
        vm: String,
        action: &'static str,
        doing: &'static str,
    },
    /// Saving a VM's state to the store or loading it back failed at `step`.
    #[error("VM {vm:?}: {step}: {source}")]
    SavedState {
        vm: String,
        step: &'static str,
        #[source]
        source: Box<crate::migration::MigrationError>,
    },
    /// A kernel or initramfs path outside the host's image directory.
    #[error("invalid VM spec: {field} {} is not under this host's image directory {}: put the file there (tern image build) or start the agent with --image-dir naming where it is", path.display(), image_dir.display())]
    OutsideImageDir {
        field: &'static str,
        path: std::path::PathBuf,
        image_dir: std::path::PathBuf,
    },
    /// The host has not enough memory left for the VM.
    #[error("no room on this host: {0}")]
    NoRoom(String),
    /// The guest agent did not answer or its channel is closed.
    #[error("guest agent of VM {id:?}: {reason}")]
    Guest { id: String, reason: String },
    /// The guest agent answered, refusing the request (an agent too old for it, a
    /// request it cannot carry out).
    #[error("guest agent of VM {id:?} refused: {reason}")]
    GuestRefused { id: String, reason: String },
    /// The channel to the guest agent failed at `step`.
    #[error("guest agent of VM {id:?}: {step}: {source}")]
    GuestChannel {
        id: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A console attach refused: the VM is not running or paused, has no console, or a
    /// client is attached already.
    #[error("console of VM {vm:?}: {reason}")]
    Console { vm: String, reason: String },
    /// The VM's console socket failed at `step`.
    #[error("console of VM {vm:?}: {step}: {source}")]
    ConsoleChannel {
        vm: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Calling another agent (client side) failed: it answered with an error, could not
    /// be reached, timed out, or sent an answer too large or unreadable.
    #[error(transparent)]
    Client(#[from] tern_api::client::ClientError),
    /// A driver error; its kind decides the status.
    #[error(transparent)]
    Hv(#[from] HvError),
    /// A destination could not set up the memory file a migration writes into.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A destination could not set up a migration's streams (listener, relay socket).
    #[error("migration streams: {0}")]
    Streams(#[source] crate::migration::MigrationError),
    /// Recording a trace failed or was refused.
    #[error(transparent)]
    Trace(#[from] tern_trace::TraceError),
    /// A catalogue image's files could not be made present in the store.
    #[error(transparent)]
    Image(#[from] crate::images::ImageError),
    /// The agent's own files (state directory, token file).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl AgentError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
        let context = context.into();
        move |source| AgentError::Io { context, source }
    }

    /// The HTTP status for this error (pure; the only mapping in the agent).
    pub fn status(&self) -> StatusCode {
        match self {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            AgentError::Forbidden(_) => StatusCode::FORBIDDEN,
            AgentError::NoRoom(_) => StatusCode::INSUFFICIENT_STORAGE,
            AgentError::Migrating { .. } | AgentError::Busy { .. } | AgentError::Console { .. } => {
                StatusCode::CONFLICT
            }
            AgentError::ConsoleChannel { .. } => StatusCode::BAD_GATEWAY,
            AgentError::SavedState { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            AgentError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            AgentError::OutsideImageDir { .. } => StatusCode::BAD_REQUEST,
            AgentError::Image(e) => match e {
                e if e.is_bad_input() => StatusCode::BAD_REQUEST,
                crate::images::ImageError::NoSource { .. } => StatusCode::CONFLICT,
                crate::images::ImageError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
                _ => StatusCode::BAD_GATEWAY,
            },
            AgentError::Guest { .. }
            | AgentError::GuestRefused { .. }
            | AgentError::GuestChannel { .. }
            | AgentError::Client(_) => StatusCode::BAD_GATEWAY,
            AgentError::Io { .. } | AgentError::Streams(_) => StatusCode::INTERNAL_SERVER_ERROR,
            // A prepare whose VM spec gives a memory file the destination cannot use.
            AgentError::Memory(_) => StatusCode::BAD_REQUEST,
            AgentError::Trace(e) => match e {
                TraceError::NoThreads | TraceError::TooManyThreads { .. } => {
                    StatusCode::BAD_REQUEST
                }
                TraceError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            AgentError::Hv(e) => match e {
                HvError::InvalidSpec(_)
                | HvError::BadName(_)
                | HvError::MissingPath { .. }
                | HvError::NoBridge(_) => StatusCode::BAD_REQUEST,
                HvError::Disk(d) if d.is_bad_input() => StatusCode::BAD_REQUEST,
                HvError::Disk(d) if d.is_conflict() => StatusCode::CONFLICT,
                HvError::Disk(_) => StatusCode::INTERNAL_SERVER_ERROR,
                HvError::Saved(s) if s.is_conflict() => StatusCode::CONFLICT,
                HvError::Saved(_) => StatusCode::INTERNAL_SERVER_ERROR,
                HvError::UnknownVm(_) => StatusCode::NOT_FOUND,
                HvError::AlreadyExists(_) | HvError::Conflict { .. } => StatusCode::CONFLICT,
                HvError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
                HvError::Qmp { .. }
                | HvError::Protocol(_)
                | HvError::BadJson { .. }
                | HvError::Spawn { .. }
                | HvError::Qemu(_)
                | HvError::Command { .. }
                | HvError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// A short machine-readable kind, stable across message wording changes.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::BadRequest(_) => "bad_request",
            AgentError::Unauthorized(_) => "unauthorized",
            AgentError::Forbidden(_) => "forbidden",
            AgentError::NoRoom(_) => "no_room",
            AgentError::Migrating { .. } | AgentError::Busy { .. } | AgentError::Console { .. } => {
                "conflict"
            }
            AgentError::ConsoleChannel { .. } => "console",
            AgentError::SavedState { .. } => "hypervisor",
            AgentError::TooLarge { .. } => "too_large",
            AgentError::OutsideImageDir { .. } => "bad_spec",
            AgentError::Image(e) if e.is_bad_input() => "bad_spec",
            AgentError::Image(_) => "image",
            AgentError::Guest { .. }
            | AgentError::GuestRefused { .. }
            | AgentError::GuestChannel { .. } => "guest",
            AgentError::Client(_) => "remote",
            AgentError::Io { .. } | AgentError::Streams(_) => "internal",
            AgentError::Memory(_) => "bad_request",
            AgentError::Trace(e) => match e {
                TraceError::NoThreads | TraceError::TooManyThreads { .. } => "bad_request",
                TraceError::Busy(_) => "busy",
                _ => "trace",
            },
            AgentError::Hv(e) => match e {
                HvError::InvalidSpec(_)
                | HvError::BadName(_)
                | HvError::MissingPath { .. }
                | HvError::NoBridge(_) => "bad_spec",
                HvError::Disk(d) if d.is_bad_input() => "bad_spec",
                HvError::Disk(d) if d.is_conflict() => "conflict",
                HvError::Saved(s) if s.is_conflict() => "conflict",
                HvError::UnknownVm(_) => "not_found",
                HvError::AlreadyExists(_) | HvError::Conflict { .. } => "conflict",
                HvError::Timeout { .. } => "timeout",
                _ => "hypervisor",
            },
        }
    }
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let body = ErrorBody {
            error: self.to_string(),
            kind: self.kind().to_string(),
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let s = |e: AgentError| e.status().as_u16();
        assert_eq!(s(HvError::UnknownVm("x".into()).into()), 404);
        assert_eq!(s(HvError::InvalidSpec("x".into()).into()), 400);
        assert_eq!(s(HvError::AlreadyExists("x".into()).into()), 409);
        assert_eq!(s(AgentError::NoRoom("x".into())), 507);
        assert_eq!(s(AgentError::Unauthorized("x".into())), 401);
        assert_eq!(s(AgentError::Forbidden("x".into())), 403);
        assert_eq!(s(HvError::Qemu("x".into()).into()), 500);
        let bad_size = MemoryError::BadSize {
            path: "m".into(),
            len: 1,
        };
        assert_eq!(s(bad_size.into()), 400);
        let io = std::io::Error::from(std::io::ErrorKind::NotFound);
        let channel = AgentError::GuestChannel {
            id: "v".into(),
            step: "reading",
            source: io,
        };
        assert_eq!(s(channel), 502);
        use tern_hv::disk::DiskError;
        let full = DiskError::NoSpace {
            store: "/s".into(),
            need_mib: 2,
            free_mib: 1,
        };
        assert_eq!(s(HvError::from(full).into()), 400);
        let exists = DiskError::Exists {
            vm: "v".into(),
            path: "/s/vms/v/d.qcow2".into(),
        };
        assert_eq!(s(HvError::from(exists).into()), 409);
        let failed = DiskError::QemuImg {
            command: "qemu-img create".into(),
            detail: "x".into(),
        };
        assert_eq!(s(HvError::from(failed).into()), 500);
        let busy = AgentError::Busy {
            vm: "v".into(),
            action: "pause",
            doing: "suspend",
        };
        assert_eq!(s(busy), 409);
        let none = tern_hv::saved::SavedError::NotSaved {
            vm: "v".into(),
            dir: "/s/vms/v/suspend".into(),
        };
        assert_eq!(s(HvError::from(none).into()), 409);
        let relay = AgentError::SavedState {
            vm: "v".into(),
            step: "saving the device state",
            source: Box::new(crate::migration::MigrationError::Cancelled),
        };
        assert_eq!(s(relay), 500);
    }
}
