//! The one place where errors become HTTP answers: a status and `{"error": message}`.
//! Also the JSON body extractor, so a malformed body is answered the same way.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use crate::error::Error;

/// An error answer: a manager error, or a failure of the HTTP layer itself. Its status
/// is decided here and nowhere else ([`ApiError::status`]).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// What the manager refused or failed at; the variant decides the status.
    #[error(transparent)]
    Manager(#[from] Error),
    /// A body, query or path parameter that does not parse or is out of range.
    #[error("{0}")]
    BadRequest(String),
    /// No or a wrong bearer token.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// An authenticated caller whose certificate may not do this (a host's certificate
    /// on a user route, or on another host's lease).
    #[error("{0}")]
    Forbidden(String),
    /// A request body over [`super::MAX_BODY_BYTES`].
    #[error("the request body is larger than {0} bytes; no manager request needs that much")]
    TooLarge(usize),
    /// No such route, or no such record where the manager has no error of its own.
    #[error("{0}")]
    NotFound(String),
    /// Not serving this now: stopping, or no leader that answers.
    #[error("{0}")]
    Unavailable(String),
    /// The server itself failed (a task that ran the request panicked).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status of this error (pure; the only mapping in the manager).
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Manager(e) => match e {
                Error::BadInput(_) | Error::BadName(_) => StatusCode::BAD_REQUEST,
                Error::UnknownHost(_)
                | Error::UnknownVm(_)
                | Error::UnknownImage(_)
                | Error::UnknownTemplate(_) => StatusCode::NOT_FOUND,
                Error::Conflict(_) | Error::NoRoom { .. } => StatusCode::CONFLICT,
                Error::Agent { .. } | Error::MigrationStuck { .. } => StatusCode::BAD_GATEWAY,
                Error::NotLeader(_) | Error::Etcd(_) => StatusCode::SERVICE_UNAVAILABLE,
                Error::Sqlite(_) | Error::Corrupt(_) | Error::SchemaTooNew { .. } => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                Error::DiskFull(_) => StatusCode::INSUFFICIENT_STORAGE,
            },
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(ErrorBody {
            error: self.to_string(),
        });
        (self.status(), body).into_response()
    }
}

/// The JSON of every error answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// What was wrong and how to fix it.
    pub error: String,
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON request body; a body that is not valid JSON of the expected shape, or that has
/// a field the type does not know at any depth, is a 400 naming what is wrong.
pub struct Body<T>(pub T);

#[axum::async_trait]
impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bad = |why: String| {
            ApiError::BadRequest(format!(
                "request body: {why}; send JSON as described in /openapi.json"
            ))
        };
        let Json(value) = Json::<serde_json::Value>::from_request(req, state)
            .await
            .map_err(|rej| match rej.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(super::MAX_BODY_BYTES),
                _ => bad(rej.body_text()),
            })?;
        tern_api::request::from_value(value).map(Body).map_err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status() {
        let s = |e: ApiError| e.status().as_u16();
        assert_eq!(s(Error::BadInput("x".into()).into()), 400);
        let name = tern_model::VmName::check("X").unwrap_err();
        assert_eq!(s(Error::BadName(name).into()), 400);
        assert_eq!(s(Error::UnknownVm("x".into()).into()), 404);
        assert_eq!(s(Error::Conflict("x".into()).into()), 409);
        let agent = Error::Agent {
            host: "h".into(),
            message: "x".into(),
        };
        assert_eq!(s(agent.into()), 502);
        assert_eq!(s(Error::NotLeader(None).into()), 503);
        assert_eq!(s(ApiError::BadRequest("x".into())), 400);
        assert_eq!(s(ApiError::Unauthorized("x")), 401);
        assert_eq!(s(ApiError::Forbidden("x".into())), 403);
        assert_eq!(s(ApiError::NotFound("x".into())), 404);
        assert_eq!(s(ApiError::Unavailable("x".into())), 503);
        assert_eq!(s(ApiError::Internal("x".into())), 500);
        assert_eq!(s(ApiError::TooLarge(1)), 413);
    }
}
