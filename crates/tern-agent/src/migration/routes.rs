//! The migration endpoints. Handlers parse into a [`MigrationCommand`]; [`execute`] runs
//! it; errors become responses through the agent's one error mapping.
//!
//! ```text
//! POST   /v1/migrations                 source: start sending a VM     body: SendRequest
//! GET    /v1/migrations                 source: every migration, with telemetry
//! GET    /v1/migrations/{id}            source: phase, rounds, the round under way, result
//! POST   /v1/migrations/{id}/cancel     source: stop; the VM stays here
//! POST   /v1/incoming                   destination: prepare           body: PrepareRequest
//! GET    /v1/incoming/{id}              destination: progress
//! POST   /v1/incoming/{id}/resume       destination: run the VM here
//! POST   /v1/incoming/{id}/thaw         destination: thaw the guest the migration froze
//! DELETE /v1/incoming/{id}              destination: abandon, destroy the waiting VM
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::Value;
use tern_hv::{HvError, VmState};

use super::session::{
    engine, Engine, IncomingView, MigrationView, Outbound, PrepareRequest, Registry, SendRequest,
    Ticket,
};
use super::{dest, source};
use crate::api::{parse, Body, Caller, Id};
use crate::error::AgentError;
use crate::state::AppState;

/// One migration request, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum MigrationCommand {
    Send(SendRequest, Engine),
    List,
    Show(String),
    Cancel(String),
    /// Prepare, for the source host whose certificate called (`None`: the manager, an
    /// operator, or an agent without host identity).
    Prepare(PrepareRequest, Option<String>),
    ShowIncoming(String),
    /// Resume; `true`: thaw the guest as soon as it runs here.
    Resume(String, bool),
    Thaw(String),
    Abort(String),
}

/// Checks a send request without touching anything (pure).
pub fn parse_send(body: &[u8]) -> Result<MigrationCommand, AgentError> {
    let req: SendRequest = parse(body)?;
    let engine = engine(req.policy, &req.options).map_err(AgentError::BadRequest)?;
    req.options.validate().map_err(AgentError::BadRequest)?;
    let url = reqwest::Url::parse(&req.destination)
        .map_err(|e| AgentError::BadRequest(format!("destination {:?} is not a URL ({e}): give the destination agent's address, e.g. http://198.18.0.2:7070", req.destination)))?;
    if url.host_str().is_none() || !matches!(url.scheme(), "http" | "https") {
        return Err(AgentError::BadRequest(format!(
            "destination {:?} must be an http(s) URL with a host",
            req.destination
        )));
    }
    Ok(MigrationCommand::Send(req, engine))
}

fn outbound(reg: &Registry, id: &str) -> Result<Arc<Outbound>, AgentError> {
    let all = reg.outbound.lock().expect("registry lock");
    all.get(id)
        .cloned()
        .ok_or_else(|| AgentError::Hv(HvError::UnknownVm(format!("migration {id}"))))
}

/// Runs a command; returns the status and JSON body of its answer.
pub async fn execute(
    state: &AppState,
    reg: &Arc<Registry>,
    cmd: MigrationCommand,
) -> Result<(StatusCode, Value), AgentError> {
    match cmd {
        MigrationCommand::Send(req, engine) => {
            // Held until the migration is registered: a lifecycle action waits, then sees it.
            let _gate = state.lifecycle.lock().await;
            state.refuse_if_busy(req.vm.as_str(), "migrate")?;
            let info = state.hv.info(req.vm.as_str()).await?;
            if info.state != VmState::Running {
                return Err(AgentError::Hv(HvError::Conflict {
                    id: req.vm.to_string(),
                    action: "migrate",
                    state: info.state,
                }));
            }
            let id = reg.new_id("mig");
            let job = Arc::new(Outbound::new(MigrationView::new(
                &id,
                req.vm.as_str(),
                &req.destination,
                engine,
            )));
            reg.begin_outbound(&id, job.clone()).map_err(|_| {
                AgentError::Hv(HvError::Conflict {
                    id: req.vm.to_string(),
                    action: "start a second migration of",
                    state: info.state,
                })
            })?;
            tokio::spawn(source::run(state.clone(), job.clone(), req, engine));
            Ok((StatusCode::ACCEPTED, json(&job.snapshot())))
        }
        MigrationCommand::List => {
            let all: Vec<MigrationView> = reg
                .outbound
                .lock()
                .expect("registry lock")
                .values()
                .map(|j| j.snapshot())
                .collect();
            Ok((StatusCode::OK, json(&all)))
        }
        MigrationCommand::Show(id) => Ok((StatusCode::OK, json(&outbound(reg, &id)?.snapshot()))),
        MigrationCommand::Cancel(id) => {
            let job = outbound(reg, &id)?;
            job.cancel.store(true, Ordering::SeqCst);
            Ok((StatusCode::ACCEPTED, json(&job.snapshot())))
        }
        MigrationCommand::Prepare(req, source) => Ok((
            StatusCode::CREATED,
            json(&dest::prepare(state, reg, req, source).await?),
        )),
        MigrationCommand::ShowIncoming(id) => Ok((StatusCode::OK, json(&dest::show(reg, &id)?))),
        MigrationCommand::Resume(id, thaw) => Ok((
            StatusCode::OK,
            json(&dest::resume(state, reg, &id, thaw).await?),
        )),
        MigrationCommand::Thaw(id) => {
            Ok((StatusCode::OK, json(&dest::thaw(state, reg, &id).await?)))
        }
        MigrationCommand::Abort(id) => {
            Ok((StatusCode::OK, json(&dest::abort(state, reg, &id).await?)))
        }
    }
}

fn json<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).expect("API values serialise")
}

/// The migration routes, behind the same credentials as the rest of the agent; with
/// host identities a source host may also call the destination's routes, for the
/// migrations it prepared. The agent's router merges them.
pub fn routes(state: AppState) -> Router<AppState> {
    let reg = state.migrations.clone();
    let source = Router::new()
        .route("/v1/migrations", get(list).post(send))
        .route("/v1/migrations/:id", get(show))
        .route("/v1/migrations/:id/cancel", post(cancel))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::api::auth,
        ));
    let destination = Router::new()
        .route("/v1/incoming", post(prepare))
        .route("/v1/incoming/:id", get(show_incoming).delete(abort))
        .route("/v1/incoming/:id/resume", post(resume))
        .route("/v1/incoming/:id/thaw", post(thaw))
        .layer(middleware::from_fn_with_state(
            state,
            crate::api::auth_peers,
        ));
    source.merge(destination).layer(Extension(reg))
}

/// A host may act only on the incoming migrations it prepared itself (pure but for the
/// registry read): another host's certificate cannot resume or abort them.
fn owned_by_caller(reg: &Registry, id: &str, caller: &Caller) -> Result<(), AgentError> {
    let Some(host) = caller.host() else {
        return Ok(());
    };
    let owner = dest::source_of(reg, id)?;
    if owner.as_deref() != Some(host) {
        return Err(AgentError::Forbidden(format!(
            "host {host:?} did not prepare incoming migration {id}: only its source host, \
             the manager or an operator may act on it"
        )));
    }
    Ok(())
}

#[utoipa::path(get, path = "/v1/migrations", summary = "source: every migration, with telemetry",
    responses((status = 200, description = "ok", body = Vec<MigrationView>)))]
async fn list(s: State<AppState>, r: Extension<Arc<Registry>>) -> Response {
    run(s, r, MigrationCommand::List).await
}

#[utoipa::path(post, path = "/v1/migrations", summary = "source: start sending a VM",
    request_body = SendRequest,
    responses((status = 202, description = "started", body = MigrationView)))]
async fn send(s: State<AppState>, r: Extension<Arc<Registry>>, Body(body): Body) -> Response {
    parsed(s, r, parse_send(&body)).await
}

#[utoipa::path(get, path = "/v1/migrations/{id}",
    summary = "source: phase, rounds, the round under way, result", params(Id),
    responses((status = 200, description = "ok", body = MigrationView)))]
async fn show(s: State<AppState>, r: Extension<Arc<Registry>>, Path(id): Path<String>) -> Response {
    run(s, r, MigrationCommand::Show(id)).await
}

#[utoipa::path(post, path = "/v1/migrations/{id}/cancel", summary = "source: stop; the VM stays here",
    params(Id), responses((status = 202, description = "cancelling", body = MigrationView)))]
async fn cancel(
    s: State<AppState>,
    r: Extension<Arc<Registry>>,
    Path(id): Path<String>,
) -> Response {
    run(s, r, MigrationCommand::Cancel(id)).await
}

#[utoipa::path(post, path = "/v1/incoming", summary = "destination: prepare to receive a VM",
    request_body = PrepareRequest,
    responses((status = 201, description = "where to send memory and device state", body = Ticket)))]
async fn prepare(
    s: State<AppState>,
    r: Extension<Arc<Registry>>,
    caller: Caller,
    Body(body): Body,
) -> Response {
    let source = caller.host().map(str::to_owned);
    let cmd = parse::<PrepareRequest>(&body).map(|req| MigrationCommand::Prepare(req, source));
    parsed(s, r, cmd).await
}

#[utoipa::path(get, path = "/v1/incoming/{id}", summary = "destination: progress", params(Id),
    responses((status = 200, description = "ok", body = IncomingView)))]
async fn show_incoming(
    s: State<AppState>,
    r: Extension<Arc<Registry>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Response {
    let cmd = owned_by_caller(&r, &id, &caller).map(|()| MigrationCommand::ShowIncoming(id));
    parsed(s, r, cmd).await
}

#[utoipa::path(delete, path = "/v1/incoming/{id}",
    summary = "destination: abandon, destroy the waiting VM", params(Id),
    responses((status = 200, description = "ok", body = IncomingView)))]
async fn abort(
    s: State<AppState>,
    r: Extension<Arc<Registry>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Response {
    let cmd = owned_by_caller(&r, &id, &caller).map(|()| MigrationCommand::Abort(id));
    parsed(s, r, cmd).await
}

/// `POST /v1/incoming/{id}/resume` options.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ResumeQuery {
    /// `true`: thaw the guest (a `dependency-aware` migration froze it) as soon as it
    /// runs here; `POST .../thaw` then answers with how that went.
    #[serde(default)]
    pub thaw: bool,
}

#[utoipa::path(post, path = "/v1/incoming/{id}/resume", summary = "destination: run the VM here",
    params(Id, ResumeQuery), responses((status = 200, description = "ok", body = IncomingView)))]
async fn resume(
    s: State<AppState>,
    r: Extension<Arc<Registry>>,
    caller: Caller,
    Path(id): Path<String>,
    q: Result<axum::extract::Query<ResumeQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let cmd = match q {
        Ok(q) => owned_by_caller(&r, &id, &caller).map(|()| MigrationCommand::Resume(id, q.0.thaw)),
        Err(e) => Err(AgentError::BadRequest(format!(
            "query: {}; resume takes only thaw=true or thaw=false",
            e.body_text()
        ))),
    };
    parsed(s, r, cmd).await
}

#[utoipa::path(post, path = "/v1/incoming/{id}/thaw",
    summary = "destination: thaw the guest a dependency-aware migration froze, once the VM runs here",
    params(Id),
    responses((status = 200, description = "the guest's account of the freeze", body = tern_api::guest::ThawReport)))]
async fn thaw(
    s: State<AppState>,
    r: Extension<Arc<Registry>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Response {
    let cmd = owned_by_caller(&r, &id, &caller).map(|()| MigrationCommand::Thaw(id));
    parsed(s, r, cmd).await
}

async fn parsed(
    s: State<AppState>,
    r: Extension<Arc<Registry>>,
    cmd: Result<MigrationCommand, AgentError>,
) -> Response {
    match cmd {
        Ok(cmd) => run(s, r, cmd).await,
        Err(e) => e.into_response(),
    }
}

async fn run(
    State(state): State<AppState>,
    Extension(reg): Extension<Arc<Registry>>,
    cmd: MigrationCommand,
) -> Response {
    match execute(&state, &reg, cmd).await {
        Ok((status, body)) => (status, Json(body)).into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_migrate::PolicyKind;

    #[test]
    fn send_requests_are_checked_before_anything_happens() {
        let ok =
            br#"{"vm":"v1","destination":"http://198.18.0.2:7070","token":"t","policy":"xen"}"#;
        assert!(matches!(
            parse_send(ok),
            Ok(MigrationCommand::Send(_, Engine::Tern(PolicyKind::Xen)))
        ));
        let bad_policy = br#"{"vm":"v1","destination":"http://h:1","token":"t","policy":"fast"}"#;
        assert!(parse_send(bad_policy)
            .unwrap_err()
            .to_string()
            .contains("unknown migration policy"));
        let bad_url = br#"{"vm":"v1","destination":"198.18.0.2","token":"t"}"#;
        assert!(parse_send(bad_url)
            .unwrap_err()
            .to_string()
            .contains("http://"));
        let bad_opts =
            br#"{"vm":"v1","destination":"http://h:1","token":"t","options":{"streams":99}}"#;
        assert_eq!(
            parse_send(bad_opts).unwrap_err().status(),
            StatusCode::BAD_REQUEST
        );
    }
}
