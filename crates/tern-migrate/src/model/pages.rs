//! The page-level guest: a bitmap of pages that differ from the destination, random
//! writes from a seeded generator, and a real fragment tracker over fixed-size
//! fragments, fed exactly as the engine feeds it. Classes are laid out contiguously in
//! memory order (the data in front of the working sets, then the hot set), as a
//! program's buffers usually are. With `sent_in_order` a round's pages go out one after
//! another over its sending time, and a write changes a page only for the destination
//! once the page has gone out; without, all at the round's start.

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
    let cursors = regions
        .iter()
        .map(|(_, c)| {
            if c.sequential {
                ((params.writer_start * c.pages as f64) as u64).min(c.pages.saturating_sub(1))
            } else {
                0
            }
        })
        .collect();
    // The measured layout of the sequential set, page by page (one set: the runs give
    // one writer's pages).
    let placed = regions
        .iter()
        .map(|&(start, c)| {
            if !c.sequential || params.working_set_extents.is_empty() {
                return None;
            }
            let mut map: Vec<u64> = (start..start + c.pages).collect();
            for e in &params.working_set_extents {
                for i in 0..e.pages {
                    if let Some(slot) = map.get_mut((e.offset + i) as usize) {
                        *slot = e.position + i;
                    }
                }
            }
            Some(map)
        })
        .collect();
    let mut guest = PageGuest {
        placed,
        cursors,
        page_s: if params.sent_in_order {
            params.page_size as f64 / params.effective_bandwidth()
        } else {
            0.0
        },
        round_elapsed: 0.0,
        sent_at: vec![0.0; pages as usize],
        streams: params.streams.max(1) as usize,
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
    /// Per region: where each of its pages lies in memory when measured, else it lies
    /// at the region's start plus its offset.
    placed: Vec<Option<Vec<u64>>>,
    /// Whether each page differs from the destination's copy.
    pending: Vec<bool>,
    pending_count: u64,
    tracker: FragmentTracker,
    rng: SmallRng,
    /// Pages changed in the current round, each once (scratch, reused).
    changed: Vec<u64>,
    /// Membership of `changed` (scratch, all false between rounds).
    seen: Vec<bool>,
    /// Seconds to send one page when a round's pages go out in memory order over its
    /// sending time; 0 when they all count as sent at its start.
    page_s: f64,
    /// Seconds of the current round the guest has run.
    round_elapsed: f64,
    /// Seconds into the current round at which each page goes out (0 for a page not
    /// sent in it): a write before that lands on a page still to be sent.
    sent_at: Vec<f64>,
    /// Streams a round is sent on, side by side.
    streams: usize,
}

impl PageGuest {
    /// A write to `page` at `at` seconds into the round.
    fn write(&mut self, page: u64, at: f64) {
        let i = page as usize;
        if !self.seen[i] {
            self.seen[i] = true;
            self.changed.push(page);
        }
        if !self.pending[i] && at >= self.sent_at[i] {
            self.pending[i] = true;
            self.pending_count += 1;
        }
    }

    /// `expected` writes of sequential region `k`, spread evenly over `seconds` from
    /// `start_s`. Past one lap only the last lap decides what differs (every page is
    /// written again in it), so earlier laps only move the cursor.
    fn run_sequential(&mut self, k: usize, expected: f64, start_s: f64, seconds: f64) {
        let (start, class) = self.regions[k];
        let whole = expected.floor();
        let writes = whole as u64 + u64::from(self.rng.gen::<f64>() < expected - whole);
        if writes == 0 {
            return;
        }
        let skip = writes.saturating_sub(class.pages);
        let step = seconds / writes as f64;
        self.cursors[k] = (self.cursors[k] + skip) % class.pages;
        for j in skip..writes {
            let c = self.cursors[k];
            self.cursors[k] = (c + 1) % class.pages;
            let page = match &self.placed[k] {
                Some(map) => map[c as usize],
                None => start + c,
            };
            self.write(page, start_s + (j as f64 + 0.5) * step);
        }
    }

    /// Sends `pages` (ascending) now, as the engine sends a round: cut into as many
    /// contiguous slices as it has streams, each slice in order on its own stream at
    /// that share of the link.
    fn send_pages(&mut self, pages: &[usize]) -> f64 {
        let per_slice = pages.len().div_ceil(self.streams).max(1);
        let page_s = self.page_s * self.streams as f64;
        for (n, &i) in pages.iter().enumerate() {
            self.pending[i] = false;
            self.sent_at[i] = self.round_elapsed + (n % per_slice) as f64 * page_s;
        }
        self.pending_count -= pages.len() as u64;
        pages.len() as f64
    }

    /// The pending pages in `range`, at most `limit`, and the page after the last one
    /// looked at.
    fn pending_in(&self, range: std::ops::Range<usize>, limit: usize) -> (Vec<usize>, usize) {
        let mut out = Vec::new();
        let mut next = range.start;
        for i in range {
            if out.len() == limit {
                break;
            }
            next = i + 1;
            if self.pending[i] {
                out.push(i);
            }
        }
        (out, next)
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
        let mut pages = Vec::new();
        for (f, &is_held) in held.iter().enumerate() {
            if !is_held {
                let r = self.tracker.page_range(f as FragmentId);
                pages.extend(
                    self.pending_in(r.start as usize..r.end as usize, usize::MAX)
                        .0,
                );
            }
        }
        self.send_pages(&pages)
    }

    fn send_prefix(&mut self, pages: u64) -> Option<(f64, u64)> {
        let limit = usize::try_from(pages).unwrap_or(usize::MAX);
        let (pages, next) = self.pending_in(0..self.pending.len(), limit);
        Some((self.send_pages(&pages), next as u64))
    }

    fn remaining_from(&self, first: u64) -> f64 {
        self.pending[first as usize..]
            .iter()
            .filter(|&&p| p)
            .count() as f64
    }

    fn send_from(&mut self, first: u64) -> f64 {
        let (pages, _) = self.pending_in(first as usize..self.pending.len(), usize::MAX);
        self.send_pages(&pages)
    }

    fn run_part(&mut self, seconds: f64, rate_factor: f64) -> f64 {
        let before = self.changed.len();
        let start_s = self.round_elapsed;
        for k in 0..self.regions.len() {
            let (start, class) = self.regions[k];
            if class.pages == 0 || class.rate_pages <= 0.0 {
                continue;
            }
            let expected = class.rate_pages * rate_factor * seconds;
            if class.sequential {
                self.run_sequential(k, expected, start_s, seconds);
                continue;
            }
            if expected > class.pages as f64 {
                // More writes than pages: drawing each page's fate once costs a draw per
                // page instead of one per write, with the same expected coverage. A page
                // is changed if any write hits it, and differs from the destination if
                // one hits it after it went out.
                let pages = class.pages as f64;
                let saturated = expected >= SATURATION_WRITES_PER_PAGE * pages;
                let hit = 1.0 - (-expected / pages).exp();
                for page in start..start + class.pages {
                    let after = (start_s + seconds - self.sent_at[page as usize].max(start_s))
                        .clamp(0.0, seconds);
                    let hit_after = if self.page_s == 0.0 {
                        hit
                    } else {
                        1.0 - (-expected * after / seconds / pages).exp()
                    };
                    let u = if saturated {
                        0.0
                    } else {
                        self.rng.gen::<f64>()
                    };
                    if u < hit_after {
                        self.write(page, start_s + seconds);
                    } else if u < hit {
                        self.write(page, start_s);
                    }
                }
                continue;
            }
            // Round the expected count up or down at random so that small rates still
            // write their share on average.
            let whole = expected.floor();
            let writes = whole as u64 + u64::from(self.rng.gen::<f64>() < expected - whole);
            for _ in 0..writes {
                let offset = self.rng.gen_range(0..class.pages);
                let at = if self.page_s == 0.0 {
                    start_s
                } else {
                    start_s + self.rng.gen::<f64>() * seconds
                };
                self.write(start + offset, at);
            }
        }
        self.round_elapsed += seconds;
        (self.changed.len() - before) as f64
    }

    fn end_round(&mut self) -> f64 {
        self.round_elapsed = 0.0;
        self.sent_at.iter_mut().for_each(|t| *t = 0.0);
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
