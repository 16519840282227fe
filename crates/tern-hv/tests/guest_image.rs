//! The guest image end to end: build it (or find it cached), boot it under QEMU/TCG,
//! talk to `tern-guest` over virtio-serial (and over the fallback UART), run memdirty,
//! watch the verifier's counter advance with its checksum intact, power off, and scan
//! the console for oopses.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tern_api::guest::{Reply, WorkloadSpec};
use tern_guest::client::GuestClient;
use tern_hv::image::{ensure_image, GuestImage, ImageError};
use tern_testkit::{require_qemu as qemu_available, test_cache_dir as cache_dir};

fn image() -> GuestImage {
    ensure_image(&cache_dir(), &mut |s| eprintln!("image: {s}")).expect("guest image builds")
}

/// Kills QEMU if the test fails half-way.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How the host reaches the agent.
#[derive(Clone, Copy)]
enum Channel {
    VirtioSerial,
    /// No virtio-serial device: the agent falls back to the second UART.
    Uart,
}

fn boot(img: &GuestImage, dir: &Path, channel: Channel) -> Qemu {
    let sock = dir.join("agent.sock");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.arg("-qmp").arg(format!(
        "unix:{},server=on,wait=off",
        dir.join("qmp.sock").display()
    ));
    cmd.args(["-accel", "tcg", "-M", "pc", "-m", "512", "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&img.kernel)
        .arg("-initrd")
        .arg(&img.initramfs)
        .arg("-append")
        .arg(format!("{} tern.ip=198.18.1.10/15", img.cmdline))
        .arg("-serial")
        .arg(format!("file:{}", dir.join("console.log").display()));
    match channel {
        Channel::VirtioSerial => cmd
            .args(["-device", "virtio-serial-pci", "-chardev"])
            .arg(format!(
                "socket,id=ch0,path={},server=on,wait=off",
                sock.display()
            ))
            .arg("-device")
            .arg(format!(
                "virtserialport,chardev=ch0,name={}",
                img.control_port
            )),
        Channel::Uart => cmd
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=off", sock.display())),
    };
    let child = cmd
        .args(["-netdev", "user,id=n0,restrict=on"])
        .args(["-device", "virtio-net-pci,netdev=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu starts");
    Qemu(child)
}

fn wait_for_agent(dir: &Path) -> GuestClient {
    GuestClient::wait_ready(&dir.join("agent.sock"), Duration::from_secs(240))
        .unwrap_or_else(|e| {
            let console = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
            panic!("agent not up: {e}\nconsole:\n{console}")
        })
        .0
}

/// Asks the guest to power off and waits for its QEMU to exit.
fn power_off(mut agent: GuestClient, qemu: &mut Qemu) {
    agent.poweroff().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while qemu.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "QEMU runs on after poweroff");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn boots_and_the_agent_runs_workloads() {
    if !qemu_available() {
        return;
    }
    let img = image();
    assert!(img.modules.iter().any(|m| m == "virtio_console"));
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut qemu = boot(&img, dir.path(), Channel::VirtioSerial);
    let mut agent = wait_for_agent(dir.path());
    let boot_to_agent = started.elapsed();
    eprintln!(
        "boot-to-agent: {:.1} s (QEMU start to first pong)",
        boot_to_agent.as_secs_f64()
    );

    let Reply::Pong { uptime_s, .. } = agent.ping().unwrap() else {
        panic!("ping did not pong")
    };
    assert!(uptime_s > 0.0);
    let memdirty = WorkloadSpec::Memdirty {
        mib: 32,
        mbps: 10.0,
    };
    agent.start(memdirty).unwrap();
    let first = agent.verify().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let second = agent.verify().unwrap();
    eprintln!("verify: {first:?} -> {second:?}");
    assert!(first.ok && second.ok, "checksums match the counters");
    assert!(second.counter > first.counter, "the verifier keeps writing");

    let status = agent.status().unwrap();
    let md = status.workloads.iter().find(|w| w.name == "memdirty");
    eprintln!("memdirty: {md:?}");
    assert!(md.is_some_and(|m| m.running && m.work > 0), "{status:?}");
    assert!(status.mem_total_kib > 400_000, "{status:?}");
    // A refused request is an answer, not a hang.
    assert!(agent.stop("fork-bomb").is_err());
    let health = agent.health().unwrap();
    assert!(health.ok, "{:?}", health.findings);

    // The host side reconnects (as it does after a migration, to the new QEMU's
    // socket): the first request on each new connection is answered.
    drop(agent);
    let sock = dir.path().join("agent.sock");
    for _ in 0..3 {
        let mut again = GuestClient::connect(&sock, Duration::from_secs(10)).unwrap();
        assert!(matches!(again.ping(), Ok(Reply::Pong { .. })));
    }
    let agent = GuestClient::connect(&sock, Duration::from_secs(10)).unwrap();
    power_off(agent, &mut qemu);
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert!(
        console.contains("tern-init: starting tern-guest"),
        "{console}"
    );
    assert!(console.contains("eth0 198.18.1.10/15"), "{console}");
    let findings = tern_guest::health::scan(&console);
    assert!(findings.is_empty(), "{findings:?}");
}

/// Runs QMP commands in order (`stop`, `cont`...), checking each succeeds.
fn qmp(dir: &Path, commands: &[&str]) {
    use std::io::{BufRead, BufReader, Write};
    let s = std::os::unix::net::UnixStream::connect(dir.join("qmp.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = s;
    let mut line = String::new();
    r.read_line(&mut line).unwrap(); // greeting
    for cmd in std::iter::once("qmp_capabilities").chain(commands.iter().copied()) {
        writeln!(w, "{{\"execute\":\"{cmd}\"}}").unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if line.contains("\"return\"") {
                break;
            }
            assert!(!line.contains("\"error\""), "{cmd}: {line}");
        }
    }
}

#[test]
fn a_paused_guest_resumes_with_its_memory_intact_and_no_burst() {
    if !qemu_available() {
        return;
    }
    let img = image();
    let dir = tempfile::tempdir().unwrap();
    let mut qemu = boot(&img, dir.path(), Channel::VirtioSerial);
    let mut agent = wait_for_agent(dir.path());
    let memdirty = WorkloadSpec::Memdirty {
        mib: 64,
        mbps: 40.0,
    };
    agent.start(memdirty).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before = agent.verify().unwrap();
    let work = |a: &mut GuestClient| {
        let st = a.status().unwrap();
        st.workloads
            .iter()
            .find(|w| w.name == "memdirty")
            .unwrap()
            .work
    };
    // Held still for 3 s, as at a migration's stop-and-copy (but longer).
    qmp(dir.path(), &["stop"]);
    std::thread::sleep(Duration::from_secs(3));
    qmp(dir.path(), &["cont"]);
    let w0 = work(&mut agent);
    std::thread::sleep(Duration::from_secs(1));
    let w1 = work(&mut agent);
    let after = agent.verify().unwrap();
    assert!(before.ok && after.ok, "{before:?} {after:?}");
    assert!(after.counter > before.counter);
    // 40 MB/s is 9766 pages/s; if the guest's clock saw the pause, a catch-up burst
    // would be ~29 000 pages. (Under TCG the guest clock mostly stops with the VM.)
    let pages = w1 - w0;
    eprintln!("memdirty pages in the second after resuming: {pages}");
    assert!(
        pages < 9766 * 3 / 2,
        "burst after pause: {pages} pages in ~1 s"
    );
    assert!(agent.health().unwrap().ok);
    power_off(agent, &mut qemu);
}

#[test]
fn without_virtio_serial_the_agent_answers_on_the_second_uart() {
    if !qemu_available() {
        return;
    }
    let img = image();
    let dir = tempfile::tempdir().unwrap();
    let mut qemu = boot(&img, dir.path(), Channel::Uart);
    let mut agent = wait_for_agent(dir.path());
    let v = agent.verify().unwrap();
    assert!(v.ok, "{v:?}");
    power_off(agent, &mut qemu);
    let console = std::fs::read_to_string(dir.path().join("console.log")).unwrap();
    assert!(console.contains("serving on /dev/ttyS1"), "{console}");
}

#[test]
fn a_cached_image_is_reused_and_a_changed_input_rebuilds_once() {
    if !qemu_available() {
        return;
    }
    let first = image();
    let built_at = std::fs::metadata(&first.manifest)
        .unwrap()
        .modified()
        .unwrap();
    let again = image();
    assert_eq!(first, again);
    let still = std::fs::metadata(&again.manifest)
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(built_at, still, "a cached image is not rebuilt");

    // A different agent binary (still a static ELF: a trailing byte changes only its
    // hash) must give a different image.
    let dir = tempfile::tempdir().unwrap();
    let bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/guest/x86_64-unknown-linux-gnu/release/tern-guest");
    let mut bytes = std::fs::read(&bin).unwrap();
    bytes.push(0);
    let changed = dir.path().join("tern-guest");
    std::fs::write(&changed, bytes).unwrap();
    std::env::set_var(tern_hv::image::guest_bin::ENV_GUEST_BIN, &changed);
    let cache = tempfile::tempdir().unwrap();
    // Share the downloaded package so this needs no network.
    std::fs::create_dir_all(cache.path().join("debs")).unwrap();
    for e in std::fs::read_dir(cache_dir().join("debs"))
        .unwrap()
        .flatten()
    {
        // Only finished packages: a concurrent download's scratch directory is skipped.
        if e.path().extension().is_some_and(|x| x == "deb") {
            std::fs::copy(e.path(), cache.path().join("debs").join(e.file_name())).unwrap();
        }
    }
    // Two builders at once on an empty cache: both succeed with the same image.
    let (a, b) = std::thread::scope(|s| {
        let one = s.spawn(|| ensure_image(cache.path(), &mut |_| {}));
        let two = s.spawn(|| ensure_image(cache.path(), &mut |_| {}));
        (one.join().unwrap(), two.join().unwrap())
    });
    let (other, twin) = (a.unwrap(), b.unwrap());
    assert_eq!(other, twin);
    assert_ne!(other.key, first.key);
    assert_ne!(other.initramfs_sha256, first.initramfs_sha256);
    assert_eq!(other.kernel_sha256, first.kernel_sha256);
}

#[test]
fn a_dynamic_agent_binary_is_refused_by_name() {
    // This test binary is dynamically linked: exactly what the guest cannot run.
    std::env::set_var(
        tern_hv::image::guest_bin::ENV_GUEST_BIN,
        std::env::current_exe().unwrap(),
    );
    let cache = tempfile::tempdir().unwrap();
    match ensure_image(cache.path(), &mut |_| {}) {
        Err(e @ ImageError::GuestBinary(_)) => {
            assert!(e.is_bad_input());
            assert!(e.to_string().contains("dynamically linked"), "{e}");
        }
        // Without apt the builder stops earlier, naming the kernel package.
        Err(e @ ImageError::MissingPackage { .. }) => {
            assert!(std::env::var_os("CI").is_none(), "{e}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn without_apt_the_kernel_package_is_named() {
    // An empty PATH hides apt-cache: the error must say which package and what to do.
    let empty = tempfile::tempdir().unwrap();
    std::env::set_var("PATH", empty.path());
    let cache = tempfile::tempdir().unwrap();
    let err = ensure_image(cache.path(), &mut |_| {}).unwrap_err();
    assert!(err.is_bad_input(), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("linux-image-cloud-amd64") && msg.contains("apt"),
        "{msg}"
    );
}
