//! QEMU's migration stream (the device state; all of the VM for `qemu-native`) carried
//! over tern's authenticated device-state stream instead of a port of QEMU's own.
//!
//! ```text
//!  source QEMU ─migrate unix:S─► source agent ══ device-state stream (Hello, token) ══►
//!      destination agent ─connect─► unix:D ◄─migrate-incoming─ destination QEMU
//! ```
//!
//! Both unix sockets sit in a directory only the agent's user can enter
//! ([`socket_path`]); no QEMU listens on the network. The relays copy bytes one way
//! (QEMU's precopy stream has no return path) and are generic over the transport.
//!
//! A device-state stream over TLS arrives as a blocking rustls session (its handshake
//! and `Hello` ran on the gate's thread, and tokio-rustls cannot adopt a session
//! already under way): a blocking thread ([`bridge`]) moves its bytes to one end of a
//! socket pair, and the async relay pumps the other end like the plain socket.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::secure::Stream;
use super::MigrationError;

/// Unix socket paths are limited to 107 bytes (`sun_path`).
const MAX_SOCKET_PATH: usize = 107;
/// How long the source waits for the destination to close a TLS device-state stream
/// it has ended.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);
/// Copy buffer: device state is a few hundred KiB, `qemu-native` the whole RAM.
const PUMP_BUFFER: usize = 256 << 10;

/// Where the unix socket of migration `id` lives: `state_dir/migration/`, created
/// readable by the agent's user only.
pub fn socket_path(state_dir: &Path, id: &str) -> Result<PathBuf, MigrationError> {
    let dir = state_dir.join("migration");
    let io = |source| MigrationError::Relay {
        step: "creating the migration socket directory",
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io)?;
    // An older directory may have other bits; the mode of `create` is only for new ones.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    let path = dir.join(format!("{id}.sock"));
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(MigrationError::SocketPath {
            path: path.display().to_string(),
            len,
        });
    }
    Ok(path)
}

/// Copies everything `from` sends into `to`, then ends `to`; returns the bytes copied.
pub async fn pump<R, W>(from: R, mut to: W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut from = tokio::io::BufReader::with_capacity(PUMP_BUFFER, from);
    let n = tokio::io::copy_buf(&mut from, &mut to).await?;
    to.shutdown().await?;
    Ok(n)
}

/// A std socket handed over by the blocking stream code, made a tokio one.
fn to_tokio(s: std::net::TcpStream) -> std::io::Result<tokio::net::TcpStream> {
    s.set_nonblocking(true)?;
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    s.set_nodelay(true)?;
    tokio::net::TcpStream::from_std(s)
}

/// Which way a [`bridge`] copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// From the pair into the stream (the source).
    Out,
    /// From the stream into the pair (the destination).
    In,
}

/// The async end of a stream: the socket itself, or for a TLS session one end of a
/// socket pair whose other end a blocking thread copies to or from the session. The
/// thread's outcome is the handle's; it ends when either side closes.
type Bridged = (
    std::pin::Pin<Box<dyn AsyncReadWrite>>,
    Option<tokio::task::JoinHandle<std::io::Result<u64>>>,
);

trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {}
impl<T: AsyncRead + AsyncWrite + Send> AsyncReadWrite for T {}

fn bridge(stream: Stream, direction: Direction) -> std::io::Result<Bridged> {
    let mut tls = match stream {
        Stream::Plain(s) => return Ok((Box::pin(to_tokio(s)?), None)),
        tls => tls,
    };
    // As the plain relay: no socket timeouts once the device state flows (QEMU may be
    // silent for a long time); TCP_USER_TIMEOUT on the source still ends a dead link.
    tls.tcp().set_read_timeout(None)?;
    tls.tcp().set_write_timeout(None)?;
    tls.tcp().set_nonblocking(false)?;
    let (near, mut far) = std::os::unix::net::UnixStream::pair()?;
    near.set_nonblocking(true)?;
    let near = tokio::net::UnixStream::from_std(near)?;
    let copy = tokio::task::spawn_blocking(move || match direction {
        Direction::Out => {
            let n = std::io::copy(&mut far, &mut tls)?;
            tls.shutdown_write()?;
            // Closing a socket with unread bytes (the server's session tickets) sends a
            // reset, and a reset makes the peer drop what it has not read yet: wait
            // for the destination to close first, having read everything.
            let mut tcp = tls.tcp();
            tcp.set_read_timeout(Some(CLOSE_WITHIN))?;
            let _ = std::io::copy(&mut tcp, &mut std::io::sink());
            Ok(n)
        }
        Direction::In => std::io::copy(&mut tls, &mut far),
    });
    Ok((Box::pin(near), Some(copy)))
}

/// The bridge thread's outcome, once the async side is done.
async fn bridged(
    copy: Option<tokio::task::JoinHandle<std::io::Result<u64>>>,
) -> std::io::Result<()> {
    match copy {
        None => Ok(()),
        Some(copy) => copy.await.map_err(std::io::Error::other)?.map(|_| ()),
    }
}

/// The source's relay: a unix socket the source QEMU migrates to, pumped into the
/// device-state stream. Dropping it stops the relay and removes the socket.
pub struct SourceRelay {
    path: PathBuf,
    /// Until its outcome was taken by [`SourceRelay::failure`].
    task: Option<tokio::task::JoinHandle<Result<u64, MigrationError>>>,
}

impl SourceRelay {
    /// Listens on `path` (the URI QEMU migrates to is [`SourceRelay::uri`]); the first
    /// connection within `accept_within` is pumped into `stream`.
    pub fn start(
        path: PathBuf,
        stream: Stream,
        accept_within: Duration,
    ) -> Result<SourceRelay, MigrationError> {
        let io = |step| move |source| MigrationError::Relay { step, source };
        let _ = std::fs::remove_file(&path);
        let listener =
            tokio::net::UnixListener::bind(&path).map_err(io("listening for QEMU's stream"))?;
        let (stream, copy) =
            bridge(stream, Direction::Out).map_err(io("the device-state stream"))?;
        let task = tokio::spawn(async move {
            let accepted = tokio::time::timeout(accept_within, listener.accept()).await;
            let (qemu, _) = accepted
                .map_err(|_| MigrationError::DeviceStateTimeout(accept_within))?
                .map_err(io("accepting QEMU's stream"))?;
            // One connection: nobody else gets to speak on this migration's behalf.
            drop(listener);
            let n = pump(qemu, stream)
                .await
                .map_err(io("relaying QEMU's stream to the destination"))?;
            bridged(copy)
                .await
                .map_err(io("relaying QEMU's stream over TLS"))?;
            Ok(n)
        });
        Ok(SourceRelay {
            path,
            task: Some(task),
        })
    }

    /// What QEMU's `migrate` is given.
    pub fn uri(&self) -> String {
        format!("unix:{}", self.path.display())
    }

    /// The relay's failure, once it failed: QEMU keeps writing into a socket nobody
    /// drains, so its own status would only show the migration stalled.
    pub async fn failure(&mut self) -> Option<MigrationError> {
        let task = self.task.take_if(|t| t.is_finished())?;
        match task.await {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e),
            Err(source) => Some(MigrationError::Task {
                step: "device-state relay",
                source,
            }),
        }
    }
}

impl Drop for SourceRelay {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The destination's relay: once the gate admitted the device-state stream and its
/// first bytes arrive, connects to the unix socket the destination QEMU listens on
/// (`migrate-incoming unix:path`) and pumps the stream into it. The stream must be
/// admitted within `admit_within`.
pub async fn deliver(
    path: PathBuf,
    admitted: tokio::sync::oneshot::Receiver<Stream>,
    admit_within: Duration,
) -> Result<u64, MigrationError> {
    let io = |step| move |source| MigrationError::Relay { step, source };
    let stream = tokio::time::timeout(admit_within, admitted)
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or(MigrationError::StreamsMissing {
            connected: 0,
            wanted: 1,
            waited: admit_within,
        })?;
    let (mut stream, copy) =
        bridge(stream, Direction::In).map_err(io("the device-state stream"))?;
    // QEMU sees a connection only when there is something to load.
    let mut first = [0u8; 1];
    let got = tokio::io::AsyncReadExt::read(&mut stream, &mut first)
        .await
        .map_err(io("waiting for the device state"))?;
    let mut qemu = tokio::net::UnixStream::connect(&path)
        .await
        .map_err(io("connecting to QEMU's incoming socket"))?;
    qemu.write_all(&first[..got])
        .await
        .map_err(io("relaying the device state into QEMU"))?;
    let n = pump(stream, qemu)
        .await
        .map_err(io("relaying the device state into QEMU"))?;
    bridged(copy)
        .await
        .map_err(io("relaying the device state over TLS"))?;
    Ok(n + got as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn socket_paths_are_private_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = socket_path(d.path(), "in-1").unwrap();
        assert_eq!(p.parent().unwrap(), d.path().join("migration"));
        let mode = std::fs::metadata(p.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let long = "x".repeat(120);
        assert!(matches!(
            socket_path(d.path(), &long),
            Err(MigrationError::SocketPath { .. })
        ));
    }

    #[tokio::test]
    async fn a_relay_nobody_connects_to_reports_its_failure_once() {
        let d = tempfile::tempdir().unwrap();
        let link = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let end = std::net::TcpStream::connect(link.local_addr().unwrap()).unwrap();
        let path = socket_path(d.path(), "out").unwrap();
        let mut relay =
            SourceRelay::start(path.clone(), Stream::Plain(end), Duration::from_millis(50))
                .unwrap();
        assert!(path.exists());
        let t0 = std::time::Instant::now();
        let failure = loop {
            if let Some(e) = relay.failure().await {
                break e;
            }
            assert!(t0.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(
            matches!(failure, MigrationError::DeviceStateTimeout(_)),
            "{failure}"
        );
        assert!(relay.failure().await.is_none());
        drop(relay);
        assert!(!path.exists(), "the socket outlived its relay");
    }

    #[tokio::test]
    async fn bytes_cross_both_relays_unchanged() {
        let link = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let src_end = std::net::TcpStream::connect(link.local_addr().unwrap()).unwrap();
        let (dst_end, _) = link.accept().unwrap();
        relay_both_ways(Stream::Plain(src_end), Stream::Plain(dst_end)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bytes_cross_both_relays_unchanged_over_mutual_tls() {
        use tern_pki::ca::{Ca, Role};
        use tern_pki::tls::{client_config, server_config, ClientAuth};
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = Ca::init(ca_dir.path()).unwrap();
        let ip = std::net::Ipv4Addr::LOCALHOST.into();
        let (h1, h2) = (
            ca.issue(Role::Host, "h1", &[ip]).unwrap(),
            ca.issue(Role::Host, "h2", &[ip]).unwrap(),
        );
        let server = server_config(&h2, None, ClientAuth::Required).unwrap();
        let client = client_config(&h1.ca_pem, Some(&h1), None).unwrap();
        let tls =
            crate::migration::secure::ClientTls::new(std::sync::Arc::new(client), "127.0.0.1")
                .unwrap();
        let link = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = link.local_addr().unwrap();
        let accepted = std::thread::spawn(move || {
            let (s, _) = link.accept().unwrap();
            crate::migration::secure::accept(s, Some(&server)).unwrap()
        });
        let src_end = std::net::TcpStream::connect(addr).unwrap();
        let src_end = crate::migration::secure::connect(src_end, addr, Some(&tls)).unwrap();
        let dst_end = accepted.join().unwrap();
        assert!(matches!(dst_end, Stream::Server(_)), "{dst_end:?}");
        relay_both_ways(src_end, dst_end).await;
    }

    /// QEMU's bytes from the source relay over `src_end`..`dst_end` into the
    /// destination relay arrive unchanged, and both relays end.
    async fn relay_both_ways(src_end: Stream, dst_end: Stream) {
        let d = tempfile::tempdir().unwrap();
        let src_path = socket_path(d.path(), "out").unwrap();
        let dst_path = socket_path(d.path(), "in").unwrap();
        // The destination QEMU's incoming socket.
        let qemu_in = std::os::unix::net::UnixListener::bind(&dst_path).unwrap();
        let relay = SourceRelay::start(src_path.clone(), src_end, Duration::from_secs(5)).unwrap();
        assert_eq!(relay.uri(), format!("unix:{}", src_path.display()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        tx.send(dst_end).unwrap();
        let delivered = tokio::spawn(deliver(dst_path, rx, Duration::from_secs(5)));
        let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = qemu_in.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got
        });
        tokio::task::spawn_blocking(move || {
            let mut qemu_out = std::os::unix::net::UnixStream::connect(&src_path).unwrap();
            qemu_out.write_all(&sent).unwrap();
        })
        .await
        .unwrap();
        let got = tokio::task::spawn_blocking(move || reader.join().unwrap())
            .await
            .unwrap();
        assert_eq!(got.len(), payload.len(), "bytes delivered");
        assert!(got == payload, "the bytes changed on the way");
        assert_eq!(delivered.await.unwrap().unwrap(), payload.len() as u64);
    }
}
