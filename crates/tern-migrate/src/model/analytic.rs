//! The analytic guest: per class of memory, the expected number of pages that differ
//! from the destination, advanced in closed form.

use super::driver::{drive, ModelGuest};
use super::{DirtyClass, MigrationParams};
use crate::fragment::{FragmentId, FragmentTracker};
use crate::policy::Policy;
use crate::telemetry::MigrationOutcome;
use crate::MigrateError;

/// Runs the analytic model: one fragment per class of memory in the tracker, expected
/// values throughout. Deterministic and cheap (a few operations per class and round).
pub fn simulate(
    params: &MigrationParams,
    policy: &dyn Policy,
) -> Result<MigrationOutcome, MigrateError> {
    params.validate()?;
    let classes = params.classes();
    let sizes: Vec<u64> = classes.iter().map(|c| c.pages).collect();
    let mut guest = AnalyticGuest {
        pending: sizes.iter().map(|&p| p as f64).collect(),
        round_writes: vec![0.0; sizes.len()],
        tracker: FragmentTracker::with_sizes(&sizes),
        classes,
    };
    Ok(drive(params, policy, &mut guest))
}

struct AnalyticGuest {
    classes: Vec<DirtyClass>,
    /// Expected pages differing from the destination, per class.
    pending: Vec<f64>,
    /// Page writes per class so far in the current round.
    round_writes: Vec<f64>,
    tracker: FragmentTracker,
}

/// Distinct pages of class `c` that `writes` page writes change.
fn changed_by(c: &DirtyClass, writes: f64) -> f64 {
    let w = c.pages as f64;
    if c.sequential {
        writes.min(w)
    } else if w > 0.0 {
        // Share of the class left untouched by `writes` uniform writes.
        w * (1.0 - (-writes / w).exp())
    } else {
        0.0
    }
}

impl ModelGuest for AnalyticGuest {
    fn remaining(&self) -> f64 {
        self.pending.iter().sum()
    }

    fn remaining_in(&self, fragments: &[FragmentId]) -> f64 {
        fragments.iter().map(|&f| self.pending[f as usize]).sum()
    }

    fn send(&mut self, hold_back: &[FragmentId]) -> f64 {
        let mut sent = 0.0;
        for (i, p) in self.pending.iter_mut().enumerate() {
            if !hold_back.contains(&(i as FragmentId)) {
                sent += *p;
                *p = 0.0;
            }
        }
        sent
    }

    fn run_part(&mut self, seconds: f64, rate_factor: f64) -> f64 {
        let mut first_changed = 0.0;
        for ((c, pending), round_writes) in self
            .classes
            .iter()
            .zip(self.pending.iter_mut())
            .zip(self.round_writes.iter_mut())
        {
            let writes = c.rate_pages * rate_factor * seconds;
            let before = changed_by(c, *round_writes);
            *round_writes += writes;
            first_changed += changed_by(c, *round_writes) - before;
            let w = c.pages as f64;
            *pending = if c.sequential {
                // The pages still differing form the window behind the writer's cursor;
                // new writes extend that window.
                (*pending + writes).min(w)
            } else {
                // A page still differs unless it was clean and stayed untouched.
                let untouched = if w > 0.0 { (-writes / w).exp() } else { 1.0 };
                w - (w - *pending) * untouched
            };
        }
        first_changed
    }

    fn end_round(&mut self) -> f64 {
        let changed: Vec<f64> = self
            .classes
            .iter()
            .zip(&self.round_writes)
            .map(|(c, &w)| changed_by(c, w))
            .collect();
        let counts: Vec<u64> = changed.iter().map(|c| c.round() as u64).collect();
        self.tracker.observe_counts(&counts);
        self.round_writes.iter_mut().for_each(|w| *w = 0.0);
        changed.iter().sum()
    }

    fn tracker(&self) -> &FragmentTracker {
        &self.tracker
    }
}
