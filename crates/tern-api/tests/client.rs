//! The one client against a real HTTP server on a loopback port: the bearer token is
//! sent, an error answer keeps its status and the server's message, a slow answer is a
//! timeout, and an answer over the cap is refused however it is sent.

use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use tern_api::client::{Client, ClientError, ClientOptions};

async fn serve() -> String {
    let app = Router::new()
        .route(
            "/v1/ok",
            get(|h: HeaderMap| async move {
                let auth = h
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                Json(json!({"auth": auth}))
            }),
        )
        .route(
            "/v1/missing",
            get(|| async {
                (
                    StatusCode::NOT_FOUND,
                    Json(json!({"error": "no VM named \"x\"", "kind": "not_found"})),
                )
            }),
        )
        .route(
            "/v1/plain-error",
            get(|| async { (StatusCode::BAD_GATEWAY, "upstream down") }),
        )
        .route(
            "/v1/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Json(json!({}))
            }),
        )
        .route("/v1/big", get(|| async { Json(vec![7u8; 300_000]) }))
        .route(
            "/v1/big-chunked",
            get(|| async {
                // No Content-Length: only reading stops this one.
                let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![b' '; 16 * 1024]));
                Body::from_stream(futures_util::stream::iter(chunks))
            }),
        )
        .route("/v1/empty", get(|| async { StatusCode::NO_CONTENT }))
        .route("/v1/not-json", get(|| async { "hello" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn client(base: &str, timeout: Duration, max_body_bytes: usize) -> Client {
    let options = ClientOptions {
        timeout,
        max_body_bytes,
        ..ClientOptions::default()
    };
    Client::new(base, "s3cret", options).unwrap()
}

#[tokio::test]
async fn answers_and_errors_are_typed() {
    let base = serve().await;
    let c = client(&base, Duration::from_secs(10), 1 << 20);

    let v: Value = c.get("/v1/ok").await.unwrap();
    assert_eq!(v["auth"], "Bearer s3cret");

    let e = c.get::<Value>("/v1/missing").await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    match &e {
        ClientError::Remote {
            status, message, ..
        } => assert_eq!((*status, message.as_str()), (404, "no VM named \"x\"")),
        e => panic!("{e}"),
    }
    let e = c.get::<Value>("/v1/plain-error").await.unwrap_err();
    assert_eq!(e.status(), Some(502));
    assert!(e.to_string().contains("upstream down"), "{e}");

    let nothing: Option<Value> = c.get("/v1/empty").await.unwrap();
    assert_eq!(nothing, None);
    let e = c.get::<Value>("/v1/not-json").await.unwrap_err();
    assert!(matches!(e, ClientError::Decode { .. }), "{e}");
}

#[tokio::test]
async fn a_slow_answer_is_a_timeout() {
    let base = serve().await;
    let c = client(&base, Duration::from_millis(300), 1 << 20);
    let e = c.get::<Value>("/v1/slow").await.unwrap_err();
    assert!(matches!(e, ClientError::Timeout { .. }), "{e}");
}

#[tokio::test]
async fn answers_over_the_cap_are_refused() {
    let base = serve().await;
    let c = client(&base, Duration::from_secs(10), 100_000);
    for path in ["/v1/big", "/v1/big-chunked"] {
        let e = c.get::<Value>(path).await.unwrap_err();
        assert!(
            matches!(e, ClientError::TooLarge { limit: 100_000, .. }),
            "{path}: {e}"
        );
    }
    // The same answers fit under a larger cap.
    let c = client(&base, Duration::from_secs(10), 4 << 20);
    let big: Vec<u8> = c.get("/v1/big").await.unwrap();
    assert_eq!(big.len(), 300_000);
}

#[tokio::test]
async fn unreachable_and_malformed_addresses() {
    let e = Client::new("198.18.0.1:7070", "t", ClientOptions::default())
        .err()
        .unwrap();
    assert!(matches!(e, ClientError::BadUrl { .. }), "{e}");
    // Nothing listens on port 9 of loopback.
    let c = client("http://127.0.0.1:9", Duration::from_secs(5), 1 << 20);
    let e = c.get::<Value>("/v1/ok").await.unwrap_err();
    assert!(matches!(e, ClientError::Transport { .. }), "{e}");
    assert_eq!(e.status(), None);
}

/// The process's peak resident memory since the last [`reset_peak`], in bytes (Linux).
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib << 10
}

/// Starts a new peak at the current resident memory.
fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    peak_rss_bytes()
}

/// A hostile agent answering 150 MB, streamed, to the routes the manager polls.
async fn serve_150_mb() -> String {
    let huge = || async {
        let chunks = (0..150 * 16).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024]));
        Body::from_stream(futures_util::stream::iter(chunks))
    };
    let app = Router::new()
        .route("/v1/host", get(huge))
        .route("/v1/vms", get(huge));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_150_mb_answer_costs_the_caller_at_most_its_route_cap() {
    let base = serve_150_mb().await;
    use tern_api::client::agent::AGENT_LIST_MAX_BYTES;
    let agent = tern_api::client::AgentClient::new(&base, "t", Duration::from_secs(30)).unwrap();
    let defaults = ClientOptions::default();
    let before = reset_peak();
    let e = agent.host().await.err().unwrap();
    assert!(
        matches!(e, ClientError::TooLarge { limit, .. } if limit == defaults.max_body_bytes),
        "{e}"
    );
    let host_growth = peak_rss_bytes().saturating_sub(before);
    let before = reset_peak();
    let e = agent.list_vms().await.err().unwrap();
    assert!(
        matches!(e, ClientError::TooLarge { limit, .. } if limit == AGENT_LIST_MAX_BYTES),
        "{e}"
    );
    let list_growth = peak_rss_bytes().saturating_sub(before);
    eprintln!(
        "150 MB answers: peak resident memory grew {} KiB for the host route, {} KiB for a list",
        host_growth >> 10,
        list_growth >> 10
    );
    assert!(host_growth < 16 << 20, "{host_growth}");
    assert!(list_growth < 32 << 20, "{list_growth}");
}
