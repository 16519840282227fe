//! `tern bench api`: a manager over sim hosts on loopback, hammered by concurrent clients
//! with a fixed mix of reads and heartbeats (writes); reports latency percentiles and
//! errors, in all and per kind of request, so a tail can be traced to its route. The API
//! is served over HTTPS with a certificate from a CA made for the run, as a manager with
//! a cluster CA serves it; `--insecure-plain-http` measures plain HTTP beside it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_manager::decide::HostAddresses;

use serde::Serialize;
use tern_manager::control::Control;
use tern_manager::decide::{self, Command, NewVm};
use tern_manager::manager::system_clock;
use tern_manager::state::VmSpec;
use tern_manager::store::SqliteStore;
use tern_manager::Manager;
use tern_simhost::SimCluster;

use crate::cmd::demo::{host_names, Rng, HOST};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// VMs per host.
    #[arg(long, default_value_t = 20)]
    vms_per_host: usize,
    /// Concurrent API clients.
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// How long the clients run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Serve the API over plain HTTP instead of HTTPS (to see what TLS costs).
    #[arg(long)]
    insecure_plain_http: bool,
    #[arg(long)]
    json: bool,
}

/// The kinds of request each client picks from, with their share in percent: mostly
/// reads, a quarter heartbeats (each a write of the host and its VMs), a few event pages.
const MIX: [(Kind, u64); 4] = [
    (Kind::ShowVm, 40),
    (Kind::ShowHost, 30),
    (Kind::Heartbeat, 25),
    (Kind::Events, 5),
];

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    ShowVm,
    ShowHost,
    Heartbeat,
    Events,
}

impl Kind {
    fn route(self) -> &'static str {
        match self {
            Kind::ShowVm => "GET /v1/vms/NAME",
            Kind::ShowHost => "GET /v1/hosts/NAME",
            Kind::Heartbeat => "POST /v1/hosts/NAME/heartbeat",
            Kind::Events => "GET /v1/events?limit=100",
        }
    }

    fn pick(roll: u64) -> Kind {
        let mut acc = 0;
        for (k, share) in MIX {
            acc += share;
            if roll < acc {
                return k;
            }
        }
        unreachable!("the shares of MIX add up to 100")
    }
}

#[derive(Serialize)]
struct Latency {
    requests: usize,
    errors: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

impl Latency {
    fn of(mut lat: Vec<f64>, errors: usize) -> Self {
        lat.sort_by(f64::total_cmp);
        let q = |p: f64| {
            lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        Self {
            requests: lat.len(),
            errors,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            max_ms: q(1.0),
        }
    }
}

#[derive(Serialize)]
struct Report {
    /// The API was served over HTTPS.
    tls: bool,
    hosts: usize,
    vms: usize,
    clients: usize,
    requests: usize,
    errors: usize,
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// The same by route.
    routes: BTreeMap<&'static str, Latency>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.hosts == 0 || a.clients == 0 || a.seconds == 0 || a.vms_per_host == 0 {
        return Err(super::super::bad_input(
            "--hosts, --vms-per-host, --clients and --seconds must be at least 1",
        ));
    }
    let rt = tokio::runtime::Runtime::new()?;
    let db = std::env::temp_dir().join(format!("tern-bench-api-{}.db", std::process::id()));
    let report = rt.block_on(load(&a, &db));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let r = report?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} hosts, {} VMs, {} clients over {}: {} requests ({:.0}/s), {} errors; \
         latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        r.hosts,
        r.vms,
        r.clients,
        if r.tls { "HTTPS" } else { "plain HTTP" },
        r.requests,
        r.requests_per_s,
        r.errors,
        r.p50_ms,
        r.p99_ms,
        r.max_ms
    );
    for (route, l) in &r.routes {
        println!(
            "  {route:<32} {:>7} requests, {} errors; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            l.requests, l.errors, l.p50_ms, l.p99_ms, l.max_ms
        );
    }
    Ok(())
}

/// One client's latencies and error count per kind of request.
type Tally = BTreeMap<Kind, (Vec<f64>, usize)>;

async fn load(a: &Args, db: &std::path::Path) -> anyhow::Result<Report> {
    const TOKEN: &str = "bench";
    let manager = Arc::new(
        Manager::open(Box::new(SqliteStore::open(db)?), system_clock())?
            .serving(HostAddresses::Sim),
    );
    let sim = SimCluster::new();
    let names = host_names(a.hosts);
    let mut cmds = Vec::new();
    for n in &names {
        sim.add_host(n);
        cmds.push(Command::RegisterHost {
            name: n.clone(),
            address: "sim:".into(),
            capacity: HOST,
        });
    }
    manager.execute_many(cmds)?;
    let reqs: Vec<NewVm> = (0..a.hosts * a.vms_per_host)
        .map(|i| NewVm {
            name: format!("vm-{i:06}"),
            spec: VmSpec::sized(1, 1024),
            host: Some(names[i % a.hosts].clone()),
        })
        .collect();
    for r in manager.step(|s, _| decide::create_vms(s, reqs))? {
        r?;
    }
    let control = Control::new(manager.clone(), sim.clone());
    control.settle().await?;
    let on_host: Arc<BTreeMap<String, Vec<String>>> = Arc::new(manager.read(|s| {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in s.vms.values() {
            if let Some(h) = &v.observed_host {
                m.entry(h.clone()).or_default().push(v.name.clone());
            }
        }
        m
    }));
    let served = super::Served::start_with(manager.clone(), TOKEN, !a.insecure_plain_http).await?;
    let base = served.base.clone();
    eprintln!(
        "bench api: {} clients for {} s against {base}",
        a.clients, a.seconds
    );
    let until = Instant::now() + Duration::from_secs(a.seconds);
    let http = served.client.clone();
    let tasks: Vec<_> = (0..a.clients)
        .map(|c| {
            let (http, base, on_host, names) =
                (http.clone(), base.clone(), on_host.clone(), names.clone());
            tokio::spawn(async move {
                let mut rng = Rng(c as u64 + 1);
                let mut tally = Tally::new();
                while Instant::now() < until {
                    let host = &names[rng.next() as usize % names.len()];
                    let vms = &on_host[host];
                    let kind = Kind::pick(rng.next() % 100);
                    let req = match kind {
                        Kind::ShowVm => http.get(format!(
                            "{base}/v1/vms/{}",
                            vms[rng.next() as usize % vms.len()]
                        )),
                        Kind::ShowHost => http.get(format!("{base}/v1/hosts/{host}")),
                        Kind::Heartbeat => {
                            let report = serde_json::json!({
                                "cpu_used": 1.0,
                                "vms": vms.iter()
                                    .map(|v| serde_json::json!({"name": v, "cpu_used": 0.05}))
                                    .collect::<Vec<_>>(),
                            });
                            http.post(format!("{base}/v1/hosts/{host}/heartbeat"))
                                .json(&report)
                        }
                        Kind::Events => http.get(format!("{base}/v1/events?limit=100")),
                    };
                    let t = Instant::now();
                    let ok = match req.bearer_auth(TOKEN).send().await {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    let (lat, errors) = tally.entry(kind).or_default();
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    *errors += usize::from(!ok);
                }
                tally
            })
        })
        .collect();
    let started = Instant::now();
    let mut all = Tally::new();
    for t in tasks {
        for (kind, (lat, errors)) in t.await? {
            let (l, e) = all.entry(kind).or_default();
            l.extend(lat);
            *e += errors;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    served.stop().await?;
    let total = Latency::of(
        all.values().flat_map(|(l, _)| l.iter().copied()).collect(),
        all.values().map(|(_, e)| e).sum(),
    );
    let routes = all
        .into_iter()
        .map(|(k, (lat, errors))| (k.route(), Latency::of(lat, errors)))
        .collect();
    Ok(Report {
        tls: !a.insecure_plain_http,
        hosts: a.hosts,
        vms: a.hosts * a.vms_per_host,
        clients: a.clients,
        requests: total.requests,
        errors: total.errors,
        requests_per_s: total.requests as f64 / wall,
        p50_ms: total.p50_ms,
        p99_ms: total.p99_ms,
        max_ms: total.max_ms,
        routes,
    })
}
