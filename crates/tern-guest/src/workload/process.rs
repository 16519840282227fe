//! Workloads in a process of their own (`batch`, `service`): the agent re-executes its
//! own binary as `tern-guest child SPEC`, which runs the workload and reports its
//! counters as one line every 100 ms on its stdout; a thread of the agent reads them
//! into the workload's [`Stats`](super::Stats).
//!
//! A separate process is what a dependency-aware migration sees: the guest's freezer
//! works on processes, the agent itself is exempt, so a workload that is to be frozen
//! (or kept running because of its peers) cannot live on the agent's threads. The child
//! shares only its stdout pipe with the agent; its stdin and stderr are `/dev/null`, so
//! it inherits no file the agent writes.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tern_api::guest::WorkloadSpec;

use super::{echo, memdirty, Ctl};
use crate::GuestError;

/// The subcommand the agent runs its child workloads with.
pub const CHILD_COMMAND: &str = "child";

/// How often the child reports its counters.
const REPORT_EVERY: Duration = Duration::from_millis(100);

/// How long the agent waits for a new child's first report (a service's port bound, a
/// batch job's memory allocated or refused).
const FIRST_REPORT_WITHIN: Duration = Duration::from_secs(10);

/// One line of the child's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Work done, pages checked, and whether the paced phase has begun.
    Progress {
        work: u64,
        checked: u64,
        paced: bool,
    },
    /// The workload ended with this error.
    Failed(String),
}

impl Report {
    /// The line the child writes (without the newline).
    pub fn line(&self) -> String {
        match self {
            Report::Progress {
                work,
                checked,
                paced,
            } => format!("work {work} checked {checked} paced {}", u8::from(*paced)),
            Report::Failed(e) => format!("error {}", e.replace('\n', " ")),
        }
    }

    /// Parses a line the child wrote; `None` for anything else.
    pub fn parse(line: &str) -> Option<Report> {
        if let Some(e) = line.strip_prefix("error ") {
            return Some(Report::Failed(e.to_string()));
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["work", work, "checked", checked, "paced", paced] => Some(Report::Progress {
                work: work.parse().ok()?,
                checked: checked.parse().ok()?,
                paced: match *paced {
                    "0" => false,
                    "1" => true,
                    _ => return None,
                },
            }),
            _ => None,
        }
    }
}

/// Starts `spec` in a child process; the returned thread watches it until the
/// workload's stop flag is set (then kills it) or the child ends by itself (then the
/// workload reports an error).
pub fn spawn(spec: &WorkloadSpec, ctl: Ctl) -> Result<JoinHandle<()>, GuestError> {
    let exe = std::env::current_exe().map_err(GuestError::Io)?;
    let mut child = Command::new(exe)
        .arg(CHILD_COMMAND)
        .arg(spec.to_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(GuestError::Io)?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(GuestError::BadRequest(format!(
            "{}: no pipe to the child process",
            spec.name()
        )));
    };
    let (first_tx, first_rx) = mpsc::channel();
    let reader = {
        let ctl = ctl.clone();
        std::thread::Builder::new()
            .name(format!("{}-reports", spec.name()))
            .spawn(move || read_reports(stdout, &ctl, first_tx))
            .map_err(GuestError::Io)?
    };
    let failed = match first_rx.recv_timeout(FIRST_REPORT_WITHIN) {
        Ok(Report::Progress { .. }) => None,
        Ok(Report::Failed(e)) => Some(e),
        Err(_) => Some(format!(
            "{}: the child process did not report within {FIRST_REPORT_WITHIN:?}",
            spec.name()
        )),
    };
    if let Some(e) = failed {
        let _ = child.kill();
        let _ = child.wait();
        let _ = reader.join();
        return Err(GuestError::BadRequest(e));
    }
    std::thread::Builder::new()
        .name(spec.name().into())
        .spawn(move || supervise(child, reader, &ctl))
        .map_err(GuestError::Io)
}

fn supervise(mut child: Child, reader: JoinHandle<()>, ctl: &Ctl) {
    while !ctl.stopped() {
        match child.try_wait() {
            Ok(Some(status)) => {
                let _ = reader.join();
                if ctl.stats.error.lock().is_ok_and(|e| e.is_none()) {
                    ctl.stats
                        .fail(format!("the child process ended by itself: {status}"));
                }
                return;
            }
            Ok(None) => {}
            Err(e) => {
                ctl.stats
                    .fail(format!("waiting for the child process: {e}"));
                break;
            }
        }
        ctl.sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
}

fn read_reports(stdout: ChildStdout, ctl: &Ctl, first: mpsc::Sender<Report>) {
    let mut first = Some(first);
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { return };
        let Some(report) = Report::parse(&line) else {
            continue;
        };
        match &report {
            Report::Progress {
                work,
                checked,
                paced,
            } => {
                ctl.stats.work.store(*work, Ordering::Relaxed);
                ctl.stats.checked.store(*checked, Ordering::Relaxed);
                let unmarked = ctl.stats.paced_since.lock().is_ok_and(|p| p.is_none());
                if *paced && unmarked {
                    ctl.stats.mark_paced(Instant::now());
                }
            }
            Report::Failed(e) => ctl.stats.fail(e.clone()),
        }
        if let Some(tx) = first.take() {
            let _ = tx.send(report);
        }
    }
}

/// `tern-guest child SPEC`: runs a `batch` or `service` workload in this process and
/// reports on stdout until the agent kills it or stdout goes away (the agent died).
pub fn child_main(spec_text: &str) -> ExitCode {
    let fail = |e: String| {
        println!("{}", Report::Failed(e).line());
        ExitCode::FAILURE
    };
    let spec = match WorkloadSpec::parse_args(spec_text) {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let ctl = Ctl::default();
    let worker = match spec {
        WorkloadSpec::Batch { mib, mbps } => {
            let c = ctl.clone();
            std::thread::Builder::new()
                .name("batch".into())
                .spawn(move || {
                    if let Err(e) = memdirty::rewrite(mib, mbps, true, &c) {
                        c.stats.fail(e.to_string());
                    }
                })
                .map_err(GuestError::Io)
        }
        WorkloadSpec::Service { port } => echo::spawn(port, ctl.clone()),
        ref other => Err(GuestError::BadRequest(format!(
            "{}: runs on the agent's threads, not as a child process",
            other.name()
        ))),
    };
    let worker = match worker {
        Ok(w) => w,
        Err(e) => return fail(e.to_string()),
    };
    let mut out = std::io::stdout().lock();
    loop {
        let error = ctl.stats.error.lock().ok().and_then(|e| e.clone());
        let report = match error {
            Some(e) => Report::Failed(e),
            None => Report::Progress {
                work: ctl.stats.work.load(Ordering::Relaxed),
                checked: ctl.stats.checked.load(Ordering::Relaxed),
                paced: ctl.stats.paced_since.lock().is_ok_and(|p| p.is_some())
                    || matches!(spec, WorkloadSpec::Service { .. }),
            },
        };
        let failed = matches!(report, Report::Failed(_));
        if writeln!(out, "{}", report.line())
            .and_then(|()| out.flush())
            .is_err()
        {
            return ExitCode::FAILURE;
        }
        if failed {
            return ExitCode::FAILURE;
        }
        if worker.is_finished() {
            return fail(format!("{}: the workload thread ended", spec.name()));
        }
        std::thread::sleep(REPORT_EVERY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip() {
        for r in [
            Report::Progress {
                work: 12,
                checked: 7,
                paced: true,
            },
            Report::Progress {
                work: 0,
                checked: 0,
                paced: false,
            },
            Report::Failed("batch: page 3 does not hold what pass 2 wrote".into()),
        ] {
            assert_eq!(Report::parse(&r.line()), Some(r));
        }
        assert_eq!(Report::parse("work x checked 1 paced 1"), None);
        assert_eq!(Report::parse("work 1 checked 1 paced 2"), None);
        assert_eq!(Report::parse("hello"), None);
    }
}
