//! The QEMU command line for a VM, built as a pure function of the spec and its paths.

use crate::accel::Accel;
use crate::spec::VmSpec;
use std::path::{Path, PathBuf};
use tern_api::agent::DiskBus;

/// The name of the virtio-serial port the guest agent (`tern-guest`) listens on (see
/// docs/guest-image.md); the guest finds it through `/sys/class/virtio-ports/*/name`.
pub const GUEST_PORT_NAME: &str = "org.tern.guest";

/// The host-side files of one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmPaths {
    pub run_dir: PathBuf,
    pub memory_file: PathBuf,
    pub qmp_socket: PathBuf,
    pub control_socket: PathBuf,
    pub console_log: PathBuf,
    /// The serial console's socket: one client at a time reads and types on it, while
    /// QEMU keeps writing everything to `console_log`.
    pub console_socket: PathBuf,
    pub qemu_log: PathBuf,
    pub pid_file: PathBuf,
    /// The spec's `guest_config` as JSON, handed to QEMU as fw_cfg `opt/tern/config`.
    pub guest_config: PathBuf,
}

impl VmPaths {
    /// Per-VM files: sockets and logs under `run_dir/ID`, RAM as `mem_dir/ID.ram`.
    pub fn new(run_dir: &Path, mem_dir: &Path, id: &str) -> VmPaths {
        let d = run_dir.join(id);
        VmPaths {
            memory_file: mem_dir.join(format!("{id}.ram")),
            qmp_socket: d.join("qmp.sock"),
            control_socket: d.join("guest.sock"),
            console_log: d.join("console.log"),
            console_socket: d.join("console.sock"),
            qemu_log: d.join("qemu.log"),
            pid_file: d.join("qemu.pid"),
            guest_config: d.join("guest-config.json"),
            run_dir: d,
        }
    }

    /// Unix socket paths are limited to 107 bytes; say so before QEMU fails obscurely.
    pub fn check_socket_lengths(&self) -> Result<(), String> {
        for p in [&self.qmp_socket, &self.control_socket, &self.console_socket] {
            let n = p.as_os_str().len();
            if n > 107 {
                return Err(format!(
                    "socket path {} is {n} bytes, above the 107-byte limit: use a shorter state directory",
                    p.display()
                ));
            }
        }
        Ok(())
    }
}

/// One NIC as QEMU sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NicArg {
    pub tap: String,
    pub mac: String,
}

/// One disk as QEMU sees it: its file in the store, and what the guest sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArg {
    pub path: PathBuf,
    pub bus: DiskBus,
    /// The disk's name in the spec; a `virtio_scsi` disk shows it as its serial.
    pub name: String,
}

/// The id of the VM's `virtio-scsi-pci` controller, there when a disk uses it.
pub const SCSI_CONTROLLER: &str = "scsi0";

/// Everything the command line depends on.
#[derive(Debug, Clone)]
pub struct LaunchPlan<'a> {
    pub id: &'a str,
    pub spec: &'a VmSpec,
    pub paths: &'a VmPaths,
    pub nics: &'a [NicArg],
    pub disks: &'a [DiskArg],
    pub accel: Accel,
    pub incoming: bool,
}

/// The arguments after the binary name.
///
/// The guest's RAM is a `memory-backend-file` with `share=on`, so the agent can read and
/// write it through the file (the migration engine moves memory itself) and QEMU's own
/// migration can skip it with `x-ignore-shared`. `-S` keeps the guest from running until
/// `cont`, on both a fresh VM and a migration destination. `-nodefaults` and no display
/// keep the device state QEMU migrates small.
pub fn qemu_args(p: &LaunchPlan) -> Vec<String> {
    let mib = p.spec.memory_mib;
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&["-name", &format!("tern-{}", p.id)]);
    // `-no-reboot`: a guest that reboots itself (the image boots with `panic=-1`) ends
    // its QEMU instead of rebooting unnoticed. A guest whose kernel has the pvpanic
    // driver tells QEMU it panicked first, and `-action panic=pause` holds it there
    // (run state `guest-panicked`) so the agent sees the panic and the manager's HA
    // policy decides what follows (`docs/manager.md`, "Guest health").
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-action",
        "panic=pause",
        "-S",
    ]);
    push(&["-accel", p.accel.qemu_arg(), "-cpu", p.accel.cpu_model()]);
    push(&["-machine", "pc,memory-backend=m0"]);
    push(&[
        "-object",
        &format!(
            "memory-backend-file,id=m0,size={mib}M,mem-path={},share=on",
            p.paths.memory_file.display()
        ),
    ]);
    push(&["-m", &format!("{mib}M"), "-smp", &p.spec.vcpus.to_string()]);
    if let Some(k) = &p.spec.kernel {
        push(&["-kernel", &k.display().to_string()]);
        if let Some(i) = &p.spec.initramfs {
            push(&["-initrd", &i.display().to_string()]);
        }
        if !p.spec.cmdline.is_empty() {
            push(&["-append", &p.spec.cmdline]);
        }
    }
    // The serial console is a socket nobody need be connected to (`wait=off`); QEMU
    // logs what the guest writes to the file whether or not a client is attached, so
    // the history survives an attach and a restart (`logappend=on`).
    push(&[
        "-chardev",
        &format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            qemu_opt_escape(&p.paths.console_socket.display().to_string()),
            qemu_opt_escape(&p.paths.console_log.display().to_string()),
        ),
        "-serial",
        "chardev:serial0",
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=guest,path={},server=on,wait=off",
            p.paths.control_socket.display()
        ),
        "-device",
        "virtio-serial-pci,id=vser0",
        "-device",
        &format!("virtserialport,chardev=guest,name={GUEST_PORT_NAME}"),
    ]);
    if p.spec.guest_config.is_some() {
        // The guest reads it from /sys/firmware/qemu_fw_cfg/by_name/opt/tern/config/raw.
        push(&[
            "-fw_cfg",
            &format!(
                "name={},file={}",
                tern_api::guest_config::FW_CFG_NAME,
                qemu_opt_escape(&p.paths.guest_config.display().to_string())
            ),
        ]);
    }
    for (i, nic) in p.nics.iter().enumerate() {
        push(&[
            "-netdev",
            &format!("tap,id=net{i},ifname={},script=no,downscript=no", nic.tap),
            "-device",
            &format!("virtio-net-pci,netdev=net{i},mac={}", nic.mac),
        ]);
    }
    if p.disks.iter().any(|d| d.bus == DiskBus::VirtioScsi) {
        push(&["-device", &format!("virtio-scsi-pci,id={SCSI_CONTROLLER}")]);
    }
    for (i, disk) in p.disks.iter().enumerate() {
        let d = disk_args(i, disk);
        push(&d.iter().map(String::as_str).collect::<Vec<_>>());
    }
    // Last of the devices, so the others keep the PCI slots they had without it.
    push(&["-device", "pvpanic-pci"]);
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", p.paths.qmp_socket.display()),
        "-pidfile",
        &p.paths.pid_file.display().to_string(),
    ]);
    if p.incoming {
        push(&["-incoming", "defer"]);
    }
    a
}

/// The block nodes and the device of disk `index`: a `file` node, a `qcow2` node on it
/// (an overlay opens its image as a read-only backing node by itself) and the guest's
/// device. The node names depend on the index alone, whatever the bus, so a local-disk
/// mirror finds them under the same names on both hosts (`disk::mirror`). A SCSI disk
/// is target `index` of the one controller, with the disk's name as its serial: the
/// guest's `/dev/disk/by-id` names stay the same across boots and migrations even if
/// the kernel's `sdX` letters do not. Caching bypasses the host's page cache (`cache.direct=on`, flushes kept), so
/// a destination that opens the same file on shared storage reads what the source
/// wrote, not a stale page of its own host's cache; QEMU itself flushes and releases the
/// image when the source stops and takes it on the destination only when it resumes.
pub fn disk_args(index: usize, disk: &DiskArg) -> Vec<String> {
    let cache = "cache.direct=on,cache.no-flush=off";
    let path = qemu_opt_escape(&disk.path.display().to_string());
    let device = match disk.bus {
        DiskBus::VirtioBlk => format!("virtio-blk-pci,drive=disk{index},id=vd{index}"),
        DiskBus::VirtioScsi => format!(
            "scsi-hd,bus={SCSI_CONTROLLER}.0,channel=0,scsi-id={index},lun=0,drive=disk{index},id=sd{index},serial={}",
            qemu_opt_escape(&tern_api::agent::scsi_serial(&disk.name))
        ),
    };
    vec![
        "-blockdev".into(),
        format!("driver=file,node-name=file{index},filename={path},{cache}"),
        "-blockdev".into(),
        format!("driver=qcow2,node-name=disk{index},file=file{index},{cache}"),
        "-device".into(),
        device,
    ]
}

/// A value inside QEMU's `key=value,...` options: a comma is written twice.
fn qemu_opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

/// The tap device name for NIC `index` of VM `id`: at most 15 bytes (IFNAMSIZ), stable.
pub fn tap_name(id: &str, index: usize) -> String {
    let h = crate::spec::fnv1a(id.as_bytes());
    format!("tt{:08x}n{index}", h as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            vcpus: 2,
            memory_mib: 512,
            kernel: Some("/k".into()),
            initramfs: Some("/i".into()),
            cmdline: "console=ttyS0 quiet".into(),
            nics: vec![],
            disks: vec![],
            image: None,
            guest_config: None,
        }
    }

    fn joined(incoming: bool, nics: &[NicArg]) -> String {
        let s = spec();
        let paths = VmPaths::new(Path::new("/run/t"), Path::new("/dev/shm/t"), "vm1");
        qemu_args(&LaunchPlan {
            id: "vm1",
            spec: &s,
            paths: &paths,
            nics,
            disks: &[],
            accel: Accel::Tcg,
            incoming,
        })
        .join(" ")
    }

    #[test]
    fn shared_file_backed_ram() {
        let a = joined(false, &[]);
        assert!(a.contains("-machine pc,memory-backend=m0"));
        assert!(
            a.contains("memory-backend-file,id=m0,size=512M,mem-path=/dev/shm/t/vm1.ram,share=on")
        );
        assert!(a.contains("-m 512M -smp 2"));
        assert!(a.contains("-accel tcg,thread=multi"));
        assert!(a.contains("-append console=ttyS0 quiet"));
        assert!(a.contains(" -S "));
        assert!(!a.contains("-incoming"));
        assert!(a.contains("-action panic=pause") && a.contains("-device pvpanic-pci"));
    }

    #[test]
    fn guest_config_is_a_fw_cfg_file_only_when_given() {
        assert!(!joined(false, &[]).contains("-fw_cfg"));
        let mut s = spec();
        s.guest_config = Some(Box::new(tern_api::agent::GuestConfig {
            hostname: Some("h".into()),
            ..Default::default()
        }));
        let paths = VmPaths::new(Path::new("/run/t,x"), Path::new("/dev/shm/t"), "vm1");
        let a = qemu_args(&LaunchPlan {
            id: "vm1",
            spec: &s,
            paths: &paths,
            nics: &[],
            disks: &[],
            accel: Accel::Tcg,
            incoming: false,
        })
        .join(" ");
        assert!(
            a.contains("-fw_cfg name=opt/tern/config,file=/run/t,,x/vm1/guest-config.json"),
            "{a}"
        );
    }

    #[test]
    fn serial_is_a_socket_logged_to_the_console_file() {
        let a = joined(false, &[]);
        assert!(
            a.contains("-chardev socket,id=serial0,path=/run/t/vm1/console.sock,server=on,wait=off,logfile=/run/t/vm1/console.log,logappend=on -serial chardev:serial0"),
            "{a}"
        );
        // An incoming QEMU has its own socket in its own run directory, the same way.
        assert!(joined(true, &[]).contains("path=/run/t/vm1/console.sock"));
        // The console's is the longest socket name: its length is checked too.
        let run_dir = format!("/{}", "r".repeat(90));
        let long = VmPaths::new(Path::new(&run_dir), Path::new("/m"), "vm1");
        assert!(long.control_socket.as_os_str().len() <= 107);
        let e = long.check_socket_lengths().unwrap_err();
        assert!(e.contains("console.sock"), "{e}");
    }

    #[test]
    fn incoming_defers() {
        assert!(joined(true, &[]).ends_with("-incoming defer"));
    }

    #[test]
    fn nics_are_taps_with_macs() {
        let nics = [NicArg {
            tap: tap_name("vm1", 0),
            mac: "52:54:00:00:00:01".into(),
        }];
        let a = joined(false, &nics);
        assert!(a.contains(&format!("tap,id=net0,ifname={},script=no", nics[0].tap)));
        assert!(a.contains("virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01"));
    }

    /// The arguments of VM `vm1` with `disks` and no NIC.
    fn with_disks(disks: &[DiskArg], incoming: bool) -> Vec<String> {
        let s = spec();
        let paths = VmPaths::new(Path::new("/run/t"), Path::new("/dev/shm/t"), "vm1");
        qemu_args(&LaunchPlan {
            id: "vm1",
            spec: &s,
            paths: &paths,
            nics: &[],
            disks,
            accel: Accel::Tcg,
            incoming,
        })
    }

    #[test]
    fn disks_are_qcow2_nodes_on_files_with_direct_io() {
        let disks = [
            DiskArg {
                path: "/store/vms/vm1/root.qcow2".into(),
                bus: DiskBus::VirtioBlk,
                name: "root".into(),
            },
            DiskArg {
                path: "/odd,dir/data.qcow2".into(),
                bus: DiskBus::VirtioBlk,
                name: "data".into(),
            },
        ];
        let a = with_disks(&disks, true);
        let j = a.join(" ");
        assert!(j.contains(
            "-blockdev driver=file,node-name=file0,filename=/store/vms/vm1/root.qcow2,cache.direct=on,cache.no-flush=off"
        ));
        assert!(j.contains(
            "-blockdev driver=qcow2,node-name=disk0,file=file0,cache.direct=on,cache.no-flush=off"
        ));
        assert!(j.contains("-device virtio-blk-pci,drive=disk0,id=vd0"));
        assert!(j.contains("filename=/odd,,dir/data.qcow2"), "{j}");
        assert!(j.contains("-device virtio-blk-pci,drive=disk1,id=vd1"));
        // The destination opens the same files, inactive until the migration ends.
        assert!(j.ends_with("-incoming defer"));
        // Each option is one argument: a path with spaces stays whole.
        assert_eq!(a.iter().filter(|x| *x == "-blockdev").count(), 4);
        assert!(
            !j.contains("scsi"),
            "no controller without a SCSI disk: {j}"
        );
    }

    #[test]
    fn scsi_disks_share_one_controller_with_stable_ids_and_serials() {
        let disk = |name: &str, bus| DiskArg {
            path: format!("/store/vms/vm1/{name}.qcow2").into(),
            bus,
            name: name.into(),
        };
        let disks = [
            disk("root", DiskBus::VirtioBlk),
            disk("data", DiskBus::VirtioScsi),
            disk("logs", DiskBus::VirtioScsi),
        ];
        let a = with_disks(&disks, false);
        let j = a.join(" ");
        assert_eq!(
            a.iter()
                .filter(|x| x.starts_with("virtio-scsi-pci"))
                .count(),
            1,
            "{j}"
        );
        let controller = j.find("virtio-scsi-pci,id=scsi0").unwrap();
        assert!(j.contains("-device virtio-blk-pci,drive=disk0,id=vd0"));
        for (i, name) in [(1, "data"), (2, "logs")] {
            let dev = format!(
                "-device scsi-hd,bus=scsi0.0,channel=0,scsi-id={i},lun=0,drive=disk{i},id=sd{i},serial={name}"
            );
            let at = j.find(&dev).unwrap_or_else(|| panic!("{dev} in {j}"));
            assert!(controller < at, "the controller comes before its disks");
            // The nodes a local-disk mirror uses are named as for virtio-blk.
            assert!(j.contains(&format!("driver=qcow2,node-name=disk{i},file=file{i},")));
        }
        // The destination of a migration gets the same devices.
        let mut dest = with_disks(&disks, true);
        assert_eq!(dest.pop().as_deref(), Some("defer"));
        assert_eq!(dest.pop().as_deref(), Some("-incoming"));
        assert_eq!(dest, a);
    }

    #[test]
    fn tap_names_fit_ifnamsiz() {
        let long = "x".repeat(48);
        assert!(tap_name(&long, 9).len() <= 15);
        assert_ne!(tap_name("a", 0), tap_name("b", 0));
    }

    #[test]
    fn long_socket_paths_refused() {
        let deep = Path::new("/").join("d".repeat(120));
        let p = VmPaths::new(&deep, Path::new("/m"), "vm");
        assert!(p.check_socket_lengths().is_err());
        let p = VmPaths::new(Path::new("/run"), Path::new("/m"), "vm");
        assert!(p.check_socket_lengths().is_ok());
    }
}
