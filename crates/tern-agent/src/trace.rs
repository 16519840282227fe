//! The trace route: `POST /v1/vms/{id}/trace` records the scheduler events of a running
//! VM's vCPU threads on this host for a bounded time and answers with the recording
//! (`tern_api::trace::VmTrace`); the caller builds timelines, summaries and Perfetto
//! files from it with `tern-trace`.
//!
//! A recording holds a blocking thread and one perf ring buffer per CPU for its whole
//! duration, so at most [`MAX_TRACES`] run at once, each keeps at most [`MAX_EVENTS`],
//! and one whose caller went away stops at its next read of the buffers.
//!
//! Unless the request says `host_only`, the guest's own scheduler events are recorded
//! at the same time by its `tern-guest` over the control channel: clock exchanges
//! before and after, `trace-start`, a `trace-read` every [`GUEST_READ_EVERY`] (the
//! guest buffers at most [`GUEST_BUFFER`] records and counts the rest as dropped), and
//! `trace-stop`. A guest whose host stops reading stops recording by itself.

use crate::api::{parse, Body, Id, VmId};
use crate::error::AgentError;
use crate::state::AppState;
use axum::extract::State;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_api::guest::{Command as GuestCommand, Reply};
use tern_api::trace::{GuestTrace, TraceRequest, VmTrace};
use tern_hv::{HvError, VmState};
use tern_model::VmName;
use tern_trace::clock::{align, Exchange};
use tern_trace::collect::GuestChunks;
use tern_trace::recorder::monotonic_ns;
use tern_trace::{RecorderConfig, TraceError};

/// Most recordings one agent runs at once.
pub const MAX_TRACES: usize = 2;

/// Most events one recording keeps (an hour of two busy vCPUs is well below; past it the
/// answer's `dropped` counts what was not kept).
pub const MAX_EVENTS: usize = 2_000_000;

/// How often the guest's buffer is read.
pub const GUEST_READ_EVERY: Duration = Duration::from_millis(50);
/// Most unread records the guest keeps (24 bytes each).
pub const GUEST_BUFFER: u64 = 1_000_000;
/// Clock exchanges before and after a guest recording.
pub const CLOCK_EXCHANGES: usize = 8;
/// A guest that has not been read for this long stops recording (the host went away).
const GUEST_IDLE_STOP_MS: u64 = 5_000;
/// Each guest call's limit.
const GUEST_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Reads after the window to empty the guest's buffer (each takes up to 32,768 records).
const MAX_FINAL_READS: usize = 64;

static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_TRACES);

/// The trace route, behind the token check.
pub fn routes(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/vms/:id/trace", post(trace_vm))
        .layer(middleware::from_fn_with_state(state, crate::api::auth))
}

#[utoipa::path(post, path = "/v1/vms/{id}/trace",
    summary = "record the scheduler events of a running VM's vCPU threads for duration_ms",
    params(Id), request_body = TraceRequest,
    responses((status = 200, description = "the recording", body = VmTrace)))]
async fn trace_vm(State(state): State<AppState>, VmId(id): VmId, Body(body): Body) -> Response {
    let req = parse::<TraceRequest>(&body)
        .and_then(|r| r.check().map(|()| r).map_err(AgentError::BadRequest));
    match req {
        Ok(req) => match execute(&state, id, req).await {
            Ok(v) => Json(v).into_response(),
            Err(e) => e.into_response(),
        },
        Err(e) => e.into_response(),
    }
}

/// Sets its flag when dropped: the request's future was dropped (the caller went away)
/// or finished, and the recording thread stops either way.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Records VM `id` for `req.duration_ms`.
pub async fn execute(
    state: &AppState,
    id: VmName,
    req: TraceRequest,
) -> Result<VmTrace, AgentError> {
    req.check().map_err(AgentError::BadRequest)?;
    let id = id.into_string();
    let info = state.hv.refresh(&id).await?;
    if state.hv.kind() != "qemu" {
        return Err(AgentError::BadRequest(format!(
            "VM {id:?} runs on the {} driver, which has no host threads to trace",
            state.hv.kind()
        )));
    }
    if info.state != VmState::Running {
        return Err(HvError::Conflict {
            id,
            action: "trace",
            state: info.state,
        }
        .into());
    }
    let threads = state.hv.vcpu_threads(&id).await?;
    let socket = match req.host_only {
        true => None,
        false => Some(info.control_socket.ok_or_else(|| AgentError::Guest {
            id: id.clone(),
            reason: "the VM has no guest channel; trace it with host_only".into(),
        })?),
    };
    let _slot = SLOTS
        .try_acquire()
        .map_err(|_| TraceError::Busy(MAX_TRACES))?;
    let cfg = RecorderConfig {
        max_events: MAX_EVENTS,
        ..RecorderConfig::new(threads.clone())
    };
    let stop = StopOnDrop(Arc::new(AtomicBool::new(false)));
    let flag = stop.0.clone();
    let duration = Duration::from_millis(req.duration_ms);
    let host = tokio::task::spawn_blocking(move || tern_trace::record_until(&cfg, duration, &flag));
    let guest = match &socket {
        Some(socket) => Some(record_guest(state, &id, socket, duration).await),
        None => None,
    };
    let trace = host.await.map_err(|e| AgentError::Io {
        context: "the recording thread".into(),
        source: std::io::Error::other(e.to_string()),
    })??;
    let guest = guest.transpose()?;
    Ok(VmTrace {
        vm: id,
        host: state.host.name.clone(),
        vcpu_threads: threads,
        trace,
        guest,
    })
}

/// One call to the guest agent, its reply or its refusal.
async fn call(
    state: &AppState,
    vm: &str,
    socket: &Path,
    cmd: GuestCommand,
) -> Result<Reply, AgentError> {
    state
        .guests
        .call(vm, socket, &cmd, GUEST_CALL_TIMEOUT)
        .await
}

/// `n` clock exchanges with the guest.
async fn exchanges(
    state: &AppState,
    vm: &str,
    socket: &Path,
    n: usize,
) -> Result<Vec<Exchange>, AgentError> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t1 = monotonic_ns();
        let reply = call(state, vm, socket, GuestCommand::Clock).await?;
        let t4 = monotonic_ns();
        if let Reply::Clock { recv_ns, send_ns } = reply {
            out.push(Exchange {
                t1,
                t2: recv_ns,
                t3: send_ns,
                t4,
            });
        }
    }
    Ok(out)
}

fn unexpected(vm: &str, what: &str, r: &Reply) -> AgentError {
    AgentError::Guest {
        id: vm.to_string(),
        reason: format!("answered {r:?} to {what}; is its tern-guest older than this agent?"),
    }
}

/// Whether VM `vm` still runs on this host.
async fn runs_here(state: &AppState, vm: &str) -> bool {
    matches!(state.hv.refresh(vm).await, Ok(i) if i.state == VmState::Running)
}

/// Records the guest's own scheduler events for `duration`, on the host's clock. A VM
/// that stops running here during the window (migrated away) ends the guest recording
/// early with what was read.
async fn record_guest(
    state: &AppState,
    vm: &str,
    socket: &Path,
    duration: Duration,
) -> Result<GuestTrace, AgentError> {
    let mut ex = exchanges(state, vm, socket, CLOCK_EXCHANGES).await?;
    let start = GuestCommand::TraceStart {
        max_records: GUEST_BUFFER,
        idle_stop_ms: GUEST_IDLE_STOP_MS,
    };
    let start_ns = match call(state, vm, socket, start).await? {
        Reply::TraceStarted { start_ns, .. } => start_ns,
        r => return Err(unexpected(vm, "trace-start", &r)),
    };
    let mut chunks = GuestChunks::new(start_ns);
    let bad_chunk = |e: tern_trace::packed::UnpackError| AgentError::Guest {
        id: vm.to_string(),
        reason: e.to_string(),
    };
    let deadline = Instant::now() + duration;
    let mut end_ns = start_ns;
    let (mut last_ns, mut gone) = (start_ns, false);
    let mut final_reads = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            tokio::time::sleep(left.min(GUEST_READ_EVERY)).await;
        }
        let read = GuestCommand::TraceRead {
            max_records: tern_api::guest::DEFAULT_TRACE_READ,
        };
        let chunk = match call(state, vm, socket, read).await {
            Ok(Reply::TraceChunk(c)) => c,
            Ok(r) => return Err(unexpected(vm, "trace-read", &r)),
            // Migrated away (or stopped) while recording: what was read is the trace
            // of its time here; the manager records the rest on its new host.
            Err(e) if !runs_here(state, vm).await => {
                tracing::info!(vm, error = %e, "the VM left while its guest was traced; keeping what was read");
                gone = true;
                break;
            }
            Err(e) => return Err(e),
        };
        last_ns = chunk.now_ns;
        chunks.add(&chunk).map_err(bad_chunk)?;
        if Instant::now() >= deadline {
            end_ns = end_ns.max(chunk.now_ns);
            final_reads += 1;
            if chunk.pending == 0 || final_reads >= MAX_FINAL_READS {
                break;
            }
        }
    }
    if gone {
        // No guest to stop or to exchange times with: the first exchanges align it.
        end_ns = last_ns;
    } else {
        call(state, vm, socket, GuestCommand::TraceStop).await?;
        ex.extend(exchanges(state, vm, socket, CLOCK_EXCHANGES).await?);
    }
    let alignment = align(&ex).ok_or_else(|| AgentError::Guest {
        id: vm.to_string(),
        reason: "no clock exchange succeeded".into(),
    })?;
    Ok(chunks.finish(end_ns, alignment))
}
