//! The fault and attack suite: every probe of a hole issue 8 closed and every fault
//! case (agents killed, the manager killed mid-migration, a full disk, links cut and
//! destinations killed mid-move, fencing) run against one real lab, each judged by
//! what the lab shows: QEMU processes sampled from `/proc`, the manager's view, the
//! guests' own memory checksums.
//!
//! `tern bench faults` and the `faults` integration test of the `tern` crate run it.
//!
//! # Layout
//! - [`case`]: [`Case`] and its [`Outcome`].
//! - [`fixture`]: the lab, the manager process, the QEMU sampler, fault injection.
//! - [`probes`]: the probes of the holes (identity, streams, limits, input).
//! - [`faults`]: the fault cases (faults, fencing).
//! - this file: [`all`], [`run`] and its [`Summary`].
//! - [`error`]: [`FaultError`], when the suite itself could not run a case.

pub mod case;
pub mod error;
pub mod faults;
pub mod fixture;
pub mod probes;

pub use case::{Case, CaseFuture, Outcome};
pub use error::FaultError;
pub use fixture::{Fixture, FixtureOptions, SharedGuest};

use std::time::{Duration, Instant};

/// Every case: the probes, then the fault cases.
pub fn all() -> Vec<Case> {
    let mut cases = probes::cases();
    cases.extend(faults::cases());
    cases
}

/// One case's result as the runner judged it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CaseResult {
    pub name: String,
    pub group: String,
    /// The case's outcome, with `vms_lost` and `vms_running_twice` measured by the
    /// fixture, not claimed by the case.
    #[serde(flatten)]
    pub outcome: Outcome,
    pub seconds: f64,
}

/// The suite's result.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    pub cases: u32,
    pub passed: u32,
    pub vms_lost: u32,
    pub vms_running_twice: u32,
    /// Cases in which a secret reached a party that should not have it.
    pub secrets_leaked: u32,
    pub seconds: f64,
    pub results: Vec<CaseResult>,
}

impl Summary {
    /// Every case passed and nothing was lost, run twice or leaked.
    pub fn goal_met(&self) -> bool {
        self.passed == self.cases
            && self.vms_lost == 0
            && self.vms_running_twice == 0
            && self.secrets_leaked == 0
    }

    /// Totals over `results` (pure).
    pub fn of(results: Vec<CaseResult>, seconds: f64) -> Summary {
        Summary {
            cases: results.len() as u32,
            passed: results.iter().filter(|r| r.outcome.passed).count() as u32,
            vms_lost: results.iter().map(|r| r.outcome.vms_lost).sum(),
            vms_running_twice: results.iter().map(|r| r.outcome.vms_running_twice).sum(),
            secrets_leaked: results.iter().filter(|r| r.outcome.secrets_leaked).count() as u32,
            seconds,
            results,
        }
    }
}

/// How long a case's VMs get, after it ends, to show up where they should run.
const SETTLE: Duration = Duration::from_secs(5);

/// Runs `cases` one after the other against `fixture`, resetting the lab after each,
/// and calls `on_result` as each finishes. A case that could not run, or after which the
/// lab could not be reset, fails with the reason.
pub async fn run(
    fixture: &Fixture,
    cases: &[Case],
    mut on_result: impl FnMut(&CaseResult),
) -> Summary {
    let t0 = Instant::now();
    let mut results = Vec::with_capacity(cases.len());
    for case in cases {
        let r = run_one(fixture, case).await;
        on_result(&r);
        results.push(r);
    }
    Summary::of(results, t0.elapsed().as_secs_f64())
}

async fn run_one(fixture: &Fixture, case: &Case) -> CaseResult {
    let t0 = Instant::now();
    let mark = fixture.twice_mark();
    let mut outcome = match (case.run)(fixture).await {
        Ok(o) => o,
        // What the case waited for did not happen: the fault's effect is missing.
        Err(e @ FaultError::Timeout { .. }) => Outcome::fail(e.to_string()),
        Err(e) => Outcome::fail(format!("could not run: {e}")),
    };
    match fixture.vms_lost(SETTLE).await {
        Ok(lost) => {
            outcome.vms_lost = lost.len() as u32;
            if !lost.is_empty() {
                outcome.passed = false;
                outcome.detail.push_str(&format!("; lost: {lost:?}"));
            }
        }
        Err(e) => {
            outcome.passed = false;
            outcome
                .detail
                .push_str(&format!("; lost VMs not counted: {e}"));
        }
    }
    let twice = fixture.running_twice_since(mark);
    outcome.vms_running_twice = twice.len() as u32;
    if !twice.is_empty() {
        outcome.passed = false;
        outcome
            .detail
            .push_str(&format!("; ran on two hosts: {twice:?}"));
    }
    if outcome.secrets_leaked {
        outcome.passed = false;
    }
    if let Err(e) = fixture.reset().await {
        outcome.passed = false;
        outcome
            .detail
            .push_str(&format!("; the lab could not be reset: {e}"));
    }
    CaseResult {
        name: case.name.to_string(),
        group: case.group.to_string(),
        outcome,
        seconds: t0.elapsed().as_secs_f64(),
    }
}

/// The cases named in `names` (all when empty); an unknown name is an error that lists
/// the known ones.
pub fn select(cases: Vec<Case>, names: &[String]) -> Result<Vec<Case>, String> {
    if names.is_empty() {
        return Ok(cases);
    }
    let mut out = Vec::new();
    for n in names {
        match cases.iter().find(|c| c.name == n) {
            Some(c) => out.push(*c),
            None => {
                let known: Vec<&str> = cases.iter().map(|c| c.name).collect();
                return Err(format!(
                    "no case named {n:?}; the cases are: {}",
                    known.join(", ")
                ));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, passed: bool, lost: u32, twice: u32, leaked: bool) -> CaseResult {
        CaseResult {
            name: name.into(),
            group: "faults".into(),
            outcome: Outcome {
                passed,
                detail: String::new(),
                vms_lost: lost,
                vms_running_twice: twice,
                secrets_leaked: leaked,
            },
            seconds: 1.0,
        }
    }

    #[test]
    fn totals_count_cases_and_sum_counters() {
        let s = Summary::of(
            vec![
                result("a", true, 0, 0, false),
                result("b", false, 2, 1, true),
                result("c", false, 0, 0, true),
            ],
            3.0,
        );
        assert_eq!((s.cases, s.passed), (3, 1));
        assert_eq!(
            (s.vms_lost, s.vms_running_twice, s.secrets_leaked),
            (2, 1, 2)
        );
        assert!(!s.goal_met());
        assert!(Summary::of(vec![result("a", true, 0, 0, false)], 1.0).goal_met());
    }

    #[test]
    fn summary_json_has_the_documented_fields() {
        let s = Summary::of(vec![result("a", true, 0, 0, false)], 1.0);
        let v = serde_json::to_value(&s).unwrap();
        for k in [
            "cases",
            "passed",
            "vms_lost",
            "vms_running_twice",
            "secrets_leaked",
            "results",
        ] {
            assert!(v.get(k).is_some(), "{k} in {v}");
        }
        assert_eq!(v["results"][0]["name"], "a");
        assert_eq!(v["results"][0]["passed"], true);
    }
}
