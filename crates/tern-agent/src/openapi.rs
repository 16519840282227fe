//! The agent's OpenAPI document, generated from the handlers' `#[utoipa::path]` and the
//! types of `tern-api`. `docs/agent-openapi.json` is this document as [`json`] writes
//! it; a test fails when they differ (`TERN_BLESS=1 cargo test -p tern-agent openapi`
//! rewrites the file).

use utoipa::{Modify, OpenApi};

use crate::api;
use crate::migration::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tern host agent API",
        version = "1",
        description = "The API of `tern agent`, one per host (docs/agent-api.md). Every route needs 'Authorization: Bearer TOKEN'; an agent with a host identity serves mutual TLS instead and the client certificate's role decides: the VM and /v1/migrations routes take the manager's or an operator's certificate, /v1/incoming also a host's (its own migrations only), others answer 403 with kind 'forbidden'. Errors answer {\"error\", \"kind\"}."
    ),
    paths(
        api::host,
        api::list_vms,
        api::create,
        api::show_vm,
        api::delete_vm,
        api::start,
        api::pause,
        api::resume,
        api::stop,
        api::reboot,
        api::suspend,
        api::restore,
        api::resize_disk,
        api::metrics,
        api::guest,
        api::taint,
        crate::console::console,
        routes::list,
        routes::send,
        routes::show,
        routes::cancel,
        routes::prepare,
        routes::show_incoming,
        routes::abort,
        routes::resume,
        routes::thaw,
        crate::trace::trace_vm,
        crate::vcpu::set_policy,
        crate::vcpu::show_policy,
    ),
    components(schemas(tern_api::agent::ErrorBody)),
    modifiers(&Errors)
)]
struct Doc;

/// Every route takes the bearer token; any may fail with a status and an error body.
struct Errors;

impl Modify for Errors {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use tern_api::openapi::{add_error_response, require_bearer, untag};
        untag(doc);
        require_bearer(doc);
        add_error_response(doc, "4XX", "error", "Error", |_| true);
        add_error_response(doc, "5XX", "error", "Error", |_| true);
    }
}

/// The document as `docs/agent-openapi.json` holds it.
pub fn json() -> String {
    tern_api::openapi::text(&Doc::openapi())
}
