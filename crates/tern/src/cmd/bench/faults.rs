//! `tern bench faults`: the fault and attack suite against one lab built in a temporary
//! directory: one line per case as it finishes, a summary at the end (JSON with
//! `--json`), exit status 1 when any case failed or anything was lost, run twice or
//! leaked.

use anyhow::Context;
use std::sync::Arc;
use tern_faults::{CaseResult, Fixture, FixtureOptions, Summary};

use crate::cmd::bad_input;

#[derive(clap::Args)]
pub struct Args {
    /// Run only this case (repeatable); `--list` shows the names.
    #[arg(long = "case", value_name = "NAME")]
    cases: Vec<String>,
    /// List the cases with their group and what each checks, and run nothing.
    #[arg(long)]
    list: bool,
    /// Print the summary as JSON on stdout (the per-case lines go to stderr).
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let cases = tern_faults::select(tern_faults::all(), &args.cases).map_err(bad_input)?;
    if args.list {
        for c in &cases {
            println!("{:<48} {:<9} {}", c.name, c.group, c.about);
        }
        return Ok(());
    }
    tern_lab::require_root().map_err(bad_input)?;
    let dir = tempfile::tempdir()?;
    let opts = FixtureOptions {
        dir: dir.path().to_path_buf(),
        tern_binary: std::env::current_exe()?,
        image_dir: tern_hv::image::default_cache_dir(),
        progress: Arc::new(|s: &str| eprintln!("{s}")),
    };
    let json = args.json;
    let rt = tokio::runtime::Runtime::new()?;
    let summary = rt.block_on(async {
        let fixture = Fixture::start(opts)
            .await
            .context("building the suite's lab")?;
        let print = |r: &CaseResult| {
            let line = result_line(r);
            if json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        };
        let summary = tokio::select! {
            s = tern_faults::run(&fixture, &cases, print) => Some(s),
            _ = tokio::signal::ctrl_c() => None,
        };
        if summary.as_ref().is_none_or(|s| !s.goal_met()) {
            eprintln!("{}", fixture.logs(30));
        }
        fixture.stop().await;
        summary.ok_or_else(|| anyhow::anyhow!("interrupted; the lab is down again"))
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{}", summary_line(&summary));
    }
    if summary.goal_met() {
        Ok(())
    } else {
        anyhow::bail!("{}", summary_line(&summary))
    }
}

/// `PASS name  detail (12.3 s)` (pure).
fn result_line(r: &CaseResult) -> String {
    let verdict = if r.outcome.passed { "PASS" } else { "FAIL" };
    format!(
        "{verdict} {}  {} ({:.1} s)",
        r.name, r.outcome.detail, r.seconds
    )
}

/// The totals in one line (pure).
fn summary_line(s: &Summary) -> String {
    format!(
        "{} of {} cases passed in {:.0} s; {} VMs lost, {} running twice, secrets leaked in {} cases",
        s.passed, s.cases, s.seconds, s.vms_lost, s.vms_running_twice, s.secrets_leaked
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_faults::Outcome;

    #[test]
    fn lines_say_the_verdict_name_detail_and_time() {
        let r = CaseResult {
            name: "agent_killed".into(),
            group: "faults".into(),
            outcome: Outcome::fail("restarted after 9.1 s"),
            seconds: 12.34,
        };
        assert_eq!(
            result_line(&r),
            "FAIL agent_killed  restarted after 9.1 s (12.3 s)"
        );
        let s = Summary::of(vec![r], 12.34);
        assert_eq!(
            summary_line(&s),
            "0 of 1 cases passed in 12 s; 0 VMs lost, 0 running twice, secrets leaked in 0 cases"
        );
    }
}
