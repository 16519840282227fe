//! Reading the kernel log for signs of a sick guest: oopses, panics, BUGs and the
//! corruption reports that a migration that lost memory tends to cause.
//!
//! [`scan`] is pure and also used by the host on the guest's serial console log.

/// Substrings of kernel messages that mean the guest is not healthy.
pub const PATTERNS: &[&str] = &[
    "Kernel panic",
    "Oops",
    "BUG:",
    "kernel BUG at",
    "general protection fault",
    "corruption",
    "Bad page",
    "Unable to handle",
    "invalid opcode",
    "double fault",
    "stack-protector",
    "segfault at",
];

/// The lines of `log` that match one of [`PATTERNS`].
pub fn scan(log: &str) -> Vec<String> {
    log.lines()
        .map(strip_kmsg_prefix)
        .filter(|l| PATTERNS.iter().any(|p| l.contains(p)))
        .map(str::to_string)
        .collect()
}

/// `/dev/kmsg` records look like `4,123,456789,-;message`; keep the message.
fn strip_kmsg_prefix(line: &str) -> &str {
    match line.split_once(';') {
        Some((head, msg))
            if head.split(',').count() >= 3 && head.starts_with(|c: char| c.is_ascii_digit()) =>
        {
            msg
        }
        _ => line,
    }
}

/// Reads the whole kernel ring buffer through `/dev/kmsg` without blocking.
#[cfg(target_os = "linux")]
pub fn read_kernel_log() -> std::io::Result<String> {
    use std::io::{ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    const O_NONBLOCK: i32 = 0o4000;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open("/dev/kmsg")?;
    let mut out = String::new();
    // Each read returns one record; EAGAIN marks the end of the buffer.
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                out.push_str(&String::from_utf8_lossy(&buf[..n]));
                if !out.ends_with('\n') {
                    out.push('\n');
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            // A record overwritten while we read: skip it and go on.
            Err(e) if e.raw_os_error() == Some(32) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_panics_and_corruption_only() {
        let log = "\
6,1,100,-;Linux version 6.1.0-56-cloud-amd64\n\
4,2,200,-;list_add corruption. prev->next should be next\n\
6,3,300,-;virtio_net virtio0 eth0: renamed\n\
0,4,400,-;Kernel panic - not syncing: Fatal exception\n\
[    3.1] BUG: Bad page state in process memdirty\n\
[    3.2] tern-init: starting tern-guest\n";
        let f = scan(log);
        assert_eq!(f.len(), 3, "{f:?}");
        assert!(f[0].starts_with("list_add corruption"));
        assert!(f[1].starts_with("Kernel panic"));
        assert!(f[2].contains("Bad page state"));
    }

    #[test]
    fn a_clean_boot_is_clean() {
        let log = "[    0.0] Linux version 6.1\n[    0.1] Command line: console=ttyS0 panic=-1\n[    5.5] Run /init as init process\n";
        assert!(scan(log).is_empty());
    }
}
