//! VM operations as the agent performs them: admission, records under the state
//! directory, then the driver. HTTP handlers and the migration engine both call these.

use crate::error::AgentError;
use crate::host::admit;
use crate::state::AppState;
pub use tern_api::agent::{CreateVm, VmView};
use tern_hv::disk::Remove;
use tern_hv::{Action, HvError, VmInfo, VmSpec};

/// What ending a VM does with its disk files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disks {
    Delete,
    /// The shared store's files belong to the VM's other copy (a migration's other
    /// end); the local store's are this copy's own and go with it.
    Keep,
}
use tern_model::VmName;

/// How a new VM's process comes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Make {
    /// Started with the definition (waiting for a migration when `incoming`).
    Now { incoming: bool },
    /// A migration's destination, started later by the driver's `launch`.
    Deferred,
}

impl Make {
    /// Whether the VM waits for a migration.
    fn incoming(self) -> bool {
        matches!(self, Make::Now { incoming: true } | Make::Deferred)
    }
}

impl AppState {
    /// The API view of a driver's VM.
    pub fn view(&self, info: VmInfo) -> VmView {
        let cpu_cores = self.load.lock().expect("load table lock").cores(&info.id);
        // Only a running VM has a guest to judge; a watch outlives a stop by one look.
        let guest = (info.state == tern_hv::VmState::Running)
            .then(|| {
                let watches = self.watches.lock().expect("guest watch lock");
                watches
                    .get(&info.id)
                    .filter(|w| Some(w.pid) == info.pid)
                    .map(|w| w.health.clone())
            })
            .flatten();
        VmView {
            info,
            cpu_cores,
            guest,
        }
    }

    /// Memory reserved by all defined VMs, in MiB.
    pub async fn used_memory_mib(&self) -> Result<u64, AgentError> {
        Ok(self
            .hv
            .list()
            .await?
            .iter()
            .map(|v| v.spec.memory_mib)
            .sum())
    }

    /// Checks the spec and the room, makes its disks (a migration destination finds
    /// the source's in the shared store instead, and makes empty copies of its local
    /// ones), defines the VM (as a migration destination when `incoming`), records it,
    /// and runs it when `start`. Nothing is left behind on error, and a destination
    /// never deletes the shared disks it found.
    pub async fn create_vm(
        &self,
        id: &str,
        spec: VmSpec,
        incoming: bool,
        start: bool,
    ) -> Result<VmInfo, AgentError> {
        self.create_vm_with(id, spec, incoming, start, false).await
    }

    /// [`AppState::create_vm`]; with `reuse_disks`, disk files of the VM already in the
    /// store are used as they are (a VM restarted on another host keeps its data) and
    /// only missing ones are made.
    pub async fn create_vm_with(
        &self,
        id: &str,
        spec: VmSpec,
        incoming: bool,
        start: bool,
        reuse_disks: bool,
    ) -> Result<VmInfo, AgentError> {
        let make = Make::Now { incoming };
        self.make_vm(id, spec, make, start, reuse_disks).await
    }

    /// [`AppState::create_vm`] of a migration's destination whose process starts later
    /// ([`tern_hv::Hypervisor::launch`]): its memory file exists when this returns, so
    /// the memory can arrive while the process starts.
    pub async fn define_incoming_vm(&self, id: &str, spec: VmSpec) -> Result<VmInfo, AgentError> {
        self.make_vm(id, spec, Make::Deferred, false, false).await
    }

    async fn make_vm(
        &self,
        id: &str,
        spec: VmSpec,
        make: Make,
        start: bool,
        reuse_disks: bool,
    ) -> Result<VmInfo, AgentError> {
        let incoming = make.incoming();
        VmName::check(id).map_err(HvError::from)?;
        let spec = self.with_image_files(spec).await?;
        tern_hv::spec::check_paths(&spec)?;
        let spec = self.confine_paths(spec)?;
        let _admission = self.admission.lock().await;
        admit(
            self.host.capacity,
            self.used_memory_mib().await?,
            spec.memory_mib,
        )?;
        let made_disks = self.prepare_disks(id, &spec, incoming, reuse_disks).await?;
        // A destination, and a VM restarted from the disks already in the store, never
        // delete the disks they found.
        let keep = if incoming || reuse_disks {
            Disks::Keep
        } else {
            Disks::Delete
        };
        let made = match make {
            Make::Now { incoming } => self.hv.create(id, spec.clone(), incoming).await,
            Make::Deferred => self.hv.define_incoming(id, spec.clone()).await,
        };
        let mut info = match made {
            Ok(info) => info,
            Err(e) => {
                if made_disks {
                    self.remove_disks(id, &spec, keep);
                }
                return Err(e.into());
            }
        };
        let recorded = self.write_record(id, &spec, incoming);
        let started = match (recorded, start && !incoming) {
            (Err(e), _) => Err(e),
            (Ok(()), true) => self.hv.start(id).await.map_err(AgentError::from),
            (Ok(()), false) => Ok(info.clone()),
        };
        match started {
            Ok(i) => info = i,
            Err(e) => {
                let _ = self.destroy_vm_with(id, keep).await;
                return Err(e);
            }
        }
        Ok(info)
    }

    /// Makes the disks of a new VM; a migration destination checks that it sees the
    /// source's shared ones and makes empty copies of the local ones. True when files
    /// were made here.
    async fn prepare_disks(
        &self,
        id: &str,
        spec: &VmSpec,
        incoming: bool,
        reuse: bool,
    ) -> Result<bool, AgentError> {
        if spec.disks.is_empty() {
            return Ok(false);
        }
        let stores = self.stores();
        if incoming {
            return Ok(stores
                .prepare_incoming(id, &spec.disks)
                .await
                .map_err(HvError::from)?);
        }
        if reuse {
            let mut missing = Vec::new();
            for d in &spec.disks {
                if !stores.disk_path(id, d).map_err(HvError::from)?.is_file() {
                    missing.push(d.clone());
                }
            }
            stores
                .create_disks(id, &missing)
                .await
                .map_err(HvError::from)?;
            // Not counted as made: the disks that were there hold the VM's data.
            return Ok(false);
        }
        stores
            .create_disks(id, &spec.disks)
            .await
            .map_err(HvError::from)?;
        Ok(true)
    }

    /// Removes the saved state of a suspended VM being deleted, and says what becomes of
    /// its disks: deleted with it when this host suspended it and the state is still in
    /// the store. Otherwise another host restored the VM (and may have suspended it
    /// again since), so it runs or is saved from these disks elsewhere and this host's
    /// entry was only a leftover: the disks and any saved state stay.
    fn remove_saved_state(&self, id: &str) -> Disks {
        let Some(store) = &self.store else {
            return Disks::Delete;
        };
        let who = format!("{}-delete", self.host.name);
        let claimed = match tern_hv::saved::claim(store, id, &who) {
            Ok(claimed) => claimed,
            Err(e) => {
                tracing::info!(vm = id, reason = %e, "the disks stay with the VM's other copy");
                return Disks::Keep;
            }
        };
        if claimed.suspended_by().as_deref() == Some(self.host.name.as_str()) {
            claimed.remove();
            return Disks::Delete;
        }
        tracing::info!(vm = id, by = ?claimed.suspended_by(), "the saved state is another host's; it stays, with the disks");
        if let Err(e) = claimed.release() {
            tracing::error!(vm = id, error = %e, "could not give another host's saved state back");
        }
        Disks::Keep
    }

    fn remove_disks(&self, id: &str, spec: &VmSpec, disks: Disks) {
        let remove = match disks {
            Disks::Delete => Remove::All,
            Disks::Keep => Remove::LocalOnly,
        };
        if !spec.disks.is_empty() {
            self.stores().remove_disks(id, &spec.disks, remove);
        }
    }

    /// A spec that boots a catalogue image, with the image's files present in the
    /// store (copied from the manager when missing) and its kernel and initramfs set to
    /// them; whatever paths the spec carried (a migration's source's) are replaced.
    async fn with_image_files(&self, mut spec: VmSpec) -> Result<VmSpec, AgentError> {
        let Some(image) = &spec.image else {
            return Ok(spec);
        };
        let store = self.store.as_ref().ok_or_else(|| {
            AgentError::BadRequest(format!(
                "the VM boots catalogue image {:?}, and this agent has no disk store to \
                 keep its files in: start it with --store DIR",
                image.name.as_str()
            ))
        })?;
        let present = crate::images::ensure(&store.images_dir(), &self.images, image).await?;
        // A local disk is an overlay on the local store's copy of the image's disk.
        let local_overlay = spec
            .disks
            .iter()
            .any(|d| d.image.is_some() && d.store == tern_api::agent::DiskStore::Local);
        if let (true, Some(local), Some(disk)) = (
            local_overlay,
            &self.local_store,
            image.file(tern_api::catalog::FileRole::Disk),
        ) {
            let dir = local.images_dir();
            crate::images::ensure_files(
                &dir,
                &self.images,
                image.name.as_str(),
                std::slice::from_ref(disk),
            )
            .await?;
        }
        spec.kernel = present.kernel;
        spec.initramfs = present.initramfs;
        Ok(spec)
    }

    /// The spec with its kernel and initramfs replaced by their canonical paths, each
    /// checked to lie under the host's image directory or the store's `images/`; QEMU
    /// is given the resolved path, so a symlink or `..` in the caller's path cannot be
    /// re-pointed after the check. A directory that does not exist holds nothing: a
    /// host without its own image directory still starts catalogue images from the
    /// store.
    fn confine_paths(&self, mut spec: VmSpec) -> Result<VmSpec, AgentError> {
        let image_dir = &self.host.image_dir;
        let dir = image_dir.canonicalize().ok();
        let store_images = self
            .store
            .as_ref()
            .and_then(|s| s.images_dir().canonicalize().ok());
        for (field, path) in [
            ("kernel", &mut spec.kernel),
            ("initramfs", &mut spec.initramfs),
        ] {
            let Some(p) = path.as_mut() else { continue };
            let outside = |p: &std::path::Path| AgentError::OutsideImageDir {
                field,
                path: p.to_path_buf(),
                image_dir: image_dir.clone(),
            };
            let real = p.canonicalize().map_err(|_| HvError::MissingPath {
                field,
                path: p.clone(),
            })?;
            let allowed = dir.as_ref().is_some_and(|d| real.starts_with(d))
                || store_images.as_ref().is_some_and(|s| real.starts_with(s));
            if !allowed || !real.is_file() {
                return Err(outside(p));
            }
            *p = real;
        }
        Ok(spec)
    }

    /// Grows disk `disk` of stopped VM `id` to `mib` MiB, and records the size.
    pub async fn resize_disk(&self, id: &str, disk: &str, mib: u64) -> Result<VmInfo, AgentError> {
        let _gate = self.lifecycle.lock().await;
        self.refuse_if_migrating(id, "resize a disk of")?;
        let info = self.hv.refresh(id).await?;
        if info.state != tern_hv::VmState::Stopped {
            return Err(HvError::Conflict {
                id: id.into(),
                action: "resize a disk of",
                state: info.state,
            }
            .into());
        }
        let Some(d) = info.spec.disks.iter().find(|d| d.name == disk) else {
            return Err(AgentError::BadRequest(format!(
                "VM {id:?} has no disk named {disk:?}"
            )));
        };
        self.stores()
            .of(id, d)
            .map_err(HvError::from)?
            .resize_disk(id, disk, mib)
            .await
            .map_err(HvError::from)?;
        // The record is what a restarted agent and a migration read the spec from.
        if let Ok((mut spec, incoming)) = self.read_record(id) {
            for d in spec.disks.iter_mut().filter(|d| d.name == disk) {
                d.size_mib = Some(mib);
            }
            self.write_record(id, &spec, incoming)?;
        }
        Ok(self.hv.refresh(id).await?)
    }

    /// Ends the VM and removes its record, its guest channel and its disks.
    pub async fn destroy_vm(&self, id: &str) -> Result<(), AgentError> {
        self.destroy_vm_with(id, Disks::Delete).await
    }

    /// Ends this host's copy of a VM whose disks the other end of a migration holds:
    /// like [`AppState::destroy_vm`], but the disk files stay in the shared store.
    /// Local disks are this copy's own and go: a destination that failed drops its
    /// partial copies, a source that handed over its old ones.
    pub async fn destroy_copy(&self, id: &str) -> Result<(), AgentError> {
        self.destroy_vm_with(id, Disks::Keep).await
    }

    async fn destroy_vm_with(&self, id: &str, disks: Disks) -> Result<(), AgentError> {
        self.guests.forget(id);
        self.forget_vcpu_policy(id);
        let (spec, state) = match self.hv.info(id).await {
            Ok(info) => (Some(info.spec), Some(info.state)),
            Err(_) => (self.read_record(id).ok().map(|(spec, _)| spec), None),
        };
        let disks = match state {
            Some(tern_hv::VmState::Suspended) if disks == Disks::Delete => {
                self.remove_saved_state(id)
            }
            _ => disks,
        };
        let r = self.hv.destroy(id).await;
        // After the driver let go of the files: QEMU holds them open until it ends.
        if let Some(spec) = &spec {
            self.remove_disks(id, spec, disks);
        }
        self.remove_record(id);
        self.load
            .lock()
            .expect("load table lock")
            .retain(|k| k != id);
        Ok(r?)
    }

    /// Runs a lifecycle action through the driver.
    pub async fn act(&self, id: &str, action: Action) -> Result<VmInfo, AgentError> {
        let hv = &self.hv;
        Ok(match action {
            Action::Start => hv.start(id).await?,
            Action::Pause => hv.pause(id).await?,
            Action::Resume => hv.resume(id).await?,
            Action::Stop => hv.stop(id).await?,
            Action::IncomingDone => hv.refresh(id).await?,
            Action::Reboot => {
                let info = hv.reboot(id).await?;
                // The guest agent starts again with the guest; a request half-way on the
                // old connection would wait for an answer that never comes.
                self.guests.forget(id);
                self.vcpu_policy_on_new_threads(id).await;
                info
            }
            Action::Suspend | Action::Restore | Action::AbandonRestore => {
                return Err(AgentError::BadRequest(format!(
                    "{} has its own route (POST /v1/vms/{{id}}/suspend or /restore)",
                    action.verb()
                )))
            }
        })
    }

    /// Applies the vCPU policy recorded for VM `id` to the threads of its new QEMU
    /// (after a reboot or a restore here). A policy this host cannot apply now is
    /// logged: the VM runs either way.
    pub async fn vcpu_policy_on_new_threads(&self, id: &str) {
        if let Err(e) = self.reapply_vcpu_policy(id).await {
            tracing::warn!(vm = id, error = %e, "the vCPU policy could not be applied again");
        }
    }

    /// Ids of the VMs recorded under the state directory (by this or an earlier agent).
    pub fn recorded_vms(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.host.state_dir.join("vms")) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".json").map(str::to_string)
            })
            .collect();
        ids.sort();
        ids
    }

    /// Forgets the record of a VM that no longer exists.
    pub fn remove_record(&self, id: &str) {
        let _ = std::fs::remove_file(self.vm_record(id));
        let _ = std::fs::remove_file(self.incoming_marker(id));
    }

    /// The spec an earlier agent recorded for VM `id`, and whether it was a migration
    /// destination not yet resumed.
    pub fn read_record(&self, id: &str) -> Result<(VmSpec, bool), AgentError> {
        let path = self.vm_record(id);
        let text = std::fs::read_to_string(&path)
            .map_err(AgentError::io(format!("reading {}", path.display())))?;
        let spec = serde_json::from_str(&text).map_err(|e| {
            AgentError::BadRequest(format!("VM record {} is unreadable: {e}", path.display()))
        })?;
        Ok((spec, self.incoming_marker(id).exists()))
    }

    /// Records that the destination VM `id` was resumed here: from now on it is the
    /// guest, which a restarted agent adopts instead of destroying as a leftover copy.
    pub fn incoming_resumed(&self, id: &str) {
        let _ = std::fs::remove_file(self.incoming_marker(id));
    }

    /// Present while VM `id` is a migration destination that has not run here.
    fn incoming_marker(&self, id: &str) -> std::path::PathBuf {
        self.host
            .state_dir
            .join("vms")
            .join(format!("{id}.incoming"))
    }

    fn write_record(&self, id: &str, spec: &VmSpec, incoming: bool) -> Result<(), AgentError> {
        let path = self.vm_record(id);
        let dir = path.parent().expect("record path has a parent");
        std::fs::create_dir_all(dir)
            .map_err(AgentError::io(format!("creating {}", dir.display())))?;
        let text = serde_json::to_string_pretty(spec).expect("a spec serialises");
        if incoming {
            let marker = self.incoming_marker(id);
            std::fs::write(&marker, "")
                .map_err(AgentError::io(format!("writing {}", marker.display())))?;
        }
        std::fs::write(&path, text).map_err(AgentError::io(format!("writing {}", path.display())))
    }

    /// One load sample of every VM; the sampler calls it periodically.
    pub async fn sample_load(&self) -> Result<(), AgentError> {
        let vms = self.hv.list().await?;
        let at_ns = self.epoch.elapsed().as_nanos() as u64;
        let mut samples = Vec::with_capacity(vms.len());
        for v in &vms {
            // A VM can vanish or stop between list and metrics; it just has no sample.
            if let Ok(m) = self.hv.metrics(&v.id).await {
                samples.push((v.id.clone(), m.vcpu_cpu_ns));
            }
        }
        let mut load = self.load.lock().expect("load table lock");
        for (id, ns) in samples {
            load.record(&id, ns, at_ns);
        }
        load.retain(|k| vms.iter().any(|v| v.id == k));
        Ok(())
    }
}
