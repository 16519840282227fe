//! Any tracepoints, every thread, records handed over undecoded: for callers with
//! tracepoints of their own (the guest agent's process and syscall events). Same rings
//! as the scheduler [`Recorder`](crate::Recorder): per CPU, one ring shared by every
//! tracepoint, `CLOCK_MONOTONIC` timestamps, losses counted; unlike it, every record
//! wakes a waiting [`RawRecorder::poll`] (these callers react to single events).

use crate::error::Result;
use crate::format::Format;
use crate::recorder::{open_ring, perf_err, wait_readable, CpuRing};
use crate::tracefs;
use perf_event::data::Record as PerfRecord;
use std::time::Duration;

/// One tracepoint record: its time, CPU and raw bytes (decode with its [`Format`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawEvent {
    pub time_ns: u64,
    pub cpu: u32,
    pub raw: Vec<u8>,
}

/// A tracepoint to record and the kernel filter that thins it out, if any
/// (`ret >= 0`; the syntax of tracefs `filter` files).
#[derive(Debug, Clone)]
pub struct Point {
    pub format: Format,
    pub filter: Option<String>,
}

/// A recording of chosen tracepoints under way.
pub struct RawRecorder {
    rings: Vec<CpuRing>,
    lost: u64,
    undecodable: u64,
}

impl RawRecorder {
    /// Opens and enables `points` on every online CPU.
    pub fn open(points: &[Point], ring_bytes: usize) -> Result<RawRecorder> {
        tracefs::ensure_mounted(std::path::Path::new(tracefs::TRACEFS))?;
        let list: Vec<(&Format, Option<String>)> = points
            .iter()
            .map(|p| (&p.format, p.filter.clone()))
            .collect();
        let mut rings = Vec::new();
        for cpu in tracefs::online_cpus()? {
            // Every record wakes the reader: these callers react to single events.
            rings.push(open_ring(cpu, &list, ring_bytes, true)?);
        }
        for r in &mut rings {
            for c in std::iter::once(&mut *r.sampler).chain(r.others.iter_mut()) {
                c.enable()
                    .map_err(perf_err(format!("enabling cpu {}", r.cpu)))?;
            }
        }
        Ok(RawRecorder {
            rings,
            lost: 0,
            undecodable: 0,
        })
    }

    /// Waits at most `timeout` for records, then takes every record in the rings, in
    /// time order.
    pub fn poll(&mut self, timeout: Duration) -> Result<Vec<RawEvent>> {
        wait_readable(&self.rings, timeout)?;
        let mut out = Vec::new();
        for r in &mut self.rings {
            while let Some(rec) = r.sampler.next_record() {
                match rec.parse_record() {
                    Ok(PerfRecord::Sample(s)) => match (s.time(), s.raw()) {
                        (Some(time_ns), Some(raw)) => out.push(RawEvent {
                            time_ns,
                            cpu: s.cpu().unwrap_or(r.cpu),
                            raw: raw.to_vec(),
                        }),
                        _ => self.undecodable += 1,
                    },
                    Ok(PerfRecord::Lost(l)) => self.lost += l.lost,
                    Ok(PerfRecord::LostSamples(l)) => self.lost += l.lost,
                    Ok(_) => {}
                    Err(_) => self.undecodable += 1,
                }
            }
        }
        out.sort_by_key(|e| e.time_ns);
        Ok(out)
    }

    /// Records the kernel could not write (full ring) or that could not be read, so
    /// far: a caller that must see every event starts over from a fresh scan when this
    /// grows.
    pub fn lost(&self) -> u64 {
        self.lost + self.undecodable
    }
}

impl Drop for RawRecorder {
    fn drop(&mut self) {
        for r in &mut self.rings {
            for c in std::iter::once(&mut *r.sampler).chain(r.others.iter_mut()) {
                let _ = c.disable();
            }
        }
    }
}
