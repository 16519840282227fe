//! Scheduler tracing of a VM's vCPU threads: which physical CPU ran which vCPU, when,
//! and for how long a vCPU waited for one.
//!
//! A recording is a stream of typed scheduler events ([`SchedEvent`]); pure functions
//! turn it into each thread's states over time ([`Timeline`]), a [`Summary`] (run,
//! steal and sleep time, migrations, how much of the time a VM's vCPUs ran together)
//! and a Chrome/Perfetto trace file. Only the recorder touches the kernel.
//!
//! ```text
//! Recorder (perf_event_open, per-CPU rings) ──► HostTrace ──► timeline() ──► Timeline
//!                                                                  │             │
//!                                                  summarize() ◄───┘   chrome::write()
//! ```
//!
//! # Layout
//! - [`model`]: events and the host recording ([`HostTrace`]; wire types from
//!   `tern_api::trace`), the vCPU-thread map.
//! - [`format`]: tracepoint record layouts parsed from tracefs, and the record decoder.
//! - [`timeline`]: events → per-thread spans (running on a CPU, runnable, sleeping) and
//!   migrations; time conserved, CPUs never double-booked.
//! - [`summary`]: per-thread, per-CPU and per-VM totals from a timeline.
//! - [`chrome`]: the Chrome trace event format writer (one track per CPU and per vCPU).
//! - [`packed`]: the guest's events as 24-byte binary records on the control channel.
//! - [`collect`]: a guest recording assembled from its chunks, on the host's clock.
//! - [`clock`]: guest↔host clock alignment from timestamp exchanges.
//! - [`merge`]: guest processes on vCPUs over vCPUs on cores: per-process run time,
//!   vCPU migrations and double-scheduling delay.
//! - [`tracefs`]: finding (mounting) tracefs, reading formats, the online CPUs.
//! - [`recorder`]: the `perf_event_open` recorder with kernel-side thread filters.
//! - [`raw`]: any tracepoints of every thread, records left undecoded for the caller.
//! - [`error`]: the crate's error type, [`TraceError`].

pub mod chrome;
pub mod clock;
pub mod collect;
pub mod error;
pub mod format;
pub mod merge;
pub mod model;
pub mod packed;
pub mod raw;
pub mod recorder;
pub mod summary;
pub mod timeline;
pub mod tracefs;

pub use error::{Result, TraceError};
pub use model::{ClockAlignment, EventKind, GuestTrace, HostTrace, SchedEvent, VcpuMap, VmTrace};
pub use recorder::{record, record_until, Recorder, RecorderConfig};
pub use summary::{summarize, Counts, Summary};
pub use timeline::{timeline, Migration, Span, State, Timeline};

/// The timeline and summary of a host recording; `vcpus` names the vCPU threads.
pub fn analyse(trace: &HostTrace, vcpus: &VcpuMap) -> (Timeline, Summary) {
    let tl = timeline(trace.start_ns, trace.end_ns, &trace.tids, &trace.events);
    let counts = Counts {
        events: trace.events.len() as u64,
        lost: trace.lost,
        dropped: trace.dropped,
    };
    let summary = summarize(&tl, vcpus, counts);
    (tl, summary)
}
