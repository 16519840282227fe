//! The control loop: the imperative shell that moves the cluster toward what the
//! decisions ask for. Each round:
//!
//! ```text
//!  load reports ──► heartbeats (stale copies on returning hosts destroyed)
//!       └─► health step (dead hosts, restarts, evacuation), guest HA step
//!             └─► balance round: planned on a copy, outside the store's lock;
//!                 the moves that still hold committed (dry run: a recorded plan)
//!                   └─► dispatch: agent calls for pending creates, deletes, migrations
//!                         └─► answers committed as commands
//! ```
//!
//! Agent calls run concurrently (bounded); a VM has at most one call in flight. While a
//! migration runs, its source's telemetry is kept in [`LiveMigrations`] (memory only:
//! it is worthless once the migration ends) until its result is committed.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::client::{Connector, Progress};
use crate::decide::balance::{self, BalancePlan};
use crate::decide::reconcile::{self, Action};
use crate::decide::{guest, health, Command, Reply};
use crate::error::Result;
pub use crate::live::LiveMigrations;
use crate::manager::Manager;
use crate::ratelimit::{Warnings, WARN_EVERY};
use crate::state::{Host, MigrationResult};
use tern_api::vcpu::VcpuPolicy;

/// The longest wait between rounds, whatever the settings say (their bound too).
const MAX_INTERVAL_S: u64 = tern_balance::round::SETTINGS_MAX[0].1;

/// Agent calls in flight at once.
const CONCURRENCY: usize = 64;

/// The loop's state: which VMs have a call in flight, and the answers not yet committed.
pub struct Control {
    manager: Arc<Manager>,
    agents: Arc<dyn Connector>,
    inflight: Mutex<BTreeSet<String>>,
    done_tx: mpsc::UnboundedSender<(String, Option<Command>)>,
    done_rx: Mutex<mpsc::UnboundedReceiver<(String, Option<Command>)>>,
    slots: Arc<tokio::sync::Semaphore>,
    /// Failing calls are retried every 200 ms; their warnings are rate-limited.
    warnings: Warnings,
}

/// What one round did.
#[derive(Clone, Debug, Default)]
pub struct RoundReport {
    pub reports: usize,
    pub unreachable: usize,
    pub stale_destroyed: usize,
    pub plan: BalancePlan,
    pub dispatched: usize,
}

impl Control {
    pub fn new(manager: Arc<Manager>, agents: Arc<dyn Connector>) -> Arc<Self> {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        manager.set_agents(agents.clone());
        Arc::new(Self {
            manager,
            agents,
            inflight: Mutex::new(BTreeSet::new()),
            done_tx,
            done_rx: Mutex::new(done_rx),
            slots: Arc::new(tokio::sync::Semaphore::new(CONCURRENCY)),
            warnings: Warnings::default(),
        })
    }

    /// Logs `msg` as a warning about `key` (a VM or host and what failed), at most once
    /// per [`WARN_EVERY`], saying how many like it were held back.
    fn warn(&self, key: &str, msg: impl std::fmt::Display) {
        match self.warnings.allow(key) {
            Some(0) => tracing::warn!("{msg}"),
            Some(held) => tracing::warn!(
                "{msg} (and {held} more like it in the last {}s)",
                WARN_EVERY.as_secs()
            ),
            None => {}
        }
    }

    fn inflight(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pulls every host's load report and commits them as heartbeats; hosts reported
    /// stale copies are told to destroy them.
    pub async fn collect_reports(&self) -> Result<(usize, usize, usize)> {
        let hosts: Vec<Host> = self.manager.read(|s| s.hosts.values().cloned().collect());
        let agents = self.agents.clone();
        let reports: Vec<_> = futures_util::stream::iter(hosts)
            .map(|h| {
                let agents = agents.clone();
                async move {
                    let r = match agents.client(&h) {
                        Ok(c) => c.load_report().await,
                        Err(e) => Err(e),
                    };
                    (h, r)
                }
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut cmds = Vec::new();
        let mut hosts = Vec::new();
        let mut unreachable = 0;
        for (h, r) in reports {
            match r {
                Ok(report) => {
                    cmds.push(Command::Heartbeat {
                        host: h.name.clone(),
                        report,
                    });
                    hosts.push(h);
                }
                Err(e) => {
                    self.warn(
                        &format!("{}/report", h.name),
                        format_args!("host {}: no load report: {e}", h.name),
                    );
                    unreachable += 1;
                }
            }
        }
        let n = cmds.len();
        let replies = self.manager.execute_many(cmds)?;
        let mut destroyed = 0;
        for (h, r) in hosts.iter().zip(replies) {
            if let Ok(Reply::Heartbeat(hb)) = r {
                let client = self.agents.client(h)?;
                for vm in hb.stale {
                    // The VM runs elsewhere now, maybe from these very disk files.
                    match client.delete_copy(&vm).await {
                        Ok(()) => destroyed += 1,
                        Err(e) => self.warn(
                            &format!("{}/{vm}/stale", h.name),
                            format_args!("host {}: stale copy of {vm} not destroyed: {e}", h.name),
                        ),
                    }
                }
            }
        }
        Ok((n, unreachable, destroyed))
    }

    /// Settles what a previous run of the manager left open (see [`reconcile::recover`]):
    /// asks every host what it runs and commits what that proves. Run once at start,
    /// before the first dispatch.
    pub async fn recover(&self) -> Result<usize> {
        let hosts: Vec<Host> = self.manager.read(|s| s.hosts.values().cloned().collect());
        let mut running = std::collections::BTreeMap::new();
        for h in hosts {
            match self.agents.client(&h) {
                Ok(c) => match c.load_report().await {
                    Ok(r) => {
                        running.insert(
                            h.name.clone(),
                            r.vms.into_iter().map(|v| v.name.into_string()).collect(),
                        );
                    }
                    Err(e) => tracing::warn!(host = %h.name, "not heard at recovery: {e}"),
                },
                Err(e) => tracing::warn!(host = %h.name, "{e}"),
            }
        }
        let cmds = self
            .manager
            .read(|s| reconcile::recover(s, self.manager.now(), &running));
        let n = cmds.len();
        self.manager.execute_many(cmds)?;
        Ok(n)
    }

    /// The guest HA step (see [`guest::tick`]).
    pub fn guest_ha(&self) -> Result<()> {
        let limits = self.manager.ha_limits();
        self.manager
            .step(|s, now| (guest::tick(s, now, &limits), ()))
    }

    /// The health step (see [`health::tick`]).
    pub fn health(&self) -> Result<()> {
        let leases = self.manager.leases();
        self.manager
            .step(|s, now| (health::tick(s, now, &leases), ()))
    }

    /// The health step, only when a host's lease ran out; whether it ran.
    fn health_if_lease_expired(&self) -> Result<bool> {
        let leases = self.manager.leases();
        let now = self.manager.now();
        if self.manager.read(|s| leases.expired(s, now).is_empty()) {
            return Ok(false);
        }
        self.health().map(|()| true)
    }

    /// Every 200 ms, declares dead the hosts whose lease ran out and dispatches their
    /// VMs' restarts. A task of its own: a round can wait long on an unreachable host's
    /// load report, and a fenced host's VMs should restart a lease after it went
    /// silent, not a round later.
    async fn watch_leases(self: Arc<Self>) {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            match self.health_if_lease_expired() {
                Ok(true) => {
                    if let Err(e) = self.dispatch() {
                        tracing::error!("dispatching restarts: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::error!("lease check: {e}"),
            }
        }
    }

    /// A balancing round (see [`balance::round`]), timed. It plans on what it read
    /// of the snapshot ([`balance::Input`]) without holding the store, so writes go
    /// on while it plans (thousands of moves on a large uneven cluster), then commits
    /// only the moves that still hold ([`balance::commit`]), [`balance::COMMIT_CHUNK`]
    /// at a time, letting the writes waiting for the store in between.
    pub fn balance(&self) -> Result<BalancePlan> {
        let now = self.manager.now();
        let input = self
            .manager
            .read(|s| s.settings.enabled.then(|| balance::Input::of(s)));
        let Some(input) = input else {
            return Ok(BalancePlan::default());
        };
        let started = Instant::now();
        let mut plan = input.plan(now);
        let dry_run = input.settings.dry_run;
        drop(input);
        plan.planning_ms = Some(started.elapsed().as_secs_f64() * 1e3);
        let mut done = Vec::new();
        for part in balance::parts(plan, dry_run, balance::COMMIT_CHUNK) {
            done.push(self.manager.step(|s, now| balance::commit(s, now, part))?);
        }
        Ok(balance::join(done))
    }

    /// Starts agent calls for the actions not already under way; returns how many.
    pub fn dispatch(self: &Arc<Self>) -> Result<usize> {
        let (actions, hosts) = self
            .manager
            .read(|s| (reconcile::actions(s), Arc::new(s.hosts.clone())));
        let mut started = 0;
        for action in actions {
            if !self.inflight().insert(action.vm().to_owned()) {
                continue;
            }
            let me = self.clone();
            let hosts = hosts.clone();
            // The image is read with the spec: a create needs its files' hashes.
            let spec = self.manager.read(|s| {
                s.vms.get(action.vm()).map(|v| {
                    let image = v.spec.image.as_ref().and_then(|i| s.images.get(i).cloned());
                    (v.spec.clone(), image, v.disks_made)
                })
            });
            tokio::spawn(async move {
                let _slot = me.slots.clone().acquire_owned().await;
                let vm = action.vm().to_owned();
                let cmd = match spec {
                    Some((spec, image, reuse)) => {
                        me.perform(&action, &spec, image.as_ref(), reuse, &hosts)
                            .await
                    }
                    None => None,
                };
                let _ = me.done_tx.send((vm, cmd));
            });
            started += 1;
        }
        Ok(started)
    }

    /// Carries out one action; the command that records its answer, if any.
    async fn perform(
        &self,
        action: &Action,
        spec: &crate::state::VmSpec,
        image: Option<&crate::state::Image>,
        reuse_disks: bool,
        hosts: &std::collections::BTreeMap<String, Host>,
    ) -> Option<Command> {
        let client = |name: &str| {
            hosts
                .get(name)
                .ok_or_else(|| crate::Error::UnknownHost(name.to_owned()))
                .and_then(|h| self.agents.client(h))
        };
        match action {
            Action::Create { vm, host } => {
                // Kept with the VM and logged once per reason; the VM is asked again.
                let refused = |step: &str, why: String| {
                    self.warn(
                        &format!("{vm}/create"),
                        format_args!("VM {vm} on {host}: {step}{why}"),
                    );
                    Some(Command::VmStartFailed {
                        vm: vm.clone(),
                        host: host.clone(),
                        error: why,
                    })
                };
                match client(host) {
                    Ok(c) => match c.create_vm(vm, spec, image, reuse_disks).await {
                        Ok(()) => {
                            // The record's, not the dispatched spec's: it may have been set
                            // while the create was under way.
                            let policy = self.recorded_policy(vm).unwrap_or(spec.vcpu_policy);
                            // `none` is what a new QEMU has already.
                            if !policy.is_none() {
                                self.apply_vcpu_policy(c.as_ref(), vm, host, policy).await;
                            }
                            Some(Command::VmStarted {
                                vm: vm.clone(),
                                host: host.clone(),
                            })
                        }
                        Err(e) => refused("create failed: ", e.to_string()),
                    },
                    Err(e) => refused("", e.to_string()),
                }
            }
            Action::Delete { vm, host } => match client(host) {
                Ok(c) => match c.delete_vm(vm).await {
                    Ok(()) => Some(Command::VmRemoved { vm: vm.clone() }),
                    Err(e) => {
                        self.warn(
                            &format!("{vm}/delete"),
                            format_args!("VM {vm} on {host}: delete failed: {e}"),
                        );
                        None
                    }
                },
                Err(e) => {
                    self.warn(
                        &format!("{vm}/delete"),
                        format_args!("VM {vm} on {host}: {e}"),
                    );
                    None
                }
            },
            Action::Migrate {
                id,
                vm,
                from,
                to,
                policy,
            } => {
                let live = self.manager.live();
                let progress = |p: Progress| live.set(*id, p);
                let result = match (client(from), hosts.get(to)) {
                    (Ok(c), Some(dest)) => c
                        .migrate_vm(vm, spec, dest, *policy, &progress)
                        .await
                        .unwrap_or_else(|e| MigrationResult::Failed {
                            error: e.to_string(),
                        }),
                    (Err(e), _) => MigrationResult::Failed {
                        error: e.to_string(),
                    },
                    (_, None) => MigrationResult::Failed {
                        error: format!("destination {to:?} is not registered"),
                    },
                };
                // The source's agent carried the VM's vCPU policy along, as it had it
                // when the migration began; the record's is applied on the destination
                // now, in case it was set meanwhile (the agent applies them in order).
                let recorded = self.recorded_policy(vm);
                if let (MigrationResult::Succeeded { .. }, Some(p)) = (&result, recorded) {
                    if let Ok(c) = client(to) {
                        self.apply_vcpu_policy(c.as_ref(), vm, to, p).await;
                    }
                }
                Some(Command::MigrationDone { id: *id, result })
            }
            Action::Restart { vm, host } => {
                let req = tern_api::manager::VmActionRequest::default();
                let done = match client(host) {
                    Ok(c) => c.act(vm, tern_api::manager::VmAction::Reboot, &req).await,
                    Err(e) => Err(e),
                };
                match done {
                    Ok(()) => Some(Command::GuestRestarted { vm: vm.clone() }),
                    // Still pending: asked again at the next dispatch.
                    Err(e) => {
                        self.warn(
                            &format!("{vm}/restart"),
                            format_args!("VM {vm} on {host}: HA restart failed: {e}"),
                        );
                        None
                    }
                }
            }
        }
    }

    /// VM `vm`'s vCPU policy as recorded now.
    fn recorded_policy(&self, vm: &str) -> Option<VcpuPolicy> {
        self.manager
            .read(|s| s.vms.get(vm).map(|v| v.spec.vcpu_policy))
    }

    /// Applies vCPU policy `policy` to `vm` just started or arrived on `host`. A failure
    /// is logged, not retried: the VM runs, and setting the policy again through the API
    /// applies it.
    async fn apply_vcpu_policy(
        &self,
        client: &dyn crate::client::HostClient,
        vm: &str,
        host: &str,
        policy: VcpuPolicy,
    ) {
        if let Err(e) = client.set_vcpu_policy(vm, policy).await {
            self.warn(
                &format!("{vm}/vcpu-policy"),
                format_args!("VM {vm} on {host}: vCPU policy {policy} not applied: {e}"),
            );
        }
    }

    /// Commits the answers that came back; returns how many.
    pub fn collect(&self) -> Result<usize> {
        let mut done = Vec::new();
        {
            let mut rx = self.done_rx.lock().unwrap_or_else(|e| e.into_inner());
            while let Ok(d) = rx.try_recv() {
                done.push(d);
            }
        }
        let n = done.len();
        let cmds: Vec<Command> = done.iter().filter_map(|(_, c)| c.clone()).collect();
        let results = self.manager.execute_many(cmds)?;
        for r in results {
            if let Err(e) = r {
                tracing::warn!("agent answer not recorded: {e}");
            }
        }
        // Only now: until its result is committed a migration still reads as running.
        for (_, cmd) in &done {
            if let Some(Command::MigrationDone { id, .. }) = cmd {
                self.manager.live().end(*id);
            }
        }
        self.manager
            .read(|s| self.manager.live().retain_running(&s.running));
        let mut inflight = self.inflight();
        for (vm, _) in done {
            inflight.remove(&vm);
        }
        Ok(n)
    }

    /// Dispatches, then waits until every call has answered and is committed.
    pub async fn settle(self: &Arc<Self>) -> Result<usize> {
        let n = self.dispatch()?;
        while !self.inflight().is_empty() {
            tokio::time::sleep(Duration::from_millis(2)).await;
            self.collect()?;
        }
        Ok(n)
    }

    /// One full round (see the module doc), waiting for the agents' answers.
    pub async fn round(self: &Arc<Self>) -> Result<RoundReport> {
        let (reports, unreachable, stale_destroyed) = self.collect_reports().await?;
        self.health()?;
        self.guest_ha()?;
        let plan = self.balance()?;
        let dispatched = self.settle().await?;
        Ok(RoundReport {
            reports,
            unreachable,
            stale_destroyed,
            plan,
            dispatched,
        })
    }

    /// Runs rounds every `interval_s` of the balancer's settings until `shutdown`; agent
    /// answers are committed as they arrive, between rounds too.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        self.manager.reset_leases();
        let leases = tokio::spawn(self.clone().watch_leases());
        // Ends with this loop, whichever way it ends.
        struct Abort(tokio::task::JoinHandle<()>);
        impl Drop for Abort {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _leases = Abort(leases);
        if let Err(e) = self.recover().await {
            tracing::error!("recovery: {e}");
        }
        // Settings stored before `interval_s` had an upper bound may exceed it;
        // clamped, they cannot overflow the deadline.
        let interval = || {
            let s = self.manager.read(|s| s.settings.interval_s);
            Duration::from_secs(s.min(MAX_INTERVAL_S))
        };
        let mut last = tokio::time::Instant::now();
        let mut next = last;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep_until(next) => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {
                    if let Err(e) = self.collect().and_then(|_| self.dispatch()) {
                        if self.warnings.allow("reconcile").is_some() {
                            tracing::error!("reconcile: {e}");
                        }
                    }
                    // A new interval counts from the last round at once: an operator who
                    // shortens an hour's interval must not wait out the hour.
                    if next > last {
                        next = last + interval();
                    }
                    continue;
                }
            }
            last = tokio::time::Instant::now();
            next = last + interval();
            let step = async {
                self.collect_reports().await?;
                self.health()?;
                self.guest_ha()?;
                self.balance()?;
                self.collect()?;
                self.dispatch()
            };
            if let Err(e) = step.await {
                tracing::error!("control round: {e}");
            }
        }
    }
}
