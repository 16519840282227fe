//! The fault cases: a real fault injected into the real lab, measured and judged.
//!
//! Group `fencing` (issue 8 item 6): an agent killed and restarted within its lease, an
//! agent killed for good, a host cut off, a destination agent killed mid-move. Group
//! `faults`: the manager killed mid-migration, its disk full, a link cut and a
//! destination QEMU killed mid-round.
//!
//! Every wait has a limit; a limit passed is a failed case ([`FaultError::Timeout`]).
//! What was lost or ran twice is counted by the runner from the fixture's sampler and
//! the manager's view, not here.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use tern_api::manager::EventKind;

use crate::fixture::{alive, Fixture, LEASE_S};
use crate::{Case, FaultError, Outcome};

/// Every fault case, in the order they run: those that need the manager's control
/// rounds first, then those that share a guest (see [`Fixture::shared_guest`]).
pub fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "agent_restarted_within_its_lease_keeps_its_vms",
            group: "fencing",
            about: "h1's agent is SIGKILLed and started again at once, then stopped cleanly with SIGTERM (an upgrade) and started again: each time its QEMUs keep their pids, the guest's counter advances, the lease and watchdog stay, nothing restarts or fences",
            run: |f| Box::pin(agent_restarted_within_its_lease_keeps_its_vms(f)),
        },
        Case {
            name: "agent_killed_for_good_is_fenced_and_its_vms_restart_once",
            group: "fencing",
            about: "h1's agent is SIGKILLed for good: its watchdog stops its VMs within the lease, the manager restarts each once elsewhere after that, and h1 started again comes back empty and active",
            run: |f| Box::pin(agent_killed_for_good_is_fenced_and_its_vms_restart_once(f)),
        },
        Case {
            name: "host_cut_off_stops_its_own_vms_first",
            group: "fencing",
            about: "a host's link is set down: it stops its own VMs before the manager restarts them elsewhere, and is active again once its link is back",
            run: |f| Box::pin(host_cut_off_stops_its_own_vms_first(f)),
        },
        Case {
            name: "manager_killed_mid_migration_settles_it_when_restarted",
            group: "faults",
            about: "the manager is SIGKILLed while it follows a move: restarted, it follows the same copy to its end, and the VM runs on one host",
            run: |f| Box::pin(manager_killed_mid_migration_settles_it_when_restarted(f)),
        },
        Case {
            name: "manager_killed_while_it_creates_a_vm_loses_nothing",
            group: "faults",
            about: "the manager is SIGKILLed while its call creating a VM is under way: the agent finishes the create, and the restarted manager records the VM running where it runs",
            run: |f| Box::pin(manager_killed_while_it_creates_a_vm_loses_nothing(f)),
        },
        Case {
            name: "manager_disk_full_fails_requests_and_loses_nothing",
            group: "faults",
            about: "the manager's database disk is filled: writes fail with a 507 naming the full disk and what to do, no VM stops or is lost, and once space is freed writes work and a restarted manager holds every record",
            run: |f| Box::pin(manager_disk_full_fails_requests_and_loses_nothing(f)),
        },
        Case {
            name: "destination_agent_killed_mid_move_leaves_no_copy",
            group: "fencing",
            about: "the destination agent is SIGKILLed while memory flows: restarted, it destroys the incoming copy; not restarted, its watchdog stops it within the lease; the guest stays healthy on its source",
            run: |f| Box::pin(destination_agent_killed_mid_move_leaves_no_copy(f)),
        },
        Case {
            name: "link_cut_mid_round_is_rolled_back_within_20_s",
            group: "faults",
            about: "the destination's link is cut 1.5 s into moving a 512 MiB guest dirtying 60 MB/s: the source rolls back within 20 s and the guest stays healthy",
            run: |f| Box::pin(link_cut_mid_round_is_rolled_back_within_20_s(f)),
        },
        Case {
            name: "destination_qemu_killed_mid_round_is_rolled_back",
            group: "faults",
            about: "the destination's QEMU is SIGKILLed during pre-copy: the source rolls back, the guest stays healthy on it, the destination keeps no copy",
            run: |f| Box::pin(destination_qemu_killed_mid_round_is_rolled_back(f)),
        },
    ]
}

/// Fails the case with a formatted detail unless `cond` holds.
macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Ok(Outcome::fail(format!($($fmt)+)));
        }
    };
}

/// A firmware-only VM (no kernel) the manager places on `host`; waits until it runs
/// there and the manager records it.
async fn manager_vm(
    f: &Fixture,
    name: &str,
    memory_mib: u64,
    host: &str,
) -> Result<(), FaultError> {
    let body = json!({"name": name, "spec": {"vcpus": 1, "memory_mib": memory_mib}, "host": host});
    f.manager_json(Method::POST, "/v1/vms", Some(body)).await?;
    f.wait(
        &format!("{name} runs on {host}"),
        Duration::from_secs(30),
        || f.hosts_of(name) == [host],
    )
    .await?;
    f.wait_recorded(&[name], Duration::from_secs(30)).await
}

/// The newest event's number, to look only at what a case caused.
async fn last_seq(f: &Fixture) -> Result<u64, FaultError> {
    let mut since = 0;
    loop {
        let page = f.manager.events(since, 1000).await?;
        match page.last() {
            Some(e) if page.len() == 1000 => since = e.seq,
            Some(e) => return Ok(e.seq),
            None => return Ok(since),
        }
    }
}

/// The VMs restarted elsewhere since event `since`, one entry per restart.
async fn restarts_since(f: &Fixture, since: u64) -> Result<Vec<String>, FaultError> {
    let events = f.manager.events(since, 1000).await?;
    let mut out: Vec<String> = events
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::VmRestarted { vm, .. } => Some(vm),
            _ => None,
        })
        .collect();
    out.sort();
    Ok(out)
}

async fn wait_host_state(f: &Fixture, host: &str, state: &str) -> Result<Duration, FaultError> {
    let t0 = Instant::now();
    let limit = Duration::from_secs(30);
    loop {
        let h = f
            .manager_json(Method::GET, &format!("/v1/hosts/{host}"), None)
            .await?;
        if h["state"] == state {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return Err(FaultError::Timeout {
                what: format!("{host} {state} again ({h})"),
                limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn agent_restarted_within_its_lease_keeps_its_vms(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    f.manager_rounds().await?;
    for vm in ["fa", "fb"] {
        manager_vm(f, vm, 128, "h1").await?;
    }
    // g1 is not the manager's: a round would destroy it as a stale copy.
    f.hold_rounds().await?;
    f.boot_guest(0, "g1", 256, Some("memdirty --mib 8 --mbps 5"))
        .await?;
    let since = last_seq(f).await?;
    let pid_of = |list: &[tern_agent::vms::VmView], id: &str| {
        list.iter()
            .find(|v| v.info.id == id)
            .and_then(|v| v.info.pid)
    };
    let before = f.agents[0].list_vms().await?;
    let Some(c0) = f.counter(0, "g1").await? else {
        return Ok(Outcome::fail("g1's checksum failed before the fault"));
    };

    f.kill_agent(0).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let up = f.start_agent(0).await?;
    let after = f.agents[0].list_vms().await?;
    for vm in ["g1", "fa", "fb"] {
        let (p0, p1) = (pid_of(&before, vm), pid_of(&after, vm));
        check!(
            p0.is_some() && p0 == p1,
            "{vm}: QEMU {p0:?} before the restart, {p1:?} after"
        );
        let running = after
            .iter()
            .any(|v| v.info.id == vm && v.info.state == tern_hv::VmState::Running);
        check!(running, "{vm} not running after the restart");
    }
    let c1 = f.counter(0, "g1").await?;
    check!(
        c1.is_some_and(|c| c > c0),
        "g1's counter across the restart: {c0} -> {c1:?} (None: checksum failed)"
    );

    // A clean stop, as a service manager sends for an upgrade: the agent goes, its
    // guests, lease and watchdog stay, and the next agent adopts the same QEMUs.
    let dir = &f.lab.hosts[0].state_dir;
    let watchdog = std::fs::read_to_string(tern_agent::fence::watchdog_pid_file(dir))
        .map_err(FaultError::io("reading h1's watchdog pid file"))?;
    let stopped = f.signal_agent(0, "TERM").await?;
    for vm in ["g1", "fa", "fb"] {
        let on = f.hosts_of(vm);
        check!(on == ["h1"], "{vm} runs on {on:?} after SIGTERM, not on h1");
    }
    check!(
        tern_agent::fence::lease_file(dir).exists(),
        "SIGTERM dropped h1's lease: nothing would fence its guests"
    );
    let watching = std::fs::read(format!("/proc/{}/cmdline", watchdog.trim())).unwrap_or_default();
    check!(
        String::from_utf8_lossy(&watching).contains("watchdog"),
        "h1's watchdog stopped with its agent"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    f.start_agent(0).await?;
    let adopted = f.agents[0].list_vms().await?;
    for vm in ["g1", "fa", "fb"] {
        let (p0, p1) = (pid_of(&before, vm), pid_of(&adopted, vm));
        check!(
            p0.is_some() && p0 == p1,
            "{vm}: QEMU {p0:?} before SIGTERM, {p1:?} after"
        );
    }
    let c1 = f.counter(0, "g1").await?;
    check!(
        c1.is_some_and(|c| c > c0),
        "g1's counter across the SIGTERM restart: {c0} -> {c1:?}"
    );
    // Well past the lease: the manager restarted nothing, the host fenced nothing.
    tokio::time::sleep(Duration::from_secs(LEASE_S + 3)).await;
    let c2 = f.counter(0, "g1").await?;
    check!(c2 > c1, "g1's counter past the lease: {c1:?} -> {c2:?}");
    for vm in ["g1", "fa", "fb"] {
        let on = f.hosts_of(vm);
        check!(
            on == ["h1"],
            "{vm} runs on {on:?} past the lease, not on h1"
        );
    }
    let fenced = tern_agent::fence::fenced_file(&f.lab.hosts[0].state_dir).exists();
    check!(!fenced, "h1 fenced itself although its agent came back");
    let restarts = restarts_since(f, since).await?;
    check!(restarts.is_empty(), "the manager restarted {restarts:?}");
    Ok(Outcome::pass(format!(
        "agent up again in {:.1} s; SIGTERM ended it in {} ms; 3 QEMUs adopted with their pids both times; g1's counter {c0} -> {} over {} s",
        up.as_secs_f64(),
        stopped.as_millis(),
        c2.unwrap_or_default(),
        LEASE_S + 3
    )))
}

async fn agent_killed_for_good_is_fenced_and_its_vms_restart_once(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    f.manager_rounds().await?;
    for (vm, host) in [("fa", "h1"), ("fb", "h1"), ("fc", "h2")] {
        manager_vm(f, vm, 128, host).await?;
    }
    let since = last_seq(f).await?;
    f.kill_agent(0).await?;
    let t0 = Instant::now();
    let limit = Duration::from_secs(LEASE_S + 10);
    let stopped = f
        .wait("h1 stops its VMs", limit, || {
            ["fa", "fb"]
                .iter()
                .all(|vm| !f.hosts_of(vm).contains(&"h1".to_string()))
        })
        .await?;
    check!(
        stopped < Duration::from_secs(LEASE_S),
        "h1's VMs stopped {stopped:?} after its agent died, not within the {LEASE_S} s lease"
    );
    f.wait("fa and fb restarted elsewhere", limit, || {
        ["fa", "fb"].iter().all(|vm| {
            let h = f.hosts_of(vm);
            h.len() == 1 && h[0] != "h1"
        })
    })
    .await?;
    let restarted = t0.elapsed();
    check!(
        restarted > stopped,
        "restarted after {restarted:?}, before h1 stopped its copies ({stopped:?})"
    );
    f.wait_recorded(&["fa", "fb"], Duration::from_secs(30))
        .await?;
    let fenced = tern_agent::fence::fenced_file(&f.lab.hosts[0].state_dir).exists();
    check!(fenced, "h1's watchdog left no record of fencing");
    // Back on its old state directory, the agent holds none of the restarted VMs and
    // is active; a few rounds later nothing restarted twice.
    f.start_agent(0).await?;
    wait_host_state(f, "h1", "active").await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let on_h1: Vec<String> = f.agents[0]
        .list_vms()
        .await?
        .into_iter()
        .map(|v| v.info.id)
        .collect();
    check!(on_h1.is_empty(), "h1 came back with {on_h1:?}");
    let restarts = restarts_since(f, since).await?;
    check!(
        restarts == ["fa", "fb"],
        "restarts recorded: {restarts:?}, not fa and fb once each"
    );
    let fc = f.hosts_of("fc");
    check!(fc == ["h2"], "fc, on h2, moved to {fc:?}");
    Ok(Outcome::pass(format!(
        "h1's VMs stopped {:.1} s after its agent died, restarted once elsewhere after {:.1} s (lease {LEASE_S} s); h1 back empty and active",
        stopped.as_secs_f64(),
        restarted.as_secs_f64()
    )))
}

async fn host_cut_off_stops_its_own_vms_first(f: &Fixture) -> Result<Outcome, FaultError> {
    f.manager_rounds().await?;
    // h3: the shared guest lives on h2 and is not to be disturbed.
    manager_vm(f, "fa", 128, "h3").await?;
    let x = 2;
    f.set_link(x, false).await?;
    let t0 = Instant::now();
    let limit = Duration::from_secs(LEASE_S + 10);
    let stopped = f
        .wait("the cut-off host stops fa", limit, || {
            !f.hosts_of("fa").contains(&"h3".to_string())
        })
        .await?;
    f.wait("fa restarted on another host", limit, || {
        let h = f.hosts_of("fa");
        h.len() == 1 && h[0] != "h3"
    })
    .await?;
    let moved = t0.elapsed();
    check!(
        stopped < Duration::from_secs(LEASE_S),
        "h3 stopped fa {stopped:?} after the cut, not within the {LEASE_S} s lease"
    );
    check!(
        moved > stopped,
        "fa restarted after {moved:?}, before h3 stopped it ({stopped:?})"
    );
    f.set_link(x, true).await?;
    // Back on the network it renews again, destroys its stale copy, and is active.
    let back = wait_host_state(f, "h3", "active").await?;
    f.wait_recorded(&["fa"], Duration::from_secs(30)).await?;
    Ok(Outcome::pass(format!(
        "h3 cut off: fa stopped there after {:.1} s, restarted elsewhere after {:.1} s; active {:.1} s after the link came back",
        stopped.as_secs_f64(),
        moved.as_secs_f64(),
        back.as_secs_f64()
    )))
}

/// Starts moving the shared guest from `from` to `to` with tern's adaptive policy, capped
/// at `max_mbit`; returns the migration's id.
async fn send(
    f: &Fixture,
    vm: &str,
    from: usize,
    to: usize,
    max_mbit: u64,
) -> Result<String, FaultError> {
    // Agents call each other with their host certificates: no token.
    let body = json!({"vm": vm, "destination": f.lab.hosts[to].url, "token": "",
                      "policy": "adaptive", "options": {"max_mbit": max_mbit}});
    let m: Value = f.agents[from]
        .http()
        .send(Method::POST, "/v1/migrations", Some(&body))
        .await?;
    m["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| FaultError::Setup(format!("a migration without an id: {m}")))
}

async fn migration(f: &Fixture, host: usize, id: &str) -> Result<Value, FaultError> {
    Ok(f.agents[host]
        .http()
        .get(&format!("/v1/migrations/{id}"))
        .await?)
}

/// Waits until migration `id` on `host` reaches `phase`, or ends; returns its view.
async fn wait_phase(
    f: &Fixture,
    host: usize,
    id: &str,
    phase: &str,
    limit: Duration,
) -> Result<Value, FaultError> {
    let t0 = Instant::now();
    loop {
        let s = migration(f, host, id).await?;
        let p = s["phase"].as_str().unwrap_or("");
        if p == phase || p == "completed" || p == "rolled_back" {
            return Ok(s);
        }
        if t0.elapsed() > limit {
            return Err(FaultError::Timeout {
                what: format!("migration {id} reaches {phase} ({s})"),
                limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The pid of the incoming copy of `vm` on host `host`, once it exists.
async fn incoming_pid(f: &Fixture, host: usize, vm: &str) -> Result<u32, FaultError> {
    let t0 = Instant::now();
    loop {
        if let Ok(v) = f.agents[host].show_vm(vm).await {
            if let Some(pid) = v.info.pid {
                return Ok(pid);
            }
        }
        if t0.elapsed() > Duration::from_secs(30) {
            return Err(FaultError::Timeout {
                what: format!("an incoming copy of {vm} on {}", f.lab.hosts[host].name),
                limit: Duration::from_secs(30),
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until host `host` holds no copy of `vm` (a failed destination cleans up).
async fn wait_no_copy(f: &Fixture, host: usize, vm: &str) -> Result<Duration, FaultError> {
    let t0 = Instant::now();
    let limit = Duration::from_secs(40);
    loop {
        let held = f.agents[host]
            .list_vms()
            .await?
            .iter()
            .any(|v| v.info.id == vm);
        if !held {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return Err(FaultError::Timeout {
                what: format!("{} drops its copy of {vm}", f.lab.hosts[host].name),
                limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The shared guest's counter, checked: `Err` text when its checksum failed or it did
/// not advance past `after`.
async fn healthy(
    f: &Fixture,
    host: usize,
    vm: &str,
    after: u64,
) -> Result<Result<u64, String>, FaultError> {
    Ok(match f.counter(host, vm).await? {
        None => Err(format!("{vm}'s memory checksum failed")),
        Some(c) if c <= after => Err(format!("{vm}'s counter did not advance: {after} -> {c}")),
        Some(c) => Ok(c),
    })
}

async fn destination_agent_killed_mid_move_leaves_no_copy(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let g = f.shared_guest().await?;
    let (y, x) = (g.host, 0);
    let mut counter = match healthy(f, y, g.id, 0).await? {
        Ok(c) => c,
        Err(e) => return Ok(Outcome::fail(format!("before the fault: {e}"))),
    };
    let mut said = Vec::new();
    for restart in [true, false] {
        // 40 Mbit/s against a guest dirtying 60 MB/s: the move stays in pre-copy.
        let id = send(f, g.id, y, x, 40).await?;
        let incoming = incoming_pid(f, x, g.id).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = migration(f, y, &id).await?;
        check!(
            status["phase"] == "pre_copy",
            "not in pre-copy when the agent was to be killed: {status}"
        );
        f.kill_agent(x).await?;
        if restart {
            check!(alive(incoming), "the incoming copy died with its agent");
            f.start_agent(x).await?;
            let gone = f
                .wait(
                    "the restarted agent destroys the incoming copy",
                    Duration::from_secs(5),
                    || !alive(incoming),
                )
                .await?;
            let kept = f.agents[x]
                .list_vms()
                .await?
                .iter()
                .any(|v| v.info.id == g.id);
            check!(!kept, "the restarted agent still lists {}", g.id);
            said.push(format!(
                "restarted: copy destroyed {:.1} s after the start",
                gone.as_secs_f64()
            ));
        } else {
            let gone = f
                .wait(
                    "the isolated host stops the incoming copy",
                    Duration::from_secs(LEASE_S),
                    || !alive(incoming),
                )
                .await?;
            said.push(format!(
                "not restarted: watchdog stopped the copy after {:.1} s",
                gone.as_secs_f64()
            ));
            f.start_agent(x).await?;
        }
        let s = wait_phase(f, y, &id, "rolled_back", Duration::from_secs(60)).await?;
        check!(s["phase"] == "rolled_back", "the move ended {s}");
        let on = f.hosts_of(g.id);
        check!(
            on == [f.lab.hosts[y].name.as_str()],
            "{} runs on {on:?}, not on its source only",
            g.id
        );
        counter = match healthy(f, y, g.id, counter).await? {
            Ok(c) => c,
            Err(e) => return Ok(Outcome::fail(e)),
        };
        // The restarted agent renews its lease again before the next move.
        f.wait_leases().await?;
    }
    Ok(Outcome::pass(format!(
        "{}; the guest healthy on its source",
        said.join("; ")
    )))
}

/// Writes `bytes` of incompressible data into a VM's memory file from 64 MiB up: a
/// firmware-only guest lives in the first megabyte and the top of RAM, which this leaves
/// alone, and round 1 of a move then takes seconds.
fn fill_memory(path: &std::path::Path, bytes: u64) -> Result<(), FaultError> {
    use std::io::{Seek, SeekFrom, Write};
    let err = FaultError::io(format!("filling {}", path.display()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(FaultError::io(format!("opening {}", path.display())))?;
    file.seek(SeekFrom::Start(64 << 20))
        .and_then(|_| {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
            let mut chunk = vec![0u8; 1 << 20];
            for _ in 0..bytes >> 20 {
                for w in chunk.chunks_exact_mut(8) {
                    // xorshift64: pages no compressor shrinks.
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    w.copy_from_slice(&x.to_le_bytes());
                }
                file.write_all(&chunk)?;
            }
            file.sync_data()
        })
        .map_err(err)
}

async fn manager_killed_mid_migration_settles_it_when_restarted(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    f.manager_rounds().await?;
    manager_vm(f, "mg", 512, "h1").await?;
    let view = f.agents[0].show_vm("mg").await?;
    let file = view
        .info
        .memory_file
        .ok_or_else(|| FaultError::Setup("mg has no memory file".into()))?;
    fill_memory(&file, 384 << 20)?;
    let since = last_seq(f).await?;
    f.manager_json(
        Method::POST,
        "/v1/vms/mg/migrate",
        Some(json!({"to": "h3"})),
    )
    .await?;
    // Killed once the agent is sending round 1, so the copy is under way.
    let t0 = Instant::now();
    loop {
        let m = running_migration(f, "mg").await?;
        if m["progress"]["running_round"].as_u64() == Some(1) {
            break;
        }
        check!(
            t0.elapsed() < Duration::from_secs(30),
            "round 1 of the move never seen running: {m}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f.kill_manager().await?;
    let down = Instant::now();
    let up = f.start_manager().await?;
    // Settled: the record names one host, the VM runs there and only there, and no
    // migration is left open.
    let t0 = Instant::now();
    let host = loop {
        let v = f.manager_json(Method::GET, "/v1/vms/mg", None).await?;
        let on = f.hosts_of("mg");
        let open = running_migration(f, "mg").await?.is_object();
        if v["state"] == "running" && on.len() == 1 && v["observed_host"] == on[0] && !open {
            break on[0].clone();
        }
        check!(
            t0.elapsed() < Duration::from_secs(90),
            "not settled 90 s after the restart: record {v}, running on {on:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let settled = down.elapsed();
    let events = f.manager.events(since, 1000).await?;
    let (mut started, mut finished) = (0, Vec::new());
    for e in events {
        match e.kind {
            EventKind::MigrationStarted { vm, .. } if vm == "mg" => started += 1,
            EventKind::MigrationFinished { vm, result, .. } if vm == "mg" => finished.push(result),
            _ => {}
        }
    }
    check!(
        started >= 1 && started == finished.len(),
        "{started} migrations of mg started, {} finished",
        finished.len()
    );
    // The restarted manager followed the copy the agent was making rather than
    // starting another: the move went through.
    let last = format!("{:?}", finished.last());
    check!(host == "h3", "mg settled on {host}, not on h3: {last}");
    check!(
        last.contains("Succeeded"),
        "the last move of mg ended {last}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on = f.hosts_of("mg");
    check!(on == ["h3"], "mg runs on {on:?} 3 s later");
    Ok(Outcome::pass(format!(
        "manager up again in {:.1} s; the move settled on h3 {:.1} s after the kill; {started} started, {started} finished",
        up.as_secs_f64(),
        settled.as_secs_f64()
    )))
}

/// The manager's view of the migration of `vm` under way, or null.
async fn running_migration(f: &Fixture, vm: &str) -> Result<Value, FaultError> {
    let running = f
        .manager_json(Method::GET, "/v1/migrations?running=true", None)
        .await?;
    Ok(running
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["vm"] == vm))
        .cloned()
        .unwrap_or(Value::Null))
}

async fn manager_killed_while_it_creates_a_vm_loses_nothing(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    f.manager_rounds().await?;
    let body = json!({"name": "mc", "spec": {"vcpus": 1, "memory_mib": 128}, "host": "h1"});
    f.manager_json(Method::POST, "/v1/vms", Some(body)).await?;
    // The QEMU exists before the agent answers the create (it still connects to it and
    // starts the guest): the manager dies with its call under way.
    f.wait("mc's QEMU on h1", Duration::from_secs(30), || {
        f.hosts_of("mc") == ["h1"]
    })
    .await?;
    f.kill_manager().await?;
    let killed = Instant::now();
    f.start_manager().await?;
    if let Err(e) = f.wait_recorded(&["mc"], Duration::from_secs(30)).await {
        let on = f.hosts_of("mc");
        return Ok(Outcome::fail(format!("{e}; mc runs on {on:?}")));
    }
    let settled = killed.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on = f.hosts_of("mc");
    check!(on == ["h1"], "mc runs on {on:?} 3 s after it was recorded");
    Ok(Outcome::pass(format!(
        "mc recorded running on h1 {:.1} s after the manager was killed mid-create",
        settled.as_secs_f64()
    )))
}

/// Fills the tmpfs holding the manager's database; returns the bytes written.
fn fill_disk(path: &std::path::Path) -> Result<u64, FaultError> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)
        .map_err(FaultError::io(format!("creating {}", path.display())))?;
    let chunk = vec![0xa5u8; 64 << 10];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => return Ok(written),
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => return Ok(written),
            Err(e) => {
                return Err(FaultError::Io {
                    context: format!("filling {}", path.display()),
                    source: e,
                })
            }
        }
    }
}

async fn manager_disk_full_fails_requests_and_loses_nothing(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    f.manager_rounds().await?;
    for (vm, host) in [("da", "h1"), ("db", "h3")] {
        manager_vm(f, vm, 128, host).await?;
    }
    let before = f.manager_json(Method::GET, "/v1/vms", None).await?;
    let since = last_seq(f).await?;
    let filler = f.db_dir.join("filler");
    let filled = fill_disk(&filler)?;
    let full_at = Instant::now();
    // A write: a new VM. It must fail, and say why.
    let body = json!({"name": "dc", "spec": {"vcpus": 1, "memory_mib": 128}, "host": "h1"});
    let refused = f
        .manager_json(Method::POST, "/v1/vms", Some(body.clone()))
        .await;
    let why = match &refused {
        Ok(v) => {
            let _ = std::fs::remove_file(&filler);
            return Ok(Outcome::fail(format!(
                "a VM was created on a full disk: {v}"
            )));
        }
        Err(e) => e.to_string(),
    };
    // 507 and what to do: the caller can tell a full disk from a fault of the manager.
    let clear = why.contains("507") && why.contains("full") && why.contains("free space");
    // The guests keep running while the disk is full, for longer than a lease: the
    // manager still grants them.
    tokio::time::sleep(Duration::from_secs(LEASE_S + 2)).await;
    let on: Vec<Vec<String>> = ["da", "db"].iter().map(|vm| f.hosts_of(vm)).collect();
    let alive_after = f.manager.hosts().await.is_ok();
    std::fs::remove_file(&filler)
        .map_err(FaultError::io(format!("removing {}", filler.display())))?;
    let full_for = full_at.elapsed();
    check!(clear, "the refusal does not say the disk is full: {why}");
    check!(alive_after, "the manager stopped answering on a full disk");
    check!(
        on == [vec!["h1".to_string()], vec!["h3".to_string()]],
        "with the disk full the VMs ran on {on:?}, not on h1 and h3"
    );
    // Space again: the write goes through, and a restarted manager holds every record.
    f.manager_json(Method::POST, "/v1/vms", Some(body)).await?;
    f.wait("dc runs on h1", Duration::from_secs(30), || {
        f.hosts_of("dc") == ["h1"]
    })
    .await?;
    if let Err(e) = f.wait_recorded(&["dc"], Duration::from_secs(30)).await {
        let events = f.manager.events(since, 1000).await?;
        return Ok(Outcome::fail(format!(
            "after space was freed: {e}; events since the disk filled: {events:?}"
        )));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let on = f.hosts_of("dc");
    check!(
        on == ["h1"],
        "dc, created once space was freed, runs on {on:?} 3 s later"
    );
    f.kill_manager().await?;
    f.start_manager().await?;
    let after = f.manager_json(Method::GET, "/v1/vms", None).await?;
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|x| x["name"].as_str().map(str::to_string))
            .collect();
        n.sort();
        n
    };
    let (n0, n1) = (names(&before), names(&after));
    check!(
        n1 == ["da", "db", "dc"],
        "after the restart the manager holds {n1:?} (before the disk filled: {n0:?})"
    );
    if let Err(e) = f
        .wait_recorded(&["da", "db", "dc"], Duration::from_secs(30))
        .await
    {
        let events = f.manager.events(since, 1000).await?;
        return Ok(Outcome::fail(format!(
            "{e}; events since the disk filled: {events:?}"
        )));
    }
    Ok(Outcome::pass(format!(
        "{} MiB filled; a create refused with \"{}\"; the VMs ran on for {:.0} s; after freeing, writes work and a restarted manager holds all 3 VMs",
        filled >> 20,
        why.chars().take(120).collect::<String>(),
        full_for.as_secs_f64()
    )))
}

async fn link_cut_mid_round_is_rolled_back_within_20_s(f: &Fixture) -> Result<Outcome, FaultError> {
    let g = f.shared_guest().await?;
    let (y, x) = (g.host, 2);
    let counter = match healthy(f, y, g.id, 0).await? {
        Ok(c) => c,
        Err(e) => return Ok(Outcome::fail(format!("before the fault: {e}"))),
    };
    // About the pace of the 1 Gbit/s link the promise was measured on.
    let id = send(f, g.id, y, x, 1000).await?;
    let sent = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    f.set_link(x, false).await?;
    let cut = Instant::now();
    let at_cut = migration(f, y, &id).await?;
    let s = wait_phase(f, y, &id, "rolled_back", Duration::from_secs(60)).await;
    let noticed = cut.elapsed();
    f.set_link(x, true).await?;
    let s = s?;
    check!(
        at_cut["phase"] == "pre_copy",
        "not in pre-copy at the cut: {at_cut}"
    );
    check!(s["phase"] == "rolled_back", "the move ended {s}");
    check!(
        noticed < Duration::from_secs(20),
        "the source rolled back {noticed:?} after the cut, not within 20 s"
    );
    if let Err(e) = healthy(f, y, g.id, counter).await? {
        return Ok(Outcome::fail(e));
    }
    let dropped = wait_no_copy(f, x, g.id).await?;
    f.wait_leases().await?;
    Ok(Outcome::pass(format!(
        "link cut {:.1} s into the move; rolled back {:.1} s after the cut; the destination dropped its copy {:.1} s later; the guest healthy",
        (cut - sent).as_secs_f64(),
        noticed.as_secs_f64(),
        dropped.as_secs_f64()
    )))
}

async fn destination_qemu_killed_mid_round_is_rolled_back(
    f: &Fixture,
) -> Result<Outcome, FaultError> {
    let g = f.shared_guest().await?;
    let (y, x) = (g.host, 0);
    let counter = match healthy(f, y, g.id, 0).await? {
        Ok(c) => c,
        Err(e) => return Ok(Outcome::fail(format!("before the fault: {e}"))),
    };
    let id = send(f, g.id, y, x, 40).await?;
    wait_phase(f, y, &id, "pre_copy", Duration::from_secs(30)).await?;
    let pid = incoming_pid(f, x, g.id).await?;
    tern_hv::qemu::net::run("kill", &["-KILL", &pid.to_string()]).await?;
    let killed = Instant::now();
    let s = wait_phase(f, y, &id, "rolled_back", Duration::from_secs(60)).await?;
    let back = killed.elapsed();
    check!(s["phase"] == "rolled_back", "the move ended {s}");
    if let Err(e) = healthy(f, y, g.id, counter).await? {
        return Ok(Outcome::fail(e));
    }
    let dropped = wait_no_copy(f, x, g.id).await?;
    Ok(Outcome::pass(format!(
        "rolled back {:.1} s after the kill ({}); the destination dropped its record {:.1} s later; the guest healthy",
        back.as_secs_f64(),
        s["error"].as_str().unwrap_or("no error given"),
        dropped.as_secs_f64()
    )))
}
