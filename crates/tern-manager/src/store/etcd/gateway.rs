//! A small etcd v3 client over etcd's JSON gateway (`POST /v3/kv/range`, `/v3/kv/txn`,
//! `/v3/lease/*`), which every etcd since 3.4 serves on its client port.
//!
//! Why not gRPC: the gRPC client crate generates its code with `protoc` at build time and
//! brings a second HTTP/2 stack; the gateway needs only the HTTP client the manager already
//! has. Keys and values travel base64-encoded and 64-bit integers as strings, as the
//! gateway's protobuf-JSON mapping wants.
//!
//! Requests go to the endpoint that last answered; one that does not answer (or answers
//! "unavailable") is skipped for the next, so a cluster that lost a member still serves.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// gRPC status codes worth retrying on another member.
const UNAVAILABLE: i64 = 14;
const DEADLINE_EXCEEDED: i64 = 4;

/// One etcd cluster, reached through any of its members.
pub struct Gateway {
    http: reqwest::Client,
    endpoints: Vec<String>,
    /// Index of the member that answered last; tried first.
    current: AtomicUsize,
}

/// A key-value pair as etcd returns it.
#[derive(Clone, Debug, Deserialize)]
pub struct Kv {
    #[serde(deserialize_with = "de_b64")]
    pub key: Vec<u8>,
    #[serde(default, deserialize_with = "de_b64")]
    pub value: Vec<u8>,
    #[serde(default, deserialize_with = "de_i64")]
    pub create_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    pub mod_revision: i64,
    /// The lease the key is attached to (0: none).
    #[serde(default, deserialize_with = "de_i64")]
    pub lease: i64,
}

#[derive(Debug, Default, Deserialize)]
pub struct Header {
    #[serde(default, deserialize_with = "de_i64")]
    pub revision: i64,
}

#[derive(Debug, Default, Deserialize)]
pub struct RangeResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub kvs: Vec<Kv>,
}

#[derive(Debug, Default, Deserialize)]
pub struct OpResponse {
    #[serde(default)]
    pub response_range: Option<RangeResponse>,
}

#[derive(Debug, Default, Deserialize)]
pub struct TxnResponse {
    #[serde(default)]
    pub header: Header,
    /// The gateway leaves out `false`, so absent means the compares failed.
    #[serde(default)]
    pub succeeded: bool,
    #[serde(default)]
    pub responses: Vec<OpResponse>,
}

impl TxnResponse {
    /// The key-values of the `i`th operation, a range.
    pub fn range(&self, i: usize) -> &[Kv] {
        self.responses
            .get(i)
            .and_then(|r| r.response_range.as_ref())
            .map_or(&[], |r| &r.kvs)
    }
}

#[derive(Debug, Deserialize)]
struct LeaseGrant {
    #[serde(rename = "ID", deserialize_with = "de_i64")]
    id: i64,
    #[serde(rename = "TTL", default, deserialize_with = "de_i64")]
    ttl: i64,
}

#[derive(Debug, Deserialize)]
struct KeepAliveResult {
    #[serde(rename = "TTL", default, deserialize_with = "de_i64")]
    ttl: i64,
}

#[derive(Debug, Deserialize)]
struct KeepAlive {
    result: Option<KeepAliveResult>,
}

#[derive(Debug, Deserialize)]
struct GatewayError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    code: i64,
}

fn de_b64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    B64.decode(s).map_err(serde::de::Error::custom)
}

/// protobuf-JSON writes int64 as a string; accept a number too.
fn de_i64<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<i64, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => s.parse().map_err(serde::de::Error::custom),
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| serde::de::Error::custom("not an int64")),
        other => Err(serde::de::Error::custom(format!(
            "expected an int64, got {other}"
        ))),
    }
}

pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// The key just past every key that starts with `prefix` (etcd's `range_end` for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): every key from the prefix on.
    vec![0]
}

/// Operations and comparisons of a transaction, as gateway JSON.
pub mod op {
    use super::*;

    pub fn put(key: &[u8], value: &[u8], lease: Option<i64>) -> Value {
        let mut p = json!({ "key": b64(key), "value": b64(value) });
        if let Some(l) = lease {
            p["lease"] = json!(l.to_string());
        }
        json!({ "request_put": p })
    }

    pub fn delete(key: &[u8]) -> Value {
        json!({ "request_delete_range": { "key": b64(key) } })
    }

    pub fn get(key: &[u8]) -> Value {
        json!({ "request_range": { "key": b64(key) } })
    }

    pub fn get_prefix(prefix: &[u8]) -> Value {
        json!({ "request_range": { "key": b64(prefix), "range_end": b64(&prefix_end(prefix)) } })
    }

    /// Holds when `key` was created at `revision` (0: the key does not exist).
    pub fn created_at(key: &[u8], revision: i64) -> Value {
        json!({ "key": b64(key), "target": "CREATE", "result": "EQUAL",
                "create_revision": revision.to_string() })
    }

    /// Holds when `key` was last written at `revision` (0: the key does not exist).
    pub fn modified_at(key: &[u8], revision: i64) -> Value {
        json!({ "key": b64(key), "target": "MOD", "result": "EQUAL",
                "mod_revision": revision.to_string() })
    }
}

impl Gateway {
    /// A client of the cluster whose members answer at `endpoints` (`http://HOST:PORT`);
    /// each request gives up on a member after `timeout`.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(Error::BadInput(
                "no etcd endpoint: give --etcd http://HOST:PORT[,http://HOST:PORT...]".into(),
            ));
        }
        for e in endpoints {
            check_endpoint(e)?;
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .build()
            .map_err(|e| Error::Etcd(format!("HTTP client: {e}")))?;
        Ok(Self {
            http,
            endpoints: endpoints
                .iter()
                .map(|e| e.trim_end_matches('/').to_owned())
                .collect(),
            current: AtomicUsize::new(0),
        })
    }

    /// POSTs `body` to `path` on the current member, moving on to the next while members
    /// are unreachable or unavailable.
    async fn post<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T> {
        let n = self.endpoints.len();
        let first = self.current.load(Ordering::Relaxed) % n;
        let mut failures = Vec::new();
        for i in 0..n {
            let at = (first + i) % n;
            let url = format!("{}{path}", self.endpoints[at]);
            let resp = match self.http.post(&url).json(body).send().await {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{}: {e}", self.endpoints[at]));
                    continue;
                }
            };
            let status = resp.status();
            let text = match resp.text().await {
                Ok(t) => t,
                Err(e) => {
                    failures.push(format!("{}: {e}", self.endpoints[at]));
                    continue;
                }
            };
            if !status.is_success() {
                let err: GatewayError = serde_json::from_str(&text).unwrap_or(GatewayError {
                    message: text.clone(),
                    code: 0,
                });
                if matches!(err.code, UNAVAILABLE | DEADLINE_EXCEEDED) || status.is_server_error() {
                    failures.push(format!("{}: {}", self.endpoints[at], err.message));
                    continue;
                }
                return Err(Error::Etcd(format!("{path}: {}", err.message)));
            }
            self.current.store(at, Ordering::Relaxed);
            return serde_json::from_str(&text)
                .map_err(|e| Error::Etcd(format!("{path}: unreadable answer ({e}): {text}")));
        }
        Err(Error::Etcd(format!(
            "no etcd member answered: {}",
            failures.join("; ")
        )))
    }

    /// Runs a transaction: `success` if every comparison holds, else `failure`.
    pub async fn txn(
        &self,
        compare: Vec<Value>,
        success: Vec<Value>,
        failure: Vec<Value>,
    ) -> Result<TxnResponse> {
        let body = json!({ "compare": compare, "success": success, "failure": failure });
        self.post("/v3/kv/txn", &body).await
    }

    /// Keys from `from` up to (not including) `end`, in key order (descending if
    /// `descending`), at most `limit` (0: no limit).
    pub async fn range(
        &self,
        from: &[u8],
        end: &[u8],
        limit: usize,
        descending: bool,
    ) -> Result<Vec<Kv>> {
        let mut body =
            json!({ "key": b64(from), "range_end": b64(end), "limit": limit.to_string() });
        if descending {
            body["sort_order"] = json!("DESCEND");
            body["sort_target"] = json!("KEY");
        }
        let r: RangeResponse = self.post("/v3/kv/range", &body).await?;
        Ok(r.kvs)
    }

    /// A new lease of `ttl_s` seconds; returns its id and the TTL etcd granted.
    pub async fn grant(&self, ttl_s: i64) -> Result<(i64, i64)> {
        let g: LeaseGrant = self
            .post("/v3/lease/grant", &json!({ "TTL": ttl_s.to_string() }))
            .await?;
        Ok((g.id, g.ttl))
    }

    /// Renews lease `id`; returns its new TTL, 0 if the lease is gone.
    pub async fn keep_alive(&self, id: i64) -> Result<i64> {
        let k: KeepAlive = self
            .post("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))
            .await?;
        Ok(k.result.map_or(0, |r| r.ttl))
    }

    /// Ends lease `id` at once, deleting the keys attached to it.
    pub async fn revoke(&self, id: i64) -> Result<()> {
        self.post::<Value>("/v3/lease/revoke", &json!({ "ID": id.to_string() }))
            .await
            .map(|_| ())
    }
}

/// An endpoint must be a plain `http://HOST:PORT` (this build speaks no TLS to etcd).
pub fn check_endpoint(e: &str) -> Result<()> {
    let rest = e.strip_prefix("http://").ok_or_else(|| {
        Error::BadInput(format!(
            "etcd endpoint {e:?} must start with http:// (e.g. http://127.0.0.1:2379)"
        ))
    })?;
    let hostport = rest.trim_end_matches('/');
    let ok = hostport
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !ok || hostport.contains('/') {
        return Err(Error::BadInput(format!(
            "etcd endpoint {e:?} must be http://HOST:PORT (e.g. http://127.0.0.1:2379)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/tern/"), b"/tern0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn answers_parse_with_string_integers_and_missing_defaults() {
        let t: TxnResponse = serde_json::from_str(
            r#"{"header":{"revision":"3"},"responses":[{"response_range":{"kvs":[
                {"key":"bGVhZGVy","create_revision":"3","mod_revision":"3","value":"eA=="}]}}]}"#,
        )
        .unwrap();
        assert!(!t.succeeded);
        assert_eq!(t.header.revision, 3);
        assert_eq!(t.range(0)[0].key, b"leader");
        assert_eq!(t.range(0)[0].value, b"x");
        assert!(t.range(1).is_empty());
        let k: KeepAlive = serde_json::from_str(r#"{"result":{"ID":"7"}}"#).unwrap();
        assert_eq!(k.result.unwrap().ttl, 0);
    }

    #[test]
    fn endpoints_are_checked() {
        assert!(check_endpoint("http://127.0.0.1:2379").is_ok());
        assert!(check_endpoint("http://etcd-1:2379/").is_ok());
        for bad in [
            "127.0.0.1:2379",
            "https://a:1",
            "http://a",
            "http://a:x",
            "http://a:1/v3",
        ] {
            assert!(
                matches!(check_endpoint(bad), Err(Error::BadInput(_))),
                "{bad}"
            );
        }
    }
}
