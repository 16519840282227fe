//! Input that cannot hurt (issue 8, item 4): names, paths and numbers checked at the
//! edge, stream frames bounded before allocating, one migration per VM, no lifecycle
//! action under a migration, no host the manager cannot serve, and a quiet log.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tern_agent::migration::outgoing::open_stream;
use tern_agent::migration::wire::{self, Channel, Hello, Kind};
use tern_pki::Role;

use super::identity::wait_final;
use super::kit::{self, Findings};
use super::streams;
use crate::{Case, FaultError, Fixture, Outcome};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "vm_ids_with_dot_dot_cannot_reach_files_outside_the_state_dir",
            group: "input",
            about: "`..%2F..` ids on every VM route of an agent and names on the manager's routes are refused with 400, and the file the id names outside the state directory survives",
            run: |f| Box::pin(vm_ids_with_dot_dot_cannot_reach_files_outside_the_state_dir(f)),
        },
        Case {
            name: "kernel_and_initramfs_must_lie_under_the_image_dir",
            group: "input",
            about: "/etc/shadow as initramfs, a kernel outside the image directory, `..` and a symlink out of it are refused with 400 and nothing is created",
            run: |f| Box::pin(kernel_and_initramfs_must_lie_under_the_image_dir(f)),
        },
        Case {
            name: "numbers_out_of_bounds_are_refused",
            group: "input",
            about: "interval_s = 2^64-1 and the other settings' maxima, host capacities, heartbeat loads and max_mbit out of range are refused with 400 and nothing is stored",
            run: |f| Box::pin(numbers_out_of_bounds_are_refused(f)),
        },
        Case {
            name: "oversized_hellos_and_lz4_prefixes_are_refused_before_allocating",
            group: "input",
            about: "a Hello declaring over 4 KiB and a Pages frame whose LZ4 prefix declares 2 GiB are refused at once, and the destination agent's memory does not grow",
            run: |f| Box::pin(oversized_hellos_and_lz4_prefixes_are_refused_before_allocating(f)),
        },
        Case {
            name: "lifecycle_actions_on_a_migrating_vm_are_refused",
            group: "input",
            about: "pause, stop and delete of a VM whose migration waits in its prepare call are refused by the agent with 409 and the VM keeps running",
            run: |f| Box::pin(lifecycle_actions_on_a_migrating_vm_are_refused(f)),
        },
        Case {
            name: "concurrent_sends_of_one_vm_start_one_migration",
            group: "input",
            about: "32 concurrent sends of one VM to an agent: one 202, the rest 409, one migration listed",
            run: |f| Box::pin(concurrent_sends_of_one_vm_start_one_migration(f)),
        },
        Case {
            name: "a_host_address_the_manager_cannot_serve_is_refused",
            group: "input",
            about: "registering a host at sim:, file://, a URL with credentials, a path or no scheme is refused with 400",
            run: |f| Box::pin(a_host_address_the_manager_cannot_serve_is_refused(f)),
        },
        Case {
            name: "repeated_warnings_are_rate_limited",
            group: "input",
            about: "an enrolled host that never answers, polled every second for 8 s, costs the manager's log at most two warnings",
            run: |f| Box::pin(repeated_warnings_are_rate_limited(f)),
        },
    ]
}

async fn vm_ids_with_dot_dot_cannot_reach_files_outside_the_state_dir(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let h = &f.lab.hosts[0];
    // `STATE_DIR/vms/../../probe-victim.json` is the file the id names.
    let outside = h
        .state_dir
        .parent()
        .ok_or_else(|| FaultError::Setup("the state directory has no parent".into()))?
        .join("probe-victim.json");
    std::fs::write(&outside, b"{}").map_err(FaultError::io("writing the victim file"))?;
    let id = "..%2F..%2Fprobe-victim";
    let mut calls: Vec<(Method, String)> = vec![
        (Method::DELETE, format!("/v1/vms/{id}")),
        (Method::GET, format!("/v1/vms/{id}")),
        (Method::GET, format!("/v1/vms/{id}/metrics")),
    ];
    for action in ["start", "pause", "resume", "stop", "guest"] {
        calls.push((Method::POST, format!("/v1/vms/{id}/{action}")));
    }
    let mut x = Findings::default();
    let mut refused = 0;
    for (method, path) in &calls {
        let body = json!({"cmd": "ping"});
        let r: Result<Value, _> = f.agents[0]
            .http()
            .send(method.clone(), path, Some(&body))
            .await;
        match r {
            Err(e) if e.status() == Some(400) => refused += 1,
            other => x.check(false, format!("agent {method} {path}: {other:?}")),
        }
    }
    for (method, path) in [
        (Method::GET, "/v1/vms/..%2Fx"),
        (Method::DELETE, "/v1/vms/..%2F..%2Fx"),
        (Method::POST, "/v1/vms/a%20b/migrate"),
        (Method::GET, "/v1/hosts/..%2F..%2Fetc"),
        (Method::POST, "/v1/hosts/H1/drain"),
    ] {
        let r = f
            .manager
            .http()
            .send::<Value, Value>(method.clone(), path, Some(&json!({})))
            .await;
        match r {
            Err(e) if e.status() == Some(400) => refused += 1,
            other => x.check(false, format!("manager {method} {path}: {other:?}")),
        }
    }
    let survived = outside.exists();
    let _ = std::fs::remove_file(&outside);
    x.check(
        survived,
        format!(
            "DELETE removed {} outside the state directory",
            outside.display()
        ),
    );
    x.note(format!(
        "{refused} requests with bad names refused with 400"
    ));
    Ok(x.outcome())
}

async fn kernel_and_initramfs_must_lie_under_the_image_dir(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let kernel = std::path::PathBuf::from(&f.image.kernel);
    let image_dir = kernel
        .parent()
        .ok_or_else(|| FaultError::Setup("the kernel has no directory".into()))?
        .to_path_buf();
    let dir = kit::probe_dir(f, "images")?;
    let outside = dir.join("secret");
    std::fs::write(&outside, b"x").map_err(FaultError::io("writing a file"))?;
    let link = image_dir.join(".probe-escape");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&outside, &link).map_err(FaultError::io("a symlink"))?;
    let cases = [
        (
            "/etc/shadow as initramfs",
            json!(kernel),
            json!("/etc/shadow"),
        ),
        ("a kernel outside", json!(outside), Value::Null),
        (
            "dot-dot out of the image dir",
            json!(image_dir
                .join("../../../../../../../..")
                .join(outside.strip_prefix("/").unwrap_or(&outside))),
            Value::Null,
        ),
        ("a symlink out of the image dir", json!(kernel), json!(link)),
    ];
    let mut x = Findings::default();
    for (what, k, i) in cases {
        let req = json!({"id": "probe-path", "spec": {"vcpus": 1, "memory_mib": 64,
                         "kernel": k, "initramfs": i}});
        let r: Result<Value, _> = f.agents[0]
            .http()
            .send(Method::POST, "/v1/vms", Some(&req))
            .await;
        match r {
            Err(e) if e.status() == Some(400) && e.to_string().contains("image directory") => {}
            other => x.check(false, format!("{what}: {other:?}")),
        }
    }
    let _ = std::fs::remove_file(&link);
    let vms = f.agents[0].list_vms().await?;
    x.check(
        vms.iter().all(|v| v.info.id != "probe-path"),
        "a VM was created from a path outside the image directory",
    );
    let _ = f.agents[0].delete_vm("probe-path").await;
    x.note("4 paths outside the image directory refused with 400");
    Ok(x.outcome())
}

async fn numbers_out_of_bounds_are_refused(f: &Fixture) -> Result<Outcome, FaultError> {
    let mut x = Findings::default();
    let mut refused = 0;
    let settings = f.manager_json(Method::GET, "/v1/balancer", None).await?;
    for (field, value) in [
        ("interval_s", json!(u64::MAX)),
        ("dead_after_s", json!(u64::MAX)),
        ("cooldown_s", json!(u64::MAX)),
        ("max_per_cluster", json!(u32::MAX)),
        ("smoothing_window", json!(u32::MAX)),
    ] {
        let mut bad = settings.clone();
        bad[field] = value;
        match f.manager_json(Method::PUT, "/v1/balancer", Some(bad)).await {
            Err(FaultError::Client(e))
                if e.status() == Some(400) && e.to_string().contains(field) =>
            {
                refused += 1
            }
            other => x.check(false, format!("balancer {field}: {other:?}")),
        }
    }
    let now = f.manager_json(Method::GET, "/v1/balancer", None).await?;
    x.check(now == settings, format!("the settings changed: {now}"));

    let h = &f.lab.hosts[0];
    for (cpus, mib) in [
        (json!(1e300), json!(1024)),
        (json!(4097), json!(1024)),
        (json!(2), json!(u64::MAX)),
        (json!(2), json!((1u64 << 26) + 1)),
    ] {
        let body = json!({"name": h.name, "address": h.url,
                          "capacity": {"cpus": cpus, "memory_mib": mib}});
        match f.manager_json(Method::POST, "/v1/hosts", Some(body)).await {
            Err(FaultError::Client(e))
                if e.status() == Some(400) && e.to_string().contains("capacity") =>
            {
                refused += 1
            }
            other => x.check(false, format!("capacity {cpus}/{mib}: {other:?}")),
        }
    }
    for report in [
        json!({"cpu_used": 1e300}),
        json!({"cpu_used": 1.0, "vms": [{"name": "v1", "cpu_used": -1.0}]}),
        json!({"cpu_used": 1.0, "vms": [{"name": "v1", "cpu_used": 1e300}]}),
        json!({"cpu_used": 1.0, "vms": [{"name": "../v1", "cpu_used": 1.0}]}),
    ] {
        let path = format!("/v1/hosts/{}/heartbeat", h.name);
        match f
            .manager_json(Method::POST, &path, Some(report.clone()))
            .await
        {
            Err(FaultError::Client(e)) if e.status() == Some(400) => refused += 1,
            other => x.check(false, format!("heartbeat {report}: {other:?}")),
        }
    }
    let load = f.manager.host(&h.name).await?.cpu_used;
    x.check(
        load.is_none_or(|l| l <= 4096.0),
        format!("{} carries a load of {load:?}", h.name),
    );
    let send = json!({"vm": "probe-mbit", "destination": f.lab.hosts[1].url, "token": "",
                      "options": {"max_mbit": u64::MAX}});
    let r: Result<Value, _> = f.agents[0]
        .http()
        .send(Method::POST, "/v1/migrations", Some(&send))
        .await;
    match r {
        Err(e) if e.status() == Some(400) && e.to_string().contains("max_mbit") => refused += 1,
        other => x.check(false, format!("max_mbit 2^64-1: {other:?}")),
    }
    x.note(format!("{refused} numbers out of bounds refused with 400"));
    Ok(x.outcome())
}

/// Writes `frames` (kind, flags, declared length, payload) on `s`, then reads until
/// the destination answers or closes: the time that took, and what it said.
fn refused_after(
    s: &mut (impl std::io::Read + std::io::Write),
    header: [u8; 8],
    payload: &[u8],
) -> (Duration, String) {
    let t0 = Instant::now();
    let said = (|| -> Result<wire::Frame, wire::WireError> {
        s.write_all(&header)?;
        s.write_all(payload)?;
        s.flush()?;
        wire::read_frame(s)
    })();
    (t0.elapsed(), format!("{said:?}"))
}

fn header(kind: Kind, flags: u8, len: u32) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[0] = kind as u8;
    h[1] = flags;
    h[4..8].copy_from_slice(&len.to_le_bytes());
    h
}

async fn oversized_hellos_and_lz4_prefixes_are_refused_before_allocating(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    kit::quiet_rounds(f).await?;
    let t = streams::prepare(f, 1, "probe-frames", false).await?;
    let r = frames(f, &t).await;
    streams::abort(f, 1, &t).await;
    r
}

async fn frames(
    f: &Fixture,
    t: &tern_agent::migration::session::Ticket,
) -> Result<Outcome, FaultError> {
    let addr = streams::port_of(f, 1, t.memory_port)?;
    let opts = streams::tls_to(f, 1, &streams::host_identity(f, 0)?)?;
    let pid = f.agent_pid(1);
    let before = kit::rss_kib(pid).unwrap_or(0);
    let hello = Hello {
        version: wire::VERSION,
        channel: Channel::Memory,
        stream: 0,
        streams: 1,
        pages: (streams::MIB << 20) / wire::PAGE_SIZE as u64,
        migration: t.migration.clone(),
        token: t.stream_token.clone(),
    };
    let tls = opts.tls.clone();
    let probe_opts = opts.clone();
    let results =
        tokio::task::spawn_blocking(move || -> Result<Vec<(String, Duration, String)>, String> {
            let mut out = Vec::new();
            for (what, len) in [
                ("a Hello of 4 KiB + 1", wire::MAX_HELLO as u32 + 1),
                ("a Hello of 4 GiB", u32::MAX),
            ] {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(|e| e.to_string())?;
                let mut s = tern_agent::migration::secure::connect(s, addr, tls.as_ref())
                    .map_err(|e| e.to_string())?;
                let (took, said) = refused_after(&mut s, header(Kind::Hello, 0, len), &[]);
                out.push((what.to_string(), took, said));
            }
            // Admitted with the right Hello, a Pages frame whose LZ4 block says 2 GiB.
            let mut s = open_stream(addr, &hello, &probe_opts).map_err(|e| e.to_string())?;
            let mut payload = 0x7fff_ffffu32.to_le_bytes().to_vec();
            payload.extend_from_slice(&[0u8; 64]);
            let (took, said) = refused_after(
                &mut s,
                header(Kind::Pages, wire::FLAG_LZ4, payload.len() as u32),
                &payload,
            );
            out.push(("an LZ4 block declaring 2 GiB".into(), took, said));
            Ok(out)
        })
        .await
        .map_err(|e| FaultError::Setup(e.to_string()))?
        .map_err(|e| {
            FaultError::Setup(format!("the frame probe could not reach the stream: {e}"))
        })?;
    let after = kit::rss_kib(pid).unwrap_or(0);
    let mut x = Findings::default();
    for (what, took, said) in &results {
        // Refused on sight: a reader that waited for the declared bytes would sit out
        // the 2 s Hello window or the 30 s stream timeout.
        x.check(
            *took < Duration::from_secs(1),
            format!("{what}: answered after {took:?} ({said})"),
        );
        x.note(format!("{what}: refused in {} ms", took.as_millis()));
    }
    let growth = after.saturating_sub(before);
    x.check(
        growth < 64 << 10,
        format!("the destination agent grew {} MiB", growth >> 10),
    );
    x.note(format!("agent resident memory grew {} KiB", growth));
    Ok(x.outcome())
}

/// VM `vm` on host 1 with a migration waiting in its prepare call at a destination
/// that never answers; runs `probe` and cleans up.
async fn with_stuck_migration<F, Fut>(
    f: &Fixture,
    vm: &str,
    probe: F,
) -> Result<Outcome, FaultError>
where
    F: FnOnce(String) -> Fut,
    Fut: std::future::Future<Output = Result<Outcome, FaultError>>,
{
    let (silent, task) = kit::silent_listener(kit::root_ip(f)?).await?;
    kit::plain_vm(f, 0, vm).await?;
    let r = probe(format!("https://{silent}")).await;
    let list = f.agents[0].list_migrations().await.unwrap_or_default();
    for m in list.iter().filter(|m| m.vm == vm && !m.phase.is_final()) {
        let _ = f.agents[0].cancel_migration(&m.id).await;
        wait_final(f, 0, &m.id, Duration::from_secs(60)).await?;
    }
    task.abort();
    kit::drop_vm(f, vm).await?;
    r
}

async fn lifecycle_actions_on_a_migrating_vm_are_refused(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let vm = "probe-busy";
    with_stuck_migration(f, vm, |dest| async move {
        let send = json!({"vm": vm, "destination": dest, "token": ""});
        f.agents[0]
            .http()
            .send::<_, Value>(Method::POST, "/v1/migrations", Some(&send))
            .await?;
        let mut x = Findings::default();
        for (method, path) in [
            (Method::POST, format!("/v1/vms/{vm}/pause")),
            (Method::POST, format!("/v1/vms/{vm}/stop")),
            (Method::DELETE, format!("/v1/vms/{vm}")),
        ] {
            let r = f.agents[0]
                .http()
                .send::<Value, Value>(method.clone(), &path, None)
                .await;
            match r {
                Err(e) if e.status() == Some(409) => {}
                other => x.check(
                    false,
                    format!("{method} {path} during the migration: {other:?}"),
                ),
            }
        }
        let state = f.agents[0].show_vm(vm).await?.info.state;
        x.check(
            json!(state) == json!("running"),
            format!("the VM is {} after the refused actions", json!(state)),
        );
        x.note("pause, stop and delete refused with 409 during the migration; the VM kept running");
        Ok(x.outcome())
    })
    .await
}

async fn concurrent_sends_of_one_vm_start_one_migration(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let vm = "probe-race";
    with_stuck_migration(f, vm, |dest| async move {
        let send = json!({"vm": vm, "destination": dest, "token": ""});
        let tries = (0..32).map(|_| {
            let send = send.clone();
            async move {
                f.agents[0]
                    .http()
                    .send::<_, Value>(Method::POST, "/v1/migrations", Some(&send))
                    .await
                    .map(|_| 202)
                    .unwrap_or_else(|e| e.status().unwrap_or(0))
            }
        });
        let statuses = futures_util::future::join_all(tries).await;
        let accepted = statuses.iter().filter(|s| **s == 202).count();
        let refused = statuses.iter().filter(|s| **s == 409).count();
        let running = f.agents[0]
            .list_migrations()
            .await?
            .into_iter()
            .filter(|m| m.vm == vm && !m.phase.is_final())
            .count();
        let mut x = Findings::default();
        x.check(
            accepted == 1 && refused == 31 && running == 1,
            format!("32 concurrent sends: {accepted} accepted, {refused} refused, {running} migrations running ({statuses:?})"),
        );
        x.note("32 concurrent sends: 1 accepted, 31 refused with 409, one migration");
        Ok(x.outcome())
    })
    .await
}

async fn a_host_address_the_manager_cannot_serve_is_refused(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let mut x = Findings::default();
    // Enrolled, so that what refuses each address is the address check itself.
    kit::lab_ca(f)?.issue(Role::Host, "probe-sim", &[kit::root_ip(f)?])?;
    let before = f.manager.hosts().await?.len();
    for address in [
        "sim:",
        "file:///etc/passwd",
        "http://",
        "https://admin:pw@198.18.0.2:7070",
        "https://198.18.0.2:7070/v1?x=1",
        "198.18.0.2:7070",
    ] {
        let body = json!({"name": "probe-sim", "address": address,
                          "capacity": {"cpus": 2, "memory_mib": 1024}});
        match f.manager_json(Method::POST, "/v1/hosts", Some(body)).await {
            Err(FaultError::Client(e))
                if e.status() == Some(400) && e.to_string().contains("address") => {}
            other => x.check(false, format!("{address}: {other:?}")),
        }
    }
    let after = f.manager.hosts().await?;
    x.check(
        after.len() == before,
        format!(
            "hosts were registered: {:?}",
            after.iter().map(|h| &h.name).collect::<Vec<_>>()
        ),
    );
    x.note("6 addresses the manager cannot serve refused with 400");
    Ok(x.outcome())
}

async fn repeated_warnings_are_rate_limited(f: &Fixture) -> Result<Outcome, FaultError> {
    let ip = kit::root_ip(f)?;
    let name = "probe-gone";
    kit::lab_ca(f)?.issue(Role::Host, name, &[ip])?;
    // Port 1 of the lab's root address: nothing listens, every poll fails at once.
    let body = json!({"name": name, "address": format!("https://{ip}:1"),
                      "capacity": {"cpus": 2, "memory_mib": 1024}});
    let log = f.dir.join("manager.log");
    let count = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains(name))
            .count()
    };
    let before = count();
    f.manager_json(Method::POST, "/v1/hosts", Some(body))
        .await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let warned = count() - before;
    let _ = f
        .manager_json(Method::DELETE, &format!("/v1/hosts/{name}"), None)
        .await;
    let mut x = Findings::default();
    x.check(
        warned >= 1,
        format!("no warning about {name} reached the log: the probe measured nothing"),
    );
    x.check(
        warned <= 2,
        format!("{warned} warnings about {name} in 8 s of 1 s rounds"),
    );
    x.note(format!(
        "{warned} warnings in 8 s about a host polled every second"
    ));
    Ok(x.outcome())
}
