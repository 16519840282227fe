//! The QEMU command line for a VM, built as a pure function of the spec and its paths.

use crate::accel::Accel;
use crate::spec::VmSpec;
use std::path::{Path, PathBuf};

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
    pub qemu_log: PathBuf,
    pub pid_file: PathBuf,
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
            qemu_log: d.join("qemu.log"),
            pid_file: d.join("qemu.pid"),
            run_dir: d,
        }
    }

    /// Unix socket paths are limited to 107 bytes; say so before QEMU fails obscurely.
    pub fn check_socket_lengths(&self) -> Result<(), String> {
        for p in [&self.qmp_socket, &self.control_socket] {
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

/// Everything the command line depends on.
#[derive(Debug, Clone)]
pub struct LaunchPlan<'a> {
    pub id: &'a str,
    pub spec: &'a VmSpec,
    pub paths: &'a VmPaths,
    pub nics: &'a [NicArg],
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
    // `-no-reboot`: a guest that panics (the image boots with `panic=-1`) ends its QEMU,
    // which the driver sees as the VM stopping, instead of rebooting unnoticed.
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
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
    push(&[
        "-serial",
        &format!("file:{}", p.paths.console_log.display()),
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
    for (i, nic) in p.nics.iter().enumerate() {
        push(&[
            "-netdev",
            &format!("tap,id=net{i},ifname={},script=no,downscript=no", nic.tap),
            "-device",
            &format!("virtio-net-pci,netdev=net{i},mac={}", nic.mac),
        ]);
    }
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
