//! The drain case of `tern bench dependency`: a manager on a 3-host lab, several busy
//! guests on h1 (each running the service and the batch job, each service with a
//! client on h3), and h1 drained (`POST /v1/hosts/h1/drain`, what `tern host drain`
//! calls) with the manager's default policy set to each policy in turn. Reports the
//! time to empty the host, the services' latency meanwhile, and whether every batch
//! job's result still checks out on its new host. h3 is registered with too little
//! memory to take a guest, so every guest goes to h2 and the client's host stays
//! out of the way.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{json, Value};
use tern_lab::LabState;

use super::client::{self, Latencies};
use super::dependency::{workload, Args, SERVICE_PORT};
use super::lifecycle::{cli, start_manager, wait_until, Manager};

/// Memory of each drained guest, MiB, and its batch job's.
const DRAIN_VM_MIB: u64 = 256;
const DRAIN_BATCH_MIB: u64 = 64;
/// What h3 offers the manager: less than a guest needs, so nothing is placed there.
const CLIENT_HOST_MIB: u64 = 64;

/// One drain of h1 under one policy.
#[derive(Clone, Debug, Serialize)]
pub struct DrainRun {
    pub policy: String,
    pub vms: u32,
    /// Each batch job's write rate, percent of the link.
    pub rate_percent: u32,
    /// From the drain request until the manager records every guest running elsewhere.
    pub empty_ms: Option<u64>,
    /// Each guest's move as the manager recorded it: total and downtime, ms.
    pub moves_total_ms: Vec<u64>,
    pub moves_downtime_ms: Vec<u64>,
    /// `dependency-aware`: processes each move froze (the source agent's record).
    pub moves_frozen: Vec<u64>,
    /// Every service's requests due while the host drained, together.
    pub client_requests: u64,
    pub client_p50_ms: Option<f64>,
    pub client_p99_ms: Option<f64>,
    pub client_max_ms: Option<f64>,
    pub client_errors: u64,
    /// Guests whose batch job still runs and checks out after the move.
    pub batch_ok: u32,
    pub note: Option<String>,
}

/// Brings up a 3-host lab with a manager that hands out guest addresses on the lab's
/// segment, runs `f`, and takes both down.
pub fn with_manager_lab<T>(
    link_mbit: u32,
    host_mib: u64,
    f: impl AsyncFnOnce(&LabState, &std::path::Path, &mut Manager) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    super::with_lab_on(
        3,
        Some(link_mbit),
        host_mib,
        Some(port),
        async |lab, _img, dir| {
            let net = format!("198.18.{}.0/24", lab.index);
            let mut m = start_manager(lab, port, dir, &["--guest-network", &net]).await?;
            let r = f(lab, dir, &mut m).await;
            m.stop();
            r
        },
    )
}

/// The manager's settings, hosts, image and template for the drain.
async fn setup(lab: &LabState, m: &Manager, host_mib: u64) -> anyhow::Result<()> {
    let mut settings: Value = m.client.get("/v1/balancer").await?;
    // No balancing: only the drain moves guests.
    settings["enabled"] = json!(false);
    settings["interval_s"] = json!(1);
    let _: Value = m.client.put("/v1/balancer", &settings).await?;
    for (i, h) in lab.hosts.iter().enumerate() {
        let mib = if i == 2 { CLIENT_HOST_MIB } else { host_mib };
        let body = json!({"name": h.name, "address": h.url,
                          "capacity": {"cpus": 2.0, "memory_mib": mib}});
        let _: Value = m.client.post("/v1/hosts", &body).await?;
    }
    for h in &lab.hosts {
        wait_until(
            &format!("the manager knows {}'s store", h.name),
            Duration::from_secs(30),
            async || {
                let v: Result<Value, _> = m.client.get(&format!("/v1/hosts/{}", h.name)).await;
                v.is_ok_and(|v| v["store_free_mib"].is_u64())
            },
        )
        .await?;
    }
    eprintln!("image: importing minimal");
    cli(lab, &["image", "import", "minimal", "--from", "minimal"])?;
    cli(
        lab,
        &[
            "template",
            "create",
            "busy",
            "--image",
            "minimal",
            "--memory-mib",
            &DRAIN_VM_MIB.to_string(),
        ],
    )?;
    Ok(())
}

/// Drains h1 once per tern policy of `policies` (QEMU's own migration is no policy the
/// manager can use).
pub async fn drain(
    lab: &LabState,
    m: &mut Manager,
    args: &Args,
    policies: &[String],
    rate_percent: u32,
    host_mib: u64,
) -> anyhow::Result<Vec<DrainRun>> {
    setup(lab, m, host_mib).await?;
    let mut runs = Vec::new();
    for (round, policy) in policies
        .iter()
        .filter(|p| p.parse::<tern_migrate::PolicyKind>().is_ok())
        .enumerate()
    {
        eprintln!(
            "bench: drain h1 of {} guests under {policy}",
            args.drain_vms
        );
        let r = drain_once(lab, m, args, policy, round, rate_percent).await?;
        eprintln!("bench: {r:?}");
        runs.push(r);
    }
    Ok(runs)
}

async fn drain_once(
    lab: &LabState,
    m: &Manager,
    args: &Args,
    policy: &str,
    round: usize,
    rate_percent: u32,
) -> anyhow::Result<DrainRun> {
    let mut settings: Value = m.client.get("/v1/balancer").await?;
    // A drain's moves take `evacuation_policy` when it is set, else `default_policy`.
    settings["default_policy"] = json!(policy);
    settings["evacuation_policy"] = json!(policy);
    let _: Value = m.client.put("/v1/balancer", &settings).await?;
    let agent = |host: &str| -> anyhow::Result<tern_api::client::AgentClient> {
        let h = lab
            .hosts
            .iter()
            .find(|h| h.name == host)
            .with_context(|| format!("no lab host {host}"))?;
        Ok(lab.client(&h.url, Duration::from_secs(30))?)
    };
    let h1 = agent("h1")?;
    let names: Vec<String> = (1..=args.drain_vms)
        .map(|i| format!("d{}-{i}", round + 1))
        .collect();
    let mbps = f64::from(args.link_mbit) * 1e6 / 8.0 * f64::from(rate_percent) / 100.0 / 1e6;
    let mut addrs = Vec::new();
    for vm in &names {
        let _: Value = m
            .client
            .post(
                "/v1/vms",
                &json!({"name": vm, "host": "h1", "template": "busy", "spec": {"nic": true}}),
            )
            .await?;
    }
    for vm in &names {
        let guest = async |req: Value| -> anyhow::Result<Value> {
            let v = h1.guest(vm, &req).await?;
            anyhow::ensure!(v["ok"] == true, "guest of {vm} answered {v}");
            Ok(v["result"].clone())
        };
        wait_until(
            &format!("the guest of {vm} answers"),
            Duration::from_secs(240),
            async || guest(json!({"cmd": "ping"})).await.is_ok(),
        )
        .await?;
        guest(json!({"cmd": "start", "workload": format!("service --port {SERVICE_PORT}")}))
            .await?;
        guest(json!({"cmd": "start",
                     "workload": format!("batch --mib {DRAIN_BATCH_MIB} --mbps {mbps:.0}")}))
        .await?;
        let v: Value = m.client.get(&format!("/v1/vms/{vm}")).await?;
        let addr: Ipv4Addr = v["spec"]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("{vm} has no address: {v}"))?;
        addrs.push(addr);
    }
    // Every batch job past its fill, then a moment to settle.
    for vm in &names {
        wait_until(
            &format!("the batch job of {vm} writes at its pace"),
            Duration::from_secs(120),
            async || {
                h1.guest(vm, &json!({"cmd": "status"}))
                    .await
                    .is_ok_and(|s| {
                        workload(&s["result"], "batch")
                            .is_some_and(|w| w["work"].as_u64().unwrap_or(0) > 0)
                    })
            },
        )
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let client_ns = &lab.hosts[2].netns;
    // The manager hands the addresses of the last round's guests to this round's, with
    // other MACs: the client's host would send to the old ones until its neighbour
    // entries went stale, seconds of lost requests that are no part of the drain.
    let flushed = std::process::Command::new("ip")
        .args(["-n", client_ns, "neigh", "flush", "all"])
        .status()
        .context("running ip neigh flush")?;
    anyhow::ensure!(
        flushed.success(),
        "ip -n {client_ns} neigh flush all: {flushed}"
    );
    let cap =
        Duration::from_secs_f64((args.max_precopy_s + 120.0) * f64::from(args.drain_vms) + 60.0);
    let clients = addrs
        .iter()
        .map(|&a| {
            client::start(
                client_ns,
                SocketAddrV4::new(a, SERVICE_PORT),
                args.client_rps,
                cap,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut before = Vec::new();
    for vm in &names {
        let s = h1.guest(vm, &json!({"cmd": "status"})).await?;
        before.push(workload(&s["result"], "batch").map(|w| w["checked"].as_u64().unwrap_or(0)));
    }
    // What the guests' agents take as tainted, for the record on stderr.
    for vm in &names {
        match h1.http().get::<Value>(&format!("/v1/vms/{vm}/taint")).await {
            Ok(t) => eprintln!("bench:   {vm} taint: {t}"),
            Err(e) => eprintln!("bench:   {vm} taint: {e}"),
        }
    }
    let starts: Vec<Duration> = clients.iter().map(client::Client::elapsed).collect();
    let t0 = Instant::now();
    let _: Value = m
        .client
        .post("/v1/hosts/h1/drain", &json!({}))
        .await
        .context("draining h1")?;
    let limit = Duration::from_secs_f64((args.max_precopy_s + 120.0) * f64::from(args.drain_vms));
    let emptied = wait_until("h1 empty", limit, async || {
        let vms: Result<Vec<Value>, _> = m.client.get("/v1/vms").await;
        vms.is_ok_and(|vms| {
            names.iter().all(|n| {
                vms.iter().any(|v| {
                    v["name"] == n.as_str()
                        && v["state"] == "running"
                        && v["observed_host"].as_str().is_some_and(|h| h != "h1")
                })
            })
        })
    })
    .await;
    let empty = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut all = Vec::new();
    for c in clients {
        all.push(c.stop().await?);
    }
    let empty_ms = emptied.is_ok().then_some(empty.as_millis() as u64);
    let mut note = emptied.err().map(|e| format!("{e:#}"));
    // Every service's requests due while the host drained, in one window each.
    let windows: Vec<Vec<f64>> = all
        .iter()
        .zip(&starts)
        .map(|(l, &s)| l.between(s, s + empty).sorted_ms().to_vec())
        .collect();
    let together = client::Window::from_ms(windows.concat());
    let errors = all.iter().map(Latencies::errors).sum();
    // Each batch job on its new host.
    let mut batch_ok = 0;
    let vms: Vec<Value> = m.client.get("/v1/vms").await?;
    for (vm, b) in names.iter().zip(&before) {
        let host = vms
            .iter()
            .find(|v| v["name"] == vm.as_str())
            .and_then(|v| v["observed_host"].as_str())
            .unwrap_or("h1")
            .to_string();
        let ok = async {
            let s = agent(&host)?.guest(vm, &json!({"cmd": "status"})).await?;
            let w = workload(&s["result"], "batch").context("no batch job")?;
            anyhow::Ok(
                w["running"] == true
                    && w.get("error").is_none_or(Value::is_null)
                    && w["checked"].as_u64().unwrap_or(0) > b.unwrap_or(u64::MAX),
            )
        }
        .await;
        match ok {
            Ok(true) => batch_ok += 1,
            Ok(false) => {
                note.get_or_insert(format!("{vm}: the batch job does not check out"));
            }
            Err(e) => {
                note.get_or_insert(format!("{vm}: {e:#}"));
            }
        }
    }
    // The source's own record of each move: what the guest froze and for how long.
    let mut moves_frozen = Vec::new();
    if let Ok(views) = h1.http().get::<Value>("/v1/migrations").await {
        for v in views.as_array().into_iter().flatten() {
            if names.iter().any(|n| v["vm"] == n.as_str()) {
                eprintln!("bench:   {} dependency: {}", v["vm"], v["dependency"]);
                if let Some(f) = v["dependency"]["frozen"].as_u64() {
                    moves_frozen.push(f);
                }
            }
        }
    }
    let records: Vec<Value> = m.client.get("/v1/migrations?limit=100").await?;
    let moves: Vec<&Value> = records
        .iter()
        .filter(|r| {
            names.iter().any(|n| r["vm"] == n.as_str()) && r["result"]["status"] == "succeeded"
        })
        .collect();
    let run = DrainRun {
        policy: policy.to_string(),
        vms: args.drain_vms,
        rate_percent,
        empty_ms,
        moves_total_ms: moves
            .iter()
            .filter_map(|r| r["result"]["total_ms"].as_u64())
            .collect(),
        moves_downtime_ms: moves
            .iter()
            .filter_map(|r| r["result"]["downtime_ms"].as_u64())
            .collect(),
        moves_frozen,
        client_requests: together.count() as u64,
        client_p50_ms: together.quantile(0.5),
        client_p99_ms: together.quantile(0.99),
        client_max_ms: together.quantile(1.0),
        client_errors: errors,
        batch_ok,
        note,
    };
    // Back to an empty, active h1 for the next policy.
    let _: Value = m.client.post("/v1/hosts/h1/activate", &json!({})).await?;
    for vm in &names {
        let _: Result<Value, _> = m.client.delete(&format!("/v1/vms/{vm}")).await;
    }
    wait_until(
        "the drained guests deleted",
        Duration::from_secs(120),
        async || {
            let vms: Result<Vec<Value>, _> = m.client.get("/v1/vms").await;
            vms.is_ok_and(|vms| {
                !vms.iter()
                    .any(|v| names.iter().any(|n| v["name"] == n.as_str()))
            })
        },
    )
    .await?;
    Ok(run)
}

pub fn print_table(runs: &[DrainRun]) {
    println!(
        "drain: {:<17} {:>3} {:>5} {:>9} {:>22} {:>7} {:>7} {:>7} {:>4} {:>8}",
        "policy",
        "vms",
        "rate",
        "empty ms",
        "moves total ms",
        "p50",
        "p99",
        "max",
        "err",
        "batch ok"
    );
    let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.1}"));
    for r in runs {
        let moves = r
            .moves_total_ms
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "       {:<17} {:>3} {:>4}% {:>9} {:>22} {:>7} {:>7} {:>7} {:>4} {:>5}/{:<2}{}",
            r.policy,
            r.vms,
            r.rate_percent,
            r.empty_ms.map_or("-".into(), |x| x.to_string()),
            moves,
            f(r.client_p50_ms),
            f(r.client_p99_ms),
            f(r.client_max_ms),
            r.client_errors,
            r.batch_ok,
            r.vms,
            r.note
                .as_ref()
                .map_or(String::new(), |n| format!("  ({n})")),
        );
    }
}
