//! The lifecycle actions that take time: a stop that asks the guest to power off before
//! it powers the VM off, and suspend to disk and restore (see `docs/agent-api.md`,
//! "Stop, suspend and restore").
//!
//! Suspend and restore reuse the live migration's way of moving a VM with its memory
//! in a shared file: the guest's RAM is copied as a file, and QEMU's own migration
//! carries only the CPU and device state (`x-ignore-shared`), through a unix socket in
//! the agent's private migration directory that the agent pumps to or from the store.
//!
//! ```text
//! suspend: pause ─► migrate unix:S (device state) ─► pump S → suspend.partial/device-state
//!          ─► copy RAM file → suspend.partial/memory ─► sync, rename to suspend/ ─► quit QEMU
//! restore: claim suspend/ ─► QEMU -incoming defer ─► copy memory → RAM file
//!          ─► migrate-incoming unix:S ◄─ pump device-state ─► paused ─► cont ─► remove claim
//! ```
//! A failed suspend resumes the guest (if it ran) and leaves no saved state; a failed
//! restore ends the waiting QEMU and gives the saved state back, so the VM is as it was.

use crate::error::AgentError;
use crate::migration::{relay, source, MigrationError};
use crate::state::AppState;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tern_api::agent::{SavedStateAnswer, StopAnswer, StopOutcome, StopRequest};
use tern_hv::disk::Store;
use tern_hv::saved::{self, Claimed, Writing};
use tern_hv::state::transition;
use tern_hv::{Action, HvError, VmInfo, VmState};

/// How long the guest agent gets to acknowledge a `poweroff` request.
const GUEST_POWEROFF_ASK: Duration = Duration::from_secs(3);
/// How long QEMU gets to connect to the socket its device state goes to, and to
/// finish writing it.
const DEVICE_STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a copy of guest memory to or from the store may take (a 16 GiB guest at
/// 100 MB/s).
const MEMORY_COPY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a restoring QEMU gets to load the device state once it has it all.
const LOAD_TIMEOUT: Duration = Duration::from_secs(60);

/// What a stop does, decided from the request and the VM's state (pure): ask the guest
/// only when one runs and may be asked.
pub fn asks_guest(req: &StopRequest, state: VmState) -> bool {
    !req.force && state == VmState::Running
}

fn conflict(id: &str, action: Action, state: VmState) -> AgentError {
    AgentError::Hv(HvError::Conflict {
        id: id.to_string(),
        action: action.verb(),
        state,
    })
}

fn saving(vm: &str, step: &'static str) -> impl FnOnce(MigrationError) -> AgentError {
    let vm = vm.to_string();
    move |source| AgentError::SavedState {
        vm,
        step,
        source: Box::new(source),
    }
}

fn relay_err(vm: &str, step: &'static str) -> impl FnOnce(std::io::Error) -> AgentError {
    let vm = vm.to_string();
    move |source| saving(&vm, step)(MigrationError::Relay { step, source })
}

impl AppState {
    fn store_for(&self, id: &str, what: &str) -> Result<&Store, AgentError> {
        self.store.as_ref().ok_or_else(|| {
            AgentError::BadRequest(format!(
                "cannot {what} VM {id:?}: this host has no disk store (--store), where saved VM state lives"
            ))
        })
    }

    /// Powers VM `id` off: unless `force`, asks the guest first (the ACPI power button,
    /// and the guest agent's `poweroff` where it answers) and waits up to the timeout
    /// for it to power itself off; then, or at once, ends its process. The disks and
    /// the definition stay.
    pub async fn stop_vm(&self, id: &str, req: StopRequest) -> Result<StopAnswer, AgentError> {
        let timeout = req.timeout().map_err(AgentError::BadRequest)?;
        let _busy = self.begin_long(id, "stop").await?;
        let t0 = Instant::now();
        let info = self.hv.refresh(id).await?;
        if transition(info.state, Action::Stop).is_none() {
            return Err(conflict(id, Action::Stop, info.state));
        }
        let off = match asks_guest(&req, info.state) {
            true => self.ask_guest_off(id, &info, t0 + timeout).await,
            false => None,
        };
        let (info, stopped) = match off {
            Some(info) => (info, StopOutcome::Graceful),
            None => match self.hv.stop(id).await {
                Ok(info) => (info, StopOutcome::Forced),
                // The guest made it off between the last look and the power-off.
                Err(HvError::Conflict {
                    state: VmState::Stopped,
                    ..
                }) => (self.hv.info(id).await?, StopOutcome::Graceful),
                Err(e) => return Err(e.into()),
            },
        };
        self.guests.forget(id);
        Ok(StopAnswer {
            vm: self.view(info),
            stopped,
            took_ms: t0.elapsed().as_millis() as u64,
        })
    }

    /// Asks the guest to power off and waits until `deadline`; the VM's info when it
    /// did. Failures to ask are not errors: the guest may lack ACPI or a guest agent,
    /// which is what the power-off after the timeout is for.
    async fn ask_guest_off(&self, id: &str, info: &VmInfo, deadline: Instant) -> Option<VmInfo> {
        if let Err(e) = self.hv.powerdown(id).await {
            tracing::info!(vm = id, error = %e, "ACPI power button not pressed");
        }
        if let Some(socket) = &info.control_socket {
            let ask = GUEST_POWEROFF_ASK.min(deadline.saturating_duration_since(Instant::now()));
            let req = json!({ "cmd": "poweroff" });
            if let Err(e) = self.guests.request(id, socket, req, ask).await {
                tracing::info!(vm = id, error = %e, "the guest agent did not take the poweroff");
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.hv.wait_stopped(id, left).await {
            Ok(info) if info.state == VmState::Stopped => Some(info),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(vm = id, error = %e, "waiting for the guest to power off");
                None
            }
        }
    }

    /// Saves VM `id`'s memory and device state to the store and ends its process; the
    /// VM is then `suspended`. On failure nothing is saved and a guest that ran runs on.
    pub async fn suspend_vm(&self, id: &str) -> Result<SavedStateAnswer, AgentError> {
        let _busy = self.begin_long(id, "suspend").await?;
        let t0 = Instant::now();
        let store = self.store_for(id, "suspend")?;
        let info = self.hv.refresh(id).await?;
        if transition(info.state, Action::Suspend).is_none() {
            return Err(conflict(id, Action::Suspend, info.state));
        }
        let memory = info.memory_file.clone().ok_or_else(|| {
            AgentError::BadRequest(format!(
                "the {} driver keeps no guest memory file: it cannot suspend a VM",
                self.hv.kind()
            ))
        })?;
        let writing = saved::begin(store, id).map_err(HvError::from)?;
        let was_running = info.state == VmState::Running;
        let saved = match self.save(id, &info, &memory, &writing).await {
            Ok(bytes) => writing
                .commit()
                .map(|_| bytes)
                .map_err(|e| AgentError::Hv(e.into())),
            Err(e) => {
                writing.abandon();
                Err(e)
            }
        };
        let (memory_bytes, device_state_bytes) = match saved {
            Ok(bytes) => bytes,
            Err(e) => {
                // The guest ran before: it runs on (`cont` takes its disks back too).
                if was_running {
                    if let Err(r) = self.hv.resume(id).await {
                        tracing::error!(vm = id, error = %r, "suspend failed and the VM could not be resumed");
                    }
                }
                return Err(e);
            }
        };
        let info = self.hv.suspended(id).await?;
        self.guests.forget(id);
        Ok(SavedStateAnswer {
            vm: self.view(info),
            memory_bytes,
            device_state_bytes,
            took_ms: t0.elapsed().as_millis() as u64,
        })
    }

    /// Pauses the guest and writes its state into `writing`; the bytes of memory and of
    /// device state written.
    async fn save(
        &self,
        id: &str,
        info: &VmInfo,
        memory: &Path,
        writing: &Writing,
    ) -> Result<(u64, u64), AgentError> {
        if info.state == VmState::Running {
            self.hv.pause(id).await?;
        }
        writing
            .write_spec(&info.spec, &self.host.name)
            .map_err(HvError::from)?;
        self.hv
            .set_migration_capabilities(id, &[("x-ignore-shared", true)])
            .await?;
        let device = self
            .save_device_state(id, &writing.device_state_path())
            .await?;
        let memory_bytes = copy_memory(id, memory, &writing.memory_path()).await?;
        Ok((memory_bytes, device))
    }

    /// QEMU's migration of the paused VM (device state only) into `path`, through a
    /// private unix socket.
    async fn save_device_state(&self, id: &str, path: &Path) -> Result<u64, AgentError> {
        let socket = relay::socket_path(&self.host.state_dir, &format!("suspend-{id}"))
            .map_err(saving(id, "the device-state socket"))?;
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket)
            .map_err(relay_err(id, "listening for QEMU's device state"))?;
        let _socket = RemoveOnDrop(socket.clone());
        let file = tokio::fs::File::create(path)
            .await
            .map_err(relay_err(id, "creating the device-state file"))?;
        let pump = tokio::spawn(async move {
            let (qemu, _) = tokio::time::timeout(DEVICE_STATE_TIMEOUT, listener.accept())
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
            relay::pump(qemu, file).await
        });
        let mut pump = AbortOnDrop(pump);
        let uri = format!("unix:{}", socket.display());
        if let Err(e) = self.hv.migrate(id, &uri).await {
            return Err(e.into());
        }
        if let Err(e) = source::wait_device_state(self, id).await {
            let _ = self.hv.migrate_cancel(id).await;
            return Err(saving(id, "saving the device state")(e));
        }
        let written = tokio::time::timeout(DEVICE_STATE_TIMEOUT, pump.join())
            .await
            .map_err(|_| {
                saving(id, "writing the device state")(MigrationError::DeviceStateTimeout(
                    DEVICE_STATE_TIMEOUT,
                ))
            })?;
        written.map_err(relay_err(id, "writing the device state"))
    }

    /// Runs a suspended VM again from its saved state: on this host if it is suspended
    /// here, or, on any host sharing the store, defined from the saved spec with the
    /// disks as they are. The saved state is removed once the guest runs; on failure it
    /// is given back and the VM is suspended as before (here) or absent (elsewhere).
    pub async fn restore_vm(&self, id: &str) -> Result<SavedStateAnswer, AgentError> {
        let _busy = self.begin_long(id, "restore").await?;
        let t0 = Instant::now();
        let store = self.store_for(id, "restore")?;
        let known = match self.hv.info(id).await {
            Ok(info) => Some(info),
            Err(HvError::UnknownVm(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(info) = &known {
            if transition(info.state, Action::Restore).is_none() {
                return Err(conflict(id, Action::Restore, info.state));
            }
        }
        let claimed = saved::claim(store, id, &self.host.name).map_err(HvError::from)?;
        match self.load(id, known.is_some(), &claimed).await {
            Ok((info, memory_bytes, device_state_bytes)) => {
                claimed.remove();
                Ok(SavedStateAnswer {
                    vm: self.view(info),
                    memory_bytes,
                    device_state_bytes,
                    took_ms: t0.elapsed().as_millis() as u64,
                })
            }
            Err(e) => {
                let undone = match known {
                    Some(_) => self
                        .hv
                        .abandon_restore(id)
                        .await
                        .map(drop)
                        .map_err(Into::into),
                    None => self.destroy_copy(id).await.or_else(|e| match e {
                        // Failed before the VM was defined here.
                        AgentError::Hv(HvError::UnknownVm(_)) => Ok(()),
                        e => Err(e),
                    }),
                };
                if let Err(u) = undone {
                    tracing::error!(vm = id, error = %u, "restore failed and could not be undone");
                }
                if let Err(r) = claimed.release() {
                    tracing::error!(vm = id, error = %r, "restore failed and its saved state could not be given back");
                }
                self.guests.forget(id);
                Err(e)
            }
        }
    }

    /// Starts the VM's QEMU waiting for its state, feeds it the saved memory and device
    /// state and runs it; the info and the bytes of memory and device state loaded.
    async fn load(
        &self,
        id: &str,
        known: bool,
        claimed: &Claimed,
    ) -> Result<(VmInfo, u64, u64), AgentError> {
        let info = match known {
            true => self.hv.restore(id).await?,
            false => {
                let spec = claimed.spec().map_err(HvError::from)?;
                self.create_vm(id, spec, true, false).await?
            }
        };
        let memory = info.memory_file.clone().ok_or_else(|| {
            AgentError::BadRequest(format!(
                "the {} driver keeps no guest memory file: it cannot restore a VM",
                self.hv.kind()
            ))
        })?;
        // As a migration destination: QEMU leaves RAM to tern, and takes the disks
        // (their locks, fresh metadata) only when the guest is resumed.
        let caps = [("x-ignore-shared", true), ("late-block-activate", true)];
        self.hv.set_migration_capabilities(id, &caps).await?;
        let memory_bytes = copy_memory(id, &claimed.memory_path(), &memory).await?;
        let device = self
            .load_device_state(id, &claimed.device_state_path())
            .await?;
        let deadline = Instant::now() + LOAD_TIMEOUT;
        loop {
            let now = self.hv.refresh(id).await?;
            match now.state {
                VmState::Paused => break,
                VmState::Restoring | VmState::Incoming if Instant::now() < deadline => {}
                VmState::Restoring | VmState::Incoming => {
                    return Err(AgentError::Hv(HvError::Timeout {
                        command: format!("loading the saved state of VM {id}"),
                        ms: LOAD_TIMEOUT.as_millis() as u64,
                    }))
                }
                state => {
                    return Err(AgentError::Hv(HvError::Qemu(format!(
                    "QEMU of VM {id:?} ended while loading the saved state (now {state}); see {}",
                    now.console_log
                        .as_deref()
                        .and_then(Path::parent)
                        .map(|d| d.join("qemu.log").display().to_string())
                        .unwrap_or_default()
                ))))
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let info = self.hv.resume(id).await?;
        match known {
            true => self.vcpu_policy_on_new_threads(id).await,
            false => self.incoming_resumed(id),
        }
        self.guests.forget(id);
        Ok((info, memory_bytes, device))
    }

    /// Feeds the saved device state into the waiting QEMU through a private unix socket.
    async fn load_device_state(&self, id: &str, path: &Path) -> Result<u64, AgentError> {
        let socket = relay::socket_path(&self.host.state_dir, &format!("restore-{id}"))
            .map_err(saving(id, "the device-state socket"))?;
        let _ = std::fs::remove_file(&socket);
        let _socket = RemoveOnDrop(socket.clone());
        self.hv
            .migrate_incoming(id, &format!("unix:{}", socket.display()))
            .await?;
        let file = tokio::fs::File::open(path)
            .await
            .map_err(relay_err(id, "opening the saved device state"))?;
        let fed = tokio::time::timeout(DEVICE_STATE_TIMEOUT, async {
            let qemu = tokio::net::UnixStream::connect(&socket).await?;
            relay::pump(file, qemu).await
        })
        .await
        .map_err(|_| {
            saving(id, "loading the device state")(MigrationError::DeviceStateTimeout(
                DEVICE_STATE_TIMEOUT,
            ))
        })?;
        fed.map_err(relay_err(id, "feeding the device state to QEMU"))
    }
}

/// Copies a memory file's data on a blocking thread, bounded in time.
async fn copy_memory(id: &str, from: &Path, to: &Path) -> Result<u64, AgentError> {
    let (from, to) = (from.to_path_buf(), to.to_path_buf());
    let copy = tokio::task::spawn_blocking(move || saved::copy_data(&from, &to));
    match tokio::time::timeout(MEMORY_COPY_TIMEOUT, copy).await {
        Ok(Ok(r)) => r.map_err(|e| AgentError::Hv(e.into())),
        Ok(Err(source)) => Err(saving(id, "copying guest memory")(MigrationError::Task {
            step: "copying guest memory",
            source,
        })),
        Err(_) => Err(AgentError::Hv(HvError::Timeout {
            command: format!("copying the guest memory of VM {id}"),
            ms: MEMORY_COPY_TIMEOUT.as_millis() as u64,
        })),
    }
}

/// A socket path removed when the operation that made it ends, however it ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A task stopped when the operation waiting for it gives up.
struct AbortOnDrop<T>(tokio::task::JoinHandle<std::io::Result<T>>);

impl<T> AbortOnDrop<T> {
    async fn join(&mut self) -> std::io::Result<T> {
        match (&mut self.0).await {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_running_guest_is_asked() {
        let polite = StopRequest::default();
        let forced = StopRequest {
            force: true,
            ..StopRequest::default()
        };
        assert!(asks_guest(&polite, VmState::Running));
        assert!(!asks_guest(&forced, VmState::Running));
        for s in [VmState::Paused, VmState::Created, VmState::Incoming] {
            assert!(!asks_guest(&polite, s), "a {s} guest cannot answer");
        }
    }

    #[test]
    fn stop_timeouts_are_bounded() {
        let t = |s| {
            StopRequest {
                timeout_s: Some(s),
                force: false,
            }
            .timeout()
        };
        assert_eq!(
            StopRequest::default().timeout(),
            Ok(Duration::from_secs(30))
        );
        assert_eq!(t(1), Ok(Duration::from_secs(1)));
        assert!(t(0).unwrap_err().contains("between 1 and 600"));
        assert!(t(601).is_err());
    }
}
