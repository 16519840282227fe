//! One HTTP client for every tern API: bearer auth or a client certificate (mutual TLS
//! with the cluster CA), a connect and a request timeout, a cap on the size of answers,
//! and errors that say which of those failed. An error
//! answer becomes [`ClientError::Remote`] with the server's own message, so callers
//! decide on its status, never on its text.
//!
//! [`AgentClient`] and [`ManagerClient`] are the typed routes of the two servers on top
//! of the one [`Client`].

pub mod agent;
pub mod console;
mod manager;

pub use agent::AgentClient;
pub use manager::ManagerClient;

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// How long to wait and how much to read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientOptions {
    /// To open the TCP connection.
    pub connect_timeout: Duration,
    /// For the whole request, answer included.
    pub timeout: Duration,
    /// Largest answer body read, lists excepted; a longer one is an error rather than
    /// memory spent.
    pub max_body_bytes: usize,
    /// Largest answer to a list route (VMs, migrations, events, a plan), which grows
    /// with the cluster.
    pub max_list_bytes: usize,
}

impl ClientOptions {
    /// A request timeout of `timeout` with the default connect timeout and size cap.
    pub fn with_timeout(timeout: Duration) -> Self {
        ClientOptions {
            timeout,
            ..ClientOptions::default()
        }
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(30),
            // One VM, host, migration (at most 60 rounds of telemetry) or guest answer
            // is a few KiB: a server that sends more is broken or hostile.
            max_body_bytes: 4 << 20,
            // The largest lists are 10,000 migrations or events, or every VM of a
            // large cluster.
            max_list_bytes: 64 << 20,
        }
    }
}

/// What a call can end in besides success.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not one this client can call.
    #[error("{url:?} is not an http:// or https:// URL (e.g. http://198.18.0.1:7070)")]
    BadUrl { url: String },
    /// A client with a TLS identity asked to call a plain-HTTP URL: it would send its
    /// request to a server it cannot authenticate.
    #[error(
        "{url:?} is plain HTTP; with a cluster CA every call is https:// to a server whose \
         certificate the CA issued (enrol the host with `tern agent --join`)"
    )]
    NotHttps { url: String },
    /// The request has no route on the server.
    #[error("{what}")]
    NoRoute { what: String },
    /// The server answered with an error status; `message` is its `error` field (or
    /// the body as text when it is not the JSON error body).
    #[error("{method} {url} answered {status}: {message}")]
    Remote {
        method: Method,
        url: String,
        status: u16,
        message: String,
    },
    /// No connection, or it broke.
    #[error("{method} {url}: {source}")]
    Transport {
        method: Method,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {url}: no answer within {after:?}")]
    Timeout {
        method: Method,
        url: String,
        after: Duration,
    },
    #[error("{method} {url}: the answer is larger than {limit} bytes")]
    TooLarge {
        method: Method,
        url: String,
        limit: usize,
    },
    /// A console WebSocket could not be opened (connection, TLS, the upgrade).
    #[error("GET {url} (WebSocket): {message}")]
    WebSocket { url: String, message: String },
    /// A 2xx answer that is not the JSON the route returns.
    #[error("{method} {url}: unreadable answer: {source}")]
    Decode {
        method: Method,
        url: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The status of an error answer; `None` when the server did not answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Remote { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the server answered 404: the thing asked about does not exist there.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND.as_u16())
    }
}

/// The body of every error answer, agent's and manager's alike; the agent adds `kind`.
#[derive(Deserialize)]
struct ErrorAnswer {
    error: String,
}

/// A connection to one server.
#[derive(Clone)]
pub struct Client {
    base: String,
    token: String,
    http: reqwest::Client,
    options: ClientOptions,
}

impl Client {
    /// `base` like `http://198.18.0.1:7070`; `token` is sent as `Authorization: Bearer`.
    pub fn new(base: &str, token: &str, options: ClientOptions) -> Result<Client, ClientError> {
        Self::with_tls(base, token, options, None)
    }

    /// With `tls` (a configuration trusting only the cluster CA, usually presenting a
    /// client certificate), `base` must be `https://`; an empty `token` sends no
    /// `Authorization` header, the certificate being the credential.
    pub fn with_tls(
        base: &str,
        token: &str,
        options: ClientOptions,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<Client, ClientError> {
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(ClientError::BadUrl {
                url: base.to_string(),
            });
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .timeout(options.timeout)
            // Servers close idle connections after 10 s; dropping ours first keeps a
            // request from being sent on a connection the server is closing.
            .pool_idle_timeout(Duration::from_secs(5));
        if let Some(tls) = tls {
            if !base.starts_with("https://") {
                return Err(ClientError::NotHttps {
                    url: base.to_string(),
                });
            }
            builder = builder.use_preconfigured_tls(tls);
        }
        let http = builder.build().map_err(|source| ClientError::Transport {
            method: Method::GET,
            url: base.to_string(),
            source,
        })?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            http,
            options,
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Sends `body` (if any) as JSON and decodes the answer; an empty answer decodes as
    /// JSON `null` (so as `()` or `Option`).
    pub async fn send<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        self.send_within(method, path, body, None).await
    }

    /// [`Self::send`] allowing `timeout` instead of the client's own (a call that
    /// waits on purpose, such as a graceful stop).
    pub async fn send_within<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self.request(method.clone(), &url, body, timeout).await?;
        let bytes = self
            .read_capped(&method, &url, resp, self.options.max_body_bytes)
            .await?;
        decode(method, url, &bytes)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send::<(), T>(Method::GET, path, None).await
    }

    /// A GET of a list route, whose answer may be up to `max_list_bytes`.
    pub async fn get_list<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self.request::<()>(Method::GET, &url, None, None).await?;
        let bytes = self
            .read_capped(&Method::GET, &url, resp, self.options.max_list_bytes)
            .await?;
        decode(Method::GET, url, &bytes)
    }

    /// A GET whose answer is text, not JSON (the CA's revocation list).
    pub async fn get_text(&self, path: &str) -> Result<String, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self.request::<()>(Method::GET, &url, None, None).await?;
        let bytes = self
            .read_capped(&Method::GET, &url, resp, self.options.max_body_bytes)
            .await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub async fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(Method::POST, path, Some(body)).await
    }

    /// A POST without a body (the lifecycle actions).
    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send::<(), T>(Method::POST, path, None).await
    }

    pub async fn put<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        self.send(Method::PUT, path, Some(body)).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.send::<(), T>(Method::DELETE, path, None).await
    }

    /// Opens a long-lived answer (server-sent events): no request timeout, the status
    /// checked, the body left to read with [`Self::read_chunk`].
    pub async fn open_stream(&self, path: &str) -> Result<Stream, ClientError> {
        // A stream lasts as long as the server keeps it open.
        self.download(path, Duration::from_secs(u64::from(u32::MAX)))
            .await
    }

    /// Opens a large answer to read with [`Stream::read_chunk`] (an image file): the
    /// whole transfer may take `timeout`, and no size cap applies; the caller bounds
    /// what it reads.
    pub async fn download(&self, path: &str, timeout: Duration) -> Result<Stream, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .authorized(self.http.get(&url))
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| self.failed(Method::GET, &url, e))?;
        let resp = self.check(Method::GET, &url, resp).await?;
        Ok(Stream {
            method: Method::GET,
            url,
            resp,
        })
    }

    /// PUTs `body` as `application/octet-stream` (an image file) and decodes the JSON
    /// answer; the whole transfer may take `timeout`.
    pub async fn upload<T: DeserializeOwned>(
        &self,
        path: &str,
        body: reqwest::Body,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let url = format!("{}{path}", self.base);
        let resp = self
            .authorized(self.http.put(&url))
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .timeout(timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| self.failed(Method::PUT, &url, e))?;
        let resp = self.check(Method::PUT, &url, resp).await?;
        let bytes = self
            .read_capped(&Method::PUT, &url, resp, self.options.max_body_bytes)
            .await?;
        decode(Method::PUT, url, &bytes)
    }

    /// Sends the request; an answer with an error status is [`ClientError::Remote`].
    async fn request<B: Serialize + ?Sized>(
        &self,
        method: Method,
        url: &str,
        body: Option<&B>,
        timeout: Option<Duration>,
    ) -> Result<reqwest::Response, ClientError> {
        let mut req = self.authorized(self.http.request(method.clone(), url));
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(t) = timeout {
            req = req.timeout(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.failed(method.clone(), url, e))?;
        self.check(method, url, resp).await
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if self.token.is_empty() {
            req
        } else {
            req.bearer_auth(&self.token)
        }
    }

    /// An error status becomes [`ClientError::Remote`] with the server's message.
    async fn check(
        &self,
        method: Method,
        url: &str,
        resp: reqwest::Response,
    ) -> Result<reqwest::Response, ClientError> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = self
            .read_capped(&method, url, resp, self.options.max_body_bytes)
            .await?;
        let message = serde_json::from_slice::<ErrorAnswer>(&bytes)
            .map(|b| b.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
        Err(ClientError::Remote {
            method,
            url: url.to_string(),
            status: status.as_u16(),
            message,
        })
    }

    /// Reads the body chunk by chunk, stopping as soon as it passes `limit`.
    async fn read_capped(
        &self,
        method: &Method,
        url: &str,
        mut resp: reqwest::Response,
        limit: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let too_large = || ClientError::TooLarge {
            method: method.clone(),
            url: url.to_string(),
            limit,
        };
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut out = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| self.failed(method.clone(), url, e))?
        {
            if out.len() + chunk.len() > limit {
                return Err(too_large());
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    fn failed(&self, method: Method, url: &str, e: reqwest::Error) -> ClientError {
        if e.is_timeout() {
            ClientError::Timeout {
                method,
                url: url.to_string(),
                after: self.options.timeout,
            }
        } else {
            ClientError::Transport {
                method,
                url: url.to_string(),
                source: e,
            }
        }
    }
}

/// The JSON of an answer; an empty one decodes as `null` (so as `()` or `Option`).
fn decode<T: DeserializeOwned>(
    method: Method,
    url: String,
    bytes: &[u8],
) -> Result<T, ClientError> {
    let bytes: &[u8] = if bytes.is_empty() { b"null" } else { bytes };
    serde_json::from_slice(bytes).map_err(|source| ClientError::Decode {
        method,
        url,
        source,
    })
}

/// A long-lived answer being read.
pub struct Stream {
    method: Method,
    url: String,
    resp: reqwest::Response,
}

impl Stream {
    /// The next piece of the body; `None` once the server closed it.
    pub async fn read_chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        match self.resp.chunk().await {
            Ok(c) => Ok(c.map(|b| b.to_vec())),
            Err(source) => Err(ClientError::Transport {
                method: self.method.clone(),
                url: self.url.clone(),
                source,
            }),
        }
    }
}
