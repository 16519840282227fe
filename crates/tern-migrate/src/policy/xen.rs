//! Xen's pre-copy termination (as in `xc_domain_save`): stop after a fixed number of
//! rounds, once several times the guest's memory has been sent, or when only a handful
//! of dirty pages is left. It never looks at the downtime budget.

use super::{Decision, Policy, PolicyInput, StopReason};

/// Xen's three caps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Xen {
    /// Rounds before a forced stop (Xen: 30).
    pub max_rounds: u32,
    /// Multiple of guest memory sent before a forced stop (Xen: 3).
    pub max_volume_factor: f64,
    /// Stop once fewer dirty pages than this remain (Xen: 50).
    pub min_dirty_pages: u64,
}

impl Default for Xen {
    fn default() -> Self {
        Xen {
            max_rounds: 30,
            max_volume_factor: 3.0,
            min_dirty_pages: 50,
        }
    }
}

impl Policy for Xen {
    fn name(&self) -> &'static str {
        "xen"
    }

    fn decide(&self, input: &PolicyInput<'_>) -> Decision {
        let Some(last) = input.last() else {
            return Decision::Continue { hold_back: vec![] };
        };
        let stop = |reason| Decision::StopAndCopy { reason };
        if last.remaining_pages == 0 {
            return stop(StopReason::NothingDirty);
        }
        if last.remaining_pages < self.min_dirty_pages {
            return stop(StopReason::FewDirtyPages);
        }
        if last.round >= self.max_rounds {
            return stop(StopReason::RoundCap);
        }
        let cap = self.max_volume_factor * input.limits.memory_pages as f64;
        if input.pages_sent_total() as f64 >= cap {
            return stop(StopReason::VolumeCap);
        }
        Decision::Continue { hold_back: vec![] }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::round;
    use super::super::Limits;
    use super::*;
    use crate::fragment::FragmentTracker;
    use crate::RoundTelemetry;

    fn decide(history: &[RoundTelemetry], memory_pages: u64) -> Decision {
        let limits = Limits::new(memory_pages, 4096);
        let tracker = FragmentTracker::new(memory_pages, 512);
        Xen::default().decide(&PolicyInput {
            history,
            fragments: &tracker,
            limits: &limits,
        })
    }

    fn stop(reason: StopReason) -> Decision {
        Decision::StopAndCopy { reason }
    }

    #[test]
    fn stops_at_thirty_rounds() {
        // Each test round sends 1000 pages; a huge guest keeps the volume cap away.
        let h: Vec<_> = (1..=29).map(|r| round(r, 5000, 1.0)).collect();
        assert_eq!(
            decide(&h, 1 << 30),
            Decision::Continue { hold_back: vec![] }
        );
        let h: Vec<_> = (1..=30).map(|r| round(r, 5000, 1.0)).collect();
        assert_eq!(decide(&h, 1 << 30), stop(StopReason::RoundCap));
    }

    #[test]
    fn stops_after_three_times_memory() {
        // 1000 pages a round against a 1000-page guest: the third round reaches 3x.
        let h: Vec<_> = (1..=2).map(|r| round(r, 5000, 1.0)).collect();
        assert_eq!(decide(&h, 1000), Decision::Continue { hold_back: vec![] });
        let h: Vec<_> = (1..=3).map(|r| round(r, 5000, 1.0)).collect();
        assert_eq!(decide(&h, 1000), stop(StopReason::VolumeCap));
    }

    #[test]
    fn stops_below_fifty_dirty_pages() {
        assert_eq!(
            decide(&[round(1, 50, 1.0)], 1 << 20),
            Decision::Continue { hold_back: vec![] }
        );
        assert_eq!(
            decide(&[round(1, 49, 1.0)], 1 << 20),
            stop(StopReason::FewDirtyPages)
        );
        assert!(StopReason::FewDirtyPages.converged());
        assert!(!StopReason::RoundCap.converged());
    }
}
