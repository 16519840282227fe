//! The time-ordered event queue. Events at the same instant come out in the order they
//! were scheduled (a sequence number breaks ties), so a run is fully deterministic.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// What happens at an instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A scheduling interval boundary: new load samples, then the policy runs.
    Tick(u32),
    /// A migration may have finished; `generation` tells a stale completion (the
    /// migration's rate changed after this was scheduled) from the live one.
    MigrationDone { slot: u32, generation: u32 },
}

struct Entry {
    time: f64,
    seq: u64,
    event: Event,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    // BinaryHeap is a max-heap: reverse so the earliest (time, seq) pops first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .time
            .total_cmp(&self.time)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// A min-queue of events keyed by (time, sequence).
#[derive(Default)]
pub struct EventQueue {
    heap: BinaryHeap<Entry>,
    seq: u64,
}

impl EventQueue {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, time: f64, event: Event) {
        self.seq += 1;
        self.heap.push(Entry {
            time,
            seq: self.seq,
            event,
        });
    }

    pub fn pop(&mut self) -> Option<(f64, Event)> {
        self.heap.pop().map(|e| (e.time, e.event))
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ties_keep_insertion_order() {
        let mut q = EventQueue::new();
        q.push(5.0, Event::Tick(1));
        q.push(5.0, Event::Tick(2));
        q.push(1.0, Event::Tick(3));
        assert_eq!(q.pop(), Some((1.0, Event::Tick(3))));
        assert_eq!(q.pop(), Some((5.0, Event::Tick(1))));
        assert_eq!(q.pop(), Some((5.0, Event::Tick(2))));
        assert!(q.pop().is_none());
    }

    proptest! {
        #[test]
        fn pops_in_time_then_sequence_order(times in proptest::collection::vec(0u8..20, 0..200)) {
            let mut q = EventQueue::new();
            for (i, t) in times.iter().enumerate() {
                q.push(f64::from(*t), Event::Tick(i as u32));
            }
            let mut last = (-1.0, 0u32);
            while let Some((t, Event::Tick(i))) = q.pop() {
                prop_assert!(t > last.0 || (t == last.0 && i > last.1));
                last = (t, i);
            }
        }
    }
}
