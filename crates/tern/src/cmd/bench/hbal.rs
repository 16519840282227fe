//! `tern bench hbal`: generates seeded, unbalanced shared-storage clusters, runs
//! Ganeti's `hbal -t FILE -C` (with a time limit) and `tern plan --save` on each,
//! scores tern's saved cluster with Ganeti's own `hinfo`, and prints both side by
//! side with the ratios.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;

use crate::cmd::bad_input;

const GANETI_BIN: &str = "/usr/lib/ganeti/3.0/usr/bin";

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Cases as NODESxINSTANCES, comma-separated.
    #[arg(long, default_value = "20x300,50x1000,100x2000,200x5000,1000x20000")]
    pub cases: String,
    /// Seed of the cluster generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Longest one hbal run may take, seconds.
    #[arg(long, default_value_t = 600)]
    pub hbal_timeout: u64,
    /// Total seconds all hbal runs together may take; later cases get what is left.
    #[arg(long, default_value_t = 600)]
    pub budget: u64,
    /// Directory holding Ganeti's `hbal` and `hinfo`.
    #[arg(long, default_value = GANETI_BIN)]
    pub ganeti_bin: PathBuf,
    /// Keep the generated and balanced clusters and hbal's output here.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Extra flags for `tern plan` (e.g. "--exhaustive"), space-separated.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub plan_flags: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// What one tool achieved on one case.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    pub initial_score: Option<f64>,
    /// Final score as `hinfo` (tern) or `hbal` itself reports it; on a timeout,
    /// the score after the last move hbal printed.
    pub final_score: Option<f64>,
    pub moves: usize,
    pub wall_seconds: f64,
    pub timed_out: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct CaseResult {
    pub case: String,
    pub nodes: usize,
    pub instances: usize,
    pub hbal: Outcome,
    pub tern: Outcome,
    /// tern's final score / hbal's (≤ 1.01 is the goal).
    pub score_ratio: Option<f64>,
    /// hbal's wall time / tern's; a lower bound when hbal timed out.
    pub speedup: f64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cases = parse_cases(&args.cases)?;
    let hbal = args.ganeti_bin.join("hbal");
    let hinfo = args.ganeti_bin.join("hinfo");
    for tool in [&hbal, &hinfo] {
        if !tool.exists() {
            return Err(bad_input(format!(
                "{} not found: install ganeti-htools-3.0 or pass --ganeti-bin DIR",
                tool.display()
            )));
        }
    }
    let (dir, keep) = match &args.dir {
        Some(d) => (d.clone(), true),
        None => (
            std::env::temp_dir().join(format!("tern-bench-hbal-{}", std::process::id())),
            false,
        ),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut budget = Duration::from_secs(args.budget);
    let mut results = Vec::new();
    for (i, &(nodes, instances)) in cases.iter().enumerate() {
        let name = format!("{nodes}x{instances}");
        eprintln!("[{}/{}] {name}: generating", i + 1, cases.len());
        let cluster = tern_balance::synth::unbalanced(nodes, instances, args.seed);
        let file = dir.join(format!("{name}.data"));
        std::fs::write(&file, tern_model::ganeti::serialize(&cluster))
            .with_context(|| format!("writing {}", file.display()))?;
        eprintln!("[{}/{}] {name}: tern plan", i + 1, cases.len());
        let tern = run_tern(&file, &dir.join(format!("{name}.tern.data")), &hinfo, &args)?;
        let limit = budget.min(Duration::from_secs(args.hbal_timeout));
        eprintln!(
            "[{}/{}] {name}: hbal (time limit {} s)",
            i + 1,
            cases.len(),
            limit.as_secs()
        );
        let hbal_out = run_hbal(&hbal, &file, &dir.join(format!("{name}.hbal.out")), limit)?;
        budget = budget.saturating_sub(Duration::from_secs_f64(hbal_out.wall_seconds));
        let score_ratio = match (tern.final_score, hbal_out.final_score) {
            (Some(t), Some(h)) if !hbal_out.timed_out && h > 0.0 => Some(t / h),
            _ => None,
        };
        let speedup = hbal_out.wall_seconds / tern.wall_seconds.max(1e-6);
        let r = CaseResult {
            case: name,
            nodes,
            instances,
            hbal: hbal_out,
            tern,
            score_ratio,
            speedup,
        };
        eprintln!("{}", row(&r));
        results.push(r);
    }
    if !keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&serde_json::json!({ "seed": args.seed, "cases": results }))?
        );
    } else {
        print_table(&results);
    }
    Ok(())
}

fn parse_cases(text: &str) -> anyhow::Result<Vec<(usize, usize)>> {
    text.split(',')
        .map(|c| {
            let bad = || {
                bad_input(format!(
                    "--cases: {c:?} is not NODESxINSTANCES (e.g. 20x300) with both at least 1 \
                     and at most 40 instances per node"
                ))
            };
            let (n, i) = c.trim().split_once('x').ok_or_else(bad)?;
            let n: usize = n.parse().map_err(|_| bad())?;
            let i: usize = i.parse().map_err(|_| bad())?;
            if n < 2 || i == 0 || i > 40 * n {
                return Err(bad());
            }
            Ok((n, i))
        })
        .collect()
}

#[derive(serde::Deserialize)]
struct PlanJson {
    initial_score: f64,
    moves: Vec<serde_json::Value>,
}

fn run_tern(file: &Path, out: &Path, hinfo: &Path, args: &Args) -> anyhow::Result<Outcome> {
    let exe = std::env::current_exe().context("finding the tern executable")?;
    let started = Instant::now();
    let output = Command::new(exe)
        .arg("plan")
        .arg("--ganeti")
        .arg(file)
        .arg("--save")
        .arg(out)
        .arg("--json")
        .args(args.plan_flags.split_whitespace())
        .stderr(Stdio::inherit())
        .output()
        .context("running tern plan")?;
    let wall = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!("tern plan failed on {} ({})", file.display(), output.status);
    }
    let plan: PlanJson =
        serde_json::from_slice(&output.stdout).context("reading tern plan's JSON")?;
    Ok(Outcome {
        initial_score: Some(plan.initial_score),
        final_score: Some(hinfo_score(hinfo, out)?),
        moves: plan.moves.len(),
        wall_seconds: wall,
        timed_out: false,
    })
}

/// Ganeti's own score of a saved cluster.
fn hinfo_score(hinfo: &Path, file: &Path) -> anyhow::Result<f64> {
    let out = Command::new(hinfo)
        .arg("-t")
        .arg(file)
        .output()
        .context("running hinfo")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Cluster score:"))
        .and_then(|s| s.trim().parse().ok())
        .with_context(|| format!("hinfo printed no cluster score for {}", file.display()))
}

fn run_hbal(hbal: &Path, file: &Path, log: &Path, limit: Duration) -> anyhow::Result<Outcome> {
    let sink = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let started = Instant::now();
    let mut child = Command::new(hbal)
        .arg("-t")
        .arg(file)
        .arg("-C")
        .stdout(sink)
        .stderr(Stdio::null())
        .spawn()
        .context("starting hbal")?;
    let mut timed_out = false;
    let mut last_report = Instant::now();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if started.elapsed() >= limit {
            child.kill().ok();
            child.wait().ok();
            timed_out = true;
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            let done = parse_hbal(&std::fs::read_to_string(log).unwrap_or_default());
            eprint!(
                "\r  hbal: {:.0} s, {} moves so far",
                started.elapsed().as_secs_f64(),
                done.moves
            );
            let _ = std::io::stderr().flush();
            last_report = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if started.elapsed() >= Duration::from_secs(30) {
        eprintln!();
    }
    let wall = started.elapsed().as_secs_f64();
    let mut out = parse_hbal(&std::fs::read_to_string(log).unwrap_or_default());
    out.wall_seconds = wall;
    out.timed_out = timed_out;
    Ok(out)
}

/// Reads hbal's `-C` output: the initial score, one numbered line per move
/// ending in the score after it, and the final score.
fn parse_hbal(text: &str) -> Outcome {
    let mut o = Outcome::default();
    for line in text.lines() {
        let t = line.trim();
        if let Some(s) = t.strip_prefix("Initial score:") {
            o.initial_score = s.trim().parse().ok();
            o.final_score = o.initial_score;
        } else if let Some((num, rest)) = t.split_once(". ") {
            if num.parse::<usize>().is_ok() {
                if let Some(score) = rest
                    .split_whitespace()
                    .find_map(|w| w.parse::<f64>().ok().filter(|_| w.contains('.')))
                {
                    o.moves += 1;
                    o.final_score = Some(score);
                }
            }
        } else if let Some(rest) = t.strip_prefix("Cluster score improved from") {
            o.final_score = rest.rsplit(' ').next().and_then(|s| s.parse().ok());
        }
    }
    o
}

fn fmt_score(s: Option<f64>) -> String {
    s.map_or("-".into(), |v| format!("{v:.6}"))
}

fn row(r: &CaseResult) -> String {
    let hbal_time = if r.hbal.timed_out && r.hbal.wall_seconds < 1.0 {
        "not run".to_string()
    } else if r.hbal.timed_out {
        format!("timeout {:.0}s", r.hbal.wall_seconds)
    } else {
        format!("{:.2}s", r.hbal.wall_seconds)
    };
    let ratio = r.score_ratio.map_or("-".into(), |x| format!("{x:.4}"));
    let speed = if r.hbal.timed_out {
        format!(">={:.0}x", r.speedup)
    } else {
        format!("{:.0}x", r.speedup)
    };
    format!(
        "{:>11} | {:>12} {:>6} {:>14} | {:>12} {:>6} {:>8.2}s | {:>7} {:>8}",
        r.case,
        fmt_score(r.hbal.final_score),
        r.hbal.moves,
        hbal_time,
        fmt_score(r.tern.final_score),
        r.tern.moves,
        r.tern.wall_seconds,
        ratio,
        speed
    )
}

fn print_table(results: &[CaseResult]) {
    println!(
        "{:>11} | {:>12} {:>6} {:>14} | {:>12} {:>6} {:>9} | {:>7} {:>8}",
        "case",
        "hbal score",
        "moves",
        "hbal time",
        "tern score",
        "moves",
        "tern time",
        "ratio",
        "speedup"
    );
    for r in results {
        println!("{}", row(r));
    }
    println!(
        "initial scores: {}",
        results
            .iter()
            .map(|r| format!("{} {}", r.case, fmt_score(r.tern.initial_score)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("scores: hbal's own final score; tern's as hinfo scores tern's saved cluster.");
    println!("hbal on a timeout: moves and score it had printed when stopped.");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hbal_output() {
        let text = "Initial score: 47.10845735\nTrying to minimize the CV...\n    \
            1. inst-00290 node-0019           => node-0011            46.54391462 a=fa:node-0011\n    \
            2. inst-00001 node-0009           => node-0008            45.99257464 a=fa:node-0008\n\
            Cluster score improved from 47.10845735 to 45.99257464\nSolution length=2\n";
        let o = parse_hbal(text);
        assert_eq!(o.moves, 2);
        assert_eq!(o.initial_score, Some(47.10845735));
        assert_eq!(o.final_score, Some(45.99257464));
        let partial = parse_hbal(&text[..text.find("    2.").unwrap()]);
        assert_eq!((partial.moves, partial.final_score), (1, Some(46.54391462)));
    }

    #[test]
    fn rejects_bad_cases() {
        assert_eq!(
            parse_cases("20x300, 50x1000").unwrap(),
            vec![(20, 300), (50, 1000)]
        );
        for bad in ["20", "x300", "20x", "1x5", "10x1000", "ax3"] {
            assert!(parse_cases(bad).is_err(), "{bad}");
        }
    }
}
