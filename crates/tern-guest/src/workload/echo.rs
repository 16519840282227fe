//! `echo-server`: a TCP echo service, the guest's "talks to the outside world" process.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Ctl;
use crate::GuestError;

/// Binds `port` on all addresses now (so a port in use is reported to the host) and
/// serves on a thread; each connection gets its own thread.
pub fn spawn(port: u16, ctl: Ctl) -> Result<JoinHandle<()>, GuestError> {
    let listener = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port))).map_err(|e| {
        GuestError::BadRequest(format!("echo-server: cannot listen on port {port}: {e}"))
    })?;
    listener.set_nonblocking(true).map_err(GuestError::Io)?;
    std::thread::Builder::new()
        .name("echo-server".into())
        .spawn(move || accept_loop(listener, &ctl))
        .map_err(GuestError::Io)
}

fn accept_loop(listener: TcpListener, ctl: &Ctl) {
    while !ctl.stopped() {
        match listener.accept() {
            Ok((stream, _)) => {
                let ctl = ctl.clone();
                let _ = std::thread::Builder::new()
                    .name("echo-conn".into())
                    .spawn(move || serve(stream, &ctl));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                ctl.sleep(Duration::from_millis(20));
            }
            Err(e) => {
                ctl.stats.fail(format!("accept: {e}"));
                ctl.sleep(Duration::from_millis(200));
            }
        }
    }
}

fn serve(mut stream: TcpStream, ctl: &Ctl) {
    // A read timeout lets the thread notice a stop request on an idle connection.
    if stream.set_nonblocking(false).is_err()
        || stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .is_err()
    {
        return;
    }
    let mut buf = [0u8; 16 * 1024];
    while !ctl.stopped() {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                // Counted before echoing, so a client that has its echo sees the count.
                ctl.stats.add(n as u64);
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    #[test]
    fn echoes_and_counts() {
        // Port 0 is refused by the protocol; here the function itself is tested,
        // so pick a free port by binding and releasing it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ctl = Ctl::default();
        let h = spawn(port, ctl.clone()).unwrap();
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"hello tern").unwrap();
        let mut got = [0u8; 10];
        c.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello tern");
        assert_eq!(ctl.stats.work.load(Ordering::Relaxed), 10);
        assert!(spawn(port, Ctl::default())
            .unwrap_err()
            .to_string()
            .contains("cannot listen"));
        ctl.stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
    }
}
