//! `tern demo --sim`: a whole cluster in one process on the `sim` hypervisor driver. VMs
//! are created unevenly, the manager's control loop balances them by live migration, and
//! the per-host load before and after is printed with every migration.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_manager::decide::HostAddresses;

use serde::Serialize;
use tern_manager::control::Control;
use tern_manager::decide::{self, Command, NewVm};
use tern_manager::manager::system_clock;
use tern_manager::state::{
    BalancerSettings, Capacity, Migration, MigrationResult, Snapshot, VmSpec,
};
use tern_manager::store::SqliteStore;
use tern_manager::Manager;
use tern_simhost::SimCluster;

mod lab;

#[derive(clap::Args)]
pub struct Args {
    /// Run in one process on the sim driver (needs nothing installed).
    #[arg(long)]
    sim: bool,
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    #[arg(long, default_value_t = 20000)]
    vms: usize,
    /// Balancing rounds at most (the demo stops earlier once a round plans nothing).
    #[arg(long, default_value_t = 8)]
    rounds: usize,
    /// Balancer aggressiveness, 1 (conservative) to 5.
    #[arg(long, default_value_t = 4)]
    aggressiveness: u8,
    /// Seed of the VM sizes, loads and the uneven placement.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the state database here (default: a temporary file, removed at the end).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// Per-host CPU utilisation (cores in use / cores) as a summary.
#[derive(Serialize)]
struct LoadSummary {
    min: f64,
    p50: f64,
    p90: f64,
    max: f64,
    stddev: f64,
    over_80: usize,
    over_100: usize,
    spread_score: f64,
}

#[derive(Serialize)]
struct RoundLine {
    round: usize,
    planned: usize,
    decision_ms: f64,
    score_before: f64,
    score_after: f64,
    skipped: BTreeMap<tern_api::manager::NotMoved, u64>,
}

#[derive(Serialize)]
struct Report {
    hosts: usize,
    vms: usize,
    before: LoadSummary,
    after: LoadSummary,
    rounds: Vec<RoundLine>,
    migrations: Vec<Migration>,
    wall_s: f64,
}

/// Every demo host: 32 cores, 256 GiB.
pub(super) const HOST: Capacity = Capacity {
    cpus: 32.0,
    memory_mib: 256 * 1024,
};

pub(super) fn host_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("h{i:04}")).collect()
}

/// A small seeded generator (splitmix64): the demo is the same run after run.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

/// Cores in use per host, from the VMs' own (smoothed) loads, so a VM that just moved
/// counts where it is now.
fn summary(snap: &Snapshot) -> LoadSummary {
    let mut used: BTreeMap<&str, f64> = snap.hosts.keys().map(|h| (h.as_str(), 0.0)).collect();
    for v in snap.vms.values() {
        if let Some(h) = &v.observed_host {
            *used.entry(h.as_str()).or_default() += v.cpu_used;
        }
    }
    let mut u: Vec<f64> = used
        .iter()
        .map(|(h, c)| c / snap.hosts[*h].capacity.cpus)
        .collect();
    u.sort_by(f64::total_cmp);
    let n = u.len().max(1) as f64;
    let mean = u.iter().sum::<f64>() / n;
    let at = |q: f64| {
        u.get(((u.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    LoadSummary {
        min: at(0.0),
        p50: at(0.5),
        p90: at(0.9),
        max: at(1.0),
        stddev: (u.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt(),
        over_80: u.iter().filter(|x| **x > 0.8).count(),
        over_100: u.iter().filter(|x| **x > 1.0).count(),
        spread_score: tern_manager::decide::balance::plan(
            &Snapshot {
                settings: BalancerSettings {
                    aggressiveness: 1,
                    ..snap.settings.clone()
                },
                ..snap.clone()
            },
            0,
        )
        .score_before,
    }
}

/// `vms` VM requests for `hosts`, a fifth of which get half the VMs, with each VM's busy
/// fraction (0.2-0.9) beside it.
pub(super) fn uneven(hosts: &[String], vms: usize, rng: &mut Rng) -> (Vec<NewVm>, Vec<f64>) {
    let hot = (hosts.len() / 5).max(1);
    let mut loads = Vec::with_capacity(vms);
    let reqs = (0..vms)
        .map(|i| {
            let host = if rng.unit() < 0.5 {
                rng.next() as usize % hot
            } else {
                rng.next() as usize % hosts.len()
            };
            loads.push(0.2 + 0.7 * rng.unit());
            NewVm {
                name: format!("vm-{i:05}"),
                spec: VmSpec::sized(rng.pick(&[1, 2, 2, 4]), rng.pick(&[1024, 2048, 4096])),
                host: Some(hosts[host].clone()),
            }
        })
        .collect();
    (reqs, loads)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !a.sim {
        return lab::run(&a);
    }
    if a.hosts == 0 || a.vms == 0 {
        return Err(super::bad_input("--hosts and --vms must be at least 1"));
    }
    if !(1..=5).contains(&a.aggressiveness) {
        return Err(super::bad_input("--aggressiveness must be 1 to 5"));
    }
    let (db, temporary) = match &a.db {
        Some(p) => (p.clone(), false),
        None => (
            std::env::temp_dir().join(format!("tern-demo-{}.db", std::process::id())),
            true,
        ),
    };
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(demo(&a, &db));
    if temporary {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
        }
    }
    let report = result?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

/// The demo's balancer settings at `aggressiveness`.
pub(super) fn settings(aggressiveness: u8) -> BalancerSettings {
    BalancerSettings {
        aggressiveness,
        // Sim migrations take no real time, so the demo allows many at once.
        max_per_host: 16,
        max_per_cluster: 4000,
        cooldown_s: 3600,
        smoothing_window: 2,
        ..Default::default()
    }
}

/// The demo's cluster, up to its first round: `hosts` sim hosts, `vms` VMs created
/// unevenly and running with their loads measured, a manager over SQLite at `db`.
/// Returns the manager, its control loop and how many VMs run.
pub(super) async fn start(
    hosts: usize,
    vms: usize,
    aggressiveness: u8,
    seed: u64,
    db: &std::path::Path,
) -> anyhow::Result<(Arc<Manager>, Arc<Control>, usize)> {
    let store = SqliteStore::open(db)?;
    let manager =
        Arc::new(Manager::open(Box::new(store), system_clock())?.serving(HostAddresses::Sim));
    let sim = SimCluster::new();
    let mut rng = Rng(seed);
    let names = host_names(hosts);
    let mut cmds = Vec::new();
    for name in &names {
        sim.add_host(name);
        cmds.push(Command::RegisterHost {
            name: name.clone(),
            address: "sim:".into(),
            capacity: Capacity {
                cpus: 32.0,
                memory_mib: 256 * 1024,
            },
        });
    }
    cmds.push(Command::PutSettings(settings(aggressiveness)));
    for r in manager.execute_many(cmds)? {
        r?;
    }
    eprintln!("demo: {hosts} sim hosts registered; creating {vms} VMs unevenly");
    let (reqs, loads) = uneven(&names, vms, &mut rng);
    let mut refused = Vec::new();
    let results = manager.step(|s, _| decide::create_vms(s, reqs.clone()))?;
    for (r, req) in results.iter().zip(&reqs) {
        if r.is_err() {
            // A full host: let the manager place it.
            refused.push(NewVm {
                host: None,
                ..req.clone()
            });
        }
    }
    for r in manager.step(|s, _| decide::create_vms(s, refused))? {
        r?;
    }
    let control = Control::new(manager.clone(), sim.clone());
    control.settle().await?;
    let placed: Vec<(String, String)> = manager.read(|s| {
        s.vms
            .values()
            .filter_map(|v| Some((v.name.clone(), v.observed_host.clone()?)))
            .collect()
    });
    for ((vm, host), load) in placed.iter().zip(&loads) {
        sim.host(host)?.set_utilisation(vm, *load).await?;
    }
    eprintln!("demo: {} VMs running; measuring load", placed.len());
    tokio::time::sleep(Duration::from_millis(300)).await;
    control.collect_reports().await?;
    Ok((manager, control, placed.len()))
}

async fn demo(a: &Args, db: &std::path::Path) -> anyhow::Result<Report> {
    let started = Instant::now();
    let (manager, control, placed) = start(a.hosts, a.vms, a.aggressiveness, a.seed, db).await?;
    let before = summary(&manager.read(|s| s.clone()));
    let mut rounds = Vec::new();
    for round in 1..=a.rounds {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = control.round().await?;
        let ms = r.plan.planning_ms.unwrap_or(0.0);
        eprintln!(
            "demo: round {round}: {} migrations planned in {ms:.0} ms, spread score {:.4} -> {:.4}, skipped {:?}",
            r.plan.moves.len(),
            r.plan.score_before,
            r.plan.score_after,
            r.plan.skipped
        );
        rounds.push(RoundLine {
            round,
            planned: r.plan.moves.len(),
            decision_ms: ms,
            score_before: r.plan.score_before,
            score_after: r.plan.score_after,
            skipped: r.plan.skipped.clone(),
        });
        if r.plan.moves.is_empty() {
            break;
        }
    }
    let after = summary(&manager.read(|s| s.clone()));
    let mut migrations = manager.migrations(1_000_000)?;
    migrations.reverse();
    Ok(Report {
        hosts: a.hosts,
        vms: placed,
        before,
        after,
        rounds,
        migrations,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

fn print_report(r: &Report) {
    println!("{} hosts, {} VMs, sim driver\n", r.hosts, r.vms);
    println!("per-host CPU utilisation   min    p50    p90    max  stddev  >80%  >100%  spread");
    for (label, s) in [("before", &r.before), ("after", &r.after)] {
        println!(
            "  {label:<23} {:>5.0}% {:>5.0}% {:>5.0}% {:>5.0}% {:>6.3} {:>5} {:>6} {:>7.4}",
            s.min * 100.0,
            s.p50 * 100.0,
            s.p90 * 100.0,
            s.max * 100.0,
            s.stddev,
            s.over_80,
            s.over_100,
            s.spread_score
        );
    }
    println!("\nround  planned  decision  score before -> after");
    for l in &r.rounds {
        println!(
            "{:>5} {:>8} {:>7.0} ms  {:.4} -> {:.4}",
            l.round, l.planned, l.decision_ms, l.score_before, l.score_after
        );
    }
    let ok = r
        .migrations
        .iter()
        .filter(|m| matches!(m.result, MigrationResult::Succeeded { .. }))
        .count();
    println!("\n{} migrations ({ok} succeeded):", r.migrations.len());
    println!(
        "  {:<9} {:<6} {:<6} {:<9} {:>9} {:>9}",
        "vm", "from", "to", "policy", "total", "downtime"
    );
    const SHOWN: usize = 20;
    for m in r.migrations.iter().take(SHOWN) {
        let (total, down) = match &m.result {
            MigrationResult::Succeeded {
                total_ms,
                downtime_ms,
            } => (format!("{total_ms} ms"), format!("{downtime_ms} ms")),
            MigrationResult::Failed { error } => ("failed".into(), error.clone()),
            MigrationResult::Running => ("running".into(), String::new()),
        };
        println!(
            "  {:<9} {:<6} {:<6} {:<9} {:>9} {:>9}",
            m.vm, m.from, m.to, m.policy, total, down
        );
    }
    if r.migrations.len() > SHOWN {
        println!(
            "  ... and {} more (--json lists all)",
            r.migrations.len() - SHOWN
        );
    }
    println!("\nwall time {:.1} s", r.wall_s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(hosts: usize, vms: usize) -> Args {
        Args {
            sim: true,
            hosts,
            vms,
            rounds: 8,
            aggressiveness: 4,
            seed: 7,
            db: None,
            json: false,
        }
    }

    #[test]
    fn the_sim_demo_evens_out_an_uneven_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let r = rt
            .block_on(demo(&args(30, 600), &dir.path().join("demo.db")))
            .unwrap();
        assert_eq!(r.vms, 600);
        assert!(r.before.max > 1.5, "the start is uneven: {}", r.before.max);
        assert!(
            r.after.max < 1.0,
            "no host is overloaded after: {}",
            r.after.max
        );
        assert!(r.after.stddev < r.before.stddev / 4.0);
        assert!(!r.migrations.is_empty());
        assert!(r
            .migrations
            .iter()
            .all(|m| matches!(m.result, MigrationResult::Succeeded { .. })));
    }

    #[test]
    fn without_sim_or_with_zero_sizes_it_is_bad_input() {
        for a in [
            Args {
                sim: false,
                aggressiveness: 9,
                ..args(1, 1)
            },
            args(0, 10),
            args(10, 0),
        ] {
            let err = run(a).unwrap_err();
            assert_eq!(super::super::exit_code(&err), 2, "{err}");
        }
    }
}
