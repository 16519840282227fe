//! Assembling a guest recording from the chunks the guest agent streams (pure): packed
//! records unpacked, loss counts kept, process names gathered, and every time moved to
//! the host's clock through the clock alignment.

use crate::clock::Alignment;
use crate::model::{GuestTrace, SchedEvent};
use crate::packed::{from_text, UnpackError};
use std::collections::BTreeMap;
use tern_api::guest::TraceChunk;

/// A guest recording being received, on the guest's clock.
#[derive(Debug, Clone, Default)]
pub struct GuestChunks {
    start_ns: u64,
    events: Vec<SchedEvent>,
    lost: u64,
    dropped: u64,
    comms: BTreeMap<u32, String>,
}

impl GuestChunks {
    /// A recording the guest started at `start_ns` (guest clock).
    pub fn new(start_ns: u64) -> GuestChunks {
        GuestChunks {
            start_ns,
            ..GuestChunks::default()
        }
    }

    /// Adds one chunk. Loss counts are the guest's running totals, so the latest wins.
    pub fn add(&mut self, c: &TraceChunk) -> Result<(), UnpackError> {
        self.events.extend(from_text(&c.data)?);
        self.lost = self.lost.max(c.lost);
        self.dropped = self.dropped.max(c.dropped);
        for (tid, comm) in &c.comms {
            self.comms.insert(*tid, comm.clone());
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The recording up to `end_ns` (guest clock), on the host's clock.
    pub fn finish(mut self, end_ns: u64, alignment: Alignment) -> GuestTrace {
        self.events.sort_by_key(|e| e.time_ns);
        let end_ns = end_ns.max(self.events.last().map_or(0, |e| e.time_ns + 1));
        for e in &mut self.events {
            e.time_ns = alignment.to_host(e.time_ns);
        }
        GuestTrace {
            start_ns: alignment.to_host(self.start_ns),
            end_ns: alignment
                .to_host(end_ns)
                .max(alignment.to_host(self.start_ns)),
            events: self.events,
            lost: self.lost,
            dropped: self.dropped,
            comms: self.comms,
            alignment: Some(alignment),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EventKind;
    use crate::packed::to_text;

    fn chunk(events: &[SchedEvent], lost: u64, dropped: u64) -> TraceChunk {
        TraceChunk {
            data: to_text(events),
            records: events.len() as u64,
            pending: 0,
            lost,
            dropped,
            comms: vec![(7, "spin".into())],
            now_ns: 0,
        }
    }

    #[test]
    fn chunks_become_a_host_clock_recording() {
        let ev = |t| SchedEvent {
            time_ns: t,
            cpu: 1,
            kind: EventKind::Wakeup {
                tid: 7,
                target_cpu: 1,
            },
        };
        let mut c = GuestChunks::new(10_000);
        c.add(&chunk(&[ev(12_000), ev(11_000)], 0, 2)).unwrap();
        c.add(&chunk(&[ev(13_000)], 1, 5)).unwrap();
        assert!(c
            .add(&TraceChunk {
                data: "!!".into(),
                ..chunk(&[], 0, 0)
            })
            .is_err());
        let a = Alignment {
            offset_ns: 9_000,
            error_ns: 50,
            round_trip_ns: 100,
            exchanges: 4,
        };
        let g = c.clone().finish(20_000, a);
        assert_eq!((g.start_ns, g.end_ns), (1_000, 11_000));
        // A guest clock behind the host's (it booted later), and a last read that came
        // before the last event's time: the window still holds every event.
        let behind = Alignment {
            offset_ns: -1_000_000,
            ..a
        };
        let g2 = c.clone().finish(12_500, behind);
        assert_eq!((g2.start_ns, g2.end_ns), (1_010_000, 1_013_001));
        let times: Vec<u64> = g.events.iter().map(|e| e.time_ns).collect();
        assert_eq!(times, vec![2_000, 3_000, 4_000]);
        assert_eq!((g.lost, g.dropped), (1, 5));
        assert_eq!(g.comms.get(&7).map(String::as_str), Some("spin"));
        assert_eq!(g.alignment, Some(a));
    }
}
