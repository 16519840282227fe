//! The HTTP API. Each handler only parses its request into a [`Command`]; [`execute`]
//! runs it; errors become responses in one place ([`crate::error`]). Every route sits
//! behind the bearer-token check.
//!
//! ```text
//! GET    /v1/host                      capacity and load
//! GET    /v1/vms                       list
//! POST   /v1/vms                       create (and start)      body: CreateVm
//! GET    /v1/vms/{id}                  show
//! DELETE /v1/vms/{id}                  destroy
//! POST   /v1/vms/{id}/start|pause|resume|reboot
//! POST   /v1/vms/{id}/stop             graceful, then forced      body: StopRequest (optional)
//! POST   /v1/vms/{id}/suspend          memory and device state to the store
//! POST   /v1/vms/{id}/restore          from the store, on any host that sees it
//! GET    /v1/vms/{id}/metrics          vCPU threads' CPU time, memory
//! POST   /v1/vms/{id}/guest            one request to the guest agent, its answer back
//! GET    /v1/vms/{id}/taint            the guest's processes, their taint class and why
//! GET    /v1/vms/{id}/console          the serial console, a WebSocket (crate::console)
//! ```

use crate::error::AgentError;
use crate::host::{HostReport, Load};
use crate::state::AppState;
use crate::vms::CreateVm;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::time::Duration;
use tern_api::agent::{SavedStateAnswer, StopAnswer, StopRequest, VmMetrics, VmView};
use tern_hv::{Action, HvError};
use tern_model::VmName;
use tern_pki::Role;

/// Largest request body the agent reads (a layer on the router, see
/// [`crate::server::app`]); the largest real one, a VM spec, is a few KiB.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// How long a guest request may take by default.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One API request, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Host,
    ListVms,
    ShowVm(VmName),
    CreateVm(CreateVm),
    /// With `true`, the VM's disk files stay in the store: they belong to a copy of the
    /// VM running elsewhere.
    DeleteVm(VmName, bool),
    Act(VmName, Action),
    Stop(VmName, StopRequest),
    Suspend(VmName),
    Restore(VmName),
    ResizeDisk(VmName, String, tern_api::agent::ResizeDisk),
    Metrics(VmName),
    Guest(VmName, Value),
    Taint(VmName),
}

/// Runs a command and returns the status and JSON body of its answer.
pub async fn execute(state: &AppState, cmd: Command) -> Result<(StatusCode, Value), AgentError> {
    let ok = |v: Value| Ok((StatusCode::OK, v));
    match cmd {
        Command::Host => {
            let vms = state.hv.list().await?;
            let cores: f64 = {
                let load = state.load.lock().expect("load table lock");
                vms.iter()
                    .filter_map(|v| load.cores(&v.id))
                    .fold(0.0, |a, b| a + b)
            };
            ok(json(HostReport {
                name: state.host.name.clone(),
                hypervisor: state.hv.kind().to_string(),
                capacity: state.host.capacity,
                load: Load {
                    vm_cpu_cores: cores,
                    vm_memory_mib: vms.iter().map(|v| v.spec.memory_mib).sum(),
                    vms: vms.len(),
                },
                version: env!("CARGO_PKG_VERSION").to_string(),
                store_free_mib: state
                    .store
                    .as_ref()
                    .and_then(|s| s.free_bytes().ok())
                    .map(|b| b >> 20),
            }))
        }
        Command::ListVms => {
            let vms: Vec<_> = state
                .hv
                .list()
                .await?
                .into_iter()
                .map(|i| state.view(i))
                .collect();
            ok(json(vms))
        }
        Command::ShowVm(id) => ok(json(state.view(state.hv.refresh(id.as_str()).await?))),
        Command::CreateVm(c) => {
            let info = state
                .create_vm_with(c.id.as_str(), c.spec, false, c.start, c.reuse_disks)
                .await?;
            Ok((StatusCode::CREATED, json(state.view(info))))
        }
        Command::DeleteVm(id, keep_disks) => {
            let _gate = state.lifecycle.lock().await;
            state.refuse_if_migrating(id.as_str(), "destroy")?;
            match keep_disks {
                true => state.destroy_copy(id.as_str()).await?,
                false => state.destroy_vm(id.as_str()).await?,
            }
            Ok((StatusCode::OK, serde_json::json!({ "deleted": id })))
        }
        Command::Act(id, action) => {
            let _gate = state.lifecycle.lock().await;
            state.refuse_if_migrating(id.as_str(), action.verb())?;
            ok(json(state.view(state.act(id.as_str(), action).await?)))
        }
        Command::Stop(id, req) => ok(json(state.stop_vm(id.as_str(), req).await?)),
        Command::Suspend(id) => ok(json(state.suspend_vm(id.as_str()).await?)),
        Command::Restore(id) => ok(json(state.restore_vm(id.as_str()).await?)),
        Command::ResizeDisk(id, disk, r) => {
            let info = state.resize_disk(id.as_str(), &disk, r.size_mib).await?;
            ok(json(state.view(info)))
        }
        Command::Metrics(id) => ok(json(state.hv.metrics(id.as_str()).await?)),
        Command::Guest(id, req) => {
            crate::guest::with_id(req.clone(), 0).map_err(AgentError::BadRequest)?;
            let id = id.into_string();
            let socket = state.guest_socket(&id).await?;
            ok(state
                .guests
                .request(&id, &socket, req, GUEST_TIMEOUT)
                .await?)
        }
        Command::Taint(id) => {
            let id = id.into_string();
            let cmd = tern_api::guest::Command::Taint;
            match state.call_guest(&id, &cmd, GUEST_TIMEOUT).await? {
                tern_api::guest::Reply::Taint(r) => ok(json(r)),
                other => Err(AgentError::Guest {
                    id,
                    reason: format!("the guest answered taint with {other:?}"),
                }),
            }
        }
    }
}

fn json<T: serde::Serialize>(v: T) -> Value {
    serde_json::to_value(v).expect("API values serialise")
}

/// The agent's router over `state`. The migration endpoints are merged in by
/// [`crate::server::app`].
pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/v1/host", get(host))
        .route("/v1/vms", get(list_vms).post(create))
        .route("/v1/vms/:id", get(show_vm).delete(delete_vm))
        .route("/v1/vms/:id/start", post(start))
        .route("/v1/vms/:id/pause", post(pause))
        .route("/v1/vms/:id/resume", post(resume))
        .route("/v1/vms/:id/stop", post(stop))
        .route("/v1/vms/:id/reboot", post(reboot))
        .route("/v1/vms/:id/suspend", post(suspend))
        .route("/v1/vms/:id/restore", post(restore))
        .route("/v1/vms/:id/disks/:disk/resize", post(resize_disk))
        .route("/v1/vms/:id/metrics", get(metrics))
        .route("/v1/vms/:id/guest", post(guest))
        .route("/v1/vms/:id/taint", get(taint))
        .route("/v1/vms/:id/console", get(crate::console::console))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(crate::error::ErrorBody {
                    error: "no such route: see docs/agent-api.md".into(),
                    kind: "not_found".into(),
                }),
            )
        })
        .layer(middleware::from_fn_with_state(state, auth))
}

#[utoipa::path(get, path = "/v1/host", summary = "capacity and load",
    responses((status = 200, description = "ok", body = HostReport)))]
async fn host(s: State<AppState>) -> Response {
    run(s, Command::Host).await
}

#[utoipa::path(get, path = "/v1/vms", summary = "list VMs",
    responses((status = 200, description = "ok", body = Vec<VmView>)))]
async fn list_vms(s: State<AppState>) -> Response {
    run(s, Command::ListVms).await
}

#[utoipa::path(post, path = "/v1/vms", summary = "create a VM (and start it unless start is false)",
    request_body = CreateVm,
    responses((status = 201, description = "created", body = VmView)))]
async fn create(s: State<AppState>, Body(body): Body) -> Response {
    match parse::<CreateVm>(&body) {
        Ok(c) => run(s, Command::CreateVm(c)).await,
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(get, path = "/v1/vms/{id}", summary = "one VM", params(Id),
    responses((status = 200, description = "ok", body = VmView)))]
async fn show_vm(s: State<AppState>, VmId(id): VmId) -> Response {
    run(s, Command::ShowVm(id)).await
}

/// `DELETE /v1/vms/{id}`'s answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct Deleted {
    /// The VM's id.
    pub deleted: String,
}

/// `DELETE /v1/vms/{id}` options.
#[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct DeleteQuery {
    /// `keep`: leave the VM's disk files in the store (a stale copy whose VM runs on
    /// another host from the same disks); `delete` (default): remove them.
    #[serde(default)]
    pub disks: Option<DiskDisposal>,
}

/// What deleting a VM does with its disk files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DiskDisposal {
    Delete,
    Keep,
}

#[utoipa::path(delete, path = "/v1/vms/{id}", summary = "destroy a VM and remove its files (its disks too, unless disks=keep)",
    params(Id, DeleteQuery), responses((status = 200, description = "ok", body = Deleted)))]
async fn delete_vm(
    s: State<AppState>,
    VmId(id): VmId,
    q: Result<axum::extract::Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let keep = match q {
        Ok(q) => q.0.disks == Some(DiskDisposal::Keep),
        Err(e) => {
            return AgentError::BadRequest(format!("query: {}", e.body_text())).into_response()
        }
    };
    run(s, Command::DeleteVm(id, keep)).await
}

#[utoipa::path(post, path = "/v1/vms/{id}/start", summary = "start a created or stopped VM",
    params(Id), responses((status = 200, description = "ok", body = VmView)))]
async fn start(s: State<AppState>, VmId(id): VmId) -> Response {
    run(s, Command::Act(id, Action::Start)).await
}

#[utoipa::path(post, path = "/v1/vms/{id}/pause", summary = "pause a running VM",
    params(Id), responses((status = 200, description = "ok", body = VmView)))]
async fn pause(s: State<AppState>, VmId(id): VmId) -> Response {
    run(s, Command::Act(id, Action::Pause)).await
}

#[utoipa::path(post, path = "/v1/vms/{id}/resume", summary = "resume a paused VM",
    params(Id), responses((status = 200, description = "ok", body = VmView)))]
async fn resume(s: State<AppState>, VmId(id): VmId) -> Response {
    run(s, Command::Act(id, Action::Resume)).await
}

#[utoipa::path(post, path = "/v1/vms/{id}/stop",
    summary = "power a VM off, keeping its definition and disks: the guest is asked first (ACPI power button, guest agent poweroff) and powered off after timeout_s, or at once with force",
    params(Id), request_body(content = Option<StopRequest>, description = "optional; empty means a graceful stop within 30 s"),
    responses((status = 200, description = "stopped; how", body = StopAnswer)))]
async fn stop(s: State<AppState>, VmId(id): VmId, Body(body): Body) -> Response {
    let req = match body.iter().all(u8::is_ascii_whitespace) {
        true => Ok(StopRequest::default()),
        false => parse::<StopRequest>(&body),
    };
    match req {
        Ok(req) => run(s, Command::Stop(id, req)).await,
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(post, path = "/v1/vms/{id}/reboot", summary = "reset a running VM: a power cycle, it boots again from its disks and stays running",
    params(Id), responses((status = 200, description = "ok", body = VmView)))]
async fn reboot(s: State<AppState>, VmId(id): VmId) -> Response {
    run(s, Command::Act(id, Action::Reboot)).await
}

#[utoipa::path(post, path = "/v1/vms/{id}/suspend",
    summary = "suspend a running or paused VM to disk: its memory and device state go to the store, its process ends",
    params(Id), responses((status = 200, description = "suspended", body = SavedStateAnswer)))]
async fn suspend(s: State<AppState>, VmId(id): VmId) -> Response {
    run(s, Command::Suspend(id)).await
}

#[utoipa::path(post, path = "/v1/vms/{id}/restore",
    summary = "run a suspended VM again from its saved state: on the host it is suspended on, or on any host sharing the store (defined there from the saved spec)",
    params(Id), responses((status = 200, description = "running", body = SavedStateAnswer)))]
async fn restore(s: State<AppState>, VmId(id): VmId) -> Response {
    run(s, Command::Restore(id)).await
}

#[utoipa::path(post, path = "/v1/vms/{id}/disks/{disk}/resize",
    summary = "grow a disk of a stopped VM (the guest sees it at its next boot)",
    params(Id, ("disk" = String, Path, description = "the disk's name")),
    request_body = tern_api::agent::ResizeDisk,
    responses((status = 200, description = "the VM", body = VmView)))]
async fn resize_disk(
    s: State<AppState>,
    axum::extract::Path((id, disk)): axum::extract::Path<(String, String)>,
    body: Result<Json<tern_api::agent::ResizeDisk>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let id: VmName = match id.parse() {
        Ok(id) => id,
        Err(e) => return AgentError::Hv(HvError::BadName(e)).into_response(),
    };
    match body {
        Ok(Json(r)) => run(s, Command::ResizeDisk(id, disk, r)).await,
        Err(e) => AgentError::BadRequest(format!("body: {}", e.body_text())).into_response(),
    }
}

#[utoipa::path(get, path = "/v1/vms/{id}/metrics", summary = "vCPU threads' CPU time, memory",
    params(Id), responses((status = 200, description = "ok", body = VmMetrics)))]
async fn metrics(s: State<AppState>, VmId(id): VmId) -> Response {
    run(s, Command::Metrics(id)).await
}

#[utoipa::path(post, path = "/v1/vms/{id}/guest",
    summary = "one request to the guest agent, its answer back", params(Id),
    request_body = tern_api::guest::Command,
    responses((status = 200, description = "the guest agent's answer", body = Object)))]
async fn guest(s: State<AppState>, VmId(id): VmId, Body(body): Body) -> Response {
    match parse::<Value>(&body) {
        Ok(v) => run(s, Command::Guest(id, v)).await,
        Err(e) => e.into_response(),
    }
}

#[utoipa::path(get, path = "/v1/vms/{id}/taint",
    summary = "the guest's processes: taint class (external, dependent, untainted, exempt), why, frozen or not",
    params(Id),
    responses((status = 200, description = "the guest agent's taint report", body = tern_api::guest::TaintReport)))]
async fn taint(s: State<AppState>, VmId(id): VmId) -> Response {
    run(s, Command::Taint(id)).await
}

/// The `{id}` of a VM or migration route.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Path)]
pub struct Id {
    /// The VM's or the migration's id.
    #[allow(dead_code)]
    id: String,
}

/// A request body, read up to the router's limit; a longer one is a 413 naming it.
pub struct Body(pub Bytes);

#[axum::async_trait]
impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = AgentError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AgentError> {
        Bytes::from_request(req, state)
            .await
            .map(Body)
            .map_err(|e| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    AgentError::TooLarge {
                        limit: MAX_BODY_BYTES,
                    }
                } else {
                    AgentError::BadRequest(format!("request body: {}", e.body_text()))
                }
            })
    }
}

/// The `{id}` of a VM route, checked against the naming rule before anything looks it
/// up: the id names the VM's record file, so `..%2F..%2Fx` must never reach a path.
pub struct VmId(pub VmName);

#[axum::async_trait]
impl<S: Send + Sync> FromRequestParts<S> for VmId {
    type Rejection = AgentError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AgentError> {
        let Path(id) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| AgentError::BadRequest(format!("VM id in the path: {}", e.body_text())))?;
        id.parse()
            .map(VmId)
            .map_err(|e| AgentError::Hv(HvError::BadName(e)))
    }
}

async fn run(State(state): State<AppState>, cmd: Command) -> Response {
    // On its own task, so a caller that goes away (a manager killed mid-request) does
    // not cancel a change half-way: a create dropped between starting QEMU and keeping
    // its handle would kill that QEMU and leave the VM defined without it, lost.
    let done = tokio::spawn(async move { execute(&state, cmd).await }).await;
    match done {
        Ok(Ok((status, body))) => (status, Json(body)).into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Parses a JSON body, refusing fields the type does not know at any depth, and
/// reporting what is wrong as a 400.
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, AgentError> {
    tern_api::request::from_slice(body)
        .map_err(|e| AgentError::BadRequest(format!("request body: {e}")))
}

/// Compares in time independent of where the strings differ.
fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks `Authorization: Bearer TOKEN` (pure).
pub fn check_auth(header: Option<&str>, token: &str) -> Result<(), AgentError> {
    let Some(h) = header else {
        return Err(AgentError::Unauthorized(
            "missing bearer token: send 'Authorization: Bearer TOKEN'".into(),
        ));
    };
    let given = h.strip_prefix("Bearer ").ok_or_else(|| {
        AgentError::Unauthorized("the Authorization header must be 'Bearer TOKEN'".into())
    })?;
    if same_token(given.trim().as_bytes(), token.as_bytes()) {
        Ok(())
    } else {
        Err(AgentError::Unauthorized("wrong bearer token".into()))
    }
}

/// The caller of a request to an agent with a host identity: the holder of the client
/// certificate its connection showed. `None` over plain HTTP.
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<tern_pki::Peer>);

impl Caller {
    /// The host calling, when the caller is one (a source agent's migration calls).
    pub fn host(&self) -> Option<&str> {
        self.0
            .as_ref()
            .filter(|p| p.role == Role::Host)
            .map(|p| p.name.as_str())
    }
}

#[axum::async_trait]
impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<tern_pki::Secure>()
            .and_then(|s| s.peer.clone());
        Ok(Caller(peer))
    }
}

/// The roles that may drive VMs and send migrations: another host's certificate cannot.
const DRIVERS: &[Role] = &[Role::Manager, Role::Operator];
/// The roles that may call a destination's incoming-migration routes: the source host
/// too (its own migrations only, see `migration::routes`).
const PEERS: &[Role] = &[Role::Manager, Role::Operator, Role::Host];

/// Checks who may call (pure): with a host identity the client certificate's role must
/// be one of `allowed`; without one, the bearer token.
pub fn check_caller(
    state: &AppState,
    secure: Option<&tern_pki::Secure>,
    authorization: Option<&str>,
    allowed: &[Role],
) -> Result<(), AgentError> {
    if state.tls.is_none() {
        return check_auth(authorization, &state.host.token);
    }
    let Some(peer) = secure.and_then(|s| s.peer.as_ref()) else {
        return Err(AgentError::Unauthorized(
            "this agent serves mutual TLS: present a certificate of the cluster CA".into(),
        ));
    };
    if !allowed.contains(&peer.role) {
        let allowed: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
        return Err(AgentError::Forbidden(format!(
            "{} certificate {:?} may not call this route (it takes {}): hosts call each \
             other only to migrate; use the manager or an operator certificate from \
             `tern ca issue`",
            peer.role.as_str(),
            peer.name,
            allowed.join(" or ")
        )));
    }
    Ok(())
}

async fn checked(state: &AppState, req: Request, next: Next, allowed: &[Role]) -> Response {
    let h = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match check_caller(state, req.extensions().get(), h, allowed) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

/// The check of the VM routes and the source's migration routes: with a host identity,
/// the manager's or an operator's certificate; without, the bearer token.
pub async fn auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    checked(&state, req, next, DRIVERS).await
}

/// The check of the destination's incoming-migration routes: as [`auth`], and a host's
/// certificate too.
pub async fn auth_peers(State(state): State<AppState>, req: Request, next: Next) -> Response {
    checked(&state, req, next, PEERS).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bodies_refuse_unknown_fields_at_any_depth() {
        let e = parse::<CreateVm>(br#"{"id": "v", "spec": {"memory_mib": 64, "colour": 1}}"#)
            .unwrap_err();
        assert_eq!(e.status().as_u16(), 400);
        assert!(e.to_string().contains("`spec.colour`"), "{e}");
        assert!(parse::<CreateVm>(br#"{"id": "v", "spec": {"memory_mib": 64}}"#).is_ok());
    }

    #[test]
    fn auth_header() {
        assert!(check_auth(Some("Bearer s3cret"), "s3cret").is_ok());
        for bad in [
            None,
            Some("s3cret"),
            Some("Bearer nope"),
            Some("Basic s3cret"),
        ] {
            let e = check_auth(bad, "s3cret").unwrap_err();
            assert_eq!(e.status().as_u16(), 401, "{bad:?}");
        }
    }
}
