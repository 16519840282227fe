//! Finding the guest's end of the control channel.
//!
//! QEMU's `virtserialport,name=org.tern.guest` appears in the guest as
//! `/dev/vportNpM`, and its name in `/sys/class/virtio-ports/vportNpM/name` (there is
//! no udev in the tern guest to make `/dev/virtio-ports/NAME` links). Without such a
//! port the agent falls back to the second UART, `/dev/ttyS1`.

use std::path::{Path, PathBuf};

/// The virtio-serial port name the host gives the control channel.
pub const PORT_NAME: &str = "org.tern.guest";

/// The UART used when no virtio-serial port carries [`PORT_NAME`].
pub const FALLBACK_UART: &str = "/dev/ttyS1";

/// The device node of the virtio port called `name` (or `name.N`, as in
/// `org.tern.guest.0`), found under `sys_root` (normally `/sys`) and `dev_root`
/// (normally `/dev`).
pub fn find_virtio_port(sys_root: &Path, dev_root: &Path, name: &str) -> Option<PathBuf> {
    let dir = sys_root.join("class/virtio-ports");
    let mut entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    entries.into_iter().find_map(|e| {
        let port_name = std::fs::read_to_string(e.path().join("name")).ok()?;
        let port_name = port_name.trim();
        let numbered = port_name
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
        (port_name == name || numbered).then(|| dev_root.join(e.file_name()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_named_port() {
        let sys = tempfile::tempdir().unwrap();
        for (port, name) in [
            ("vport0p1", "org.qemu.guest_agent.0"),
            ("vport1p1", PORT_NAME),
        ] {
            let d = sys.path().join("class/virtio-ports").join(port);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("name"), format!("{name}\n")).unwrap();
        }
        let dev = Path::new("/dev");
        assert_eq!(
            find_virtio_port(sys.path(), dev, PORT_NAME),
            Some(PathBuf::from("/dev/vport1p1"))
        );
        assert_eq!(find_virtio_port(sys.path(), dev, "other"), None);
        assert_eq!(
            find_virtio_port(sys.path(), dev, "org.qemu.guest_agent"),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(find_virtio_port(sys.path(), dev, "org.qemu"), None);
        assert_eq!(
            find_virtio_port(Path::new("/nonexistent"), dev, PORT_NAME),
            None
        );
    }
}
