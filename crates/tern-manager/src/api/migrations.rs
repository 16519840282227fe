//! Migrations with their live telemetry: `GET /v1/migrations` (records, newest first, or
//! with `running=true` only those under way) and `GET /v1/migrations/{id}`. A running
//! migration carries `progress`, the latest telemetry its source reported (see
//! [`crate::control::LiveMigrations`]); it is absent before the first report and after
//! the end.

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use tern_api::manager::{ListQuery, MigrationView};

use super::error::{ApiError, ApiResult, ErrorBody as Error};
use super::{call, limit, AppState, MAX_PAGE};
use crate::manager::Manager;
use crate::state::Migration;

/// A record with its live telemetry while it runs.
fn view_of(m: &Manager, record: Migration) -> MigrationView {
    let progress = record
        .finished
        .is_none()
        .then(|| m.live().get(record.id))
        .flatten();
    MigrationView { record, progress }
}

/// The migrations under way, oldest first, with their telemetry; reads memory only.
pub fn running(m: &Manager) -> Vec<MigrationView> {
    let records: Vec<Migration> = m.read(|s| s.running.values().cloned().collect());
    records.into_iter().map(|r| view_of(m, r)).collect()
}

#[utoipa::path(get, path = "/v1/migrations", operation_id = "listMigrations",
    summary = "Migration records, newest first; running ones carry their telemetry.",
    params(("limit" = Option<usize>, Query, description = "at most this many (1-10000)", example = 100),
        ("running" = Option<bool>, Query, description = "only the migrations under way, oldest first", example = false)),
    responses((status = 200, description = "migrations", body = Vec<MigrationView>), (status = 400, description = "error", body = Error)))]
pub(super) async fn list(
    State(app): AppState,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; the query takes limit=N, a whole number, and running=true|false",
            e.body_text()
        ))
    })?;
    limit(q.limit)?;
    if q.running {
        let mut all = running(&app.manager);
        all.truncate(q.limit);
        return Ok(Json(all).into_response());
    }
    let views = call(&app, move |m| {
        let records = m.migrations(q.limit)?;
        Ok(records
            .into_iter()
            .map(|r| view_of(m, r))
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(views).into_response())
}

#[utoipa::path(get, path = "/v1/migrations/{id}", operation_id = "showMigration",
    summary = "One migration; while it runs, its latest telemetry (round, bytes transferred and remaining, dirty rate, phase, predicted downtime).",
    params(("id" = u64, Path, description = "the migration's id", minimum = 1, example = 1)),
    responses((status = 200, description = "the migration", body = MigrationView), (status = 400, description = "error", body = Error), (status = 404, description = "error", body = Error)))]
pub(super) async fn show(State(app): AppState, Path(id): Path<String>) -> ApiResult<Response> {
    let id: u64 = id.parse().map_err(|_| {
        ApiError::BadRequest(format!(
            "migration id {id:?} is not a whole number; /v1/migrations lists them"
        ))
    })?;
    let (running, next) = app
        .manager
        .read(|s| (s.running.get(&id).cloned(), s.next_migration));
    if let Some(r) = running {
        return Ok(Json(view_of(&app.manager, r)).into_response());
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
            ApiError::NotFound(format!(
                "no migration {id}; /v1/migrations lists the latest"
            ))
        })
}
