//! The one error type of `tern-trace`.

use std::path::PathBuf;

pub type Result<T, E = TraceError> = std::result::Result<T, E>;

/// What tracing can refuse or fail at; each message says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The recording names no thread.
    #[error("nothing to trace: give at least one thread id (a VM's vCPU threads)")]
    NoThreads,
    /// More threads than one kernel filter can name.
    #[error(
        "{given} threads are more than one recording can filter (at most {max}); trace fewer vCPUs"
    )]
    TooManyThreads { given: usize, max: usize },
    /// As many recordings as the host allows at once are running.
    #[error("{0} traces are already recording on this host; wait for one to end")]
    Busy(usize),
    /// tracefs is not mounted and could not be mounted.
    #[error("tracefs is not available at {path} and mounting it failed: {reason} (run as root, or mount it: mount -t tracefs nodev {path})")]
    NoTracefs { path: PathBuf, reason: String },
    /// A tracepoint this recording needs is not in the kernel.
    #[error(
        "the kernel has no tracepoint {0} (needs CONFIG_TRACEPOINTS and the scheduler events)"
    )]
    MissingTracepoint(String),
    /// A tracepoint's format file is not what tern can read.
    #[error("tracepoint {tracepoint}: unexpected record layout: {reason}")]
    Format { tracepoint: String, reason: String },
    /// `perf_event_open` or one of its ioctls failed.
    #[error("perf_event_open for {what}: {source} (needs root or kernel.perf_event_paranoid <= -1 for tracepoints of other processes)")]
    Perf {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Reading a file (tracefs, sysfs) failed.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing the trace failed.
    #[error("writing the trace: {0}")]
    Write(String),
}
