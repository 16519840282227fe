//! `GET /v1/vms/{name}/console`: a VM's serial console, a WebSocket the manager relays
//! to and from the console of the agent of the host the VM runs on (over mutual TLS
//! when the cluster has a CA). The route sits behind the token check like the rest of
//! the API, which runs before the upgrade. The agent serves one client per console at a
//! time; a second attach is refused with its 409.
//!
//! The manager pings its client every [`PING_EVERY`] and ends the relay when it has
//! heard nothing from it for [`IDLE_TIMEOUT`]; the agent does the same towards the
//! manager, so a vanished client frees the console within a minute or two.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use futures_util::{SinkExt, StreamExt};
use tern_api::client::console::{ConsoleStream, IDLE_TIMEOUT, MAX_FRAME_BYTES, PING_EVERY};
use tern_api::manager::VmState;
use tokio_tungstenite::tungstenite::protocol::CloseFrame as AgentClose;
use tokio_tungstenite::tungstenite::Message as AgentMessage;

use super::error::{ApiError, ApiResult};
use super::{App, AppState, NamePath, VmPath};

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new().route("/v1/vms/:name/console", get(console))
}

/// `GET /v1/vms/{name}/console` options.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// Send up to this many bytes of the end of the console log first (the agent sends
    /// at most 1 MiB).
    #[serde(default)]
    pub log: Option<u64>,
}

/// Whether a VM in `state` has a console to attach to (pure): its QEMU runs the guest.
pub fn attachable(state: VmState) -> bool {
    matches!(state, VmState::Running | VmState::Paused)
}

#[utoipa::path(get, path = "/v1/vms/{name}/console", operation_id = "vmConsole",
    summary = "Attach to a running or paused VM's serial console: a WebSocket carrying its bytes both ways in binary frames, relayed to its host's agent (one client at a time).",
    params(("name" = String, Path, description = "the VM's name", example = "v1"), ConsoleQuery),
    responses((status = 101, description = "switched to the WebSocket"),
        (status = 400, description = "not a WebSocket request, or a bad query", body = super::Error),
        (status = 404, description = "error", body = super::Error),
        (status = 409, description = "the VM is not running or paused, or a client is attached already", body = super::Error),
        (status = 502, description = "its host's agent could not be reached", body = super::Error)))]
async fn console(
    State(app): AppState,
    NamePath(name, _): VmPath,
    q: Result<Query<ConsoleQuery>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| ApiError::BadRequest(format!("query: {}", e.body_text())))?;
    let ws = ws.map_err(|e| {
        ApiError::BadRequest(format!(
            "this route is a WebSocket (`tern vm console`): {}",
            e.body_text()
        ))
    })?;
    let found = super::vm_state_and_host(&app, &name);
    let (state, host) = found.ok_or_else(|| crate::Error::UnknownVm(name.to_string()))?;
    let host = match (attachable(state), host) {
        (true, Some(h)) => h,
        _ => {
            return Err(crate::Error::Conflict(format!(
                "VM {name:?} is {}: a console is there while it is running or paused on a host",
                state.as_str()
            ))
            .into())
        }
    };
    let agents = app.manager.agents().ok_or_else(|| {
        ApiError::Unavailable("this manager runs no control loop to reach agents".into())
    })?;
    // Attached before the upgrade, so a refusal (the console is taken, the VM just
    // stopped) is an HTTP answer the client can show.
    let agent = agents.client(&host)?.console(name.as_str(), q.log).await?;
    Ok(ws
        .max_frame_size(MAX_FRAME_BYTES)
        .max_message_size(MAX_FRAME_BYTES)
        .on_upgrade(move |client| relay(client, agent)))
}

/// Copies frames between the client and the agent until either ends; the agent's close
/// reason (the VM's QEMU ended...) is passed on.
async fn relay(client: WebSocket, agent: ConsoleStream) {
    let (mut to_client, mut from_client) = client.split();
    let (mut to_agent, mut from_agent) = agent.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    let mut heard = tokio::time::Instant::now();
    let close = |reason: String| {
        Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::NORMAL,
            reason: reason.into(),
        }))
    };
    loop {
        tokio::select! {
            m = from_agent.next() => match m {
                Some(Ok(AgentMessage::Binary(b))) => {
                    if to_client.send(Message::Binary(b)).await.is_err() {
                        break;
                    }
                }
                Some(Ok(AgentMessage::Text(t))) => {
                    if to_client.send(Message::Binary(t.into_bytes())).await.is_err() {
                        break;
                    }
                }
                Some(Ok(AgentMessage::Close(frame))) => {
                    let reason = frame.map(|f| f.reason.into_owned()).unwrap_or_default();
                    let _ = to_client.send(close(reason)).await;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    let _ = to_client.send(close(format!("the host's agent: {e}"))).await;
                    break;
                }
                None => {
                    let _ = to_client.send(close("the host's agent closed the console".into())).await;
                    break;
                }
            },
            m = from_client.next() => {
                heard = tokio::time::Instant::now();
                let forward = match m {
                    Some(Ok(Message::Binary(b))) => AgentMessage::Binary(b),
                    Some(Ok(Message::Text(t))) => AgentMessage::Binary(t.into_bytes()),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        let _ = to_agent
                            .send(AgentMessage::Close(Some(AgentClose {
                                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                                reason: "detached".into(),
                            })))
                            .await;
                        break;
                    }
                };
                if to_agent.send(forward).await.is_err() {
                    let _ = to_client.send(close("the host's agent closed the console".into())).await;
                    break;
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() >= IDLE_TIMEOUT {
                    let _ = to_client.send(close("no answer from the client".into())).await;
                    break;
                }
                if to_client.send(Message::Ping(Vec::new())).await.is_err() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_running_or_paused_vm_has_a_console() {
        assert!(attachable(VmState::Running) && attachable(VmState::Paused));
        // Migrating: the agent's QEMUs change hands under it; the others have none.
        for s in [
            VmState::Pending,
            VmState::Migrating,
            VmState::Deleting,
            VmState::Unplaced,
            VmState::Stopped,
            VmState::Suspended,
        ] {
            assert!(!attachable(s), "{s:?}");
        }
    }
}
