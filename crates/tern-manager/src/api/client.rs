//! A small client of this API, for the `tern host/policy/events` commands: JSON in and
//! out, the server's `{error}` message kept, the status telling bad input from failure.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::Method;
use serde_json::Value;

/// What a call can end in besides success.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The manager refused the request (4xx): the message says what to change.
    #[error("{message} (HTTP {status})")]
    Refused { status: u16, message: String },
    /// The manager could not be reached or failed (5xx).
    #[error("{0}")]
    Failed(String),
}

/// A connection to one manager.
pub struct ApiClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(base: &str, token: &str) -> Result<Self, CallError> {
        if !base.starts_with("http://") && !base.starts_with("https://") {
            return Err(CallError::Refused {
                status: 0,
                message: format!("manager URL {base:?} must start with http://"),
            });
        }
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            http: reqwest::Client::new(),
        })
    }

    /// One request; a 2xx answer's JSON (or `null` for an empty body).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, CallError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .http
            .request(method.clone(), &url)
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(30));
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CallError::Failed(format!("{method} {url}: {e}")))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| CallError::Failed(format!("{method} {url}: {e}")))?;
        let json: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        if status.is_success() {
            return Ok(json);
        }
        let message = json["error"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| json.to_string());
        if status.is_client_error() {
            Err(CallError::Refused {
                status: status.as_u16(),
                message,
            })
        } else {
            Err(CallError::Failed(format!(
                "{method} {url}: HTTP {status}: {message}"
            )))
        }
    }

    /// Follows `/v1/events/stream` from `since`, calling `each` with every event until the
    /// stream ends.
    pub async fn follow_events(
        &self,
        since: u64,
        mut each: impl FnMut(Value),
    ) -> Result<(), CallError> {
        let url = format!("{}/v1/events/stream?since={since}", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| CallError::Failed(format!("GET {url}: {e}")))?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            return Err(CallError::Refused {
                status,
                message: text,
            });
        }
        let mut stream = resp.bytes_stream();
        let mut buf = String::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| CallError::Failed(format!("GET {url}: {e}")))?;
            buf.push_str(&String::from_utf8_lossy(&chunk));
            // Server-sent events end with a blank line; keep a partial one for later.
            while let Some(end) = buf.find("\n\n") {
                let message: String = buf.drain(..end + 2).collect();
                for line in message.lines() {
                    if let Some(data) = line.strip_prefix("data:") {
                        if let Ok(v) = serde_json::from_str(data.trim()) {
                            each(v);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}
