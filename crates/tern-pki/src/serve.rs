//! The HTTP server loop of the agent and the manager: plain or TLS, with the limits a
//! server facing a hostile network needs. Each connection must finish its TLS handshake
//! and each request's headers within `header_timeout`; a connection with no request
//! being handled and no byte moving for `idle_timeout` is closed; at most
//! `max_connections` are open at once and one more is closed as soon as accepted, so a
//! burst of slow clients costs a bounded number of descriptors and ends by itself while
//! real requests keep getting in.
//!
//! Every request that came over TLS carries a [`Secure`] extension naming the client's
//! certificate, if it showed one, so handlers can decide by the caller's role.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tower_service::Service;

/// The server's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// To finish the TLS handshake, and to send each request's headers.
    pub header_timeout: Duration,
    /// Longest a connection may sit with no request handled and no byte moving.
    pub idle_timeout: Duration,
    /// Most connections open at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// Put in the extensions of every request that came over TLS: the client certificate's
/// holder, when the client showed one (checked against the CA and revocation list).
#[derive(Debug, Clone)]
pub struct Secure {
    pub peer: Option<crate::Peer>,
}

/// How long connections may take to finish once the server is asked to stop.
const DRAIN: Duration = Duration::from_secs(30);

/// A TLS configuration that can be replaced while serving (a new revocation list);
/// each new connection uses the latest.
#[derive(Clone)]
pub struct TlsAcceptor(Arc<RwLock<Arc<ServerConfig>>>);

impl TlsAcceptor {
    pub fn new(config: Arc<ServerConfig>) -> Self {
        TlsAcceptor(Arc::new(RwLock::new(config)))
    }

    /// Connections accepted from now on use `config`.
    pub fn set(&self, config: Arc<ServerConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    fn current(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until `shutdown` completes,
/// then lets open connections finish for up to 30 s.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut refused_at: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors or a connection reset before accept: keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            if refused_at.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                tracing::warn!(%peer, max = limits.max_connections, "connection limit reached; closing new connections");
                refused_at = Some(Instant::now());
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let stop = stop_rx.clone();
        tokio::spawn(async move {
            connection(stream, tls, app, limits, stop).await;
            drop(slot);
        });
    }
    let _ = stop_tx.send(true);
    drop(listener);
    // Every connection holds a slot; all slots back means all connections ended.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(DRAIN, slots.acquire_many(all)).await;
    Ok(())
}

async fn connection(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    app: Router,
    limits: Limits,
    stop: watch::Receiver<bool>,
) {
    match tls {
        None => http(stream, app, None, limits, stop).await,
        Some(tls) => {
            let handshake = tls.current().accept(stream);
            match tokio::time::timeout(limits.header_timeout, handshake).await {
                Ok(Ok(s)) => {
                    let peer = crate::Peer::of(s.get_ref().1.peer_certificates());
                    http(s, app, Some(Secure { peer }), limits, stop).await
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!("TLS handshake not finished in time"),
            }
        }
    }
}

/// When the connection last moved a byte, and how many requests it has being handled.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.start.elapsed().saturating_sub(last)
    }
}

async fn http<I>(
    io: I,
    app: Router,
    secure: Option<Secure>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        busy: AtomicUsize::new(0),
    });
    let io = Tracked {
        inner: io,
        activity: activity.clone(),
    };
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            let mut app = app.clone();
            let activity = activity.clone();
            activity.busy.fetch_add(1, Ordering::Relaxed);
            if let Some(s) = &secure {
                req.extensions_mut().insert(s.clone());
            }
            async move {
                let answer = app.call(req.map(axum::body::Body::new)).await;
                activity.busy.fetch_sub(1, Ordering::Relaxed);
                activity.touch();
                answer
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let check = (limits.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    let mut tick = tokio::time::interval(check);
    let mut stopping = false;
    loop {
        tokio::select! {
            done = conn.as_mut() => {
                if let Err(e) = done {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick() => {
                if activity.busy.load(Ordering::Relaxed) == 0
                    && activity.idle_for() >= limits.idle_timeout
                {
                    tracing::debug!("closing an idle connection");
                    return;
                }
            }
        }
    }
}

/// An I/O stream that records when it last moved a byte.
struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
