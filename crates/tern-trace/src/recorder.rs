//! The host recorder: scheduler tracepoints of chosen threads through `perf_event_open`.
//!
//! Per online CPU, one perf event per tracepoint, all writing into one ring buffer (the
//! first event's; the others are redirected with `PERF_EVENT_IOC_SET_OUTPUT`). Events
//! are per CPU, not per thread, because `sched_switch` is emitted by the CPU switching:
//! a per-thread event would miss the switch that puts the thread back on a CPU. The
//! kernel drops records of other threads itself, through a tracepoint filter on the pid
//! fields (`prev_pid == T || next_pid == T ...`); the reader checks again, so a filter
//! the kernel refused would cost speed, not correctness.
//!
//! Timestamps are `CLOCK_MONOTONIC`, the clock a guest's records will be aligned to and
//! the one a test can read. Ring buffers are fixed in size; when one is full the kernel
//! counts what it could not write in a `PERF_RECORD_LOST`, summed into
//! [`HostTrace::lost`]. Every wait is a `poll` with a timeout.

use crate::error::{Result, TraceError};
use crate::format::{decode, Format, Layouts};
use crate::model::{HostTrace, SchedEvent};
use crate::tracefs;
use perf_event::data::Record as PerfRecord;
use perf_event::events::Tracepoint;
use perf_event::{Builder, Clock, Counter, ReadFormat, SampleFlag, Sampler};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The most threads one recording filters on (a filter string must fit in a page).
pub const MAX_THREADS: usize = 64;

/// What to record.
#[derive(Debug, Clone)]
pub struct RecorderConfig {
    /// The threads to trace (a VM's vCPU threads).
    pub tids: Vec<u32>,
    /// Ring buffer size per CPU, bytes (rounded up to a power of two pages).
    pub ring_bytes: usize,
    /// Most events kept; later ones are counted in [`HostTrace::dropped`].
    pub max_events: usize,
    /// Also record `kvm:kvm_entry`/`kvm_exit` where the kernel has them. They fire on
    /// every guest entry under hardware virtualisation (many per millisecond), never
    /// under TCG.
    pub kvm: bool,
    /// Where tracefs is (mounted there if it is not).
    pub tracefs: PathBuf,
    /// Record every thread, with no kernel filter (`tids` is then ignored): inside a
    /// guest, where every process is of interest.
    pub all_threads: bool,
}

impl RecorderConfig {
    pub fn new(tids: Vec<u32>) -> RecorderConfig {
        RecorderConfig {
            tids,
            ring_bytes: 1 << 20,
            max_events: 4_000_000,
            kvm: false,
            tracefs: PathBuf::from(tracefs::TRACEFS),
            all_threads: false,
        }
    }

    /// Every thread of the machine (the guest's recorder).
    pub fn all_threads() -> RecorderConfig {
        RecorderConfig {
            all_threads: true,
            ..RecorderConfig::new(Vec::new())
        }
    }
}

/// One CPU's ring buffer and the events writing into it.
pub(crate) struct CpuRing {
    pub(crate) cpu: u32,
    pub(crate) sampler: Sampler,
    /// Events whose output goes to `sampler`'s buffer; kept open for as long as it is.
    pub(crate) others: Vec<Counter>,
}

/// A recording under way.
pub struct Recorder {
    rings: Vec<CpuRing>,
    layouts: Layouts,
    tids: Vec<u32>,
    all_threads: bool,
    events: Vec<SchedEvent>,
    max_events: usize,
    lost: u64,
    dropped: u64,
    start_ns: u64,
}

/// `CLOCK_MONOTONIC` now, in nanoseconds: the clock the recorder's events are on.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to write.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The kernel filter that keeps only records of `tids` for tracepoint `f`.
pub fn filter(f: &Format, layouts: &Layouts, tids: &[u32]) -> String {
    let fields: &[&str] = if f.id == layouts.switch.id {
        &["prev_pid", "next_pid"]
    } else if f.id == layouts.wakeup.id || f.id == layouts.migrate.id {
        &["pid"]
    } else {
        &["common_pid"]
    };
    tids.iter()
        .flat_map(|t| fields.iter().map(move |f| format!("{f} == {t}")))
        .collect::<Vec<_>>()
        .join(" || ")
}

pub(crate) fn perf_err(what: String) -> impl FnOnce(std::io::Error) -> TraceError {
    move |source| TraceError::Perf { what, source }
}

/// `wake_each`: a `poll` on the ring returns at the first record (else when the ring
/// is half full, or at the caller's timeout).
pub(crate) fn open_event(f: &Format, cpu: u32, wake_each: bool) -> Result<Counter> {
    let mut b = Builder::new(Tracepoint::with_id(f.id));
    if wake_each {
        b.wakeup_events(1);
    }
    b.one_cpu(cpu as usize)
        .any_pid()
        // Tracepoints fire in the kernel; perf-event2 excludes kernel samples by default.
        .include_kernel()
        .sample_period(1)
        .sample(SampleFlag::TIME | SampleFlag::CPU | SampleFlag::RAW)
        .clockid(Clock::MONOTONIC)
        .enabled(false);
    // The kernel writes a lost-records note into a full ring only when a later record
    // fits, so losses just before the recording stops would go unreported; the event's
    // own count of lost samples (Linux 6.0 and later) has them all.
    b.read_format(ReadFormat::LOST);
    match b.build() {
        Ok(c) => Ok(c),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            b.read_format(ReadFormat::empty());
            b.build()
                .map_err(perf_err(format!("{} on cpu {cpu}", f.name)))
        }
        Err(e) => Err(perf_err(format!("{} on cpu {cpu}", f.name))(e)),
    }
}

pub(crate) fn ioctl(counter: &Counter, what: String, call: impl FnOnce(i32) -> i32) -> Result<()> {
    if call(counter.as_raw_fd()) < 0 {
        return Err(TraceError::Perf {
            what,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Waits at most `timeout` for a record in any of `rings`.
pub(crate) fn wait_readable(rings: &[CpuRing], timeout: Duration) -> Result<()> {
    let mut fds: Vec<libc::pollfd> = rings
        .iter()
        .map(|r| libc::pollfd {
            fd: r.sampler.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the call.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(TraceError::Perf {
                what: "waiting for records".into(),
                source: e,
            });
        }
    }
    Ok(())
}

/// Opens tracepoints `points` (each with its kernel filter, if any) on `cpu`, all
/// writing into one ring buffer of `ring_bytes`. Not enabled yet. `wake_each` as for
/// [`open_event`].
pub(crate) fn open_ring(
    cpu: u32,
    points: &[(&Format, Option<String>)],
    ring_bytes: usize,
    wake_each: bool,
) -> Result<CpuRing> {
    let mut counters = Vec::new();
    for (f, text) in points {
        let c = open_event(f, cpu, wake_each)?;
        if let Some(text) = text {
            let text = std::ffi::CString::new(text.as_str()).map_err(|_| TraceError::Format {
                tracepoint: f.name.clone(),
                reason: "a filter with a NUL byte".into(),
            })?;
            ioctl(&c, format!("the filter of {}", f.name), |fd| {
                // SAFETY: `fd` is an open perf event; the string outlives the call.
                unsafe { perf_event_open_sys::ioctls::SET_FILTER(fd, text.as_ptr() as *mut _) }
            })?;
        }
        counters.push(c);
    }
    let mut counters = counters.into_iter();
    let first = counters
        .next()
        .ok_or_else(|| TraceError::MissingTracepoint("any".into()))?;
    let sampler = first
        .sampled(ring_bytes)
        .map_err(perf_err(format!("the ring buffer of cpu {cpu}")))?;
    let others: Vec<Counter> = counters.collect();
    for c in &others {
        ioctl(c, format!("sharing cpu {cpu}'s ring buffer"), |fd| {
            // SAFETY: both are open perf events on the same CPU and clock.
            unsafe { perf_event_open_sys::ioctls::SET_OUTPUT(fd, sampler.as_raw_fd()) }
        })?;
    }
    Ok(CpuRing {
        cpu,
        sampler,
        others,
    })
}

impl Recorder {
    /// Opens and enables the recording of `cfg.tids` on every online CPU.
    pub fn open(cfg: &RecorderConfig) -> Result<Recorder> {
        if cfg.tids.is_empty() && !cfg.all_threads {
            return Err(TraceError::NoThreads);
        }
        if cfg.tids.len() > MAX_THREADS && !cfg.all_threads {
            return Err(TraceError::TooManyThreads {
                given: cfg.tids.len(),
                max: MAX_THREADS,
            });
        }
        let root = tracefs::ensure_mounted(&cfg.tracefs)?;
        let layouts = tracefs::layouts(&root, cfg.kvm)?;
        let mut rings = Vec::new();
        for cpu in tracefs::online_cpus()? {
            let points: Vec<(&Format, Option<String>)> = layouts
                .all()
                .into_iter()
                .map(|f| {
                    let text = (!cfg.all_threads).then(|| filter(f, &layouts, &cfg.tids));
                    (f, text)
                })
                .collect();
            rings.push(open_ring(cpu, &points, cfg.ring_bytes, false)?);
        }
        let mut rec = Recorder {
            rings,
            layouts,
            tids: cfg.tids.clone(),
            all_threads: cfg.all_threads,
            events: Vec::new(),
            max_events: cfg.max_events,
            lost: 0,
            dropped: 0,
            start_ns: monotonic_ns(),
        };
        rec.switch(true)?;
        Ok(rec)
    }

    /// Enables or disables every event.
    fn switch(&mut self, on: bool) -> Result<()> {
        for r in &mut self.rings {
            let what = format!(
                "{} cpu {}",
                if on { "enabling" } else { "disabling" },
                r.cpu
            );
            for c in std::iter::once(&mut *r.sampler).chain(r.others.iter_mut()) {
                if on { c.enable() } else { c.disable() }.map_err(perf_err(what.clone()))?;
            }
        }
        Ok(())
    }

    /// Waits at most `timeout` for records, then reads every ring buffer. Returns how
    /// many events it kept.
    pub fn poll(&mut self, timeout: Duration) -> Result<usize> {
        wait_readable(&self.rings, timeout)?;
        Ok(self.drain())
    }

    /// Reads every record now in the ring buffers.
    fn drain(&mut self) -> usize {
        let before = self.events.len();
        for r in &mut self.rings {
            while let Some(rec) = r.sampler.next_record() {
                match rec.parse_record() {
                    Ok(PerfRecord::Sample(s)) => {
                        let (Some(time_ns), Some(raw)) = (s.time(), s.raw()) else {
                            self.dropped += 1;
                            continue;
                        };
                        let kind = match decode(&self.layouts, raw) {
                            Ok(Some(k)) => k,
                            _ => {
                                self.dropped += 1;
                                continue;
                            }
                        };
                        if !self.all_threads
                            && !kind.tids().iter().flatten().any(|t| self.tids.contains(t))
                        {
                            continue;
                        }
                        if self.events.len() >= self.max_events {
                            self.dropped += 1;
                            continue;
                        }
                        self.events.push(SchedEvent {
                            time_ns,
                            cpu: s.cpu().unwrap_or(r.cpu),
                            kind,
                        });
                    }
                    Ok(PerfRecord::Lost(l)) => self.lost += l.lost,
                    Ok(PerfRecord::LostSamples(l)) => self.lost += l.lost,
                    Ok(_) => {}
                    Err(_) => self.dropped += 1,
                }
            }
        }
        self.events.len() - before
    }

    /// Takes the events kept so far, in time order, making room for more: a streaming
    /// reader's bounded buffer is the recorder's `max_events`.
    pub fn take(&mut self) -> Vec<SchedEvent> {
        let mut v = std::mem::take(&mut self.events);
        v.sort_by_key(|e| e.time_ns);
        v
    }

    /// Records the kernel could not write (full ring) and records not kept (full
    /// buffer), so far.
    pub fn losses(&mut self) -> (u64, u64) {
        (self.lost.max(self.kernel_lost()), self.dropped)
    }

    /// The kernel's own count of samples it could not write, over every event (0 on
    /// kernels without `PERF_FORMAT_LOST`, where the ring's notes are all there is).
    fn kernel_lost(&mut self) -> u64 {
        let mut lost = 0;
        for r in &mut self.rings {
            for c in std::iter::once(&mut *r.sampler).chain(r.others.iter_mut()) {
                lost += c.read_full().ok().and_then(|d| d.lost()).unwrap_or(0);
            }
        }
        lost
    }

    /// The online CPUs recorded.
    pub fn cpus(&self) -> Vec<u32> {
        self.rings.iter().map(|r| r.cpu).collect()
    }

    /// When recording was enabled, `CLOCK_MONOTONIC`.
    pub fn start_ns(&self) -> u64 {
        self.start_ns
    }

    /// Stops recording (what is still in the rings is not read).
    pub fn stop(mut self) -> Result<()> {
        self.switch(false)
    }

    /// Events kept so far.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Stops recording, reads what is left and returns the recording, events in time
    /// order.
    pub fn finish(mut self) -> Result<HostTrace> {
        self.switch(false)?;
        let end_ns = monotonic_ns();
        self.drain();
        self.lost = self.lost.max(self.kernel_lost());
        // Each ring is in time order; merging them is a stable sort by time.
        self.events.sort_by_key(|e| e.time_ns);
        let mut tids = self.tids.clone();
        tids.sort_unstable();
        tids.dedup();
        Ok(HostTrace {
            start_ns: self.start_ns,
            end_ns,
            cpus: self.rings.iter().map(|r| r.cpu).collect(),
            tids,
            events: self.events,
            lost: self.lost,
            dropped: self.dropped,
            kvm_events: self.layouts.kvm_entry.is_some(),
        })
    }
}

/// Records `cfg` for `duration`.
pub fn record(cfg: &RecorderConfig, duration: Duration) -> Result<HostTrace> {
    record_until(cfg, duration, &AtomicBool::new(false))
}

/// Records `cfg` for `duration`, or until `stop` is set (the caller went away): what was
/// recorded until then is returned either way.
pub fn record_until(
    cfg: &RecorderConfig,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<HostTrace> {
    // Reading every 50 ms keeps a 1 MiB ring far from full at the rates seen here
    // (a few thousand events per second per VM).
    let every = Duration::from_millis(50);
    let mut rec = Recorder::open(cfg)?;
    let deadline = Instant::now() + duration;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() || stop.load(Ordering::Relaxed) {
            break;
        }
        rec.poll(left.min(every))?;
    }
    rec.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::tests::layouts;

    #[test]
    fn filters_name_every_thread_in_the_right_fields() {
        let l = layouts();
        assert_eq!(
            filter(&l.switch, &l, &[5, 7]),
            "prev_pid == 5 || next_pid == 5 || prev_pid == 7 || next_pid == 7"
        );
        assert_eq!(filter(&l.wakeup, &l, &[5]), "pid == 5");
        assert_eq!(filter(&l.migrate, &l, &[5, 6]), "pid == 5 || pid == 6");
        // The longest filter fits in the page the kernel copies it into.
        let tids: Vec<u32> = (0..MAX_THREADS as u32).map(|i| 4_000_000 + i).collect();
        assert!(filter(&l.switch, &l, &tids).len() < 4096);
    }

    #[test]
    fn bad_configs_are_refused_before_touching_the_kernel() {
        assert!(matches!(
            Recorder::open(&RecorderConfig::new(vec![])),
            Err(TraceError::NoThreads)
        ));
        assert!(matches!(
            Recorder::open(&RecorderConfig::new((0..65).collect())),
            Err(TraceError::TooManyThreads { given: 65, .. })
        ));
    }
}
