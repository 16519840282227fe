//! The agent's command loop: reads request lines, answers response lines.
//!
//! [`Agent::handle`] turns one request into one response and touches nothing but the
//! workload table, `/proc` and (for `freeze`/`thaw`) the guest's cgroup freezer; [`serve`] moves lines over any reader and writer, so
//! the same loop runs on the virtio-serial port, a UART, or stdin/stdout in tests.

use std::io::{BufRead, Write};
use std::time::Instant;

use crate::fault::{self, Fault};
use crate::health;
use crate::sysinfo;
use crate::taint::Tracker;
use crate::trace::{self, Tracer};
use crate::workload::Workloads;
use crate::GuestError;
use tern_api::guest::{Command, HealthReport, Reply, Request, Response, Status};

/// The agent's state: its workloads and when it started.
pub struct Agent {
    pub workloads: Workloads,
    started: Instant,
    /// Set once the host asked for power-off; the caller acts on it after answering.
    pub poweroff_requested: bool,
    /// Set once the host asked for a fault; the caller injects it after answering.
    pub fault_requested: Option<Fault>,
    /// The scheduler trace under way, if any.
    tracer: Option<Tracer>,
    /// Taint tracking and the freezer of a dependency-aware migration.
    taint: Tracker,
    /// Whether `freeze` is carried out: only by an agent known to run in a guest (on
    /// its port), never by default, so one started on a host cannot freeze the host.
    pub may_freeze: bool,
}

impl Default for Agent {
    fn default() -> Self {
        Agent {
            workloads: Workloads::default(),
            started: Instant::now(),
            poweroff_requested: false,
            fault_requested: None,
            tracer: None,
            taint: Tracker::default(),
            may_freeze: false,
        }
    }
}

impl Agent {
    /// Answers one request line (a malformed line gets an error answer, not a crash).
    pub fn handle_line(&mut self, line: &str) -> Response {
        match serde_json::from_str::<Request>(line) {
            Ok(req) => self.handle(req),
            Err(e) => {
                // Repeat the id if the line was JSON with one, so the host can match it.
                let id = serde_json::from_str::<serde_json::Value>(line)
                    .ok()
                    .and_then(|v| v.get("id").and_then(serde_json::Value::as_u64))
                    .unwrap_or(0);
                Response::failure(id, format!("bad request: {e}"))
            }
        }
    }

    pub fn handle(&mut self, req: Request) -> Response {
        let id = req.id;
        match self.run(req.command) {
            Ok(reply) => Response::success(id, reply),
            Err(e) => Response::failure(id, e),
        }
    }

    fn run(&mut self, cmd: Command) -> Result<Reply, GuestError> {
        let recv_ns = trace::now_ns();
        Ok(match cmd {
            Command::Ping => Reply::Pong {
                version: env!("CARGO_PKG_VERSION").to_string(),
                uptime_s: self.uptime(),
            },
            Command::Status => {
                let (mem_total_kib, mem_available_kib) = sysinfo::meminfo();
                Reply::Status(Status {
                    uptime_s: self.uptime(),
                    load: sysinfo::loadavg(),
                    mem_total_kib,
                    mem_available_kib,
                    workloads: self.workloads.status(),
                })
            }
            Command::Start { workload } => Reply::Started {
                workload: self.workloads.start(workload)?.to_string(),
            },
            Command::Stop { workload } => Reply::Stopped {
                workload: self.workloads.stop(&workload)?.to_string(),
            },
            Command::Verify => Reply::Verify(self.workloads.verify()?),
            Command::DiskCheck { device, mib } => {
                Reply::DiskCheck(self.workloads.disk_check(device, mib)?)
            }
            Command::Health => {
                let log = health::read_kernel_log().map_err(GuestError::Io)?;
                let findings = health::scan(&log);
                Reply::Health(HealthReport {
                    ok: findings.is_empty(),
                    lines_scanned: log.lines().count() as u64,
                    findings,
                })
            }
            Command::TraceStart {
                max_records,
                idle_stop_ms,
            } => {
                // A new recording replaces one whose host went away without stopping it.
                self.tracer = None;
                let t = Tracer::start(max_records, idle_stop_ms)?;
                let reply = Reply::TraceStarted {
                    cpus: t.cpus.clone(),
                    start_ns: t.start_ns,
                };
                self.tracer = Some(t);
                reply
            }
            Command::TraceRead { max_records } => {
                let t = self.tracer.as_mut().ok_or_else(|| {
                    GuestError::Trace("no recording: send trace-start first".into())
                })?;
                match t.read(max_records) {
                    Ok(chunk) => Reply::TraceChunk(chunk),
                    Err(e) => {
                        self.tracer = None;
                        return Err(e);
                    }
                }
            }
            Command::TraceStop => {
                self.tracer = None;
                Reply::TraceStopped
            }
            Command::Clock => Reply::Clock {
                recv_ns,
                send_ns: trace::now_ns(),
            },
            Command::Affinity { threads, cpu } => {
                let time_ns = trace::now_ns();
                Reply::Moved {
                    threads: trace::move_threads(&threads, cpu)?,
                    time_ns,
                }
            }
            Command::Taint => Reply::Taint(self.taint.report()),
            Command::Freeze { deadline_ms } if !self.may_freeze => {
                crate::taint::check_deadline(deadline_ms)?;
                return Err(GuestError::BadRequest(
                    "freeze is refused here: this agent serves stdin/stdout, so it may run on a host, whose own processes it would freeze; start it with --allow-freeze inside a guest".into(),
                ));
            }
            Command::Freeze { deadline_ms } => Reply::Frozen(self.taint.freeze(deadline_ms)?),
            Command::Thaw => Reply::Thawed(self.taint.thaw()),
            Command::Poweroff => {
                // Nothing stays frozen past the agent.
                self.taint.thaw();
                self.tracer = None;
                self.workloads.stop_all();
                self.poweroff_requested = true;
                Reply::PoweringOff
            }
            Command::Panic => {
                self.fault_requested = Some(Fault::Panic);
                Reply::Panicking
            }
            Command::Hang => {
                self.fault_requested = Some(Fault::Hang);
                Reply::Hanging {
                    cpus: fault::cpus(),
                }
            }
        })
    }

    /// Seconds since boot where `/proc` says, else since the agent started.
    fn uptime(&self) -> f64 {
        match sysinfo::uptime() {
            u if u > 0.0 => u,
            _ => self.started.elapsed().as_secs_f64(),
        }
    }
}

/// How a [`serve`] loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The reader reached its end: on a virtio-serial port, the host disconnected.
    Eof,
    /// The host asked for power-off and has been answered.
    Poweroff,
    /// The host asked for a fault and has been answered.
    Fault(Fault),
}

/// Answers requests from `input` on `output` until end of input or power-off.
pub fn serve(
    agent: &mut Agent,
    input: &mut impl BufRead,
    output: &mut impl Write,
) -> Result<Ended, GuestError> {
    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line).map_err(GuestError::Io)? == 0 {
            return Ok(Ended::Eof);
        }
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        let resp = agent.handle_line(text);
        let mut out = serde_json::to_vec(&resp).map_err(GuestError::Json)?;
        out.push(b'\n');
        output.write_all(&out).map_err(GuestError::Io)?;
        output.flush().map_err(GuestError::Io)?;
        if agent.poweroff_requested {
            return Ok(Ended::Poweroff);
        }
        if let Some(f) = agent.fault_requested.take() {
            return Ok(Ended::Fault(f));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::guest::Reply;

    fn run(lines: &str) -> (Vec<Response>, Ended) {
        let mut agent = Agent::default();
        let mut out = Vec::new();
        let ended = serve(&mut agent, &mut lines.as_bytes(), &mut out).unwrap();
        let resp = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (resp, ended)
    }

    #[test]
    fn answers_each_line_with_its_id() {
        let (r, ended) = run("{\"id\":5,\"cmd\":\"ping\"}\n\n{\"id\":6,\"cmd\":\"status\"}\n");
        assert_eq!(ended, Ended::Eof);
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].id, r[1].id), (5, 6));
        assert!(matches!(r[0].result, Some(Reply::Pong { .. })));
        assert!(matches!(r[1].result, Some(Reply::Status(_))));
    }

    #[test]
    fn bad_lines_get_errors_not_crashes() {
        let (r, _) = run("{\"id\":9,\"cmd\":\"reboot\"}\nnot json\n{\"id\":10,\"cmd\":\"stop\",\"workload\":\"cpu\"}\n");
        assert_eq!(r.len(), 3);
        assert!(r.iter().all(|x| !x.ok));
        assert_eq!(r[0].id, 9);
        assert!(r[0].error.as_deref().unwrap().contains("unknown variant"));
        assert!(r[2].error.as_deref().unwrap().contains("no workload"));
    }

    #[test]
    fn an_agent_not_known_to_run_in_a_guest_refuses_to_freeze() {
        let (r, _) = run(
            "{\"id\":1,\"cmd\":\"freeze\",\"deadline_ms\":1000}\n{\"id\":2,\"cmd\":\"taint\"}\n",
        );
        assert!(!r[0].ok);
        assert!(
            r[0].error.as_deref().unwrap().contains("--allow-freeze"),
            "{:?}",
            r[0]
        );
        let Some(Reply::Taint(t)) = &r[1].result else {
            panic!("{:?}", r[1]);
        };
        assert!(!t.frozen && t.processes.iter().all(|p| !p.frozen));
    }

    #[test]
    fn taint_scans_and_bad_freezes_are_refused_before_freezing() {
        let (r, _) = run("{\"id\":1,\"cmd\":\"taint\"}\n{\"id\":2,\"cmd\":\"freeze\",\"deadline_ms\":0}\n{\"id\":3,\"cmd\":\"thaw\"}\n");
        let Some(Reply::Taint(t)) = &r[0].result else {
            panic!("{:?}", r[0]);
        };
        assert!(!t.event_driven && !t.frozen);
        let me = t
            .processes
            .iter()
            .find(|p| p.pid == std::process::id())
            .expect("this process is in the scan");
        assert_eq!(me.class, tern_api::guest::TaintClass::Exempt);
        assert!(!r[1].ok);
        assert!(
            r[1].error.as_deref().unwrap().contains("deadline_ms 0"),
            "{:?}",
            r[1]
        );
        // Nothing was frozen: a thaw says so.
        let Some(Reply::Thawed(th)) = &r[2].result else {
            panic!("{:?}", r[2]);
        };
        assert!(th.processes.is_empty());
    }

    #[test]
    fn poweroff_ends_the_loop_after_answering() {
        let (r, ended) = run("{\"id\":1,\"cmd\":\"poweroff\"}\n{\"id\":2,\"cmd\":\"ping\"}\n");
        assert_eq!(ended, Ended::Poweroff);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].result, Some(Reply::PoweringOff));
    }

    #[test]
    fn faults_end_the_loop_after_answering_and_are_left_to_the_caller() {
        let (r, ended) = run("{\"id\":1,\"cmd\":\"panic\"}\n{\"id\":2,\"cmd\":\"ping\"}\n");
        assert_eq!(ended, Ended::Fault(Fault::Panic));
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].result, Some(Reply::Panicking));
        let (r, ended) = run("{\"id\":3,\"cmd\":\"hang\"}\n");
        assert_eq!(ended, Ended::Fault(Fault::Hang));
        assert!(matches!(r[0].result, Some(Reply::Hanging { cpus }) if cpus >= 1));
    }
}
