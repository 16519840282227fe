//! A real guest through the agent: the QEMU driver boots tern's guest image, the API
//! proxies requests to the guest agent, a workload runs, the verifier's checksum holds,
//! and the vCPU threads' CPU time shows in the metrics and the host's load; the trace
//! route records the vCPU threads' scheduler events and refuses bad requests. The
//! host's fw_cfg configuration names the guest and addresses its NIC.

use serde_json::json;
use std::time::{Duration, Instant};
use tern_agent::client::AgentClient;
use tern_api::client::ClientError;
use tern_api::trace::{TraceRequest, MAX_TRACE_MS};
use tern_hv::{Action, VmState};

mod qemu_agent;
use qemu_agent::QemuAgent as Agent;

/// An agent with the QEMU driver on a loopback port.
async fn agent() -> Agent {
    Agent::start(
        "h1",
        tempfile::tempdir().unwrap(),
        None,
        Duration::from_secs(30),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_and_answers_through_the_agent() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let a = agent().await;
    let c = &a.c;
    let req = a.vm("g1", json!({"vcpus": 1}));
    let v = c.create_vm(&req).await.unwrap();
    assert_eq!(v.info.state, VmState::Running);

    // Booting under TCG takes seconds; the agent's channel answers once the guest is up.
    let t0 = Instant::now();
    let pong = loop {
        match c.guest("g1", &json!({"cmd": "ping"})).await {
            Ok(p) => break p,
            Err(e) if t0.elapsed() < Duration::from_secs(90) => {
                eprintln!("waiting for the guest: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("guest never answered: {e}"),
        }
    };
    eprintln!("guest answered after {:?}", t0.elapsed());
    assert_eq!(pong["ok"], true, "{pong}");
    assert_eq!(pong["result"]["kind"], "pong");

    let started = c
        .guest(
            "g1",
            &json!({"cmd": "start", "workload": "memdirty --mib 16 --mbps 20"}),
        )
        .await
        .unwrap();
    assert_eq!(started["ok"], true, "{started}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let verify = c.guest("g1", &json!({"cmd": "verify"})).await.unwrap();
    assert_eq!(verify["result"]["ok"], true, "{verify}");

    let m = c.metrics("g1").await.unwrap();
    assert_eq!(m.vcpus.len(), 1);
    assert!(m.vcpu_cpu_ns > 0, "a booted guest used CPU");
    // The sampler (1 s period) has seen the busy guest by now.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let h = c.host().await.unwrap();
    assert!(h.load.vm_cpu_cores > 0.0, "{h:?}");

    let health = c.guest("g1", &json!({"cmd": "health"})).await.unwrap();
    assert_eq!(health["result"]["ok"], true, "{health}");
    let ram = v.info.memory_file.unwrap();
    assert!(ram.exists());
    c.delete_vm("g1").await.unwrap();
    assert!(!ram.exists());

    a.shut().await;
}

fn status(e: ClientError) -> u16 {
    match e {
        ClientError::Remote { status, .. } => status,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_vms_vcpu_threads_are_traced_and_bad_requests_refused() {
    if !tern_testkit::require_qemu() || !tern_testkit::is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with QEMU"
        );
        eprintln!("SKIP: tracing needs root and QEMU");
        return;
    }
    let a = agent().await;
    let c = &a.c;
    c.create_vm(&a.vm("g1", json!({"vcpus": 2}))).await.unwrap();

    // Refused before anything is recorded.
    let trace = |id: &'static str, duration_ms: u64| async move {
        c.trace(
            id,
            &TraceRequest {
                duration_ms,
                host_only: true,
            },
        )
        .await
    };
    for bad in [0, MAX_TRACE_MS + 1] {
        assert_eq!(status(trace("g1", bad).await.unwrap_err()), 400, "{bad} ms");
    }
    assert_eq!(status(trace("nope", 100).await.unwrap_err()), 404);

    let v = trace("g1", 1000).await.unwrap();
    assert_eq!((v.vm.as_str(), v.host.as_str()), ("g1", "h1"));
    assert_eq!(v.vcpu_threads.len(), 2);
    let t = &v.trace;
    let secs = (t.end_ns - t.start_ns) as f64 / 1e9;
    eprintln!(
        "{} events in {secs:.2} s, lost {}, dropped {}",
        t.events.len(),
        t.lost,
        t.dropped
    );
    assert!((0.95..2.0).contains(&secs), "{secs} s");
    assert!(!t.events.is_empty(), "a booting guest's vCPUs switch");
    for e in &t.events {
        let tids = e.kind.tids();
        assert!(
            tids.iter()
                .flatten()
                .any(|tid| v.vcpu_threads.contains(tid)),
            "{e:?} is not about a vCPU thread"
        );
    }

    c.act("g1", Action::Stop).await.unwrap();
    let e = trace("g1", 100).await.unwrap_err();
    assert_eq!(status(e), 409, "a stopped VM is not traced");
    c.delete_vm("g1").await.unwrap();
    a.shut().await;
}

/// The guest's answer to `req`, which must succeed.
async fn guest_ok(c: &AgentClient, id: &str, req: serde_json::Value) -> serde_json::Value {
    let v = c.guest(id, &req).await.unwrap();
    assert_eq!(v["ok"], true, "{req} → {v}");
    v["result"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_thread_moved_to_vcpu_1_shows_there_in_the_merged_trace_within_20_ms() {
    use tern_trace::merge::{guest_timeline, summarize_guest};
    use tern_trace::{State, VcpuMap};
    if !tern_testkit::require_qemu() || !tern_testkit::is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root with QEMU"
        );
        eprintln!("SKIP: tracing needs root and QEMU");
        return;
    }
    let a = agent().await;
    let c = &a.c;
    c.create_vm(&a.vm("g2", json!({"vcpus": 2}))).await.unwrap();
    let t0 = Instant::now();
    while c.guest("g2", &json!({"cmd": "ping"})).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "guest never answered"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The second vCPU comes up shortly after userspace starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    guest_ok(
        c,
        "g2",
        json!({"cmd": "start", "workload": "cpu --percent 100"}),
    )
    .await;
    guest_ok(
        c,
        "g2",
        json!({"cmd": "affinity", "threads": "cpu-", "cpu": 0}),
    )
    .await;

    let req = TraceRequest {
        duration_ms: 3000,
        host_only: false,
    };
    let (trace, moved) = tokio::join!(c.trace("g2", &req), async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        guest_ok(
            c,
            "g2",
            json!({"cmd": "affinity", "threads": "cpu-", "cpu": 1}),
        )
        .await
    });
    let v = trace.unwrap();
    let g = v.guest.clone().expect("the guest level was asked for");
    let al = g.alignment.expect("clocks aligned");
    let secs = (g.end_ns - g.start_ns) as f64 / 1e9;
    eprintln!(
        "guest: {} events in {secs:.2} s ({:.0}/s), lost {}, dropped {}; clock offset {} ns, \
         error ≤ {} ns (best round trip {} ns of {} exchanges); host: {} events",
        g.events.len(),
        g.events.len() as f64 / secs,
        g.lost,
        g.dropped,
        al.offset_ns,
        al.error_ns,
        al.round_trip_ns,
        al.exchanges,
        v.trace.events.len()
    );
    assert_eq!(al.exchanges, 16);
    assert!(
        al.error_ns < 5_000_000,
        "alignment error {} ns",
        al.error_ns
    );
    assert!((2.5..5.0).contains(&secs), "{secs} s");
    assert_eq!(g.dropped, 0, "a 1M-record buffer read every 50 ms");

    let tid = moved["threads"][0].as_u64().unwrap() as u32;
    let moment = al.to_host(moved["time_ns"].as_u64().unwrap());
    let slack = 20_000_000 + al.error_ns;
    let gtl = guest_timeline(&g);
    let runs: Vec<_> = gtl
        .spans_of(tid)
        .filter_map(|s| match s.state {
            State::Running { cpu } => Some((s.start_ns, s.end_ns, cpu)),
            _ => None,
        })
        .collect();
    assert!(
        runs.iter()
            .any(|&(_, end, cpu)| cpu == 0 && end <= moment + slack),
        "ran on vCPU 0 before the move: {runs:?}"
    );
    let on1 = runs
        .iter()
        .find(|&&(_, end, cpu)| cpu == 1 && end > moment)
        .expect("ran on vCPU 1 after the move");
    let latency = on1.0.saturating_sub(moment);
    eprintln!(
        "moved at {moment}; on vCPU 1 from {} ({:.3} ms after)",
        on1.0,
        latency as f64 / 1e6
    );
    assert!(latency <= slack, "{latency} ns after the move");
    assert!(
        runs.iter()
            .all(|&(start, _, cpu)| cpu == 1 || start < moment + slack),
        "back on vCPU 0 after the move: {runs:?}"
    );

    // The merged summary: the thread's vCPU migration and its run time.
    let vcpus = VcpuMap::from_threads(&v.vcpu_threads);
    let (host_tl, _) = tern_trace::analyse(&v.trace, &vcpus);
    let s = summarize_guest(&gtl, &g, &host_tl, &vcpus);
    let p = s.processes.iter().find(|p| p.tid == tid).unwrap();
    eprintln!("{p:?}; guest delay total {} ns", s.double_sched_delay_ns);
    assert_eq!(p.comm, "cpu-0");
    assert_eq!(p.vcpus, vec![0, 1]);
    assert!(p.vcpu_migrations >= 1);
    assert!(
        p.run_ns > 1_000_000_000,
        "a spinning thread ran most of 3 s"
    );
    assert_eq!(s.dropped, g.dropped);

    c.delete_vm("g2").await.unwrap();
    a.shut().await;
}

/// The minimal image applies the spec's `guest_config` as the Debian image does: its
/// host name and address take the place of the command line's, and the host reaches
/// the guest at that address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minimal_image_takes_its_name_and_address_over_fw_cfg() {
    if !tern_testkit::require_qemu() {
        return;
    }
    // Apart from the lab's subnets and the Debian test's.
    let (host, guest) = ("198.19.253.1", "198.19.253.10");
    let Some((_bridge, a)) = Agent::on_new_bridge("tmin", host).await else {
        return;
    };
    let cfg = json!({"hostname": "mini-cfg", "address": format!("{guest}/24"), "gateway": host});
    let v =
        a.c.create_vm(&a.vm("cfg1", json!({"nics": [{}], "guest_config": cfg})))
            .await
            .unwrap();
    let log = v.info.console_log.clone().expect("a console log");
    let deadline = Instant::now() + Duration::from_secs(120);
    while a.c.guest("cfg1", &json!({"cmd": "ping"})).await.is_err() {
        assert!(Instant::now() < deadline, "the guest never answered");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("tern-init: host name mini-cfg"), "{text}");
    assert!(
        text.contains(&format!("tern-init: eth0 {guest}/24")),
        "{text}"
    );
    let pinged = std::process::Command::new("ping")
        .args(["-c", "3", "-W", "2", guest])
        .output()
        .unwrap();
    assert!(
        pinged.status.success(),
        "the host reaches the guest at its configured address: {}",
        String::from_utf8_lossy(&pinged.stdout)
    );
    a.c.delete_vm("cfg1").await.unwrap();
    a.shut().await;
}
