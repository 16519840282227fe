//! `tern bench balance`: the manager's balancing round over the demo's uneven cluster.
//!
//! - the *easy* round: the default settings (up to 8 migrations at once), planned in
//!   memory (no store, no agents);
//! - the *hard* round: the demo's first round (its settings: up to 4000 migrations,
//!   16 per host), planned in memory;
//! - API writes while a hard round runs: the demo's cluster behind the manager's HTTP
//!   API on loopback, heartbeats (the bulk of the writes) sent by concurrent clients
//!   from the moment the round starts planning until it has committed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tern_manager::decide::{self, LoadReport, NewVm, VmLoad};
use tern_manager::state::{BalancerSettings, Host, HostState, Snapshot, VmState};

use crate::cmd::demo::{host_names, settings, start, uneven, Rng, HOST};

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    #[arg(long, default_value_t = 20000)]
    vms: usize,
    /// Timed repetitions of each in-memory round.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Concurrent API clients writing while the hard round runs.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    hosts: usize,
    vms: usize,
    /// Median of the easy rounds (default settings), and every repetition.
    easy_round_ms: f64,
    easy_rounds_ms: Vec<f64>,
    easy_round_moves: usize,
    /// Median of the hard rounds (the demo's first round), and every repetition.
    hard_round_ms: f64,
    hard_rounds_ms: Vec<f64>,
    hard_round_moves: usize,
    hard_round_spread_before: f64,
    hard_round_spread_after: f64,
    /// The hard round in a running manager: planning, and planning plus commit.
    live_round_planning_ms: f64,
    live_round_ms: f64,
    live_round_moves: usize,
    /// Heartbeats over HTTP while the live round ran.
    api_writes: usize,
    api_write_errors: usize,
    api_write_p50_ms: f64,
    api_write_p99_ms: f64,
    api_write_max_ms: f64,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.hosts == 0 || a.vms == 0 || a.repeats == 0 || a.clients == 0 {
        return Err(super::super::bad_input(
            "--hosts, --vms, --repeats and --clients must be at least 1",
        ));
    }
    let mut snap = uneven_snapshot(a.hosts, a.vms, a.seed);
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let time = |s: &Snapshot| {
        let t = Instant::now();
        let p = decide::balance::plan(s, 0);
        (t.elapsed().as_secs_f64() * 1e3, p)
    };
    let (mut easy, mut hard) = (Vec::new(), Vec::new());
    let (mut easy_moves, mut hard_plan) = (0, None);
    for i in 0..a.repeats {
        eprintln!("bench balance: repetition {}/{}", i + 1, a.repeats);
        snap.settings = BalancerSettings::default();
        let (ms, p) = time(&snap);
        easy.push(ms);
        easy_moves = p.moves.len();
        snap.settings = settings(4);
        let (ms, p) = time(&snap);
        hard.push(ms);
        hard_plan = Some(p);
    }
    let hard_plan = hard_plan.unwrap_or_default();
    let rt = tokio::runtime::Runtime::new()?;
    let db = std::env::temp_dir().join(format!("tern-bench-balance-{}.db", std::process::id()));
    let live = rt.block_on(live_round(&a, &db));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
    }
    let live = live?;
    let report = Report {
        hosts: a.hosts,
        vms: snap.vms.len(),
        easy_round_ms: median(&easy),
        easy_rounds_ms: easy,
        easy_round_moves: easy_moves,
        hard_round_ms: median(&hard),
        hard_rounds_ms: hard,
        hard_round_moves: hard_plan.moves.len(),
        hard_round_spread_before: hard_plan.score_before,
        hard_round_spread_after: hard_plan.score_after,
        live_round_planning_ms: live.planning_ms,
        live_round_ms: live.round_ms,
        live_round_moves: live.moves,
        api_writes: live.latencies.len(),
        api_write_errors: live.errors,
        api_write_p50_ms: quantile(&live.latencies, 0.5),
        api_write_p99_ms: quantile(&live.latencies, 0.99),
        api_write_max_ms: quantile(&live.latencies, 1.0),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let r = &report;
    println!(
        "{} hosts x {} VMs\n  easy round (default settings): {} moves, median {:.1} ms\n  \
         hard round (the demo's first): {} moves, spread {:.4} -> {:.4}, median {:.1} ms\n  \
         in a running manager: planned in {:.1} ms, committed {} moves after {:.1} ms; \
         {} heartbeats meanwhile ({} errors), p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        r.hosts,
        r.vms,
        r.easy_round_moves,
        r.easy_round_ms,
        r.hard_round_moves,
        r.hard_round_spread_before,
        r.hard_round_spread_after,
        r.hard_round_ms,
        r.live_round_planning_ms,
        r.live_round_moves,
        r.live_round_ms,
        r.api_writes,
        r.api_write_errors,
        r.api_write_p50_ms,
        r.api_write_p99_ms,
        r.api_write_max_ms
    );
    Ok(())
}

fn quantile(lat: &[f64], q: f64) -> f64 {
    let mut v = lat.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(((v.len() as f64 - 1.0) * q).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

/// The demo's cluster as a snapshot in memory: every VM running where it was placed,
/// busy as the demo makes it.
fn uneven_snapshot(hosts: usize, vms: usize, seed: u64) -> Snapshot {
    let names = host_names(hosts);
    let mut snap = Snapshot::default();
    for name in &names {
        let h = Host {
            name: name.clone(),
            address: "sim:".into(),
            capacity: HOST,
            state: HostState::Active,
            last_heartbeat: Some(0),
            cpu_used: None,
            cpu_smoothed: None,
            store_free_mib: None,
        };
        snap.hosts.insert(name.clone(), h);
    }
    let mut rng = Rng(seed);
    let (reqs, loads) = uneven(&names, vms, &mut rng);
    let (changes, results) = decide::create_vms(&snap, reqs.clone());
    snap.apply(&changes, &[]);
    let refused: Vec<NewVm> = results
        .iter()
        .zip(&reqs)
        .filter(|(r, _)| r.is_err())
        .map(|(_, q)| NewVm {
            host: None,
            ..q.clone()
        })
        .collect();
    let (changes, _) = decide::create_vms(&snap, refused);
    snap.apply(&changes, &[]);
    for (v, load) in snap.vms.values_mut().zip(loads) {
        v.observed_host = v.desired_host.clone();
        v.state = VmState::Running;
        v.cpu_used = load * f64::from(v.spec.vcpus);
        v.cpu_measured = true;
    }
    snap
}

/// What the live hard round measured.
struct Live {
    planning_ms: f64,
    round_ms: f64,
    moves: usize,
    latencies: Vec<f64>,
    errors: usize,
}

/// The demo's cluster in a manager behind its API; one balancing round while clients
/// send heartbeats.
async fn live_round(a: &Args, db: &std::path::Path) -> anyhow::Result<Live> {
    const TOKEN: &str = "bench";
    let (manager, control, _) = start(a.hosts, a.vms, 4, a.seed, db).await?;
    // Each host's heartbeat as it would report now.
    let reports: Arc<Vec<(String, LoadReport)>> = Arc::new(manager.read(|s| {
        let mut by_host: std::collections::BTreeMap<&str, LoadReport> = s
            .hosts
            .keys()
            .map(|h| (h.as_str(), LoadReport::default()))
            .collect();
        for v in s.vms.values() {
            if let Some(r) = v.observed_host.as_deref().and_then(|h| by_host.get_mut(h)) {
                r.cpu_used += v.cpu_used;
                r.vms.push(VmLoad {
                    name: v.name.parse().expect("stored VM names follow the rule"),
                    cpu_used: v.cpu_used,
                    guest: None,
                    powered_off: false,
                });
            }
        }
        by_host
            .into_iter()
            .map(|(h, r)| (h.to_owned(), r))
            .collect()
    }));
    let served = super::Served::start(manager.clone(), TOKEN).await?;
    let base = served.base.clone();
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let clients: Vec<_> = (0..a.clients)
        .map(|c| {
            let (http, base, reports, running) =
                (http.clone(), base.clone(), reports.clone(), running.clone());
            tokio::spawn(async move {
                let mut rng = Rng(c as u64 + 1);
                let (mut lat, mut errors) = (Vec::new(), 0);
                while running.load(std::sync::atomic::Ordering::Relaxed) {
                    let (host, report) = &reports[rng.next() as usize % reports.len()];
                    let t = Instant::now();
                    let ok = match http
                        .post(format!("{base}/v1/hosts/{host}/heartbeat"))
                        .bearer_auth(TOKEN)
                        .json(report)
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    lat.push(t.elapsed().as_secs_f64() * 1e3);
                    errors += usize::from(!ok);
                }
                (lat, errors)
            })
        })
        .collect();
    eprintln!(
        "bench balance: hard round in a running manager, {} clients writing",
        a.clients
    );
    // The round blocks its thread (planning is CPU work); the clients keep the runtime.
    let t = Instant::now();
    let ctl = control.clone();
    let plan = tokio::task::spawn_blocking(move || ctl.balance()).await??;
    let round_ms = t.elapsed().as_secs_f64() * 1e3;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for c in clients {
        let (l, e) = c.await?;
        latencies.extend(l);
        errors += e;
    }
    served.stop().await?;
    Ok(Live {
        planning_ms: plan.planning_ms.unwrap_or(0.0),
        round_ms,
        moves: plan.moves.len(),
        latencies,
        errors,
    })
}
