//! The catalogue end to end, as an operator drives it (needs root, QEMU, qemu-img): a
//! 2-host lab whose agents report to a `tern manager` on the lab's CA; `tern image
//! import minimal` uploads tern's guest image, `tern template create default` puts a
//! blank data disk on virtio-scsi beside it (`/dev/sda` in the guest), and `tern vm create g1` with nothing but a name boots that
//! image on h1: the agent copies the image's files from the manager over its
//! authenticated link into the shared store. The guest writes its disk, moves to h2
//! through the manager, and its disk holds every write. Bad input (an image file that is
//! not qcow2 or raw, an unknown template, disks larger than the store) exits 2 and
//! creates nothing; an image in use is not deleted.

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

    /// `tern agent vm guest g1 REQUEST...` on `host`, retried while the guest boots or
    /// its channel reconnects after a move.
    fn guest(&self, host: &str, req: &[&str]) -> Value {
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
            a.extend(["guest", "g1"]);
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
            "give virtio-blk (the default) or virtio-scsi",
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
    assert!(
        check["result"]["counter"].as_u64().unwrap() >= restored,
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
/// and `tern vm ssh` logs in with the matching private key.
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
    // Another key is refused.
    let other = st.join("other");
    Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .unwrap();
    let o = lab.ssh(&["deb1", "-i", other.to_str().unwrap(), "--", "true"]);
    assert!(!o.status.success(), "a key never given logs in");
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
