//! The destination side: prepare a VM that waits for its state, receive memory into its
//! own memory file, resume it when the source says so, and clean it up on any failure.
//!
//! ```text
//!  prepare ─► Receiving ──all streams Done──► MemoryComplete ──resume──► Running
//!                 │                                 │
//!                 └── stream error, QEMU died, ─────┴──► Failed (VM destroyed)
//!                     abort, no resume in time
//! ```

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tern_api::guest::Command;
use tern_hv::{HvError, VmState};

use tern_hv::disk::mirror;

use super::disks;
use super::incoming::{self, Expect, Gate, Wanted};
use super::memory::DestMemory;
use super::relay;
use super::session::{Inbound, IncomingPhase, IncomingView, PrepareRequest, Registry, Ticket};
use super::token::stream_token;
use crate::error::AgentError;
use crate::state::AppState;

/// How long the source has to connect its streams after prepare.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(20);
/// A memory stream silent this long means the source or the link is gone. Longer than
/// the source's own timeout: between rounds the source is busy finding changed pages
/// and sends nothing.
const STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// A complete copy that is not resumed within this long is abandoned.
const RESUME_DEADLINE: Duration = Duration::from_secs(60);
/// How long resume waits for QEMU to have loaded the device state.
const DEVICE_STATE_WAIT: Duration = Duration::from_secs(15);
/// How long writing the thaw to the paused guest's channel (a local socket) may take:
/// it is inside the downtime, and a thaw that could not be written is asked again.
const THAW_SEND_TIMEOUT: Duration = Duration::from_millis(200);

fn not_found(id: &str) -> AgentError {
    AgentError::Hv(HvError::UnknownVm(format!("incoming migration {id}")))
}

/// Creates the waiting VM and starts receiving. Nothing is left behind on error.
/// `source`: the host whose certificate asked; with host identities only its
/// certificate may then open the streams.
pub async fn prepare(
    state: &AppState,
    reg: &Arc<Registry>,
    req: PrepareRequest,
    source: Option<String>,
) -> Result<Ticket, AgentError> {
    let started = Instant::now();
    // tern's streams need only the memory file until the device state comes, seconds
    // later: QEMU starts while they run, not before the ticket. QEMU's own migration
    // (native) and the disk exports need it listening first.
    let deferred = !req.native && mirror::local_disks(&req.spec.disks).is_empty();
    let info = match deferred {
        true => {
            state
                .define_incoming_vm(req.vm.as_str(), req.spec.clone())
                .await?
        }
        false => {
            state
                .create_vm(req.vm.as_str(), req.spec.clone(), true, false)
                .await?
        }
    };
    let created_ms = started.elapsed().as_millis() as u64;
    match listen(state, reg, &req, info, source, deferred).await {
        Ok(t) => {
            tracing::debug!(vm = %req.vm, created_ms, deferred, ms = started.elapsed().as_millis() as u64, "incoming VM prepared");
            Ok(t)
        }
        Err(e) => {
            let _ = state.destroy_copy(req.vm.as_str()).await;
            Err(e)
        }
    }
}

/// The migration's one port, on the agent's own address: bound once, port 0, and kept,
/// so nobody can take it between choosing and using it.
fn bind_streams(state: &AppState) -> Result<(std::net::TcpListener, u16), AgentError> {
    let listener = std::net::TcpListener::bind((state.stream_ip, 0))
        .map_err(AgentError::io("binding the migration stream listener"))?;
    let port = listener
        .local_addr()
        .map_err(AgentError::io("binding the migration stream listener"))?
        .port();
    Ok((listener, port))
}

/// Whether the destination's QEMU listens for the device state: `None` while it starts,
/// then how its start ended.
type QemuReady = tokio::sync::watch::Receiver<Option<Result<(), String>>>;

/// Starts the destination's QEMU when `launch` (its VM was only defined), then has it
/// listen for the device state on `device_socket`.
async fn start_qemu(
    state: &AppState,
    vm: &str,
    device_socket: &std::path::Path,
    native: bool,
    launch: bool,
) -> Result<(), AgentError> {
    if launch {
        let started = Instant::now();
        state.hv.launch(vm).await?;
        tracing::debug!(
            vm,
            ms = started.elapsed().as_millis() as u64,
            "destination QEMU started beside the streams"
        );
    }
    // `late-block-activate`: the destination takes the disks of the shared store
    // (their write lock, fresh metadata) only when it is resumed, not when QEMU's
    // stream ends, so a move that fails after that still leaves them to the source.
    let caps = [("x-ignore-shared", !native), ("late-block-activate", true)];
    state.hv.set_migration_capabilities(vm, &caps).await?;
    state
        .hv
        .migrate_incoming(vm, &format!("unix:{}", device_socket.display()))
        .await?;
    Ok(())
}

async fn listen(
    state: &AppState,
    reg: &Arc<Registry>,
    req: &PrepareRequest,
    info: tern_hv::VmInfo,
    source: Option<String>,
    deferred: bool,
) -> Result<Ticket, AgentError> {
    let file = info.memory_file.ok_or_else(|| {
        AgentError::BadRequest(format!(
            "the {} driver keeps no guest memory file: it cannot receive a migration",
            state.hv.kind()
        ))
    })?;
    // Native: QEMU brings the memory itself; no tern memory streams.
    let memory = match req.native {
        true => None,
        false => Some(DestMemory::open(&file, req.spec.memory_mib << 20)?),
    };
    let (listener, port) = bind_streams(state)?;
    let id = reg.new_id("in");
    let device_socket =
        relay::socket_path(&state.host.state_dir, &id).map_err(AgentError::Streams)?;
    let (ready_tx, qemu) = tokio::sync::watch::channel(None);
    match deferred {
        true => {
            let (state, vm, socket) = (state.clone(), req.vm.to_string(), device_socket.clone());
            tokio::spawn(async move {
                let r = start_qemu(&state, &vm, &socket, false, true).await;
                let _ = ready_tx.send(Some(r.map_err(|e| e.to_string())));
            });
        }
        false => {
            start_qemu(state, req.vm.as_str(), &device_socket, req.native, false).await?;
            let _ = ready_tx.send(Some(Ok(())));
        }
    }
    let local = mirror::local_disks(&req.spec.disks);
    let nbd_port = match (local.is_empty(), req.native) {
        (true, _) => None,
        (false, true) => {
            return Err(AgentError::BadRequest(
                "qemu-native moves no local disks: use tern's engine".into(),
            ))
        }
        (false, false) => Some(
            disks::export(state, req.vm.as_str(), &id, &local, source.as_deref())
                .await
                .map_err(AgentError::Streams)?,
        ),
    };
    // The source copies the local disks before it opens its streams.
    let accept_timeout = match nbd_port {
        Some(_) => ACCEPT_TIMEOUT + mirror::READY_TIMEOUT,
        None => ACCEPT_TIMEOUT,
    };
    let token = stream_token()
        .map_err(|e| AgentError::io("drawing a random stream token")(std::io::Error::other(e)))?;
    let ticket = Ticket {
        migration: id.clone(),
        stream_token: token,
        memory_port: if req.native { 0 } else { port },
        device_port: port,
        nbd_port,
    };
    let mut inbound = Inbound::new(req.vm.as_str());
    inbound.source = source.clone();
    inbound.vcpu_policy = req.vcpu_policy;
    inbound.exports_disks = nbd_port.is_some();
    let inbound = Arc::new(inbound);
    let expect = Expect {
        migration: id.clone(),
        token: ticket.stream_token.clone(),
        accept_timeout,
        io_timeout: STREAM_TIMEOUT,
    };
    let wanted = Wanted {
        pages: memory.as_ref().map(DestMemory::pages),
        device: true,
    };
    let (gate, admitted) = Gate::open_secure(
        listener,
        expect.clone(),
        wanted,
        state.stream_tls.clone(),
        source,
    )
    .map_err(AgentError::Streams)?;
    reg.begin_inbound(&id, inbound.clone());
    let receiver = start_receiver(memory, admitted.memory, expect, &inbound);
    let device = admitted.device.map(|rx| {
        let (socket, mut qemu) = (device_socket.clone(), qemu.clone());
        tokio::spawn(async move {
            // The device state goes to QEMU's socket, which a QEMU still starting does
            // not listen on yet.
            let listening = qemu
                .wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|r| r.clone());
            match listening {
                Some(Ok(())) => relay::deliver(socket, rx, accept_timeout).await,
                Some(Err(e)) => Err(super::MigrationError::QemuNotStarted(e)),
                None => Err(super::MigrationError::QemuNotStarted(
                    "its start was dropped".into(),
                )),
            }
        })
    });
    let streams = Streams {
        _gate: gate,
        receiver,
        device,
        device_socket,
        qemu,
    };
    tokio::spawn(supervise(state.clone(), inbound, streams));
    tracing::info!(migration = %id, vm = %req.vm, port, "prepared incoming migration");
    Ok(ticket)
}

type Receiver = tokio::task::JoinHandle<Result<incoming::Received, super::MigrationError>>;
type Delivery = tokio::task::JoinHandle<Result<u64, super::MigrationError>>;

/// What one incoming migration runs besides its VM; the supervisor ends it.
struct Streams {
    /// Open while streams may still be admitted; dropped with the migration.
    _gate: Gate,
    receiver: Option<Receiver>,
    device: Option<Delivery>,
    device_socket: std::path::PathBuf,
    /// The destination QEMU's start, when it runs beside the streams.
    qemu: QemuReady,
}

impl Drop for Streams {
    fn drop(&mut self) {
        if let Some(d) = &self.device {
            d.abort();
        }
        let _ = std::fs::remove_file(&self.device_socket);
    }
}

/// Receives the memory streams into `memory` on a blocking thread; without tern's
/// streams (`qemu-native`) the memory counts as complete at once.
fn start_receiver(
    memory: Option<DestMemory>,
    admitted: std::sync::mpsc::Receiver<incoming::MemoryStream>,
    expect: Expect,
    inbound: &Arc<Inbound>,
) -> Option<Receiver> {
    let Some(mem) = memory else {
        inbound.set(IncomingPhase::MemoryComplete, None);
        return None;
    };
    let inbound = inbound.clone();
    Some(tokio::task::spawn_blocking(move || {
        let got =
            incoming::receive_streams(&admitted, &mem, &expect, &inbound.progress, &inbound.cancel);
        // Marked here, not by the supervisor's next poll: resume waits on it and every
        // millisecond of that wait is downtime.
        if got.is_ok() {
            inbound.set(IncomingPhase::MemoryComplete, None);
        }
        got
    }))
}

/// Watches one incoming migration until it runs or fails; on failure the VM is destroyed.
async fn supervise(state: AppState, inbound: Arc<Inbound>, mut streams: Streams) {
    let mut complete_at: Option<Instant> = None;
    let failure = loop {
        if inbound.resumed.load(Ordering::SeqCst) {
            return;
        }
        if let Some(r) = streams.receiver.as_mut().filter(|r| r.is_finished()) {
            match r.await {
                Ok(Ok(got)) => {
                    tracing::info!(vm = %inbound.vm, bytes = got.bytes, rounds = got.rounds, "guest memory received");
                    inbound.set(IncomingPhase::MemoryComplete, None);
                    complete_at = Some(Instant::now());
                    streams.receiver = None;
                }
                Ok(Err(e)) => break e.to_string(),
                Err(e) => break format!("receiver task: {e}"),
            }
        }
        if let Some(d) = streams.device.as_mut().filter(|d| d.is_finished()) {
            match d.await {
                Ok(Ok(bytes)) => tracing::debug!(vm = %inbound.vm, bytes, "device state relayed"),
                Ok(Err(e)) => break e.to_string(),
                Err(e) => break format!("device-state relay task: {e}"),
            }
            streams.device = None;
        }
        if inbound.cancel.load(Ordering::SeqCst) {
            break "aborted".into();
        }
        let qemu_up = match streams.qemu.borrow().clone() {
            Some(Err(e)) => break format!("starting the destination QEMU: {e}"),
            Some(Ok(())) => true,
            None => false,
        };
        if complete_at.is_some_and(|t| t.elapsed() > RESUME_DEADLINE) {
            break format!("not resumed within {RESUME_DEADLINE:?} of the memory arriving");
        }
        // A QEMU still starting has no process to watch, and its VM waits for it.
        if qemu_up {
            match state.hv.refresh(&inbound.vm).await {
                Ok(info) if info.state == VmState::Stopped || info.pid.is_none() => {
                    break "the destination QEMU exited".into()
                }
                Err(HvError::UnknownVm(_)) => break "the destination VM is gone".into(),
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _gate = inbound.gate.lock().await;
    if inbound.resumed.load(Ordering::SeqCst) {
        return;
    }
    inbound.cancel.store(true, Ordering::SeqCst);
    tracing::warn!(vm = %inbound.vm, reason = %failure, "incoming migration failed; destroying the destination VM");
    inbound.set(IncomingPhase::Failed, Some(failure));
    if let Err(e) = state.destroy_copy(&inbound.vm).await {
        tracing::warn!(vm = %inbound.vm, error = %e, "could not destroy the destination VM");
    }
}

fn get(reg: &Registry, id: &str) -> Result<Arc<Inbound>, AgentError> {
    reg.inbound
        .lock()
        .expect("registry lock")
        .get(id)
        .cloned()
        .ok_or_else(|| not_found(id))
}

/// The host that prepared incoming migration `id`, when a host's certificate did.
pub fn source_of(reg: &Registry, id: &str) -> Result<Option<String>, AgentError> {
    Ok(get(reg, id)?.source.clone())
}

pub fn show(reg: &Registry, id: &str) -> Result<IncomingView, AgentError> {
    Ok(get(reg, id)?.view(id))
}

/// Runs the destination VM once its memory and device state are in.
pub async fn resume(
    state: &AppState,
    reg: &Registry,
    id: &str,
    thaw: bool,
) -> Result<IncomingView, AgentError> {
    let inbound = get(reg, id)?;
    let _gate = inbound.gate.lock().await;
    let deadline = Instant::now() + DEVICE_STATE_WAIT;
    loop {
        let (phase, error) = inbound.phase.lock().expect("incoming phase lock").clone();
        match phase {
            IncomingPhase::Running => return Ok(inbound.view(id)),
            IncomingPhase::Failed => {
                return Err(AgentError::BadRequest(format!(
                    "migration {id} failed: {}",
                    error.unwrap_or_default()
                )))
            }
            IncomingPhase::MemoryComplete => {
                let info = state.hv.refresh(&inbound.vm).await?;
                if info.state == VmState::Paused {
                    break;
                }
            }
            IncomingPhase::Receiving => {}
        }
        if Instant::now() > deadline {
            return Err(AgentError::Hv(HvError::Timeout {
                command: format!("waiting for the device state of migration {id}"),
                ms: DEVICE_STATE_WAIT.as_millis() as u64,
            }));
        }
        // The source sends resume together with the device state: this wait is downtime.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    if inbound.exports_disks {
        // The source's mirror ended inside its pause; nobody may write to the disks
        // once the guest runs on them.
        disks::unexport(state, &inbound.vm, id)
            .await
            .map_err(AgentError::Streams)?;
    }
    // The thaw is written to the guest's channel while the VM is still paused: the
    // guest reads it the moment it runs, and the channel stays open across the move
    // (opening it after the resume costs the guest a hang-up and a reconnect first).
    let sent = match thaw {
        true => Some(
            state
                .send_guest(&inbound.vm, &Command::Thaw, THAW_SEND_TIMEOUT)
                .await,
        ),
        false => None,
    };
    state.hv.resume(&inbound.vm).await?;
    state.incoming_resumed(&inbound.vm);
    inbound.resumed.store(true, Ordering::SeqCst);
    inbound.set(IncomingPhase::Running, None);
    // Its answer is collected here, not a round trip later when the source asks for
    // it; not waited for, since this answer ends the downtime.
    if let Some(sent) = sent {
        let sent = sent
            .inspect_err(|e| tracing::debug!(vm = %inbound.vm, error = %e, "the thaw could not be written before the resume; asking after it"))
            .ok();
        let (state, held) = (state.clone(), inbound.clone());
        tokio::spawn(async move {
            held.thaw
                .get_or_init(|| thaw_guest(&state, &held.vm, sent))
                .await;
        });
    }
    // The policy the VM had on the source, applied once it runs here; not waited for,
    // since this answer ends the source's downtime, and a policy this host cannot apply
    // (logged) does not undo a migration whose VM already runs here.
    if !inbound.vcpu_policy.is_none() {
        state
            .set_vcpu_policy_soon(&inbound.vm, inbound.vcpu_policy)
            .await;
    }
    Ok(inbound.view(id))
}

/// Thaws the guest of a migration whose VM runs here (the source froze it for a
/// `dependency-aware` pre-copy). A thaw the resume started is waited for and its
/// outcome answered; one that failed is tried again.
pub async fn thaw(
    state: &AppState,
    reg: &Registry,
    id: &str,
) -> Result<tern_api::guest::ThawReport, AgentError> {
    let inbound = get(reg, id)?;
    if !inbound.resumed.load(Ordering::SeqCst) {
        return Err(AgentError::BadRequest(format!(
            "migration {id} has not resumed its VM here: its guest is thawed by the source"
        )));
    }
    let asked = Instant::now();
    let held = inbound
        .thaw
        .get_or_init(|| thaw_guest(state, &inbound.vm, None))
        .await;
    let thawed = match held {
        Ok(r) => Ok(r.clone()),
        Err(_) => super::freeze::thaw(state, &inbound.vm).await,
    };
    tracing::debug!(vm = %inbound.vm, ms = asked.elapsed().as_millis() as u64, ok = thawed.is_ok(), "the guest's thaw answered");
    thawed
}

/// Thaws the guest of `vm` here, `sent` (a thaw written before the resume) being the
/// first try; the outcome kept as text (it is answered twice).
async fn thaw_guest(
    state: &AppState,
    vm: &str,
    sent: Option<crate::guest::Pending>,
) -> Result<tern_api::guest::ThawReport, String> {
    let started = Instant::now();
    let r = super::freeze::thaw_after(state, vm, sent)
        .await
        .map_err(|e| e.to_string());
    tracing::debug!(
        vm,
        ms = started.elapsed().as_millis() as u64,
        ok = r.is_ok(),
        "guest asked to thaw"
    );
    r
}

/// Abandons an incoming migration: the waiting VM is destroyed. Refused once the VM runs
/// here, because then it is the only copy.
pub async fn abort(state: &AppState, reg: &Registry, id: &str) -> Result<IncomingView, AgentError> {
    let inbound = get(reg, id)?;
    let _gate = inbound.gate.lock().await;
    if inbound.resumed.load(Ordering::SeqCst) {
        return Err(AgentError::Hv(HvError::Conflict {
            id: inbound.vm.clone(),
            action: "abort the migration of",
            state: VmState::Running,
        }));
    }
    inbound.cancel.store(true, Ordering::SeqCst);
    if inbound.phase.lock().expect("incoming phase lock").0 != IncomingPhase::Failed {
        inbound.set(IncomingPhase::Failed, Some("aborted by the source".into()));
        match state.destroy_copy(&inbound.vm).await {
            Ok(()) | Err(AgentError::Hv(HvError::UnknownVm(_))) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(inbound.view(id))
}
