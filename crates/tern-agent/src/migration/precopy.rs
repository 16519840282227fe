//! The live phase: rounds of changed pages while the guest runs, until the policy says
//! stop. Every decision (what to hold back, how hard to throttle, when to stop) comes
//! from `tern-migrate`'s pure policies; this loop only measures and executes.
//!
//! ```text
//!  scan ─► round r: send dirty pages not held back ─► scan ─► telemetry ─► decide
//!             ▲                                                         │
//!             └──── Continue / Throttle (cgroup) ◄──────────────────────┤
//!                                                   StopAndCopy ◄──────┘
//! ```
//!
//! Round 1 is sent in two stretches: the first `probe_bytes` of non-zero memory, then
//! the rest, while beside it a probe scan measures how fast the guest dirtied pages so
//! far and the policy may throttle it at once ([`Policy::first_round_throttle`]). The
//! scan runs beside the sending, so the link does not wait for it.

use std::sync::atomic::AtomicBool;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use tern_migrate::fragment::{FragmentTracker, DEFAULT_FRAGMENT_BYTES};
use tern_migrate::policy::{decide, Decision, Limits, Policy, PolicyInput, StopReason};
use tern_migrate::precopy::{self as rules, measured_bandwidth, predicted_downtime_s};
use tern_migrate::telemetry::{FirstRoundProbe, RoundTelemetry, WriterSeen};

use super::memory::{scan, scan_timed, Scan, SeenDigests, SentDigests, SourceMemory};
use super::outgoing::{Outgoing, RoundTransfer};
use super::wire::PAGE_SIZE;
use super::MigrationError;

/// Knobs of the live phase.
#[derive(Debug, Clone)]
pub struct PrecopyConfig {
    pub limits_downtime_s: f64,
    pub max_rounds: u32,
    /// Iteration stops (not converged) after this long.
    pub max_elapsed_s: f64,
    pub scan_threads: usize,
    /// Fixed cost of stopping besides the final pass: device state and resume.
    pub stop_cost_s: f64,
    /// Link rate to assume before one round was big enough to measure it.
    pub initial_bandwidth_bytes_per_s: f64,
    /// Non-zero bytes round 1 sends before it probes the guest's dirty rate; round 1
    /// is not split when less than twice this is to send. 0: no probe.
    pub probe_bytes: u64,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            limits_downtime_s: tern_migrate::policy::DEFAULT_DOWNTIME_LIMIT_S,
            max_rounds: rules::MAX_ROUNDS,
            max_elapsed_s: 60.0,
            scan_threads: 2,
            stop_cost_s: rules::STOP_COST_S,
            initial_bandwidth_bytes_per_s: 125e6,
            probe_bytes: rules::PROBE_BYTES,
        }
    }
}

/// How the live phase ended.
#[derive(Debug, Clone)]
pub struct PrecopyOutcome {
    pub history: Vec<RoundTelemetry>,
    pub stop_reason: StopReason,
    pub bytes: u64,
    pub max_throttle_percent: u8,
    /// Pages that were not zero when round 1 read them.
    pub nonzero_pages: u64,
    /// What round 1's probe measured, when round 1 was split for it.
    pub probe: Option<FirstRoundProbe>,
}

/// A freeze the guest is still answering when round 1 starts (`dependency-aware`):
/// round 1 does not wait for it, but its probe rates the guest as the rest of the move
/// will see it, so it waits for the answer.
#[derive(Default)]
pub struct FreezeGate {
    answer: Mutex<Option<bool>>,
    answered: Condvar,
}

impl FreezeGate {
    /// The guest answered: `true` when it froze its untainted processes.
    pub fn open(&self, frozen: bool) {
        *self.answer.lock().expect("freeze gate lock") = Some(frozen);
        self.answered.notify_all();
    }

    /// The answer, waiting up to `wait` for it; `None` when none came.
    pub fn wait(&self, wait: Duration) -> Option<bool> {
        let guard = self.answer.lock().expect("freeze gate lock");
        let (guard, _) = self
            .answered
            .wait_timeout_while(guard, wait, |a| a.is_none())
            .expect("freeze gate lock");
        *guard
    }
}

/// How long round 1's probe waits for the guest's freeze answer: longer than the
/// source waits for it before it goes on as `adaptive` (and opens the gate).
const FREEZE_GATE_WAIT: Duration = Duration::from_secs(5);
/// Once the guest froze, the probe rates it over this long from a fresh baseline: the
/// untainted writers' last writes before the freeze are no part of its rate.
const PROBE_WINDOW_AFTER_FREEZE: Duration = Duration::from_millis(100);

/// How close to the guest's next share a catch-up pass may end: QEMU's stop follows.
const HOLD_MARGIN: Duration = Duration::from_millis(2);

/// Applies a throttle and returns the percent actually in effect (0 when the host
/// cannot throttle). The policy's next decision sees the applied value. `Send`: the
/// round-1 probe applies it from its own thread.
pub trait Throttle: Send {
    fn apply(&mut self, percent: u8) -> u8;

    /// Waits, at most `limit`, until the throttled guest is held off the CPU with at
    /// least `at_least` left before its next share; `None` when this throttle cannot
    /// tell (nothing throttled, no watch on the vCPUs) or no such moment came in time.
    fn hold(&mut self, _limit: Duration, _at_least: Duration) -> Option<ThrottleHold> {
        None
    }

    /// Whether the throttled guest ran since `at`; `None` when this throttle cannot
    /// tell.
    fn ran_since(&self, _at: Instant) -> Option<bool> {
        None
    }
}

/// A throttled guest held off the CPU until its next share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleHold {
    /// How long the wait for it took.
    pub waited: Duration,
    /// How long the guest stays off the CPU from now.
    pub held_for: Duration,
}

/// Runs live rounds until the policy decides to stop and copy. `on_round` sees every
/// round's telemetry as soon as it is known (the status endpoint reads it); the round
/// under way is counted on `out`'s [`RoundMeter`](super::outgoing::RoundMeter).
#[allow(clippy::too_many_arguments)] // each is a distinct collaborator of the loop
pub fn run(
    out: &mut Outgoing,
    mem: &SourceMemory,
    sent: &SentDigests,
    policy: &dyn Policy,
    cfg: &PrecopyConfig,
    throttle: &mut dyn Throttle,
    cancel: &AtomicBool,
    freeze: Option<&FreezeGate>,
    on_round: &mut dyn FnMut(&RoundTelemetry),
) -> Result<PrecopyOutcome, MigrationError> {
    let ctx = Live {
        mem,
        sent,
        policy,
        cfg,
        cancel,
        freeze,
    };
    let mut rounds = Rounds::start(&ctx);
    for round in 1u32.. {
        let round_start = Instant::now();
        let probed = rounds.send(&ctx, out, round, throttle)?;
        let telemetry = rounds.measure(&ctx, round, round_start, &probed);
        on_round(&telemetry);
        rounds.history.push(telemetry);
        if let Some(reason) = rounds.decide(policy, throttle) {
            if reason.converged() {
                rounds.catch_up(&ctx, out, round + 1, throttle)?;
            }
            return Ok(rounds.outcome(reason));
        }
    }
    unreachable!("the round counter does not run out before the policy's round cap")
}

/// The live loop's state from one round to the next.
struct Rounds {
    started: Instant,
    seen: SeenDigests,
    tracker: FragmentTracker,
    limits: Limits,
    /// Per fragment: held back from the next round.
    held: Vec<bool>,
    history: Vec<RoundTelemetry>,
    bandwidth: f64,
    throttle_percent: u8,
    max_throttle: u8,
    bytes: u64,
    nonzero_pages: u64,
    probe: Option<FirstRoundProbe>,
    /// When memory was last scanned: the guest's changes are rated over the time since.
    last_scan: Instant,
    /// Pages that differ from what was sent: the next round's candidates.
    dirty: Vec<u64>,
    /// The last round's transfer, and how long sending it took.
    last: (RoundTransfer, f64),
    /// How long the last scan took.
    last_scan_s: f64,
}

impl Rounds {
    /// The state before round 1, which covers every page, zero pages as runs: the
    /// destination file is not assumed to be zero-filled (its QEMU may have written to
    /// it at start-up). The baseline the guest's changes are counted from is taken by
    /// round 1 (beside its first stretch when it is split, so the link does not wait
    /// for a pass over all memory).
    fn start(ctx: &Live<'_>) -> Rounds {
        let Live { mem, cfg, .. } = *ctx;
        let pages = mem.pages();
        let started = Instant::now();
        let seen = SeenDigests::new(pages);
        let tracker = FragmentTracker::new(pages, DEFAULT_FRAGMENT_BYTES / PAGE_SIZE as u64);
        let limits = Limits {
            downtime_limit_s: cfg.limits_downtime_s,
            max_rounds: cfg.max_rounds,
            max_elapsed_s: Some(cfg.max_elapsed_s),
            ..Limits::new(pages, PAGE_SIZE as u64)
        };
        // Round 1's split counts the pages with data.
        mem.refresh_extents();
        Rounds {
            started,
            seen,
            held: vec![false; tracker.len()],
            tracker,
            limits,
            history: Vec::new(),
            bandwidth: cfg.initial_bandwidth_bytes_per_s,
            throttle_percent: 0,
            max_throttle: 0,
            bytes: 0,
            nonzero_pages: 0,
            probe: None,
            // Set when round 1 has taken the baseline.
            last_scan: Instant::now(),
            dirty: (0..pages).collect(),
            last: (RoundTransfer::default(), 0.0),
            last_scan_s: 0.0,
        }
    }

    fn is_held(&self, page: u64) -> bool {
        self.tracker
            .fragment_of(page)
            .is_some_and(|f| self.held[f as usize])
    }

    /// Sends round `round`: the dirty pages not held back. Returns the pages the round-1
    /// probe saw change (the round's changes, with the scan after it).
    fn send(
        &mut self,
        ctx: &Live<'_>,
        out: &mut Outgoing,
        round: u32,
        throttle: &mut dyn Throttle,
    ) -> Result<Vec<u64>, MigrationError> {
        let round_start = Instant::now();
        let to_send: Vec<u64> = self
            .dirty
            .iter()
            .copied()
            .filter(|&p| !self.is_held(p))
            .collect();
        let at = self.started.elapsed().as_secs_f64();
        out.meter().begin(round, to_send.len() as u64, at);
        let split = (round == 1)
            .then(|| probe_split(ctx.mem, &to_send, ctx.cfg.probe_bytes))
            .flatten();
        let mut probed = Vec::new();
        let t = match split {
            Some(split) => {
                let limits = &self.limits;
                let p = ctx.first_round(out, &self.seen, &to_send, split, limits, throttle)?;
                if p.throttle > 0 {
                    self.throttle_percent = p.throttle;
                    self.max_throttle = self.max_throttle.max(p.throttle);
                }
                if let Some(b) = p.bandwidth {
                    self.bandwidth = b;
                }
                probed = p.changed;
                self.probe = Some(p.probe);
                self.last_scan = p.scanned_at;
                p.transfer
            }
            None => {
                if round == 1 {
                    scan(ctx.mem, ctx.sent, &self.seen, ctx.cfg.scan_threads);
                    // The guest's changes are counted from here.
                    self.last_scan = Instant::now();
                }
                out.send_round(round, ctx.mem, ctx.sent, &to_send, ctx.cancel)?
            }
        };
        let send_s = round_start.elapsed().as_secs_f64();
        self.bytes += t.bytes;
        if round == 1 {
            self.nonzero_pages = t.data_pages;
        }
        if let Some(b) = measured_bandwidth(t.bytes, send_s) {
            self.bandwidth = b;
        }
        self.last = (t, send_s);
        Ok(probed)
    }

    /// Scans memory after a round and describes the round for the policy.
    fn measure(
        &mut self,
        ctx: &Live<'_>,
        round: u32,
        round_start: Instant,
        probed: &[u64],
    ) -> RoundTelemetry {
        let scan_start = Instant::now();
        let s = scan(ctx.mem, ctx.sent, &self.seen, ctx.cfg.scan_threads);
        let scan_s = scan_start.elapsed().as_secs_f64();
        self.last_scan_s = scan_s;
        tracing::debug!(round, scan_ms = scan_s * 1000.0, "scan after the round");
        // Rated over the time since the previous scan: after a round-1 probe that is the
        // time under the throttle it led to, the rate the policy must size against.
        let rate_window_s = self.last_scan.elapsed().as_secs_f64();
        self.last_scan = Instant::now();
        let changed = union_sorted(probed, &s.changed);
        self.tracker.observe_pages(changed.iter().copied());
        let duration_s = round_start.elapsed().as_secs_f64();
        let held_back_pages = s.dirty.iter().filter(|&&p| self.is_held(p)).count() as u64;
        let remaining = s.dirty.len() as u64;
        let t = self.last.0;
        self.dirty = s.dirty;
        RoundTelemetry {
            round,
            pages_sent: t.data_pages + t.zero_pages,
            bytes_sent: t.bytes,
            pages_changed: changed.len() as u64,
            dirty_rate_bytes_per_s: (s.changed.len() * PAGE_SIZE) as f64 / rate_window_s.max(1e-6),
            bandwidth_bytes_per_s: self.bandwidth,
            remaining_pages: remaining,
            held_back_pages,
            predicted_downtime_s: predicted_downtime_s(
                (remaining * PAGE_SIZE as u64) as f64,
                self.bandwidth,
                scan_s,
                ctx.cfg.stop_cost_s,
            ),
            duration_s,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            throttle_percent: self.throttle_percent,
        }
    }

    /// Asks the policy what next; applies its throttle and hold-back, or says why to stop.
    fn decide(&mut self, policy: &dyn Policy, throttle: &mut dyn Throttle) -> Option<StopReason> {
        let input = PolicyInput {
            history: &self.history,
            fragments: &self.tracker,
            limits: &self.limits,
        };
        let hold_back = match decide(policy, &input) {
            Decision::StopAndCopy { reason } => return Some(reason),
            Decision::Continue { hold_back } => hold_back,
            Decision::Throttle { percent, hold_back } => {
                let applied = throttle.apply(percent);
                if applied == 0 {
                    // The host cannot throttle; iterating further cannot help.
                    tracing::warn!(
                        percent,
                        "throttle requested but unavailable on this host; stopping"
                    );
                    return Some(StopReason::ThrottleExhausted);
                }
                self.throttle_percent = applied;
                self.max_throttle = self.max_throttle.max(applied);
                hold_back
            }
        };
        self.held.iter_mut().for_each(|h| *h = false);
        for f in hold_back {
            if let Some(h) = self.held.get_mut(f as usize) {
                *h = true;
            }
        }
        None
    }

    /// What a throttled guest left to send, sent before the pause instead of in it
    /// ([`rules::CatchUp`]): the pause would otherwise carry a share of the guest's
    /// writes or none, by where the period stood when the last round's scan passed its
    /// pages, twice as long one way as the other. Not a policy round: nothing is
    /// decided after it.
    fn catch_up(
        &mut self,
        ctx: &Live<'_>,
        out: &mut Outgoing,
        pass: u32,
        throttle: &mut dyn Throttle,
    ) -> Result<(), MigrationError> {
        let share = rules::share_pages(&self.history, self.throttle_percent, PAGE_SIZE as u64);
        let plan = rules::catch_up(
            self.throttle_percent,
            self.dirty.len() as f64,
            share,
            PAGE_SIZE as u64,
            self.bandwidth,
            self.last_scan_s,
        );
        let Some(plan) = plan else {
            if self.throttle_percent > 0 {
                tracing::debug!(
                    throttle = self.throttle_percent,
                    share_pages = share,
                    remaining = self.dirty.len(),
                    "no room to catch up with the throttled guest; pausing as it is"
                );
            }
            return Ok(());
        };
        if plan.throttle_percent > self.throttle_percent {
            let applied = throttle.apply(plan.throttle_percent);
            if applied == 0 {
                return Ok(());
            }
            self.throttle_percent = applied;
            self.max_throttle = self.max_throttle.max(applied);
        }
        if plan.live_first {
            let pages = self.pass(ctx, out, pass)?;
            tracing::debug!(pages, "sent live before catching up");
        }
        let wait = Duration::from_micros(rules::CATCH_UP_WAIT_US);
        let mut room = Duration::from_secs_f64(plan.room_s);
        for attempt in 1..=rules::CATCH_UP_PASSES {
            let Some(hold) = throttle.hold(wait, room) else {
                // The guest wrote on while the stop waited: what it wrote goes live.
                let pages = self.pass(ctx, out, pass)?;
                tracing::debug!(
                    room_ms = room.as_secs_f64() * 1000.0,
                    pages,
                    "the throttled guest was not seen held with room; sent live and pausing"
                );
                return Ok(());
            };
            let started = Instant::now();
            let pages = self.pass(ctx, out, pass)?;
            // A pass that outlasted the hold met the next share, seen or not (a clock
            // is read up to a tick late).
            let ran = throttle
                .ran_since(started)
                .map(|ran| ran || started.elapsed() + HOLD_MARGIN >= hold.held_for);
            tracing::debug!(
                attempt,
                waited_ms = hold.waited.as_secs_f64() * 1000.0,
                held_ms = hold.held_for.as_secs_f64() * 1000.0,
                room_ms = room.as_secs_f64() * 1000.0,
                share_pages = share,
                pages,
                ms = started.elapsed().as_secs_f64() * 1000.0,
                ran,
                "caught up with the throttled guest"
            );
            if ran != Some(true) {
                break;
            }
            // It wrote during the pass: the next needs room for a share's writes.
            room = Duration::from_secs_f64(plan.again_s);
        }
        Ok(())
    }

    /// Scans memory and sends what differs as part of round `pass`; returns the pages.
    fn pass(
        &mut self,
        ctx: &Live<'_>,
        out: &mut Outgoing,
        pass: u32,
    ) -> Result<usize, MigrationError> {
        let s = scan(ctx.mem, ctx.sent, &self.seen, ctx.cfg.scan_threads);
        let at = self.started.elapsed().as_secs_f64();
        out.meter().begin(pass, s.dirty.len() as u64, at);
        let t = out.send_round(pass, ctx.mem, ctx.sent, &s.dirty, ctx.cancel)?;
        self.bytes += t.bytes;
        Ok(s.dirty.len())
    }

    fn outcome(self, stop_reason: StopReason) -> PrecopyOutcome {
        PrecopyOutcome {
            history: self.history,
            stop_reason,
            bytes: self.bytes,
            max_throttle_percent: self.max_throttle,
            nonzero_pages: self.nonzero_pages,
            probe: self.probe,
        }
    }
}

/// What the live loop's helpers share.
struct Live<'a> {
    mem: &'a SourceMemory,
    sent: &'a SentDigests,
    policy: &'a dyn Policy,
    cfg: &'a PrecopyConfig,
    cancel: &'a AtomicBool,
    freeze: Option<&'a FreezeGate>,
}

/// Round 1 sent in two stretches with the probe between them.
struct FirstRound {
    transfer: RoundTransfer,
    /// Pages the probe saw change, ascending.
    changed: Vec<u64>,
    /// When the probe's scan ended.
    scanned_at: Instant,
    /// Throttle applied for the rest of round 1 (0: none).
    throttle: u8,
    /// Link rate measured over the first stretch, when it was big enough.
    bandwidth: Option<f64>,
    probe: FirstRoundProbe,
}

impl Live<'_> {
    /// Sends `pages[..split]` while the baseline scan runs beside it, then
    /// `pages[split..]` while a probe scans memory beside it and applies the throttle
    /// the policy asks for.
    fn first_round(
        &self,
        out: &mut Outgoing,
        seen: &SeenDigests,
        pages: &[u64],
        split: usize,
        limits: &Limits,
        throttle: &mut dyn Throttle,
    ) -> Result<FirstRound, MigrationError> {
        let Live {
            mem,
            sent,
            policy,
            cfg,
            cancel,
            freeze,
        } = *self;
        let start = Instant::now();
        let (first, first_s, since) = std::thread::scope(|s| {
            // The guest's changes are counted from the end of this pass (as they were
            // when it ran before the round): a page it read early may change before
            // that and be counted, which errs towards a higher rate, never a lower one.
            let baseline = s.spawn(|| {
                scan(mem, sent, seen, cfg.scan_threads);
                Instant::now()
            });
            let first = out.send_round(1, mem, sent, &pages[..split], cancel);
            let first_s = start.elapsed().as_secs_f64();
            (
                first,
                first_s,
                baseline.join().expect("baseline scan panicked"),
            )
        });
        let first = first?;
        let bandwidth = measured_bandwidth(first.bytes, first_s);
        let rest = &pages[split..];
        let bytes_left =
            rest.iter().filter(|&&p| mem.has_data(p)).count() as u64 * PAGE_SIZE as u64;
        let (second, probe) = std::thread::scope(|s| {
            let probe = s.spawn(|| {
                let mut since = since;
                if freeze.and_then(|g| g.wait(FREEZE_GATE_WAIT)) == Some(true) {
                    scan(mem, sent, seen, cfg.scan_threads);
                    since = Instant::now();
                    std::thread::sleep(PROBE_WINDOW_AFTER_FREEZE);
                }
                let scan_start = Instant::now();
                let found = scan_timed(mem, sent, seen, cfg.scan_threads);
                let scanned_at = Instant::now();
                let probe = FirstRoundProbe {
                    pages_changed: found.changed.len() as u64,
                    window_s: scanned_at.duration_since(since).as_secs_f64(),
                    bandwidth_bytes_per_s: bandwidth.unwrap_or(cfg.initial_bandwidth_bytes_per_s),
                    bytes_left,
                    stop_cost_s: (scanned_at - scan_start).as_secs_f64() + cfg.stop_cost_s,
                    writer_seen: writer_seen(&found, start),
                };
                let wanted = policy.first_round_throttle(&probe, limits);
                let applied = if wanted > 0 {
                    throttle.apply(wanted)
                } else {
                    0
                };
                tracing::debug!(?probe, wanted, applied, "round 1 probe");
                (found.changed, scanned_at, applied, probe)
            });
            let second = out.send_round(1, mem, sent, rest, cancel);
            (second, probe.join().expect("round 1 probe panicked"))
        });
        let second = second?;
        let (changed, scanned_at, throttle, probe) = probe;
        Ok(FirstRound {
            transfer: RoundTransfer {
                data_pages: first.data_pages + second.data_pages,
                zero_pages: first.zero_pages + second.zero_pages,
                bytes: first.bytes + second.bytes,
            },
            changed,
            scanned_at,
            throttle,
            bandwidth,
            probe,
        })
    }
}

/// The end of the longest stretch a scan saw changed, and when it read that page,
/// counted from `round_start`.
fn writer_seen(found: &Scan, round_start: Instant) -> Option<WriterSeen> {
    let (_, last) = densest_run(&found.changed)?;
    let i = found.changed.binary_search(&last).ok()?;
    let read = *found.changed_read_at.get(i)?;
    Some(WriterSeen {
        page: last,
        at_s: read.saturating_duration_since(round_start).as_secs_f64(),
    })
}

/// The longest stretch of `pages` (ascending) with no gap over 64 pages, as (first,
/// last): where a guest that rewrites a buffer in order was writing.
fn densest_run(pages: &[u64]) -> Option<(u64, u64)> {
    let mut best: Option<(u64, u64)> = None;
    let mut start = *pages.first()?;
    let mut prev = start;
    for &p in &pages[1..] {
        if p - prev > 64 {
            start = p;
        }
        prev = p;
        if best.is_none_or(|(a, b)| b - a < p - start) {
            best = Some((start, p));
        }
    }
    best.or(Some((start, start)))
}

/// Where round 1's first stretch ends: after the pages with data that
/// [`rules::probe_split_pages`] says, the rule the model follows too; `None` when the
/// round runs whole.
fn probe_split(mem: &SourceMemory, pages: &[u64], probe_bytes: u64) -> Option<usize> {
    let data = pages.iter().filter(|&&p| mem.has_data(p)).count() as u64;
    let want = rules::probe_split_pages(data, probe_bytes, PAGE_SIZE as u64)?;
    let mut seen = 0u64;
    pages
        .iter()
        .position(|&p| {
            seen += u64::from(mem.has_data(p));
            seen == want
        })
        .map(|i| i + 1)
}

/// The union of two ascending page lists, ascending, each page once.
fn union_sorted(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => {
                out.push(a[i]);
                i += 1;
            }
            std::cmp::Ordering::Greater => {
                out.push(b[j]);
                j += 1;
            }
            std::cmp::Ordering::Equal => {
                out.push(a[i]);
                i += 1;
                j += 1;
            }
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_freeze_gate_gives_the_answer_or_none_in_time() {
        let g = std::sync::Arc::new(FreezeGate::default());
        assert_eq!(g.wait(Duration::from_millis(20)), None);
        let opener = g.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            opener.open(true);
        });
        assert_eq!(g.wait(Duration::from_secs(5)), Some(true));
        t.join().unwrap();
        g.open(false);
        assert_eq!(g.wait(Duration::ZERO), Some(false));
    }

    #[test]
    fn union_keeps_each_page_once_in_order() {
        assert_eq!(
            union_sorted(&[1, 4, 9], &[2, 4, 10, 11]),
            vec![1, 2, 4, 9, 10, 11]
        );
        assert_eq!(union_sorted(&[], &[3]), vec![3]);
        assert_eq!(union_sorted(&[3], &[]), vec![3]);
    }

    #[test]
    fn the_densest_run_is_the_longest_stretch_without_a_wide_gap() {
        assert_eq!(densest_run(&[]), None);
        assert_eq!(densest_run(&[7]), Some((7, 7)));
        // A writer's stretch (with small holes) beside the kernel's scattered pages.
        let mut pages = vec![3, 500];
        pages.extend((1000..1400).step_by(3));
        pages.extend([5000, 5001, 90_000]);
        assert_eq!(densest_run(&pages), Some((1000, 1399)));
    }

    #[test]
    fn round_one_is_split_after_the_probe_bytes_only_when_as_much_again_follows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mem");
        std::fs::write(&path, vec![7u8; PAGE_SIZE * 100]).unwrap();
        let mem = SourceMemory::open(&path).unwrap();
        let all: Vec<u64> = (0..mem.pages()).collect();
        let page = PAGE_SIZE as u64;
        assert_eq!(probe_split(&mem, &all, 40 * page), Some(40));
        assert_eq!(probe_split(&mem, &all, 50 * page), Some(50));
        assert_eq!(
            probe_split(&mem, &all, 60 * page),
            None,
            "40 pages follow, not 60"
        );
        assert_eq!(probe_split(&mem, &all, 0), None);
        // The split counts pages with data, wherever they are in the list.
        let odd: Vec<u64> = (0..100).filter(|p| p % 2 == 1).collect();
        assert_eq!(probe_split(&mem, &odd, 10 * page), Some(10));
    }
}
