//! Guest↔host clock alignment from timestamp exchanges (pure).
//!
//! The host sends at `t1` (host clock), the guest stamps receipt `t2` and reply `t3`
//! (guest clock), the host receives at `t4`. Whatever the channel's delays, the guest's
//! clock read somewhere inside `[t1, t4]` of host time, so the offset estimated from the
//! midpoint is wrong by at most half the round trip spent outside the guest. Of several
//! exchanges the one with the smallest round trip gives the tightest bound.

use serde::{Deserialize, Serialize};
pub use tern_api::trace::ClockAlignment as Alignment;

/// One exchange's four timestamps, nanoseconds of `CLOCK_MONOTONIC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exchange {
    /// Host, request sent.
    pub t1: u64,
    /// Guest, request received.
    pub t2: u64,
    /// Guest, answer sent.
    pub t3: u64,
    /// Host, answer received.
    pub t4: u64,
}

impl Exchange {
    /// Round trip spent outside the guest (never negative).
    pub fn round_trip_ns(&self) -> u64 {
        self.t4
            .saturating_sub(self.t1)
            .saturating_sub(self.t3.saturating_sub(self.t2))
    }

    /// Guest clock minus host clock, estimated at the midpoint.
    pub fn offset_ns(&self) -> i64 {
        let a = self.t2 as i128 - self.t1 as i128;
        let b = self.t3 as i128 - self.t4 as i128;
        ((a + b) / 2) as i64
    }
}

/// The alignment from the exchange with the smallest round trip; `None` with none.
/// Exchanges whose stamps go backwards on either side are not evidence and are skipped.
pub fn align(exchanges: &[Exchange]) -> Option<Alignment> {
    let best = exchanges
        .iter()
        .filter(|e| e.t1 <= e.t4 && e.t2 <= e.t3)
        .min_by_key(|e| e.round_trip_ns())?;
    Some(Alignment {
        offset_ns: best.offset_ns(),
        error_ns: best.round_trip_ns().div_ceil(2),
        round_trip_ns: best.round_trip_ns(),
        exchanges: exchanges.len() as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_shortest_round_trip_wins() {
        // Guest clock 1000 ahead; the second exchange waited 300 on the way back.
        let ex = [
            Exchange {
                t1: 0,
                t2: 1_050,
                t3: 1_060,
                t4: 400,
            },
            Exchange {
                t1: 500,
                t2: 1_520,
                t3: 1_530,
                t4: 550,
            },
        ];
        let a = align(&ex).unwrap();
        assert_eq!(a.round_trip_ns, 40);
        assert_eq!(a.error_ns, 20);
        assert_eq!(a.offset_ns, 1_000);
        assert_eq!(a.to_host(1_525), 525);
        assert_eq!(align(&[]), None);
    }

    proptest! {
        /// Whatever the delays each way, the true offset is within the reported bound.
        #[test]
        fn the_true_offset_is_within_the_bound(
            offset in -1_000_000_000i64..1_000_000_000,
            trips in prop::collection::vec((0u64..10_000_000, 0u64..100_000, 0u64..10_000_000), 1..8),
        ) {
            let base = 2_000_000_000u64;
            let mut t = base;
            let ex: Vec<Exchange> = trips.iter().map(|&(up, inside, down)| {
                let t1 = t;
                let t2 = ((t1 + up) as i64 + offset) as u64;
                let t3 = t2 + inside;
                let t4 = t1 + up + inside + down;
                t = t4 + 1_000;
                Exchange { t1, t2, t3, t4 }
            }).collect();
            let a = align(&ex).unwrap();
            prop_assert!((a.offset_ns - offset).unsigned_abs() <= a.error_ns,
                "{a:?} against {offset}");
            let best = trips.iter().map(|&(u, _, d)| u + d).min().unwrap();
            prop_assert_eq!(a.round_trip_ns, best);
        }
    }
}
