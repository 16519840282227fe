//! The host's side of the channel: a blocking JSON-lines client over the Unix socket
//! that QEMU's `-chardev socket,...` exposes for the guest's virtio-serial port.
//!
//! QEMU accepts one client per chardev socket at a time. Requests written before the
//! agent opened its port wait in the socket (QEMU stops reading while the guest side
//! is closed), so a ping sent early is answered once the agent is up; answers to
//! requests that timed out are recognised by their id and skipped.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::protocol::{
    Command, HealthReport, Reply, Request, Response, Status, VerifyReport, WorkloadSpec,
};
use crate::GuestError;

/// A connection to one guest's agent.
pub struct GuestClient {
    writer: UnixStream,
    reader: BufReader<UnixStream>,
    /// Bytes of a line whose end has not arrived yet (kept across timeouts).
    pending: Vec<u8>,
    next_id: u64,
    timeout: Duration,
}

impl GuestClient {
    /// Connects to the chardev socket at `path`; each call waits at most `timeout`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<GuestClient, GuestError> {
        let stream = UnixStream::connect(path).map_err(GuestError::Io)?;
        let reader = BufReader::new(stream.try_clone().map_err(GuestError::Io)?);
        Ok(GuestClient {
            writer: stream,
            reader,
            pending: Vec::new(),
            next_id: 1,
            timeout,
        })
    }

    /// Connects and pings until the agent answers or `total` has passed; returns the
    /// client and how long it took. The socket may not exist yet when this starts.
    pub fn wait_ready(path: &Path, total: Duration) -> Result<(GuestClient, Duration), GuestError> {
        let start = Instant::now();
        let mut last_err = GuestError::Timeout(Duration::ZERO);
        while start.elapsed() < total {
            match GuestClient::connect(path, Duration::from_millis(500)) {
                Ok(mut c) => loop {
                    match c.call(Command::Ping) {
                        Ok(_) => {
                            c.timeout = Duration::from_secs(10);
                            return Ok((c, start.elapsed()));
                        }
                        Err(GuestError::Timeout(_)) if start.elapsed() < total => continue,
                        Err(e) => {
                            last_err = e;
                            break;
                        }
                    }
                },
                Err(e) => last_err = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Err(match last_err {
            GuestError::Timeout(_) => GuestError::Timeout(total),
            e => GuestError::NotReady {
                waited: total,
                last: Box::new(e),
            },
        })
    }

    /// How long each call waits for its answer.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Sends `cmd` and waits for its answer; an error answer becomes `GuestError::Agent`.
    pub fn call(&mut self, cmd: Command) -> Result<Reply, GuestError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut line =
            serde_json::to_vec(&Request { id, command: cmd }).map_err(GuestError::Json)?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(GuestError::Io)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(GuestError::Timeout(self.timeout));
            }
            let resp = self.read_response(left)?;
            if resp.id != id {
                continue; // the late answer to an earlier, timed-out request
            }
            return match (resp.ok, resp.result) {
                (true, Some(reply)) => Ok(reply),
                _ => Err(GuestError::Agent(
                    resp.error.unwrap_or_else(|| "no answer".into()),
                )),
            };
        }
    }

    fn read_response(&mut self, wait: Duration) -> Result<Response, GuestError> {
        self.reader
            .get_ref()
            .set_read_timeout(Some(wait.max(Duration::from_millis(1))))
            .map_err(GuestError::Io)?;
        loop {
            match self.reader.read_until(b'\n', &mut self.pending) {
                Ok(0) => {
                    return Err(GuestError::Io(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the guest channel closed",
                    )))
                }
                Ok(_) if self.pending.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.pending);
                    let text = String::from_utf8_lossy(&line);
                    // A UART channel may carry noise: the tty's echo of requests sent
                    // before the agent set it raw, or a stray \r. Only answers count.
                    match serde_json::from_str::<Response>(text.trim()) {
                        Ok(resp) => return Ok(resp),
                        Err(_) => continue,
                    }
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(GuestError::Timeout(wait))
                }
                Err(e) => return Err(GuestError::Io(e)),
            }
        }
    }

    pub fn ping(&mut self) -> Result<Reply, GuestError> {
        self.call(Command::Ping)
    }

    pub fn status(&mut self) -> Result<Status, GuestError> {
        match self.call(Command::Status)? {
            Reply::Status(s) => Ok(s),
            other => Err(unexpected(other)),
        }
    }

    pub fn start(&mut self, spec: WorkloadSpec) -> Result<(), GuestError> {
        self.call(Command::Start { workload: spec }).map(|_| ())
    }

    pub fn stop(&mut self, workload: &str) -> Result<(), GuestError> {
        self.call(Command::Stop {
            workload: workload.to_string(),
        })
        .map(|_| ())
    }

    pub fn verify(&mut self) -> Result<VerifyReport, GuestError> {
        match self.call(Command::Verify)? {
            Reply::Verify(v) => Ok(v),
            other => Err(unexpected(other)),
        }
    }

    pub fn health(&mut self) -> Result<HealthReport, GuestError> {
        match self.call(Command::Health)? {
            Reply::Health(h) => Ok(h),
            other => Err(unexpected(other)),
        }
    }

    /// Asks the guest to power off; QEMU exits once it has.
    pub fn poweroff(&mut self) -> Result<(), GuestError> {
        self.call(Command::Poweroff).map(|_| ())
    }
}

fn unexpected(reply: Reply) -> GuestError {
    GuestError::Agent(format!("unexpected answer {reply:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{serve, Agent};
    use std::os::unix::net::UnixListener;

    /// A real agent loop on one end of a Unix socket, the client on the other.
    #[test]
    fn talks_to_an_agent_over_a_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ch0.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut agent = Agent::default();
            let mut input = BufReader::new(s.try_clone().unwrap());
            let mut output = s;
            serve(&mut agent, &mut input, &mut output).unwrap()
        });
        let (mut c, took) = GuestClient::wait_ready(&path, Duration::from_secs(5)).unwrap();
        assert!(took < Duration::from_secs(5));
        c.start(WorkloadSpec::Verifier {
            mib: 1,
            pages_per_sec: 1000.0,
        })
        .unwrap();
        let a = c.verify().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let b = c.verify().unwrap();
        assert!(b.counter > a.counter && b.ok);
        let err = c.stop("nope").unwrap_err();
        assert!(matches!(err, GuestError::Agent(_)), "{err}");
        c.poweroff().unwrap();
        assert_eq!(server.join().unwrap(), crate::server::Ended::Poweroff);
    }

    #[test]
    fn noise_on_the_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("noisy.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let peer = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(s.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            // Echo of the request, a bare CR, then the answer.
            s.write_all(line.as_bytes()).unwrap();
            s.write_all(b"\r\n").unwrap();
            let id = serde_json::from_str::<Request>(&line).unwrap().id;
            let pong = Response::success(
                id,
                Reply::Pong {
                    version: "t".into(),
                    uptime_s: 1.0,
                },
            );
            s.write_all(format!("{}\n", serde_json::to_string(&pong).unwrap()).as_bytes())
                .unwrap();
        });
        let mut c = GuestClient::connect(&path, Duration::from_secs(5)).unwrap();
        assert!(matches!(c.ping().unwrap(), Reply::Pong { .. }));
        peer.join().unwrap();
    }

    #[test]
    fn a_silent_peer_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("quiet.sock");
        let _listener = UnixListener::bind(&path).unwrap();
        let mut c = GuestClient::connect(&path, Duration::from_millis(100)).unwrap();
        assert!(matches!(c.ping(), Err(GuestError::Timeout(_))));
    }
}
