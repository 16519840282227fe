//! The catalogue end to end, as an operator drives it (needs root, QEMU, qemu-img): a
//! 2-host lab whose agents report to a `tern manager` on the lab's CA; `tern image
//! import minimal` uploads tern's guest image, `tern template create default` puts a
//! blank data disk on virtio-scsi beside it (`/dev/sda` in the guest), and `tern vm create g1` with nothing but a name boots that
//! image on h1: the agent copies the image's files from the manager over its
//! authenticated link into the shared store. The guest writes its disk, moves to h2
//! through the manager, and its disk holds every write. Bad input (an image file that is
//! not qcow2 or raw, an unknown template, disks larger than the store) exits 2 and
//! creates nothing; an image in use is not deleted. `tern vm console` reaches the
//! guest's shell through the manager on either host, and is refused without the token
//! or while the VM is stopped. A guest that panics is restarted
//! by the manager under the `restart` HA policy and left shown as panicked under
//! `leave`.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod cli_lab;

use cli_lab::{json, tern, Teardown};

struct Lab {
    // Dropped first: the lab is torn down while its state directory still exists.
    _down: Teardown,
    tmp: tempfile::TempDir,
    up: Value,
}

impl Lab {
    fn st(&self) -> &std::path::Path {
        self.tmp.path()
    }

    fn url(&self) -> &str {
        self.up["manager_url"].as_str().unwrap()
    }

    fn ca_cert(&self) -> String {
        format!("{}/ca.pem", self.up["ca_dir"].as_str().unwrap())
    }

    fn cli(&self, args: &[&str]) -> Output {
        let (url, ca) = (self.url().to_owned(), self.ca_cert());
        let token = self.up["token_file"].as_str().unwrap();
        let mut a = args.to_vec();
        a.extend(["--manager", &url, "--token-file", token, "--ca-cert", &ca]);
        tern(self.st(), &a)
    }

    /// `tern vm ssh ARGS...`: the connection options before `ssh`, whose command takes
    /// the rest of the line.
    fn ssh(&self, args: &[&str]) -> Output {
        let (url, ca) = (self.url().to_owned(), self.ca_cert());
        let token = self.up["token_file"].as_str().unwrap();
        let mut a = vec![
            "vm",
            "--manager",
            &url,
            "--token-file",
            token,
            "--ca-cert",
            &ca,
            "ssh",
        ];
        a.extend(args);
        tern(self.st(), &a)
    }

    /// `tern vm console VM ARGS...` with stdin from a pipe: types `line` (again every few
    /// seconds, as the shell may not be up yet) until `want` shows on stdout, then ends
    /// stdin, and returns what it printed once it has exited by itself.
    fn console(&self, vm: &str, args: &[&str], line: &str, want: &str) -> String {
        use std::io::{Read, Write};
        use std::sync::{Arc, Mutex};
        let (url, ca) = (self.url().to_owned(), self.ca_cert());
        let token = self.up["token_file"].as_str().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["vm", "console", vm])
            .args(args)
            .args(["--manager", &url, "--token-file", token, "--ca-cert", &ca])
            .env("TERN_STATE", self.st())
            .env_remove("TERN_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let seen = seen.clone();
            let mut out = child.stdout.take().unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = out.read(&mut buf) {
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                }
            })
        };
        let text = || String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        let mut stdin = child.stdin.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(90);
        'typing: while !text().contains(want) {
            assert!(
                Instant::now() < deadline && child.try_wait().unwrap().is_none(),
                "no {want:?} on {vm}'s console: {}\n{:?}",
                text(),
                child.wait_with_output()
            );
            stdin.write_all(format!("{line}\n").as_bytes()).unwrap();
            for _ in 0..30 {
                std::thread::sleep(Duration::from_millis(100));
                if text().contains(want) {
                    break 'typing;
                }
            }
        }
        // The end of stdin ends the attach once the console has been quiet a moment.
        drop(stdin);
        let ended = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                Instant::now() < ended,
                "tern vm console did not end with its input"
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        reader.join().unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "{status}: {err}");
        text()
    }

    /// `tern agent vm guest g1 REQUEST...` on `host`, retried while the guest boots or
    /// its channel reconnects after a move.
    fn guest(&self, host: &str, req: &[&str]) -> Value {
        self.guest_of(host, "g1", req)
    }

    /// `tern agent vm guest VM REQUEST...` on `host`, retried likewise.
    fn guest_of(&self, host: &str, vm: &str, req: &[&str]) -> Value {
        let h = self.up["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == host)
            .unwrap()
            .clone();
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            // Options first: the request takes the rest of the line.
            let mut a = vec!["agent", "vm", "--agent", h["url"].as_str().unwrap()];
            a.extend(["--tls-dir", h["tls_dir"].as_str().unwrap(), "--json"]);
            a.extend(["guest", vm]);
            a.extend(req);
            let o = tern(self.st(), &a);
            if o.status.success() {
                let v: Value = serde_json::from_slice(&o.stdout).unwrap();
                assert_eq!(v["ok"], true, "{v}");
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "guest on {host} does not answer: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

fn wait_for(what: &str, secs: u64, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !ok() {
        assert!(Instant::now() < deadline, "{what} within {secs} s");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A 2-host lab whose agents report to a `tern manager` (with `manager_args`) on the
/// lab's CA at the lab's root address, both hosts registered; `None` when the machine
/// cannot run a lab (outside CI).
fn lab_with_manager(what: &str, manager_args: &[&str]) -> Option<Lab> {
    let qemu_img = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !tern_testkit::require_lab(what, &[("qemu-img", qemu_img)]) {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path().to_path_buf();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let up = json(&tern(
        &st,
        &[
            "lab",
            "up",
            "--hosts",
            "2",
            "--link-mbit",
            "1000",
            "--manager-port",
            &port,
            "--json",
        ],
    ));
    let mut down = Teardown {
        state: st.clone(),
        manager: None,
    };
    let listen = format!("{}:{port}", up["root_addr"].as_str().unwrap());
    down.manager = Some(
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args(["manager", "--listen", &listen])
            .args(["--ca", up["ca_dir"].as_str().unwrap()])
            .arg("--db")
            .arg(st.join("manager.db"))
            .args(["--token-file", up["token_file"].as_str().unwrap()])
            .args(manager_args)
            .env_remove("TERN_TOKEN")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lab = Lab {
        _down: down,
        tmp,
        up,
    };
    wait_for("the manager answers", 20, || {
        lab.cli(&["host", "list"]).status.success()
    });
    for h in lab.up["hosts"].as_array().unwrap().clone() {
        let reg = ["host", "register", h["name"].as_str().unwrap()];
        let addr = ["--address", h["url"].as_str().unwrap()];
        json(
            &lab.cli(
                &[
                    &reg[..],
                    &addr,
                    &["--cpus", "2", "--memory-mib", "4096", "--json"],
                ]
                .concat(),
            ),
        );
    }
    Some(lab)
}

#[test]
fn a_vm_boots_a_catalogue_image_keeps_its_disk_and_moves() {
    let Some(lab) = lab_with_manager("the catalogue lab test", &[]) else {
        return;
    };
    let st = lab.st().to_path_buf();

    // The image, as an operator imports it: built into the cache if missing.
    let cache = tern_testkit::test_cache_dir();
    let cache = cache.to_str().unwrap();
    let imported = json(&lab.cli(&[
        "image", "import", "minimal", "--from", "minimal", "--cache", cache, "--json",
    ]));
    assert_eq!(imported[0]["state"], "ready", "{imported}");
    // A disk file that is neither qcow2 nor raw: refused before anything is recorded.
    let vmdk = st.join("x.vmdk");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "vmdk"])
        .arg(&vmdk)
        .arg("1M")
        .status()
        .unwrap();
    assert!(made.success());
    let kernel = imported[0]["name"].as_str().unwrap();
    assert_eq!(kernel, "minimal");
    let bad = lab.cli(&[
        "image",
        "import",
        "bad",
        "--kernel",
        vmdk.to_str().unwrap(),
        "--disk",
        vmdk.to_str().unwrap(),
    ]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("vmdk"),
        "{bad:?}"
    );
    let images = json(&lab.cli(&["image", "list", "--json"]));
    assert_eq!(images.as_array().unwrap().len(), 1, "{images}");

    json(&lab.cli(&[
        "template",
        "create",
        "default",
        "--image",
        "minimal",
        "--memory-mib",
        "256",
        "--disk",
        "data=64:virtio-scsi",
        "--json",
    ]));
    // The hosts' stores are known once the manager has polled them.
    wait_for("the hosts report their stores", 30, || {
        let h = json(&lab.cli(&["host", "show", "h1", "--json"]));
        h["store_free_mib"].is_u64()
    });
    for (args, why) in [
        (
            vec!["vm", "create", "x", "--template", "nope"],
            "no template named",
        ),
        (vec!["vm", "create", "x", "--disk", "15T"], "disk store"),
        (
            vec!["vm", "create", "x", "--disk", "1G:ide"],
            "give a bus (virtio-blk, virtio-scsi) or a store (shared, local)",
        ),
    ] {
        let o = lab.cli(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {o:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains(why),
            "{args:?}: {o:?}"
        );
    }
    assert_eq!(
        json(&lab.cli(&["vm", "list", "--json"])),
        Value::Array(vec![])
    );

    // A VM from the default template: nothing but a name (and a host, to know where).
    let vm = json(&lab.cli(&["vm", "create", "g1", "--host", "h1", "--json"]));
    assert_eq!(vm["spec"]["image"], "minimal", "{vm}");
    assert_eq!(vm["spec"]["memory_mib"], 256, "{vm}");
    assert_eq!(vm["spec"]["template"], "default", "{vm}");
    assert_eq!(vm["spec"]["disks"][0]["bus"], "virtio_scsi", "{vm}");
    wait_for("g1 runs on h1", 60, || {
        json(&lab.cli(&["vm", "show", "g1", "--json"]))["state"] == "running"
    });
    let store = std::path::Path::new(lab.up["dir"].as_str().unwrap()).join("store");
    let fetched: Vec<String> = std::fs::read_dir(store.join("images"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        fetched
            .iter()
            .any(|f| f.starts_with("minimal-") && f.ends_with(".vmlinuz")),
        "the agent copied the kernel from the manager: {fetched:?}"
    );
    lab.guest("h1", &["ping"]);
    // Its serial console through the manager, which relays it to h1's agent: the boot
    // replayed from the log, then the guest image's shell answers.
    let out = lab.console("g1", &["--log", "65536"], "echo tern-$((6*7))", "tern-42");
    assert!(out.contains("tern-init: starting tern-guest"), "{out}");
    // Refused before the upgrade without the token; an unknown VM is named.
    let url = lab.url().to_owned();
    let ca = lab.ca_cert();
    let bad_token = st.join("bad-token");
    std::fs::write(&bad_token, "nope\n").unwrap();
    std::fs::set_permissions(
        &bad_token,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let bad_token = bad_token.to_str().unwrap().to_owned();
    let o = tern(
        &st,
        &[
            "vm",
            "console",
            "g1",
            "--manager",
            &url,
            "--ca-cert",
            &ca,
            "--token-file",
            &bad_token,
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("401"), "{o:?}");
    let o = lab.cli(&["vm", "console", "nope"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no VM named"),
        "{o:?}"
    );
    lab.guest(
        "h1",
        &[
            "start",
            "diskverify",
            "--device",
            "/dev/sda",
            "--mib",
            "4",
            "--blocks-per-sec",
            "100",
        ],
    );
    std::thread::sleep(Duration::from_secs(2));
    let check = lab.guest("h1", &["disk-check"]);
    let before = check["result"]["counter"]
        .as_u64()
        .unwrap_or_else(|| panic!("{check}"));
    assert!(before > 0, "the guest wrote its disk");

    let moved = json(&lab.cli(&["vm", "migrate", "g1", "--to", "h2", "--json"]));
    assert_eq!(moved["result"]["status"], "succeeded", "{moved}");
    wait_for("g1 recorded on h2", 30, || {
        json(&lab.cli(&["vm", "show", "g1", "--json"]))["observed_host"] == "h2"
    });
    // The console follows the VM to h2's QEMU.
    lab.console("g1", &[], "echo moved-$((40+2))", "moved-42");
    std::thread::sleep(Duration::from_secs(1));
    let check = lab.guest("h2", &["disk-check"]);
    let after = check["result"]["counter"]
        .as_u64()
        .unwrap_or_else(|| panic!("{check}"));
    assert!(
        after > before,
        "every write is there and new ones land: {after} <= {before}"
    );

    // Suspended on h2, restored on h1: memory and disk come back, the writes go on.
    let v = json(&lab.cli(&["vm", "suspend", "g1", "--json"]));
    assert_eq!(v["state"], "suspended", "{v}");
    let o = lab.cli(&["vm", "migrate", "g1", "--to", "h1"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "a suspended VM does not migrate: {o:?}"
    );
    let v = json(&lab.cli(&["vm", "restore", "g1", "--host", "h1", "--json"]));
    assert_eq!(
        (&v["state"], &v["observed_host"]),
        (&"running".into(), &"h1".into()),
        "{v}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let check = lab.guest("h1", &["disk-check"]);
    let restored = check["result"]["counter"]
        .as_u64()
        .unwrap_or_else(|| panic!("{check}"));
    assert!(
        restored > after,
        "the workload runs on from memory: {restored} <= {after}"
    );
    // Stopped (the guest powers itself off), its disk grown, started again: the data
    // written before is all there.
    let v = json(&lab.cli(&["vm", "stop", "g1", "--json"]));
    assert_eq!(v["state"], "stopped", "{v}");
    let o = lab.cli(&["vm", "pause", "g1"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is stopped"),
        "{o:?}"
    );
    let o = lab.cli(&["vm", "console", "g1"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is stopped"),
        "{o:?}"
    );
    let v = json(&lab.cli(&["vm", "resize-disk", "g1", "data", "128", "--json"]));
    assert_eq!(v["spec"]["disks"][0]["size_mib"], 128, "{v}");
    let o = lab.cli(&["vm", "resize-disk", "g1", "data", "64"]);
    assert_eq!(o.status.code(), Some(2), "disks only grow: {o:?}");
    let v = json(&lab.cli(&["vm", "start", "g1", "--json"]));
    assert_eq!(v["state"], "running", "{v}");
    let check = lab.guest(
        "h1",
        &[r#"{"cmd": "disk-check", "device": "/dev/sda", "mib": 4}"#],
    );
    assert_eq!(check["result"]["ok"], true, "{check}");
    let started = check["result"]["counter"].as_u64().unwrap();
    assert!(started >= restored, "{check}");

    // Powered off from inside: the manager records it stopped (HA does not start it
    // again), and a start boots it from its disk with every write.
    lab.guest("h1", &[r#"{"cmd": "poweroff"}"#]);
    wait_for(
        "g1 recorded stopped after its guest powered off",
        60,
        || json(&lab.cli(&["vm", "show", "g1", "--json"]))["state"] == "stopped",
    );
    std::thread::sleep(Duration::from_secs(5));
    let v = json(&lab.cli(&["vm", "show", "g1", "--json"]));
    assert_eq!(
        v["state"], "stopped",
        "HA leaves a VM its guest stopped: {v}"
    );
    let o = lab.cli(&["vm", "stop", "g1"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is stopped"),
        "{o:?}"
    );
    let v = json(&lab.cli(&["vm", "start", "g1", "--json"]));
    assert_eq!(v["state"], "running", "{v}");
    let check = lab.guest(
        "h1",
        &[r#"{"cmd": "disk-check", "device": "/dev/sda", "mib": 4}"#],
    );
    assert_eq!(check["result"]["ok"], true, "{check}");
    assert!(
        check["result"]["counter"].as_u64().unwrap() >= started,
        "{check}"
    );

    // An image in use stays; once nothing uses it, it goes.
    let o = lab.cli(&["image", "delete", "minimal"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    json(&lab.cli(&["vm", "delete", "g1", "--json"]));
    wait_for("g1 is deleted", 30, || {
        json(&lab.cli(&["vm", "list", "--json"])) == Value::Array(vec![])
    });
    json(&lab.cli(&["template", "delete", "default", "--json"]));
    assert!(lab.cli(&["image", "delete", "minimal"]).status.success());
}

/// The Debian template with ssh: `tern vm create --ssh-key` hands the guest the
/// operator's key and an address from the manager's `--guest-network` through fw_cfg,
/// and `tern vm ssh` logs in with the matching private key, before and after the VM
/// moves to the other host with its root disk in the hosts' local stores; its serial
/// console shows Debian's login prompt.
#[test]
fn a_debian_vm_takes_the_operators_key_and_address_and_ssh_logs_in() {
    // The lab's hosts are 198.18.K.1, .2; the root namespace (where ssh runs) .254.
    let Some(probe) = lab_with_manager("the Debian ssh lab test", &[]) else {
        return;
    };
    let root = probe.up["root_addr"].as_str().unwrap().to_owned();
    drop(probe);
    let net = format!("{}.0/24", root.rsplit_once('.').unwrap().0);
    let lab = lab_with_manager("the Debian ssh lab test", &["--guest-network", &net]).unwrap();
    let st = lab.st().to_path_buf();
    let cache = tern_testkit::test_cache_dir();
    json(&lab.cli(&[
        "image",
        "import",
        "debian-12",
        "--from",
        "debian",
        "--cache",
        cache.to_str().unwrap(),
        "--json",
    ]));
    json(&lab.cli(&[
        "template",
        "create",
        "debian",
        "--image",
        "debian-12",
        "--memory-mib",
        "512",
        // The root disk in each host's own store, an overlay on the catalogue image
        // the host copied from the manager: the migration below copies it.
        "--disk",
        "root=2G:local",
        "--json",
    ]));
    let key = st.join("id_ed25519");
    let made = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    let pubkey = format!("{}.pub", key.display());
    let vm = json(&lab.cli(&[
        "vm",
        "create",
        "deb1",
        "--template",
        "debian",
        "--ssh-key",
        &pubkey,
        "--host",
        "h1",
        "--json",
    ]));
    assert_eq!(vm["spec"]["disks"][0]["store"], "local", "{vm}");
    let addr = vm["spec"]["address"].as_str().unwrap().to_owned();
    assert!(addr.starts_with(&net[..net.len() - 4]), "{addr} in {net}");
    let ssh = |cmd: &str| lab.ssh(&["deb1", "-i", key.to_str().unwrap(), "--", cmd]);
    let deadline = Instant::now() + Duration::from_secs(240);
    let out = loop {
        let o = ssh("hostname; ip -4 -o addr show eth0");
        if o.status.success() {
            break String::from_utf8_lossy(&o.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "ssh into deb1 never worked: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::thread::sleep(Duration::from_secs(3));
    };
    assert!(out.starts_with("deb1\n"), "{out}");
    assert!(out.contains(&addr), "{out} has {addr}");
    // Its serial console through the manager: Debian's getty on ttyS0 asks for a login.
    let out = lab.console("deb1", &[], "", "deb1 login:");
    assert!(out.contains("deb1 login:"), "{out}");
    // Another key is refused.
    let other = st.join("other");
    Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    let o = lab.ssh(&["deb1", "-i", other.to_str().unwrap(), "--", "true"]);
    assert!(!o.status.success(), "a key never given logs in");

    // Live-migrated to h2, its local root disk copied beside its memory, with a file
    // just written and a process running: the same boot (no restart), the file there,
    // the address kept, ssh still works.
    let o = ssh(
        "echo moved-$(cat /proc/sys/kernel/random/boot_id) > /root/marker && sync \
                 && { setsid sleep 100000 </dev/null >/dev/null 2>&1 & echo $! > /root/sleeper; }",
    );
    assert!(o.status.success(), "{o:?}");
    let moved = json(&lab.cli(&["vm", "migrate", "deb1", "--to", "h2", "--json"]));
    assert_eq!(moved["result"]["status"], "succeeded", "{moved}");
    wait_for("deb1 recorded on h2", 30, || {
        json(&lab.cli(&["vm", "show", "deb1", "--json"]))["observed_host"] == "h2"
    });
    let o = ssh(
        "cat /root/marker; echo moved-$(cat /proc/sys/kernel/random/boot_id); \
                 kill -0 $(cat /root/sleeper) && echo alive; ip -4 -o addr show eth0",
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{o:?}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.len() >= 3 && lines[0] == lines[1] && lines[2] == "alive",
        "the file and the process outlived the move in the same boot: {out}"
    );
    assert!(out.contains(&addr), "{out} has {addr}");
    // A NIC needs a network; a bad key is refused; nothing is created.
    let o = lab.cli(&[
        "vm",
        "create",
        "x",
        "--template",
        "debian",
        "--ssh-key",
        "/etc/hostname",
    ]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

/// The VM record's guest health state, `-` when there is none.
fn guest_state(lab: &Lab, vm: &str) -> String {
    let v = json(&lab.cli(&["vm", "show", vm, "--json"]));
    v["guest"]["state"].as_str().unwrap_or("-").to_owned()
}

/// Guest health through the manager: two VMs boot the catalogue image, one with the
/// default HA policy (`restart`), one with `leave`; both guests panic. The first is
/// power-cycled on its host and answers again, and when it panics once more (past the
/// one restart the manager allows here) is shown failed; the second stays shown as
/// panicked until its policy becomes `restart`, and after an operator's reboot is
/// restarted again when it hangs.
#[test]
fn a_panicked_guest_is_restarted_or_left_as_its_ha_policy_says() {
    // A short grace, and one restart allowed: the second panic is left failed.
    let ha = ["--guest-grace-s", "3", "--guest-max-restarts", "1"];
    let Some(lab) = lab_with_manager("the guest health lab test", &ha) else {
        return;
    };
    let cache = tern_testkit::test_cache_dir();
    let imported = json(&lab.cli(&[
        "image",
        "import",
        "minimal",
        "--from",
        "minimal",
        "--cache",
        cache.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(imported[0]["state"], "ready", "{imported}");
    json(&lab.cli(&[
        "template",
        "create",
        "default",
        "--image",
        "minimal",
        "--memory-mib",
        "256",
        "--json",
    ]));
    // Reports every 2 s instead of 30; no balancing to move the VMs meanwhile.
    assert!(lab
        .cli(&["policy", "set", "--interval-s", "2", "--enabled", "false"])
        .status
        .success());
    let bad = lab.cli(&["vm", "create", "x", "--ha-policy", "reboot"]);
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    let r = json(&lab.cli(&["vm", "create", "r1", "--host", "h1", "--json"]));
    assert_eq!(r["spec"]["ha_policy"], "restart", "{r}");
    let l = json(&lab.cli(&[
        "vm",
        "create",
        "l1",
        "--host",
        "h2",
        "--ha-policy",
        "leave",
        "--json",
    ]));
    assert_eq!(l["spec"]["ha_policy"], "leave", "{l}");
    for vm in ["r1", "l1"] {
        wait_for(&format!("{vm}'s guest ok"), 240, || {
            guest_state(&lab, vm) == "ok"
        });
    }
    let listed = lab.cli(&["vm", "list"]);
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(table.contains("GUEST") && table.contains(" ok "), "{table}");
    // The guest's processes through the manager and its host's agent: the guest agent
    // itself is exempt from freezing, and nothing is frozen outside a migration.
    let taint = lab.cli(&["vm", "taint", "r1"]);
    let text = String::from_utf8_lossy(&taint.stdout);
    assert!(taint.status.success(), "{taint:?}");
    assert!(
        text.contains("REASONS") && text.contains("not frozen"),
        "{text}"
    );
    let report = json(&lab.cli(&["vm", "taint", "r1", "--json"]));
    let agent = report["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["comm"] == "tern-guest")
        .cloned();
    assert_eq!(
        agent.map(|p| p["class"].clone()),
        Some(Value::from("exempt")),
        "{report}"
    );
    let gone = lab.cli(&["vm", "taint", "nope"]);
    assert_eq!(gone.status.code(), Some(2), "{gone:?}");
    let s = json(&lab.cli(&[
        "policy",
        "set",
        "--evacuation-policy",
        "dependency-aware",
        "--json",
    ]));
    assert_eq!(s["evacuation_policy"], "dependency-aware", "{s}");

    let t0 = Instant::now();
    for (host, vm) in [("h1", "r1"), ("h2", "l1")] {
        let v = lab.guest_of(host, vm, &["panic"]);
        assert_eq!(v["result"]["kind"], "panicking", "{v}");
    }
    wait_for("l1 shown panicked", 60, || {
        guest_state(&lab, "l1") == "panicked"
    });
    eprintln!("the manager shows the panic after {:?}", t0.elapsed());
    wait_for("r1 restarted", 120, || {
        let v = json(&lab.cli(&["vm", "show", "r1", "--json"]));
        v["restarts"]["at_ms"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
    });
    eprintln!("r1 restarted {:?} after its panic", t0.elapsed());
    wait_for("r1's guest ok again", 240, || {
        guest_state(&lab, "r1") == "ok"
    });
    eprintln!(
        "r1's guest answers again {:?} after its panic",
        t0.elapsed()
    );
    // A new boot: the guest agent's uptime started over.
    let pong = lab.guest_of("h1", "r1", &["ping"]);
    let uptime = pong["result"]["uptime_s"].as_f64().unwrap();
    assert!(uptime < t0.elapsed().as_secs_f64(), "{pong}");
    let r = json(&lab.cli(&["vm", "show", "r1", "--json"]));
    assert_eq!(
        (&r["state"], &r["observed_host"]),
        (&"running".into(), &"h1".into()),
        "{r}"
    );
    // It panics again: the one restart allowed is spent, so HA gives up and says why.
    lab.guest_of("h1", "r1", &["panic"]);
    wait_for("r1 given up", 60, || {
        let v = json(&lab.cli(&["vm", "show", "r1", "--json"]));
        v["restarts"]["failed"].is_string()
    });
    let r = json(&lab.cli(&["vm", "show", "r1", "--json"]));
    let why = r["restarts"]["failed"].as_str().unwrap();
    assert!(why.contains("panicked after 1 restarts"), "{r}");
    assert_eq!(r["guest"]["state"], "panicked", "{r}");
    let listed = lab.cli(&["vm", "list"]);
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("r1") && l.contains("failed")),
        "{table}"
    );

    // `leave`: still panicked, never restarted.
    let l = json(&lab.cli(&["vm", "show", "l1", "--json"]));
    assert_eq!(l["guest"]["state"], "panicked", "{l}");
    assert!(l["restarts"]["at_ms"].is_null(), "{l}");
    let shown = lab.cli(&["vm", "show", "l1"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("guest: panicked") && text.contains("HA policy: leave"),
        "{text}"
    );
    let events = json(&lab.cli(&["events", "--limit", "1000", "--json"]));
    let kinds: Vec<(&str, &str)> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["type"].as_str().unwrap(), e["vm"].as_str().unwrap_or("")))
        .collect();
    assert!(kinds.contains(&("vm_guest_restart", "r1")), "{kinds:?}");
    assert!(kinds.contains(&("vm_guest_failed", "r1")), "{kinds:?}");
    assert!(kinds.contains(&("vm_guest_health", "l1")), "{kinds:?}");
    assert!(!kinds.contains(&("vm_guest_restart", "l1")), "{kinds:?}");

    // Its policy changed to `restart`: HA acts on it now.
    let v = json(&lab.cli(&["vm", "ha-policy", "l1", "restart", "--json"]));
    assert_eq!(v["spec"]["ha_policy"], "restart", "{v}");
    wait_for("l1's guest ok after its policy changed", 240, || {
        guest_state(&lab, "l1") == "ok"
    });

    // An operator's reboot clears the HA record. A hang (the guest agent starved while
    // QEMU runs) is then seen as unresponsive after the agent's silence bound (20 s by
    // default), and restarted like the panic.
    let v = json(&lab.cli(&["vm", "reboot", "l1", "--json"]));
    assert!(v["restarts"].is_null(), "{v}");
    wait_for("l1's guest ok after its reboot", 240, || {
        guest_state(&lab, "l1") == "ok"
    });
    let t1 = Instant::now();
    let v = lab.guest_of("h2", "l1", &["hang"]);
    assert_eq!(v["result"]["kind"], "hanging", "{v}");
    wait_for("l1 shown unresponsive", 90, || {
        guest_state(&lab, "l1") == "unresponsive"
    });
    eprintln!("the manager shows the hang after {:?}", t1.elapsed());
    wait_for("l1 restarted after its hang and ok", 240, || {
        let v = json(&lab.cli(&["vm", "show", "l1", "--json"]));
        v["restarts"]["at_ms"]
            .as_array()
            .is_some_and(|a| a.len() == 1)
            && v["guest"]["state"] == "ok"
    });
    eprintln!("l1's guest answers again {:?} after its hang", t1.elapsed());
    for vm in ["r1", "l1"] {
        json(&lab.cli(&["vm", "delete", vm, "--json"]));
    }
    wait_for("the VMs are deleted", 60, || {
        json(&lab.cli(&["vm", "list", "--json"])) == Value::Array(vec![])
    });
}
