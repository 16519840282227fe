//! The benchmarks' service client: from inside a lab host's network namespace, a
//! request/response loop over TCP at a steady rate to a guest's echo service, the
//! latency of every request recorded. It stops when told or after its cap.
//!
//! Latency is counted from when a request was due, not from when it went out: a
//! request held up by a stall delays the ones due after it, and they count the wait
//! too (otherwise one slow request would hide every request it kept from being sent).

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;

/// How long one request may take before it counts as an error.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes per request; echoed back whole.
const REQUEST_BYTES: usize = 64;

/// One request: when it was due (since the client started) and its latency, or `None`
/// when it failed.
#[derive(Clone, Copy, Debug)]
struct Sample {
    due: Duration,
    latency_ms: Option<f64>,
}

/// A running client.
pub struct Client {
    started: Instant,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<Vec<Sample>>>,
}

/// Starts a client in the network namespace `netns` (a name under `/run/netns`) sending
/// `rps` requests per second to `service`, for at most `cap`.
pub fn start(
    netns: &str,
    service: SocketAddrV4,
    rps: u32,
    cap: Duration,
) -> anyhow::Result<Client> {
    let ns = std::fs::File::open(format!("/run/netns/{netns}"))
        .with_context(|| format!("opening network namespace {netns}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("bench-client".into())
            .spawn(move || {
                // setns moves only this thread: the rest of the process stays put.
                // SAFETY: a valid namespace fd; the call touches no memory of ours.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error())
                        .context("entering the client's network namespace");
                }
                Ok(run(service, rps, started, cap, &stop))
            })?
    };
    Ok(Client {
        started,
        stop,
        thread,
    })
}

impl Client {
    /// Time since the client started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the client; every request's record.
    pub async fn stop(self) -> anyhow::Result<Latencies> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread;
        let samples = tokio::task::spawn_blocking(move || thread.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
        Ok(Latencies { samples })
    }
}

fn run(
    service: SocketAddrV4,
    rps: u32,
    started: Instant,
    cap: Duration,
    stop: &AtomicBool,
) -> Vec<Sample> {
    let period = Duration::from_secs_f64(1.0 / f64::from(rps.max(1)));
    let mut samples = Vec::new();
    let mut conn: Option<TcpStream> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = period * u32::try_from(seq).unwrap_or(u32::MAX);
        if due > cap {
            break;
        }
        let now = started.elapsed();
        if now < due {
            std::thread::sleep(due - now);
        }
        let latency_ms = match request(&mut conn, service, seq) {
            Ok(()) => Some((started.elapsed().saturating_sub(due)).as_secs_f64() * 1000.0),
            Err(e) => {
                tracing::debug!(error = %e, seq, "request failed");
                conn = None;
                None
            }
        };
        samples.push(Sample { due, latency_ms });
        seq += 1;
    }
    samples
}

fn request(conn: &mut Option<TcpStream>, service: SocketAddrV4, seq: u64) -> std::io::Result<()> {
    if conn.is_none() {
        let s = TcpStream::connect_timeout(&SocketAddr::V4(service), REQUEST_TIMEOUT)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
        s.set_write_timeout(Some(REQUEST_TIMEOUT))?;
        *conn = Some(s);
    }
    let Some(s) = conn.as_mut() else {
        return Err(std::io::ErrorKind::NotConnected.into());
    };
    let mut msg = [0u8; REQUEST_BYTES];
    msg[..8].copy_from_slice(&seq.to_le_bytes());
    s.write_all(&msg)?;
    let mut back = [0u8; REQUEST_BYTES];
    s.read_exact(&mut back)?;
    if back != msg {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the echo differs from the request",
        ));
    }
    Ok(())
}

/// Every request of one client run.
#[derive(Debug, Default)]
pub struct Latencies {
    samples: Vec<Sample>,
}

/// The successful requests due within a window, sorted by latency.
pub struct Window {
    sorted_ms: Vec<f64>,
}

impl Latencies {
    /// Requests that failed.
    pub fn errors(&self) -> u64 {
        self.samples
            .iter()
            .filter(|s| s.latency_ms.is_none())
            .count() as u64
    }

    /// The successful requests due from `from` to `to` (since the client started).
    pub fn between(&self, from: Duration, to: Duration) -> Window {
        let mut sorted_ms: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.due >= from && s.due <= to)
            .filter_map(|s| s.latency_ms)
            .collect();
        sorted_ms.sort_by(f64::total_cmp);
        Window { sorted_ms }
    }
}

impl Window {
    /// A window of latencies, ms, in any order.
    pub fn from_ms(mut ms: Vec<f64>) -> Window {
        ms.sort_by(f64::total_cmp);
        Window { sorted_ms: ms }
    }

    /// The latencies, ms, lowest first.
    pub fn sorted_ms(&self) -> &[f64] {
        &self.sorted_ms
    }

    pub fn count(&self) -> usize {
        self.sorted_ms.len()
    }

    /// The `q` quantile (nearest rank; 1: the maximum), rounded to 0.1 ms.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.sorted_ms.len();
        if n == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * n as f64).ceil() as usize).clamp(1, n);
        Some((self.sorted_ms[rank - 1] * 10.0).round() / 10.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lat(values: &[(u64, Option<f64>)]) -> Latencies {
        Latencies {
            samples: values
                .iter()
                .map(|&(due, latency_ms)| Sample {
                    due: Duration::from_millis(due),
                    latency_ms,
                })
                .collect(),
        }
    }

    #[test]
    fn quantiles_by_nearest_rank_within_the_window() {
        let l = lat(&[
            (0, Some(9.0)),
            (10, Some(1.0)),
            (20, Some(2.0)),
            (30, None),
            (40, Some(3.0)),
            (50, Some(100.0)),
        ]);
        assert_eq!(l.errors(), 1);
        let w = l.between(Duration::from_millis(10), Duration::from_millis(40));
        assert_eq!(w.count(), 3);
        assert_eq!(w.quantile(0.5), Some(2.0));
        assert_eq!(w.quantile(1.0), Some(3.0));
        assert_eq!(
            l.between(Duration::ZERO, Duration::MAX).quantile(0.99),
            Some(100.0)
        );
        assert_eq!(
            l.between(Duration::ZERO, Duration::MAX).quantile(0.0),
            Some(1.0)
        );
        assert_eq!(
            l.between(Duration::from_secs(1), Duration::from_secs(2))
                .quantile(0.5),
            None
        );
    }

    #[test]
    fn a_client_measures_an_echo_service_and_counts_a_dead_one() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match listener.local_addr().unwrap() {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound to an IPv4 address"),
        };
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; REQUEST_BYTES];
            // Echo ten requests, then hang up.
            for _ in 0..10 {
                s.read_exact(&mut buf).unwrap();
                s.write_all(&buf).unwrap();
            }
        });
        let stop = AtomicBool::new(false);
        let samples = run(addr, 200, Instant::now(), Duration::from_millis(100), &stop);
        server.join().unwrap();
        let l = Latencies { samples };
        assert_eq!(
            l.between(Duration::ZERO, Duration::MAX).count(),
            10,
            "{l:?}"
        );
        assert!(l.errors() >= 1, "requests after the hang-up fail: {l:?}");
        assert!(
            l.between(Duration::ZERO, Duration::MAX)
                .quantile(1.0)
                .unwrap()
                < 1000.0
        );
    }
}
