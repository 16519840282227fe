//! `tern lab` end to end (needs root): up 2 hosts with shaped links (a lab CA, agents
//! serving mutual TLS only, as by default), the hosts reach each other, status reports
//! healthy agents, a VM with a NIC runs on a host through `tern agent vm` with the
//! operator's certificate, bad input exits with status 2, and down stops the VMs and
//! leaves nothing of the lab behind, no QEMU either. The manager adopts the lab's CA and
//! moves a VM between its agents. Plain HTTP only when asked (`--insecure-plain-http`).

use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tern(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env("TERN_STATE", state)
        // The agents boot only images under the cache the test builds its image in.
        .env("TERN_CACHE", tern_testkit::test_cache_dir())
        .output()
        .expect("tern runs")
}

fn json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "tern failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

/// `tern agent vm --agent URL CREDENTIAL ARGS...`; the credential is `--tls-dir DIR` or
/// `--token-file FILE`.
fn agent_vm(st: &Path, url: &str, credential: (&str, &str), args: &[&str]) -> Output {
    let mut a = vec!["agent", "vm", "--agent", url, credential.0, credential.1];
    a.extend_from_slice(args);
    tern(st, &a)
}

fn lab_leftovers(index: u64) -> Vec<String> {
    let ns = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    let links = String::from_utf8_lossy(
        &Command::new("ip")
            .args(["-o", "link"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    let prefix = format!("tern-{index}-");
    ns.lines()
        .chain(links.lines())
        .filter(|l| l.contains(&prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn lab_up_status_vm_down() {
    if !tern_testkit::require_lab("the lab test", &[]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path();

    let bad = tern(st, &["lab", "up", "--hosts", "0"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    assert_eq!(
        tern(st, &["lab", "status"]).status.code(),
        Some(2),
        "no lab yet"
    );

    let up = json(&tern(
        st,
        &["lab", "up", "--hosts", "2", "--link-mbit", "1000", "--json"],
    ));
    let index = up["index"].as_u64().unwrap();
    let hosts = up["hosts"].as_array().unwrap();
    assert_eq!(hosts.len(), 2);
    let h2_addr = hosts[1]["addr"].as_str().unwrap();
    let h1_url = hosts[0]["url"].as_str().unwrap().to_string();
    // TLS unless asked otherwise; per host, what an operator needs to call its agent.
    assert!(h1_url.starts_with("https://"), "{h1_url}");
    for k in ["ca_file", "cert_file", "key_file"] {
        let f = hosts[0][k]
            .as_str()
            .unwrap_or_else(|| panic!("no {k}: {up}"));
        assert!(Path::new(f).is_file(), "{k} {f}");
    }
    assert!(hosts[0]["token_file"].is_null(), "{up}");
    let tls_dir = hosts[0]["tls_dir"].as_str().unwrap().to_string();

    // A second lab in the same state directory is refused.
    assert_eq!(
        tern(st, &["lab", "up", "--hosts", "1"]).status.code(),
        Some(2)
    );

    // The hosts reach each other through the switch (bounded: 3 probes, 2 s each).
    let ping = Command::new("ip")
        .args(["netns", "exec", hosts[0]["netns"].as_str().unwrap()])
        .args(["ping", "-c", "3", "-i", "0.2", "-W", "2", h2_addr])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "{}",
        String::from_utf8_lossy(&ping.stdout)
    );

    let status = json(&tern(st, &["lab", "status", "--json"]));
    for h in status["hosts"].as_array().unwrap() {
        assert_eq!(h["agent_running"], true, "{h}");
        assert!(h["report"].is_object(), "{h}");
    }

    // A VM with a NIC on host 1: its tap joins the host's bridge; its RAM is on tmpfs.
    let vm = |args: &[&str]| {
        let mut a = vec![
            "agent",
            "vm",
            "--agent",
            &h1_url,
            "--tls-dir",
            &tls_dir,
            "--json",
        ];
        a.extend_from_slice(args);
        tern(st, &a)
    };
    let created = json(&vm(&[
        "create",
        "box",
        "--memory-mib",
        "64",
        "--nic",
        "auto",
    ]));
    assert_eq!(created["state"], "running");
    let ram = created["memory_file"].as_str().unwrap().to_string();
    assert!(ram.starts_with("/dev/shm/"), "{ram}");
    assert!(std::path::Path::new(&ram).exists());
    assert_eq!(json(&vm(&["list"])).as_array().unwrap().len(), 1);
    assert_eq!(vm(&["show", "ghost"]).status.code(), Some(2), "unknown VM");
    assert_eq!(
        vm(&["create", "nomem"]).status.code(),
        Some(2),
        "spec without memory"
    );
    // A real guest on host 1 with an address on the lab's segment answers a ping from
    // host 2: guests share one L2 network across hosts, so an address survives a move.
    let img = tern_hv::image::ensure_image(&tern_testkit::test_cache_dir(), &mut |s| {
        eprintln!("image: {s}")
    })
    .expect("guest image builds");
    let guest_ip = format!("198.18.{index}.100");
    let cmdline = format!("{} tern.ip={guest_ip}/24 tern.hostname=g1", img.cmdline);
    let kernel = img.kernel.to_string_lossy().into_owned();
    let initrd = img.initramfs.to_string_lossy().into_owned();
    let g = json(&vm(&[
        "create",
        "g1",
        "--memory-mib",
        "256",
        "--nic",
        "auto",
        "--kernel",
        &kernel,
        "--initramfs",
        &initrd,
        "--cmdline",
        &cmdline,
    ]));
    assert_eq!(g["state"], "running");
    let t0 = std::time::Instant::now();
    loop {
        let p = Command::new("ip")
            .args(["netns", "exec", hosts[1]["netns"].as_str().unwrap()])
            .args(["ping", "-c", "1", "-W", "1", &guest_ip])
            .output()
            .unwrap();
        if p.status.success() {
            eprintln!("guest reachable from h2 after {:?}", t0.elapsed());
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(90),
            "guest {guest_ip} on h1 never answered h2"
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }

    // Agents leave their guests running when they stop: down stops the VMs first.
    assert_eq!(
        tern_testkit::qemus_under(st).len(),
        2,
        "{:?}",
        tern_testkit::qemus_under(st)
    );
    let down = tern(st, &["lab", "down", "--json"]);
    let removed = json(&down);
    let removed: Vec<&str> = removed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(removed.contains(&"VM box on h1"), "{removed:?}");
    assert!(removed.contains(&"VM g1 on h1"), "{removed:?}");
    assert!(
        !removed.iter().any(|r| r.starts_with("QEMU process")),
        "a QEMU had to be killed: {removed:?}"
    );
    assert!(
        tern_testkit::qemus_under(st).is_empty(),
        "{:?}",
        tern_testkit::qemus_under(st)
    );
    assert!(
        lab_leftovers(index).is_empty(),
        "{:?}",
        lab_leftovers(index)
    );
    assert!(!std::path::Path::new(&ram).exists(), "guest RAM removed");
    assert!(!st.join("lab").exists(), "lab directory removed");
    assert_eq!(
        tern(st, &["lab", "down"]).status.code(),
        Some(2),
        "nothing left to remove"
    );
}

/// Takes the lab and the manager down however the test ends.
struct TlsTeardown<'a> {
    state: &'a Path,
    manager: Option<Child>,
}

impl Drop for TlsTeardown<'_> {
    fn drop(&mut self) {
        if let Some(m) = &mut self.manager {
            let _ = m.kill();
            let _ = m.wait();
        }
        let _ = tern(self.state, &["lab", "down"]);
    }
}

#[test]
fn a_tls_lab_serves_only_mutual_tls_and_the_manager_adopts_its_ca() {
    if !tern_testkit::require_lab("the TLS lab test", &[]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path();
    let up = json(&tern(st, &["lab", "up", "--hosts", "2", "--json"]));
    let mut down = TlsTeardown {
        state: st,
        manager: None,
    };
    let h1 = &up["hosts"][0];
    let url = h1["url"].as_str().unwrap();
    assert!(url.starts_with("https://"), "{url}");
    let tls_dir = h1["tls_dir"].as_str().unwrap();
    assert!(Path::new(h1["ca_file"].as_str().unwrap()).exists());
    let token_file = up["token_file"].as_str().unwrap();

    // The operator's certificate is what calling an agent takes; the token is not.
    let listed = json(&agent_vm(
        st,
        url,
        ("--tls-dir", tls_dir),
        &["list", "--json"],
    ));
    assert_eq!(listed, serde_json::json!([]));
    let refused = agent_vm(st, url, ("--token-file", token_file), &["list"]);
    assert!(
        !refused.status.success(),
        "a plain token reached a TLS agent"
    );

    // The manager adopts the lab CA and registers the enrolled hosts by hand.
    let ca = up["ca_dir"].as_str().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let db = st.join("manager.db");
    down.manager = Some(
        Command::new(env!("CARGO_BIN_EXE_tern"))
            .args([
                "manager",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--ca",
                ca,
            ])
            .args(["--db", db.to_str().unwrap(), "--token-file", token_file])
            .env("TERN_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(st.join("manager.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let manager = format!("https://127.0.0.1:{port}");
    let ca_cert = format!("{ca}/ca.pem");
    let cli = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend([
            "--manager",
            &manager,
            "--ca-cert",
            &ca_cert,
            "--token-file",
            token_file,
        ]);
        tern(st, &a)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cli(&["host", "list"]).status.success() {
        assert!(Instant::now() < deadline, "the manager did not come up");
        std::thread::sleep(Duration::from_millis(200));
    }
    for h in up["hosts"].as_array().unwrap() {
        let r = cli(&[
            "host",
            "register",
            h["name"].as_str().unwrap(),
            "--address",
            h["url"].as_str().unwrap(),
            "--cpus",
            "2",
            "--memory-mib",
            "1024",
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    // The manager places a VM over mutual TLS, and moves it: the source agent calls the
    // destination with its own host certificate.
    let created = cli(&["vm", "create", "g", "--memory-mib", "256", "--host", "h1"]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let on = |host: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = json(&cli(&["vm", "show", "g", "--json"]));
            if v["state"] == "running" && v["observed_host"] == host {
                return;
            }
            let log = std::fs::read_to_string(st.join("manager.log")).unwrap_or_default();
            assert!(
                Instant::now() < deadline,
                "g not running on {host}: {v}\n{log}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    on("h1");
    let moved = cli(&["vm", "migrate", "g", "--to", "h2"]);
    assert!(
        moved.status.success(),
        "{}",
        String::from_utf8_lossy(&moved.stderr)
    );
    on("h2");
    assert!(cli(&["vm", "delete", "g"]).status.success());
}

#[test]
fn plain_http_only_with_insecure_plain_http() {
    if !tern_testkit::require_lab("the plain-HTTP lab test", &[]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let st = tmp.path();
    let up = json(&tern(
        st,
        &[
            "lab",
            "up",
            "--hosts",
            "1",
            "--insecure-plain-http",
            "--json",
        ],
    ));
    let down = TlsTeardown {
        state: st,
        manager: None,
    };
    let h1 = &up["hosts"][0];
    let url = h1["url"].as_str().unwrap();
    assert!(url.starts_with("http://"), "{url}");
    assert!(up["ca_dir"].is_null() && h1["tls_dir"].is_null(), "{up}");
    // Per host: the token its agent takes.
    let token_file = h1["token_file"].as_str().unwrap();
    let listed = json(&agent_vm(
        st,
        url,
        ("--token-file", token_file),
        &["list", "--json"],
    ));
    assert_eq!(listed, serde_json::json!([]));
    drop(down);
    assert!(!st.join("lab").exists(), "lab directory removed");
}
