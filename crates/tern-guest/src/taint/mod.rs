//! Dependency-aware migration, the guest's side: which processes the world outside
//! the VM depends on ("tainted"), and a freezer for the rest while the host copies
//! memory.
//!
//! - [`graph`]: the classification itself, over plain values (pure).
//! - [`scan`]: `/proc` and the kernel's socket tables into a [`graph::World`].
//! - [`unix_diag`]: unix socket peers over sock_diag netlink.
//! - [`events`]: the kernel events that create dependencies, decoded.
//! - [`freeze`]: the cgroup v2 freezer.
//!
//! [`Tracker`] ties them together for the agent: `freeze` scans once, freezes every
//! untainted process and starts a thread that reads the kernel's events every few
//! milliseconds, updates only the processes they name, classifies again and thaws a
//! frozen process the moment it becomes tainted. The same thread owns the deadline:
//! with no `freeze` renewal and no `thaw` within it, everything is thawed.

pub mod events;
pub mod freeze;
pub mod graph;
pub mod scan;
pub mod unix_diag;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::GuestError;
use events::{Decoder, Event};
use freeze::Freezer;
use graph::{classify, tainted, Verdict, World};
use scan::Sockets;
use tern_api::guest::{
    DependencyKind, FreezeReport, ProcessTaint, TaintClass, TaintReason, TaintReport, ThawCause,
    ThawReport, MAX_FREEZE_DEADLINE_MS,
};
use tern_trace::raw::RawRecorder;
use tern_trace::recorder::monotonic_ns;

/// How long the event thread waits for records before looking again: well inside the
/// 50 ms a new dependency has to be classified in, even under TCG.
pub const POLL_EVERY: Duration = Duration::from_millis(5);
/// Ring buffer per guest CPU for the tracker's events.
const RING_BYTES: usize = 512 << 10;

/// Checks a `freeze`'s deadline (pure).
pub fn check_deadline(deadline_ms: u64) -> Result<(), GuestError> {
    if !(1..=MAX_FREEZE_DEADLINE_MS).contains(&deadline_ms) {
        return Err(GuestError::BadRequest(format!(
            "deadline_ms {deadline_ms} is out of range: give 1 to {MAX_FREEZE_DEADLINE_MS}"
        )));
    }
    Ok(())
}

/// What the tracker knows, shared by the agent's command loop and the event thread.
#[derive(Default)]
struct State {
    world: World,
    /// The socket tables as last read.
    sockets: Sockets,
    verdicts: BTreeMap<u32, Verdict>,
    freezer: Option<Freezer>,
    deadline: Option<Instant>,
    deadline_ms: u64,
    events: u64,
    lost_events: u64,
    /// Processes tainted by an event: milliseconds from the event to the verdict.
    latency: BTreeMap<u32, f64>,
    last_thaw: Option<ThawReport>,
}

struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

/// The agent's taint tracker and freezer.
pub struct Tracker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Default for Tracker {
    fn default() -> Self {
        Tracker {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                stop: AtomicBool::new(false),
            }),
            thread: None,
        }
    }
}

fn err(e: impl std::fmt::Display) -> GuestError {
    GuestError::Taint(e.to_string())
}

impl Tracker {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().expect("taint state lock")
    }

    /// `taint`: the tracked classification while frozen, else a fresh scan.
    pub fn report(&self) -> TaintReport {
        let st = self.lock();
        if st.freezer.is_some() {
            return st.report(true);
        }
        let last_thaw = st.last_thaw.clone();
        drop(st);
        let (world, _) = scan::world();
        let verdicts = classify(&world);
        State {
            world,
            verdicts,
            last_thaw,
            ..State::default()
        }
        .report(false)
    }

    /// `freeze`: freezes every untainted process, or renews the deadline of the freeze
    /// under way.
    pub fn freeze(&mut self, deadline_ms: u64) -> Result<FreezeReport, GuestError> {
        check_deadline(deadline_ms)?;
        {
            let mut st = self.lock();
            if st.freezer.is_some() {
                st.deadline = Some(Instant::now() + Duration::from_millis(deadline_ms));
                st.deadline_ms = deadline_ms;
                return Ok(st.freeze_report(true));
            }
        }
        // A thread left from a freeze that ended by its deadline.
        self.stop_thread();
        // Events first, then the scan: what happens in between is applied twice, which
        // is harmless, rather than missed.
        let root = tern_trace::tracefs::ensure_mounted(Path::new(tern_trace::tracefs::TRACEFS))
            .map_err(err)?;
        let (decoder, points) = Decoder::load(&root).map_err(err)?;
        let rec = match RawRecorder::open(&points, RING_BYTES) {
            Ok(r) => r,
            // A kernel that refuses one of the filters gets them all unfiltered.
            Err(_) => {
                let bare: Vec<_> = points
                    .iter()
                    .map(|p| tern_trace::raw::Point {
                        filter: None,
                        ..p.clone()
                    })
                    .collect();
                RawRecorder::open(&bare, RING_BYTES).map_err(err)?
            }
        };
        let cgroups = freeze::root().map_err(err)?;
        let (world, sockets) = scan::world();
        let verdicts = classify(&world);
        let to_freeze: Vec<(u32, String)> = world
            .procs
            .values()
            .filter(|p| verdicts.get(&p.pid).map(|v| v.class) == Some(TaintClass::Untainted))
            .map(|p| (p.pid, p.comm.clone()))
            .collect();
        let freezer = Freezer::freeze(&cgroups, freeze::GROUP, &to_freeze).map_err(err)?;
        let report = {
            let mut st = self.lock();
            *st = State {
                world,
                sockets,
                verdicts,
                freezer: Some(freezer),
                deadline: Some(Instant::now() + Duration::from_millis(deadline_ms)),
                deadline_ms,
                last_thaw: st.last_thaw.take(),
                ..State::default()
            };
            st.freeze_report(false)
        };
        self.shared.stop.store(false, Ordering::Relaxed);
        let shared = self.shared.clone();
        self.thread = Some(
            std::thread::Builder::new()
                .name("taint".into())
                .spawn(move || track(rec, decoder, &shared))
                .map_err(GuestError::Io)?,
        );
        Ok(report)
    }

    /// `thaw`: ends the freeze under way; without one, says how the last one ended.
    pub fn thaw(&mut self) -> ThawReport {
        self.stop_thread();
        let mut st = self.lock();
        match st.end(ThawCause::Host) {
            Some(r) => r,
            None => st.last_thaw.clone().unwrap_or(ThawReport {
                cause: ThawCause::Host,
                processes: Vec::new(),
                freeze_ms: 0.0,
            }),
        }
    }

    /// Whether processes are frozen now.
    pub fn frozen(&self) -> bool {
        self.lock().freezer.is_some()
    }

    fn stop_thread(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.thaw();
    }
}

impl State {
    /// Thaws everything; the report is kept as `last_thaw`.
    fn end(&mut self, cause: ThawCause) -> Option<ThawReport> {
        let mut f = self.freezer.take()?;
        let processes = f.thaw_all();
        let r = ThawReport {
            cause,
            processes,
            freeze_ms: f.started().elapsed().as_secs_f64() * 1e3,
        };
        self.deadline = None;
        self.last_thaw = Some(r.clone());
        Some(r)
    }

    fn freeze_report(&self, renewed: bool) -> FreezeReport {
        let count = |c| self.verdicts.values().filter(|v| v.class == c).count() as u32;
        FreezeReport {
            frozen: self
                .freezer
                .as_ref()
                .map(Freezer::frozen)
                .unwrap_or_default(),
            tainted: count(TaintClass::External) + count(TaintClass::Dependent),
            exempt: count(TaintClass::Exempt),
            deadline_ms: self.deadline_ms,
            renewed,
        }
    }

    fn report(&self, event_driven: bool) -> TaintReport {
        let processes = self
            .world
            .procs
            .values()
            .map(|p| {
                let v = self.verdicts.get(&p.pid);
                let latency = self.latency.get(&p.pid).copied();
                ProcessTaint {
                    pid: p.pid,
                    ppid: p.ppid,
                    comm: p.comm.clone(),
                    class: v.map(|v| v.class).unwrap_or(TaintClass::Untainted),
                    frozen: self.freezer.as_ref().is_some_and(|f| f.is_frozen(p.pid)),
                    reasons: v
                        .map(|v| {
                            v.reasons
                                .iter()
                                .map(|r| TaintReason {
                                    latency_ms: r.latency_ms.or(latency),
                                    ..r.clone()
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                }
            })
            .collect();
        TaintReport {
            event_driven,
            frozen: self.freezer.is_some(),
            deadline_left_ms: self
                .deadline
                .map(|d| d.saturating_duration_since(Instant::now()).as_millis() as u64),
            events: self.events,
            lost_events: self.lost_events,
            processes,
            last_thaw: self.last_thaw.clone(),
        }
    }

    /// Refreshes the socket tables, keeping listeners known to have served outsiders.
    fn refresh_sockets(&mut self) {
        let s = scan::sockets();
        let w = &mut self.world;
        w.unix_peer = s.unix_peer.clone();
        w.unix_pending = s.unix_pending.clone();
        w.inet = s.inet.clone();
        for (l, peer) in &s.accepted_external {
            w.accepted_external.insert(*l, peer.clone());
        }
        self.sockets = s;
    }

    /// A fresh scan after lost events; what only events could tell is kept.
    fn rescan(&mut self) {
        let (mut w, s) = scan::world();
        self.sockets = s;
        w.sticky = std::mem::take(&mut self.world.sticky);
        for (l, peer) in std::mem::take(&mut self.world.accepted_external) {
            w.accepted_external.entry(l).or_insert(peer);
        }
        self.world = w;
    }

    /// Applies one batch of events (the oldest at `first_ns`): re-reads only the
    /// processes and fds they name, classifies again and thaws whoever became tainted.
    fn apply(&mut self, batch: &[Event], first_ns: u64) {
        // New fds may be sockets the tables do not list yet; an exit changes nothing.
        if batch.iter().any(|e| !matches!(e, Event::Exit { .. })) {
            self.refresh_sockets();
        }
        let sockets = std::mem::take(&mut self.sockets);
        let before = tainted(&self.verdicts);
        for e in batch {
            match *e {
                Event::Fork { parent, child } => {
                    let Some(tgid) = scan::tgid(child).filter(|t| *t == child) else {
                        continue; // a thread, or gone already
                    };
                    let Some(p) = scan::process(tgid, &sockets) else {
                        continue;
                    };
                    let parent = scan::tgid(parent).unwrap_or(parent);
                    if before.contains(&parent) && !p.exempt {
                        self.world
                            .sticky
                            .entry(tgid)
                            .or_default()
                            .push(TaintReason {
                                kind: DependencyKind::Parent,
                                fd: None,
                                peer: Some(format!("pid {parent}")),
                                via_pid: Some(parent),
                                latency_ms: None,
                            });
                    }
                    self.world.procs.insert(tgid, p);
                }
                Event::Exit { tid } => {
                    // A thread's exit has its own id; only a process's leader is listed.
                    if self.world.procs.remove(&tid).is_some() {
                        self.world.sticky.remove(&tid);
                    }
                }
                Event::NewFd { tid, fd } => {
                    let Some(pid) = scan::tgid(tid) else { continue };
                    let view = &sockets;
                    match self.world.procs.get_mut(&pid) {
                        Some(p) if !p.exempt => {
                            p.handles.retain(|h| h.fd != Some(fd));
                            if let Some(h) = scan::handle(pid, fd, view) {
                                p.handles.push(h);
                            }
                        }
                        Some(_) => {}
                        None => {
                            if let Some(p) = scan::process(pid, view) {
                                self.world.procs.insert(pid, p);
                            }
                        }
                    }
                }
                Event::FdTable { tid } | Event::Maps { tid } => {
                    let Some(pid) = scan::tgid(tid) else { continue };
                    if let Some(p) = scan::process(pid, &sockets) {
                        self.world.procs.insert(pid, p);
                    }
                }
                Event::Established => {}
            }
        }
        self.sockets = sockets;
        self.verdicts = classify(&self.world);
        let now = monotonic_ns();
        let latency_ms = now.saturating_sub(first_ns) as f64 / 1e6;
        let newly: BTreeSet<u32> = tainted(&self.verdicts)
            .difference(&before)
            .copied()
            .collect();
        for pid in newly {
            self.latency.insert(pid, latency_ms);
            if let Some(f) = self.freezer.as_mut() {
                f.thaw_one(pid);
            }
        }
    }
}

/// The event thread: reads the kernel's events until stopped, or until the deadline
/// passes (then it thaws everything).
fn track(mut rec: RawRecorder, decoder: Decoder, shared: &Shared) {
    let mut seen_lost = 0;
    // Shared mappings show in /proc/PID/maps only once mmap returns; the entry event
    // names the process, which is read again on the next round too.
    let mut maps_again: Vec<Event> = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        let raw = match rec.poll(POLL_EVERY) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("tern-guest: taint events: {e}; rescanning instead");
                Vec::new()
            }
        };
        let mut st = shared.state.lock().expect("taint state lock");
        if st.deadline.is_some_and(|d| Instant::now() >= d) {
            st.end(ThawCause::Deadline);
            return;
        }
        if st.freezer.is_none() {
            return;
        }
        let lost = rec.lost();
        if lost > seen_lost {
            st.lost_events += lost - seen_lost;
            seen_lost = lost;
            st.rescan();
            let first = raw.first().map(|e| e.time_ns).unwrap_or_else(monotonic_ns);
            st.apply(&[], first);
            continue;
        }
        let mut batch: Vec<Event> = std::mem::take(&mut maps_again);
        let first_ns = raw.first().map(|e| e.time_ns);
        for r in &raw {
            if let Some(e) = decoder.decode(&r.raw) {
                st.events += 1;
                if matches!(e, Event::Maps { .. }) {
                    maps_again.push(e);
                }
                batch.push(e);
            }
        }
        if !batch.is_empty() {
            st.apply(&batch, first_ns.unwrap_or_else(monotonic_ns));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_are_checked() {
        assert!(check_deadline(1).is_ok());
        assert!(check_deadline(MAX_FREEZE_DEADLINE_MS).is_ok());
        let e = check_deadline(0).unwrap_err().to_string();
        assert!(e.contains("1 to 600000"), "{e}");
        assert!(check_deadline(MAX_FREEZE_DEADLINE_MS + 1).is_err());
    }

    #[test]
    fn thaw_without_a_freeze_is_an_empty_report() {
        let mut t = Tracker::default();
        let r = t.thaw();
        assert_eq!(r.cause, ThawCause::Host);
        assert!(r.processes.is_empty());
        assert!(!t.frozen());
    }
}
