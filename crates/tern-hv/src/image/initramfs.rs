//! The guest's initramfs: a gzip-compressed `newc` cpio archive holding busybox,
//! `tern-guest`, the kernel modules and the `/init` script.
//!
//! The archive is written by hand (the format is a 110-byte ASCII header per entry)
//! so that its bytes depend only on its inputs: inode numbers count up, times are 0,
//! owners are root. Same inputs, same image, same hash.

use std::io::Write;

use flate2::write::GzEncoder;
use flate2::Compression;

/// An initramfs being assembled, entry by entry.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    next_ino: u32,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            self.next_ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, (0, 0), b"");
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, S_IFREG | mode, (0, 0), data);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | 0o600, (major, minor), b"");
    }

    /// The archive with its trailer, uncompressed.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), b"");
        self.out
    }
}

/// gzip at the default level (the kernel unpacks it; the level matters little).
pub fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(Vec::with_capacity(data.len() / 2), Compression::default());
    enc.write_all(data)?;
    enc.finish()
}

/// Everything that goes into the initramfs.
pub struct Contents<'a> {
    pub busybox: &'a [u8],
    pub tern_guest: &'a [u8],
    pub kernel_release: &'a str,
    /// Module name and uncompressed bytes, in load order.
    pub modules: &'a [(String, Vec<u8>)],
}

/// Builds the (uncompressed) cpio archive.
pub fn archive(c: &Contents<'_>) -> Vec<u8> {
    let mut a = Cpio::default();
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "etc",
        "root",
        "lib",
        "lib/modules",
    ] {
        a.dir(d);
    }
    // The kernel opens /dev/console for /init's stdio before devtmpfs is mounted.
    a.char_dev("dev/console", 5, 1);
    a.char_dev("dev/null", 1, 3);
    a.file("bin/busybox", 0o755, c.busybox);
    a.symlink("bin/sh", "busybox");
    a.file("bin/tern-guest", 0o755, c.tern_guest);
    let mod_dir = format!("lib/modules/{}", c.kernel_release);
    a.dir(&mod_dir);
    for (name, bytes) in c.modules {
        a.file(&format!("{mod_dir}/{name}.ko"), 0o644, bytes);
    }
    let names: Vec<&str> = c.modules.iter().map(|(n, _)| n.as_str()).collect();
    a.file(
        "init",
        0o755,
        init_script(c.kernel_release, &names).as_bytes(),
    );
    a.finish()
}

/// The guest's `/init` (PID 1): mounts, modules, network from the kernel command line,
/// a root shell on the serial console, then `tern-guest`, restarted if it ever exits.
///
/// Kernel command-line parameters it reads:
/// - `tern.ip=ADDR/PREFIX` for eth0 (no address: eth0 stays down),
/// - `tern.gw=ADDR` default route,
/// - `tern.hostname=NAME`,
/// - `tern.verifier_mib=N` sizes the verifier the agent starts at boot (0: none).
///
/// The host name, address and gateway of the host's fw_cfg item (`guest_config`), when
/// there is one, take the place of `tern.hostname`, `tern.ip` and `tern.gw`.
pub fn init_script(kernel_release: &str, modules: &[&str]) -> String {
    format!(
        r#"#!/bin/sh
# tern guest init (PID 1). Serial console: ttyS0. Control channel: virtio-serial
# port org.tern.guest, else ttyS1; served by /bin/tern-guest.
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /dev/pts /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs tmpfs /run
echo "tern-init: kernel $(uname -r), loading modules"
for m in {modules}; do
  insmod /lib/modules/{kernel_release}/$m.ko || echo "tern-init: insmod $m failed"
done
ip_addr= gw= name=tern-guest verifier_mib=4
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    tern.ip=*) ip_addr="${{arg#tern.ip=}}" ;;
    tern.gw=*) gw="${{arg#tern.gw=}}" ;;
    tern.hostname=*) name="${{arg#tern.hostname=}}" ;;
    tern.verifier_mib=*) verifier_mib="${{arg#tern.verifier_mib=}}" ;;
  esac
done
# The host's fw_cfg configuration (the manager's address for the VM, its name) wins
# over the command line.
if [ -e /sys/firmware/qemu_fw_cfg/by_name/opt/tern/config/raw ]; then
  if vars=$(/bin/tern-guest apply-config --shell); then
    eval "$vars"
    [ -n "$tern_hostname" ] && name="$tern_hostname"
    [ -n "$tern_address" ] && ip_addr="$tern_address" && gw="$tern_gateway"
  fi
fi
hostname "$name" && echo "tern-init: host name $name"
ip link set lo up
if [ -n "$ip_addr" ]; then
  i=0
  while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  ip link set eth0 up && ip addr add "$ip_addr" dev eth0 && echo "tern-init: eth0 $ip_addr"
  [ -n "$gw" ] && ip route add default via "$gw"
fi
[ -e /dev/ttyS1 ] && stty -F /dev/ttyS1 raw -echo 115200 2>/dev/null
# A root shell on the serial console (`tern vm console`), as a test image offers: its
# own session with ttyS0 as controlling terminal, so Ctrl-C reaches what it runs.
(while true; do setsid -c sh -l </dev/ttyS0 >/dev/ttyS0 2>&1; sleep 1; done) &
echo "tern-init: starting tern-guest"
while true; do
  /bin/tern-guest --verifier-mib "$verifier_mib"
  echo "tern-init: tern-guest exited with $?, restarting in 1 s"
  sleep 1
done
"#,
        modules = modules.join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the entries back (name, mode, data) to check the layout.
    fn entries(a: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut off = 0;
        let hex = |b: &[u8]| u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap();
        loop {
            assert_eq!(&a[off..off + 6], b"070701");
            let field = |i: usize| hex(&a[off + 6 + i * 8..off + 14 + i * 8]);
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name = String::from_utf8(a[off + 110..off + 110 + namesize - 1].to_vec()).unwrap();
            let data_off = (off + 110 + namesize).next_multiple_of(4);
            let data = a[data_off..data_off + size].to_vec();
            off = (data_off + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(off, a.len());
                return out;
            }
            out.push((name, mode, data));
        }
    }

    #[test]
    fn archive_round_trips_and_is_deterministic() {
        let mods = vec![
            ("virtio".to_string(), b"\x7fELFv".to_vec()),
            ("virtio_net".to_string(), b"\x7fELFn".to_vec()),
        ];
        let c = Contents {
            busybox: b"BB",
            tern_guest: b"TG!",
            kernel_release: "6.1.0-56-cloud-amd64",
            modules: &mods,
        };
        let a = archive(&c);
        assert_eq!(a, archive(&c));
        let e = entries(&a);
        let find = |n: &str| {
            e.iter()
                .find(|x| x.0 == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(find("bin/busybox").2, b"BB");
        assert_eq!(find("bin/sh").1 & 0o170_000, S_IFLNK);
        assert_eq!(find("bin/tern-guest").1 & 0o777, 0o755);
        assert_eq!(find("dev/console").1 & 0o170_000, S_IFCHR);
        assert_eq!(
            find("lib/modules/6.1.0-56-cloud-amd64/virtio_net.ko").2,
            b"\x7fELFn"
        );
        let init = String::from_utf8(find("init").2.clone()).unwrap();
        assert!(init.contains("for m in virtio virtio_net; do"), "{init}");
        assert!(init.contains("insmod /lib/modules/6.1.0-56-cloud-amd64/$m.ko"));
        // Every directory comes before what it holds.
        let pos = |n: &str| e.iter().position(|x| x.0 == n).unwrap();
        assert!(
            pos("lib/modules/6.1.0-56-cloud-amd64")
                < pos("lib/modules/6.1.0-56-cloud-amd64/virtio.ko")
        );
    }

    #[test]
    fn gzip_round_trips() {
        use std::io::Read;
        let data = archive(&Contents {
            busybox: b"x",
            tern_guest: b"y",
            kernel_release: "r",
            modules: &[],
        });
        let gz = gzip(&data).unwrap();
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut back)
            .unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn init_shell_syntax_is_valid() {
        // `sh -n` parses without running; /bin/sh is on every host that runs tests.
        let script = init_script("6.1.0-1-cloud-amd64", &["virtio", "virtio_net"]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("init");
        std::fs::write(&p, script).unwrap();
        let st = std::process::Command::new("sh")
            .arg("-n")
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
    }
}
