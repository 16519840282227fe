//! `docs/openapi.json` is what the code generates: a route, parameter, status or field
//! changed in Rust fails here until the document is regenerated.

#[test]
fn openapi_document_is_generated_from_the_code() {
    tern_testkit::assert_generated(
        "docs/openapi.json",
        &tern_manager::api::openapi::json(),
        "TERN_BLESS=1 cargo test -p tern-manager openapi",
    );
}
