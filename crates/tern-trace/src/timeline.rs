//! From an event stream to what each traced thread did at every instant (pure).
//!
//! Each traced thread is in one state at a time; events move it:
//!
//! ```text
//!                switch in (next = t)
//!   Runnable ───────────────────────────► Running{cpu}
//!      ▲  ▲   switch out, state R / R+        │
//!      │  └───────────────────────────────────┤
//!      │ wakeup                               │ switch out, state S/D/...
//!   Sleeping ◄────────────────────────────────┘
//! ```
//!
//! Before a thread's first event its state is inferred from that event (switched out:
//! it was running on that CPU since the window opened; switched in: runnable; woken:
//! sleeping); a thread with no event at all is `Unknown` for the whole window. So each
//! thread's spans tile the window exactly (time is conserved), and no CPU runs two traced
//! threads at once. Events that contradict the state (what missing records leave behind)
//! are counted in [`Timeline::anomalies`] and the state is repaired from the event: a
//! thread switched out of a CPU it was not known to run on ran there at most since that
//! CPU's last recorded switch, and the time between is `Unknown`, never guessed.
//! `sched_migrate_task` does not change the state; each one between two different CPUs
//! is a [`Migration`].

use crate::model::{is_preempted, EventKind, SchedEvent};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a traced thread was doing during a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Running {
        cpu: u32,
    },
    /// Wanted a CPU and had none: for a vCPU thread, steal time seen from the guest.
    Runnable,
    /// Blocked: for a vCPU thread, the guest's vCPU is idle (halted).
    Sleeping,
    /// No event told what the thread did.
    Unknown,
}

/// A thread in one state over `[start_ns, end_ns)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    pub tid: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    #[serde(flatten)]
    pub state: State,
}

impl Span {
    pub fn len_ns(&self) -> u64 {
        self.end_ns - self.start_ns
    }
}

/// A thread moved between CPUs' run queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    pub time_ns: u64,
    pub tid: u32,
    pub from_cpu: u32,
    pub to_cpu: u32,
}

/// Every traced thread's spans over a window, in the order they ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    pub start_ns: u64,
    pub end_ns: u64,
    pub tids: Vec<u32>,
    pub spans: Vec<Span>,
    pub migrations: Vec<Migration>,
    /// Events that contradicted the state they found (each repaired from the event).
    pub anomalies: u64,
}

impl Timeline {
    /// The spans of one thread, in time order.
    pub fn spans_of(&self, tid: u32) -> impl Iterator<Item = &Span> {
        let mut v: Vec<&Span> = self.spans.iter().filter(|s| s.tid == tid).collect();
        v.sort_by_key(|s| s.start_ns);
        v.into_iter()
    }

    /// The running spans on one CPU, in time order.
    pub fn runs_on(&self, cpu: u32) -> Vec<&Span> {
        let mut v: Vec<&Span> = self
            .spans
            .iter()
            .filter(|s| s.state == State::Running { cpu })
            .collect();
        v.sort_by_key(|s| s.start_ns);
        v
    }

    /// The CPUs any traced thread ran on.
    pub fn cpus(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .spans
            .iter()
            .filter_map(|s| match s.state {
                State::Running { cpu } => Some(cpu),
                _ => None,
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

struct Builder {
    start: u64,
    /// Per thread: its state and since when; `None` before its first event.
    threads: BTreeMap<u32, Option<(State, u64)>>,
    /// Per CPU: the traced thread running there.
    on_cpu: BTreeMap<u32, u32>,
    /// Per CPU: the last switch seen there or the end of the last run there, whichever
    /// is later. A thread first seen leaving a CPU ran there at most since then, so an
    /// inferred run never overlaps a recorded one.
    cpu_mark: BTreeMap<u32, u64>,
    out: Timeline,
}

impl Builder {
    fn push(&mut self, tid: u32, start_ns: u64, end_ns: u64, state: State) {
        if let State::Running { cpu } = state {
            let mark = self.cpu_mark.entry(cpu).or_insert(end_ns);
            *mark = (*mark).max(end_ns);
        }
        if end_ns > start_ns {
            self.out.spans.push(Span {
                tid,
                start_ns,
                end_ns,
                state,
            });
        }
    }

    /// Ends `tid`'s current state at `t` and starts `next`. A thread seen for the first
    /// time was in `before` since the window opened (or, for a run, since its CPU's last
    /// switch; unknown before that).
    fn set(&mut self, tid: u32, t: u64, before: State, next: State) {
        let Some(&slot) = self.threads.get(&tid) else {
            return;
        };
        let (state, since) = match (slot, before) {
            (Some(known), _) => known,
            (None, State::Running { cpu }) => {
                let mut mark = self.cpu_mark.get(&cpu).copied().unwrap_or(self.start);
                if let Some(other) = self.on_cpu.get(&cpu).copied().filter(|&o| o != tid) {
                    // Another thread is running there as far as we know: it left unseen,
                    // and when is as unknown as when this one started.
                    self.out.anomalies += 1;
                    self.set(other, t, State::Unknown, State::Unknown);
                    mark = t;
                }
                self.push(tid, self.start, mark, State::Unknown);
                (before, mark.max(self.start))
            }
            (None, _) => (before, self.start),
        };
        self.push(tid, since, t, state);
        self.threads.insert(tid, Some((next, t)));
        if let State::Running { cpu } = state {
            if self.on_cpu.get(&cpu) == Some(&tid) {
                self.on_cpu.remove(&cpu);
            }
        }
        if let State::Running { cpu } = next {
            // A CPU runs one thread: whoever we thought ran there stopped unseen.
            if let Some(other) = self.on_cpu.insert(cpu, tid).filter(|&o| o != tid) {
                self.out.anomalies += 1;
                self.set(other, t, State::Unknown, State::Unknown);
            }
        }
    }

    /// A switch of `tid` on `cpu` was not recorded before `t` (the kernel lost it, or
    /// never emits records in the context of some tasks): its known state ends at the
    /// CPU's last recorded switch, and what it did from there to `t` is unknown.
    fn unseen(&mut self, tid: u32, cpu: u32, t: u64) {
        self.out.anomalies += 1;
        let since = self
            .threads
            .get(&tid)
            .copied()
            .flatten()
            .map_or(t, |(_, s)| s);
        let at = self
            .cpu_mark
            .get(&cpu)
            .copied()
            .unwrap_or(self.start)
            .max(since);
        if at < t {
            self.set(tid, at, State::Unknown, State::Unknown);
        }
    }

    fn state(&self, tid: u32) -> Option<State> {
        self.threads.get(&tid).copied().flatten().map(|(s, _)| s)
    }

    fn traced(&self, tid: u32) -> bool {
        self.threads.contains_key(&tid)
    }

    fn event(&mut self, t: u64, e: &SchedEvent) {
        match e.kind {
            EventKind::Switch {
                prev_tid,
                prev_state,
                next_tid,
            } => {
                let cpu = e.cpu;
                if self.traced(prev_tid) {
                    match self.state(prev_tid) {
                        None => {}
                        Some(State::Running { cpu: c }) if c == cpu => {}
                        // Its switch onto this CPU was not recorded: it ran here at most
                        // since the CPU's last recorded switch.
                        Some(_) => self.unseen(prev_tid, cpu, t),
                    }
                    let next = if is_preempted(prev_state) {
                        State::Runnable
                    } else {
                        State::Sleeping
                    };
                    self.set(prev_tid, t, State::Running { cpu }, next);
                }
                if self.traced(next_tid) {
                    match self.state(next_tid) {
                        None | Some(State::Runnable) => {}
                        // Its switch off that CPU was not recorded: it ran there at most
                        // until that CPU's last recorded switch.
                        Some(State::Running { cpu: c }) => self.unseen(next_tid, c, t),
                        // Its wakeup was not recorded: when it became runnable is not
                        // known, so the sleep is kept (steal time is under-counted).
                        Some(_) => self.out.anomalies += 1,
                    }
                    self.set(next_tid, t, State::Runnable, State::Running { cpu });
                }
                if self.traced(prev_tid) || self.traced(next_tid) {
                    self.cpu_mark.insert(cpu, t);
                }
            }
            EventKind::Wakeup { tid, .. } => match self.state(tid) {
                _ if !self.traced(tid) => {}
                None | Some(State::Sleeping) | Some(State::Unknown) => {
                    self.set(tid, t, State::Sleeping, State::Runnable)
                }
                // A wakeup of a thread that is running or queued is normal (it raced
                // with its own sleep): nothing changes.
                Some(_) => {}
            },
            EventKind::Migrate {
                tid,
                orig_cpu,
                dest_cpu,
            } => {
                if self.traced(tid) && orig_cpu != dest_cpu {
                    self.out.migrations.push(Migration {
                        time_ns: t,
                        tid,
                        from_cpu: orig_cpu,
                        to_cpu: dest_cpu,
                    });
                }
            }
            EventKind::KvmEntry { .. } | EventKind::KvmExit { .. } => {}
        }
    }
}

/// The timeline of `tids` over `[start_ns, end_ns]` from `events` (in time order; an
/// event out of order or outside the window is taken at the nearest time that keeps the
/// order and the window).
pub fn timeline(start_ns: u64, end_ns: u64, tids: &[u32], events: &[SchedEvent]) -> Timeline {
    let end_ns = end_ns.max(start_ns);
    let mut b = Builder {
        start: start_ns,
        threads: tids.iter().map(|&t| (t, None)).collect(),
        on_cpu: BTreeMap::new(),
        cpu_mark: BTreeMap::new(),
        out: Timeline {
            start_ns,
            end_ns,
            tids: {
                let mut v = tids.to_vec();
                v.sort_unstable();
                v.dedup();
                v
            },
            ..Timeline::default()
        },
    };
    let mut cursor = start_ns;
    for e in events {
        cursor = e.time_ns.clamp(cursor, end_ns);
        b.event(cursor, e);
    }
    let tids: Vec<u32> = b.threads.keys().copied().collect();
    for tid in tids {
        let keep = b.state(tid).unwrap_or(State::Unknown);
        b.set(tid, end_ns, State::Unknown, keep);
    }
    b.out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn ev(time_ns: u64, cpu: u32, kind: EventKind) -> SchedEvent {
        SchedEvent { time_ns, cpu, kind }
    }
    pub fn sw(t: u64, cpu: u32, prev: u32, state: i64, next: u32) -> SchedEvent {
        ev(
            t,
            cpu,
            EventKind::Switch {
                prev_tid: prev,
                prev_state: state,
                next_tid: next,
            },
        )
    }

    #[test]
    fn a_preempted_vcpu_is_runnable_until_it_runs_again() {
        // Thread 10 runs on CPU 0, is preempted at 100, waits, runs on CPU 1 at 150,
        // sleeps at 180, is woken at 200 and runs on CPU 0 at 210.
        let events = [
            sw(100, 0, 10, 0x100, 0),
            ev(
                120,
                1,
                EventKind::Migrate {
                    tid: 10,
                    orig_cpu: 0,
                    dest_cpu: 1,
                },
            ),
            sw(150, 1, 0, 0, 10),
            sw(180, 1, 10, 1, 0),
            ev(
                200,
                0,
                EventKind::Wakeup {
                    tid: 10,
                    target_cpu: 0,
                },
            ),
            sw(210, 0, 0, 0, 10),
        ];
        let tl = timeline(50, 300, &[10], &events);
        let spans: Vec<(u64, u64, State)> = tl
            .spans_of(10)
            .map(|s| (s.start_ns, s.end_ns, s.state))
            .collect();
        assert_eq!(
            spans,
            vec![
                (50, 100, State::Running { cpu: 0 }),
                (100, 150, State::Runnable),
                (150, 180, State::Running { cpu: 1 }),
                (180, 200, State::Sleeping),
                (200, 210, State::Runnable),
                (210, 300, State::Running { cpu: 0 }),
            ]
        );
        assert_eq!(
            tl.migrations,
            vec![Migration {
                time_ns: 120,
                tid: 10,
                from_cpu: 0,
                to_cpu: 1
            }]
        );
        assert_eq!(tl.anomalies, 0);
        assert_eq!(tl.cpus(), vec![0, 1]);
    }

    #[test]
    fn a_thread_without_events_is_unknown_and_untraced_threads_are_ignored() {
        let tl = timeline(0, 100, &[1, 2], &[sw(10, 0, 99, 1, 1)]);
        let s2: Vec<&Span> = tl.spans_of(2).collect();
        assert_eq!(s2.len(), 1);
        assert_eq!((s2[0].state, s2[0].len_ns()), (State::Unknown, 100));
        assert!(tl.spans.iter().all(|s| s.tid != 99));
    }

    #[test]
    fn a_missed_switch_in_leaves_unknown_time_back_to_the_cpus_last_switch() {
        // 1 is preempted on CPU 0 at 10; another traced thread runs there 20..30; the
        // record of 1 coming back was lost; 1 is switched out at 50.
        let events = [sw(10, 0, 1, 0, 2), sw(30, 0, 2, 1, 0), sw(50, 0, 1, 1, 0)];
        let tl = timeline(0, 60, &[1, 2], &events);
        let spans: Vec<(u64, u64, State)> = tl
            .spans_of(1)
            .map(|s| (s.start_ns, s.end_ns, s.state))
            .collect();
        assert_eq!(
            spans,
            vec![
                (0, 10, State::Running { cpu: 0 }),
                (10, 30, State::Runnable),
                (30, 50, State::Unknown),
                (50, 60, State::Sleeping),
            ]
        );
        assert_eq!(tl.anomalies, 1);
    }

    #[test]
    fn a_missed_switch_out_is_repaired_and_counted() {
        // 1 runs on CPU 0; the record of its switch-out was lost; 2 starts on CPU 0.
        let tl = timeline(0, 100, &[1, 2], &[sw(10, 0, 0, 0, 1), sw(40, 0, 0, 0, 2)]);
        assert_eq!(tl.anomalies, 1);
        let runs = tl.runs_on(0);
        assert_eq!(runs.len(), 2);
        assert!(runs[0].end_ns <= runs[1].start_ns);
    }

    fn kind() -> impl Strategy<Value = EventKind> {
        let tid = 1u32..5; // 4 is never traced
        let cpu = 0u32..3;
        prop_oneof![
            (
                tid.clone(),
                prop::sample::select(vec![0i64, 1, 2, 0x100]),
                tid.clone()
            )
                .prop_map(|(p, s, n)| EventKind::Switch {
                    prev_tid: p,
                    prev_state: s,
                    next_tid: n
                }),
            (tid.clone(), cpu.clone()).prop_map(|(t, c)| EventKind::Wakeup {
                tid: t,
                target_cpu: c
            }),
            (tid, cpu.clone(), cpu).prop_map(|(t, a, b)| EventKind::Migrate {
                tid: t,
                orig_cpu: a,
                dest_cpu: b
            }),
        ]
    }

    pub fn events() -> impl Strategy<Value = Vec<SchedEvent>> {
        prop::collection::vec((0u64..50, 0u32..3, kind()), 0..80).prop_map(|v| {
            let mut t = 1_000;
            v.into_iter()
                .map(|(dt, cpu, kind)| {
                    t += dt;
                    ev(t, cpu, kind)
                })
                .collect()
        })
    }

    proptest! {
        /// Whatever the stream (including ones lost records make inconsistent): each
        /// traced thread's spans tile the window, and no CPU runs two spans at once.
        #[test]
        fn time_is_conserved_and_cpus_never_overlap(
            events in events(),
            start_off in 0u64..2000,
            len in 0u64..5000,
        ) {
            let start = 1_000 + start_off / 2;
            let tl = timeline(start, start + len, &[1, 2, 3], &events);
            for tid in [1, 2, 3] {
                let mut at = tl.start_ns;
                for s in tl.spans_of(tid) {
                    prop_assert_eq!(s.start_ns, at, "gap or overlap for {}", tid);
                    prop_assert!(s.end_ns > s.start_ns);
                    at = s.end_ns;
                }
                prop_assert_eq!(at, tl.end_ns, "thread {} does not reach the end", tid);
            }
            for cpu in 0..3 {
                let runs = tl.runs_on(cpu);
                for w in runs.windows(2) {
                    prop_assert!(w[0].end_ns <= w[1].start_ns, "overlap on cpu {}", cpu);
                }
            }
            prop_assert!(tl.spans.iter().all(|s| s.tid != 4));
            prop_assert!(tl.migrations.iter().all(|m| m.from_cpu != m.to_cpu && m.tid != 4));
        }
    }
}
