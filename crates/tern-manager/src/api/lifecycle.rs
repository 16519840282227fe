//! `POST /v1/vms/{name}/{start,stop,reboot,pause,resume,suspend,restore}`: an operator's
//! lifecycle action. The state machine ([`crate::decide::lifecycle`]) is checked first
//! (409 naming the state), the VM's host carries the action out, and only then is the
//! new state recorded: a refused or failed action leaves the VM as it was.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use tern_api::manager::{VmAction, VmActionRequest};

use super::error::{ApiError, ApiResult, ErrorBody as Error};
use super::{execute, reply, App, AppState, VmPath};
use crate::decide::{lifecycle, Command};
use crate::state::Vm;

/// The optional body: empty means the defaults.
fn request(body: &Bytes) -> ApiResult<VmActionRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(VmActionRequest::default());
    }
    let req: VmActionRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("request body: {e}")))?;
    if let Some(t) = req.timeout_s {
        if !(1..=tern_api::agent::MAX_STOP_TIMEOUT_S).contains(&t) {
            return Err(ApiError::BadRequest(format!(
                "timeout_s {t} is outside 1..={} seconds",
                tern_api::agent::MAX_STOP_TIMEOUT_S
            )));
        }
    }
    Ok(req)
}

async fn act(app: &App, name: String, action: VmAction, body: Bytes) -> ApiResult<Response> {
    let req = request(&body)?;
    let host = app.manager.read(|s| {
        let v = s
            .vms
            .get(&name)
            .ok_or_else(|| crate::Error::UnknownVm(name.clone()))?;
        lifecycle::check(v, action)?;
        let h = lifecycle::target(s, v, action, req.host.as_ref().map(|h| h.as_str()))?;
        s.hosts.get(&h).cloned().ok_or(crate::Error::UnknownHost(h))
    })?;
    let agents = app.manager.agents().ok_or_else(|| {
        ApiError::Unavailable("this manager runs no control loop to reach hosts".into())
    })?;
    agents.client(&host)?.act(&name, action, &req).await?;
    let cmd = Command::VmActed {
        name,
        action,
        host: host.name,
    };
    Ok(reply(StatusCode::OK, execute(app, cmd).await?))
}

macro_rules! action_route {
    ($fn:ident, $action:expr, $path:literal, $op:literal, $summary:literal) => {
        #[utoipa::path(post, path = $path, operation_id = $op, summary = $summary,
            params(("name" = String, Path, description = "the VM's name", example = "v1")),
            request_body(content = Option<VmActionRequest>, description = "optional"),
            responses((status = 200, description = "the VM in its new state", body = Vm),
                (status = 400, description = "error", body = Error),
                (status = 404, description = "error", body = Error),
                (status = 409, description = "the VM's state does not allow it", body = Error),
                (status = 502, description = "its host failed", body = Error)))]
        pub(super) async fn $fn(
            State(app): AppState,
            super::NamePath(name, _): VmPath,
            body: Bytes,
        ) -> ApiResult<Response> {
            act(&app, name, $action, body).await
        }
    };
}

action_route!(
    start,
    VmAction::Start,
    "/v1/vms/{name}/start",
    "startVm",
    "Boot a stopped VM from its disks."
);
action_route!(stop, VmAction::Stop, "/v1/vms/{name}/stop", "stopVm",
    "Ask the guest to power off (ACPI, tern-guest); power it off after timeout_s (default 30) or at once with force.");
action_route!(
    reboot,
    VmAction::Reboot,
    "/v1/vms/{name}/reboot",
    "rebootVm",
    "Reset a running VM: it boots again from its disks."
);
action_route!(
    pause,
    VmAction::Pause,
    "/v1/vms/{name}/pause",
    "pauseVm",
    "Stop a running VM's vCPUs; its memory is kept."
);
action_route!(
    resume,
    VmAction::Resume,
    "/v1/vms/{name}/resume",
    "resumeVm",
    "Run a paused VM's vCPUs again."
);
action_route!(
    suspend,
    VmAction::Suspend,
    "/v1/vms/{name}/suspend",
    "suspendVm",
    "Save a running or paused VM's memory and device state to the shared store and end its QEMU."
);
action_route!(restore, VmAction::Restore, "/v1/vms/{name}/restore", "restoreVm",
    "Run a suspended VM again from its saved state, on its host or the one given (any host that sees the store).");

#[utoipa::path(post, path = "/v1/vms/{name}/disks/{disk}/resize", operation_id = "resizeDisk",
    summary = "Grow a disk of a stopped VM; the guest sees the size at its next boot.",
    params(("name" = String, Path, description = "the VM's name", example = "v1"),
        ("disk" = String, Path, description = "the disk's name", example = "data")),
    request_body = tern_api::agent::ResizeDisk,
    responses((status = 200, description = "the VM", body = Vm),
        (status = 400, description = "error", body = Error),
        (status = 404, description = "error", body = Error),
        (status = 409, description = "the VM is not stopped", body = Error)))]
pub(super) async fn resize_disk(
    State(app): AppState,
    axum::extract::Path((name, disk)): axum::extract::Path<(String, String)>,
    super::error::Body(r): super::error::Body<tern_api::agent::ResizeDisk>,
) -> ApiResult<Response> {
    name.parse::<tern_model::VmName>()
        .map_err(crate::Error::BadName)?;
    let host = app.manager.read(|s| {
        lifecycle::check_resize(s, &name, &disk, r.size_mib)?;
        let v = &s.vms[&name];
        let h = lifecycle::target(s, v, VmAction::Start, None)?;
        s.hosts.get(&h).cloned().ok_or(crate::Error::UnknownHost(h))
    })?;
    let agents = app.manager.agents().ok_or_else(|| {
        ApiError::Unavailable("this manager runs no control loop to reach hosts".into())
    })?;
    agents
        .client(&host)?
        .resize_disk(&name, &disk, r.size_mib)
        .await?;
    let cmd = Command::DiskResized {
        name,
        disk,
        size_mib: r.size_mib,
    };
    Ok(reply(StatusCode::OK, execute(&app, cmd).await?))
}

/// The action routes, behind the API's token check.
pub(super) fn routes() -> axum::Router<std::sync::Arc<App>> {
    use axum::routing::post;
    axum::Router::new()
        .route("/v1/vms/:name/start", post(start))
        .route("/v1/vms/:name/stop", post(stop))
        .route("/v1/vms/:name/reboot", post(reboot))
        .route("/v1/vms/:name/pause", post(pause))
        .route("/v1/vms/:name/resume", post(resume))
        .route("/v1/vms/:name/suspend", post(suspend))
        .route("/v1/vms/:name/restore", post(restore))
        .route("/v1/vms/:name/disks/:disk/resize", post(resize_disk))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_optional_and_checked() {
        assert_eq!(request(&Bytes::new()).unwrap(), VmActionRequest::default());
        let r = request(&Bytes::from_static(br#"{"timeout_s": 5, "force": true}"#)).unwrap();
        assert_eq!((r.timeout_s, r.force), (Some(5), true));
        assert!(request(&Bytes::from_static(br#"{"timeout_s": 0}"#)).is_err());
        assert!(request(&Bytes::from_static(br#"{"timeout_s": 601}"#)).is_err());
        assert!(request(&Bytes::from_static(br#"{"forse": true}"#)).is_err());
        assert!(request(&Bytes::from_static(br#"{"host": "Bad_Name"}"#)).is_err());
    }
}
