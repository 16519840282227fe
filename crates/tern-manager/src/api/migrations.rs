//! Migrations with their live telemetry: `GET /v1/migrations` (records, newest first, or
//! with `running=true` only those under way) and `GET /v1/migrations/{id}`. A running
//! migration carries `progress`, the latest telemetry its source reported (see
//! [`crate::control::LiveMigrations`]); it is absent before the first report and after
//! the end.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ApiResult};
use super::{call, AppState, MAX_PAGE};
use crate::client::Progress;
use crate::manager::Manager;
use crate::state::Migration;

/// A migration record and, while it runs, its telemetry.
#[derive(Serialize)]
pub struct MigrationView {
    #[serde(flatten)]
    pub record: Migration,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

impl MigrationView {
    fn of(m: &Manager, record: Migration) -> Self {
        let progress = record
            .finished
            .is_none()
            .then(|| m.live().get(record.id))
            .flatten();
        Self { record, progress }
    }
}

/// The migrations under way, oldest first, with their telemetry; reads memory only.
pub fn running(m: &Manager) -> Vec<MigrationView> {
    let records: Vec<Migration> = m.read(|s| s.running.values().cloned().collect());
    records
        .into_iter()
        .map(|r| MigrationView::of(m, r))
        .collect()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    #[serde(default = "default_limit")]
    limit: usize,
    /// Only the migrations under way.
    #[serde(default)]
    running: bool,
}

fn default_limit() -> usize {
    1000
}

pub(super) async fn list(
    State(app): AppState,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "{}; the query takes limit=N, a whole number, and running=true|false",
                e.body_text()
            ),
        )
    })?;
    if q.limit == 0 || q.limit > MAX_PAGE {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("limit must be 1 to {MAX_PAGE}, got {}", q.limit),
        ));
    }
    if q.running {
        let mut all = running(&app.manager);
        all.truncate(q.limit);
        return Ok(Json(all).into_response());
    }
    let views = call(&app, move |m| {
        let records = m.migrations(q.limit)?;
        Ok(records
            .into_iter()
            .map(|r| MigrationView::of(m, r))
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(views).into_response())
}

pub(super) async fn show(State(app): AppState, Path(id): Path<String>) -> ApiResult<Response> {
    let id: u64 = id.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("migration id {id:?} is not a whole number; /v1/migrations lists them"),
        )
    })?;
    let (running, next) = app
        .manager
        .read(|s| (s.running.get(&id).cloned(), s.next_migration));
    if let Some(r) = running {
        return Ok(Json(MigrationView::of(&app.manager, r)).into_response());
    }
    // Finished records live in the store only. Ids are handed out one after another and
    // the store answers newest first, so record `id` is within the latest `next - id`:
    // the one a client just watched finish is read alone.
    let depth = usize::try_from(next.saturating_sub(id)).map_or(MAX_PAGE, |d| d.clamp(1, MAX_PAGE));
    let found = call(&app, move |m| {
        Ok(m.migrations(depth)?.into_iter().find(|r| r.id == id))
    })
    .await?;
    found
        .map(|r| {
            Json(MigrationView {
                record: r,
                progress: None,
            })
            .into_response()
        })
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no migration {id}; /v1/migrations lists the latest"),
            )
        })
}
