//! tracefs: where the kernel describes its tracepoints (mounted here if it is not), and
//! the online CPUs from sysfs.

use crate::error::{Result, TraceError};
use crate::format::{self, Format, Layouts};
use std::path::{Path, PathBuf};

/// Where tracefs is mounted on current kernels.
pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Returns `root` once tracefs is mounted there, mounting it if it is not.
pub fn ensure_mounted(root: &Path) -> Result<PathBuf> {
    if root.join("events").is_dir() {
        return Ok(root.to_path_buf());
    }
    let bad = |reason: String| TraceError::NoTracefs {
        path: root.to_path_buf(),
        reason,
    };
    let c = |s: &str| std::ffi::CString::new(s).map_err(|e| bad(e.to_string()));
    let target = c(&root.to_string_lossy())?;
    let (source, fstype) = (c("nodev")?, c("tracefs")?);
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; no data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(bad(std::io::Error::last_os_error().to_string()));
    }
    if root.join("events").is_dir() {
        Ok(root.to_path_buf())
    } else {
        Err(bad("mounted, but it has no events directory".into()))
    }
}

/// The format of tracepoint `system:name`, `None` when the kernel does not have it.
pub fn read_format(root: &Path, system: &str, name: &str) -> Result<Option<Format>> {
    let path = root.join("events").join(system).join(name).join("format");
    match std::fs::read_to_string(&path) {
        Ok(text) => format::parse(&format!("{system}:{name}"), &text).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TraceError::Read { path, source }),
    }
}

/// The layouts of the scheduler tracepoints, and of `kvm:kvm_entry`/`kvm_exit` when
/// `kvm` is asked for and the kernel has them.
pub fn layouts(root: &Path, kvm: bool) -> Result<Layouts> {
    let need = |name: &str| {
        read_format(root, "sched", name)?
            .ok_or_else(|| TraceError::MissingTracepoint(format!("sched:{name}")))
    };
    let (kvm_entry, kvm_exit) = if kvm {
        (
            read_format(root, "kvm", "kvm_entry")?,
            read_format(root, "kvm", "kvm_exit")?,
        )
    } else {
        (None, None)
    };
    let l = Layouts {
        switch: need("sched_switch")?,
        wakeup: need("sched_wakeup")?,
        migrate: need("sched_migrate_task")?,
        kvm_entry,
        kvm_exit,
    };
    l.check()?;
    Ok(l)
}

/// The online CPUs (`/sys/devices/system/cpu/online`).
pub fn online_cpus() -> Result<Vec<u32>> {
    let path = PathBuf::from("/sys/devices/system/cpu/online");
    let text = std::fs::read_to_string(&path).map_err(|source| TraceError::Read {
        path: path.clone(),
        source,
    })?;
    parse_cpu_list(&text).ok_or_else(|| TraceError::Read {
        path,
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a CPU list: {text:?}"),
        ),
    })
}

/// Parses the kernel's CPU list syntax (`0-3,8,10-11`).
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                // The kernel never prints more CPUs than it supports (4096 today).
                if b < a || b - a > 8192 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-1\n"), Some(vec![0, 1]));
        assert_eq!(parse_cpu_list("0,2-3,7"), Some(vec![0, 2, 3, 7]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(parse_cpu_list(""), Some(vec![]));
    }

    #[test]
    fn missing_tracepoints_are_none_and_missing_sched_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_format(dir.path(), "kvm", "kvm_entry").unwrap(), None);
        let err = layouts(dir.path(), false).unwrap_err();
        assert!(
            matches!(err, TraceError::MissingTracepoint(ref n) if n == "sched:sched_switch"),
            "{err}"
        );
    }
}
