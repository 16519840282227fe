//! The source side as its phase machine: [`run`] walks the engine's [`Phase`]s in order,
//! one method per phase, and on any error takes the one rollback path. Whatever fails,
//! the VM ends running here, the destination is told to clean up, and the VM never runs
//! on both hosts: the source resumes only while the destination is known not to run it.
//!
//! ```text
//!  tern's engine:  Preparing ─► Connecting ─► PreCopy ─► StopAndCopy ─► DeviceState ─► Resuming
//!  qemu-native:    Preparing ─────────────► PreCopy (QEMU moves everything) ──────────► Resuming
//! ```
//!
//! Both engines share [`SourceMigration::prepare`] and [`SourceMigration::resume`].
//!
//! With `dependency-aware`, pre-copy first has the guest freeze its untainted processes
//! and renews the freeze until the pause; the destination thaws the guest once it runs
//! there, the rollback once it runs here again (see [`super::freeze`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_api::guest::FreezeReport;
use tern_api::migration::DependencyOutcome;
use tern_hv::{HvError, MigrationState, MigrationStatus, VmInfo, VmState};
use tern_migrate::{Policy, PolicyKind, StopReason};

use tern_hv::disk::mirror::{self, LocalDisk};

use super::disks::Mirror;
use super::freeze::{self, Renewals};
use super::memory::{changed_pages, SentDigests, SourceMemory};
use super::outgoing::{open_stream, Outgoing, StreamOptions};
use super::precopy::{self, PrecopyConfig, PrecopyOutcome, Throttle};
use super::relay::SourceRelay;
use super::secure::{ClientTls, Stream};
use super::session::{
    Engine, MigrationResult, Outbound, Phase, PrepareRequest, SendRequest, Ticket,
};
use super::throttle::CgroupThrottle;
use super::wire::{self, Channel, Hello, PAGE_SIZE};
use super::MigrationError;
use crate::client::AgentClient;
use crate::client::ClientError;
use crate::state::AppState;

/// How long QEMU may take to carry the device state.
const DEVICE_STATE_TIMEOUT: Duration = Duration::from_secs(15);

/// How long after asking QEMU to stop the guest a stop still under way lifts the
/// throttle's quota: QEMU reads the request and flags its vCPUs within about a
/// millisecond, and a stop of a running guest returns within one.
const LIFT_AFTER_STOP_ASKED: Duration = Duration::from_millis(2);
/// How long a rollback waits for a destination that never got the resume request to
/// confirm its abort. It cleans up on its own when the streams die, so on a cut link
/// the source does not wait for it; the request carries on in the background.
const ABORT_WAIT: Duration = Duration::from_secs(2);

/// Why the rollback could not leave the VM running on the source.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// The destination may run the VM and did not confirm it is gone, so the source
    /// stays paused rather than risk running the VM twice.
    #[error(
        "the destination may be running the VM and could not be reached: the source stays paused"
    )]
    DestinationUnconfirmed {
        #[source]
        last: Option<ClientError>,
    },
    #[error("resuming the source: {0}")]
    ResumeSource(#[source] HvError),
}

/// Runs one migration to its end and records the outcome in `job`.
pub async fn run(state: AppState, job: Arc<Outbound>, req: SendRequest, engine: Engine) {
    let dest = match AgentClient::new_tls(
        &req.destination,
        &req.token,
        Duration::from_secs(30),
        state.tls.clone(),
    ) {
        Ok(d) => d,
        Err(e) => return fail(&job, &e.to_string()),
    };
    let mut migration = SourceMigration::new(&state, &job, &req, engine, dest);
    match migration.walk().await {
        Ok(result) => {
            let mut v = job.view.lock().expect("migration view lock");
            v.result = Some(result);
            v.phase = Phase::Completed;
        }
        Err(e) => {
            tracing::warn!(vm = %req.vm, error = %e, "migration failed; rolling back");
            let msg = match migration.rollback().await {
                Ok(()) => e.to_string(),
                Err(r) => format!("{e}; rollback: {r}"),
            };
            fail(&job, &msg);
        }
    }
}

fn fail(job: &Outbound, error: &str) {
    let mut v = job.view.lock().expect("migration view lock");
    v.error = Some(error.to_string());
    v.phase = Phase::RolledBack;
}

/// What rollback needs to know about how far the migration got.
#[derive(Default)]
struct Reached {
    ticket: Option<Ticket>,
    paused: bool,
    device_state_started: bool,
    /// The destination may have resumed the VM: it must be confirmed gone first.
    resume_sent: bool,
}

/// Where the destination takes the VM, from its answer to prepare.
struct Target {
    ticket: Ticket,
    /// The destination's host, as the memory streams and QEMU connect to it.
    host: String,
}

/// QEMU's stream on its way to the destination: the authenticated device-state stream,
/// opened with the memory streams, and once QEMU migrates, the relay into it.
#[derive(Default)]
struct Device {
    stream: Option<Stream>,
    relay: Option<SourceRelay>,
}

/// tern's memory streams and what they read, between the phases that use them.
struct Live {
    out: Outgoing,
    mem: SourceMemory,
    sent: SentDigests,
    /// When the memory streams began to connect: the live phase's clock.
    started: Instant,
}

/// What the phases measured, for the result.
#[derive(Default)]
struct Measured {
    precopy: Option<PrecopyOutcome>,
    /// Throttles the vCPUs during pre-copy; lifted once the destination runs the guest
    /// (or, in a rollback, before the source resumes it).
    throttle: Option<CgroupThrottle>,
    paused_at: Option<Instant>,
    /// The source's mapping of guest memory after the final pass, unmapped once the
    /// destination runs the guest rather than while it is paused.
    unmap: Option<SourceMemory>,
    final_bytes: u64,
    final_pass_ms: u64,
    /// QEMU's device-state bytes and when it was through (ms after the pause).
    device: Option<(u64, u64)>,
    /// QEMU's own migration (`qemu-native`), as its last status showed it.
    native: Option<MigrationStatus>,
    /// From the pause (for `qemu-native`: the end of QEMU's migration) to the
    /// destination running.
    downtime: Duration,
    /// When the guest ran whole on the destination (resumed, and thawed if it was
    /// frozen): the end of the migration's total.
    finished_at: Option<Instant>,
    /// Destroying the stale copy here, from the destination running.
    cleanup: Duration,
}

/// One outgoing migration walking its phases. A phase leaves here what later ones use.
struct SourceMigration<'a> {
    state: &'a AppState,
    job: &'a Arc<Outbound>,
    req: &'a SendRequest,
    engine: Engine,
    dest: AgentClient,
    started: Instant,
    reached: Reached,
    info: Option<VmInfo>,
    memory: Option<SourceMemory>,
    target: Option<Target>,
    live: Option<Live>,
    device: Device,
    /// The block mirror of the VM's local disks, once one was started.
    mirror: Option<Mirror>,
    /// `dependency-aware`: the guest froze its untainted processes and must be thawed
    /// wherever the VM runs in the end; these renew the freeze until the pause.
    frozen: Option<Renewals>,
    /// `dependency-aware`: the `freeze` asked at the start, answered while the
    /// destination prepares and the streams connect, so pre-copy need not wait for it.
    freeze_asked: Option<(
        Instant,
        tokio::task::JoinHandle<Result<FreezeReport, String>>,
    )>,
    measured: Measured,
}

impl<'a> SourceMigration<'a> {
    fn new(
        state: &'a AppState,
        job: &'a Arc<Outbound>,
        req: &'a SendRequest,
        engine: Engine,
        dest: AgentClient,
    ) -> Self {
        SourceMigration {
            state,
            job,
            req,
            engine,
            dest,
            started: Instant::now(),
            reached: Reached::default(),
            info: None,
            memory: None,
            target: None,
            live: None,
            device: Device::default(),
            mirror: None,
            frozen: None,
            freeze_asked: None,
            measured: Measured::default(),
        }
    }

    fn vm(&self) -> &'a str {
        self.req.vm.as_str()
    }

    /// Every phase of the engine in order; the first error ends the walk.
    async fn walk(&mut self) -> Result<MigrationResult, MigrationError> {
        for &phase in self.engine.phases() {
            self.job.set_phase(phase);
            self.run_phase(phase).await?;
            tracing::debug!(
                vm = self.vm(),
                ?phase,
                ms = self.started.elapsed().as_millis() as u64,
                "migration phase done"
            );
        }
        Ok(self.result())
    }

    async fn run_phase(&mut self, phase: Phase) -> Result<(), MigrationError> {
        match (phase, self.engine) {
            (Phase::Preparing, _) => self.prepare().await,
            (Phase::Connecting, Engine::Tern(_)) => self.connect().await,
            (Phase::PreCopy, Engine::Tern(policy)) => self.precopy(policy).await,
            (Phase::PreCopy, Engine::QemuNative { auto_converge }) => {
                self.native_copy(auto_converge).await
            }
            (Phase::StopAndCopy, Engine::Tern(_)) => self.stop_and_copy().await,
            (Phase::DeviceState, Engine::Tern(_)) => self.device_state().await,
            (Phase::Resuming, _) => self.resume().await,
            (phase, engine) => unreachable!("{phase:?} is not a phase of {}", engine.name()),
        }
    }

    fn target(&self) -> &Target {
        self.target.as_ref().expect("the destination was prepared")
    }

    fn vm_err(step: &'static str) -> impl FnOnce(HvError) -> MigrationError {
        move |source| MigrationError::Vm { step, source }
    }

    /// Asks the destination to prepare a VM that waits for this one's state. tern's
    /// engine first maps the guest memory it will send.
    async fn prepare(&mut self) -> Result<(), MigrationError> {
        let vm = self.vm();
        if self.engine == Engine::Tern(PolicyKind::DependencyAware) {
            self.ask_freeze();
        }
        let info = self
            .state
            .hv
            .info(vm)
            .await
            .map_err(Self::vm_err("reading the VM"))?;
        let native = matches!(self.engine, Engine::QemuNative { .. });
        if !native {
            let file = info
                .memory_file
                .as_deref()
                .ok_or_else(|| MigrationError::NoMemoryFile { vm: vm.to_string() })?;
            self.memory = Some(SourceMemory::open(file)?);
        }
        let local = mirror::local_disks(&info.spec.disks);
        if native && !local.is_empty() {
            return Err(MigrationError::Disks(
                "qemu-native moves no local disks: use tern's engine".into(),
            ));
        }
        let prepare = PrepareRequest {
            vm: self.req.vm.clone(),
            spec: self.spec_for_destination(&info.spec).await?,
            native,
            vcpu_policy: self.state.vcpu.get(vm),
        };
        self.info = Some(info);
        let ticket: Ticket = self
            .dest
            .prepare_incoming(&prepare)
            .await
            .map_err(|source| MigrationError::Peer {
                step: "prepare",
                source,
            })?;
        self.reached.ticket = Some(ticket.clone());
        let host = reqwest::Url::parse(&self.req.destination)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
            .ok_or_else(|| MigrationError::NoHost {
                url: self.req.destination.clone(),
            })?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.target = Some(Target {
            ticket,
            host: host.to_string(),
        });
        if !local.is_empty() {
            self.copy_disks(local).await?;
        }
        Ok(())
    }

    /// The spec the destination makes its copy from: every local disk with its size,
    /// so the destination's new overlay is exactly as large as the disk mirrored into
    /// it, whatever size its own copy of the image has.
    async fn spec_for_destination(
        &self,
        spec: &tern_hv::VmSpec,
    ) -> Result<tern_hv::VmSpec, MigrationError> {
        let mut spec = spec.clone();
        for d in spec.disks.iter_mut() {
            if d.store != tern_hv::disk::DiskStore::Local || d.size_mib.is_some() {
                continue;
            }
            let store = self
                .state
                .stores()
                .of(self.vm(), d)
                .map_err(|e| MigrationError::Disks(e.to_string()))?;
            let bytes = store
                .virtual_bytes(self.vm(), &d.name)
                .await
                .map_err(|e| MigrationError::Disks(e.to_string()))?;
            if bytes % (1 << 20) != 0 {
                return Err(MigrationError::Disks(
                    tern_hv::disk::DiskError::OddSize {
                        disk: d.name.clone(),
                        bytes,
                    }
                    .to_string(),
                ));
            }
            d.size_mib = Some(bytes >> 20);
        }
        Ok(spec)
    }

    /// Mirrors the local disks into the destination's exports until every mirror has
    /// caught up; from then on each guest write goes to both ends until the pause.
    async fn copy_disks(&mut self, local: Vec<LocalDisk>) -> Result<(), MigrationError> {
        let (state, vm, job) = (self.state, self.vm(), self.job.clone());
        let target = self.target();
        let port = target.ticket.nbd_port.ok_or_else(|| {
            MigrationError::Disks(
                "the destination exports no disks: its agent predates local disks".into(),
            )
        })?;
        let host = target.host.clone();
        let migration = target.ticket.migration.clone();
        let mirror = self.mirror.insert(Mirror::new(&migration, local));
        mirror.start(state, vm, &host, port).await?;
        let started = Instant::now();
        let progress = |p| job.view.lock().expect("migration view lock").disks = Some(p);
        let cancelled = || job.cancel.load(Ordering::SeqCst);
        mirror
            .wait_ready(state, vm, mirror::READY_TIMEOUT, &progress, &cancelled)
            .await?;
        tracing::info!(
            vm,
            ms = started.elapsed().as_millis() as u64,
            "local disks mirrored; the mirror follows every write"
        );
        Ok(())
    }

    /// Where the destination receives streams: its host and the port of `port`.
    async fn stream_addr(&self, port: u16) -> Result<std::net::SocketAddr, MigrationError> {
        let host = &self.target().host;
        tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|source| MigrationError::Resolve {
                host: host.clone(),
                source,
            })?
            .next()
            .ok_or_else(|| MigrationError::NoAddress { host: host.clone() })
    }

    /// The `Hello` of the device-state stream.
    fn device_hello(&self) -> Hello {
        let ticket = &self.target().ticket;
        Hello {
            version: wire::VERSION,
            channel: Channel::DeviceState,
            stream: 0,
            streams: 1,
            pages: 0,
            migration: ticket.migration.clone(),
            token: ticket.stream_token.clone(),
        }
    }

    /// Opens tern's memory streams to the destination, and the device-state stream
    /// beside them, so the downtime does not wait for its handshake.
    async fn connect(&mut self) -> Result<(), MigrationError> {
        let ticket = &self.target().ticket;
        let (migration, token) = (ticket.migration.clone(), ticket.stream_token.clone());
        let memory_addr = self.stream_addr(ticket.memory_port).await?;
        let device_addr = self.stream_addr(self.target().ticket.device_port).await?;
        let device_hello = self.device_hello();
        let opts = StreamOptions {
            tls: self.stream_tls()?,
            ..self.stream_options()
        };
        let mem = self.memory.take().expect("memory was mapped in prepare");
        let meter = self.job.meter.clone();
        let connected = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let device_opts = opts.clone();
            let out = Outgoing::connect(memory_addr, &migration, &token, mem.pages(), opts)?
                .with_meter(meter);
            let device = open_stream(device_addr, &device_hello, &device_opts)?;
            let sent = SentDigests::new(mem.pages());
            let live = Live {
                out,
                mem,
                sent,
                started,
            };
            Ok::<_, MigrationError>((live, device))
        })
        .await
        .map_err(|source| MigrationError::Task {
            step: "connecting the memory streams",
            source,
        })?;
        let (live, device) = connected?;
        self.live = Some(live);
        self.device.stream = Some(device);
        Ok(())
    }

    /// Mutual TLS to the destination host when this agent has a host identity: the
    /// destination's certificate must name the host the streams connect to.
    fn stream_tls(&self) -> Result<Option<ClientTls>, MigrationError> {
        self.state
            .tls
            .as_ref()
            .map(|c| ClientTls::new(Arc::new(c.clone()), &self.target().host))
            .transpose()
    }

    fn stream_options(&self) -> StreamOptions {
        let o = &self.req.options;
        StreamOptions {
            streams: usize::from(o.streams),
            lz4: o.compress,
            rate_bytes_per_s: o.max_mbit.map(|m| m * 1_000_000 / 8),
            ..StreamOptions::default()
        }
    }

    fn precopy_config(&self) -> PrecopyConfig {
        let o = &self.req.options;
        let default = PrecopyConfig::default();
        PrecopyConfig {
            limits_downtime_s: o.downtime_limit_ms as f64 / 1000.0,
            max_elapsed_s: o.max_precopy_s,
            initial_bandwidth_bytes_per_s: self
                .stream_options()
                .rate_bytes_per_s
                .map_or(default.initial_bandwidth_bytes_per_s, |r| r as f64),
            ..default
        }
    }

    /// `dependency-aware`: has the guest freeze its untainted processes before the
    /// first round. A guest that does not answer in time or refuses freezes nothing;
    /// the migration goes on under the adaptive rules and its view says why.
    fn ask_freeze(&mut self) {
        let (state, vm) = (self.state.clone(), self.vm().to_string());
        let task = tokio::spawn(async move { freeze::freeze(&state, &vm).await });
        self.freeze_asked = Some((Instant::now(), task));
    }

    /// Takes the guest's answer to the `freeze` asked at the start (asking now if it
    /// was not), then renews the freeze until the pause.
    async fn freeze_guest(&mut self) {
        let vm = self.vm();
        if self.freeze_asked.is_none() {
            self.ask_freeze();
        }
        let (asked, task) = self.freeze_asked.take().expect("a freeze was asked");
        let answer = task
            .await
            .unwrap_or_else(|e| Err(format!("the freeze request ended: {e}")));
        let outcome = DependencyOutcome {
            freeze_answer_ms: asked.elapsed().as_millis() as u64,
            ..freeze::outcome_of(&answer)
        };
        match answer {
            Ok(r) => {
                tracing::info!(
                    vm,
                    frozen = r.frozen.len(),
                    tainted = r.tainted,
                    "dependency-aware: untainted processes frozen"
                );
                self.frozen = Some(Renewals::start(
                    self.state.clone(),
                    self.job.clone(),
                    vm.to_string(),
                ));
            }
            Err(reason) => {
                tracing::warn!(
                    vm,
                    reason,
                    "dependency-aware: the guest froze nothing; going on as adaptive"
                );
                // An answer later than the wait may still have frozen the guest; a
                // thaw, not waited for, undoes it sooner than the deadline would.
                let (state, vm) = (self.state.clone(), vm.to_string());
                tokio::spawn(async move {
                    let _ = freeze::thaw(&state, &vm).await;
                });
            }
        }
        self.job
            .view
            .lock()
            .expect("migration view lock")
            .dependency = Some(outcome);
    }

    /// Thaws the guest here once the VM runs here again (rollback), recording how.
    async fn thaw_on_source(&mut self) {
        let Some(renewals) = self.frozen.take() else {
            return;
        };
        renewals.stop();
        let vm = self.vm();
        let thaw = freeze::thaw(self.state, vm).await.map_err(|e| {
            tracing::warn!(vm, error = %e, "dependency-aware: the guest was not thawed after the rollback; its deadline will");
            e.to_string()
        });
        self.record_thaw(tern_api::migration::ThawSite::Source, thaw);
    }

    /// Records the destination's thaw of the guest that runs there now.
    fn thawed_on_destination(&mut self, got: Result<tern_api::guest::ThawReport, ClientError>) {
        let Some(renewals) = self.frozen.take() else {
            return;
        };
        renewals.stop();
        let vm = self.vm();
        let thaw = got.map_err(|e| e.to_string()).map_err(|e| {
                tracing::warn!(vm, error = %e, "dependency-aware: migrated, but the destination did not thaw the guest; its deadline will");
                e
            });
        self.record_thaw(tern_api::migration::ThawSite::Destination, thaw);
    }

    fn record_thaw(
        &self,
        site: tern_api::migration::ThawSite,
        thaw: Result<tern_api::guest::ThawReport, String>,
    ) {
        let mut v = self.job.view.lock().expect("migration view lock");
        if let Some(d) = v.dependency.as_mut() {
            freeze::record_thaw(d, site, thaw);
        }
    }

    /// Live rounds while the guest runs, until the policy says stop.
    ///
    /// `dependency-aware`: round 1 does not wait for the guest's answer to `freeze`
    /// (its scan of `/proc` under TCG took 125-311 ms, the longest wait before round
    /// 1). Pages the untainted writers change after round 1 sent them and before they
    /// froze are sent again like any other; round 1's probe waits for the answer, so
    /// the policy rates the guest as the rest of the move sees it.
    async fn precopy(&mut self, policy: PolicyKind) -> Result<(), MigrationError> {
        let gate = (policy == PolicyKind::DependencyAware)
            .then(|| Arc::new(precopy::FreezeGate::default()));
        let vm = self.vm();
        // Set while the guest runs, before any throttle: one QMP round trip less in the
        // downtime, and none between the stop's catch-up and the pause, where QEMU may
        // wait for a vCPU the throttle holds off the CPU with QEMU's global lock (up to a
        // period; the guest then writes again). It only shapes a migration that has not
        // started; QEMU's own engine sets it back.
        self.state
            .hv
            .set_migration_capabilities(vm, &[("x-ignore-shared", true)])
            .await
            .map_err(Self::vm_err("setting migration capabilities"))?;
        let tids = self.state.hv.vcpu_threads(vm).await.unwrap_or_default();
        let pid = self.info.as_ref().and_then(|i| i.pid);
        let cfg = self.precopy_config();
        let mut live = self.live.take().expect("memory streams were connected");
        let (job, name) = (self.job.clone(), vm.to_string());
        let freeze = gate.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut throttle = CgroupThrottle::new(&name, pid, tids);
            let on_round = &mut |t: &tern_migrate::RoundTelemetry| {
                job.view
                    .lock()
                    .expect("migration view lock")
                    .rounds
                    .push(t.clone())
            };
            let Live { out, mem, sent, .. } = &mut live;
            let outcome = precopy::run(
                out,
                mem,
                sent,
                &policy as &dyn Policy,
                &cfg,
                &mut throttle,
                &job.cancel,
                freeze.as_deref(),
                on_round,
            );
            match outcome {
                Ok(o) => Ok((live, o, throttle)),
                Err(e) => {
                    live.out.abort(&e.to_string());
                    Err(e)
                }
            }
        });
        let done = match gate {
            Some(gate) => {
                let answered = async {
                    self.freeze_guest().await;
                    gate.open(self.frozen.is_some());
                };
                tokio::join!(answered, done).1
            }
            None => done.await,
        };
        let (live, outcome, throttle) = done.map_err(|source| MigrationError::Task {
            step: "pre-copy",
            source,
        })??;
        self.live = Some(live);
        self.measured.precopy = Some(outcome);
        self.measured.throttle = Some(throttle);
        check_cancel(self.job)
    }

    /// Pauses the guest and sends the pages the live rounds left different.
    async fn stop_and_copy(&mut self) -> Result<(), MigrationError> {
        // A renewal sent to a paused guest would only wait out its timeout; the freeze's
        // deadline covers the downtime.
        if let Some(r) = &self.frozen {
            r.stop();
        }
        // The threads stay in the throttle's cgroup while the guest is paused: moving
        // them back takes 8-9 ms that would count as downtime. They go once the
        // destination runs the guest, or before the source resumes it in a rollback.
        // QEMU's stop returns once every vCPU has stopped, and a vCPU the throttle holds
        // off the CPU (as the catch-up leaves it) stops only when it runs again, up to
        // a period later: when the stop takes longer than QEMU needs to flag its vCPUs,
        // the quota is lifted, and a vCPU let run finds the flag and stops at once.
        let asked = Instant::now();
        let mut throttle = self.measured.throttle.take();
        if let Some((period_began, last_ran)) = throttle.as_ref().and_then(|t| t.seen_ms_ago()) {
            tracing::debug!(
                vm = self.vm(),
                period_began_ms_ago = period_began,
                last_ran_ms_ago = last_ran,
                "pausing a throttled guest"
            );
        }
        let pause = self.state.hv.pause(self.vm());
        tokio::pin!(pause);
        let paused = tokio::select! {
            r = &mut pause => r,
            () = tokio::time::sleep(LIFT_AFTER_STOP_ASKED) => {
                if let Some(t) = throttle.as_mut() {
                    t.apply(0);
                }
                pause.await
            }
        };
        self.measured.throttle = throttle;
        paused.map_err(Self::vm_err("pausing the VM"))?;
        self.reached.paused = true;
        let paused_at = Instant::now();
        self.measured.paused_at = Some(paused_at);
        tracing::debug!(
            vm = self.vm(),
            pause_ms = (paused_at - asked).as_secs_f64() * 1000.0,
            "paused"
        );
        let rounds = self
            .measured
            .precopy
            .as_ref()
            .map_or(0, |o| o.history.len());
        let final_round = rounds as u32 + 1;
        let Live {
            mut out,
            mem,
            sent,
            started,
        } = self.live.take().expect("memory streams were connected");
        let job = self.job.clone();
        let vm = self.vm().to_string();
        // The mapping of guest memory comes back instead of being dropped here: unmapping
        // hundreds of MB of it takes tens of milliseconds, which the guest would spend
        // paused. It goes once the destination runs the guest.
        let final_pass =
            tokio::task::spawn_blocking(move || -> Result<(u64, SourceMemory), MigrationError> {
                let scan_started = Instant::now();
                let pages = changed_pages(&mem, &sent, 2);
                let scan_ms = scan_started.elapsed().as_secs_f64() * 1000.0;
                // Nothing changed (an idle guest): the last round's acknowledgement
                // already proved the destination has everything; only `Done` is left.
                let bytes = if pages.is_empty() {
                    0
                } else {
                    let at = started.elapsed().as_secs_f64();
                    out.meter().begin(final_round, pages.len() as u64, at);
                    let t = out.send_round(final_round, &mem, &sent, &pages, &job.cancel);
                    out.meter().end();
                    t?.bytes
                };
                out.finish()?;
                tracing::debug!(
                    vm,
                    pages = pages.len(),
                    scan_ms,
                    pass_ms = scan_started.elapsed().as_secs_f64() * 1000.0,
                    "final pass: scan, send and done"
                );
                Ok((bytes, mem))
            });
        // The disks' last writes travel beside the last pages.
        let (state, vm) = (self.state, self.vm());
        let disks = async {
            match self.mirror.as_mut() {
                Some(m) => Some(m.finish(state, vm, mirror::FINISH_TIMEOUT).await),
                None => None,
            }
        };
        let (final_bytes, disks) = tokio::join!(final_pass, disks);
        let (final_bytes, mem) = final_bytes.map_err(|source| MigrationError::Task {
            step: "final pass",
            source,
        })??;
        self.measured.unmap = Some(mem);
        if let Some(done) = disks {
            let done = done?;
            tracing::info!(
                vm,
                ms = paused_at.elapsed().as_millis() as u64,
                bytes = done.copied_bytes,
                "local disks complete on the destination"
            );
            self.job.view.lock().expect("migration view lock").disks = Some(done);
        }
        self.measured.final_bytes = final_bytes;
        self.measured.final_pass_ms = paused_at.elapsed().as_millis() as u64;
        Ok(())
    }

    /// Has QEMU send the CPU and device state (its RAM is the shared file tern moved).
    async fn device_state(&mut self) -> Result<(), MigrationError> {
        self.start_qemu_migration("sending the device state").await
    }

    /// Starts QEMU's `migrate` into a relay over the device-state stream (opened now if
    /// `connect` did not); from here a rollback must cancel it.
    async fn start_qemu_migration(&mut self, step: &'static str) -> Result<(), MigrationError> {
        self.reached.device_state_started = true;
        let stream = match self.device.stream.take() {
            Some(s) => s,
            None => {
                let addr = self.stream_addr(self.target().ticket.device_port).await?;
                let hello = self.device_hello();
                let opts = StreamOptions {
                    tls: self.stream_tls()?,
                    ..self.stream_options()
                };
                tokio::task::spawn_blocking(move || open_stream(addr, &hello, &opts))
                    .await
                    .map_err(|source| MigrationError::Task {
                        step: "connecting the device-state stream",
                        source,
                    })??
            }
        };
        let id = self
            .job
            .view
            .lock()
            .expect("migration view lock")
            .id
            .clone();
        let path = super::relay::socket_path(&self.state.host.state_dir, &id)?;
        let relay = SourceRelay::start(path, stream, DEVICE_STATE_TIMEOUT)?;
        let uri = relay.uri();
        self.device.relay = Some(relay);
        self.state
            .hv
            .migrate(self.vm(), &uri)
            .await
            .map_err(Self::vm_err(step))
    }

    /// QEMU's own migration of the whole VM, for comparison: QEMU decides everything;
    /// tern only starts it and bounds it in time.
    async fn native_copy(&mut self, auto_converge: bool) -> Result<(), MigrationError> {
        let vm = self.vm();
        let caps = [("x-ignore-shared", false), ("auto-converge", auto_converge)];
        self.state
            .hv
            .set_migration_capabilities(vm, &caps)
            .await
            .map_err(Self::vm_err("setting migration capabilities"))?;
        self.start_qemu_migration("starting QEMU's migration")
            .await?;
        let limit = Duration::from_secs_f64(self.req.options.max_precopy_s);
        let st = loop {
            let st = query_migrate(self.state, vm).await?;
            if st.state == MigrationState::Completed {
                break st;
            }
            check_cancel(self.job)?;
            if let Some(relay) = self.device.relay.as_mut() {
                if let Some(e) = relay.failure().await {
                    return Err(e);
                }
            }
            if self.started.elapsed() > limit {
                return Err(MigrationError::NotConverged {
                    limit,
                    bytes: st.transferred_bytes,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // QEMU paused the source to finish; from here the destination must run, or rollback.
        self.reached.paused = true;
        self.measured.paused_at = Some(Instant::now());
        self.measured.native = Some(st);
        Ok(())
    }

    /// Runs the VM on the destination (thawed there when the guest was frozen) and
    /// destroys the stale copy here.
    ///
    /// With tern's engine the resume request goes out with the device state, not after
    /// it: the destination runs the guest the moment QEMU has loaded the state, which
    /// saves a round trip and a poll interval of downtime. Its answer alone says whether
    /// the VM runs there; a failed request goes through rollback, which confirms the
    /// destination is not running it before the source resumes. A frozen guest is
    /// thawed by the destination the moment it runs there (`resume?thaw=true`); the
    /// source then collects how that went.
    async fn resume(&mut self) -> Result<(), MigrationError> {
        let paused_at = self.measured.paused_at.expect("the source was paused");
        let (state, vm) = (self.state, self.vm());
        let native = matches!(self.engine, Engine::QemuNative { .. });
        let device = async move {
            if native {
                return None;
            }
            let got = wait_device_state(state, vm).await;
            Some((got, paused_at.elapsed().as_millis() as u64))
        };
        let ticket = &self
            .target
            .as_ref()
            .expect("the destination was prepared")
            .ticket;
        let thaw = self.frozen.is_some();
        let resumed = resume_destination(&self.dest, ticket, &mut self.reached, thaw);
        let (device, resumed) = tokio::join!(device, resumed);
        resumed?;
        if let Some((got, done_ms)) = device {
            let bytes = got.unwrap_or_else(|e| {
                tracing::warn!(vm, error = %e, "destination runs, but QEMU's device-state status is unknown");
                0
            });
            self.measured.device = Some((bytes, done_ms));
        }
        // The downtime ends when the destination runs; tearing down the stale source copy
        // (QEMU exit, freeing its memory file) happens while the guest already runs there.
        self.measured.downtime = paused_at.elapsed();
        // The destination runs: it loaded all QEMU sent, the relay has nothing left.
        self.device = Device::default();
        // The guest's thaw comes first, the stale copy's teardown after: on a host
        // that shares its cores with the destination (a lab, or the host a VM comes back
        // to) tearing down hundreds of MB beside the thaw held the thaw back by 40-90
        // ms, while nothing waits on the teardown but this job's own end.
        let tail_started = Instant::now();
        if thaw {
            let got = self.dest.thaw_incoming(&ticket.migration).await;
            self.thawed_on_destination(got);
        }
        // The guest runs whole on the destination: the migration's total ends here.
        self.measured.finished_at = Some(Instant::now());
        let thawed = tail_started.elapsed();
        let unmap = self.measured.unmap.take();
        let throttle = self.measured.throttle.take();
        let unmapped = tokio::task::spawn_blocking(move || drop((unmap, throttle)));
        let (_, destroyed) = tokio::join!(unmapped, state.destroy_copy(vm));
        if let Err(e) = destroyed {
            tracing::warn!(vm, error = %e, "migrated, but the source VM could not be destroyed");
        }
        self.measured.cleanup = tail_started.elapsed() - thawed;
        tracing::debug!(
            vm,
            thaw_ms = thawed.as_millis() as u64,
            cleanup_ms = self.measured.cleanup.as_millis() as u64,
            "the guest thawed on the destination and the stale copy destroyed"
        );
        Ok(())
    }

    /// The finished migration's figures (pure over what the phases measured).
    fn result(&self) -> MigrationResult {
        let m = &self.measured;
        let end = m.finished_at.unwrap_or_else(Instant::now);
        let total_ms = end.duration_since(self.started).as_millis() as u64;
        let cleanup_ms = m.cleanup.as_millis() as u64;
        match (self.engine, &m.precopy, &m.native) {
            (Engine::Tern(policy), Some(o), _) => {
                let (device_bytes, device_done_ms) = m.device.unwrap_or((0, m.final_pass_ms));
                let device_ms = device_done_ms.saturating_sub(m.final_pass_ms);
                let downtime_ms = m.downtime.as_millis() as u64;
                let resume_ms = downtime_ms.saturating_sub(m.final_pass_ms + device_ms);
                MigrationResult {
                    total_ms,
                    downtime_ms,
                    cleanup_ms,
                    bytes: o.bytes + m.final_bytes + device_bytes,
                    rounds: o.history.len() as u32,
                    nonzero_bytes: Some(o.nonzero_pages * PAGE_SIZE as u64),
                    converged: o.stop_reason.converged(),
                    policy: Engine::Tern(policy),
                    stop_reason: o.stop_reason,
                    max_throttle_percent: o.max_throttle_percent,
                    downtime_parts_ms: Some([m.final_pass_ms, device_ms, resume_ms]),
                    probe: o.probe.clone(),
                    guest_ok: None,
                }
            }
            (engine, _, st) => {
                let st = st.as_ref().expect("QEMU's migration completed");
                MigrationResult {
                    total_ms,
                    cleanup_ms,
                    // QEMU's own downtime ends when its destination could run; tern's
                    // resume adds to it.
                    downtime_ms: st.downtime_ms.unwrap_or(0) + m.downtime.as_millis() as u64,
                    bytes: st.transferred_bytes,
                    rounds: 0,
                    nonzero_bytes: None,
                    converged: true,
                    policy: engine,
                    stop_reason: StopReason::FitsDowntime,
                    max_throttle_percent: 0,
                    downtime_parts_ms: None,
                    probe: None,
                    guest_ok: None,
                }
            }
        }
    }

    /// The one rollback path: destination cleaned up, source running.
    async fn rollback(&mut self) -> Result<(), RollbackError> {
        // The source may run the guest again: at full speed.
        if let Some(throttle) = self.measured.throttle.take() {
            let _ = tokio::task::spawn_blocking(move || drop(throttle)).await;
        }
        let (state, vm, reached) = (self.state, self.vm(), &self.reached);
        // The streams are dropped before the destination is told: it stops waiting.
        self.live = None;
        if reached.device_state_started {
            let _ = state.hv.migrate_cancel(vm).await;
        }
        self.device = Device::default();
        // The source never left its own disks; the mirror into the destination stops
        // before the destination, and with it the export, goes.
        if let Some(m) = self.mirror.as_mut() {
            m.abandon(state, vm).await;
        }
        if let Some(ticket) = &reached.ticket {
            abort_destination(&self.dest, ticket, reached.resume_sent).await?;
        }
        if reached.paused {
            match state.hv.info(vm).await {
                Ok(i) if i.state == VmState::Running => {}
                _ => {
                    state
                        .hv
                        .resume(vm)
                        .await
                        .map_err(RollbackError::ResumeSource)?;
                }
            }
        }
        // The VM runs here again: what the freeze held may run too. A freeze still being
        // answered is waited for first (bounded by its own timeout), or its answer
        // could freeze the guest after the thaw.
        if self.freeze_asked.is_some() {
            self.freeze_guest().await;
        }
        self.thaw_on_source().await;
        Ok(())
    }
}

/// Tells the destination to drop the migration. A destination that may have resumed
/// must confirm it is gone before the source runs again; a few tries cover a short
/// link outage. One that was never asked to resume is given [`ABORT_WAIT`]: on a cut
/// link the request finishes in the background, and the destination, whose streams
/// died, destroys its copy on its own anyway.
async fn abort_destination(
    dest: &AgentClient,
    ticket: &Ticket,
    resume_sent: bool,
) -> Result<(), RollbackError> {
    if !resume_sent {
        let (dest, id) = (dest.clone(), ticket.migration.clone());
        let abort = tokio::spawn(async move {
            if let Err(e) = dest.abort_incoming(&id).await {
                if !e.is_not_found() {
                    tracing::warn!(migration = %id, error = %e, "could not reach the destination to abort");
                }
            }
        });
        let _ = tokio::time::timeout(ABORT_WAIT, abort).await;
        return Ok(());
    }
    let mut last = None;
    for attempt in 0..5 {
        match dest.abort_incoming(&ticket.migration).await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => {
                tracing::warn!(attempt, error = %e, "could not reach the destination to abort");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    Err(RollbackError::DestinationUnconfirmed { last })
}

/// Runs the VM on the destination; from a successful return on, it runs there.
async fn resume_destination(
    dest: &AgentClient,
    ticket: &Ticket,
    reached: &mut Reached,
    thaw: bool,
) -> Result<(), MigrationError> {
    reached.resume_sent = true;
    dest.resume_incoming(&ticket.migration, thaw)
        .await
        .map_err(|source| MigrationError::Peer {
            step: "resume",
            source,
        })?;
    Ok(())
}

fn check_cancel(job: &Outbound) -> Result<(), MigrationError> {
    if job.cancel.load(Ordering::SeqCst) {
        Err(MigrationError::Cancelled)
    } else {
        Ok(())
    }
}

/// QEMU's migration status; a failed or cancelled migration is an error.
async fn query_migrate(state: &AppState, vm: &str) -> Result<MigrationStatus, MigrationError> {
    let st = state
        .hv
        .query_migrate(vm)
        .await
        .map_err(|source| MigrationError::Vm {
            step: "querying QEMU's migration",
            source,
        })?;
    match st.state {
        MigrationState::Failed | MigrationState::Cancelled => Err(MigrationError::Qemu {
            state: st.state,
            desc: st.error.unwrap_or_default(),
        }),
        _ => Ok(st),
    }
}

/// Polls QEMU until the device state is through; returns the bytes QEMU sent.
pub(crate) async fn wait_device_state(state: &AppState, vm: &str) -> Result<u64, MigrationError> {
    let deadline = Instant::now() + DEVICE_STATE_TIMEOUT;
    loop {
        let st = query_migrate(state, vm).await?;
        if st.state == MigrationState::Completed {
            return Ok(st.transferred_bytes);
        }
        if Instant::now() > deadline {
            return Err(MigrationError::DeviceStateTimeout(DEVICE_STATE_TIMEOUT));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engines_walk_their_phases_in_the_documented_order_sharing_prepare_and_resume() {
        let tern = Engine::Tern(PolicyKind::Adaptive).phases();
        assert_eq!(
            tern,
            [
                Phase::Preparing,
                Phase::Connecting,
                Phase::PreCopy,
                Phase::StopAndCopy,
                Phase::DeviceState,
                Phase::Resuming
            ]
        );
        let native = Engine::QemuNative {
            auto_converge: false,
        }
        .phases();
        // QEMU's run is a subsequence of tern's: same first and last phase, same order.
        assert_eq!(native.first(), tern.first());
        assert_eq!(native.last(), tern.last());
        let mut rest = tern.iter();
        assert!(native.iter().all(|p| rest.any(|q| q == p)));
        assert!(tern.iter().chain(native).all(|p| !p.is_final()));
    }
}
