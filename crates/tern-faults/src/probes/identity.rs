//! Host identity and credentials (issue 8, item 1): who may call an agent or the
//! manager, where the manager and the agents send their credentials, and how secrets
//! are kept on disk and off command lines.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tern_agent::client::AgentClient;
use tern_pki::tls::client_config;
use tern_pki::{Identity, Role};

use super::kit::{self, Attacker, Findings};
use crate::{Case, FaultError, Fixture, Outcome};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "agents_refuse_callers_without_a_cluster_certificate",
            group: "identity",
            about: "every lab agent refuses a caller with no client certificate (even with the lab token), with a certificate of another CA, and plain HTTP",
            run: |f| Box::pin(agents_refuse_callers_without_a_cluster_certificate(f)),
        },
        Case {
            name: "agents_refuse_a_revoked_certificate",
            group: "identity",
            about: "an operator certificate the lab CA revokes is refused by every agent once the agents have the new revocation list (written where they re-read it)",
            run: |f| Box::pin(agents_refuse_a_revoked_certificate(f)),
        },
        Case {
            name: "the_manager_refuses_a_missing_or_wrong_token",
            group: "identity",
            about: "the manager's API answers 401 to reads and writes without a bearer token or with a wrong one, and changes nothing",
            run: |f| Box::pin(the_manager_refuses_a_missing_or_wrong_token(f)),
        },
        Case {
            name: "no_credential_goes_to_an_address_that_cannot_be_authenticated",
            group: "identity",
            about: "hosts registered at an attacker's listener (plain HTTP, another CA's certificate, a lab certificate for another address) and a migration sent to it: the listener receives no token and no client certificate",
            run: |f| Box::pin(no_credential_goes_to_an_address_that_cannot_be_authenticated(f)),
        },
        Case {
            name: "secrets_are_private_files_never_arguments",
            group: "identity",
            about: "token, key and database files are 0600, token files others can read are refused, `--token` is not an option, and no lab process carries the token on its command line",
            run: |f| Box::pin(secrets_are_private_files_never_arguments(f)),
        },
    ]
}

fn ca_pem(f: &Fixture) -> Result<String, FaultError> {
    Ok(kit::lab_ca(f)?.cert_pem().to_owned())
}

fn agent_client(
    url: &str,
    token: &str,
    ca_pem: &str,
    id: Option<&Identity>,
) -> Result<AgentClient, FaultError> {
    let tls = client_config(ca_pem, id, None)?;
    Ok(AgentClient::new_tls(
        url,
        token,
        Duration::from_secs(5),
        Some(tls),
    )?)
}

async fn agents_refuse_callers_without_a_cluster_certificate(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let ca_pem = ca_pem(f)?;
    let (alien, _) = kit::stranger(f, kit::root_ip(f)?)?;
    let mut x = Findings::default();
    for (i, h) in f.lab.hosts.iter().enumerate() {
        x.check(
            f.agents[i].host().await.is_ok(),
            format!("{}: the lab's operator certificate is refused", h.name),
        );
        let anonymous = agent_client(&h.url, &f.token, &ca_pem, None)?;
        x.check(
            anonymous.host().await.is_err(),
            format!(
                "{}: a caller with no certificate and the lab token got in",
                h.name
            ),
        );
        let foreign = agent_client(&h.url, "", &ca_pem, Some(&alien))?;
        x.check(
            foreign.host().await.is_err(),
            format!("{}: a certificate of another CA got in", h.name),
        );
        let plain_url = h.url.replacen("https://", "http://", 1);
        let plain = AgentClient::new(&plain_url, &f.token, Duration::from_secs(5))?;
        x.check(
            plain.host().await.is_err(),
            format!("{}: plain HTTP with the lab token got in", h.name),
        );
    }
    x.note(format!(
        "{} agents refused no certificate, another CA's and plain HTTP",
        f.lab.hosts.len()
    ));
    Ok(x.outcome())
}

async fn agents_refuse_a_revoked_certificate(f: &Fixture) -> Result<Outcome, FaultError> {
    let ca = kit::lab_ca(f)?;
    let name = "probe-revoked";
    let id = ca.issue(Role::Operator, name, &[])?;
    // Fresh clients for every try: a pooled connection, handshaken before the
    // revocation, stays open and proves nothing.
    let clients = || {
        f.lab
            .hosts
            .iter()
            .map(|h| agent_client(&h.url, "", ca.cert_pem(), Some(&id)))
            .collect::<Result<Vec<_>, _>>()
    };
    let mut x = Findings::default();
    for (c, h) in clients()?.iter().zip(&f.lab.hosts) {
        if let Err(e) = c.host().await {
            return Err(FaultError::Setup(format!(
                "{} refuses a fresh certificate of the lab CA before any revocation: {e}",
                h.name
            )));
        }
    }
    ca.revoke(name)?;
    let crl = ca.crl_pem()?;
    // Agents enrolled without a manager re-read the list in their identity directory.
    for h in &f.lab.hosts {
        let file = tern_pki::identity::IdentityFiles::in_dir(&h.state_dir.join("tls")).crl;
        tern_pki::files::write_public(&file, crl.as_bytes())?;
    }
    let t0 = Instant::now();
    let limit = Duration::from_secs(45);
    let mut still: Vec<String> = Vec::new();
    loop {
        still.clear();
        for (c, h) in clients()?.iter().zip(&f.lab.hosts) {
            if c.host().await.is_ok() {
                still.push(h.name.clone());
            }
        }
        if still.is_empty() || t0.elapsed() > limit {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    x.check(
        still.is_empty(),
        format!(
            "{} still let the revoked certificate in {limit:?} after the revocation",
            still.join(", ")
        ),
    );
    if still.is_empty() {
        x.note(format!(
            "every agent refused the revoked certificate {:.1} s after the revocation list changed",
            t0.elapsed().as_secs_f64()
        ));
    }
    Ok(x.outcome())
}

async fn the_manager_refuses_a_missing_or_wrong_token(f: &Fixture) -> Result<Outcome, FaultError> {
    let base = f
        .lab
        .manager_url
        .clone()
        .ok_or_else(|| FaultError::Setup("no manager URL".into()))?;
    let http = kit::https(&ca_pem(f)?, None, Duration::from_secs(10))?;
    let settings = f.manager_json(Method::GET, "/v1/balancer", None).await?;
    let before = host_states(f).await?;
    let mut changed = settings.clone();
    changed["interval_s"] = json!(7);
    let spec = json!({"vcpus": 1, "memory_mib": 64});
    let requests: Vec<(Method, &str, Option<Value>)> = vec![
        (Method::GET, "/v1/hosts", None),
        (Method::GET, "/v1/vms", None),
        (Method::GET, "/v1/events", None),
        (
            Method::POST,
            "/v1/vms",
            Some(json!({"name": "probe-token", "spec": spec})),
        ),
        (Method::PUT, "/v1/balancer", Some(changed)),
        (Method::POST, "/v1/hosts/h1/drain", Some(json!({}))),
        (Method::DELETE, "/v1/hosts/h3", None),
        (
            Method::POST,
            "/v1/hosts/h1/heartbeat",
            Some(json!({"cpu_used": 1.0})),
        ),
    ];
    let mut x = Findings::default();
    let mut refused = 0;
    for (method, path, body) in &requests {
        for token in [None, Some("wrong-token")] {
            let mut req = http.request(method.clone(), format!("{base}{path}"));
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            match kit::call(req).await {
                Ok((401, _)) => refused += 1,
                Ok((s, b)) => x.check(
                    false,
                    format!("{method} {path} with token {token:?} answered {s}: {b}"),
                ),
                Err(e) => x.check(false, format!("{method} {path}: no answer: {e}")),
            }
        }
    }
    let after = host_states(f).await?;
    x.check(
        after == before,
        format!("the hosts changed: {before:?} -> {after:?}"),
    );
    x.check(
        f.manager.vms().await?.is_empty(),
        "a VM was created without a token",
    );
    let now = f.manager_json(Method::GET, "/v1/balancer", None).await?;
    x.check(now == settings, format!("the settings changed: {now}"));
    x.note(format!(
        "{refused} requests without or with a wrong token answered 401"
    ));
    Ok(x.outcome())
}

/// Each host's name and state, as the manager lists them.
async fn host_states(f: &Fixture) -> Result<Vec<(String, Value)>, FaultError> {
    Ok(f.manager
        .hosts()
        .await?
        .into_iter()
        .map(|h| (h.name.clone(), json!(h.state)))
        .collect())
}

async fn no_credential_goes_to_an_address_that_cannot_be_authenticated(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let ip = kit::root_ip(f)?;
    let ca = kit::lab_ca(f)?;
    let (_, alien_host) = kit::stranger(f, ip)?;
    // Another CA's certificate for the right address, and a lab certificate for
    // another address (a stolen host key used elsewhere).
    let foreign = Attacker::start(ip, &alien_host).await?;
    let elsewhere: std::net::IpAddr = match ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            std::net::Ipv4Addr::new(o[0], o[1], o[2], 99).into()
        }
        v6 => v6,
    };
    let stolen = ca.issue(Role::Host, "probe-stolen", &[elsewhere])?;
    let misnamed = Attacker::start(ip, &stolen).await?;
    // Enrolled names the attacker registers its listeners under.
    ca.issue(Role::Host, "probe-foreign", &[ip])?;
    let mut x = Findings::default();
    let register = |name: &str, address: String| {
        let body = json!({"name": name, "address": address,
                          "capacity": {"cpus": 2, "memory_mib": 1024}});
        async move {
            f.manager
                .http()
                .send::<_, Value>(Method::POST, "/v1/hosts", Some(&body))
                .await
        }
    };
    let mut accepted = Vec::new();
    for (name, address) in [
        ("probe-evil", format!("http://{}", foreign.addr)),
        ("probe-evil", format!("https://{}", foreign.addr)),
        ("probe-foreign", format!("http://{}", foreign.addr)),
        ("probe-foreign", format!("https://{}", foreign.addr)),
        ("probe-stolen", format!("https://{}", misnamed.addr)),
    ] {
        match register(name, address.clone()).await {
            Ok(_) => accepted.push(name),
            Err(e) if e.status().is_some_and(|s| (400..500).contains(&s)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    // The manager calls its hosts every control round (1 s here, but up to 30 s apart
    // right after it started): wait for one, then give it a few more.
    kit::next_round(f).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;

    let by_manager = (foreign.seen(), misnamed.seen());
    x.check(
        accepted.is_empty() || by_manager.0.connections + by_manager.1.connections > 0,
        format!(
            "the manager accepted {accepted:?} and never called them: the probe measured nothing"
        ),
    );

    // An agent told to migrate a VM there: its prepare call goes to the listener.
    let vm = "probe-lure";
    kit::plain_vm(f, 0, vm).await?;
    let mut sends = Vec::new();
    for dest in [
        format!("https://{}", foreign.addr),
        format!("https://{}", misnamed.addr),
        format!("http://{}", foreign.addr),
    ] {
        let req = json!({"vm": vm, "destination": dest, "token": "probe-lure-token"});
        let r: Result<Value, _> = f.agents[0]
            .http()
            .send(Method::POST, "/v1/migrations", Some(&req))
            .await;
        match r {
            Ok(v) => {
                if let Some(id) = v["id"].as_str() {
                    wait_final(f, 0, id, Duration::from_secs(40)).await?;
                    sends.push(format!("{dest}: {}", phase_of(f, 0, id).await));
                }
            }
            Err(e) => sends.push(format!("{dest}: refused ({e})")),
        }
    }
    kit::drop_vm(f, vm).await?;
    for name in &accepted {
        let _ = f
            .manager
            .http()
            .send::<(), Value>(Method::DELETE, &format!("/v1/hosts/{name}"), None)
            .await;
    }
    let listeners = [
        ("another CA's listener", &foreign, &by_manager.0),
        (
            "a listener with a lab certificate for another address",
            &misnamed,
            &by_manager.1,
        ),
    ];
    for (who, a, manager) in listeners {
        let s = a.seen();
        if s.leaked() {
            x.leak(format!(
                "{who} received {} client certificates and {} bearer tokens ({:?})",
                s.client_certs, s.tokens, s.requests
            ));
        }
        x.note(format!(
            "{who}: {} connections from the manager and {} from the agent, {} TLS handshakes completed, nothing sent",
            manager.connections,
            s.connections - manager.connections,
            s.handshakes
        ));
    }
    x.note(format!(
        "registrations accepted: {accepted:?}; migrations: {}",
        sends.join(", ")
    ));
    Ok(x.outcome())
}

pub(super) async fn wait_final(
    f: &Fixture,
    i: usize,
    id: &str,
    limit: Duration,
) -> Result<Duration, FaultError> {
    let t0 = Instant::now();
    loop {
        let v: Value = f.agents[i]
            .http()
            .get(&format!("/v1/migrations/{id}"))
            .await?;
        let phase = v["phase"].as_str().unwrap_or("");
        if ["completed", "failed", "rolled_back", "cancelled"].contains(&phase) {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return Err(FaultError::Timeout {
                what: format!("migration {id} ends (it is {phase})"),
                limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn phase_of(f: &Fixture, i: usize, id: &str) -> String {
    let v: Result<Value, _> = f.agents[i]
        .http()
        .get(&format!("/v1/migrations/{id}"))
        .await;
    v.map(|v| {
        format!(
            "{} ({})",
            v["phase"].as_str().unwrap_or("?"),
            v["error"].as_str().unwrap_or("")
        )
    })
    .unwrap_or_else(|e| e.to_string())
}

fn mode(p: &Path) -> Option<u32> {
    std::fs::metadata(p)
        .ok()
        .map(|m| m.permissions().mode() & 0o777)
}

/// Runs `tern ARGS` (no token in its environment) for at most 10 s: its exit code and
/// standard error; a command still running then is killed and reported as `None`.
async fn tern(f: &Fixture, args: &[&str]) -> Result<(Option<i32>, String), FaultError> {
    let mut child = tokio::process::Command::new(&f.tern_binary)
        .args(args)
        .env_remove("TERN_TOKEN")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(FaultError::io("running tern"))?;
    let mut stderr = child.stderr.take();
    let read = async {
        let mut s = String::new();
        if let Some(e) = stderr.as_mut() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut s).await;
        }
        s
    };
    match tokio::time::timeout(Duration::from_secs(10), async {
        let text = read.await;
        (child.wait().await, text)
    })
    .await
    {
        Ok((status, text)) => Ok((status.ok().and_then(|s| s.code()), text)),
        Err(_) => {
            let _ = child.kill().await;
            Ok((None, String::new()))
        }
    }
}

async fn secrets_are_private_files_never_arguments(f: &Fixture) -> Result<Outcome, FaultError> {
    let mut x = Findings::default();
    let ca_dir = f
        .lab
        .ca_dir
        .clone()
        .ok_or_else(|| FaultError::Setup("the lab has no CA".into()))?;
    let mut private: Vec<PathBuf> = vec![
        f.lab.token_file.clone(),
        ca_dir.join("ca.key"),
        f.db_dir.join("manager.db"),
    ];
    for h in &f.lab.hosts {
        private.push(h.state_dir.join("tls").join("key.pem"));
        if let Some(d) = &h.tls_dir {
            private.push(d.join("key.pem"));
        }
    }
    if let Ok(rd) = std::fs::read_dir(ca_dir.join("manager")) {
        private.extend(
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with("key.pem")),
        );
    }
    for p in &private {
        match mode(p) {
            Some(m) => x.check(
                m & 0o077 == 0,
                format!("{} is mode {m:o}: others can read it", p.display()),
            ),
            None => x.check(false, format!("{} is missing", p.display())),
        }
    }
    x.note(format!("{} secret files are 0600", private.len()));

    // No lab process carries the token where every user can read it.
    let mut pids: Vec<u32> = (0..f.lab.hosts.len()).map(|i| f.agent_pid(i)).collect();
    pids.push(kit::manager_pid(f)?);
    for pid in &pids {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        x.check(
            !String::from_utf8_lossy(&cmd).contains(&f.token),
            format!("process {pid} has the lab token on its command line"),
        );
    }

    // `--token` is no option anywhere.
    for args in [
        vec!["manager", "--token", "probe-secret"],
        vec!["vm", "list", "--token", "probe-secret"],
        vec!["agent", "--token", "probe-secret"],
    ] {
        let (code, err) = tern(f, &args).await?;
        x.check(
            code == Some(2),
            format!(
                "`tern {}` was not refused: exit {code:?} {err}",
                args.join(" ")
            ),
        );
    }

    // A token file others can read is refused, by the manager and by an agent.
    let dir = kit::probe_dir(f, "secrets")?;
    let loose = dir.join("token");
    std::fs::write(&loose, "probe-secret\n").map_err(FaultError::io("writing a token file"))?;
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644))
        .map_err(FaultError::io("chmod"))?;
    let loose_s = loose.to_string_lossy().into_owned();
    let db = dir.join("m.db").to_string_lossy().into_owned();
    let state = dir.join("agent").to_string_lossy().into_owned();
    for args in [
        vec![
            "manager",
            "--listen",
            "127.0.0.1:0",
            "--db",
            &db,
            "--token-file",
            &loose_s,
        ],
        vec![
            "agent",
            "--hypervisor",
            "sim",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            &state,
            "--token-file",
            &loose_s,
        ],
    ] {
        let (code, err) = tern(f, &args).await?;
        x.check(
            code == Some(2) && err.contains("chmod 600"),
            format!(
                "`tern {}` with a token file of mode 644 was not refused (exit {code:?}): {}",
                args[0],
                err.lines().last().unwrap_or("")
            ),
        );
    }
    // Plain HTTP is for loopback only.
    let tight = dir.join("token-600");
    std::fs::write(&tight, "probe-secret\n").map_err(FaultError::io("writing a token file"))?;
    std::fs::set_permissions(&tight, std::fs::Permissions::from_mode(0o600))
        .map_err(FaultError::io("chmod"))?;
    let tight_s = tight.to_string_lossy().into_owned();
    let (code, err) = tern(
        f,
        &[
            "manager",
            "--listen",
            "0.0.0.0:0",
            "--db",
            &db,
            "--token-file",
            &tight_s,
        ],
    )
    .await?;
    x.check(
        code == Some(2),
        format!(
            "a manager serving plain HTTP on every address was not refused (exit {code:?}): {err}"
        ),
    );
    // A join token is written 0600.
    let join = dir.join("join-token");
    let ca_s = ca_dir.to_string_lossy().into_owned();
    let join_s = join.to_string_lossy().into_owned();
    let (code, err) = tern(
        f,
        &[
            "ca",
            "join-token",
            "--dir",
            &ca_s,
            "--ttl-s",
            "60",
            "--out",
            &join_s,
        ],
    )
    .await?;
    match mode(&join) {
        Some(m) => x.check(m & 0o077 == 0, format!("a join token is mode {m:o}")),
        None => x.check(
            false,
            format!("`tern ca join-token` wrote nothing (exit {code:?}): {err}"),
        ),
    }
    x.note("`--token` refused by manager, vm and agent; mode-644 token files and plain HTTP off loopback refused; join tokens 0600");
    Ok(x.outcome())
}
