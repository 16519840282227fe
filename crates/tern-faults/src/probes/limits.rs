//! Timeouts and limits (issue 8, item 3): slow clients do not hold the servers, bodies
//! and answers are capped, an HA follower checks the token first, and the migration
//! registries stay bounded.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tern_pki::tls::{client_config, server_config, ClientAuth};
use tern_pki::{Identity, Role};

use super::identity::wait_final;
use super::kit::{self, Findings};
use crate::{Case, FaultError, Fixture, Outcome};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "half_sent_requests_and_idle_sockets_do_not_hold_the_agent",
            group: "limits",
            about: "50 requests half-sent over mutual TLS and 200 silent sockets at a lab agent: a real request is answered within a second and every slow socket is closed after the 10 s header timeout",
            run: |f| Box::pin(half_sent_requests_and_idle_sockets_do_not_hold_the_agent(f)),
        },
        Case {
            name: "half_sent_requests_and_idle_sockets_do_not_hold_the_manager",
            group: "limits",
            about: "50 requests half-sent over HTTPS and 200 silent sockets at the manager: a real request is answered within a second and every slow socket is closed after the 10 s header timeout",
            run: |f| Box::pin(half_sent_requests_and_idle_sockets_do_not_hold_the_manager(f)),
        },
        Case {
            name: "a_150_mb_answer_is_cut_at_the_client_cap",
            group: "limits",
            about: "an enrolled fake agent answers the manager's polls with 150 MB each: the manager stops reading at its cap and its resident memory stays bounded",
            run: |f| Box::pin(a_150_mb_answer_is_cut_at_the_client_cap(f)),
        },
        Case {
            name: "request_bodies_over_2_mib_are_refused",
            group: "limits",
            about: "3 MiB bodies to an agent's create, send and prepare routes and to the manager's create route are refused with 413",
            run: |f| Box::pin(request_bodies_over_2_mib_are_refused(f)),
        },
        Case {
            name: "an_ha_follower_checks_the_token_before_reading_a_body",
            group: "limits",
            about: "in-process (an HA pair needs etcd, which the lab does not run): a follower answers 8 MiB bodies without or with a wrong token 401 and refuses an authorised one over 2 MiB, never passing anything to its leader",
            run: |f| Box::pin(an_ha_follower_checks_the_token_before_reading_a_body(f)),
        },
        Case {
            name: "migration_registries_are_pruned",
            group: "limits",
            about: "an agent that sent 80 failed migrations lists at most the newest 64 finished ones (and the last one, finished since it was registered)",
            run: |f| Box::pin(migration_registries_are_pruned(f)),
        },
    ]
}

const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

async fn half_sent_requests_and_idle_sockets_do_not_hold_the_agent(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let h = &f.lab.hosts[0];
    let addr = kit::socket_of(&h.url)?;
    let tls = f
        .lab
        .tls()?
        .ok_or_else(|| FaultError::Setup("the lab has no CA".into()))?;
    let real = async { f.agents[0].host().await.is_ok() };
    let r = kit::slow_clients(addr, tls, HEADER_TIMEOUT, real).await;
    let mut x = Findings::default();
    match r {
        Ok(m) => x.note(format!("{}: {m}", h.name)),
        Err(e) => x.check(false, format!("{}: {e}", h.name)),
    }
    Ok(x.outcome())
}

async fn half_sent_requests_and_idle_sockets_do_not_hold_the_manager(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let url = f
        .lab
        .manager_url
        .clone()
        .ok_or_else(|| FaultError::Setup("no manager URL".into()))?;
    let addr = kit::socket_of(&url)?;
    let tls = client_config(kit::lab_ca(f)?.cert_pem(), None, None)?;
    let real = async { f.manager.hosts().await.is_ok() };
    let r = kit::slow_clients(addr, tls, HEADER_TIMEOUT, real).await;
    let mut x = Findings::default();
    match r {
        Ok(m) => x.note(m),
        Err(e) => x.check(false, e),
    }
    Ok(x.outcome())
}

/// What the fake agent answers every route with: 150 MB, streamed without a length.
const HUGE: u64 = 150 << 20;

/// An agent for `id` that answers every request with [`HUGE`] bytes; counts the
/// requests and the bytes the callers pulled.
async fn huge_agent(
    ip: std::net::IpAddr,
    id: &Identity,
    requests: Arc<AtomicUsize>,
    pulled: Arc<AtomicU64>,
) -> Result<(std::net::SocketAddr, tokio::sync::oneshot::Sender<()>), FaultError> {
    let answer = move || {
        requests.fetch_add(1, Ordering::SeqCst);
        let pulled = pulled.clone();
        let chunks = (0..HUGE / (64 << 10)).map(move |_| {
            pulled.fetch_add(64 << 10, Ordering::SeqCst);
            Ok::<_, std::io::Error>(vec![b' '; 64 << 10])
        });
        async move { axum::body::Body::from_stream(futures_util::stream::iter(chunks)) }
    };
    let app = axum::Router::new().fallback(answer);
    let l = tokio::net::TcpListener::bind((ip, 0))
        .await
        .map_err(FaultError::io("binding the fake agent"))?;
    let addr = l.local_addr().map_err(FaultError::io("the fake agent"))?;
    let tls = tern_pki::TlsAcceptor::new(server_config(id, None, ClientAuth::Required)?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(tern_pki::serve::serve(
        l,
        app,
        Some(tls),
        tern_pki::Limits::default(),
        async {
            let _ = stopped.await;
        },
    ));
    Ok((addr, stop))
}

async fn a_150_mb_answer_is_cut_at_the_client_cap(f: &Fixture) -> Result<Outcome, FaultError> {
    let ip = kit::root_ip(f)?;
    let name = "probe-huge";
    let id = kit::lab_ca(f)?.issue(Role::Host, name, &[ip])?;
    let requests = Arc::new(AtomicUsize::new(0));
    let pulled = Arc::new(AtomicU64::new(0));
    let (addr, stop) = huge_agent(ip, &id, requests.clone(), pulled.clone()).await?;
    let pid = kit::manager_pid(f)?;
    let before = kit::rss_kib(pid).unwrap_or(0);
    let body = json!({"name": name, "address": format!("https://{addr}"),
                      "capacity": {"cpus": 2, "memory_mib": 1024}});
    f.manager_json(Method::POST, "/v1/hosts", Some(body))
        .await?;
    // The manager polls every host each control round (1 s here).
    let t0 = Instant::now();
    let mut peak = before;
    while t0.elapsed() < Duration::from_secs(8) {
        peak = peak.max(kit::rss_kib(pid).unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = f
        .manager_json(Method::DELETE, &format!("/v1/hosts/{name}"), None)
        .await;
    let _ = stop.send(());
    let (n, bytes) = (
        requests.load(Ordering::SeqCst),
        pulled.load(Ordering::SeqCst),
    );
    let growth = peak.saturating_sub(before);
    let mut x = Findings::default();
    x.check(
        n > 0,
        "the manager never called the fake agent: the probe measured nothing",
    );
    let per = bytes / n.max(1) as u64;
    // The largest cap of an agent route is 16 MiB; the rest is what sat in buffers.
    x.check(
        per < 40 << 20,
        format!("the manager pulled {} MiB per answer", per >> 20),
    );
    x.check(
        growth < 64 << 10,
        format!("the manager's resident memory grew {} MiB", growth >> 10),
    );
    x.note(format!(
        "{n} answers of 150 MB: {} MiB pulled per answer on average; manager resident memory {} -> {} MiB at its peak",
        per >> 20,
        before >> 10,
        peak >> 10
    ));
    Ok(x.outcome())
}

async fn request_bodies_over_2_mib_are_refused(f: &Fixture) -> Result<Outcome, FaultError> {
    let ca = kit::lab_ca(f)?;
    let op_dir = f.lab.hosts[0]
        .tls_dir
        .clone()
        .ok_or_else(|| FaultError::Setup("the lab has no operator certificate".into()))?;
    let op = Identity::load(&op_dir)?;
    let agent = kit::https(ca.cert_pem(), Some(&op), Duration::from_secs(30))?;
    let manager = kit::https(ca.cert_pem(), None, Duration::from_secs(30))?;
    let huge = json!({"id": "probe-big", "name": "probe-big",
                      "spec": {"vcpus": 1, "memory_mib": 64, "cmdline": "x".repeat(3 << 20)}});
    let mut x = Findings::default();
    let mut refused = 0;
    let base = &f.lab.hosts[0].url;
    for path in ["/v1/vms", "/v1/migrations", "/v1/incoming"] {
        let r = kit::call(agent.post(format!("{base}{path}")).json(&huge)).await;
        match r {
            Ok((413, _)) => refused += 1,
            other => x.check(false, format!("agent {path}: {other:?}")),
        }
    }
    let mbase = f.lab.manager_url.clone().unwrap_or_default();
    let r = kit::call(
        manager
            .post(format!("{mbase}/v1/vms"))
            .bearer_auth(&f.token)
            .json(&huge),
    )
    .await;
    match r {
        Ok((413, _)) => refused += 1,
        other => x.check(false, format!("manager /v1/vms: {other:?}")),
    }
    x.check(
        f.manager.vms().await?.is_empty() && f.agents[0].list_vms().await?.is_empty(),
        "a VM was created from an oversized body",
    );
    x.note(format!("{refused} bodies of 3 MiB refused with 413"));
    Ok(x.outcome())
}

/// A "leader" that counts the connections it gets and never answers.
async fn counting_leader() -> Result<(String, Arc<AtomicUsize>), FaultError> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(FaultError::io("binding a leader"))?;
    let url = format!(
        "http://{}",
        l.local_addr().map_err(FaultError::io("the leader"))?
    );
    let hits = Arc::new(AtomicUsize::new(0));
    let seen = hits.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            held.push(s);
        }
    });
    Ok((url, hits))
}

async fn an_ha_follower_checks_the_token_before_reading_a_body(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    use tern_manager::ha::Leadership;
    let token = "probe-follower-token";
    let dir = kit::probe_dir(f, "follower")?;
    let bad = |e: tern_manager::Error| FaultError::Setup(format!("an in-process manager: {e}"));
    let store = tern_manager::store::SqliteStore::open(&dir.join("tern.db")).map_err(bad)?;
    let manager = Arc::new(
        tern_manager::Manager::open(Box::new(store), tern_manager::manager::system_clock())
            .map_err(bad)?,
    );
    let (leader, hits) = counting_leader().await?;
    let leadership = Arc::new(Leadership::new("http://follower.invalid:1"));
    leadership.follow(Some(leader));
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let app = tern_manager::ha::forward::router(manager, vec![token.into()], leadership, stopping)
        .map_err(FaultError::io("the follower's router"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(FaultError::io("binding the follower"))?;
    let base = format!(
        "http://{}",
        listener
            .local_addr()
            .map_err(FaultError::io("the follower"))?
    );
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| FaultError::Setup(e.to_string()))?;
    let big = vec![b' '; 8 << 20];
    let mut x = Findings::default();
    for t in [None, Some("wrong")] {
        let mut req = http.post(format!("{base}/v1/vms")).body(big.clone());
        if let Some(t) = t {
            req = req.bearer_auth(t);
        }
        let t0 = Instant::now();
        let status = req.send().await.map(|r| r.status().as_u16());
        // 401 at once; the follower may close the socket before the body is through,
        // which the client sees as a broken connection. A follower that passes the
        // request on waits for the silent leader until the client gives up.
        x.check(
            status
                .as_ref()
                .map_or(t0.elapsed() < Duration::from_secs(5), |s| *s == 401),
            format!("token {t:?}: {status:?} after {:?}", t0.elapsed()),
        );
    }
    let t0 = Instant::now();
    let r = kit::call(
        http.post(format!("{base}/v1/vms"))
            .bearer_auth(token)
            .body(big),
    )
    .await;
    // 413 once 2 MiB are in, or the socket closed then, as above.
    x.check(
        r.as_ref()
            .map_or(t0.elapsed() < Duration::from_secs(5), |(s, _)| *s == 413),
        format!(
            "an authorised body of 8 MiB: {r:?} after {:?}",
            t0.elapsed()
        ),
    );
    let passed = hits.load(Ordering::SeqCst);
    x.check(
        passed == 0,
        format!("the leader was sent {passed} requests"),
    );
    let _ = stop.send(true);
    server.abort();
    x.note("8 MiB bodies: 401 without or with a wrong token, 413 (or the socket closed at the cap) with the right one; nothing reached the leader");
    Ok(x.outcome())
}

async fn migration_registries_are_pruned(f: &Fixture) -> Result<Outcome, FaultError> {
    let vm = "probe-registry";
    kit::plain_vm(f, 0, vm).await?;
    // Nothing listens on port 1 of the lab's root address: each send fails at once.
    let dest = format!("https://{}:1", f.lab.root_addr);
    let keep = tern_agent::migration::session::KEEP_FINISHED;
    let sends = keep + 16;
    let t0 = Instant::now();
    let mut x = Findings::default();
    for _ in 0..sends {
        let req = json!({"vm": vm, "destination": dest, "token": ""});
        let v: Value = f.agents[0]
            .http()
            .send(Method::POST, "/v1/migrations", Some(&req))
            .await?;
        let id = v["id"].as_str().unwrap_or_default().to_string();
        wait_final(f, 0, &id, Duration::from_secs(30)).await?;
    }
    let listed = f.agents[0].list_migrations().await?.len();
    kit::drop_vm(f, vm).await?;
    // Pruning runs as a migration is registered: the newest one, finished since,
    // comes on top of the 64 kept then.
    x.check(
        listed <= keep + 1,
        format!("after {sends} finished migrations the agent lists {listed} (keeps {keep})"),
    );
    x.note(format!(
        "{sends} failed sends in {:.1} s; the agent lists {listed}",
        t0.elapsed().as_secs_f64()
    ));
    Ok(x.outcome())
}
