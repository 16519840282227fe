//! The serial console as a WebSocket client: `GET /v1/vms/{name}/console` of the manager
//! or `GET /v1/vms/{id}/console` of an agent, upgraded. The same credentials as every
//! other call: a bearer token, or a client certificate over TLS with the cluster CA.
//!
//! Both directions carry the console's bytes in binary frames, at most
//! [`MAX_FRAME_BYTES`] each.

use std::time::Duration;

use reqwest::Method;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::WebSocketStream;

use super::{ClientError, ErrorAnswer};

/// Largest frame (and message) either side of a console sends or accepts: console
/// traffic is typed keys and lines of text, and a replayed log is sent in pieces.
pub const MAX_FRAME_BYTES: usize = 64 << 10;

/// How often a console server (the agent, the manager's relay) pings its client.
pub const PING_EVERY: Duration = Duration::from_secs(20);
/// Silence from a console's client after which its server ends the attach: a client
/// that vanished without closing frees the console.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A byte stream: plain TCP or TLS over it.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An attached console.
pub type ConsoleStream = WebSocketStream<Box<dyn Io>>;

/// The WebSocket limits of a console, client and server side alike.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig {
        max_message_size: Some(MAX_FRAME_BYTES),
        max_frame_size: Some(MAX_FRAME_BYTES),
        ..WebSocketConfig::default()
    }
}

/// Where `base` (`http://HOST:PORT` or `https://...`) points: whether it is TLS, its
/// authority, host and port (pure).
pub fn split_base(base: &str) -> Option<(bool, String, String, u16)> {
    let (tls, rest) = match base.split_once("://")? {
        ("http", r) => (false, r),
        ("https", r) => (true, r),
        _ => return None,
    };
    let authority = rest.split('/').next().filter(|a| !a.is_empty())?;
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, after) = v6.split_once(']')?;
            (h, after.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    let port = match port {
        Some(p) => p.parse().ok()?,
        None if tls => 443,
        None => 80,
    };
    if host.is_empty() {
        return None;
    }
    Some((tls, authority.to_string(), host.to_string(), port))
}

/// Opens `path` (with its query) of the server at `base` as a console WebSocket within
/// `timeout` (connection, TLS and the upgrade). `token` is sent as a bearer token unless
/// empty; with `tls` the server must be `https://` with a certificate of the cluster
/// CA. A refusal (401, 404, 409...) is [`ClientError::Remote`] with the server's message.
pub async fn connect(
    base: &str,
    path: &str,
    token: &str,
    tls: Option<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<ConsoleStream, ClientError> {
    let url = format!("{}{path}", base.trim_end_matches('/'));
    let (https, authority, host, port) = split_base(base).ok_or_else(|| ClientError::BadUrl {
        url: base.to_string(),
    })?;
    if tls.is_some() && !https {
        return Err(ClientError::NotHttps {
            url: base.to_string(),
        });
    }
    let fail = |message: String| ClientError::WebSocket {
        url: url.clone(),
        message,
    };
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| fail(format!("connecting: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match (https, tls) {
            (false, _) => Box::new(tcp),
            (true, tls) => {
                let config = match tls {
                    Some(c) => c,
                    None => return Err(fail("https:// needs the cluster CA's certificate".into())),
                };
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| fail(format!("server name {host:?}: {e}")))?;
                let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
                Box::new(
                    connector
                        .connect(name, tcp)
                        .await
                        .map_err(|e| fail(format!("TLS: {e}")))?,
                )
            }
        };
        let scheme = if https { "wss" } else { "ws" };
        let mut req = tungstenite::client::IntoClientRequest::into_client_request(format!(
            "{scheme}://{authority}{path}"
        ))
        .map_err(|e| fail(e.to_string()))?;
        if !token.is_empty() {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| fail("the token is not a valid header value".into()))?;
            req.headers_mut()
                .insert(tungstenite::http::header::AUTHORIZATION, value);
        }
        match tokio_tungstenite::client_async_with_config(req, io, Some(ws_config())).await {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(answer)) => {
                let body = answer.body().as_deref().unwrap_or_default();
                let message = serde_json::from_slice::<ErrorAnswer>(body)
                    .map(|a| a.error)
                    .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
                Err(ClientError::Remote {
                    method: Method::GET,
                    url: url.clone(),
                    status: answer.status().as_u16(),
                    message,
                })
            }
            Err(e) => Err(fail(e.to_string())),
        }
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ClientError::Timeout {
            method: Method::GET,
            url: url.clone(),
            after: timeout,
        })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases() {
        let s = |b| split_base(b);
        assert_eq!(
            s("http://198.18.0.1:7070"),
            Some((false, "198.18.0.1:7070".into(), "198.18.0.1".into(), 7070))
        );
        assert_eq!(
            s("https://h1.example/"),
            Some((true, "h1.example".into(), "h1.example".into(), 443))
        );
        assert_eq!(
            s("http://[::1]:80"),
            Some((false, "[::1]:80".into(), "::1".into(), 80))
        );
        for bad in ["ftp://x", "http://", "x:1", "http://h:port", "http://:1"] {
            assert_eq!(s(bad), None, "{bad}");
        }
    }
}
