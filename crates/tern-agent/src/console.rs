//! `GET /v1/vms/{id}/console`: the VM's serial console as a WebSocket. The route sits
//! behind the same check as every VM route (the router's auth layer runs before this
//! handler, so a caller without the token or certificate never gets the upgrade).
//!
//! The agent bridges binary frames to the console socket QEMU listens on and back;
//! text frames are taken as their UTF-8 bytes. One client at a time: QEMU's socket
//! serves one connection, so a second attach is refused (409) until the first leaves.
//! `?log=BYTES` first sends the tail of the console log (at most [`MAX_REPLAY_BYTES`]),
//! so an attach shows what the guest printed before.
//!
//! The agent pings the client every [`PING_EVERY`] and ends the attach when it has heard
//! nothing from it (a frame or a pong) for [`IDLE_TIMEOUT`]: a client that vanished
//! without closing frees the console. The attach also ends when the VM's QEMU goes
//! (it stops, suspends, migrates away): the socket closes and the client is told why.

use crate::api::VmId;
use crate::error::AgentError;
use crate::state::AppState;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;
use tern_api::agent::VmState;
use tern_api::client::console::{IDLE_TIMEOUT, MAX_FRAME_BYTES, PING_EVERY};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Largest log tail `?log=` replays.
pub const MAX_REPLAY_BYTES: u64 = 1 << 20;
/// To connect to the console socket.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long typed input may wait for QEMU to take it (a guest that does not read its
/// serial port, with the socket's buffer full).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// `GET /v1/vms/{id}/console` options.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// Send up to this many bytes of the end of the console log first (at most 1 MiB).
    #[serde(default)]
    pub log: Option<u64>,
}

/// The console sockets a client is attached to.
static ATTACHED: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);

/// A claim on one console socket, given back when dropped (the attach ended).
struct Attached(PathBuf);

impl Attached {
    fn claim(socket: &Path) -> Option<Attached> {
        let mut set = ATTACHED.lock().expect("console table lock");
        set.insert(socket.to_path_buf())
            .then(|| Attached(socket.to_path_buf()))
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        ATTACHED.lock().expect("console table lock").remove(&self.0);
    }
}

/// Where the replayed tail of a log of `len` bytes starts when `asked` bytes are asked
/// for (pure).
pub fn replay_start(len: u64, asked: u64) -> u64 {
    len.saturating_sub(asked.min(MAX_REPLAY_BYTES))
}

/// Whether a VM in `state` has a console to attach to (pure): its QEMU runs the guest.
pub fn attachable(state: VmState) -> bool {
    matches!(state, VmState::Running | VmState::Paused)
}

#[utoipa::path(get, path = "/v1/vms/{id}/console",
    summary = "attach to the VM's serial console: a WebSocket carrying its bytes both ways in binary frames (one client at a time)",
    params(crate::api::Id, ConsoleQuery),
    responses(
        (status = 101, description = "switched to the WebSocket"),
        (status = 400, description = "not a WebSocket request, or a bad query", body = tern_api::agent::ErrorBody),
        (status = 404, description = "no such VM", body = tern_api::agent::ErrorBody),
        (status = 409, description = "the VM is not running or paused, or a client is attached already", body = tern_api::agent::ErrorBody)))]
pub async fn console(
    State(state): State<AppState>,
    VmId(id): VmId,
    q: Result<Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    match attach(&state, id.as_str(), q, ws).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn attach(
    state: &AppState,
    id: &str,
    q: Result<Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, AgentError> {
    let q = q.map_err(|e| AgentError::BadRequest(format!("query: {}", e.body_text())))?;
    let ws = ws.map_err(|e| {
        AgentError::BadRequest(format!(
            "this route is a WebSocket (`tern vm console`): {}",
            e.body_text()
        ))
    })?;
    let info = state.hv.refresh(id).await?;
    let unavailable = |reason: String| AgentError::Console {
        vm: id.to_string(),
        reason,
    };
    if !attachable(info.state) {
        return Err(unavailable(format!(
            "it is {}; a console is there while it is running or paused",
            info.state
        )));
    }
    let socket = info.console_socket.ok_or_else(|| {
        unavailable(format!(
            "the {} driver has no serial console",
            state.hv.kind()
        ))
    })?;
    let slot = Attached::claim(&socket).ok_or_else(|| {
        unavailable("a client is attached to its console already; one at a time".into())
    })?;
    let channel = |step: &'static str| {
        let vm = id.to_string();
        move |source| AgentError::ConsoleChannel { vm, step, source }
    };
    let unix = tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(&socket))
        .await
        .map_err(|_| {
            channel("connecting")(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no connection within {CONNECT_TIMEOUT:?}"),
            ))
        })?
        .map_err(channel("connecting"))?;
    let replay = match (q.0.log, &info.console_log) {
        (Some(n), Some(log)) if n > 0 => read_tail(log, n)
            .await
            .map_err(channel("reading the log"))?,
        _ => Vec::new(),
    };
    Ok(ws
        .max_frame_size(MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |socket| async move {
            bridge(socket, unix, replay).await;
            drop(slot);
        }))
}

/// The last `asked` bytes of `log` (at most [`MAX_REPLAY_BYTES`]); none when the guest
/// wrote nothing yet.
async fn read_tail(log: &Path, asked: u64) -> std::io::Result<Vec<u8>> {
    let mut f = match tokio::fs::File::open(log).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata().await?.len();
    let start = replay_start(len, asked);
    f.seek(std::io::SeekFrom::Start(start)).await?;
    let mut out = Vec::with_capacity((len - start) as usize);
    f.take(len - start).read_to_end(&mut out).await?;
    Ok(out)
}

/// Copies bytes between the client and the console until either side ends.
async fn bridge(ws: WebSocket, unix: UnixStream, replay: Vec<u8>) {
    let (mut tx, mut rx) = ws.split();
    let (mut from_guest, mut to_guest) = unix.into_split();
    let close = |reason: &str| {
        Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::NORMAL,
            reason: reason.to_string().into(),
        }))
    };
    for chunk in replay.chunks(MAX_FRAME_BYTES) {
        if tx.send(Message::Binary(chunk.to_vec())).await.is_err() {
            return;
        }
    }
    let mut buf = vec![0u8; 16 << 10];
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut heard = tokio::time::Instant::now();
    let why = loop {
        tokio::select! {
            n = from_guest.read(&mut buf) => match n {
                Ok(0) | Err(_) => break "the console closed: the VM's QEMU ended",
                Ok(n) => {
                    if tx.send(Message::Binary(buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            },
            m = rx.next() => {
                heard = tokio::time::Instant::now();
                let bytes = match m {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(t))) => t.into_bytes(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                };
                match tokio::time::timeout(WRITE_TIMEOUT, to_guest.write_all(&bytes)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break "the console closed: the VM's QEMU ended",
                    Err(_) => break "the guest does not read its console",
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() >= IDLE_TIMEOUT {
                    break "no answer from the client";
                }
                if tx.send(Message::Ping(Vec::new())).await.is_err() {
                    return;
                }
            }
        }
    };
    let _ = tx.send(close(why)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_is_the_bounded_tail() {
        assert_eq!(replay_start(100, 10), 90);
        assert_eq!(replay_start(100, 1000), 0);
        assert_eq!(replay_start(0, 10), 0);
        assert_eq!(
            replay_start(10 << 20, u64::MAX),
            (10 << 20) - MAX_REPLAY_BYTES
        );
    }

    #[test]
    fn only_a_running_or_paused_vm_has_a_console() {
        assert!(attachable(VmState::Running) && attachable(VmState::Paused));
        for s in [
            VmState::Created,
            VmState::Stopped,
            VmState::Incoming,
            VmState::Suspended,
            VmState::Restoring,
        ] {
            assert!(!attachable(s), "{s}");
        }
    }

    #[test]
    fn one_client_per_console() {
        let p = Path::new("/nonexistent/console-claim-test.sock");
        let a = Attached::claim(p).expect("first");
        assert!(Attached::claim(p).is_none());
        drop(a);
        assert!(Attached::claim(p).is_some());
    }
}
