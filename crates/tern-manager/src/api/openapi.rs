//! The API's OpenAPI document, generated from the handlers' `#[utoipa::path]` and the
//! types of `tern-api`. `docs/openapi.json` is this document as [`json`] writes it; a
//! test fails when they differ (`TERN_BLESS=1 cargo test -p tern-manager openapi`
//! rewrites the file).

use utoipa::{Modify, OpenApi};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tern manager API",
        version = "1",
        description = "The control plane of a tern cluster: hosts, VMs, live migrations, the balancer. Every route but /openapi.json and /v1/join (a one-time join token in the body) needs 'Authorization: Bearer TOKEN'; /v1/ca/crl also takes any client certificate of the cluster CA instead. Over TLS, POST /v1/hosts/{name}/lease takes that host's own client certificate instead of the token, and every other route refuses a caller showing a host's certificate (403). Errors answer with a 4xx or 5xx status and {\"error\": message}."
    ),
    paths(
        super::openapi,
        super::metrics,
        super::list_hosts,
        super::register_host,
        super::join,
        super::crl,
        super::show_host,
        super::remove_host,
        super::heartbeat,
        super::renew_lease,
        super::drain,
        super::activate,
        super::list_vms,
        super::create_vm,
        super::show_vm,
        super::delete_vm,
        super::migrate_vm,
        super::trace_vm,
        super::show_vcpu_policy,
        super::set_vcpu_policy,
        super::show_ha_policy,
        super::set_ha_policy,
        super::show_migration_policy,
        super::set_migration_policy,
        super::taint_vm,
        super::migrations::list,
        super::migrations::show,
        super::plan,
        super::get_settings,
        super::put_settings,
        super::list_events,
        super::stream_events,
        crate::web::history,
        crate::web::vm_actions,
        super::lifecycle::start,
        super::console::console,
        super::lifecycle::stop,
        super::lifecycle::reboot,
        super::lifecycle::pause,
        super::lifecycle::resume,
        super::lifecycle::suspend,
        super::lifecycle::restore,
        super::lifecycle::resize_disk,
        super::catalog::list_images,
        super::catalog::add_image,
        super::catalog::show_image,
        super::catalog::delete_image,
        super::catalog::upload_file,
        super::catalog::download_file,
        super::catalog::list_templates,
        super::catalog::create_template,
        super::catalog::show_template,
        super::catalog::delete_template,
    ),
    modifiers(&Bearer)
)]
struct Doc;

/// Routes without the bearer token: the document and enrolment (a join token in the
/// body).
const PUBLIC: [&str; 2] = ["/openapi.json", "/v1/join"];

/// Every other route takes the bearer token and may answer 401.
struct Bearer;

impl Modify for Bearer {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        tern_api::openapi::untag(doc);
        tern_api::openapi::require_bearer(doc);
        tern_api::openapi::add_error_response(
            doc,
            "401",
            "missing or wrong bearer token",
            "Error",
            |path| !PUBLIC.contains(&path),
        );
        for path in PUBLIC {
            if let Some(item) = doc.paths.paths.get_mut(path) {
                for op in tern_api::openapi::operations(item) {
                    op.security = Some(Vec::new());
                }
            }
        }
    }
}

/// The document as `docs/openapi.json` holds it.
pub fn json() -> String {
    tern_api::openapi::text(&Doc::openapi())
}
