//! `tern vm console NAME` (through the manager) and `tern agent vm console ID` (straight
//! to an agent): attach to a VM's serial console.
//!
//! On a terminal, the terminal is put in raw mode (keys such as Ctrl-C go to the guest)
//! until Ctrl-] detaches; it is restored on every way out (detach, the console closing,
//! an error, SIGTERM, SIGHUP or SIGINT). Otherwise (a script, a test) stdin is copied to the
//! console and the console to stdout; at the end of stdin the output is drained until it
//! has been quiet for [`DRAIN_QUIET`] (at most [`DRAIN_MAX`]). `--timeout` ends either
//! after that many seconds.

use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tern_api::client::console::{ConsoleStream, MAX_FRAME_BYTES};
use tern_api::client::ClientError;
use tokio_tungstenite::tungstenite::Message;

/// The byte Ctrl-] sends: detach.
pub const DETACH: u8 = 0x1d;
/// After stdin ends, the console output is read until it is quiet this long...
pub const DRAIN_QUIET: Duration = Duration::from_millis(1500);
/// ...or this long in all.
pub const DRAIN_MAX: Duration = Duration::from_secs(10);
/// To connect and have the WebSocket upgrade answered.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// The options both forms share.
#[derive(clap::Args, Debug, Clone)]
pub struct ConsoleArgs {
    /// First print up to this many bytes of the end of the console log (at most 1 MiB).
    #[arg(long, value_name = "BYTES")]
    pub log: Option<u64>,
    /// Detach after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

impl ConsoleArgs {
    /// The route's path with its query.
    pub fn path(&self, vm: &str) -> String {
        match self.log {
            Some(n) => format!("/v1/vms/{vm}/console?log={n}"),
            None => format!("/v1/vms/{vm}/console"),
        }
    }
}

/// Input as it is forwarded (pure): the bytes before a Ctrl-], and whether it came.
pub fn split_detach(input: &[u8]) -> (&[u8], bool) {
    match input.iter().position(|&b| b == DETACH) {
        Some(i) => (&input[..i], true),
        None => (input, false),
    }
}

/// Why an attach ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Detached,
    InputEnded,
    TimedOut,
    Signal,
    /// The server closed the console, with its reason.
    Closed(String),
}

/// Attaches to the console at `base` + `path`; `fail` turns a refusal into the command's
/// error (exit 2 for the caller's fault).
pub fn attach(
    base: &str,
    path: &str,
    token: &str,
    tls: Option<rustls::ClientConfig>,
    args: &ConsoleArgs,
    what: &str,
    fail: impl Fn(ClientError) -> anyhow::Error,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let ws = rt
        .block_on(tern_api::client::console::connect(
            base,
            path,
            token,
            tls,
            CONNECT_TIMEOUT,
        ))
        .map_err(fail)?;
    let timeout = args.timeout.map(Duration::from_secs);
    let terminal = std::io::stdin().is_terminal();
    let end = if terminal {
        eprintln!(
            "Attached to the console of {what}; detach with Ctrl-] (press Enter for a prompt)."
        );
        let raw = RawMode::enter()?;
        let end = rt.block_on(run(ws, input(), timeout, true));
        drop(raw);
        eprintln!();
        end
    } else {
        rt.block_on(run(ws, input(), timeout, false))
    }?;
    // The stdin reader may still be blocked in a read: do not wait for it.
    rt.shutdown_background();
    match end {
        End::Closed(reason) if !reason.is_empty() => eprintln!("tern: {reason}"),
        End::Detached if terminal => eprintln!("tern: detached"),
        _ => {}
    }
    Ok(())
}

/// Stdin in chunks, read on a thread of its own (a blocking read cannot be cancelled);
/// the channel closes at its end.
fn input() -> tokio::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Copies until the console closes, the input ends (then drains), Ctrl-] on a terminal,
/// a signal or the timeout.
async fn run(
    ws: ConsoleStream,
    mut input: tokio::sync::mpsc::Receiver<Vec<u8>>,
    timeout: Option<Duration>,
    terminal: bool,
) -> anyhow::Result<End> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut tx, mut rx) = ws.split();
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    // Set when stdin ended: the drain's overall limit.
    let mut draining: Option<tokio::time::Instant> = None;
    let mut out = std::io::stdout();
    let end = loop {
        let quiet = async {
            match draining {
                Some(limit) => {
                    let until = (tokio::time::Instant::now() + DRAIN_QUIET).min(limit);
                    tokio::time::sleep_until(until).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            m = rx.next() => match m {
                Some(Ok(Message::Binary(b))) => {
                    out.write_all(&b)?;
                    out.flush()?;
                }
                Some(Ok(Message::Text(t))) => {
                    out.write_all(t.as_bytes())?;
                    out.flush()?;
                }
                Some(Ok(Message::Close(frame))) => {
                    break End::Closed(frame.map(|f| f.reason.into_owned()).unwrap_or_default());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break End::Closed(format!("the console connection broke: {e}")),
                None => break End::Closed(String::new()),
            },
            chunk = input.recv(), if draining.is_none() => match chunk {
                Some(bytes) => {
                    let (send, detach) = match terminal {
                        true => split_detach(&bytes),
                        false => (&bytes[..], false),
                    };
                    for piece in send.chunks(MAX_FRAME_BYTES) {
                        tx.send(Message::Binary(piece.to_vec())).await?;
                    }
                    if detach {
                        break End::Detached;
                    }
                }
                None if terminal => break End::InputEnded,
                None => draining = Some(tokio::time::Instant::now() + DRAIN_MAX),
            },
            _ = quiet => break End::InputEnded,
            _ = &mut until_deadline => break End::TimedOut,
            _ = term.recv() => break End::Signal,
            _ = hup.recv() => break End::Signal,
            _ = int.recv() => break End::Signal,
        }
    };
    if !matches!(end, End::Closed(_)) {
        let _ = tokio::time::timeout(Duration::from_secs(2), tx.send(Message::Close(None))).await;
    }
    Ok(end)
}

/// The terminal in raw mode while this lives; the settings before are put back when it
/// is dropped (unwinding included).
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> anyhow::Result<RawMode> {
        use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&stdin, OptionalActions::Now, &raw)?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ctrl_close_bracket_detaches_and_what_came_before_is_sent() {
        assert_eq!(split_detach(b"ls\r"), (&b"ls\r"[..], false));
        assert_eq!(split_detach(b"ab\x1dcd"), (&b"ab"[..], true));
        assert_eq!(split_detach(b"\x1d"), (&b""[..], true));
        assert_eq!(split_detach(b""), (&b""[..], false));
    }

    #[test]
    fn the_log_tail_is_asked_for_in_the_query() {
        let mut a = ConsoleArgs {
            log: None,
            timeout: None,
        };
        assert_eq!(a.path("v1"), "/v1/vms/v1/console");
        a.log = Some(4096);
        assert_eq!(a.path("v1"), "/v1/vms/v1/console?log=4096");
    }
}
