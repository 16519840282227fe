//! One manager of several: the API in front, the election and the control loop behind.
//!
//! Every request but `/openapi.json` is routed by [`super::route`]: served here while this
//! manager leads, else passed to the leader (reads too, since only the leader's view is
//! current) and its answer relayed, streams included. A request that cannot reach a
//! leader gets 503 and `{"error": "not the leader; ..."}` naming the leader if known.
//!
//! With the cluster CA ([`Pki`]) every manager serves HTTPS with a certificate of its
//! own and passes requests to the leader over TLS, showing that certificate. A follower
//! checks a request's credentials before passing it on as the leader would: the bearer
//! token (and no host certificate) for the API, the host's own certificate for its
//! lease, which it names to the leader in [`crate::api::LEASE_HOST`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::election::Election;
use super::{Leadership, Route};
use crate::api::error::ApiError;
use crate::api::Serving;
use crate::control::Control;
use crate::manager::Manager;

/// Marks a request one manager passed to another, so it is not passed on again.
pub const FORWARDED: &str = "x-tern-forwarded-by";

/// How one manager of several serves and reaches the leader: with the cluster CA, its
/// own certificate for both (`client` shows it to the leader and checks the leader's
/// against the CA); without, plain HTTP.
#[derive(Clone, Default)]
pub struct Pki {
    pub serving: Serving,
    pub client: Option<rustls::ClientConfig>,
}

struct Forwarder {
    leadership: Arc<Leadership>,
    http: reqwest::Client,
    /// Checked before a body is read to be passed on, so an unauthenticated caller
    /// costs a follower no memory and the leader nothing at all.
    tokens: Vec<String>,
}

/// Serves the API on `listener`, campaigns for leadership with `election` and runs
/// `control` while leading, until `shutdown`.
pub async fn run(
    listener: TcpListener,
    manager: Arc<Manager>,
    control: Arc<Control>,
    tokens: Vec<String>,
    leadership: Arc<Leadership>,
    election: Election,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let pki = Pki::default();
    run_with(
        listener, manager, control, tokens, leadership, election, pki, shutdown,
    )
    .await
}

/// [`run`], serving and reaching the leader as `pki` says.
#[allow(clippy::too_many_arguments)]
pub async fn run_with(
    listener: TcpListener,
    manager: Arc<Manager>,
    control: Arc<Control>,
    tokens: Vec<String>,
    leadership: Arc<Leadership>,
    election: Election,
    pki: Pki,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stopping) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let m = manager.clone();
    let campaign = {
        let leadership = leadership.clone();
        let stop = stopped(stopping.clone());
        tokio::spawn(async move {
            let reload = move || {
                let m = m.clone();
                async move {
                    tokio::task::spawn_blocking(move || m.reload())
                        .await
                        .map_err(|e| crate::Error::Etcd(format!("reloading the state: {e}")))?
                }
            };
            election.run(leadership, reload, stop).await;
        })
    };
    let looping = tokio::spawn(lead_while_elected(
        control,
        leadership.clone(),
        stopped(stopping.clone()),
    ));
    if let (Some(ca), Some(trust)) = (&pki.serving.ca, &pki.serving.trust) {
        let every = pki.serving.crl_refresh.unwrap_or(crate::api::CRL_REFRESH);
        let fresh = crate::api::keep_crl_fresh(ca.clone(), trust.clone(), every, stopping.clone());
        tokio::spawn(fresh);
    }
    let (tls, limits) = (pki.serving.tls.clone(), pki.serving.limits);
    let app = router_with(manager, tokens, leadership, stopping.clone(), pki)?;
    let served = tern_pki::serve::serve(listener, app, tls, limits, stopped(stopping)).await;
    let _ = looping.await;
    let _ = campaign.await;
    served
}

/// The API of one manager of several: [`crate::api::router`] behind the layer that
/// serves a request here while this manager leads and passes it to the leader otherwise.
pub fn router(
    manager: Arc<Manager>,
    tokens: Vec<String>,
    leadership: Arc<Leadership>,
    stopping: watch::Receiver<bool>,
) -> std::io::Result<axum::Router> {
    router_with(manager, tokens, leadership, stopping, Pki::default())
}

/// [`router`] with the cluster CA of `pki`, reaching the leader with its client.
pub fn router_with(
    manager: Arc<Manager>,
    tokens: Vec<String>,
    leadership: Arc<Leadership>,
    stopping: watch::Receiver<bool>,
    pki: Pki,
) -> std::io::Result<axum::Router> {
    let mut http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        // The leader closes connections idle for 10 s; reuse only fresher ones.
        .pool_idle_timeout(Duration::from_secs(5));
    if let Some(tls) = pki.client {
        http = http.use_preconfigured_tls(tls);
    }
    let forwarder = Arc::new(Forwarder {
        leadership,
        http: http.build().map_err(std::io::Error::other)?,
        tokens: tokens.clone(),
    });
    let (ca, trust) = (pki.serving.ca, pki.serving.trust);
    Ok(
        crate::api::router_with_ca(manager, tokens, stopping, ca, trust)
            .layer(middleware::from_fn_with_state(forwarder, forward)),
    )
}

/// Runs the control loop during each term this manager leads, stopping it the moment
/// the term ends.
async fn lead_while_elected(
    control: Arc<Control>,
    leadership: Arc<Leadership>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut leading = leadership.watch();
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            r = leading.wait_for(|l| *l) => if r.is_err() { return },
        }
        let mut lost = leadership.watch();
        let ended = async move {
            let _ = lost.wait_for(|l| !*l).await;
        };
        tokio::select! {
            _ = &mut shutdown => return,
            _ = control.clone().run(ended) => {}
        }
    }
}

async fn forward(State(f): State<Arc<Forwarder>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/openapi.json" {
        return next.run(req).await;
    }
    let forwarded = req.headers().contains_key(FORWARDED);
    match f.leadership.route(forwarded) {
        Route::Local => next.run(req).await,
        Route::Refuse(msg) => ApiError::Unavailable(msg).into_response(),
        Route::Forward(leader) => {
            let lease_of = match check_before_passing_on(&f.tokens, &req) {
                Ok(l) => l,
                Err(e) => return e.into_response(),
            };
            // A WebSocket (the serial console) is not relayed between managers: the
            // client is sent to the leader, which serves it.
            if is_upgrade(req.headers()) {
                return ApiError::Unavailable(format!(
                    "not the leader; a console (WebSocket) is served by the leader: attach \
                     at {leader}"
                ))
                .into_response();
            }
            match pass_on(&f, &leader, req, lease_of).await {
                Ok(r) => r,
                Err(e) => e.into_response(),
            }
        }
    }
}

/// Whether a request asks to switch protocols (a WebSocket) (pure).
fn is_upgrade(headers: &axum::http::HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
}

/// The route that takes no credential here: enrolment (a join token in the body, which
/// only the leader can check).
const PUBLIC: &str = "/v1/join";

/// The host of a lease route `/v1/hosts/{name}/lease` (pure).
fn lease_path(path: &str) -> Option<&str> {
    let name = path.strip_prefix("/v1/hosts/")?.strip_suffix("/lease")?;
    (!name.is_empty() && !name.contains('/')).then_some(name)
}

/// Checks a request's credentials as the leader would, before anything is read or
/// passed on (pure); for a lease renewal, the host whose renewal it is.
fn check_before_passing_on(tokens: &[String], req: &Request) -> Result<Option<String>, ApiError> {
    let path = req.uri().path();
    let secure = req.extensions().get::<tern_pki::Secure>();
    if path == PUBLIC {
        return Ok(None);
    }
    if path == "/v1/ca/crl" {
        crate::api::crl_caller(tokens, secure, req.headers())?;
        return Ok(None);
    }
    if let Some(host) = lease_path(path) {
        crate::api::lease_caller(tokens, secure, req.headers(), host)?;
        return Ok(Some(host.to_owned()));
    }
    crate::api::check_token(tokens, req.headers())?;
    crate::api::not_a_host(secure)?;
    Ok(None)
}

/// Sends `req` to the leader at `leader` and relays its answer as it streams in. The
/// body is read first, up to the API's own limit. `lease_of`: the host whose lease
/// renewal this is, as checked here, named to the leader.
async fn pass_on(
    f: &Forwarder,
    leader: &str,
    req: Request,
    lease_of: Option<String>,
) -> Result<Response, ApiError> {
    let limit = crate::api::MAX_BODY_BYTES;
    let (parts, body) = req.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::TooLarge(limit));
    }
    let body = axum::body::to_bytes(body, limit).await.map_err(|e| {
        ApiError::BadRequest(format!(
            "reading the request body (at most {limit} bytes): {e}"
        ))
    })?;
    relay(f, leader, parts, body, lease_of).await.map_err(|e| {
        ApiError::Unavailable(format!(
            "not the leader; the leader is at {leader}, which did not answer: {e}"
        ))
    })
}

async fn relay(
    f: &Forwarder,
    leader: &str,
    parts: axum::http::request::Parts,
    body: axum::body::Bytes,
    lease_of: Option<String>,
) -> Result<Response, String> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", leader.trim_end_matches('/'));
    let method =
        reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).map_err(|e| e.to_string())?;
    let mut out = f
        .http
        .request(method, &url)
        .header(FORWARDED, f.leadership.me())
        .body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE, header::ACCEPT] {
        if let Some(v) = parts.headers.get(&name).and_then(|v| v.to_str().ok()) {
            out = out.header(name.as_str(), v);
        }
    }
    if let Some(host) = lease_of {
        out = out.header(crate::api::LEASE_HOST, host);
    }
    let resp = out.send().await.map_err(|e| e.to_string())?;
    let status = StatusCode::from_u16(resp.status().as_u16()).map_err(|e| e.to_string())?;
    let mut relayed = Response::builder().status(status);
    for name in [header::CONTENT_TYPE, header::CACHE_CONTROL] {
        if let Some(v) = resp
            .headers()
            .get(name.as_str())
            .and_then(|v| HeaderValue::from_bytes(v.as_bytes()).ok())
        {
            relayed = relayed.header(name, v);
        }
    }
    relayed
        .body(Body::from_stream(resp.bytes_stream()))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_routes_name_their_host() {
        assert_eq!(lease_path("/v1/hosts/h1/lease"), Some("h1"));
        assert_eq!(lease_path("/v1/hosts/h1/drain"), None);
        assert_eq!(lease_path("/v1/hosts//lease"), None);
        assert_eq!(lease_path("/v1/hosts/a/b/lease"), None);
    }

    #[test]
    fn websocket_requests_are_told_apart() {
        let mut h = axum::http::HeaderMap::new();
        assert!(!is_upgrade(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!is_upgrade(&h));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
    }
}
