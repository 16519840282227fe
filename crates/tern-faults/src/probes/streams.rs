//! The migration streams (issue 8, item 2): nothing listens for whoever connects first,
//! strangers neither feed a waiting VM nor keep the real source out, and nobody on the
//! lab's switch reads guest memory as it moves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern_agent::migration::outgoing::{Outgoing, StreamOptions};
use tern_agent::migration::secure::ClientTls;
use tern_agent::migration::session::{PrepareRequest, Ticket};
use tern_agent::migration::wire;
use tern_pki::Identity;

use super::kit::{self, Findings};
use crate::{Case, FaultError, Fixture, Outcome};

pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "nothing_listens_on_every_address",
            group: "streams",
            about: "with a migration of each engine waiting for its streams, no lab agent or QEMU listens on 0.0.0.0 or [::] (ss in every host's namespace and the root's)",
            run: |f| Box::pin(nothing_listens_on_every_address(f)),
        },
        Case {
            name: "strangers_on_the_migration_port_neither_feed_the_vm_nor_keep_the_source_out",
            group: "streams",
            about: "a stranger speaking QEMU's stream and an enrolled host with a wrong token are refused, the waiting VM stays untouched, and silent connections do not keep the real source out",
            run: |f| {
                Box::pin(strangers_on_the_migration_port_neither_feed_the_vm_nor_keep_the_source_out(f))
            },
        },
        Case {
            name: "a_silent_connection_is_dropped_within_2_s",
            group: "streams",
            about: "a connection to the migration port that never says Hello is closed within the 2 s Hello window while the real source is admitted beside it",
            run: |f| Box::pin(a_silent_connection_is_dropped_within_2_s(f)),
        },
        Case {
            name: "plain_tcp_and_foreign_certificates_are_refused_on_the_stream",
            group: "streams",
            about: "the right stream token over plain TCP, or over TLS with a certificate of another CA, gets no Welcome; the real source with its host certificate does",
            run: |f| Box::pin(plain_tcp_and_foreign_certificates_are_refused_on_the_stream(f)),
        },
        Case {
            name: "an_eavesdropper_on_the_lab_switch_sees_no_guest_memory",
            group: "streams",
            about: "a packet capture on the lab's switch during a real move of a guest whose memory holds memdirty's known pattern (48 MiB of it) finds the pattern nowhere in the traffic",
            run: |f| Box::pin(an_eavesdropper_on_the_lab_switch_sees_no_guest_memory(f)),
        },
    ]
}

/// The memory of the VMs these probes prepare.
pub(super) const MIB: u64 = 128;

fn spec(f: &Fixture) -> Value {
    json!({"vcpus": 1, "memory_mib": MIB, "kernel": f.image.kernel,
           "initramfs": f.image.initramfs, "cmdline": f.image.cmdline})
}

/// Prepares host `i` to receive VM `vm` (tern's engine unless `native`): its migration
/// port is open until the ticket is aborted or 20 s pass. The manager knows nothing of
/// the VM: call [`kit::quiet_rounds`] first, or a round destroys it.
pub(super) async fn prepare(
    f: &Fixture,
    i: usize,
    vm: &str,
    native: bool,
) -> Result<Ticket, FaultError> {
    let req: PrepareRequest =
        serde_json::from_value(json!({"vm": vm, "spec": spec(f), "native": native}))
            .map_err(|e| FaultError::Setup(format!("a prepare request: {e}")))?;
    Ok(f.agents[i].prepare_incoming(&req).await?)
}

pub(super) async fn abort(f: &Fixture, i: usize, t: &Ticket) {
    let _ = f.agents[i].abort_incoming(&t.migration).await;
}

/// The address of host `i`'s port `port`.
pub(super) fn port_of(f: &Fixture, i: usize, port: u16) -> Result<SocketAddr, FaultError> {
    let ip = f.lab.hosts[i]
        .addr
        .parse()
        .map_err(|_| FaultError::Setup(format!("host address {:?}", f.lab.hosts[i].addr)))?;
    Ok(SocketAddr::new(ip, port))
}

/// Host `i`'s own identity (its certificate from the lab CA).
pub(super) fn host_identity(f: &Fixture, i: usize) -> Result<Identity, FaultError> {
    Ok(Identity::load(&f.lab.hosts[i].state_dir.join("tls"))?)
}

/// Stream options of a source presenting `id` (trusting the lab CA) to host `dest`.
pub(super) fn tls_to(f: &Fixture, dest: usize, id: &Identity) -> Result<StreamOptions, FaultError> {
    let ca = kit::lab_ca(f)?;
    let config = tern_pki::tls::client_config(ca.cert_pem(), Some(id), None)?;
    let tls = ClientTls::new(Arc::new(config), &f.lab.hosts[dest].addr)
        .map_err(|e| FaultError::Setup(e.to_string()))?;
    Ok(StreamOptions {
        tls: Some(tls),
        io_timeout: Duration::from_secs(5),
        ..StreamOptions::default()
    })
}

/// Opens the memory streams of `t` as a source with `opts` would: `Ok` once admitted.
async fn connect(addr: SocketAddr, t: &Ticket, opts: StreamOptions) -> Result<(), String> {
    connect_and_hold(addr, t, opts, Duration::ZERO).await
}

/// [`connect`], keeping the admitted streams open for `hold` before giving up on them.
async fn connect_and_hold(
    addr: SocketAddr,
    t: &Ticket,
    opts: StreamOptions,
    hold: Duration,
) -> Result<(), String> {
    let (m, token) = (t.migration.clone(), t.stream_token.clone());
    let pages = (MIB << 20) / wire::PAGE_SIZE as u64;
    tokio::task::spawn_blocking(move || {
        Outgoing::connect(addr, &m, &token, pages, opts)
            .map(|o| {
                std::thread::sleep(hold);
                o.abort("probe done")
            })
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())?
}

/// The lines of `ss` in every host's namespace, and the lab's processes' in the root
/// namespace, that listen on every address.
async fn wildcard_listeners(f: &Fixture) -> Result<(Vec<String>, usize), FaultError> {
    let mut bad = Vec::new();
    let mut seen = 0;
    for h in &f.lab.hosts {
        for l in kit::listeners(Some(&h.netns)).await? {
            seen += 1;
            if kit::on_every_address(&l) {
                bad.push(format!("{}: {l}", h.name));
            }
        }
    }
    for l in kit::listeners(None).await? {
        let ours = l.contains("\"tern\"") || l.contains("qemu");
        if ours {
            seen += 1;
            if kit::on_every_address(&l) {
                bad.push(format!("root: {l}"));
            }
        }
    }
    Ok((bad, seen))
}

async fn nothing_listens_on_every_address(f: &Fixture) -> Result<Outcome, FaultError> {
    kit::quiet_rounds(f).await?;
    let tern = prepare(f, 1, "probe-listen-a", false).await?;
    let native = match prepare(f, 2, "probe-listen-b", true).await {
        Ok(t) => t,
        Err(e) => {
            abort(f, 1, &tern).await;
            return Err(e);
        }
    };
    let found = wildcard_listeners(f).await;
    let h2 = kit::listeners(Some(&f.lab.hosts[1].netns)).await;
    abort(f, 1, &tern).await;
    abort(f, 2, &native).await;
    let (bad, seen) = found?;
    let mut x = Findings::default();
    let port = format!("{}:{}", f.lab.hosts[1].addr, tern.memory_port);
    x.check(
        h2?.iter().any(|l| l.contains(&port)),
        format!(
            "the migration port {port} was not seen listening: the probe looked in the wrong place"
        ),
    );
    x.check(
        bad.is_empty(),
        format!("listening on every address: {}", bad.join(" | ")),
    );
    x.note(format!(
        "{seen} listening sockets of the lab during two prepared migrations, none on every address"
    ));
    Ok(x.outcome())
}

/// What QEMU's migration stream starts with: its magic and version.
const QEMU_STREAM_START: &[u8] = b"QEVM\0\0\0\x03";

/// Connects to `addr` over plain TCP, writes `bytes`, and returns how long the
/// destination took to close the connection (`None`: still open after `limit`).
fn closed_after(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, limit).ok()?;
    let _ = s.write_all(bytes);
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.checked_sub(t0.elapsed())?;
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .ok()?;
        match s.read(&mut buf) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if t0.elapsed() >= limit {
                    return None;
                }
            }
            Err(_) => return Some(t0.elapsed()),
        }
    }
}

async fn strangers_on_the_migration_port_neither_feed_the_vm_nor_keep_the_source_out(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    kit::quiet_rounds(f).await?;
    let vm = "probe-stranger";
    let t = prepare(f, 1, vm, false).await?;
    let r = strangers(f, vm, &t).await;
    abort(f, 1, &t).await;
    r
}

async fn strangers(f: &Fixture, vm: &str, t: &Ticket) -> Result<Outcome, FaultError> {
    let mut x = Findings::default();
    let addr = port_of(f, 1, t.device_port)?;
    // A stranger speaks QEMU's migration protocol at the port.
    let closed = tokio::task::spawn_blocking(move || {
        let mut start = QEMU_STREAM_START.to_vec();
        start.extend_from_slice(&[0u8; 64]);
        closed_after(addr, &start, Duration::from_secs(5))
    })
    .await
    .map_err(|e| FaultError::Setup(e.to_string()))?;
    x.check(
        closed.is_some(),
        "a stranger speaking QEMU's stream was still connected after 5 s",
    );
    // An enrolled host (h3) with a wrong token, for the device state.
    let mut wrong = t.clone();
    wrong.stream_token = "0".repeat(64);
    let h3 = tls_to(f, 1, &host_identity(f, 2)?)?;
    let with_wrong_token = connect(port_of(f, 1, t.memory_port)?, &wrong, h3).await;
    x.check(
        with_wrong_token.is_err(),
        "an enrolled host with a wrong stream token was admitted",
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let v = f.agents[1].show_incoming(&t.migration).await?;
    let phase = json!(v.phase);
    x.check(
        phase == json!("receiving"),
        format!("after the strangers the waiting migration is {phase}"),
    );
    let shown = f.agents[1].show_vm(vm).await?;
    x.check(
        shown.info.pid.is_some(),
        "the waiting VM's QEMU is gone after the strangers",
    );
    // Silent strangers on the memory port do not keep the real source out.
    let mem = port_of(f, 1, t.memory_port)?;
    let silent: Vec<TcpStream> = (0..3)
        .filter_map(|_| TcpStream::connect_timeout(&mem, Duration::from_secs(2)).ok())
        .collect();
    let t0 = Instant::now();
    let real = connect(mem, t, tls_to(f, 1, &host_identity(f, 0)?)?).await;
    let waited = t0.elapsed();
    drop(silent);
    x.check(
        real.is_ok(),
        format!("the real source was not admitted: {real:?}"),
    );
    x.check(
        waited < Duration::from_secs(1),
        format!("the real source waited {waited:?} behind 3 silent connections"),
    );
    x.note(format!(
        "QEMU-speaking stranger closed after {:?}; wrong token refused ({}); real source admitted in {} ms beside 3 silent connections",
        closed.unwrap_or_default(),
        with_wrong_token.err().unwrap_or_default(),
        waited.as_millis()
    ));
    Ok(x.outcome())
}

async fn a_silent_connection_is_dropped_within_2_s(f: &Fixture) -> Result<Outcome, FaultError> {
    kit::quiet_rounds(f).await?;
    let t = prepare(f, 1, "probe-silent", false).await?;
    let addr = port_of(f, 1, t.memory_port)?;
    let silent =
        tokio::task::spawn_blocking(move || closed_after(addr, &[], Duration::from_secs(10)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The real source beside it, its streams kept open until the silent one is gone.
    let t0 = Instant::now();
    let opts = tls_to(f, 1, &host_identity(f, 0)?)?;
    let t2 = t.clone();
    let real =
        tokio::spawn(
            async move { connect_and_hold(addr, &t2, opts, Duration::from_secs(3)).await },
        );
    let dropped = silent.await.map_err(|e| FaultError::Setup(e.to_string()))?;
    let phase = f.agents[1]
        .show_incoming(&t.migration)
        .await
        .map(|v| json!(v.phase));
    let real = real.await.map_err(|e| FaultError::Setup(e.to_string()))?;
    // Admitted, then held 3 s.
    let admitted = t0.elapsed().saturating_sub(Duration::from_secs(3));
    abort(f, 1, &t).await;
    let mut x = Findings::default();
    // 2 s for the Hello, and a little for the close to cross the link.
    let bound = Duration::from_millis(2500);
    x.check(
        dropped.is_some_and(|d| d <= bound),
        format!("a silent connection was held {dropped:?} (bound {bound:?})"),
    );
    x.check(
        real.is_ok() && admitted < Duration::from_secs(1),
        format!("the real source beside it: {real:?} after {admitted:?}"),
    );
    x.check(
        phase.as_ref().is_ok_and(|p| *p == json!("receiving")),
        format!("the migration after the silent connection: {phase:?}"),
    );
    x.note(format!(
        "silent connection dropped after {:.2} s; real source admitted in {} ms",
        dropped.unwrap_or_default().as_secs_f64(),
        admitted.as_millis()
    ));
    Ok(x.outcome())
}

async fn plain_tcp_and_foreign_certificates_are_refused_on_the_stream(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    kit::quiet_rounds(f).await?;
    let t = prepare(f, 1, "probe-foreign-stream", false).await?;
    let addr = port_of(f, 1, t.memory_port)?;
    let (_, alien) = kit::stranger(f, addr.ip())?;
    let plain = connect(addr, &t, StreamOptions::default()).await;
    let foreign = connect(addr, &t, tls_to(f, 1, &alien)?).await;
    let real = connect(addr, &t, tls_to(f, 1, &host_identity(f, 0)?)?).await;
    abort(f, 1, &t).await;
    let mut x = Findings::default();
    x.check(
        plain.is_err(),
        "the right stream token over plain TCP was admitted",
    );
    x.check(
        foreign.is_err(),
        "the right stream token with another CA's certificate was admitted",
    );
    x.check(
        real.is_ok(),
        format!("the real source was refused: {real:?}"),
    );
    x.note(format!(
        "plain TCP: {}; another CA: {}",
        plain.err().unwrap_or_default(),
        foreign.err().unwrap_or_default()
    ));
    Ok(x.outcome())
}

/// Marker offsets an eavesdropper on the switch sees in 20 datagrams that carry part of
/// a memdirty page in the clear.
async fn control_capture(f: &Fixture) -> Result<u64, FaultError> {
    let capture = kit::eavesdrop(&f.lab.switch_netns, kit::Marker::memdirty())?;
    let dir = kit::probe_dir(f, "eavesdrop")?;
    let page = dir.join("page");
    std::fs::write(&page, vec![0u8; 8192]).map_err(FaultError::io("a page file"))?;
    kit::write_marker(&page, 0, 4096).map_err(FaultError::io("a page file"))?;
    let bytes = std::fs::read(&page).map_err(FaultError::io("a page file"))?;
    let sock = std::net::UdpSocket::bind((f.lab.root_addr.as_str(), 0))
        .map_err(FaultError::io("a UDP socket"))?;
    let to = port_of(f, 1, 9)?;
    for _ in 0..20 {
        let _ = sock.send_to(&bytes[..1400], to);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = capture.finish()?;
    Ok(seen.marker_hits)
}

async fn an_eavesdropper_on_the_lab_switch_sees_no_guest_memory(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let vm = "probe-eaves";
    kit::managed_vm(f, 0, vm, 256).await?;
    // The manager's VMs run firmware only, which leaves most of their memory alone:
    // 48 MiB of it get memdirty's pattern through the guest's shared RAM file, as a
    // guest running memdirty would write it.
    let ram = f.lab.hosts[0].mem_dir.join(format!("{vm}.ram"));
    let path = ram.clone();
    let in_ram = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        kit::write_marker(&path, 64 << 20, 48 << 20)?;
        kit::Marker::memdirty().count_in_file(&path, 10_000)
    })
    .await
    .map_err(|e| FaultError::Setup(e.to_string()))?
    .map_err(FaultError::io(format!(
        "writing the pattern into {}",
        ram.display()
    )))?;
    // The eavesdropper first proves it would see the pattern: a few datagrams
    // carrying it in the clear, from the root namespace to h2 across the switch.
    let control = control_capture(f).await?;
    let capture = kit::eavesdrop(&f.lab.switch_netns, kit::Marker::memdirty())?;
    let to = json!({"to": f.lab.hosts[1].name, "policy": "adaptive"});
    let asked = f
        .manager_json(
            reqwest::Method::POST,
            &format!("/v1/vms/{vm}/migrate"),
            Some(to),
        )
        .await;
    let mut wild = Vec::new();
    let moved = match asked {
        Ok(_) => {
            // Listening sockets are sampled while the move runs; the source agent
            // tells how it ended.
            let t0 = Instant::now();
            loop {
                let (bad, _) = wildcard_listeners(f).await?;
                wild.extend(bad);
                let mine = f.agents[0]
                    .list_migrations()
                    .await?
                    .into_iter()
                    .find(|m| m.vm == vm);
                if let Some(m) = mine.filter(|m| m.phase.is_final()) {
                    break (json!(m.phase), json!(m.result));
                }
                if t0.elapsed() > Duration::from_secs(150) {
                    break (json!("still running after 150 s"), Value::Null);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Err(e) => (json!(format!("not started: {e}")), Value::Null),
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = capture.finish()?;
    kit::drop_vm(f, vm).await?;
    let mut x = Findings::default();
    x.check(
        control > 0,
        "the eavesdropper did not see the pattern sent in the clear: it could see nothing",
    );
    x.check(
        in_ram >= 1000,
        format!(
            "the guest's RAM holds only {in_ram} marker offsets: the probe has nothing to look for"
        ),
    );
    x.check(
        moved.0 == json!("completed"),
        format!("the move did not complete: {} {}", moved.0, moved.1),
    );
    let bytes = moved.1["bytes"].as_u64().unwrap_or(0);
    x.check(
        seen.bytes >= bytes,
        format!(
            "the capture saw {} bytes, fewer than the {bytes} the move sent: it missed the move",
            seen.bytes
        ),
    );
    if seen.marker_hits > 0 {
        x.leak(format!(
            "guest memory crossed the switch in the clear: {} marker offsets in {} frames",
            seen.marker_hits, seen.frames
        ));
    }
    x.check(
        wild.is_empty(),
        format!(
            "listening on every address during the move: {}",
            wild.join(" | ")
        ),
    );
    x.note(format!(
        "{in_ram}+ marker offsets in the guest's RAM, {control} seen in clear datagrams; the move sent {} MB; the switch carried {} frames, {} MB, 0 marker offsets",
        bytes / 1_000_000,
        seen.frames,
        seen.bytes / 1_000_000
    ));
    Ok(x.outcome())
}
