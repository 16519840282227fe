//! Migration streams over mutual TLS, when the agents have host identities.
//!
//! The source connects with its client certificate and checks that the destination's
//! certificate names the destination host; the destination's gate accepts only clients
//! with a certificate from the cluster CA. The `Hello` token is still checked inside
//! the session. Agents without identities keep plain TCP.
//!
//! rustls' blocking [`StreamOwned`] carries the memory streams; the socket stays
//! reachable through [`Stream::tcp`], so read/write timeouts and `TCP_USER_TIMEOUT` on
//! it keep bounding every wait.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::StreamOwned;
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};

use super::MigrationError;

/// One migration stream: a socket, or a TLS session over one.
pub enum Stream {
    Plain(TcpStream),
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Stream {
    /// The socket under the stream, for its options (timeouts, blocking mode).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Client(s) => s.get_ref(),
            Stream::Server(s) => s.get_ref(),
        }
    }

    /// The holder of the client certificate of a stream this side accepted.
    pub fn peer(&self) -> Option<tern_pki::Peer> {
        match self {
            Stream::Server(s) => tern_pki::Peer::of(s.conn.peer_certificates()),
            Stream::Plain(_) | Stream::Client(_) => None,
        }
    }

    /// Ends what this side sends: a TLS session says `close_notify` first, so the
    /// peer can tell the end of the data from a cut link.
    pub fn shutdown_write(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(_) => {}
            Stream::Client(s) => {
                s.conn.send_close_notify();
                s.flush()?;
            }
            Stream::Server(s) => {
                s.conn.send_close_notify();
                s.flush()?;
            }
        }
        self.tcp().shutdown(std::net::Shutdown::Write)
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self {
            Stream::Plain(_) => "plain",
            Stream::Client(_) | Stream::Server(_) => "tls",
        };
        f.debug_struct("Stream")
            .field("kind", &kind)
            .field("peer", &self.tcp().peer_addr().ok())
            .finish()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Client(s) => s.read(buf),
            Stream::Server(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Client(s) => s.write(buf),
            Stream::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Client(s) => s.flush(),
            Stream::Server(s) => s.flush(),
        }
    }
}

/// How the source opens its streams over TLS: its client configuration (the cluster
/// CA, its own certificate) and the name the destination's certificate must carry.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl ClientTls {
    /// TLS to `host` (an address or a DNS name, as the destination URL gives it).
    pub fn new(config: Arc<ClientConfig>, host: &str) -> Result<ClientTls, MigrationError> {
        let name = ServerName::try_from(host.to_owned()).map_err(|_| MigrationError::TlsName {
            host: host.to_owned(),
        })?;
        Ok(ClientTls { config, name })
    }
}

/// Runs the TLS handshake on a connected socket as the client; without `tls` the
/// socket is the stream.
pub fn connect(
    s: TcpStream,
    addr: SocketAddr,
    tls: Option<&ClientTls>,
) -> Result<Stream, MigrationError> {
    let Some(tls) = tls else {
        return Ok(Stream::Plain(s));
    };
    let failed = |source| MigrationError::Tls { addr, source };
    let conn = ClientConnection::new(tls.config.clone(), tls.name.clone())
        .map_err(|e| failed(std::io::Error::other(e)))?;
    let mut s = StreamOwned::new(conn, s);
    handshake(&mut s.conn, &mut s.sock).map_err(failed)?;
    Ok(Stream::Client(Box::new(s)))
}

/// Runs the TLS handshake on an accepted socket as the server, bounded by the socket's
/// timeouts; without `tls` the socket is the stream.
pub fn accept(s: TcpStream, tls: Option<&Arc<ServerConfig>>) -> std::io::Result<Stream> {
    let Some(config) = tls else {
        return Ok(Stream::Plain(s));
    };
    let conn = ServerConnection::new(config.clone()).map_err(std::io::Error::other)?;
    let mut s = StreamOwned::new(conn, s);
    handshake(&mut s.conn, &mut s.sock)?;
    Ok(Stream::Server(Box::new(s)))
}

/// Drives a handshake to its end, alerts included: a refused peer learns why.
fn handshake<D>(conn: &mut ConnectionCommon<D>, sock: &mut TcpStream) -> std::io::Result<()> {
    let result = (|| {
        while conn.is_handshaking() {
            conn.complete_io(sock)?;
        }
        Ok(())
    })();
    while conn.wants_write() {
        if conn.write_tls(sock).is_err() {
            break;
        }
    }
    result
}
