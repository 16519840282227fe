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
        tracker: FragmentTracker::with_sizes(&sizes),
        classes,
    };
    Ok(drive(params, policy, &mut guest))
}

struct AnalyticGuest {
    classes: Vec<DirtyClass>,
    /// Expected pages differing from the destination, per class.
    pending: Vec<f64>,
    tracker: FragmentTracker,
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

    fn run(&mut self, seconds: f64, rate_factor: f64) -> f64 {
        let mut counts = Vec::with_capacity(self.classes.len());
        let mut changed_total = 0.0;
        for (c, pending) in self.classes.iter().zip(self.pending.iter_mut()) {
            let w = c.pages as f64;
            let writes = c.rate_pages * rate_factor * seconds;
            let changed = if c.sequential {
                // The pages still differing form the window behind the writer's cursor;
                // new writes extend that window.
                *pending = (*pending + writes).min(w);
                writes.min(w)
            } else {
                // Share of the class left untouched by `writes` uniform writes.
                let untouched = if w > 0.0 { (-writes / w).exp() } else { 1.0 };
                // A page still differs unless it was clean and stayed untouched.
                *pending = w - (w - *pending) * untouched;
                w * (1.0 - untouched)
            };
            changed_total += changed;
            counts.push(changed.round() as u64);
        }
        self.tracker.observe_counts(&counts);
        changed_total
    }

    fn tracker(&self) -> &FragmentTracker {
        &self.tracker
    }
}
