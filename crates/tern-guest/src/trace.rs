//! The guest's scheduler trace: the guest kernel's `sched_switch`, `sched_wakeup` and
//! `sched_migrate_task` of every process, recorded with `tern_trace`'s recorder (no
//! thread filter) on a thread of its own and kept in a bounded buffer until the host
//! takes them (`trace-read`) as packed binary records.
//!
//! The buffer never grows past its bound: records that find it full are counted as
//! dropped and the count travels with every chunk. The host reads every few tens of
//! milliseconds; when it has not read for the recording's idle limit it is taken to be
//! gone and the recording stops by itself.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::GuestError;
use tern_api::guest::{TraceChunk, MAX_TRACE_BUFFER};
use tern_trace::recorder::monotonic_ns;
use tern_trace::{packed, Recorder, RecorderConfig, SchedEvent};

/// The guest clock, `CLOCK_MONOTONIC` (what the recorder stamps events with).
pub fn now_ns() -> u64 {
    monotonic_ns()
}

/// How often the recording thread reads the kernel's ring buffers.
const READ_EVERY: Duration = Duration::from_millis(20);
/// Ring buffer per guest CPU: 256 KiB holds ~100 ms of a busy guest's events.
const RING_BYTES: usize = 256 << 10;

#[derive(Default)]
struct Buffer {
    events: VecDeque<SchedEvent>,
    /// Records the buffer had no room for.
    dropped: u64,
    /// From the recorder: records the kernel could not write, and not kept.
    kernel_lost: u64,
    recorder_dropped: u64,
    /// Set when the recording thread ended with an error.
    error: Option<String>,
    /// Set when the recording stopped by itself.
    ended: Option<String>,
}

struct Shared {
    buf: Mutex<Buffer>,
    stop: AtomicBool,
    last_read: Mutex<Instant>,
    max_records: usize,
    idle_stop: Duration,
}

/// A recording under way.
pub struct Tracer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    /// Threads whose names were already sent.
    named: BTreeSet<u32>,
    pub cpus: Vec<u32>,
    pub start_ns: u64,
}

/// Checks a `trace-start`'s bounds (pure).
pub fn check_start(max_records: u64, idle_stop_ms: u64) -> Result<(), GuestError> {
    if max_records == 0 || max_records > MAX_TRACE_BUFFER {
        return Err(GuestError::BadRequest(format!(
            "max_records {max_records} is out of range: give 1 to {MAX_TRACE_BUFFER}"
        )));
    }
    if !(100..=600_000).contains(&idle_stop_ms) {
        return Err(GuestError::BadRequest(format!(
            "idle_stop_ms {idle_stop_ms} is out of range: give 100 to 600000"
        )));
    }
    Ok(())
}

impl Tracer {
    /// Opens the recorder on every guest CPU and starts the thread that reads it.
    pub fn start(max_records: u64, idle_stop_ms: u64) -> Result<Tracer, GuestError> {
        check_start(max_records, idle_stop_ms)?;
        let cfg = RecorderConfig {
            ring_bytes: RING_BYTES,
            // The recorder's own list is emptied every read; the bound that matters is
            // the buffer's.
            max_events: 1 << 20,
            ..RecorderConfig::all_threads()
        };
        let rec = Recorder::open(&cfg).map_err(|e| GuestError::Trace(e.to_string()))?;
        let shared = Arc::new(Shared {
            buf: Mutex::new(Buffer::default()),
            stop: AtomicBool::new(false),
            last_read: Mutex::new(Instant::now()),
            max_records: max_records as usize,
            idle_stop: Duration::from_millis(idle_stop_ms),
        });
        let (cpus, start_ns) = (rec.cpus(), rec.start_ns());
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("trace".into())
            .spawn(move || record(rec, &sh))
            .map_err(GuestError::Io)?;
        Ok(Tracer {
            shared,
            thread: Some(thread),
            named: BTreeSet::new(),
            cpus,
            start_ns,
        })
    }

    /// Takes at most `max_records` buffered records.
    pub fn read(&mut self, max_records: u64) -> Result<TraceChunk, GuestError> {
        *self.shared.last_read.lock().expect("trace clock lock") = Instant::now();
        let (events, pending, lost, dropped) = {
            let mut b = self.shared.buf.lock().expect("trace buffer lock");
            if let Some(e) = &b.error {
                return Err(GuestError::Trace(e.clone()));
            }
            if b.events.is_empty() {
                if let Some(why) = &b.ended {
                    return Err(GuestError::Trace(why.clone()));
                }
            }
            let n = (max_records as usize).min(b.events.len());
            let events: Vec<SchedEvent> = b.events.drain(..n).collect();
            (
                events,
                b.events.len() as u64,
                b.kernel_lost,
                b.dropped + b.recorder_dropped,
            )
        };
        let mut comms = Vec::new();
        for t in events.iter().flat_map(|e| e.kind.tids()).flatten() {
            if t != 0 && self.named.insert(t) {
                comms.push((t, comm(t)));
            }
        }
        Ok(TraceChunk {
            data: packed::to_text(&events),
            records: events.len() as u64,
            pending,
            lost,
            dropped,
            comms,
            now_ns: now_ns(),
        })
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A thread's name from `/proc` (threads of exited processes have none left).
fn comm(tid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{tid}/comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Moves `events` into `buf`, keeping at most `max` there; the rest are counted.
fn push_bounded(buf: &mut Buffer, events: Vec<SchedEvent>, max: usize) {
    let room = max.saturating_sub(buf.events.len());
    let n = events.len();
    buf.events.extend(events.into_iter().take(room));
    buf.dropped += n.saturating_sub(room) as u64;
}

/// The recording thread: reads the rings until stopped or the host stops reading.
fn record(mut rec: Recorder, sh: &Shared) {
    let result = loop {
        if sh.stop.load(Ordering::Relaxed) {
            break Ok(());
        }
        let idle = sh.last_read.lock().expect("trace clock lock").elapsed();
        if idle > sh.idle_stop {
            let mut b = sh.buf.lock().expect("trace buffer lock");
            b.ended = Some(format!(
                "the recording stopped by itself: no trace-read for {} ms",
                idle.as_millis()
            ));
            b.events.clear();
            break Ok(());
        }
        if let Err(e) = rec.poll(READ_EVERY) {
            break Err(e.to_string());
        }
        let events = rec.take();
        let (lost, dropped) = rec.losses();
        let mut b = sh.buf.lock().expect("trace buffer lock");
        push_bounded(&mut b, events, sh.max_records);
        b.kernel_lost = lost;
        b.recorder_dropped = dropped;
    };
    let stopped = rec.stop().map_err(|e| e.to_string());
    if let Err(e) = result.and(stopped) {
        sh.buf.lock().expect("trace buffer lock").error = Some(e);
    }
}

/// Pins the agent's threads whose names start with `prefix` to guest CPU `cpu`; returns
/// their thread ids.
pub fn move_threads(prefix: &str, cpu: u32) -> Result<Vec<u32>, GuestError> {
    if prefix.is_empty() {
        return Err(GuestError::BadRequest(
            "name the threads to move, e.g. \"cpu-\" for the cpu workload's".into(),
        ));
    }
    if cpu as usize >= libc::CPU_SETSIZE as usize {
        return Err(GuestError::BadRequest(format!("cpu {cpu} is out of range")));
    }
    let mut moved = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").map_err(GuestError::Io)? {
        let Ok(entry) = entry else { continue };
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if !comm(tid).starts_with(prefix) {
            continue;
        }
        // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays inside it (checked above).
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut set);
            libc::sched_setaffinity(tid as libc::pid_t, std::mem::size_of_val(&set), &set)
        };
        if rc != 0 {
            return Err(GuestError::BadRequest(format!(
                "cannot move thread {tid} to cpu {cpu}: {}",
                std::io::Error::last_os_error()
            )));
        }
        moved.push(tid);
    }
    if moved.is_empty() {
        return Err(GuestError::BadRequest(format!(
            "no thread of the agent is named {prefix}*: start the workload first"
        )));
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_api::trace::EventKind;

    fn ev(t: u64) -> SchedEvent {
        SchedEvent {
            time_ns: t,
            cpu: 0,
            kind: EventKind::KvmExit { tid: 1 },
        }
    }

    #[test]
    fn a_full_buffer_counts_what_it_drops() {
        let mut b = Buffer::default();
        push_bounded(&mut b, (0..3).map(ev).collect(), 5);
        push_bounded(&mut b, (3..7).map(ev).collect(), 5);
        assert_eq!(b.events.len(), 5);
        assert_eq!(b.dropped, 2);
        // The oldest are kept: what was dropped is the newest.
        assert_eq!(b.events.back().map(|e| e.time_ns), Some(4));
    }

    #[test]
    fn start_bounds_are_checked() {
        assert!(check_start(1, 100).is_ok());
        assert!(check_start(0, 1_000).is_err());
        assert!(check_start(MAX_TRACE_BUFFER + 1, 1_000).is_err());
        assert!(check_start(10, 99).is_err());
    }

    #[test]
    fn moving_threads_by_name() {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let h = std::thread::Builder::new()
            .name("movetest-0".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let moved = move_threads("movetest-", 0).unwrap();
        stop.store(true, Ordering::Relaxed);
        h.join().unwrap();
        assert_eq!(moved.len(), 1);
        assert!(move_threads("no-such-thread-", 0).is_err());
        assert!(move_threads("", 0).is_err());
    }
}
