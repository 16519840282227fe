//! The agent's API (`tern agent`, see `docs/agent-api.md`): the host's report, VMs as
//! the caller describes them and as the agent shows them, their lifecycle actions and
//! measurements, and the error body every failed request answers with. The migration
//! endpoints' values are in [`crate::migration`].

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tern_model::VmName;

pub use crate::guest_config::GuestConfig;

/// A VM spec the drivers refuse; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidSpec(pub String);

impl std::fmt::Display for InvalidSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidSpec {}

/// Largest guest the drivers accept; a typo like `memory_mib: 5120000` should be refused
/// with a message, not tried.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;

/// Largest vCPU count accepted (QEMU's `pc` machine limit is far above what a host here has).
pub const MAX_VCPUS: u32 = 64;

/// A VM as the caller describes it. Host-side paths (memory file, sockets) are the
/// driver's choice and are reported back in [`VmInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmSpec {
    /// Number of virtual CPUs.
    #[serde(default = "one")]
    pub vcpus: u32,
    /// Guest RAM in MiB; 0 (or absent) is refused.
    #[serde(default)]
    pub memory_mib: u64,
    /// Kernel to boot directly. Absent: the guest runs only its firmware (useful to test
    /// device-state migration without an image).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub kernel: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Network interfaces, each a tap on the host's bridge.
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// Virtual disks, each a qcow2 file the agent makes in its store (see
    /// `docs/storage.md`); the guest sees the `virtio_blk` ones in order as `/dev/vda`,
    /// `/dev/vdb`, ... and the `virtio_scsi` ones as SCSI disks (`/dev/sdX`).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// The manager's catalogue image this VM boots (`docs/images.md`): the agent
    /// copies its files from the manager into the store's `images/` when they are
    /// missing, boots its kernel and initramfs (`kernel` and `initramfs` stay absent),
    /// and a disk whose `image` is the image's disk file is an overlay on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<crate::catalog::ImageRef>,
    /// Host name, ssh keys and a static address handed to the guest through QEMU's
    /// fw_cfg (`opt/tern/config`); images that know it apply it at boot
    /// (`docs/guest-image.md`). Absent: the guest is told nothing.
    // Boxed: most specs have none, and the spec travels inside many values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_config: Option<Box<GuestConfig>>,
}

/// Most disks one VM may have.
pub const MAX_DISKS: usize = 16;

/// Largest disk accepted, in MiB (16 TiB): a typo like `size_mib: 10240000000` is refused
/// with a message, not tried.
pub const MAX_DISK_MIB: u64 = 1 << 24;

/// Longest disk or image name.
pub const MAX_DISK_NAME: usize = 64;

/// One virtual disk: a qcow2 file in the host's store, either blank or a copy-on-write
/// overlay on a read-only image of the store's `images/` directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DiskSpec {
    /// Names the disk's file (`vms/VM/NAME.qcow2` in the store): letters, digits, `-`
    /// and `_`, unique within the VM.
    pub name: String,
    /// Size the guest sees, in MiB. Required for a blank disk; with an image, absent
    /// means the image's own size, and a size below it is refused.
    #[serde(default)]
    pub size_mib: Option<u64>,
    /// A file name in the store's `images/` directory (qcow2 or raw) the disk starts as;
    /// the image is only read, every write lands in the disk's own file.
    #[serde(default)]
    pub image: Option<String>,
    /// The controller the guest sees the disk on.
    #[serde(default)]
    pub bus: DiskBus,
    /// Which of the host's stores holds the file: `shared` (`--store`, seen by every
    /// host, the disk stays put when the VM moves) or `local` (`--local-store`, the
    /// disk is copied to the destination during a live migration). Left out when
    /// `shared`, so an agent that predates local disks takes the spec.
    #[serde(default, skip_serializing_if = "DiskStore::is_shared")]
    pub store: DiskStore,
}

/// Where a disk's file lives, and so what a live migration does with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DiskStore {
    /// The store every host mounts (`tern agent --store`): migration leaves the file.
    #[default]
    Shared,
    /// The host's own store (`tern agent --local-store`): migration mirrors the disk to
    /// an overlay the destination makes in its local store.
    Local,
}

impl DiskStore {
    pub fn is_shared(&self) -> bool {
        *self == DiskStore::Shared
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DiskStore::Shared => "shared",
            DiskStore::Local => "local",
        }
    }
}

impl std::str::FromStr for DiskStore {
    type Err = String;

    fn from_str(s: &str) -> Result<DiskStore, String> {
        match s {
            "shared" => Ok(DiskStore::Shared),
            "local" => Ok(DiskStore::Local),
            _ => Err(format!(
                "disk store {s:?}: give shared (the default) or local"
            )),
        }
    }
}

/// How a disk is attached to the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DiskBus {
    /// A `virtio-blk-pci` device per disk (`/dev/vdX` in a Linux guest).
    #[default]
    VirtioBlk,
    /// A `scsi-hd` device on the VM's one `virtio-scsi-pci` controller (`/dev/sdX` in a
    /// Linux guest, and `/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_SERIAL` with the
    /// serial of [`scsi_serial`]).
    VirtioScsi,
}

impl DiskBus {
    /// The name in the API (`virtio_blk`, `virtio_scsi`).
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::VirtioBlk => "virtio_blk",
            DiskBus::VirtioScsi => "virtio_scsi",
        }
    }
}

impl std::str::FromStr for DiskBus {
    type Err = String;

    /// The API's names, and the same with `-` (`virtio-scsi`) as the command line
    /// writes them.
    fn from_str(s: &str) -> Result<DiskBus, String> {
        match s.replace('-', "_").as_str() {
            "virtio_blk" => Ok(DiskBus::VirtioBlk),
            "virtio_scsi" => Ok(DiskBus::VirtioScsi),
            _ => Err(format!(
                "disk bus {s:?}: give virtio-blk (the default) or virtio-scsi"
            )),
        }
    }
}

/// Longest serial number QEMU's `scsi-hd` takes.
pub const MAX_SCSI_SERIAL: usize = 36;

/// The serial number a `virtio_scsi` disk shows the guest: its name, which is unique
/// within the VM and stays the same across reboots and migrations. A name longer than
/// QEMU allows keeps its first characters and gets a hash of the whole name, so two
/// long names with a common start still differ.
pub fn scsi_serial(disk_name: &str) -> String {
    if disk_name.len() <= MAX_SCSI_SERIAL {
        return disk_name.to_owned();
    }
    // FNV-1a: stable across builds and hosts, unlike std's hasher.
    let h = disk_name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let head: String = disk_name.chars().take(MAX_SCSI_SERIAL - 9).collect();
    format!("{head}-{:08x}", h as u32)
}

/// Checks a disk or image name: it becomes a file name in the store, so it must not be
/// able to name anything else (no `/`, no `..`, no hidden files).
pub fn check_store_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_DISK_NAME {
        return Err(format!(
            "{what} {name:?} must be 1 to {MAX_DISK_NAME} characters"
        ));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!("{what} {name:?} must not start with '.' or '-'"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{what} {name:?} contains {c:?}: use letters, digits, '-', '_' and '.' (a plain file name)"
        ));
    }
    if name.contains("..") {
        return Err(format!("{what} {name:?} must not contain \"..\""));
    }
    Ok(())
}

impl DiskSpec {
    /// Checks that do not touch the filesystem.
    pub fn validate(&self) -> Result<(), String> {
        check_store_name("disk name", &self.name)?;
        if self.name.contains('.') {
            return Err(format!(
                "disk name {:?} contains '.': use letters, digits, '-' and '_'",
                self.name
            ));
        }
        if let Some(image) = &self.image {
            check_store_name("image", image)?;
        }
        match self.size_mib {
            None if self.image.is_none() => Err(format!(
                "disk {:?} has neither size_mib nor image: give its size, e.g. \"size_mib\": 1024",
                self.name
            )),
            Some(0) => Err(format!("disk {:?}: size_mib must be at least 1", self.name)),
            Some(mib) if mib > MAX_DISK_MIB => Err(format!(
                "disk {:?}: size_mib {mib} is above the limit of {MAX_DISK_MIB} MiB",
                self.name
            )),
            _ => Ok(()),
        }
    }
}

fn one() -> u32 {
    1
}

/// One virtio NIC. The MAC travels with the VM so the guest keeps its address when it moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Nic {
    /// `52:54:00:xx:xx:xx`; absent: derived from the VM id, so it is stable across moves.
    #[serde(default)]
    pub mac: Option<String>,
}

impl VmSpec {
    /// Checks that do not touch the filesystem.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        if self.memory_mib == 0 {
            return Err(InvalidSpec(
                "memory_mib is missing or 0: give the guest's RAM in MiB, e.g. \"memory_mib\": 512"
                    .into(),
            ));
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(InvalidSpec(format!(
                "memory_mib {} is above the limit of {MAX_MEMORY_MIB} MiB",
                self.memory_mib
            )));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(InvalidSpec(format!(
                "vcpus must be between 1 and {MAX_VCPUS}, got {}",
                self.vcpus
            )));
        }
        if self.initramfs.is_some() && self.kernel.is_none() {
            return Err(InvalidSpec(
                "initramfs given without a kernel: add \"kernel\"".into(),
            ));
        }
        if !self.cmdline.is_empty() && self.kernel.is_none() {
            return Err(InvalidSpec(
                "cmdline given without a kernel: add \"kernel\"".into(),
            ));
        }
        for (i, nic) in self.nics.iter().enumerate() {
            if let Some(mac) = &nic.mac {
                parse_mac(mac)
                    .map_err(|why| InvalidSpec(format!("nics[{i}].mac {mac:?}: {why}")))?;
            }
        }
        if self.disks.len() > MAX_DISKS {
            return Err(InvalidSpec(format!(
                "{} disks given; a VM may have at most {MAX_DISKS}",
                self.disks.len()
            )));
        }
        for (i, disk) in self.disks.iter().enumerate() {
            disk.validate()
                .map_err(|why| InvalidSpec(format!("disks[{i}]: {why}")))?;
            if self.disks[..i].iter().any(|d| d.name == disk.name) {
                return Err(InvalidSpec(format!(
                    "disks[{i}]: the name {:?} is used twice",
                    disk.name
                )));
            }
        }
        if let Some(g) = &self.guest_config {
            g.validate()
                .map_err(|why| InvalidSpec(format!("guest_config: {why}")))?;
            if g.address.is_some() && self.nics.is_empty() {
                return Err(InvalidSpec(
                    "guest_config.address given but the VM has no NIC: add one to \"nics\"".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`, refusing multicast addresses (a NIC cannot own one).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err("a MAC has six hex bytes separated by ':'".into());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return Err(format!("{p:?} is not two hex digits"));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| format!("{p:?} is not hex"))?;
    }
    if mac[0] & 1 == 1 {
        return Err("multicast bit set in the first byte".into());
    }
    Ok(mac)
}

/// A VM as a driver reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmInfo {
    pub id: String,
    pub state: VmState,
    pub spec: VmSpec,
    /// The MAC of each NIC, in order (derived ones filled in).
    pub macs: Vec<String>,
    /// The guest's RAM: a file on tmpfs the agent can map (`None` for the sim driver).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub memory_file: Option<PathBuf>,
    /// The socket of the guest agent's channel (JSON lines).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub control_socket: Option<PathBuf>,
    /// Where the guest's serial console is written.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub console_log: Option<PathBuf>,
    /// The serial console's socket (`GET /v1/vms/{id}/console` attaches to it).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    #[serde(default)]
    pub console_socket: Option<PathBuf>,
    /// The hypervisor process, while there is one.
    pub pid: Option<u32>,
}

/// CPU time of one vCPU thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VcpuSample {
    pub index: u32,
    pub thread_id: u32,
    pub cpu_ns: u64,
}

/// Per-VM measurements at one instant. CPU times are cumulative; a rate needs two samples.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmMetrics {
    pub vcpus: Vec<VcpuSample>,
    /// Sum over the vCPU threads.
    pub vcpu_cpu_ns: u64,
    /// Configured guest RAM.
    pub memory_bytes: u64,
    /// Resident memory of the hypervisor process (guest RAM it touched plus its own).
    pub rss_bytes: u64,
}

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// Defined and its process exists, but the guest has not run yet.
    Created,
    Running,
    Paused,
    /// Powered off: no process, definition kept.
    Stopped,
    /// Waiting for an incoming migration.
    Incoming,
    /// Suspended to disk: no process; its memory and device state are saved in the
    /// store (`vms/ID/suspend/`), and `restore` runs it again on any host that sees the
    /// store.
    Suspended,
    /// A suspended VM's process waits for its saved state to be loaded.
    Restoring,
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            VmState::Created => "created",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopped => "stopped",
            VmState::Incoming => "waiting for an incoming migration",
            VmState::Suspended => "suspended to disk",
            VmState::Restoring => "being restored from disk",
        };
        f.write_str(s)
    }
}

/// What a caller asks of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Start,
    Pause,
    Resume,
    Stop,
    IncomingDone,
    /// A hard reset of the running guest (a power cycle); it stays running.
    Reboot,
    /// Save memory and device state to the store and end the process.
    Suspend,
    /// Start the process of a suspended VM, waiting for its saved state.
    Restore,
    /// Give up loading the saved state: the VM is suspended again.
    AbandonRestore,
}

impl Action {
    /// The verb used in messages.
    pub fn verb(self) -> &'static str {
        match self {
            Action::Start => "start",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Stop => "stop",
            Action::IncomingDone => "finish the incoming migration of",
            Action::Reboot => "reboot",
            Action::Suspend => "suspend",
            Action::Restore => "restore",
            Action::AbandonRestore => "abandon the restore of",
        }
    }
}

/// What the host offers to guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capacity {
    pub cpus: u32,
    pub memory_mib: u64,
}

/// What guests use now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Load {
    /// CPU the vCPU threads of all VMs used over the last sampling interval, in cores.
    pub vm_cpu_cores: f64,
    /// Memory reserved by defined VMs (whatever their state: a stopped VM may start again).
    pub vm_memory_mib: u64,
    pub vms: usize,
}

/// `GET /v1/host`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostReport {
    pub name: String,
    /// `qemu` or `sim`.
    pub hypervisor: String,
    pub capacity: Capacity,
    pub load: Load,
    pub version: String,
    /// Free space in the host's disk store (`docs/storage.md`), in MiB; absent without
    /// a store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_free_mib: Option<u64>,
}

/// `POST /v1/vms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z0-9][a-z0-9-]{0,47}$"))]
    pub id: VmName,
    pub spec: VmSpec,
    /// Run the guest right away (default) or leave it created.
    #[serde(default = "yes")]
    pub start: bool,
    /// Use disk files of this VM already in the store as they are, making only missing
    /// ones: the manager restarting a VM on another host after its host died, so it
    /// keeps its data. Without it, an existing file is refused (409).
    #[serde(default)]
    pub reuse_disks: bool,
}

fn yes() -> bool {
    true
}

/// `POST /v1/vms/{id}/disks/{disk}/resize` (agent) and
/// `POST /v1/vms/{name}/disks/{disk}/resize` (manager): the disk's new size. A stopped
/// VM's disks only grow; the guest sees the size at its next boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ResizeDisk {
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 16777216))]
    pub size_mib: u64,
}

/// How long a graceful stop waits for the guest by default.
pub const DEFAULT_STOP_TIMEOUT_S: u64 = 30;
/// The longest a graceful stop may wait for the guest.
pub const MAX_STOP_TIMEOUT_S: u64 = 600;

/// `POST /v1/vms/{id}/stop` (the body is optional: an empty one means the defaults).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StopRequest {
    /// Seconds the guest gets to power itself off before it is powered off (1 to
    /// 600; default 30).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Power off at once, without asking the guest.
    #[serde(default)]
    pub force: bool,
}

impl StopRequest {
    /// The wait for the guest, checked against the bounds.
    pub fn timeout(&self) -> Result<std::time::Duration, String> {
        match self.timeout_s.unwrap_or(DEFAULT_STOP_TIMEOUT_S) {
            s @ 1..=MAX_STOP_TIMEOUT_S => Ok(std::time::Duration::from_secs(s)),
            s => Err(format!(
                "timeout_s must be between 1 and {MAX_STOP_TIMEOUT_S}, got {s}"
            )),
        }
    }
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StopOutcome {
    /// The guest powered itself off when asked.
    Graceful,
    /// The VM was powered off: `force` was given, the guest was not running (paused,
    /// never started), or it did not power off within the timeout.
    Forced,
}

/// The answer of `POST /v1/vms/{id}/stop`: the VM, and how it stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StopAnswer {
    #[serde(flatten)]
    pub vm: VmView,
    pub stopped: StopOutcome,
    /// Time from the request to the VM being off, in ms.
    pub took_ms: u64,
}

/// The answer of `POST /v1/vms/{id}/suspend` and `/restore`: the VM and what moved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SavedStateAnswer {
    #[serde(flatten)]
    pub vm: VmView,
    /// Bytes of guest memory written to (suspend) or read from (restore) the store;
    /// memory the guest never touched is not counted, it is a hole in the file.
    pub memory_bytes: u64,
    /// Bytes of QEMU's CPU and device state.
    pub device_state_bytes: u64,
    /// Time the whole operation took, in ms (for a restore, until the guest runs).
    pub took_ms: u64,
}

/// A VM as the API shows it: the driver's view plus its measured CPU use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct VmView {
    #[serde(flatten)]
    pub info: VmInfo,
    /// vCPU threads' CPU use over the last sampling interval, in cores.
    pub cpu_cores: Option<f64>,
    /// Whether its guest answers, while its QEMU runs (absent: not running, or not
    /// watched yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::health::GuestHealth>,
}

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = Error))]
pub struct ErrorBody {
    pub error: String,
    pub kind: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_bus_names_round_trip_and_bad_ones_say_what_to_give() {
        for b in [DiskBus::VirtioBlk, DiskBus::VirtioScsi] {
            assert_eq!(b.as_str().parse::<DiskBus>(), Ok(b));
            assert_eq!(b.as_str().replace('_', "-").parse::<DiskBus>(), Ok(b));
            assert_eq!(
                serde_json::to_value(b).unwrap(),
                serde_json::json!(b.as_str())
            );
        }
        let e = "scsi".parse::<DiskBus>().unwrap_err();
        assert!(e.contains("virtio-scsi"), "{e}");
        assert!(serde_json::from_value::<DiskBus>(serde_json::json!("ide")).is_err());
    }

    #[test]
    fn scsi_serials_fit_qemu_and_stay_unique() {
        assert_eq!(scsi_serial("data"), "data");
        let a = "a".repeat(MAX_DISK_NAME);
        let b = format!("{}b", "a".repeat(MAX_DISK_NAME - 1));
        for n in [&a, &b] {
            assert_eq!(scsi_serial(n).len(), MAX_SCSI_SERIAL);
            assert_eq!(scsi_serial(n), scsi_serial(n));
        }
        assert_ne!(scsi_serial(&a), scsi_serial(&b));
        assert_eq!(
            scsi_serial(&"x".repeat(MAX_SCSI_SERIAL)).len(),
            MAX_SCSI_SERIAL
        );
    }
}
