//! The REST API (axum), described by `docs/openapi.json`, which is served at
//! `/openapi.json` and tested against this router.
//!
//! Handlers only parse a request into a [`Command`] (or a read) and hand it to the
//! [`Manager`]; [`error`] maps every failure to a status and a JSON message. Every route
//! but `/openapi.json` needs `Authorization: Bearer TOKEN`.
//!
//! - [`error`]: errors as HTTP answers, the JSON body extractor.
//! - [`metrics`]: the Prometheus text.
//! - [`migrations`]: migration records with a running one's live telemetry.
//! - [`openapi`]: the OpenAPI document, generated from the handlers and the types.

pub mod error;
pub mod metrics;
pub mod migrations;
pub mod openapi;

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, LazyLock};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{self, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use tern_api::manager::{
    BalancePlan, CreateVm, HeartbeatReply, LeaseGrant, MigrateVm, MigrationView, Page, RegisterHost,
};

use crate::state::{Host, Vm};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

use crate::decide::{Command, LoadReport, Reply};
use crate::manager::Manager;
use crate::state::{BalancerSettings, Event};
use error::{ApiError, ApiResult, Body, ErrorBody as Error};

/// The OpenAPI document (`docs/openapi.json`), generated once.
pub static OPENAPI: LazyLock<String> = LazyLock::new(openapi::json);

/// Most events or migrations one list answer carries.
const MAX_PAGE: usize = 10_000;

struct App {
    manager: Arc<Manager>,
    tokens: Vec<String>,
    /// Flips to true at shutdown so open event streams end and the server can stop.
    stopping: watch::Receiver<bool>,
}

type AppState = State<Arc<App>>;

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    manager: Arc<Manager>,
    tokens: Vec<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stopping) = watch::channel(false);
    let app = router(manager, tokens, stopping.clone());
    let mut stopped = stopping;
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })
        .await
}

/// The API's routes; `stopping` ends open event streams. [`serve`] serves it alone,
/// [`crate::ha::forward`] behind a layer that passes requests to the leader.
pub fn router(
    manager: Arc<Manager>,
    tokens: Vec<String>,
    stopping: watch::Receiver<bool>,
) -> Router {
    let app = Arc::new(App {
        manager,
        tokens,
        stopping,
    });
    let secured = Router::new()
        .route("/v1/hosts", get(list_hosts).post(register_host))
        .route("/v1/hosts/:name", get(show_host))
        .route("/v1/hosts/:name/heartbeat", post(heartbeat))
        .route("/v1/hosts/:name/lease", post(renew_lease))
        .route("/v1/hosts/:name/drain", post(drain))
        .route("/v1/hosts/:name/activate", post(activate))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/:name", get(show_vm).delete(delete_vm))
        .route("/v1/vms/:name/migrate", post(migrate_vm))
        .route("/v1/migrations", get(migrations::list))
        .route("/v1/migrations/:id", get(migrations::show))
        .route("/v1/plan", get(plan))
        .route("/v1/balancer", get(get_settings).put(put_settings))
        .route("/v1/events", get(list_events))
        .route("/v1/events/stream", get(stream_events))
        .route("/metrics", get(metrics))
        .merge(crate::web::api_routes(&app.manager, app.stopping.clone()))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/openapi.json", get(openapi))
        .merge(secured)
        .merge(crate::web::page_routes())
        .fallback(|| async {
            ApiError::NotFound("no such route; /openapi.json lists the API".into())
        })
        .with_state(app)
}

async fn auth(State(app): AppState, req: Request, next: Next) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = match given.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(t) => t,
        None => {
            return ApiError::Unauthorized(
                "missing bearer token: send the header 'Authorization: Bearer TOKEN' with a \
                 token the manager was started with",
            )
            .into_response()
        }
    };
    if !app
        .tokens
        .iter()
        .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
    {
        return ApiError::Unauthorized("wrong bearer token").into_response();
    }
    next.run(req).await
}

/// Compares without stopping at the first differing byte, so timing does not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Runs a manager call off the async threads: it takes a lock and writes SQLite.
async fn call<T: Send + 'static>(
    app: &App,
    f: impl FnOnce(&Manager) -> crate::Result<T> + Send + 'static,
) -> ApiResult<T> {
    let m = app.manager.clone();
    tokio::task::spawn_blocking(move || f(&m))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(ApiError::from)
}

async fn execute(app: &App, cmd: Command) -> ApiResult<Reply> {
    call(app, move |m| m.execute(cmd)).await
}

/// The JSON of a reply.
fn reply(status: StatusCode, r: Reply) -> Response {
    match r {
        Reply::Host(h) => (status, Json(h)).into_response(),
        Reply::Heartbeat(h) => (status, Json(h)).into_response(),
        Reply::Vm(v) => (status, Json(v)).into_response(),
        Reply::Migration(m) => (status, Json(m)).into_response(),
        Reply::Settings(s) => (status, Json(s)).into_response(),
        Reply::Done => status.into_response(),
    }
}

#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", summary = "This document.",
    responses((status = 200, description = "the OpenAPI document", body = Object)))]
async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI.as_str(),
    )
}

#[utoipa::path(get, path = "/metrics", operation_id = "metrics",
    summary = "Gauges in Prometheus' text format.",
    responses((status = 200, description = "exposition text", body = String, content_type = "text/plain")))]
async fn metrics(State(app): AppState) -> impl IntoResponse {
    let text = app.manager.read(metrics::render);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

#[utoipa::path(post, path = "/v1/hosts", operation_id = "registerHost",
    summary = "Register a host (idempotent for the same address and capacity).",
    request_body(content = RegisterHost, example = json!({"name": "h3", "address": "http://198.18.0.4:7070", "capacity": {"cpus": 8, "memory_mib": 16384}})),
    responses((status = 201, description = "the host", body = Host), (status = 400, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
async fn register_host(State(app): AppState, Body(b): Body<RegisterHost>) -> ApiResult<Response> {
    let cmd = Command::RegisterHost {
        name: b.name.into_string(),
        address: b.address,
        capacity: b.capacity,
    };
    Ok(reply(StatusCode::CREATED, execute(&app, cmd).await?))
}

#[utoipa::path(get, path = "/v1/hosts", operation_id = "listHosts", summary = "All hosts.",
    responses((status = 200, description = "hosts", body = Vec<Host>)))]
async fn list_hosts(State(app): AppState) -> Response {
    Json(
        app.manager
            .read(|s| s.hosts.values().cloned().collect::<Vec<_>>()),
    )
    .into_response()
}

#[utoipa::path(get, path = "/v1/hosts/{name}", operation_id = "showHost", summary = "One host.",
    params(("name" = String, Path, description = "the host's name", example = "h1")),
    responses((status = 200, description = "the host", body = Host), (status = 404, description = "error", body = Error)))]
async fn show_host(State(app): AppState, Path(name): Path<String>) -> ApiResult<Response> {
    app.manager
        .read(|s| s.hosts.get(&name).cloned())
        .map(|h| Json(h).into_response())
        .ok_or_else(|| crate::Error::UnknownHost(name).into())
}

#[utoipa::path(post, path = "/v1/hosts/{name}/heartbeat", operation_id = "heartbeat",
    summary = "The agent's periodic load report.",
    params(("name" = String, Path, description = "the host's name", example = "h1")),
    request_body(content = LoadReport, example = json!({"cpu_used": 1.5, "vms": [{"name": "v1", "cpu_used": 1.0}]})),
    responses((status = 200, description = "VMs to destroy", body = HeartbeatReply), (status = 400, description = "error", body = Error), (status = 404, description = "error", body = Error)))]
async fn heartbeat(
    State(app): AppState,
    Path(host): Path<String>,
    Body(report): Body<LoadReport>,
) -> ApiResult<Response> {
    Ok(reply(
        StatusCode::OK,
        execute(&app, Command::Heartbeat { host, report }).await?,
    ))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/lease", operation_id = "renewLease",
    summary = "The agent renews its host's lease; a host that cannot stops its own guests before the lease runs out.",
    params(("name" = String, Path, description = "the host's name", example = "h1")),
    responses((status = 200, description = "the lease the host now holds", body = LeaseGrant), (status = 404, description = "error", body = Error)))]
async fn renew_lease(State(app): AppState, Path(host): Path<String>) -> ApiResult<Response> {
    let grant = call(&app, move |m| m.renew_lease(&host)).await?;
    Ok(Json(grant).into_response())
}

#[utoipa::path(post, path = "/v1/hosts/{name}/drain", operation_id = "drainHost",
    summary = "Put a host into maintenance; the manager evacuates its VMs.",
    params(("name" = String, Path, description = "the host's name", example = "h1")),
    responses((status = 200, description = "the host", body = Host), (status = 404, description = "error", body = Error)))]
async fn drain(State(app): AppState, Path(host): Path<String>) -> ApiResult<Response> {
    let cmd = Command::SetMaintenance { host, on: true };
    Ok(reply(StatusCode::OK, execute(&app, cmd).await?))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/activate", operation_id = "activateHost",
    summary = "Bring a host back from maintenance.",
    params(("name" = String, Path, description = "the host's name", example = "h1")),
    responses((status = 200, description = "the host", body = Host), (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
async fn activate(State(app): AppState, Path(host): Path<String>) -> ApiResult<Response> {
    let cmd = Command::SetMaintenance { host, on: false };
    Ok(reply(StatusCode::OK, execute(&app, cmd).await?))
}

#[utoipa::path(post, path = "/v1/vms", operation_id = "createVm",
    summary = "Create a VM, on a named host or placed automatically.",
    request_body(content = CreateVm, example = json!({"name": "v2", "spec": {"vcpus": 2, "memory_mib": 1024, "anti_affinity": "db"}})),
    responses((status = 201, description = "the VM, pending until its host runs it", body = Vm),
        (status = 400, description = "error", body = Error), (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
async fn create_vm(State(app): AppState, Body(b): Body<CreateVm>) -> ApiResult<Response> {
    let cmd = Command::CreateVm {
        name: b.name.into_string(),
        spec: b.spec,
        host: b.host.map(String::from),
    };
    Ok(reply(StatusCode::CREATED, execute(&app, cmd).await?))
}

#[utoipa::path(get, path = "/v1/vms", operation_id = "listVms", summary = "All VMs.",
    responses((status = 200, description = "VMs", body = Vec<Vm>)))]
async fn list_vms(State(app): AppState) -> Response {
    Json(
        app.manager
            .read(|s| s.vms.values().cloned().collect::<Vec<_>>()),
    )
    .into_response()
}

#[utoipa::path(get, path = "/v1/vms/{name}", operation_id = "showVm", summary = "One VM.",
    params(("name" = String, Path, description = "the VM's name", example = "v1")),
    responses((status = 200, description = "the VM", body = Vm), (status = 404, description = "error", body = Error)))]
async fn show_vm(State(app): AppState, Path(name): Path<String>) -> ApiResult<Response> {
    app.manager
        .read(|s| s.vms.get(&name).cloned())
        .map(|v| Json(v).into_response())
        .ok_or_else(|| crate::Error::UnknownVm(name).into())
}

#[utoipa::path(delete, path = "/v1/vms/{name}", operation_id = "deleteVm",
    summary = "Delete a VM; it is removed once its host confirms.",
    params(("name" = String, Path, description = "the VM's name", example = "v2")),
    responses((status = 202, description = "the VM, deleting", body = Vm), (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
async fn delete_vm(State(app): AppState, Path(name): Path<String>) -> ApiResult<Response> {
    Ok(reply(
        StatusCode::ACCEPTED,
        execute(&app, Command::DeleteVm { name }).await?,
    ))
}

#[utoipa::path(post, path = "/v1/vms/{name}/migrate", operation_id = "migrateVm",
    summary = "Live-migrate a running VM by hand.",
    params(("name" = String, Path, description = "the VM's name", example = "v1")),
    request_body(content = MigrateVm, example = json!({"to": "h2", "policy": "adaptive"})),
    responses((status = 202, description = "the migration, running", body = MigrationView),
        (status = 400, description = "error", body = Error), (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
async fn migrate_vm(
    State(app): AppState,
    Path(name): Path<String>,
    Body(b): Body<MigrateVm>,
) -> ApiResult<Response> {
    let cmd = Command::MigrateVm {
        name,
        to: b.to.map(String::from),
        policy: b.policy,
    };
    Ok(reply(StatusCode::ACCEPTED, execute(&app, cmd).await?))
}

/// A list's `limit`, checked against [`MAX_PAGE`].
fn limit(limit: usize) -> ApiResult<usize> {
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::BadRequest(format!(
            "limit must be 1 to {MAX_PAGE}, got {limit}"
        )));
    }
    Ok(limit)
}

/// Query strings are parsed here so a bad one gets the same JSON error as a bad body.
fn page(q: Result<Query<Page>, axum::extract::rejection::QueryRejection>) -> ApiResult<Page> {
    q.map(|Query(p)| p).map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; the query takes since=N and limit=N, whole numbers",
            e.body_text()
        ))
    })
}

/// What the balancer would do now; nothing is recorded.
#[utoipa::path(get, path = "/v1/plan", operation_id = "plan",
    summary = "A dry-run balancing plan: what the balancer would do now.",
    responses((status = 200, description = "the plan", body = BalancePlan)))]
async fn plan(State(app): AppState) -> ApiResult<Response> {
    let p = call(&app, |m| {
        let now = m.now();
        let started = std::time::Instant::now();
        let mut p = m.read(|s| crate::decide::balance::plan(s, now));
        p.planning_ms = Some(started.elapsed().as_secs_f64() * 1e3);
        Ok(p)
    })
    .await?;
    Ok(Json(p).into_response())
}

#[utoipa::path(get, path = "/v1/balancer", operation_id = "getBalancer",
    summary = "The balancer's settings.",
    responses((status = 200, description = "settings", body = BalancerSettings)))]
async fn get_settings(State(app): AppState) -> Response {
    Json(app.manager.read(|s| s.settings.clone())).into_response()
}

#[utoipa::path(put, path = "/v1/balancer", operation_id = "putBalancer",
    summary = "Replace the balancer's settings.",
    request_body(content = BalancerSettings, example = json!({"enabled": true, "dry_run": false, "aggressiveness": 4, "interval_s": 30,
        "cooldown_s": 300, "max_per_host": 1, "max_per_cluster": 8, "dead_after_s": 30, "smoothing_window": 5, "default_policy": "adaptive"})),
    responses((status = 200, description = "settings", body = BalancerSettings), (status = 400, description = "error", body = Error)))]
async fn put_settings(
    State(app): AppState,
    Body(s): Body<BalancerSettings>,
) -> ApiResult<Response> {
    Ok(reply(
        StatusCode::OK,
        execute(&app, Command::PutSettings(s)).await?,
    ))
}

#[utoipa::path(get, path = "/v1/events", operation_id = "listEvents",
    summary = "Events after a sequence number, oldest first.",
    params(("since" = Option<u64>, Query, description = "only events numbered above this", example = 0),
        ("limit" = Option<usize>, Query, description = "at most this many (1-10000)", example = 100)),
    responses((status = 200, description = "events", body = Vec<Event>), (status = 400, description = "error", body = Error)))]
async fn list_events(
    State(app): AppState,
    q: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let p = page(q)?;
    let (since, limit) = (p.since, limit(p.limit)?);
    Ok(Json(call(&app, move |m| m.events_since(since, limit)).await?).into_response())
}

/// Server-sent events: the stored events after `since`, then each new one as it commits.
#[utoipa::path(get, path = "/v1/events/stream", operation_id = "streamEvents",
    summary = "Server-sent events: those after since, then each new one.",
    params(("since" = Option<u64>, Query, description = "start after this sequence number", example = 0)),
    responses((status = 200, description = "an event stream; each message's data is an Event", body = String, content_type = "text/event-stream"),
        (status = 400, description = "error", body = Error)))]
async fn stream_events(
    State(app): AppState,
    q: Result<Query<Page>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let since = page(q)?.since;
    // Subscribe before reading the backlog so nothing falls between the two.
    let rx = app.manager.subscribe();
    let backlog = call(&app, move |m| m.events_since(since, MAX_PAGE)).await?;
    let last = backlog.last().map_or(since, |e| e.seq);
    let live = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => return Some((e, rx)),
                // A slow reader skips what it missed; it can fetch it with `since`.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .filter(move |e| std::future::ready(e.seq > last));
    let mut stopping = app.stopping.clone();
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    let stream = futures_util::stream::iter(backlog)
        .chain(live)
        .take_until(stop)
        .map(|e: Event| {
            Ok::<_, Infallible>(
                sse::Event::default()
                    .id(e.seq.to_string())
                    .json_data(&e)
                    .unwrap_or_default(),
            )
        });
    Ok(Sse::new(stream)
        .keep_alive(sse::KeepAlive::default())
        .into_response())
}
