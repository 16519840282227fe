//! What a VM is made of, as a caller asks for it, and the checks that run before anything
//! is started. Validation is pure except [`VmSpec::check_paths`], which only stats files.

use crate::error::{HvError, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Largest guest the drivers accept; a typo like `memory_mib: 5120000` should be refused
/// with a message, not tried.
pub const MAX_MEMORY_MIB: u64 = 1 << 20;
/// Largest vCPU count accepted (QEMU's `pc` machine limit is far above what a host here has).
pub const MAX_VCPUS: u32 = 64;

/// A VM as the caller describes it. Host-side paths (memory file, sockets) are the
/// driver's choice and are reported back in [`crate::VmInfo`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    pub kernel: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
    /// Network interfaces, each a tap on the host's bridge.
    #[serde(default)]
    pub nics: Vec<Nic>,
}

fn one() -> u32 {
    1
}

/// One virtio NIC. The MAC travels with the VM so the guest keeps its address when it moves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// `52:54:00:xx:xx:xx`; absent: derived from the VM id, so it is stable across moves.
    #[serde(default)]
    pub mac: Option<String>,
}

impl VmSpec {
    /// Checks that do not touch the filesystem.
    pub fn validate(&self) -> Result<()> {
        if self.memory_mib == 0 {
            return Err(HvError::InvalidSpec(
                "memory_mib is missing or 0: give the guest's RAM in MiB, e.g. \"memory_mib\": 512"
                    .into(),
            ));
        }
        if self.memory_mib > MAX_MEMORY_MIB {
            return Err(HvError::InvalidSpec(format!(
                "memory_mib {} is above the limit of {MAX_MEMORY_MIB} MiB",
                self.memory_mib
            )));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(HvError::InvalidSpec(format!(
                "vcpus must be between 1 and {MAX_VCPUS}, got {}",
                self.vcpus
            )));
        }
        if self.initramfs.is_some() && self.kernel.is_none() {
            return Err(HvError::InvalidSpec(
                "initramfs given without a kernel: add \"kernel\"".into(),
            ));
        }
        if !self.cmdline.is_empty() && self.kernel.is_none() {
            return Err(HvError::InvalidSpec(
                "cmdline given without a kernel: add \"kernel\"".into(),
            ));
        }
        for (i, nic) in self.nics.iter().enumerate() {
            if let Some(mac) = &nic.mac {
                parse_mac(mac)
                    .map_err(|why| HvError::InvalidSpec(format!("nics[{i}].mac {mac:?}: {why}")))?;
            }
        }
        Ok(())
    }

    /// [`validate`](Self::validate) plus: every named file exists.
    pub fn check_paths(&self) -> Result<()> {
        self.validate()?;
        for (field, path) in [("kernel", &self.kernel), ("initramfs", &self.initramfs)] {
            if let Some(p) = path {
                if !p.is_file() {
                    return Err(HvError::MissingPath {
                        field,
                        path: p.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`, refusing multicast addresses (a NIC cannot own one).
pub fn parse_mac(s: &str) -> std::result::Result<[u8; 6], String> {
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

/// A stable MAC for NIC `index` of VM `id`, in QEMU's locally administered `52:54:00` range.
pub fn derived_mac(id: &str, index: usize) -> String {
    let h = fnv1a(format!("{id}/{index}").as_bytes());
    format!(
        "52:54:00:{:02x}:{:02x}:{:02x}",
        (h >> 16) as u8,
        (h >> 8) as u8,
        h as u8
    )
}

/// Checks a VM id: it names files, sockets and tap devices, so keep it to `[a-z0-9-]`.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 48
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(HvError::InvalidSpec(format!(
            "VM id {id:?} must be 1-48 characters of a-z, 0-9 and '-', not starting with '-'"
        )))
    }
}

/// 64-bit FNV-1a: a small, stable hash for names (not for security).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec() -> VmSpec {
        VmSpec {
            vcpus: 1,
            memory_mib: 256,
            kernel: None,
            initramfs: None,
            cmdline: String::new(),
            nics: vec![],
        }
    }

    #[test]
    fn memory_is_required() {
        let s: VmSpec = serde_json::from_str(r#"{"vcpus": 2}"#).unwrap();
        let err = s.validate().unwrap_err();
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("memory_mib"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let r: std::result::Result<VmSpec, _> =
            serde_json::from_str(r#"{"memory_mib": 1, "memroy": 2}"#);
        assert!(r.is_err());
    }

    #[test]
    fn missing_kernel_path_is_named() {
        let mut s = spec();
        s.kernel = Some("/nonexistent/vmlinuz".into());
        match s.check_paths().unwrap_err() {
            HvError::MissingPath { field, .. } => assert_eq!(field, "kernel"),
            e => panic!("unexpected {e}"),
        }
    }

    #[test]
    fn initramfs_needs_kernel() {
        let mut s = spec();
        s.initramfs = Some("/x".into());
        assert!(s.validate().is_err());
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("52:54:00:12:34:56").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x56]
        );
        assert!(parse_mac("53:54:00:12:34:56").is_err(), "multicast");
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("52:54:00:12:34:zz").is_err());
        assert_eq!(derived_mac("vm1", 0), derived_mac("vm1", 0));
        assert_ne!(derived_mac("vm1", 0), derived_mac("vm1", 1));
    }

    #[test]
    fn ids() {
        assert!(validate_id("web-1").is_ok());
        for bad in ["", "-x", "Web", "a/b", "a b", &"x".repeat(49)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn derived_macs_always_parse(id in "[a-z0-9-]{1,20}", i in 0usize..8) {
            prop_assert!(parse_mac(&derived_mac(&id, i)).is_ok());
        }

        #[test]
        fn validate_never_panics(vcpus in any::<u32>(), mem in any::<u64>()) {
            let mut s = spec();
            s.vcpus = vcpus;
            s.memory_mib = mem;
            let ok = s.validate().is_ok();
            prop_assert_eq!(ok, (1..=MAX_VCPUS).contains(&vcpus) && (1..=MAX_MEMORY_MIB).contains(&mem));
        }
    }
}
