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
    let params = &*params.as_run_by(policy);
    let classes = split_at(
        params.classes(),
        params.probe_bytes / params.page_size.max(1),
    );
    let sizes: Vec<u64> = classes.iter().map(|c| c.pages).collect();
    let mut guest = AnalyticGuest {
        pending: sizes.iter().map(|&p| p as f64).collect(),
        round_writes: vec![0.0; sizes.len()],
        tracker: FragmentTracker::with_sizes(&sizes),
        sent_at: vec![0.0; sizes.len()],
        round_elapsed: 0.0,
        page_s: if params.sent_in_order {
            params.page_size as f64 / params.effective_bandwidth()
        } else {
            0.0
        },
        classes,
    };
    Ok(drive(params, policy, &mut guest))
}

/// `classes` with the one that holds page `at` (in memory order) cut in two there, so
/// that round 1 can be sent in two stretches, class by class. Each part keeps its
/// share of the writes: the distinct pages changed in the two add up to the whole's.
fn split_at(classes: Vec<DirtyClass>, at: u64) -> Vec<DirtyClass> {
    let mut out = Vec::with_capacity(classes.len() + 1);
    let mut start = 0;
    for c in classes {
        if at > start && at < start + c.pages {
            let head = at - start;
            let share = head as f64 / c.pages as f64;
            out.push(DirtyClass {
                pages: head,
                rate_pages: c.rate_pages * share,
                ..c
            });
            out.push(DirtyClass {
                pages: c.pages - head,
                rate_pages: c.rate_pages * (1.0 - share),
                ..c
            });
        } else {
            out.push(c);
        }
        start += c.pages;
    }
    out
}

struct AnalyticGuest {
    classes: Vec<DirtyClass>,
    /// Expected pages differing from the destination, per class.
    pending: Vec<f64>,
    /// Page writes per class so far in the current round.
    round_writes: Vec<f64>,
    tracker: FragmentTracker,
    /// Seconds into the round at which each class counts as sent: writes before it
    /// land on pages still to be sent and leave nothing behind. 0 for a class not sent.
    sent_at: Vec<f64>,
    /// Seconds of the current round the guest has run.
    round_elapsed: f64,
    /// Seconds to send one page when pages go out in memory order over the round (a
    /// class then counts as sent at the middle of its stretch); 0 when every page
    /// counts as sent at once.
    page_s: f64,
}

impl AnalyticGuest {
    /// Marks classes `range` as sent now, in order, except those in `hold_back`;
    /// returns the pages sent.
    fn send_classes(&mut self, range: std::ops::Range<usize>, hold_back: &[FragmentId]) -> f64 {
        let mut at = self.round_elapsed;
        let mut sent = 0.0;
        for i in range {
            if hold_back.contains(&(i as FragmentId)) {
                continue;
            }
            let p = std::mem::take(&mut self.pending[i]);
            let c = &self.classes[i];
            // A write lands on a page still to be sent only if it hits the class's
            // pending pages: a share `p / pages` of random writes; for a sequential
            // writer, only while all of it is pending (round 1): later, what is pending
            // is the stretch behind its cursor and it writes ahead, on sent pages.
            let w = c.pages as f64;
            let pending_hit = match (c.sequential, w > 0.0) {
                (_, false) => 0.0,
                (true, true) => f64::from(u8::from(p >= w)),
                (false, true) => p / w,
            };
            self.sent_at[i] = at + pending_hit * p * self.page_s / 2.0;
            at += p * self.page_s;
            sent += p;
        }
        sent
    }
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
        self.send_classes(0..self.pending.len(), hold_back)
    }

    /// Whole classes only: `simulate` cut the classes at the probe's page, so the
    /// prefix ends on a class boundary. The page returned is the next class's index.
    fn send_prefix(&mut self, pages: u64) -> Option<(f64, u64)> {
        let mut covered = 0;
        let mut next = 0;
        for c in &self.classes {
            if covered >= pages {
                break;
            }
            covered += c.pages;
            next += 1;
        }
        Some((self.send_classes(0..next, &[]), next as u64))
    }

    fn remaining_from(&self, first: u64) -> f64 {
        self.pending.iter().skip(first as usize).sum()
    }

    fn send_from(&mut self, first: u64) -> f64 {
        let first = (first as usize).min(self.pending.len());
        self.send_classes(first..self.pending.len(), &[])
    }

    fn run_part(&mut self, seconds: f64, rate_factor: f64) -> f64 {
        let mut first_changed = 0.0;
        let (start, end) = (self.round_elapsed, self.round_elapsed + seconds);
        self.round_elapsed = end;
        for (((c, pending), round_writes), &sent_at) in self
            .classes
            .iter()
            .zip(self.pending.iter_mut())
            .zip(self.round_writes.iter_mut())
            .zip(&self.sent_at)
        {
            let rate = c.rate_pages * rate_factor;
            let before = changed_by(c, *round_writes);
            *round_writes += rate * seconds;
            first_changed += changed_by(c, *round_writes) - before;
            // Only writes after the class went out leave pages to send again.
            let writes = rate * (end - start.max(sent_at)).max(0.0);
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
        self.sent_at.iter_mut().for_each(|t| *t = 0.0);
        self.round_elapsed = 0.0;
        changed.iter().sum()
    }

    fn tracker(&self) -> &FragmentTracker {
        &self.tracker
    }
}
