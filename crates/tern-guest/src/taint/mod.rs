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
use std::sync::{mpsc, Arc, Mutex, MutexGuard};
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
/// How many 1 ms rounds after an `mmap` entry its process's maps are read again.
const MAPS_TRIES: u32 = 5;
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
    /// Threads inside `connect`, and the fd.
    connecting: BTreeMap<u32, i32>,
    last_thaw: Option<ThawReport>,
    /// Moves the thawed processes back to their cgroups, after the thaw's answer.
    tidier: Option<Tidier>,
}

/// The thread that moves thawed processes back to their cgroups once the thaw is
/// answered. It starts with the freeze, not at the thaw: right after a migration the
/// guest runs every path for the first time on its new host (slowly, under an
/// emulator that translates it anew), and creating a thread there held the answer
/// the migration waits for by 24-73 ms.
struct Tidier {
    tx: Option<mpsc::Sender<Freezer>>,
    thread: JoinHandle<()>,
}

impl Tidier {
    fn start() -> std::io::Result<Tidier> {
        let (tx, rx) = mpsc::channel::<Freezer>();
        let thread = std::thread::Builder::new()
            .name("taint-tidy".into())
            .spawn(move || {
                if let Ok(f) = rx.recv() {
                    f.tidy();
                }
            })?;
        Ok(Tidier {
            tx: Some(tx),
            thread,
        })
    }

    /// Hands the thawed freezer to the thread; tidies here if the thread is gone.
    fn hand(&mut self, f: Freezer) {
        let Some(tx) = self.tx.take() else {
            // Handed one already (not expected): tidy here rather than leave it.
            return f.tidy();
        };
        if let Err(mpsc::SendError(f)) = tx.send(f) {
            f.tidy();
        }
    }

    /// Waits for the moves back (a tidier never handed a freezer just ends).
    fn join(mut self) {
        self.tx = None;
        let _ = self.thread.join();
    }
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
        // A thread left from a freeze that ended by its deadline, or from a thaw.
        self.stop_thread();
        self.join_tidying();
        // The migration waits for this answer, and under TCG a guest busy with the very
        // work to be frozen would get half its vCPU to the scan: the scan runs ahead of it.
        let _rt = RealTime::raise();
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
        let tidier = Tidier::start().map_err(GuestError::Io)?;
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
                tidier: Some(tidier),
                ..State::default()
            };
            st.freeze_report(false)
        };
        self.shared.stop.store(false, Ordering::Relaxed);
        let shared = self.shared.clone();
        match std::thread::Builder::new()
            .name("taint".into())
            .spawn(move || track(rec, decoder, &shared))
        {
            Ok(t) => self.thread = Some(t),
            Err(e) => {
                // Without the thread nothing would keep the deadline: no freeze.
                self.lock().end(ThawCause::Host);
                return Err(GuestError::Io(e));
            }
        }
        Ok(report)
    }

    /// `thaw`: ends the freeze under way; without one, says how the last one ended.
    pub fn thaw(&mut self) -> ThawReport {
        // The thaw first, the event thread after: closing its tracepoints waits for
        // the kernel's RCU grace periods (hundreds of ms on a slow vCPU), and the
        // migration waits for this answer. The thread is told to stop and joined at
        // the next freeze or when the agent ends.
        self.shared.stop.store(true, Ordering::Relaxed);
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

    /// Waits for the last thaw's moves back, so a new freeze's group is not emptied by them.
    fn join_tidying(&self) {
        let t = self.lock().tidier.take();
        if let Some(t) = t {
            t.join();
        }
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
        self.stop_thread();
        self.join_tidying();
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
        // Thawed already; the moves back wait for RCU grace periods, off the answer's path.
        match self.tidier.as_mut() {
            Some(t) => t.hand(f),
            None => f.tidy(),
        }
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
        self.world.unix_peer = s.unix_peer.clone();
        self.world.unix_pending = s.unix_pending.clone();
        self.sockets = s;
        self.adopt_inet();
    }

    /// Refreshes the TCP and UDP tables alone (a connection came or went).
    fn refresh_inet(&mut self) {
        (self.sockets.inet, self.sockets.accepted_external) = scan::inet_sockets();
        self.adopt_inet();
    }

    fn adopt_inet(&mut self) {
        let w = &mut self.world;
        w.inet = self.sockets.inet.clone();
        for (l, peer) in &self.sockets.accepted_external {
            w.accepted_external.insert(*l, peer.clone());
        }
    }

    /// Whether `pid`'s fd `fd` is a socket the tables do not list.
    fn unknown_socket(&self, pid: u32, fd: i32) -> bool {
        let Ok(link) = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) else {
            return false;
        };
        let link = link.to_string_lossy();
        link.starts_with("socket:[") && scan::parse_link(&link, &self.sockets).is_none()
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
        // A new connection changes the TCP tables; a new fd only matters to them when
        // it is a socket they do not list yet (checked below, once per batch).
        if batch.iter().any(|e| matches!(e, Event::Established)) {
            self.refresh_inet();
        }
        let mut refreshed = false;
        let before = tainted(&self.verdicts);
        // Maps read again unchanged are all a batch may hold: then nothing to classify.
        let mut changed = batch.iter().any(|e| !matches!(e, Event::Maps { .. }));
        for e in batch {
            match *e {
                Event::Fork { parent, child } => self.forked(parent, child, &before),
                Event::Exit { tid } => {
                    // A thread's exit has its own id; only a process's leader is listed.
                    if self.world.procs.remove(&tid).is_some() {
                        self.world.sticky.remove(&tid);
                    }
                }
                Event::Connecting { tid, fd } => {
                    self.connecting.insert(tid, fd);
                }
                Event::Connected { tid } => {
                    // The peer is new in the tables, whatever the socket.
                    if !refreshed {
                        self.refresh_sockets();
                        refreshed = true;
                    }
                    match self.connecting.remove(&tid) {
                        Some(fd) => self.new_fd(tid, fd),
                        None => self.reread(tid, false),
                    }
                }
                Event::NewFd { tid, fd } => {
                    let pid = self.pid_of(tid);
                    if !refreshed && pid.is_some_and(|p| self.unknown_socket(p, fd)) {
                        self.refresh_sockets();
                        refreshed = true;
                    }
                    self.new_fd(tid, fd);
                }
                // A new socket in the table gets the socket tables read again.
                Event::FdTable { tid } => self.reread(tid, false),
                Event::Exec { tid } => self.reread(tid, true),
                Event::Maps { tid } => {
                    let Some(pid) = self.pid_of(tid) else {
                        continue;
                    };
                    if let Some(p) = self.world.procs.get_mut(&pid).filter(|p| !p.exempt) {
                        let maps = scan::mappings(pid);
                        let old: Vec<&graph::Handle> =
                            p.handles.iter().filter(|h| h.fd.is_none()).collect();
                        if old.len() == maps.len() && maps.iter().all(|m| old.contains(&m)) {
                            continue;
                        }
                        p.handles.retain(|h| h.fd.is_some());
                        p.handles.extend(maps);
                        changed = true;
                    }
                }
                Event::Established => {}
            }
        }
        if !changed {
            return;
        }
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

    /// The process of thread `tid`: itself when it leads one the world knows (no read).
    fn pid_of(&self, tid: u32) -> Option<u32> {
        if self.world.procs.contains_key(&tid) {
            return Some(tid);
        }
        scan::tgid(tid)
    }

    /// A fork: the child starts with its parent's fds and mappings (nothing to read).
    fn forked(&mut self, parent: u32, child: u32, tainted_before: &BTreeSet<u32>) {
        let Some(ppid) = self.pid_of(parent) else {
            return;
        };
        // A new thread shows in its process's task list (a `stat`, no read).
        if Path::new(&format!("/proc/{ppid}/task/{child}")).exists() {
            return;
        }
        let Some(mut p) = self.world.procs.get(&ppid).cloned() else {
            if let Some(p) = scan::process(child, &self.sockets) {
                self.world.procs.insert(child, p);
            }
            return;
        };
        p.pid = child;
        p.ppid = ppid;
        p.exempt = false;
        if self.world.procs[&ppid].exempt {
            // Exempt parents hold nothing in the world: read the child itself.
            match scan::process(child, &self.sockets) {
                Some(c) => p = c,
                None => return,
            }
        }
        if tainted_before.contains(&ppid) {
            self.world
                .sticky
                .entry(child)
                .or_default()
                .push(TaintReason {
                    kind: DependencyKind::Parent,
                    fd: None,
                    peer: Some(format!("pid {ppid}")),
                    via_pid: Some(ppid),
                    latency_ms: None,
                });
        }
        self.world.procs.insert(child, p);
    }

    /// One new fd of thread `tid`'s process.
    fn new_fd(&mut self, tid: u32, fd: i32) {
        let Some(pid) = self.pid_of(tid) else { return };
        match self.world.procs.get_mut(&pid) {
            Some(p) if !p.exempt => {
                p.handles.retain(|h| h.fd != Some(fd));
                p.handles.extend(scan::handle(pid, fd, &self.sockets));
            }
            Some(_) => {}
            None => {
                if let Some(p) = scan::process(pid, &self.sockets) {
                    self.world.procs.insert(pid, p);
                }
            }
        }
    }

    /// Reads thread `tid`'s process's fd table again (only changed fds in full); after
    /// an exec also its name, and its shared mappings are gone.
    fn reread(&mut self, tid: u32, exec: bool) {
        let Some(pid) = self.pid_of(tid) else { return };
        let Some(p) = self.world.procs.get_mut(&pid) else {
            if let Some(p) = scan::process(pid, &self.sockets) {
                self.world.procs.insert(pid, p);
            }
            return;
        };
        if exec {
            if let Some(c) = scan::comm(pid) {
                p.comm = c;
            }
        }
        if p.exempt {
            return;
        }
        let Some((mut fds, unknown)) = scan::refresh_fds(pid, &p.handles, &self.sockets) else {
            return;
        };
        if unknown {
            // A socket new to the tables (received, or made by socketpair).
            self.refresh_sockets();
            let Some(p) = self.world.procs.get_mut(&pid) else {
                return;
            };
            match scan::refresh_fds(pid, &p.handles, &self.sockets) {
                Some((again, _)) => fds = again,
                None => return,
            }
        }
        let Some(p) = self.world.procs.get_mut(&pid) else {
            return;
        };
        if !exec {
            fds.extend(p.handles.iter().filter(|h| h.fd.is_none()).cloned());
        }
        p.handles = fds;
    }
}

/// Whether the agent itself caused the event: its own reads of `/proc` open files, and
/// following them would feed the tracker its own work forever. `stat` (not `open`) of
/// `/proc/self/task/TID` keeps the check itself out of the events.
fn own(e: &Event) -> bool {
    let tid = match *e {
        Event::Fork { parent, .. } => parent,
        Event::NewFd { tid, .. }
        | Event::FdTable { tid }
        | Event::Maps { tid }
        | Event::Connecting { tid, .. }
        | Event::Connected { tid }
        | Event::Exec { tid } => tid,
        Event::Exit { .. } | Event::Established => return false,
    };
    Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// The calling thread at a real-time priority until dropped, then back to its old
/// policy. Without the privilege it runs as it was.
struct RealTime {
    old: Option<(libc::c_int, libc::sched_param)>,
}

impl RealTime {
    fn raise() -> RealTime {
        let mut policy: libc::c_int = 0;
        let mut old = libc::sched_param { sched_priority: 0 };
        let new = libc::sched_param { sched_priority: 10 };
        // SAFETY: reads and sets this thread's own policy; the pointers are to locals
        // valid for the calls.
        let raised = unsafe {
            libc::pthread_getschedparam(libc::pthread_self(), &mut policy, &mut old) == 0
                && libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &new) == 0
        };
        RealTime {
            old: raised.then_some((policy, old)),
        }
    }
}

impl Drop for RealTime {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.old {
            // SAFETY: restores this thread's own policy; `param` is a valid local.
            unsafe { libc::pthread_setschedparam(libc::pthread_self(), policy, &param) };
        }
    }
}

/// The event thread: reads the kernel's events until stopped, or until the deadline
/// passes (then it thaws everything).
fn track(mut rec: RawRecorder, decoder: Decoder, shared: &Shared) {
    // A new dependency must be seen within 50 ms however busy the guest's CPUs are: the
    // thread runs at a real-time priority (briefly: it sleeps in `poll` between
    // batches). Without the privilege it runs as it is.
    let _rt = RealTime::raise();
    let mut seen_lost = 0;
    // Shared mappings show in /proc/PID/maps only once mmap returns; the entry event
    // names the process, which is read again on the next few rounds too.
    // (event, rounds left, its kernel time: what latencies are measured from).
    let mut maps_again: Vec<(Event, u32, u64)> = Vec::new();
    while !shared.stop.load(Ordering::Relaxed) {
        // A mapping announced by an mmap entry is looked for again soon.
        let wait = if maps_again.is_empty() {
            POLL_EVERY
        } else {
            Duration::from_millis(1)
        };
        let raw = match rec.poll(wait) {
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
        // Maps read again apart from the new events, so each taint is timed from the
        // event that caused it.
        if let Some(t) = maps_again.iter().map(|(_, _, t)| *t).min() {
            let again: Vec<Event> = maps_again.iter().map(|(e, _, _)| *e).collect();
            st.apply(&again, t);
            maps_again.retain_mut(|(_, tries, _)| {
                *tries -= 1;
                *tries > 0
            });
        }
        let mut batch = Vec::new();
        let first_ns = raw.first().map(|e| e.time_ns);
        for r in &raw {
            if let Some(e) = decoder.decode(&r.raw).filter(|e| !own(e)) {
                st.events += 1;
                if matches!(e, Event::Maps { .. }) {
                    maps_again.push((e, MAPS_TRIES, r.time_ns));
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
