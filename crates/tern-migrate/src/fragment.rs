//! Per-fragment history of re-dirtying, the memory a policy has to decide what to re-send.
//!
//! Guest memory is cut into fragments (2 MiB by default). After each round the engine
//! (or the page-level model) reports which pages changed while the round ran; the tracker
//! keeps, per fragment, how many pages changed last round, for how many consecutive
//! rounds it has changed, and the most pages it changed in one round of that streak
//! (a hot fragment seen through a short round looks sparse; its peak does not). It is a
//! plain value: no clock, no I/O, cheap to clone.
//!
//! The analytic model uses the same type with one "fragment" per class of memory (hot
//! set, cold set, untouched), built with [`FragmentTracker::with_sizes`], so the policy
//! code sees the same shape of input in the model and in the engine.

use serde::{Deserialize, Serialize};

/// Default fragment size: one huge page, large enough that the tracker stays small
/// (256 entries for 512 MiB) and small enough to separate a hot set from cold memory.
pub const DEFAULT_FRAGMENT_BYTES: u64 = 2 << 20;

/// Index of a fragment in a [`FragmentTracker`].
pub type FragmentId = u32;

/// Re-dirtying history of every fragment of one guest's memory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FragmentTracker {
    /// First page of each fragment, plus one past the last page at the end.
    starts: Vec<u64>,
    /// Pages per fragment when all but the last have the same size: lets
    /// [`Self::fragment_of`], called for every dirty page, divide instead of search.
    uniform: Option<u64>,
    /// Pages that changed in the last observed round, per fragment.
    changed: Vec<u64>,
    /// Consecutive observed rounds, ending with the last, in which the fragment changed.
    streak: Vec<u32>,
    /// Most pages changed in one round of the current streak.
    peak: Vec<u64>,
    /// Rounds observed so far.
    rounds: u32,
}

/// One fragment's state, as policies read it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FragmentStat {
    pub id: FragmentId,
    /// Pages in the fragment.
    pub pages: u64,
    /// Pages that changed in the last observed round.
    pub changed: u64,
    /// Consecutive rounds, ending with the last, in which the fragment changed.
    pub streak: u32,
    /// Most pages changed in one round of the current streak (0 without a streak).
    pub peak_changed: u64,
}

impl FragmentStat {
    /// Share of the fragment's pages that changed last round, in `[0, 1]`.
    pub fn density(&self) -> f64 {
        if self.pages == 0 {
            0.0
        } else {
            self.changed as f64 / self.pages as f64
        }
    }

    /// Share of the fragment's pages changed in the busiest round of its current streak.
    pub fn peak_density(&self) -> f64 {
        if self.pages == 0 {
            0.0
        } else {
            self.peak_changed as f64 / self.pages as f64
        }
    }
}

impl FragmentTracker {
    /// Tracker over `total_pages` pages cut into fragments of `pages_per_fragment` pages
    /// (the last one may be shorter). `pages_per_fragment` of 0 is treated as 1.
    pub fn new(total_pages: u64, pages_per_fragment: u64) -> Self {
        let per = pages_per_fragment.max(1);
        let count = total_pages.div_ceil(per);
        let mut starts: Vec<u64> = (0..count).map(|i| i * per).collect();
        starts.push(total_pages);
        FragmentTracker {
            uniform: Some(per),
            ..Self::from_starts(starts)
        }
    }

    /// Tracker whose fragments have the given sizes in pages, in order.
    pub fn with_sizes(sizes: &[u64]) -> Self {
        let mut starts = Vec::with_capacity(sizes.len() + 1);
        let mut at = 0u64;
        for &s in sizes {
            starts.push(at);
            at += s;
        }
        starts.push(at);
        Self::from_starts(starts)
    }

    fn from_starts(starts: Vec<u64>) -> Self {
        let n = starts.len() - 1;
        FragmentTracker {
            starts,
            uniform: None,
            changed: vec![0; n],
            streak: vec![0; n],
            peak: vec![0; n],
            rounds: 0,
        }
    }

    /// Number of fragments.
    pub fn len(&self) -> usize {
        self.changed.len()
    }

    /// Whether the tracker covers no memory at all.
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty()
    }

    /// Pages covered by all fragments.
    pub fn total_pages(&self) -> u64 {
        *self.starts.last().unwrap_or(&0)
    }

    /// Rounds observed so far.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// The fragment holding `page`, or `None` past the end of memory.
    pub fn fragment_of(&self, page: u64) -> Option<FragmentId> {
        if page >= self.total_pages() {
            return None;
        }
        if let Some(per) = self.uniform {
            return Some((page / per) as FragmentId);
        }
        // starts is sorted; the fragment is the last start <= page.
        let i = self.starts.partition_point(|&s| s <= page) - 1;
        Some(i as FragmentId)
    }

    /// Pages `[start, end)` of fragment `id`.
    pub fn page_range(&self, id: FragmentId) -> std::ops::Range<u64> {
        let i = id as usize;
        self.starts[i]..self.starts[i + 1]
    }

    /// State of fragment `id`.
    pub fn stat(&self, id: FragmentId) -> FragmentStat {
        let i = id as usize;
        FragmentStat {
            id,
            pages: self.starts[i + 1] - self.starts[i],
            changed: self.changed[i],
            streak: self.streak[i],
            peak_changed: self.peak[i],
        }
    }

    /// Every fragment's state, in order.
    pub fn stats(&self) -> impl Iterator<Item = FragmentStat> + '_ {
        (0..self.len() as FragmentId).map(|id| self.stat(id))
    }

    /// Page writes the guest most likely made in the last observed round, inferred from
    /// the distinct pages changed per fragment: `n` random writes over `P` pages leave
    /// `P·(1 − e^(−n/P))` of them changed, so `n = −P·ln(1 − changed/P)`. A fully
    /// changed fragment is taken as `P − ½` changed, so the estimate is a lower bound
    /// for saturated fragments but far closer than the distinct count, which caps at
    /// the fragment's size however fast the guest writes.
    pub fn estimated_writes(&self) -> f64 {
        self.stats()
            .filter(|f| f.changed > 0)
            .map(|f| {
                let p = f.pages as f64;
                let changed = (f.changed as f64).min(p - 0.5);
                -p * (1.0 - changed / p).ln()
            })
            .sum()
    }

    /// Records one round from the numbers of the pages that changed while it ran.
    /// Pages past the end of memory are ignored; a page listed twice counts once only
    /// if the caller deduplicates (the engine's scan yields each page once).
    pub fn observe_pages(&mut self, changed_pages: impl IntoIterator<Item = u64>) {
        let mut counts = vec![0u64; self.len()];
        for page in changed_pages {
            if let Some(f) = self.fragment_of(page) {
                counts[f as usize] += 1;
            }
        }
        self.observe_counts(&counts);
    }

    /// Records one round from per-fragment counts of changed pages. Missing trailing
    /// entries count as 0; counts larger than a fragment are clamped to its size.
    pub fn observe_counts(&mut self, counts: &[u64]) {
        for i in 0..self.len() {
            let pages = self.starts[i + 1] - self.starts[i];
            let c = counts.get(i).copied().unwrap_or(0).min(pages);
            self.changed[i] = c;
            if c > 0 {
                self.streak[i] += 1;
                self.peak[i] = self.peak[i].max(c);
            } else {
                self.streak[i] = 0;
                self.peak[i] = 0;
            }
        }
        self.rounds += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_memory_into_fragments_with_a_short_tail() {
        let t = FragmentTracker::new(1000, 512);
        assert_eq!(t.len(), 2);
        assert_eq!(t.page_range(0), 0..512);
        assert_eq!(t.page_range(1), 512..1000);
        assert_eq!(t.fragment_of(511), Some(0));
        assert_eq!(t.fragment_of(512), Some(1));
        assert_eq!(t.fragment_of(999), Some(1));
        assert_eq!(t.fragment_of(1000), None);
    }

    #[test]
    fn streak_counts_consecutive_rounds_and_resets() {
        let mut t = FragmentTracker::new(8, 4);
        t.observe_pages([0, 1, 5]);
        t.observe_pages([2]);
        assert_eq!(t.stat(0).streak, 2);
        assert_eq!(t.stat(0).changed, 1);
        assert_eq!(t.stat(0).peak_changed, 2);
        assert_eq!(t.stat(0).peak_density(), 0.5);
        assert_eq!(t.stat(1).streak, 0);
        t.observe_pages([6]);
        assert_eq!(t.stat(0).streak, 0);
        assert_eq!(t.stat(0).peak_changed, 0);
        assert_eq!(t.stat(1).streak, 1);
        assert_eq!(t.rounds(), 3);
    }

    #[test]
    fn estimated_writes_invert_the_distinct_page_curve() {
        let mut t = FragmentTracker::new(2000, 1000);
        // 1000 writes over 1000 pages leave 1 - 1/e of them changed.
        let changed = (1000.0 * (1.0 - (-1.0f64).exp())).round() as u64;
        t.observe_counts(&[changed, 0]);
        assert!((t.estimated_writes() - 1000.0).abs() < 2.0);
        // A saturated fragment still counts for several times its size.
        t.observe_counts(&[1000, 1]);
        assert!(t.estimated_writes() > 7000.0);
    }

    #[test]
    fn sized_fragments_locate_pages_and_clamp_counts() {
        let mut t = FragmentTracker::with_sizes(&[10, 0, 30]);
        assert_eq!(t.fragment_of(9), Some(0));
        assert_eq!(t.fragment_of(10), Some(2));
        t.observe_counts(&[99, 0, 15]);
        assert_eq!(t.stat(0).changed, 10);
        assert!((t.stat(2).density() - 0.5).abs() < 1e-12);
        assert_eq!(t.stat(1).density(), 0.0);
    }
}
