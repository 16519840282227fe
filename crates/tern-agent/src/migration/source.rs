//! The source side: one straight-line driver over the phases of [`Phase`], and one
//! rollback path. Whatever fails, the VM ends running here, the destination is told to
//! clean up, and the VM never runs on both hosts: the source resumes only while the
//! destination is known not to run it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_hv::{HvError, VmState};
use tern_migrate::{Policy, PolicyKind};

use super::memory::{changed_pages, SentDigests, SourceMemory};
use super::outgoing::{Outgoing, StreamOptions};
use super::precopy::{self, PrecopyConfig};
use super::session::{
    Engine, MigrationResult, Outbound, Phase, PrepareRequest, SendRequest, Ticket,
};
use super::throttle::CgroupThrottle;
use super::MigrationError;
use crate::client::AgentClient;
use crate::state::AppState;

/// How long QEMU may take to carry the device state.
const DEVICE_STATE_TIMEOUT: Duration = Duration::from_secs(15);

/// What rollback needs to know about how far the migration got.
#[derive(Default)]
struct Reached {
    ticket: Option<Ticket>,
    paused: bool,
    device_state_started: bool,
    /// The destination may have resumed the VM: it must be confirmed gone first.
    resume_sent: bool,
}

/// Runs one migration to its end and records the outcome in `job`.
pub async fn run(state: AppState, job: Arc<Outbound>, req: SendRequest, engine: Engine) {
    let mut reached = Reached::default();
    let dest = match AgentClient::new(&req.destination, &req.token, Duration::from_secs(30)) {
        Ok(d) => d,
        Err(e) => return fail(&job, e.to_string()),
    };
    let driven = match engine {
        Engine::Tern(policy) => drive(&state, &job, &req, policy, &dest, &mut reached).await,
        Engine::QemuNative { auto_converge } => {
            drive_native(&state, &job, &req, auto_converge, &dest, &mut reached).await
        }
    };
    match driven {
        Ok(result) => {
            let mut v = job.view.lock().expect("migration view lock");
            v.result = Some(result);
            v.phase = Phase::Completed;
        }
        Err(e) => {
            tracing::warn!(vm = %req.vm, error = %e, "migration failed; rolling back");
            let rolled = rollback(&state, &req.vm, &dest, &reached).await;
            let msg = match rolled {
                Ok(()) => e.to_string(),
                Err(r) => format!("{e}; rollback: {r}"),
            };
            fail(&job, msg);
        }
    }
}

fn fail(job: &Outbound, error: String) {
    let mut v = job.view.lock().expect("migration view lock");
    v.error = Some(error);
    v.phase = Phase::RolledBack;
}

fn agent_err(e: crate::client::ClientError) -> MigrationError {
    MigrationError::Peer(e.to_string())
}

fn hv_err(e: HvError) -> MigrationError {
    MigrationError::Vm(e.to_string())
}

async fn drive(
    state: &AppState,
    job: &Arc<Outbound>,
    req: &SendRequest,
    policy: PolicyKind,
    dest: &AgentClient,
    reached: &mut Reached,
) -> Result<MigrationResult, MigrationError> {
    let vm = req.vm.as_str();
    let started = Instant::now();
    let info = state.hv.info(vm).await.map_err(hv_err)?;
    let file = info
        .memory_file
        .clone()
        .ok_or_else(|| MigrationError::Vm(format!("VM {vm} has no guest memory file")))?;
    let mem = SourceMemory::open(&file)?;

    job.set_phase(Phase::Preparing);
    let (ticket, host) = prepare_destination(vm, &info, false, req, dest, reached).await?;
    let memory_addr = tokio::net::lookup_host((host.as_str(), ticket.memory_port))
        .await
        .map_err(|e| MigrationError::Link(format!("resolving {host}: {e}")))?
        .next()
        .ok_or_else(|| MigrationError::Link(format!("{host} has no address")))?;

    job.set_phase(Phase::Connecting);
    let tids = state.hv.vcpu_threads(vm).await.unwrap_or_default();
    let opts = StreamOptions {
        streams: usize::from(req.options.streams),
        lz4: req.options.compress,
        rate_bytes_per_s: req.options.max_mbit.map(|m| m * 1_000_000 / 8),
        ..StreamOptions::default()
    };
    let cfg = PrecopyConfig {
        limits_downtime_s: req.options.downtime_limit_ms as f64 / 1000.0,
        max_elapsed_s: req.options.max_precopy_s,
        initial_bandwidth_bytes_per_s: opts.rate_bytes_per_s.map_or(
            PrecopyConfig::default().initial_bandwidth_bytes_per_s,
            |r| r as f64,
        ),
        ..PrecopyConfig::default()
    };
    let live = {
        let job = job.clone();
        let ticket = ticket.clone();
        let vm = vm.to_string();
        let pid = info.pid;
        tokio::task::spawn_blocking(move || -> Result<_, MigrationError> {
            let live_started = Instant::now();
            let mut out = Outgoing::connect(
                memory_addr,
                &ticket.migration,
                &ticket.stream_token,
                mem.pages(),
                opts,
            )?
            .with_meter(job.meter.clone());
            job.set_phase(Phase::PreCopy);
            let sent = SentDigests::new(mem.pages());
            let mut throttle = CgroupThrottle::new(&vm, pid, tids);
            let on_round = &mut |t: &tern_migrate::RoundTelemetry| {
                job.view
                    .lock()
                    .expect("migration view lock")
                    .rounds
                    .push(t.clone())
            };
            let outcome = precopy::run(
                &mut out,
                &mem,
                &sent,
                &policy as &dyn Policy,
                &cfg,
                &mut throttle,
                &job.cancel,
                on_round,
            );
            match outcome {
                Ok(o) => Ok((out, mem, sent, o, throttle, live_started)),
                Err(e) => {
                    out.abort(&e.to_string());
                    Err(e)
                }
            }
        })
    };
    let (out, mem, sent, outcome, throttle, live_started) = live
        .await
        .map_err(|e| MigrationError::Vm(format!("pre-copy task: {e}")))??;
    check_cancel(job)?;

    // Set while the guest still runs: one QMP round trip less in the downtime. It only
    // shapes a migration that has not started; QEMU's own engine sets it back.
    state
        .hv
        .set_migration_capabilities(vm, &[("x-ignore-shared", true)])
        .await
        .map_err(hv_err)?;
    job.set_phase(Phase::StopAndCopy);
    state.hv.pause(vm).await.map_err(hv_err)?;
    reached.paused = true;
    let paused_at = Instant::now();
    // The guest is stopped: the throttle has nothing left to slow.
    drop(throttle);
    let final_round = outcome.history.len() as u32 + 1;
    let cancel_job = job.clone();
    let final_bytes = tokio::task::spawn_blocking(move || -> Result<u64, MigrationError> {
        let mut out = out;
        let pages = changed_pages(&mem, &sent, 2);
        // Nothing changed (an idle guest): the last round's acknowledgement already
        // proved the destination has everything; only `Done` is left to say.
        let bytes = if pages.is_empty() {
            0
        } else {
            out.meter().begin(
                final_round,
                pages.len() as u64,
                live_started.elapsed().as_secs_f64(),
            );
            let t = out.send_round(final_round, &mem, &sent, &pages, &cancel_job.cancel);
            out.meter().end();
            t?.bytes
        };
        out.finish()?;
        Ok(bytes)
    })
    .await
    .map_err(|e| MigrationError::Vm(format!("final pass task: {e}")))??;

    let final_pass_ms = paused_at.elapsed().as_millis() as u64;
    job.set_phase(Phase::DeviceState);
    reached.device_state_started = true;
    state
        .hv
        .migrate(vm, &format!("tcp:{host}:{}", ticket.device_port))
        .await
        .map_err(hv_err)?;
    // The resume request goes out with the device state, not after it: the destination
    // runs the guest the moment QEMU has loaded the state, which saves a round trip and
    // a poll interval of downtime. Its answer alone says whether the VM runs there; a
    // failed request goes through rollback, which confirms the destination is not
    // running it before the source resumes.
    job.set_phase(Phase::Resuming);
    let device = async {
        let got = wait_device_state(state, vm).await;
        (got, paused_at.elapsed().as_millis() as u64)
    };
    let ((device, device_done_ms), resumed) =
        tokio::join!(device, resume_destination(dest, &ticket, reached));
    resumed?;
    let device_bytes = device.unwrap_or_else(|e| {
        tracing::warn!(vm, error = %e, "destination runs, but QEMU's device-state status is unknown");
        0
    });
    let device_ms = device_done_ms.saturating_sub(final_pass_ms);
    // The downtime ends when the destination runs; tearing down the stale source copy
    // (QEMU exit, freeing its memory file) happens while the guest already runs there.
    let downtime = paused_at.elapsed();
    destroy_source(state, vm).await;
    let total = started.elapsed();
    let resume_ms = (downtime.as_millis() as u64).saturating_sub(final_pass_ms + device_ms);
    Ok(MigrationResult {
        total_ms: total.as_millis() as u64,
        downtime_ms: downtime.as_millis() as u64,
        bytes: outcome.bytes + final_bytes + device_bytes,
        rounds: outcome.history.len() as u32,
        nonzero_bytes: Some(outcome.nonzero_pages * super::wire::PAGE_SIZE as u64),
        converged: outcome.stop_reason.converged(),
        policy: policy.as_str().to_string(),
        stop_reason: outcome.stop_reason,
        max_throttle_percent: outcome.max_throttle_percent,
        downtime_parts_ms: Some([final_pass_ms, device_ms, resume_ms]),
        guest_ok: None,
    })
}

/// Asks the destination to prepare; returns its ticket and its host name.
async fn prepare_destination(
    vm: &str,
    info: &tern_hv::VmInfo,
    native: bool,
    req: &SendRequest,
    dest: &AgentClient,
    reached: &mut Reached,
) -> Result<(Ticket, String), MigrationError> {
    let prepare = PrepareRequest {
        vm: vm.to_string(),
        spec: info.spec.clone(),
        native,
    };
    let ticket = dest.prepare_incoming(&prepare).await.map_err(agent_err)?;
    reached.ticket = Some(ticket.clone());
    let host = reqwest::Url::parse(&req.destination)
        .ok()
        .and_then(|u| u.host_str().map(str::to_string))
        .ok_or_else(|| MigrationError::Link(format!("no host in {}", req.destination)))?;
    Ok((
        ticket,
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    ))
}

/// QEMU's own migration of the whole VM, for comparison: QEMU decides everything; tern
/// only starts it, bounds it in time and resumes the destination.
async fn drive_native(
    state: &AppState,
    job: &Arc<Outbound>,
    req: &SendRequest,
    auto_converge: bool,
    dest: &AgentClient,
    reached: &mut Reached,
) -> Result<MigrationResult, MigrationError> {
    let vm = req.vm.as_str();
    let started = Instant::now();
    let info = state.hv.info(vm).await.map_err(hv_err)?;
    job.set_phase(Phase::Preparing);
    let (ticket, host) = prepare_destination(vm, &info, true, req, dest, reached).await?;
    job.set_phase(Phase::PreCopy);
    state
        .hv
        .set_migration_capabilities(
            vm,
            &[("x-ignore-shared", false), ("auto-converge", auto_converge)],
        )
        .await
        .map_err(hv_err)?;
    reached.device_state_started = true;
    state
        .hv
        .migrate(vm, &format!("tcp:{host}:{}", ticket.device_port))
        .await
        .map_err(hv_err)?;
    let limit = Duration::from_secs_f64(req.options.max_precopy_s);
    let st = loop {
        let st = state.hv.query_migrate(vm).await.map_err(hv_err)?;
        match st.status.as_str() {
            "completed" => break st,
            "failed" | "cancelled" => {
                return Err(MigrationError::Vm(format!(
                    "QEMU migration {}: {}",
                    st.status,
                    st.error.unwrap_or_default()
                )))
            }
            _ => {}
        }
        check_cancel(job)?;
        if started.elapsed() > limit {
            return Err(MigrationError::Timeout(format!(
                "QEMU's migration did not converge within {limit:?} ({} bytes sent)",
                st.transferred_bytes
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // QEMU paused the source to finish; from here the destination must run, or rollback.
    reached.paused = true;
    let pause_seen = Instant::now();
    job.set_phase(Phase::Resuming);
    resume_destination(dest, &ticket, reached).await?;
    let resume_ms = pause_seen.elapsed().as_millis() as u64;
    destroy_source(state, vm).await;
    Ok(MigrationResult {
        total_ms: started.elapsed().as_millis() as u64,
        // QEMU's own downtime ends when its destination could run; tern's resume adds to it.
        downtime_ms: st.downtime_ms.unwrap_or(0) + resume_ms,
        bytes: st.transferred_bytes,
        rounds: 0,
        nonzero_bytes: None,
        converged: true,
        policy: Engine::QemuNative { auto_converge }.name().to_string(),
        stop_reason: tern_migrate::StopReason::FitsDowntime,
        max_throttle_percent: 0,
        downtime_parts_ms: None,
        guest_ok: None,
    })
}

/// Runs the VM on the destination; from a successful return on, it runs there.
async fn resume_destination(
    dest: &AgentClient,
    ticket: &Ticket,
    reached: &mut Reached,
) -> Result<(), MigrationError> {
    reached.resume_sent = true;
    dest.resume_incoming(&ticket.migration)
        .await
        .map_err(agent_err)?;
    Ok(())
}

/// Destroys the stale source copy once the destination runs the VM.
async fn destroy_source(state: &AppState, vm: &str) {
    if let Err(e) = state.destroy_vm(vm).await {
        tracing::warn!(vm, error = %e, "migrated, but the source VM could not be destroyed");
    }
}

fn check_cancel(job: &Outbound) -> Result<(), MigrationError> {
    if job.cancel.load(Ordering::SeqCst) {
        Err(MigrationError::Cancelled)
    } else {
        Ok(())
    }
}

/// Polls QEMU until the device state is through; returns the bytes QEMU sent.
async fn wait_device_state(state: &AppState, vm: &str) -> Result<u64, MigrationError> {
    let deadline = Instant::now() + DEVICE_STATE_TIMEOUT;
    loop {
        let st = state.hv.query_migrate(vm).await.map_err(hv_err)?;
        match st.status.as_str() {
            "completed" => return Ok(st.transferred_bytes),
            "failed" | "cancelled" => {
                return Err(MigrationError::Vm(format!(
                    "QEMU device-state migration {}: {}",
                    st.status,
                    st.error.unwrap_or_default()
                )));
            }
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(MigrationError::Timeout(format!(
                "device state not through after {DEVICE_STATE_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The one rollback path: destination cleaned up, source running.
async fn rollback(
    state: &AppState,
    vm: &str,
    dest: &AgentClient,
    reached: &Reached,
) -> Result<(), String> {
    if reached.device_state_started {
        let _ = state.hv.migrate_cancel(vm).await;
    }
    let mut dest_gone = !reached.resume_sent;
    if let Some(ticket) = &reached.ticket {
        // A destination that may have resumed must confirm it is gone before the source
        // runs again; a few tries cover a short link outage.
        for attempt in 0..5 {
            match dest.abort_incoming(&ticket.migration).await {
                Ok(_) => {
                    dest_gone = true;
                    break;
                }
                Err(e) if e.is_not_found() => {
                    dest_gone = true;
                    break;
                }
                Err(e) => {
                    tracing::warn!(attempt, error = %e, "could not reach the destination to abort");
                    if !reached.resume_sent {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
    if !dest_gone {
        return Err("the destination may be running the VM and could not be reached: the source stays paused".into());
    }
    if reached.paused {
        match state.hv.info(vm).await {
            Ok(i) if i.state == VmState::Running => {}
            _ => {
                state
                    .hv
                    .resume(vm)
                    .await
                    .map_err(|e| format!("resuming the source: {e}"))?;
            }
        }
    }
    Ok(())
}
