//! The page-level guest: a bitmap of pages that differ from the destination, random
//! writes from a seeded generator, and a real fragment tracker over fixed-size
//! fragments, fed exactly as the engine feeds it. Classes are laid out contiguously in
//! memory order (hot set first), as a program's buffers usually are.

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::driver::{drive, ModelGuest};
use super::{DirtyClass, MigrationParams};
use crate::fragment::{FragmentId, FragmentTracker};
use crate::policy::Policy;
use crate::telemetry::MigrationOutcome;
use crate::MigrateError;

/// Beyond this many writes per page of a class in one round, every page of the class
/// is taken as written: the chance that one escapes is below e^-20.
const SATURATION_WRITES_PER_PAGE: f64 = 20.0;

/// Runs the page-level model with the generator seeded by `seed`: the same seed gives
/// the same outcome. Costs one step per page write, so it is for tests and studies,
/// not for the simulator's inner loop.
pub fn simulate_pages(
    params: &MigrationParams,
    policy: &dyn Policy,
    seed: u64,
) -> Result<MigrationOutcome, MigrateError> {
    params.validate()?;
    let params = &*params.as_run_by(policy);
    let pages = params.nonzero_pages();
    let per_fragment = (params.fragment_bytes / params.page_size).max(1);
    let mut start = 0;
    let regions = params
        .classes()
        .into_iter()
        .map(|c| {
            let r = (start, c);
            start += c.pages;
            r
        })
        .collect::<Vec<_>>();
    let mut guest = PageGuest {
        cursors: vec![0; regions.len()],
        regions,
        pending: vec![true; pages as usize],
        pending_count: pages,
        tracker: FragmentTracker::new(pages, per_fragment),
        rng: SmallRng::seed_from_u64(seed),
        changed: Vec::new(),
        seen: vec![false; pages as usize],
    };
    Ok(drive(params, policy, &mut guest))
}

struct PageGuest {
    /// First page and class of each region of memory.
    regions: Vec<(u64, DirtyClass)>,
    /// Next page a sequential writer rewrites, per region (offset in the region).
    cursors: Vec<u64>,
    /// Whether each page differs from the destination's copy.
    pending: Vec<bool>,
    pending_count: u64,
    tracker: FragmentTracker,
    rng: SmallRng,
    /// Pages changed in the current round, each once (scratch, reused).
    changed: Vec<u64>,
    /// Membership of `changed` (scratch, all false between rounds).
    seen: Vec<bool>,
}

impl PageGuest {
    fn write(&mut self, page: u64) {
        let i = page as usize;
        if !self.seen[i] {
            self.seen[i] = true;
            self.changed.push(page);
        }
        if !self.pending[i] {
            self.pending[i] = true;
            self.pending_count += 1;
        }
    }
}

impl ModelGuest for PageGuest {
    fn remaining(&self) -> f64 {
        self.pending_count as f64
    }

    fn remaining_in(&self, fragments: &[FragmentId]) -> f64 {
        fragments
            .iter()
            .map(|&f| {
                let r = self.tracker.page_range(f);
                self.pending[r.start as usize..r.end as usize]
                    .iter()
                    .filter(|&&p| p)
                    .count() as f64
            })
            .sum()
    }

    fn send(&mut self, hold_back: &[FragmentId]) -> f64 {
        let mut held = vec![false; self.tracker.len()];
        for &f in hold_back {
            if let Some(h) = held.get_mut(f as usize) {
                *h = true;
            }
        }
        let mut sent = 0u64;
        for (f, &is_held) in held.iter().enumerate() {
            if is_held {
                continue;
            }
            let r = self.tracker.page_range(f as FragmentId);
            for p in &mut self.pending[r.start as usize..r.end as usize] {
                if *p {
                    *p = false;
                    sent += 1;
                }
            }
        }
        self.pending_count -= sent;
        sent as f64
    }

    fn send_prefix(&mut self, pages: u64) -> Option<(f64, u64)> {
        let mut sent = 0u64;
        let mut next = 0u64;
        for (i, p) in self.pending.iter_mut().enumerate() {
            if sent == pages {
                break;
            }
            next = i as u64 + 1;
            if *p {
                *p = false;
                sent += 1;
            }
        }
        self.pending_count -= sent;
        Some((sent as f64, next))
    }

    fn remaining_from(&self, first: u64) -> f64 {
        self.pending[first as usize..]
            .iter()
            .filter(|&&p| p)
            .count() as f64
    }

    fn send_from(&mut self, first: u64) -> f64 {
        let mut sent = 0u64;
        for p in &mut self.pending[first as usize..] {
            if *p {
                *p = false;
                sent += 1;
            }
        }
        self.pending_count -= sent;
        sent as f64
    }

    fn run_part(&mut self, seconds: f64, rate_factor: f64) -> f64 {
        let before = self.changed.len();
        for k in 0..self.regions.len() {
            let (start, class) = self.regions[k];
            if class.pages == 0 || class.rate_pages <= 0.0 {
                continue;
            }
            let expected = class.rate_pages * rate_factor * seconds;
            let saturated = if class.sequential {
                expected >= class.pages as f64
            } else {
                expected >= SATURATION_WRITES_PER_PAGE * class.pages as f64
            };
            if saturated {
                if class.sequential {
                    self.cursors[k] = (self.cursors[k] + expected as u64) % class.pages;
                }
                for page in start..start + class.pages {
                    self.write(page);
                }
                continue;
            }
            if !class.sequential && expected > class.pages as f64 {
                // More writes than pages: drawing each page's fate once (hit with
                // probability 1 - e^(-writes/pages)) costs a draw per page instead of
                // one per write, and has the same expected coverage.
                let hit = 1.0 - (-expected / class.pages as f64).exp();
                for page in start..start + class.pages {
                    if self.rng.gen::<f64>() < hit {
                        self.write(page);
                    }
                }
                continue;
            }
            // Round the expected count up or down at random so that small rates still
            // write their share on average.
            let whole = expected.floor();
            let writes = whole as u64 + u64::from(self.rng.gen::<f64>() < expected - whole);
            for _ in 0..writes {
                let offset = if class.sequential {
                    let c = self.cursors[k];
                    self.cursors[k] = (c + 1) % class.pages;
                    c
                } else {
                    self.rng.gen_range(0..class.pages)
                };
                self.write(start + offset);
            }
        }
        (self.changed.len() - before) as f64
    }

    fn end_round(&mut self) -> f64 {
        let changed = std::mem::take(&mut self.changed);
        for &p in &changed {
            self.seen[p as usize] = false;
        }
        self.tracker.observe_pages(changed.iter().copied());
        let n = changed.len() as f64;
        self.changed = changed;
        self.changed.clear();
        n
    }

    fn tracker(&self) -> &FragmentTracker {
        &self.tracker
    }
}
