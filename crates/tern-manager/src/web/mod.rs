//! The manager's web page: one HTML page at `/` with its script and style (embedded,
//! served without a token because they hold no data), `GET /v1/history`, the balance
//! score over time and the recent events, and `GET /v1/vm-actions`, what each VM state
//! allows (the page's buttons), behind the API's bearer token like the rest of `/v1`.
//!
//! The page takes the token from `?token=` (then drops it from the address bar) or from
//! its login field, keeps it in the tab's `sessionStorage`, and sends it as
//! `Authorization: Bearer` on every call to the JSON API, which it polls every 1.5 s.
//! A VM's row has a button for each action its state allows; the rules are those of
//! [`crate::decide::lifecycle`], which `GET /v1/vm-actions` hands the page, and the API
//! checks them again on the call (a 409 the page shows when the state moved meanwhile).
//!
//! - [`history`]: the sampled score curve.

pub mod history;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::api::error::{ApiError, ApiResult};
use crate::decide::lifecycle;
use crate::manager::Manager;
use crate::state::Event;
use crate::state::VmState;
use history::{History, Sample};

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// Time between score samples.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// Most recent events one history answer carries.
const MAX_EVENTS: u64 = 500;

struct Web {
    manager: Weak<Manager>,
    history: Mutex<History>,
}

/// The page and its assets; no token needed.
pub fn page_routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let asset = |ctype: &'static str, body: &'static str| {
        get(move || async move {
            (
                [
                    (header::CONTENT_TYPE, ctype),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                body,
            )
        })
    };
    Router::new()
        .route("/", asset("text/html; charset=utf-8", INDEX_HTML))
        .route(
            "/web/app.js",
            asset("text/javascript; charset=utf-8", APP_JS),
        )
        .route(
            "/web/style.css",
            asset("text/css; charset=utf-8", STYLE_CSS),
        )
}

/// `GET /v1/history`, to be put behind the API's token check. Starts the sampler, which
/// runs until `stopping` turns true or the manager is dropped.
pub fn api_routes<S: Clone + Send + Sync + 'static>(
    manager: &Arc<Manager>,
    stopping: watch::Receiver<bool>,
) -> Router<S> {
    let web = Arc::new(Web {
        manager: Arc::downgrade(manager),
        history: Mutex::new(History::default()),
    });
    // A router built outside a runtime (none is, today) serves history that is sampled
    // on request only.
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(sampler(web.clone(), stopping));
    }
    Router::new()
        .route("/v1/history", get(history))
        .route("/v1/vm-actions", get(vm_actions))
        .with_state(web)
}

impl Web {
    /// Takes one sample now; false once the manager is gone.
    async fn sample(self: &Arc<Self>) -> bool {
        let Some(m) = self.manager.upgrade() else {
            return false;
        };
        // Copy under the lock, score outside it: scoring a large cluster takes
        // milliseconds that API calls should not wait for.
        let web = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let now = m.now();
            let input = m.read(history::ScoreInput::of);
            let s = input.sample(now);
            web.history
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(s);
        })
        .await;
        true
    }
}

async fn sampler(web: Arc<Web>, mut stopping: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = async move {
        let _ = stopping.wait_for(|s| *s).await;
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = tick.tick() => {
                if !web.sample().await {
                    return;
                }
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    /// How many of the latest events to include.
    #[serde(default = "default_events")]
    events: u64,
}

fn default_events() -> u64 {
    50
}

/// Score samples, oldest first, and the latest events, oldest first.
#[derive(Serialize, utoipa::ToSchema)]
struct HistoryAnswer {
    sample_every_ms: u64,
    scores: Vec<Sample>,
    /// Sequence number of the last event (0: none yet).
    last_event: u64,
    /// The latest events, oldest first.
    events: Vec<Event>,
}

#[utoipa::path(get, path = "/v1/history", operation_id = "history",
    summary = "The balance score over time and the latest events, for the web page at /.",
    description = "The manager samples the spread score of its state every sample_every_ms and keeps the last 900 samples in memory (a restarted manager starts a new curve).",
    params(("events" = Option<u64>, Query, description = "how many of the latest events to include (0-500, default 50)", maximum = 500, example = 20)),
    responses((status = 200, description = "score samples, oldest first, and the latest events, oldest first", body = HistoryAnswer),
        (status = 400, description = "error", body = crate::api::error::ErrorBody)))]
async fn history(
    State(web): State<Arc<Web>>,
    q: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let Query(q) = q.map_err(|e| {
        ApiError::BadRequest(format!(
            "{}; the query takes events=N, a whole number",
            e.body_text()
        ))
    })?;
    if q.events > MAX_EVENTS {
        return Err(ApiError::BadRequest(format!(
            "events must be 0 to {MAX_EVENTS}, got {}",
            q.events
        )));
    }
    let gone = || ApiError::Unavailable("the manager is stopping".into());
    let m = web.manager.upgrade().ok_or_else(gone)?;
    let empty = web
        .history
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .samples()
        .is_empty();
    // The first viewer after a start need not wait a whole interval for a point.
    if empty {
        web.sample().await;
    }
    let (last_event, events) = tokio::task::spawn_blocking(move || {
        let last = m.read(|s| s.last_event);
        let events = match q.events {
            0 => Ok(Vec::new()),
            n => m.events_since(last.saturating_sub(n), n as usize),
        };
        events.map(|e| (last, e))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(ApiError::from)?;
    let scores = web
        .history
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .samples();
    Ok(Json(HistoryAnswer {
        sample_every_ms: SAMPLE_EVERY.as_millis() as u64,
        scores,
        last_event,
        events,
    })
    .into_response())
}

/// What the page may offer on a VM, by its state.
#[derive(Serialize, utoipa::ToSchema)]
pub struct VmActions {
    /// For each VM state, the actions it allows, in the order the page shows them: the
    /// lifecycle actions (`POST /v1/vms/{name}/ACTION`), then `delete`
    /// (`DELETE /v1/vms/{name}`).
    #[schema(example = json!({"running": ["stop", "reboot", "pause", "suspend", "delete"], "migrating": []}))]
    pub actions: BTreeMap<&'static str, Vec<&'static str>>,
}

/// The action table of the lifecycle's state machine (pure).
pub fn vm_action_table() -> VmActions {
    let actions = VmState::ALL
        .into_iter()
        .map(|s| {
            let mut a: Vec<&'static str> = lifecycle::allowed(s)
                .into_iter()
                .map(|a| a.as_str())
                .collect();
            if lifecycle::may_delete(s) {
                a.push("delete");
            }
            (s.as_str(), a)
        })
        .collect();
    VmActions { actions }
}

#[utoipa::path(get, path = "/v1/vm-actions", operation_id = "vmActions",
    summary = "The actions each VM state allows, for the web page's buttons.",
    description = "The same rules the lifecycle routes apply: a call the table allows may still answer 409 when the VM's state changed meanwhile.",
    responses((status = 200, description = "for each state, the actions it allows", body = VmActions)))]
async fn vm_actions() -> Json<VmActions> {
    Json(vm_action_table())
}
