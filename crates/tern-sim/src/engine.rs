//! The discrete-event loop. Two kinds of events drive it: a tick at every scheduling
//! interval (new load samples, then the policy plans) and the completion of a migration.
//! Nothing runs between events; metrics are integrated per host when the host changes.
//!
//! ```text
//!   Tick(k) ──► loads from traces ──► policy.plan ──► start migrations ──► Tick(k+1)
//!                                                          │
//!   MigrationDone(slot, gen) ◄── rescheduled whenever ─────┘
//!        │                       a shared link's rate changes
//!        └──► VM moves (or stays, if it never converged) ──► re-rate link neighbours
//! ```

use std::time::Instant;

use serde::Serialize;

use crate::cluster::ClusterSpec;
use crate::migration::{Estimate, MigrationTiming};
use crate::placement::initial_placement;
use crate::policy::{Move, Policy};
use crate::queue::{Event, EventQueue};
use crate::state::{State, Totals};
use crate::trace::Traces;
use crate::SimError;

/// Knobs of one run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seconds between scheduling ticks.
    pub interval_s: f64,
    /// Number of intervals to simulate.
    pub intervals: u32,
    /// Intervals at the start with no policy decisions and no metering. CloudSim's
    /// PlanetLab runs take their first decision and first meter reading one interval
    /// in (before that no host has a previous utilisation to integrate from).
    pub warm_up_intervals: u32,
    /// Overload threshold the policies use.
    pub threshold: f64,
    /// Share of a host's link that migrations may use (CloudSim: half).
    pub migration_link_share: f64,
    /// Memory a VM dirties per second at 100 % CPU, MB/s (scaled by its load).
    pub dirty_mb_s_at_full_cpu: f64,
    /// A migration that does not converge is abandoned after this long.
    pub max_migration_s: f64,
    /// Running VMs keep needing their full RAM and bandwidth (see `State::strict_memory`).
    pub strict_memory: bool,
    /// A VM whose load is zero at a tick and at the next sample has finished and leaves
    /// the cluster for good. CloudSim does this: it interpolates a PlanetLab trace
    /// between samples and destroys a VM whose workload asks for no CPU.
    pub finish_idle_vms: bool,
    /// Keep one `SeriesPoint` per tick (for plots).
    pub record_series: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            interval_s: 300.0,
            intervals: 288,
            warm_up_intervals: 0,
            threshold: 0.8,
            migration_link_share: 0.5,
            dirty_mb_s_at_full_cpu: 20.0,
            max_migration_s: 600.0,
            strict_memory: true,
            finish_idle_vms: false,
            record_series: false,
        }
    }
}

/// The cluster at one tick, for plots.
#[derive(Clone, Debug, Serialize)]
pub struct SeriesPoint {
    pub hours: f64,
    pub active_hosts: u32,
    /// Mean and standard deviation of CPU utilisation over active hosts.
    pub utilisation_mean: f64,
    pub utilisation_std: f64,
    /// Migrations started in the interval that ends here.
    pub migrations: u32,
}

/// What a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub policy: String,
    pub migration_model: String,
    pub hosts: usize,
    pub vms: usize,
    /// VMs that fit on no host at the start and were left out.
    pub dropped_vms: u64,
    /// VMs that finished during the run (see `SimConfig::finish_idle_vms`).
    pub vms_finished: u64,
    pub simulated_hours: f64,
    pub energy_kwh: f64,
    /// Migrations started.
    pub migrations: u64,
    pub migrations_completed: u64,
    /// Migrations abandoned because they would not converge.
    pub migrations_failed: u64,
    /// Moves a policy proposed that were not possible (VM busy, no memory at the target).
    pub moves_refused: u64,
    pub mean_migration_s: f64,
    /// Share of active-host time spent at 100 % CPU.
    pub slatah: f64,
    /// Performance degradation due to migration.
    pub pdm: f64,
    pub slav: f64,
    pub events: u64,
    pub peak_active_hosts: u32,
    /// Mean and maximum over the metered ticks of the balancer's `spread` score of the
    /// placement (see `imbalance`): how evenly the load was spread over the run.
    pub imbalance_mean: f64,
    pub imbalance_max: f64,
    pub wall_seconds: f64,
    #[serde(skip)]
    pub series: Vec<SeriesPoint>,
}

struct Flight {
    vm: u32,
    src: u32,
    dst: u32,
    generation: u32,
    /// Fraction of the migration still to do.
    left: f64,
    since: f64,
    started: f64,
    dirty_mb_s: f64,
    estimate: Option<Estimate>,
}

/// One simulation: the state, the clock and the migrations in flight.
pub struct Simulation<'a> {
    state: State,
    traces: &'a Traces,
    timing: &'a dyn MigrationTiming,
    cfg: SimConfig,
    queue: EventQueue,
    flights: Vec<Option<Flight>>,
    free_slots: Vec<u32>,
    host_flights: Vec<Vec<u32>>,
    started: u64,
    completed: u64,
    failed: u64,
    refused: u64,
    dropped: u64,
    finished: u64,
    migration_seconds: f64,
    events: u64,
    started_this_interval: u32,
    peak_active: u32,
    /// Sum, maximum and count of the imbalance samples.
    imbalance: (f64, f64, u32),
    series: Vec<SeriesPoint>,
}

impl<'a> Simulation<'a> {
    /// Places the VMs (power-aware best fit, as CloudSim does at time 0; a VM that fits
    /// nowhere is left out and counted). `traces` must hold one row per VM.
    pub fn new(
        spec: ClusterSpec,
        traces: &'a Traces,
        timing: &'a dyn MigrationTiming,
        cfg: SimConfig,
    ) -> Result<Simulation<'a>, SimError> {
        if traces.vms() != spec.vms.len() {
            return Err(SimError::BadTrace(format!(
                "{} traces for {} VMs",
                traces.vms(),
                spec.vms.len()
            )));
        }
        let hosts = spec.hosts.len();
        let mut state = State::new(spec, cfg.strict_memory);
        let dropped = initial_placement(&mut state).len() as u64;
        Ok(Simulation {
            state,
            traces,
            timing,
            cfg,
            queue: EventQueue::new(),
            flights: Vec::new(),
            free_slots: Vec::new(),
            host_flights: vec![Vec::new(); hosts],
            started: 0,
            completed: 0,
            failed: 0,
            refused: 0,
            dropped,
            finished: 0,
            migration_seconds: 0.0,
            events: 0,
            started_this_interval: 0,
            peak_active: 0,
            imbalance: (0.0, 0.0, 0),
            series: Vec::new(),
        })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Runs to the end; `progress(done, total)` is called once per tick.
    pub fn run(self, policy: &mut dyn Policy, progress: &mut dyn FnMut(u32, u32)) -> Report {
        self.run_keeping_state(policy, progress).0
    }

    /// Like `run`, also returning the final state (for checks over where VMs ended up).
    pub fn run_keeping_state(
        mut self,
        policy: &mut dyn Policy,
        progress: &mut dyn FnMut(u32, u32),
    ) -> (Report, State) {
        let wall = Instant::now();
        self.queue.push(0.0, Event::Tick(0));
        let end = f64::from(self.cfg.intervals) * self.cfg.interval_s;
        while let Some((now, event)) = self.queue.pop() {
            self.events += 1;
            match event {
                Event::Tick(k) => {
                    self.tick(k, now);
                    progress(k, self.cfg.intervals);
                    if k >= self.cfg.intervals {
                        break;
                    }
                    if k >= self.cfg.warm_up_intervals {
                        let moves = policy.plan(&self.state, now);
                        for m in moves {
                            self.start(m, now);
                        }
                    }
                    self.queue
                        .push(f64::from(k + 1) * self.cfg.interval_s, Event::Tick(k + 1));
                }
                Event::MigrationDone { slot, generation } => {
                    let live = self.flights[slot as usize]
                        .as_ref()
                        .is_some_and(|f| f.generation == generation);
                    if live && now <= end {
                        self.complete(slot, now);
                    }
                }
            }
        }
        self.report(policy.name(), end, wall.elapsed().as_secs_f64())
    }

    fn tick(&mut self, k: u32, now: f64) {
        let sample = (now / self.traces.interval + 1e-9).floor() as usize;
        let st = &mut self.state;
        for v in 0..st.vms() {
            if st.is_running(v) {
                st.vm_requested[v] = self.traces.utilisation(v, sample) * st.spec.vm(v).mips;
            }
        }
        let mut active = 0u32;
        let (mut sum, mut sum_sq) = (0.0, 0.0);
        for h in 0..st.hosts() {
            st.settle(h, now);
            if st.is_active(h) {
                active += 1;
                let u = st.utilisation(h);
                sum += u;
                sum_sq += u * u;
            }
        }
        if k == self.cfg.warm_up_intervals && k > 0 {
            st.totals = Totals::default();
        }
        if self.cfg.finish_idle_vms && k >= self.cfg.warm_up_intervals {
            for v in 0..st.vms() {
                let idle = self.traces.utilisation(v, sample) == 0.0
                    && self.traces.utilisation(v, sample + 1) == 0.0;
                if idle && st.is_running(v) && !st.is_migrating(v) {
                    st.finish(v, now);
                    self.finished += 1;
                    tracing::debug!(t = %clock(now), vm = v, "VM finished: no load");
                }
            }
        }
        self.peak_active = self.peak_active.max(active);
        if k >= self.cfg.warm_up_intervals {
            let score = crate::imbalance::spread_score(&self.state);
            let (sum, max, n) = &mut self.imbalance;
            *sum += score;
            *max = max.max(score);
            *n += 1;
        }
        if self.cfg.record_series {
            let n = f64::from(active.max(1));
            let mean = sum / n;
            self.series.push(SeriesPoint {
                hours: now / 3600.0,
                active_hosts: active,
                utilisation_mean: mean,
                utilisation_std: (sum_sq / n - mean * mean).max(0.0).sqrt(),
                migrations: self.started_this_interval,
            });
        }
        self.started_this_interval = 0;
        tracing::debug!(t = %clock(now), tick = k, active, "tick");
    }

    fn start(&mut self, m: Move, now: f64) {
        let (vm, dst) = (m.vm as usize, m.to as usize);
        let st = &self.state;
        let ok = vm < st.vms()
            && dst < st.hosts()
            && st.is_running(vm)
            && !st.is_migrating(vm)
            && st.vm_host[vm] as usize != dst
            && st.host_ram_used[dst] + st.running_needs(vm).0 <= st.spec.host(dst).ram_mb;
        if !ok {
            self.refused += 1;
            return;
        }
        let src = st.vm_host[vm];
        let load = st.vm_requested[vm] / st.spec.vm(vm).mips;
        self.state.begin_migration(vm, dst, now);
        let flight = Flight {
            vm: m.vm,
            src,
            dst: m.to,
            generation: 0,
            left: 1.0,
            since: now,
            started: now,
            dirty_mb_s: load * self.cfg.dirty_mb_s_at_full_cpu,
            estimate: None,
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.flights[s as usize] = Some(flight);
                s
            }
            None => {
                self.flights.push(Some(flight));
                (self.flights.len() - 1) as u32
            }
        };
        self.host_flights[src as usize].push(slot);
        self.host_flights[dst].push(slot);
        self.started += 1;
        self.started_this_interval += 1;
        tracing::debug!(t = %clock(now), vm, from = src, to = dst, "migration starts");
        if self.timing.shares_links() {
            self.rerate_host(src as usize, now);
            self.rerate_host(dst, now);
        } else {
            self.rerate(slot, now);
        }
    }

    fn complete(&mut self, slot: u32, now: f64) {
        let Some(f) = self.flights[slot as usize].take() else {
            return;
        };
        self.free_slots.push(slot);
        for h in [f.src, f.dst] {
            let list = &mut self.host_flights[h as usize];
            if let Some(i) = list.iter().position(|&s| s == slot) {
                list.swap_remove(i);
            }
        }
        let vm = f.vm as usize;
        match f.estimate {
            Some(e) => {
                self.state
                    .add_migration_shortfall(self.state.vm_requested[vm] * e.downtime_s);
                self.state.end_migration(vm, true, now);
                self.completed += 1;
                self.migration_seconds += now - f.started;
                tracing::debug!(t = %clock(now), vm, to = f.dst, secs = now - f.started, "migration done");
            }
            None => {
                self.state.end_migration(vm, false, now);
                self.failed += 1;
                tracing::debug!(t = %clock(now), vm, "migration abandoned: does not converge");
            }
        }
        if self.timing.shares_links() {
            self.rerate_host(f.src as usize, now);
            self.rerate_host(f.dst as usize, now);
        }
    }

    fn rerate_host(&mut self, h: usize, now: f64) {
        for i in 0..self.host_flights[h].len() {
            let slot = self.host_flights[h][i];
            self.rerate(slot, now);
        }
    }

    /// Books the progress made at the old rate, asks the model for the new duration and
    /// schedules the completion (older completion events become stale).
    fn rerate(&mut self, slot: u32, now: f64) {
        let bandwidth = self.bandwidth(slot);
        let ram = {
            let f = self.flights[slot as usize].as_ref().expect("live flight");
            self.state.spec.vm(f.vm as usize).ram_mb
        };
        let f = self.flights[slot as usize].as_mut().expect("live flight");
        if let Some(e) = f.estimate {
            f.left = (f.left - (now - f.since) / e.total_s).max(0.0);
        }
        f.since = now;
        f.estimate = self.timing.estimate(ram, f.dirty_mb_s, bandwidth);
        f.generation += 1;
        let done = match f.estimate {
            Some(e) => now + f.left * e.total_s,
            None => (f.started + self.cfg.max_migration_s).max(now),
        };
        let generation = f.generation;
        self.queue
            .push(done, Event::MigrationDone { slot, generation });
    }

    /// MB/s the migration in `slot` gets now.
    fn bandwidth(&self, slot: u32) -> f64 {
        let f = self.flights[slot as usize].as_ref().expect("live flight");
        let share = self.cfg.migration_link_share;
        let link = |h: u32| self.state.spec.host(h as usize).link_mbps / 8.0 * share;
        if self.timing.shares_links() {
            let n = |h: u32| self.host_flights[h as usize].len().max(1) as f64;
            (link(f.src) / n(f.src)).min(link(f.dst) / n(f.dst))
        } else {
            link(f.dst)
        }
    }

    fn report(mut self, policy: &str, end: f64, wall_seconds: f64) -> (Report, State) {
        for h in 0..self.state.hosts() {
            self.state.settle(h, end);
        }
        let t = self.state.totals;
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let slatah = ratio(t.violation_host_seconds, t.active_host_seconds);
        let pdm = ratio(t.migration_shortfall_mips_seconds, t.requested_mips_seconds);
        let report = Report {
            policy: policy.to_string(),
            migration_model: self.timing.name().to_string(),
            hosts: self.state.hosts(),
            vms: self.state.vms(),
            dropped_vms: self.dropped,
            vms_finished: self.finished,
            simulated_hours: end / 3600.0,
            energy_kwh: t.energy_joules / 3.6e6,
            migrations: self.started,
            migrations_completed: self.completed,
            migrations_failed: self.failed,
            moves_refused: self.refused,
            mean_migration_s: ratio(self.migration_seconds, self.completed as f64),
            slatah,
            pdm,
            slav: slatah * pdm,
            events: self.events,
            peak_active_hosts: self.peak_active,
            imbalance_mean: ratio(self.imbalance.0, f64::from(self.imbalance.2)),
            imbalance_max: self.imbalance.1,
            wall_seconds,
            series: self.series,
        };
        (report, self.state)
    }
}

/// Simulated time as `HH:MM:SS.mmm`, for log lines.
pub fn clock(t: f64) -> String {
    let ms = (t * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}
