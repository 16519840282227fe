//! Host identity end to end with real processes: `tern manager --ca` creates the cluster
//! CA and serves HTTPS, a `tern agent --join` enrols with a one-time token and is then
//! driven over mutual TLS, an operator calls the agent with a certificate from
//! `tern ca issue` until it is revoked. (Secrets on the command line or readable by
//! others are probed against the lab in the fault suite, `tern bench faults`.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Children killed when the test ends, however it ends.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tern(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env_remove("TERN_TOKEN")
        .env_remove("TERN_MANAGER")
        .output()
        .unwrap()
}

fn spawn(args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env_remove("TERN_TOKEN")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// Polls `f` every 200 ms for up to 30 s.
fn wait_for(what: &str, mut f: impl FnMut() -> Option<Value>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn json_of(o: &Output) -> Option<Value> {
    o.status
        .success()
        .then(|| serde_json::from_slice(&o.stdout).ok())
        .flatten()
}

#[test]
fn a_host_joins_with_a_token_and_is_driven_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let token_file = d.join("api-token");
    std::fs::write(&token_file, "api-s3cret\n").unwrap();
    std::fs::set_permissions(&token_file, PermissionsExt::from_mode(0o600)).unwrap();
    let (ca, db) = (d.join("ca"), d.join("tern.db"));
    let mport = free_port();
    let listen = format!("127.0.0.1:{mport}");
    let manager_args = [
        "manager",
        "--listen",
        &listen,
        "--db",
        &s(&db),
        "--ca",
        &s(&ca),
        "--token-file",
        &s(&token_file),
    ];
    let mut procs = Procs(vec![spawn(&manager_args, &d.join("manager.log"))]);
    let url = format!("https://127.0.0.1:{mport}");
    let ca_cert = s(&ca.join("ca.pem"));
    let conn = [
        "--manager",
        url.as_str(),
        "--ca-cert",
        &ca_cert,
        "--token-file",
        &s(&token_file),
        "--json",
    ];
    let cli = |args: &[&str]| {
        let mut a = args.to_vec();
        a.extend(conn);
        tern(&a)
    };
    wait_for("the manager", || json_of(&cli(&["host", "list"])));

    // Enrol h1 with a one-time token.
    let join_token = d.join("join-token");
    let made = tern(&[
        "ca",
        "join-token",
        "--dir",
        &s(&ca),
        "--out",
        &s(&join_token),
    ]);
    assert!(made.status.success(), "{made:?}");
    let aport = free_port();
    let agent = |name: &str, port: u16| {
        let state = d.join(name);
        vec![
            "agent".to_owned(),
            "--hypervisor".into(),
            "sim".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--state-dir".into(),
            s(&state),
            "--join".into(),
            url.clone(),
            "--join-token-file".into(),
            s(&join_token),
            "--name".into(),
            name.into(),
            "--cpus".into(),
            "4".into(),
            "--memory-mib".into(),
            "4096".into(),
            "--crl-refresh-s".into(),
            "1".into(),
        ]
    };
    let a1 = agent("h1", aport);
    let a1: Vec<&str> = a1.iter().map(String::as_str).collect();
    procs.0.push(spawn(&a1, &d.join("h1.log")));
    let hosts = wait_for("h1 enrolled", || {
        json_of(&cli(&["host", "list"])).filter(|v| v.as_array().is_some_and(|a| !a.is_empty()))
    });
    assert_eq!(hosts[0]["address"], format!("https://127.0.0.1:{aport}"));

    // The token is spent: a second host cannot join with it.
    let a2 = agent("h2", free_port());
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    let second = tern(&a2);
    assert_eq!(second.status.code(), Some(2), "{second:?}");
    assert!(String::from_utf8_lossy(&second.stderr).contains("join token"));

    // The manager places a VM on h1 over mutual TLS.
    let created = cli(&["vm", "create", "v1", "--memory-mib", "64"]);
    assert!(created.status.success(), "{created:?}");
    wait_for("v1 running on h1", || {
        json_of(&cli(&["vm", "show", "v1"])).filter(|v| v["state"] == "running")
    });

    // An operator with a certificate from the CA calls the agent directly; without one,
    // even with the API token, the agent refuses.
    let op = d.join("alice");
    let issued = tern(&[
        "ca",
        "issue",
        "--dir",
        &s(&ca),
        "--name",
        "alice",
        "--out",
        &s(&op),
    ]);
    assert!(issued.status.success(), "{issued:?}");
    let agent_url = format!("https://127.0.0.1:{aport}");
    let listed = tern(&[
        "agent",
        "vm",
        "--agent",
        &agent_url,
        "--tls-dir",
        &s(&op),
        "list",
        "--json",
    ]);
    let listed = json_of(&listed).unwrap_or_else(|| panic!("{listed:?}"));
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let anon = tern(&[
        "agent",
        "vm",
        "--agent",
        &agent_url,
        "--token-file",
        &s(&token_file),
        "list",
    ]);
    assert!(!anon.status.success(), "{anon:?}");

    // Revoked, the operator is refused once the agent has fetched the new list.
    let revoked = tern(&["ca", "revoke", "--dir", &s(&ca), "alice"]);
    assert!(revoked.status.success(), "{revoked:?}");
    wait_for("alice refused", || {
        let o = tern(&[
            "agent",
            "vm",
            "--agent",
            &agent_url,
            "--tls-dir",
            &s(&op),
            "list",
        ]);
        (!o.status.success()).then_some(Value::Null)
    });

    // A second host joins with a fresh token.
    let made = tern(&[
        "ca",
        "join-token",
        "--dir",
        &s(&ca),
        "--out",
        &s(&join_token),
    ]);
    assert!(made.status.success(), "{made:?}");
    let a2 = agent("h2", free_port());
    let a2: Vec<&str> = a2.iter().map(String::as_str).collect();
    procs.0.push(spawn(&a2, &d.join("h2.log")));
    wait_for("h2 enrolled", || {
        json_of(&cli(&["host", "list"])).filter(|v| v.as_array().is_some_and(|a| a.len() == 2))
    });

    // Removing a host that still runs a VM is refused; emptied, it goes and is revoked.
    assert_eq!(cli(&["host", "remove", "h1"]).status.code(), Some(2));
    assert!(cli(&["vm", "delete", "v1"]).status.success());
    wait_for("v1 gone", || {
        (cli(&["vm", "show", "v1"]).status.code() == Some(2)).then_some(Value::Null)
    });
    for h in ["h1", "h2"] {
        let removed = cli(&["host", "remove", h]);
        assert!(removed.status.success(), "{removed:?}");
    }
    let ledger: Value =
        serde_json::from_str(&std::fs::read_to_string(ca.join("issued.json")).unwrap()).unwrap();
    assert!(ledger
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["name"] == "h1" || i["name"] == "h2")
        .all(|i| !i["revoked_at"].is_null()));
}

/// `GET url` over HTTPS showing the identity in `dir` (`ca.pem`, `cert.pem`,
/// `key.pem`) on a new connection: the status, or the error of a refused handshake.
fn get_as(dir: &Path, url: &str) -> Result<u16, reqwest::Error> {
    let id = tern_pki::Identity::load(dir).unwrap();
    let tls = tern_pki::tls::client_config(&id.ca_pem, Some(&id), None).unwrap();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async { http.get(url).send().await.map(|r| r.status().as_u16()) })
}

/// Today's holes, with real processes: hosts renewed their leases with the manager's
/// API token, and running agents and the manager checked host certificates against the
/// revocation list as of their start. Now enrolled hosts renew with their own
/// certificates (no token given to them at all), and once `tern host remove` revokes a
/// host, the manager refuses its certificate at once and a running agent within its
/// refresh period.
#[test]
fn a_removed_host_is_refused_by_the_running_agents_and_manager() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    let token_file = d.join("api-token");
    std::fs::write(&token_file, "api-s3cret\n").unwrap();
    std::fs::set_permissions(&token_file, PermissionsExt::from_mode(0o600)).unwrap();
    let (ca, db) = (d.join("ca"), d.join("tern.db"));
    let listen = format!("127.0.0.1:{}", free_port());
    let manager_args = [
        "manager",
        "--listen",
        &listen,
        "--db",
        &s(&db),
        "--ca",
        &s(&ca),
        "--token-file",
        &s(&token_file),
        "--crl-refresh-s",
        "1",
    ];
    let mut procs = Procs(vec![spawn(&manager_args, &d.join("manager.log"))]);
    let url = format!("https://{listen}");
    let ca_cert = s(&ca.join("ca.pem"));
    let cli = |args: &[&str]| {
        let mut a = args.to_vec();
        let conn = ["--manager", &url, "--ca-cert", &ca_cert];
        a.extend(conn);
        a.extend(["--token-file", token_file.to_str().unwrap(), "--json"]);
        tern(&a)
    };
    wait_for("the manager", || json_of(&cli(&["host", "list"])));
    let mut ports = Vec::new();
    for name in ["h1", "h2"] {
        let join_token = d.join(format!("{name}.join"));
        let made = tern(&[
            "ca",
            "join-token",
            "--dir",
            &s(&ca),
            "--out",
            &s(&join_token),
        ]);
        assert!(made.status.success(), "{made:?}");
        let port = free_port();
        ports.push(port);
        let listen = format!("127.0.0.1:{port}");
        let state = s(&d.join(name));
        let args = [
            "agent",
            "--hypervisor",
            "sim",
            "--listen",
            &listen,
            "--state-dir",
            &state,
            "--join",
            &url,
            "--join-token-file",
            &s(&join_token),
            "--name",
            name,
            "--cpus",
            "4",
            "--memory-mib",
            "4096",
            "--manager",
            &url,
            "--crl-refresh-s",
            "1",
        ];
        procs.0.push(spawn(&args, &d.join(format!("{name}.log"))));
    }
    // Each host renews its lease with its certificate alone.
    for name in ["h1", "h2"] {
        wait_for(&format!("{name} holds a lease"), || {
            d.join(name).join("lease").exists().then_some(Value::Null)
        });
    }

    let h2 = d.join("h2/tls");
    let h1_agent = format!("https://127.0.0.1:{}", ports[0]);
    // h2 may reach h1's incoming-migration routes (an unknown migration here), and the
    // manager's revocation list.
    let probe_agent = || get_as(&h2, &format!("{h1_agent}/v1/incoming/in-1"));
    assert_eq!(probe_agent().unwrap(), 404);
    let probe_manager = || get_as(&h2, &format!("{url}/v1/ca/crl"));
    assert_eq!(probe_manager().unwrap(), 200);

    let removed = cli(&["host", "remove", "h2"]);
    assert!(removed.status.success(), "{removed:?}");
    let t = Instant::now();
    assert!(
        probe_manager().is_err(),
        "the manager took h2 after removing it"
    );
    wait_for("h1's agent refuses h2", || {
        probe_agent().is_err().then_some(Value::Null)
    });
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "h1 refused h2 after {took:?}"
    );
    // h1 keeps its lease and its place.
    std::fs::remove_file(d.join("h1/lease")).unwrap();
    wait_for("h1 renews again", || {
        d.join("h1").join("lease").exists().then_some(Value::Null)
    });
}
