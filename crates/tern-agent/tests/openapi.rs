//! `docs/agent-openapi.json` is what the code generates: a route, parameter, status or
//! field changed in Rust fails here until the document is regenerated.

#[test]
fn openapi_document_is_generated_from_the_code() {
    tern_testkit::assert_generated(
        "docs/agent-openapi.json",
        &tern_agent::openapi::json(),
        "TERN_BLESS=1 cargo test -p tern-agent openapi",
    );
}
