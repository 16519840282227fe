//! The REST API (axum), described by `docs/openapi.json`, which is served at
//! `/openapi.json` and tested against this router.
//!
//! Handlers only parse a request into a [`Command`] (or a read) and hand it to the
//! [`Manager`]; [`error`] maps every failure to a status and a JSON message. Every route
//! but `/openapi.json`, `POST /v1/join` (which takes a one-time join token),
//! `GET /v1/ca/crl` (any client certificate of the CA, or the token) and
//! `POST /v1/hosts/{name}/lease` needs `Authorization: Bearer TOKEN`, and over TLS
//! refuses a caller showing a host's certificate: a host is not an API user.
//!
//! With a cluster CA ([`Serving::ca`]) hosts enrol through `POST /v1/join`, and a host
//! registered by hand must be enrolled and at an `https://` address. Over TLS a lease
//! is renewed only with the certificate of the host it belongs to ([`lease_caller`]);
//! over plain HTTP (a loopback lab) with the bearer token.
//!
//! - [`error`]: errors as HTTP answers, the JSON body extractor.
//! - [`metrics`]: the Prometheus text.
//! - [`migrations`]: migration records with a running one's live telemetry.
//! - [`openapi`]: the OpenAPI document, generated from the handlers and the types.

mod catalog;
mod console;
pub mod error;
mod lifecycle;
pub mod metrics;
pub mod migrations;
pub mod openapi;

use std::convert::Infallible;
use std::future::Future;
use std::sync::{Arc, LazyLock};

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{self, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use tern_api::health::HaPolicySetting;
use tern_api::manager::MigrationPolicySetting;
use tern_api::manager::{
    BalancePlan, CreateVm, HeartbeatReply, JoinReply, JoinRequest, LeaseGrant, MigrateVm,
    MigrationView, Page, RegisterHost,
};
use tern_api::vcpu::VcpuPolicySetting;
use tern_pki::{Ca, Role, Secure, Trust};

use crate::state::{Host, Vm};
use tern_model::{HostName, VmName};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

use crate::decide::{Command, LoadReport, Reply};
use crate::manager::Manager;
use crate::state::{BalancerSettings, Event};
use error::{ApiError, ApiResult, Body, ErrorBody as Error};

/// The OpenAPI document (`docs/openapi.json`), generated once.
pub static OPENAPI: LazyLock<String> = LazyLock::new(openapi::json);

/// Largest request body read (a layer on the router); the largest real one, a VM
/// spec or the balancer's settings, is well under a KiB.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// Most events or migrations one list answer carries.
const MAX_PAGE: usize = 10_000;

struct App {
    manager: Arc<Manager>,
    tokens: Vec<String>,
    /// The cluster CA, when hosts enrol and the manager talks to them over mutual TLS.
    ca: Option<Arc<Ca>>,
    /// The CA and revocation list every TLS link of this manager checks peers against;
    /// given the new list as soon as this manager revokes.
    trust: Option<Arc<Trust>>,
    /// Flips to true at shutdown so open event streams end and the server can stop.
    stopping: watch::Receiver<bool>,
}

type AppState = State<Arc<App>>;

/// How the API is served: over TLS with a certificate from the cluster CA, or plain
/// HTTP (loopback only, which the command line enforces); the limits either way.
#[derive(Clone, Default)]
pub struct Serving {
    pub tls: Option<tern_pki::TlsAcceptor>,
    pub limits: tern_pki::Limits,
    /// The cluster CA: hosts join with tokens it issued, and must be enrolled.
    pub ca: Option<Arc<Ca>>,
    /// What this manager's TLS configurations check peers against; with `ca`, its
    /// revocation list is replaced when this manager revokes and re-read from the CA
    /// directory every `crl_refresh` (revocations by other processes).
    pub trust: Option<Arc<Trust>>,
    /// How often to re-read the CA directory's revocation list [default:
    /// [`CRL_REFRESH`]].
    pub crl_refresh: Option<std::time::Duration>,
}

/// How often a manager re-reads its CA directory's revocation list by default.
pub const CRL_REFRESH: std::time::Duration = std::time::Duration::from_secs(10);

/// Marks a lease renewal a follower passes to the leader: the host whose certificate
/// the follower checked. Believed only from a caller showing a manager's certificate.
pub const LEASE_HOST: &str = "x-tern-lease-host";

/// Every `every` until `stop`: the CA directory's revocation list into `trust`, so
/// revocations made by another process (`tern ca revoke`, another manager) reach this
/// one's TLS links.
pub async fn keep_crl_fresh(
    ca: Arc<Ca>,
    trust: Arc<Trust>,
    every: std::time::Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        reload_crl(&ca, &trust).await;
    }
}

/// Gives `trust` the CA directory's revocation list; a failure is logged and the list
/// held is kept.
async fn reload_crl(ca: &Arc<Ca>, trust: &Arc<Trust>) {
    let (ca, trust) = (ca.clone(), trust.clone());
    let done = tokio::task::spawn_blocking(move || trust.set_crl(&ca.crl_pem()?)).await;
    match done {
        Ok(Ok(true)) => tracing::info!("revocation list reloaded"),
        Ok(Ok(false)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the CA directory's revocation list was not taken")
        }
        Err(e) => tracing::warn!(error = %e, "reloading the revocation list"),
    }
}

/// Serves the API on `listener` (plain HTTP, default limits) until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    manager: Arc<Manager>,
    tokens: Vec<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, manager, tokens, Serving::default(), shutdown).await
}

/// Serves the API on `listener` as `serving` says until `shutdown` completes.
pub async fn serve_with(
    listener: TcpListener,
    manager: Arc<Manager>,
    tokens: Vec<String>,
    serving: Serving,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stopping) = watch::channel(false);
    if let (Some(ca), Some(trust)) = (&serving.ca, &serving.trust) {
        let every = serving.crl_refresh.unwrap_or(CRL_REFRESH);
        let fresh = keep_crl_fresh(ca.clone(), trust.clone(), every, stopping.clone());
        tokio::spawn(fresh);
    }
    let app = router_with_ca(manager, tokens, stopping.clone(), serving.ca, serving.trust);
    let mut stopped = stopping;
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    tern_pki::serve::serve(listener, app, serving.tls, serving.limits, async move {
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
    router_with_ca(manager, tokens, stopping, None, None)
}

/// [`router`] with the cluster CA that hosts enrol with and the trust to give a new
/// revocation list when this manager revokes.
pub fn router_with_ca(
    manager: Arc<Manager>,
    tokens: Vec<String>,
    stopping: watch::Receiver<bool>,
    ca: Option<Arc<Ca>>,
    trust: Option<Arc<Trust>>,
) -> Router {
    let app = Arc::new(App {
        manager,
        tokens,
        ca,
        trust,
        stopping,
    });
    let secured = Router::new()
        .route("/v1/hosts", get(list_hosts).post(register_host))
        .route("/v1/hosts/:name", get(show_host).delete(remove_host))
        .route("/v1/hosts/:name/heartbeat", post(heartbeat))
        .route("/v1/hosts/:name/drain", post(drain))
        .route("/v1/hosts/:name/activate", post(activate))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/:name", get(show_vm).delete(delete_vm))
        .route("/v1/vms/:name/migrate", post(migrate_vm))
        .route("/v1/vms/:name/trace", post(trace_vm))
        .route(
            "/v1/vms/:name/vcpu-policy",
            get(show_vcpu_policy).put(set_vcpu_policy),
        )
        .route(
            "/v1/vms/:name/ha-policy",
            get(show_ha_policy).put(set_ha_policy),
        )
        .route(
            "/v1/vms/:name/migration-policy",
            get(show_migration_policy).put(set_migration_policy),
        )
        .route("/v1/vms/:name/taint", get(taint_vm))
        .route("/v1/migrations", get(migrations::list))
        .route("/v1/migrations/:id", get(migrations::show))
        .route("/v1/plan", get(plan))
        .route("/v1/balancer", get(get_settings).put(put_settings))
        .route("/v1/events", get(list_events))
        .route("/v1/events/stream", get(stream_events))
        .route("/metrics", get(metrics))
        .merge(crate::web::api_routes(&app.manager, app.stopping.clone()))
        .merge(catalog::secured_routes())
        .merge(lifecycle::routes())
        .merge(console::routes())
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/openapi.json", get(openapi))
        .route("/v1/join", post(join))
        .route("/v1/ca/crl", get(crl))
        .route("/v1/hosts/:name/lease", post(renew_lease))
        .merge(catalog::file_routes())
        .merge(secured)
        .merge(crate::web::page_routes())
        .fallback(|| async {
            ApiError::NotFound("no such route; /openapi.json lists the API".into())
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(app)
}

async fn auth(State(app): AppState, req: Request, next: Next) -> Response {
    let checked = check_token(&app.tokens, req.headers())
        .and_then(|()| not_a_host(req.extensions().get::<Secure>()));
    match checked {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// Refuses a user request from a caller showing a host's certificate (pure): a host
/// renews its lease and fetches revocations, nothing else; a host that holds a token
/// as well must not act as a user with it.
pub(crate) fn not_a_host(secure: Option<&Secure>) -> ApiResult<()> {
    match secure.and_then(|s| s.peer.as_ref()) {
        Some(p) if p.role == Role::Host => Err(ApiError::Forbidden(format!(
            "host certificate {:?} is not an API user's credential: call the API with a \
             bearer token and no host certificate (an operator's certificate from `tern ca \
             issue` is fine)",
            p.name
        ))),
        _ => Ok(()),
    }
}

/// Who may read the revocation list (pure): any caller whose client certificate the CA
/// issued (hosts fetch it to refuse revoked peers), or one with the bearer token.
pub fn crl_caller(
    tokens: &[String],
    secure: Option<&Secure>,
    headers: &header::HeaderMap,
) -> ApiResult<()> {
    match secure.and_then(|s| s.peer.as_ref()) {
        Some(_) => Ok(()),
        None => check_token(tokens, headers),
    }
}

/// Who may renew host `name`'s lease (pure). Over TLS: the host itself, by its
/// certificate, or a manager passing on a renewal it checked so ([`LEASE_HOST`]); the
/// bearer token counts for nothing. Over plain HTTP (loopback labs without a CA): the
/// bearer token.
pub fn lease_caller(
    tokens: &[String],
    secure: Option<&Secure>,
    headers: &header::HeaderMap,
    name: &str,
) -> ApiResult<()> {
    let Some(secure) = secure else {
        return check_token(tokens, headers);
    };
    let passed_on = headers.get(LEASE_HOST).and_then(|v| v.to_str().ok());
    match &secure.peer {
        Some(p) if p.is_host(name) => Ok(()),
        Some(p) if p.role == Role::Manager && passed_on == Some(name) => Ok(()),
        Some(p) => Err(ApiError::Forbidden(format!(
            "{} certificate {:?} may not renew the lease of host {name:?}: only that \
             host's own certificate may",
            p.role.as_str(),
            p.name
        ))),
        None => Err(ApiError::Unauthorized(
            "a lease is renewed over TLS with the host's own certificate (the agent's \
             --tls-dir or the identity `tern agent --join` made); a bearer token is not \
             enough",
        )),
    }
}

/// Checks `Authorization: Bearer TOKEN` against the tokens the manager was started with
/// (pure): the API's own check, and a follower's before it reads a body to pass on.
pub(crate) fn check_token(tokens: &[String], headers: &header::HeaderMap) -> ApiResult<()> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(token) = given.and_then(|v| v.strip_prefix("Bearer ")) else {
        return Err(ApiError::Unauthorized(
            "missing bearer token: send the header 'Authorization: Bearer TOKEN' with a \
             token the manager was started with",
        ));
    };
    if !tokens
        .iter()
        .any(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
    {
        return Err(ApiError::Unauthorized("wrong bearer token"));
    }
    Ok(())
}

/// Compares without stopping at the first differing byte, so timing does not reveal how
/// much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A `{name}` path parameter checked against the naming rule of `N` before the
/// handler sees it: a 400 naming what is wrong, not a lookup of a name that cannot exist.
pub struct NamePath<N>(pub String, std::marker::PhantomData<N>);

/// The `{name}` of a host route.
pub type HostPath = NamePath<HostName>;
/// The `{name}` of a VM route.
pub type VmPath = NamePath<VmName>;

#[axum::async_trait]
impl<S, N> axum::extract::FromRequestParts<S> for NamePath<N>
where
    S: Send + Sync,
    N: std::str::FromStr<Err = tern_model::NameError>,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> ApiResult<Self> {
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("name in the path: {}", e.body_text())))?;
        name.parse::<N>().map_err(crate::Error::BadName)?;
        Ok(NamePath(name, std::marker::PhantomData))
    }
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
        Reply::Image(i) => (status, Json(i)).into_response(),
        Reply::Template(t) => (status, Json(t)).into_response(),
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
    if let Some(ca) = &app.ca {
        enrolled(ca, b.name.as_str(), &b.address)?;
    }
    let cmd = Command::RegisterHost {
        name: b.name.into_string(),
        address: b.address,
        capacity: b.capacity,
    };
    Ok(reply(StatusCode::CREATED, execute(&app, cmd).await?))
}

#[utoipa::path(delete, path = "/v1/hosts/{name}", operation_id = "removeHost",
    summary = "Remove an empty host and revoke its certificates.",
    params(("name" = String, Path, description = "the host's name", example = "h3")),
    responses((status = 200, description = "the host as it was", body = Host), (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
async fn remove_host(State(app): AppState, Path(name): Path<String>) -> ApiResult<Response> {
    let cmd = Command::RemoveHost { host: name.clone() };
    let r = execute(&app, cmd).await?;
    if let Some(ca) = app.ca.clone() {
        // Revoked after the removal is committed: a host still listed keeps working.
        let ca2 = ca.clone();
        tokio::task::spawn_blocking(move || ca2.revoke(&name))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Internal(format!("the host is removed but revoking its certificate failed: {e}; run `tern ca revoke`")))?;
        // This manager's own links refuse the host from the next handshake on.
        if let Some(trust) = &app.trust {
            reload_crl(&ca, trust).await;
        }
    }
    Ok(reply(StatusCode::OK, r))
}

/// With a cluster CA the manager talks only to enrolled hosts over mutual TLS, so a host
/// registered by hand must hold an unrevoked certificate for its name and be at an
/// `https://` address: registering any address would otherwise make the manager call it.
fn enrolled(ca: &Ca, name: &str, address: &str) -> ApiResult<()> {
    if !address.starts_with("https://") {
        return Err(ApiError::BadRequest(format!(
            "address {address:?}: this manager talks to agents only over https:// (mutual \
             TLS with the cluster CA); enrol the host with `tern agent --join`"
        )));
    }
    let ledger = ca.ledger().map_err(|e| ApiError::Internal(e.to_string()))?;
    if !ledger
        .iter()
        .any(|i| i.name == name && i.role == Role::Host && i.revoked_at.is_none())
    {
        return Err(ApiError::BadRequest(format!(
            "host {name:?} is not enrolled with the cluster CA: start its agent with \
             `tern agent --join MANAGER_URL --join-token-file FILE` (a token from \
             `tern ca join-token`)"
        )));
    }
    Ok(())
}

/// The IP address in an agent URL `https://IP:PORT`, which goes into its certificate.
fn https_ip(address: &str) -> ApiResult<std::net::IpAddr> {
    let bad = || {
        ApiError::BadRequest(format!(
            "address {address:?}: give the agent's URL as https://IP:PORT, e.g. \
             https://198.18.0.2:7070"
        ))
    };
    let rest = address.strip_prefix("https://").ok_or_else(bad)?;
    let hostport = rest.trim_end_matches('/');
    hostport
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip())
        .map_err(|_| bad())
}

#[utoipa::path(post, path = "/v1/join", operation_id = "join",
    summary = "Enrol a host with a one-time join token: sign its key's certificate request and register it.",
    request_body(content = JoinRequest),
    responses((status = 201, description = "the host's certificate", body = JoinReply), (status = 400, description = "error", body = Error), (status = 401, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
async fn join(State(app): AppState, Body(b): Body<JoinRequest>) -> ApiResult<Response> {
    let Some(ca) = app.ca.clone() else {
        return Err(ApiError::Manager(crate::Error::Conflict(
            "this manager has no cluster CA; start it with --ca DIR to let hosts join".into(),
        )));
    };
    let ip = https_ip(&b.address)?;
    if app.manager.read(|s| s.hosts.contains_key(b.name.as_str())) {
        return Err(ApiError::Manager(crate::Error::Conflict(format!(
            "host {:?} is already registered; remove it first (`tern host remove`)",
            b.name.as_str()
        ))));
    }
    let (name, csr) = (b.name.as_str().to_owned(), b.csr_pem.clone());
    let ca2 = ca.clone();
    let signed = tokio::task::spawn_blocking(move || -> Result<(String, String), ApiError> {
        ca2.redeem_join_token(&b.token).map_err(|_| {
            ApiError::Unauthorized("join token refused: unknown, used, expired or wrong")
        })?;
        let cert = ca2
            .sign_csr(&csr, Role::Host, &name, &[ip])
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        let crl = ca2
            .crl_pem()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok((cert, crl))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let cmd = Command::RegisterHost {
        name: b.name.into_string(),
        address: b.address,
        capacity: b.capacity,
    };
    execute(&app, cmd).await?;
    let (cert_pem, crl_pem) = signed;
    Ok((
        StatusCode::CREATED,
        Json(JoinReply {
            cert_pem,
            ca_pem: ca.cert_pem().to_owned(),
            crl_pem,
        }),
    )
        .into_response())
}

#[utoipa::path(get, path = "/v1/ca/crl", operation_id = "crl",
    summary = "The cluster CA's certificate revocation list (PEM, signed by the CA); agents fetch it with their certificate to refuse revoked peers. Takes a client certificate of the CA or the bearer token.",
    responses((status = 200, description = "the PEM revocation list", body = String, content_type = "application/x-pem-file"), (status = 404, description = "error", body = Error)))]
async fn crl(State(app): AppState, req: Request) -> ApiResult<Response> {
    crl_caller(&app.tokens, req.extensions().get(), req.headers())?;
    let Some(ca) = app.ca.clone() else {
        return Err(ApiError::NotFound(
            "this manager has no cluster CA (start it with --ca DIR)".into(),
        ));
    };
    let pem = ca
        .crl_pem()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "application/x-pem-file")], pem).into_response())
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
async fn show_host(State(app): AppState, NamePath(name, _): HostPath) -> ApiResult<Response> {
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
    NamePath(host, _): HostPath,
    Body(report): Body<LoadReport>,
) -> ApiResult<Response> {
    Ok(reply(
        StatusCode::OK,
        execute(&app, Command::Heartbeat { host, report }).await?,
    ))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/lease", operation_id = "renewLease",
    summary = "The agent renews its host's lease; a host that cannot stops its own guests before the lease runs out. Over TLS only with that host's own certificate; over plain HTTP with the bearer token.",
    params(("name" = String, Path, description = "the host's name", example = "h1")),
    responses((status = 200, description = "the lease the host now holds", body = LeaseGrant), (status = 401, description = "error", body = Error), (status = 403, description = "error", body = Error), (status = 404, description = "error", body = Error)))]
async fn renew_lease(
    State(app): AppState,
    NamePath(host, _): HostPath,
    req: Request,
) -> ApiResult<Response> {
    lease_caller(&app.tokens, req.extensions().get(), req.headers(), &host)?;
    let grant = call(&app, move |m| m.renew_lease(&host)).await?;
    Ok(Json(grant).into_response())
}

#[utoipa::path(post, path = "/v1/hosts/{name}/drain", operation_id = "drainHost",
    summary = "Put a host into maintenance; the manager evacuates its VMs.",
    params(("name" = String, Path, description = "the host's name", example = "h1")),
    responses((status = 200, description = "the host", body = Host), (status = 404, description = "error", body = Error)))]
async fn drain(State(app): AppState, NamePath(host, _): HostPath) -> ApiResult<Response> {
    let cmd = Command::SetMaintenance { host, on: true };
    Ok(reply(StatusCode::OK, execute(&app, cmd).await?))
}

#[utoipa::path(post, path = "/v1/hosts/{name}/activate", operation_id = "activateHost",
    summary = "Bring a host back from maintenance.",
    params(("name" = String, Path, description = "the host's name", example = "h1")),
    responses((status = 200, description = "the host", body = Host), (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
async fn activate(State(app): AppState, NamePath(host, _): HostPath) -> ApiResult<Response> {
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
        template: b.template.map(String::from),
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
async fn show_vm(State(app): AppState, NamePath(name, _): VmPath) -> ApiResult<Response> {
    app.manager
        .read(|s| s.vms.get(&name).cloned())
        .map(|v| Json(v).into_response())
        .ok_or_else(|| crate::Error::UnknownVm(name).into())
}

#[utoipa::path(delete, path = "/v1/vms/{name}", operation_id = "deleteVm",
    summary = "Delete a VM; it is removed once its host confirms.",
    params(("name" = String, Path, description = "the VM's name", example = "v2")),
    responses((status = 202, description = "the VM, deleting", body = Vm), (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
async fn delete_vm(State(app): AppState, NamePath(name, _): VmPath) -> ApiResult<Response> {
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
    NamePath(name, _): VmPath,
    Body(b): Body<MigrateVm>,
) -> ApiResult<Response> {
    let cmd = Command::MigrateVm {
        name,
        to: b.to.map(String::from),
        policy: b.policy,
    };
    Ok(reply(StatusCode::ACCEPTED, execute(&app, cmd).await?))
}

#[utoipa::path(post, path = "/v1/vms/{name}/trace", operation_id = "traceVm",
    summary = "Record a running VM's scheduler events through its host's agent: its vCPU threads on the host and, unless host_only, its guest's processes. When the VM migrates during the window, the rest is recorded on its new host: a segment in `later` per host it moved to.",
    params(("name" = String, Path, description = "the VM's name", example = "v1")),
    request_body(content = tern_api::trace::TraceRequest, example = json!({"duration_ms": 10000})),
    responses((status = 200, description = "the recording", body = tern_api::trace::ClusterTrace),
        (status = 400, description = "error", body = Error), (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error), (status = 502, description = "error", body = Error)))]
async fn trace_vm(
    State(app): AppState,
    NamePath(name, _): VmPath,
    Body(req): Body<tern_api::trace::TraceRequest>,
) -> ApiResult<Response> {
    req.check().map_err(ApiError::BadRequest)?;
    // Checked before the control loop is needed, so an unknown or stopped VM says so.
    let running = app.manager.read(|s| {
        s.vms
            .get(&name)
            .map(|v| (v.state, v.observed_host.is_some()))
    });
    match running.ok_or_else(|| crate::Error::UnknownVm(name.clone()))? {
        (tern_api::manager::VmState::Running, true) => {}
        (state, _) => {
            return Err(crate::Error::Conflict(format!(
                "VM {name:?} is {state:?}, not running on a host: only a running VM is traced"
            ))
            .into())
        }
    }
    let agents = app.manager.agents().ok_or_else(|| {
        ApiError::Unavailable("this manager runs no control loop to reach agents".into())
    })?;
    let trace = crate::trace::follow(&app.manager, &agents, &name, req).await?;
    Ok(Json(trace).into_response())
}

#[utoipa::path(get, path = "/v1/vms/{name}/vcpu-policy", operation_id = "showVcpuPolicy",
    summary = "How the VM's host schedules its vCPU threads, as recorded (the VM's spec.vcpu_policy).",
    params(("name" = String, Path, description = "the VM's name", example = "v1")),
    responses((status = 200, description = "the policy", body = VcpuPolicySetting), (status = 404, description = "error", body = Error)))]
async fn show_vcpu_policy(State(app): AppState, NamePath(name, _): VmPath) -> ApiResult<Response> {
    app.manager
        .read(|s| s.vms.get(&name).map(|v| v.spec.vcpu_policy))
        .map(|policy| Json(VcpuPolicySetting { policy }).into_response())
        .ok_or_else(|| crate::Error::UnknownVm(name).into())
}

#[utoipa::path(put, path = "/v1/vms/{name}/vcpu-policy", operation_id = "setVcpuPolicy",
    summary = "Set how the VM's host schedules its vCPU threads (none, pin, gang): applied on its host at once when it runs, recorded, applied wherever the manager starts it and carried along by migrations.",
    params(("name" = String, Path, description = "the VM's name", example = "v1")),
    request_body(content = VcpuPolicySetting, example = json!({"policy": "pin"})),
    responses((status = 200, description = "the policy, recorded and applied", body = VcpuPolicySetting),
        (status = 400, description = "error", body = Error), (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error), (status = 502, description = "error", body = Error)))]
async fn set_vcpu_policy(
    State(app): AppState,
    NamePath(name, _): VmPath,
    Body(b): Body<VcpuPolicySetting>,
) -> ApiResult<Response> {
    let cmd = Command::SetVcpuPolicy {
        name: name.clone(),
        policy: b.policy,
    };
    // Decided first, so a refused change asks no host; then the host applies it
    // before it is recorded, so a policy its host refuses is not kept either.
    let now = app.manager.now();
    let (checked, running_on) = app.manager.read(|s| {
        let checked = crate::decide::decide(s, now, cmd.clone()).map(drop);
        let on = s
            .vms
            .get(&name)
            .filter(|v| v.state == tern_api::manager::VmState::Running)
            .and_then(|v| v.observed_host.as_ref())
            .and_then(|h| s.hosts.get(h).cloned());
        (checked, on)
    });
    checked?;
    // A manager with no control loop reaches no agent: the record is all there is.
    if let (Some(host), Some(agents)) = (running_on, app.manager.agents()) {
        agents
            .client(&host)?
            .set_vcpu_policy(&name, b.policy)
            .await?;
    }
    execute(&app, cmd).await?;
    Ok(Json(b).into_response())
}

#[utoipa::path(get, path = "/v1/vms/{name}/migration-policy", operation_id = "showMigrationPolicy",
    summary = "The live-migration policy the VM's moves use when a migration names none (the VM's spec.migration_policy); null: the cluster's (evacuation_policy for drains, default_policy otherwise).",
    params(("name" = String, Path, description = "the VM's name", example = "v1")),
    responses((status = 200, description = "the policy", body = MigrationPolicySetting), (status = 404, description = "error", body = Error)))]
async fn show_migration_policy(
    State(app): AppState,
    NamePath(name, _): VmPath,
) -> ApiResult<Response> {
    app.manager
        .read(|s| s.vms.get(&name).map(|v| v.spec.migration_policy))
        .map(|policy| Json(MigrationPolicySetting { policy }).into_response())
        .ok_or_else(|| crate::Error::UnknownVm(name).into())
}

#[utoipa::path(put, path = "/v1/vms/{name}/migration-policy", operation_id = "setMigrationPolicy",
    summary = "Set the live-migration policy the VM's moves use when a migration names none (qemu, xen, adaptive, stop-copy, dependency-aware), or null for the cluster's.",
    params(("name" = String, Path, description = "the VM's name", example = "v1")),
    request_body(content = MigrationPolicySetting, example = json!({"policy": "dependency-aware"})),
    responses((status = 200, description = "the VM, with its policy recorded", body = Vm),
        (status = 400, description = "error", body = Error), (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
async fn set_migration_policy(
    State(app): AppState,
    NamePath(name, _): VmPath,
    Body(b): Body<MigrationPolicySetting>,
) -> ApiResult<Response> {
    let cmd = Command::SetMigrationPolicy {
        name,
        policy: b.policy,
    };
    Ok(reply(StatusCode::OK, execute(&app, cmd).await?))
}

/// A VM's state and the host it was last seen on, for the routes relayed to that host's
/// agent; `None` for an unknown VM.
fn vm_state_and_host(
    app: &App,
    name: &str,
) -> Option<(tern_api::manager::VmState, Option<tern_api::manager::Host>)> {
    app.manager.read(|s| {
        s.vms.get(name).map(|v| {
            let host = v
                .observed_host
                .as_ref()
                .and_then(|h| s.hosts.get(h).cloned());
            (v.state, host)
        })
    })
}

#[utoipa::path(get, path = "/v1/vms/{name}/taint", operation_id = "taintVm",
    summary = "The running VM's guest processes as its guest agent classifies them for dependency-aware migration: external, dependent, untainted or exempt, why, and frozen or not (relayed to its host's agent).",
    params(("name" = String, Path, description = "the VM's name", example = "v1")),
    responses((status = 200, description = "the guest's taint report", body = tern_api::guest::TaintReport),
        (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error), (status = 502, description = "error", body = Error), (status = 503, description = "error", body = Error)))]
async fn taint_vm(State(app): AppState, NamePath(name, _): VmPath) -> ApiResult<Response> {
    let host = match vm_state_and_host(&app, &name)
        .ok_or_else(|| crate::Error::UnknownVm(name.clone()))?
    {
        (tern_api::manager::VmState::Running, Some(host)) => host,
        (state, _) => {
            return Err(crate::Error::Conflict(format!(
                "VM {name:?} is {state:?}, not running on a host: only a running guest has processes to show"
            ))
            .into())
        }
    };
    let agents = app.manager.agents().ok_or_else(|| {
        ApiError::Unavailable("this manager runs no control loop to reach agents".into())
    })?;
    let report = agents.client(&host)?.taint(&name).await?;
    Ok(Json(report).into_response())
}

#[utoipa::path(get, path = "/v1/vms/{name}/ha-policy", operation_id = "showHaPolicy",
    summary = "What the manager does when the VM's guest panics or stops answering (the VM's spec.ha_policy).",
    params(("name" = String, Path, description = "the VM's name", example = "v1")),
    responses((status = 200, description = "the policy", body = HaPolicySetting), (status = 404, description = "error", body = Error)))]
async fn show_ha_policy(State(app): AppState, NamePath(name, _): VmPath) -> ApiResult<Response> {
    app.manager
        .read(|s| s.vms.get(&name).map(|v| v.spec.ha_policy))
        .map(|policy| Json(HaPolicySetting { policy }).into_response())
        .ok_or_else(|| crate::Error::UnknownVm(name).into())
}

#[utoipa::path(put, path = "/v1/vms/{name}/ha-policy", operation_id = "setHaPolicy",
    summary = "Set what the manager does when the VM's guest panics or stops answering: restart (power it off and start it again on its host, within the restart limit) or leave (only show it). Clears a restart record that gave up.",
    params(("name" = String, Path, description = "the VM's name", example = "v1")),
    request_body(content = HaPolicySetting, example = json!({"policy": "leave"})),
    responses((status = 200, description = "the VM, with its policy recorded", body = Vm),
        (status = 400, description = "error", body = Error), (status = 404, description = "error", body = Error), (status = 409, description = "error", body = Error)))]
async fn set_ha_policy(
    State(app): AppState,
    NamePath(name, _): VmPath,
    Body(b): Body<HaPolicySetting>,
) -> ApiResult<Response> {
    let r = execute(
        &app,
        Command::SetHaPolicy {
            name,
            policy: b.policy,
        },
    )
    .await?;
    Ok(reply(StatusCode::OK, r))
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
