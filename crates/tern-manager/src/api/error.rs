//! The one place where errors become HTTP answers: a status and `{"error": message}`.
//! Also the JSON body extractor, so a malformed body is answered the same way.

use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;

use crate::error::Error;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::BadInput(_) => StatusCode::BAD_REQUEST,
            Error::UnknownHost(_) | Error::UnknownVm(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) | Error::NoRoom { .. } => StatusCode::CONFLICT,
            Error::Agent { .. } => StatusCode::BAD_GATEWAY,
            Error::NotLeader(_) | Error::Etcd(_) => StatusCode::SERVICE_UNAVAILABLE,
            Error::Sqlite(_) | Error::Corrupt(_) | Error::SchemaTooNew { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "error": self.message }));
        (self.status, body).into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON request body; a body that is not valid JSON of the expected shape is a 400
/// naming what is wrong.
pub struct Body<T>(pub T);

#[axum::async_trait]
impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(rej) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "request body: {}; send JSON as described in /openapi.json",
                    rej.body_text()
                ),
            )),
        }
    }
}
