//! `tern lab` end to end (needs root): up 2 hosts with shaped links, the hosts reach each
//! other, status reports healthy agents, a VM with a NIC runs on a host through
//! `tern agent vm`, bad input exits with status 2, and down leaves nothing of the lab
//! behind.

use serde_json::Value;
use std::process::{Command, Output};

fn tern(state: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env("TERN_STATE", state)
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
    let token_file = up["token_file"].as_str().unwrap().to_string();

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
            "--token-file",
            &token_file,
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
    let wrong_file = st.join("wrong-token");
    std::fs::write(&wrong_file, "wrong\n").unwrap();
    std::fs::set_permissions(
        &wrong_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let wrong = tern(
        st,
        &[
            "agent",
            "vm",
            "--agent",
            &h1_url,
            "--token-file",
            wrong_file.to_str().unwrap(),
            "list",
        ],
    );
    assert_eq!(wrong.status.code(), Some(2), "bad token");

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

    let down = tern(st, &["lab", "down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
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
