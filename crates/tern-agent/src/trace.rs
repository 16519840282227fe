//! The trace route: `POST /v1/vms/{id}/trace` records the scheduler events of a running
//! VM's vCPU threads on this host for a bounded time and answers with the recording
//! (`tern_api::trace::VmTrace`); the caller builds timelines, summaries and Perfetto
//! files from it with `tern-trace`.
//!
//! A recording holds a blocking thread and one perf ring buffer per CPU for its whole
//! duration, so at most [`MAX_TRACES`] run at once, each keeps at most [`MAX_EVENTS`],
//! and one whose caller went away stops at its next read of the buffers.

use crate::api::{parse, Body, Id, VmId};
use crate::error::AgentError;
use crate::state::AppState;
use axum::extract::State;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tern_api::trace::{TraceRequest, VmTrace};
use tern_hv::{HvError, VmState};
use tern_model::VmName;
use tern_trace::{RecorderConfig, TraceError};

/// Most recordings one agent runs at once.
pub const MAX_TRACES: usize = 2;

/// Most events one recording keeps (an hour of two busy vCPUs is well below; past it the
/// answer's `dropped` counts what was not kept).
pub const MAX_EVENTS: usize = 2_000_000;

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
    let trace =
        tokio::task::spawn_blocking(move || tern_trace::record_until(&cfg, duration, &flag))
            .await
            .map_err(|e| AgentError::Io {
                context: "the recording thread".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
    Ok(VmTrace {
        vm: id,
        host: state.host.name.clone(),
        vcpu_threads: threads,
        trace,
        guest: None,
    })
}
