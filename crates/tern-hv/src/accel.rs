//! KVM or TCG. Only a host whose CPU really virtualises (the `kvm_intel` or `kvm_amd`
//! module is loaded) gets KVM: some machines expose a paravirtual `/dev/kvm` that only
//! emulates ordinary guests, and QEMU on it is slower and less faithful than TCG.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// The accelerator QEMU runs guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The `-accel` argument.
    pub fn qemu_arg(self) -> &'static str {
        match self {
            // MTTCG gives every vCPU its own thread, which the metrics and the throttle need.
            Accel::Tcg => "tcg,thread=multi",
            Accel::Kvm => "kvm",
        }
    }

    /// The `-cpu` model that goes with it.
    pub fn cpu_model(self) -> &'static str {
        match self {
            Accel::Tcg => "max",
            Accel::Kvm => "host",
        }
    }
}

/// What the probe found on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostVirt {
    /// `/sys/module/kvm_intel` or `/sys/module/kvm_amd` exists.
    pub hardware_kvm_module: bool,
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
}

/// The decision, pure: KVM needs both the hardware module and the device node.
pub fn choose(virt: HostVirt) -> Accel {
    if virt.hardware_kvm_module && virt.dev_kvm {
        Accel::Kvm
    } else {
        Accel::Tcg
    }
}

/// Looks at the host under `root` (normally `/`).
pub fn probe(root: &Path) -> HostVirt {
    let module = |m: &str| root.join("sys/module").join(m).exists();
    HostVirt {
        hardware_kvm_module: module("kvm_intel") || module("kvm_amd"),
        dev_kvm: root.join("dev/kvm").exists(),
    }
}

/// Probe this host and decide.
pub fn detect() -> Accel {
    choose(probe(Path::new("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_only_with_hardware_module_and_device() {
        let v = |m, d| HostVirt {
            hardware_kvm_module: m,
            dev_kvm: d,
        };
        assert_eq!(choose(v(true, true)), Accel::Kvm);
        assert_eq!(
            choose(v(false, true)),
            Accel::Tcg,
            "paravirtual /dev/kvm alone"
        );
        assert_eq!(choose(v(true, false)), Accel::Tcg);
        assert_eq!(choose(v(false, false)), Accel::Tcg);
    }

    #[test]
    fn probe_reads_sysfs_layout() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(choose(probe(root.path())), Accel::Tcg);
        std::fs::create_dir_all(root.path().join("sys/module/kvm")).unwrap();
        std::fs::create_dir_all(root.path().join("dev")).unwrap();
        std::fs::write(root.path().join("dev/kvm"), "").unwrap();
        assert_eq!(
            choose(probe(root.path())),
            Accel::Tcg,
            "generic kvm module only"
        );
        std::fs::create_dir_all(root.path().join("sys/module/kvm_amd")).unwrap();
        assert_eq!(choose(probe(root.path())), Accel::Kvm);
    }
}
