//! What both servers' OpenAPI documents share (feature `openapi`): the bearer-token
//! scheme every route but the document itself requires, and an error answer.

use utoipa::openapi::path::{Operation, PathItem};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, ResponseBuilder};

/// A document as the checked-in files hold it: pretty JSON ending in a newline.
pub fn text(doc: &OpenApi) -> String {
    let mut text = doc
        .to_pretty_json()
        .expect("an OpenAPI document serialises");
    text.push('\n');
    text
}

/// Declares the `bearer` scheme and requires it of every operation.
pub fn require_bearer(doc: &mut OpenApi) {
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    doc.security = Some(vec![SecurityRequirement::new(
        "bearer",
        Vec::<String>::new(),
    )]);
}

/// Adds the response `status` with a JSON body of the schema `error_schema` to every
/// operation `f` selects.
pub fn add_error_response(
    doc: &mut OpenApi,
    status: &str,
    description: &str,
    error_schema: &str,
    mut f: impl FnMut(&str) -> bool,
) {
    for (path, item) in doc.paths.paths.iter_mut() {
        if !f(path) {
            continue;
        }
        for op in operations(item) {
            let content = ContentBuilder::new()
                .schema(Some(Ref::from_schema_name(error_schema)))
                .build();
            let response = ResponseBuilder::new()
                .description(description)
                .content("application/json", content)
                .build();
            op.responses
                .responses
                .insert(status.to_owned(), response.into());
        }
    }
}

/// Drops the tags utoipa derives from module paths: they say where a handler is, not
/// what it does.
pub fn untag(doc: &mut OpenApi) {
    for item in doc.paths.paths.values_mut() {
        for op in operations(item) {
            op.tags = None;
        }
    }
}

/// Every operation of a path.
pub fn operations(item: &mut PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        &mut item.get,
        &mut item.put,
        &mut item.post,
        &mut item.delete,
        &mut item.patch,
    ]
    .into_iter()
    .flatten()
}
