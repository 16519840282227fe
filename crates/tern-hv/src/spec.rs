//! What a VM is made of, as a caller asks for it, and the checks that run before anything
//! is started. The spec itself is `tern_api::agent::VmSpec` (it crosses the agent's API);
//! its pure checks live there, [`check_paths`] here only stats files.

use crate::error::{HvError, Result};
pub use tern_api::agent::{parse_mac, Nic, VmSpec, MAX_MEMORY_MIB, MAX_VCPUS};

/// [`VmSpec::validate`] plus: every named file exists.
pub fn check_paths(spec: &VmSpec) -> Result<()> {
    spec.validate()?;
    for (field, path) in [("kernel", &spec.kernel), ("initramfs", &spec.initramfs)] {
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
            disks: vec![],
            image: None,
            guest_config: None,
        }
    }

    #[test]
    fn memory_is_required() {
        let s: VmSpec = serde_json::from_str(r#"{"vcpus": 2}"#).unwrap();
        let err = HvError::from(s.validate().unwrap_err());
        assert!(err.is_bad_input());
        assert!(err.to_string().contains("memory_mib"), "{err}");
    }

    #[test]
    fn a_spec_read_alone_ignores_fields_it_does_not_know() {
        // A spec inside a newer agent's answer may carry fields this one lacks; the
        // servers refuse them in requests (`tern_api::request`).
        let s: VmSpec = serde_json::from_str(r#"{"memory_mib": 1, "balloon": 2}"#).unwrap();
        assert_eq!(s.memory_mib, 1);
    }

    #[test]
    fn missing_kernel_path_is_named() {
        let mut s = spec();
        s.kernel = Some("/nonexistent/vmlinuz".into());
        match check_paths(&s).unwrap_err() {
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
