//! The balance score over time. The store keeps no scores (only the state they are
//! computed from), so the web module samples the `spread` score of the snapshot at a
//! fixed interval and keeps the last [`CAPACITY`] samples in memory; a restarted manager
//! starts a new curve.

use std::collections::VecDeque;

use serde::Serialize;
use tern_balance::metric::spread::Spread;

use crate::decide::balance;
use crate::state::{Millis, Snapshot};

/// Samples kept: half an hour at one sample every two seconds.
pub const CAPACITY: usize = 900;

/// One point of the curve.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Sample {
    pub time: Millis,
    /// The planner's `spread` score (lower is more even).
    pub score: f64,
    pub hosts: usize,
    pub vms: usize,
}

/// The `spread` score of `snap` as the balancer sees it at `now`: the same model the
/// planner is given, so the curve and the planner's `score_before` agree.
pub fn sample(snap: &Snapshot, now: Millis) -> Sample {
    let m = balance::model(snap, now);
    Sample {
        time: now,
        score: tern_balance::metric::score(&m.cluster, &Spread),
        hosts: snap.hosts.len(),
        vms: snap.vms.len(),
    }
}

/// The last [`CAPACITY`] samples, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
}

impl History {
    /// Appends `s`, dropping the oldest sample when full. A sample not later than the
    /// last one is ignored, so a clock step backwards cannot fold the curve.
    pub fn push(&mut self, s: Sample) {
        if self.samples.back().is_some_and(|b| s.time <= b.time) {
            return;
        }
        if self.samples.len() == CAPACITY {
            self.samples.pop_front();
        }
        self.samples.push_back(s);
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testing::*;

    fn at(time: Millis, score: f64) -> Sample {
        Sample {
            time,
            score,
            hosts: 1,
            vms: 0,
        }
    }

    #[test]
    fn history_keeps_the_newest_in_time_order() {
        let mut h = History::default();
        for t in 0..(CAPACITY as u64 + 10) {
            h.push(at(t, t as f64));
        }
        let s = h.samples();
        assert_eq!(s.len(), CAPACITY);
        assert_eq!(s[0].time, 10);
        assert_eq!(s.last().unwrap().time, CAPACITY as u64 + 9);
        h.push(at(5, -1.0));
        let s = h.samples();
        assert_eq!(s.len(), CAPACITY);
        assert_ne!(
            s.last().unwrap().score,
            -1.0,
            "a step back in time is ignored"
        );
        assert!(s.windows(2).all(|w| w[0].time < w[1].time));
    }

    #[test]
    fn an_uneven_cluster_scores_worse_than_an_even_one() {
        let mut even = cluster(&[8.0, 8.0], 65536);
        let mut uneven = even.clone();
        for (i, h) in ["h0", "h1"].iter().enumerate() {
            running(&mut even, &format!("e{i}"), h, spec(2, 1024));
            running(&mut uneven, &format!("u{i}"), "h0", spec(2, 1024));
        }
        for v in even.vms.values_mut().chain(uneven.vms.values_mut()) {
            v.cpu_used = 2.0;
        }
        let (e, u) = (sample(&even, 0), sample(&uneven, 0));
        assert!(e.score < 1e-9, "{e:?}");
        assert!(u.score > 0.1, "{u:?}");
        assert_eq!(u.hosts, 2);
        assert_eq!(u.vms, 2);
    }
}
