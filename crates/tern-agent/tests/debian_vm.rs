//! The Debian image through the agent on real QEMU: a VM boots from a root disk overlay
//! on the image, with its kernel and initrd, a NIC on a bridge and a guest config
//! (host name, ssh key, static address) handed over fw_cfg; `tern-guest` answers on the
//! usual channel, and ssh with the configured key logs in as root at the configured
//! address and finds the configured host name, and a `virtio_scsi` disk under its
//! stable name `/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_NAME`; a second VM boots
//! from a root disk on virtio-scsi. A bad guest config is refused with 400.
//!
//! Needs root (debootstrap for the first build, taps and a bridge); the image is built
//! once into the shared test cache, later runs reuse it.

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use tern_hv::disk::Store;
use tern_hv::image::debian::{ensure_debian_image_async, DebianImage};
use tern_hv::VmState;

mod qemu_agent;
use qemu_agent::{Bridge, QemuAgent};

/// A subnet the other tests and the lab do not use (they use 198.18.0.0/15's lower half).
const HOST_ADDR: &str = "198.19.254.1";
const GUEST_ADDR: &str = "198.19.254.10";

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The image's root disk in the store's `images/` under the name the spec uses: a hard
/// link where the store and the cache share a filesystem, else a copy.
fn install(img: &DebianImage, store: &Store) -> String {
    let name = img.store_name();
    let to = store.images_dir().join(&name);
    if std::fs::hard_link(&img.root_disk, &to).is_err() {
        std::fs::copy(&img.root_disk, &to).unwrap();
    }
    name
}

/// A fresh ed25519 key pair in `dir`: (private key path, public key line).
fn keypair(dir: &Path) -> (std::path::PathBuf, String) {
    let key = dir.join("id_ed25519");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "tern-test", "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen runs (package openssh-client)");
    assert!(st.success());
    let public = std::fs::read_to_string(key.with_extension("pub")).unwrap();
    (key, public.trim().to_string())
}

/// `ssh root@GUEST_ADDR command` with `key`, no host-key prompts; stdout on success.
fn ssh(key: &Path, command: &str) -> Result<String, String> {
    let out = Command::new("ssh")
        .args([
            "-i",
            &key.display().to_string(),
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "ConnectTimeout=5",
            &format!("root@{GUEST_ADDR}"),
            command,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn spec(img: &DebianImage, disk: &str, guest_config: Value) -> Value {
    json!({
        "vcpus": 1,
        "memory_mib": 512,
        "kernel": img.kernel,
        "initramfs": img.initrd,
        "cmdline": img.cmdline,
        "disks": [{"name": "root", "image": disk},
                  {"name": "scratch", "size_mib": 8, "bus": "virtio_scsi"}],
        "nics": [{}],
        "guest_config": guest_config,
    })
}

/// Waits until `vm`'s `tern-guest` answers a ping: systemd boots in tens of seconds
/// under TCG, and tern-guest is a service in it.
async fn pong(a: &QemuAgent, vm: &str, started: Instant, console: &Path) {
    let pong = loop {
        match a.c.guest(vm, &json!({"cmd": "ping"})).await {
            Ok(p) => break p,
            Err(e) if started.elapsed() < Duration::from_secs(240) => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!(
                "tern-guest never answered: {e}\nconsole:\n{}",
                std::fs::read_to_string(console).unwrap_or_default()
            ),
        }
    };
    assert_eq!(pong["result"]["kind"], "pong", "{pong}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_boots_from_its_disk_and_takes_its_config_over_fw_cfg() {
    if !tern_testkit::require_qemu() {
        return;
    }
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "the Debian image test needs root"
        );
        eprintln!("SKIP: the Debian image test needs root (debootstrap, taps, a bridge)");
        return;
    }
    let t0 = Instant::now();
    let img =
        ensure_debian_image_async(tern_testkit::test_cache_dir(), |s| eprintln!("image: {s}"))
            .await
            .expect("the Debian image builds");
    eprintln!("debian image ready after {:?}", t0.elapsed());

    // Not /tmp: the store needs O_DIRECT, which tmpfs may lack.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Store::open(&dir.path().join("store")).unwrap();
    let disk = install(&img, &store);
    let bridge = Bridge::new("tdeb", HOST_ADDR);
    let a = QemuAgent::start_bridged(
        "h1",
        dir,
        Some(store),
        Some(bridge.0.clone()),
        Duration::from_secs(60),
    )
    .await;
    let keys = tempfile::tempdir().unwrap();
    let (key, public) = keypair(keys.path());

    // A bad config is refused before anything starts, the field named.
    let create = |id: &str, spec: Value| {
        serde_json::from_value::<tern_agent::vms::CreateVm>(json!({"id": id, "spec": spec}))
            .unwrap()
    };
    for (cfg, says) in [
        (
            json!({"hostname": "no_underscores"}),
            "guest_config: hostname",
        ),
        (
            json!({"ssh_authorized_keys": ["not a key"]}),
            "ssh_authorized_keys[0]",
        ),
        (json!({"address": "198.19.254.10"}), "ADDR/PREFIX"),
    ] {
        let e =
            a.c.create_vm(&create("bad", spec(&img, &disk, cfg.clone())))
                .await
                .unwrap_err();
        assert_eq!(e.status(), Some(400), "{cfg}: {e}");
        assert!(e.to_string().contains(says), "{cfg}: {e}");
    }
    assert!(a.c.list_vms().await.unwrap().is_empty());

    let config = json!({
        "hostname": "deb-one",
        "ssh_authorized_keys": [public],
        "address": format!("{GUEST_ADDR}/24"),
        "gateway": HOST_ADDR,
        "dns": [HOST_ADDR],
    });
    let started = Instant::now();
    let v =
        a.c.create_vm(&create("deb1", spec(&img, &disk, config)))
            .await
            .unwrap();
    assert_eq!(v.info.state, VmState::Running);
    let console = v.info.console_log.clone().unwrap();

    pong(&a, "deb1", started, &console).await;
    let to_agent = started.elapsed();
    eprintln!("boot-to-agent: {:.1} s", to_agent.as_secs_f64());

    // sshd starts after the config is applied and its host key is made.
    let out = loop {
        match ssh(
            &key,
            "hostname; cat /root/.ssh/authorized_keys; ip -4 -o addr show eth0; \
             readlink -f /dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_scratch",
        ) {
            Ok(out) => break out,
            Err(e) if started.elapsed() < Duration::from_secs(360) => {
                let _ = e;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => panic!(
                "ssh never logged in: {e}\nconsole:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            ),
        }
    };
    eprintln!(
        "boot-to-ssh: {:.1} s\n{out}",
        started.elapsed().as_secs_f64()
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("deb-one"), "{out}");
    assert_eq!(lines.next(), Some(public.as_str()), "{out}");
    assert!(out.contains(&format!("{GUEST_ADDR}/24")), "{out}");
    // The SCSI disk has udev's stable name from its serial, the disk's name.
    assert_eq!(out.lines().last(), Some("/dev/sda"), "{out}");
    // Only the configured key logs in.
    let other_dir = tempfile::tempdir().unwrap();
    let (other, _) = keypair(other_dir.path());
    assert!(
        ssh(&other, "true").is_err(),
        "a key not configured logged in"
    );

    // The guest's own health check sees no kernel trouble in a systemd boot.
    let health = a.c.guest("deb1", &json!({"cmd": "health"})).await.unwrap();
    assert_eq!(health["result"]["ok"], true, "{health}");

    // Power-off is an orderly systemd shutdown: QEMU exits, the VM shows stopped.
    let off =
        a.c.guest("deb1", &json!({"cmd": "poweroff"}))
            .await
            .unwrap();
    assert_eq!(off["result"]["kind"], "powering-off", "{off}");
    let t1 = Instant::now();
    loop {
        // Between QEMU closing its QMP socket and the process being reaped the agent
        // may answer 500 (QMP broken pipe); the state settles once the process is gone.
        let state = match a.c.show_vm("deb1").await {
            Ok(v) if v.info.state == VmState::Stopped => break,
            Ok(v) => format!("{:?}", v.info.state),
            Err(e) => e.to_string(),
        };
        assert!(
            t1.elapsed() < Duration::from_secs(120),
            "not stopped 120 s after poweroff: {state}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("poweroff: {:.1} s", t1.elapsed().as_secs_f64());
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(log.contains("reboot: Power down"), "{log}");
    a.c.delete_vm("deb1").await.unwrap();

    // The root disk on virtio-scsi: the initrd has the driver, and a `root=` after the
    // image's wins.
    let mut scsi_root = spec(&img, &disk, json!({"hostname": "deb-scsi"}));
    scsi_root["disks"] = json!([{"name": "root", "image": disk, "bus": "virtio_scsi"}]);
    scsi_root["cmdline"] = json!(format!("{} root=/dev/sda", img.cmdline));
    let started = Instant::now();
    let v = a.c.create_vm(&create("deb2", scsi_root)).await.unwrap();
    let console = v.info.console_log.clone().unwrap();
    pong(&a, "deb2", started, &console).await;
    eprintln!(
        "boot-to-agent from a SCSI root: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    a.c.delete_vm("deb2").await.unwrap();
    a.shut().await;
    drop(bridge);
}
