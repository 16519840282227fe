//! The wire protocol between the host and `tern-guest`: one JSON object per line in
//! each direction, over a virtio-serial port (or a second UART).
//!
//! ```text
//!  host                                           guest (tern-guest)
//!   │ {"id":1,"cmd":"ping"}                   ──►  │
//!   │ ◄── {"id":1,"ok":true,"result":{"kind":"pong",...}}
//!   │ {"id":2,"cmd":"start","workload":"memdirty --mib 128 --mbps 50"} ──►
//!   │ ◄── {"id":2,"ok":true,"result":{"kind":"started","workload":"memdirty"}}
//!   │ {"id":3,"cmd":"verify"}                 ──►  │
//!   │ ◄── {"id":3,"ok":true,"result":{"kind":"verify","counter":..,"checksum":..,"expected":..,"ok":true}}
//! ```
//!
//! Every request carries an `id` that the answer repeats, so a host that timed out
//! on one request can skip its late answer. A workload may be given as an object
//! (`{"kind":"memdirty","mib":128,"mbps":50}`) or as the command line a person would
//! type (`"memdirty --mib 128 --mbps 50"`).

use serde::{Deserialize, Serialize};

/// The verifier's writes per second when the host does not say: slow enough to cost
/// nothing under TCG, fast enough that the counter visibly moves within a second.
pub const DEFAULT_VERIFIER_PAGES_PER_SEC: f64 = 200.0;

/// `diskverify`'s block writes per second when the host does not say.
pub const DEFAULT_DISKVERIFY_BLOCKS_PER_SEC: f64 = 50.0;

/// The disk `diskverify` and `disk-check` use when the host does not say: the VM's
/// first virtio disk.
pub const DEFAULT_DISK_DEVICE: &str = "/dev/vda";

/// Most threads a `barrier` workload may meet with (a guest has at most 64 vCPUs).
pub const MAX_BARRIER_THREADS: u32 = 64;

/// Most threads a `wakeup` ring may have.
pub const MAX_WAKEUP_THREADS: u32 = 256;

/// A workload the guest cannot run as given; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError(pub String);

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SpecError {}

/// One request from the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// Echoed in the response; lets the host match answers to questions.
    #[serde(default)]
    pub id: u64,
    #[serde(flatten)]
    pub command: Command,
}

/// What the host asks the guest to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = GuestRequest))]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// Liveness check; answers with the agent version and uptime.
    Ping,
    /// Uptime, load, memory and the running workloads.
    Status,
    /// Starts a workload; a running workload of the same kind is replaced.
    Start {
        /// A command line like `memdirty --mib 128 --mbps 50`, or the workload as an object.
        #[serde(with = "spec_text_or_object")]
        #[cfg_attr(feature = "openapi", schema(value_type = Object))]
        workload: WorkloadSpec,
    },
    /// Stops the workload of the given kind (`memdirty`, `cpu`, `barrier`, `wakeup`,
    /// `echo-server`, `verifier`, `diskverify`, `batch`, `service`).
    Stop { workload: String },
    /// The verifier's counter and its checksum against the expected content.
    Verify,
    /// Reads back the `diskverify` pattern from the disk itself (bypassing the guest's
    /// page cache) and counts the blocks that differ from what its counter implies.
    /// `device` and `mib` default to those of the `diskverify` started in this boot;
    /// after a reboot they must be given.
    DiskCheck {
        #[serde(default)]
        device: Option<String>,
        #[serde(default)]
        mib: Option<u64>,
    },
    /// Scans the kernel log for oopses, panics, BUGs and corruption reports.
    Health,
    /// Powers the guest off (QEMU exits when the guest does).
    Poweroff,
    /// Fault injection for tests of guest health: after answering, the guest kernel
    /// panics (`c` written to `/proc/sysrq-trigger`).
    Panic,
    /// Fault injection for tests of guest health: after answering, the guest hangs: a
    /// real-time busy loop on every CPU (with the kernel's real-time throttling off)
    /// starves every other process, this agent included, until the guest is reset.
    Hang,
    /// Starts recording the guest kernel's scheduler events of every process. The
    /// recording stops by itself when no `trace_read` came for `idle_stop_ms` (the host
    /// went away) and keeps at most `max_records` unread records (the rest are counted
    /// as dropped).
    TraceStart {
        #[serde(default = "default_trace_buffer")]
        max_records: u64,
        #[serde(default = "default_trace_idle_stop_ms")]
        idle_stop_ms: u64,
    },
    /// Takes at most `max_records` of the records recorded so far.
    TraceRead {
        #[serde(default = "default_trace_read")]
        max_records: u64,
    },
    /// Stops the recording; unread records are discarded.
    TraceStop,
    /// The guest's `CLOCK_MONOTONIC` on receipt and on answering (clock alignment).
    Clock,
    /// Moves the agent's threads whose names start with `threads` to one vCPU
    /// (`sched_setaffinity`, as `taskset` does; a workload's threads are named after it:
    /// `cpu-0`, `cpu-1`); answers the guest time it happened.
    Affinity { threads: String, cpu: u32 },
    /// Every process's taint class and why (which fd, which peer): external, dependent
    /// on an external one, untainted, or exempt (the kernel's threads, init, this agent).
    Taint,
    /// Freezes every untainted process in the guest's cgroup freezer and tracks taint
    /// from kernel events until `thaw`: a process that becomes tainted while frozen (a
    /// tainted process comes to depend on it) is thawed at once. A `freeze` while frozen
    /// renews the deadline. When `deadline_ms` pass with neither, the guest thaws
    /// everything by itself (the host that froze it is gone).
    Freeze {
        #[serde(default = "default_freeze_deadline_ms")]
        deadline_ms: u64,
    },
    /// Thaws every process `freeze` froze; answers what was frozen and for how long.
    Thaw,
}

/// How long a guest stays frozen without hearing from its host, by default.
pub const DEFAULT_FREEZE_DEADLINE_MS: u64 = 30_000;
/// The longest freeze deadline a host may ask for.
pub const MAX_FREEZE_DEADLINE_MS: u64 = 600_000;

fn default_freeze_deadline_ms() -> u64 {
    DEFAULT_FREEZE_DEADLINE_MS
}

/// Most unread guest trace records kept by default (24 bytes each: 48 MiB).
pub const DEFAULT_TRACE_BUFFER: u64 = 2_000_000;
/// The most a `trace_start` may ask to keep.
pub const MAX_TRACE_BUFFER: u64 = 8_000_000;
/// Records per `trace_read` by default (about 1 MiB of base64 per line).
pub const DEFAULT_TRACE_READ: u64 = 32_768;

fn default_trace_buffer() -> u64 {
    DEFAULT_TRACE_BUFFER
}
fn default_trace_idle_stop_ms() -> u64 {
    10_000
}
fn default_trace_read() -> u64 {
    DEFAULT_TRACE_READ
}

/// A workload the agent can run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum WorkloadSpec {
    /// Rewrites a working set of `mib` MiB at `mbps` MB/s (10^6 bytes) of pages.
    Memdirty { mib: u64, mbps: f64 },
    /// Keeps `threads` threads busy `percent` % of the time each.
    Cpu {
        percent: f64,
        #[serde(default = "one")]
        threads: u32,
    },
    /// A TCP echo server on `port` (all addresses).
    EchoServer { port: u16 },
    /// `threads` threads meeting at a spin barrier in a loop; the rate is barriers/s.
    Barrier {
        #[serde(default = "two")]
        threads: u32,
    },
    /// `threads` threads in a ring passing one token: each sleeps until the token reaches
    /// it and then wakes the next; the rate is handoffs/s.
    Wakeup {
        #[serde(default = "four")]
        threads: u32,
    },
    /// Writes counter-derived content into `mib` MiB at `pages_per_sec` pages/s.
    Verifier {
        mib: u64,
        #[serde(default = "default_verifier_rate")]
        pages_per_sec: f64,
    },
    /// Writes counter-derived 4 KiB blocks into the first `mib` MiB of the block device
    /// `device`, `blocks_per_sec` blocks/s, each write direct and synchronous (durable
    /// when counted); `disk-check` reads them back.
    Diskverify {
        #[serde(default = "default_disk_device")]
        device: String,
        mib: u64,
        #[serde(default = "default_diskverify_rate")]
        blocks_per_sec: f64,
    },
    /// A batch job in a process of its own: rewrites `mib` MiB in order at `mbps` MB/s
    /// with content derived from its pass counter, and checks every page before it
    /// rewrites it (the page must hold what the previous pass wrote), so memory that a
    /// migration or a freeze got wrong shows up as an error. Being a separate process
    /// that talks to nothing outside the guest, a dependency-aware migration may freeze
    /// it.
    Batch { mib: u64, mbps: f64 },
    /// A TCP echo service on `port` (all addresses) in a process of its own: a process
    /// with peers outside the guest, which a dependency-aware migration keeps running.
    Service { port: u16 },
}

fn default_disk_device() -> String {
    DEFAULT_DISK_DEVICE.to_string()
}

fn default_diskverify_rate() -> f64 {
    DEFAULT_DISKVERIFY_BLOCKS_PER_SEC
}

/// Checks a block device path given to the guest: under `/dev/`, one word.
pub fn check_device(device: &str) -> Result<(), SpecError> {
    let ok = device.starts_with("/dev/")
        && device.len() > 5
        && !device.contains("..")
        && !device.chars().any(char::is_whitespace);
    if !ok {
        return Err(SpecError(format!(
            "diskverify: --device {device:?} must be a block device under /dev/, e.g. {DEFAULT_DISK_DEVICE}"
        )));
    }
    Ok(())
}

fn one() -> u32 {
    1
}

fn two() -> u32 {
    2
}

fn four() -> u32 {
    4
}

fn default_verifier_rate() -> f64 {
    DEFAULT_VERIFIER_PAGES_PER_SEC
}

impl WorkloadSpec {
    /// The name under which the workload runs and is stopped.
    pub fn name(&self) -> &'static str {
        match self {
            WorkloadSpec::Memdirty { .. } => "memdirty",
            WorkloadSpec::Cpu { .. } => "cpu",
            WorkloadSpec::EchoServer { .. } => "echo-server",
            WorkloadSpec::Verifier { .. } => "verifier",
            WorkloadSpec::Barrier { .. } => "barrier",
            WorkloadSpec::Wakeup { .. } => "wakeup",
            WorkloadSpec::Diskverify { .. } => "diskverify",
            WorkloadSpec::Batch { .. } => "batch",
            WorkloadSpec::Service { .. } => "service",
        }
    }

    /// Rejects values a workload cannot run with (zero sizes, rates out of range).
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError(m));
        match *self {
            WorkloadSpec::Diskverify {
                ref device,
                mib,
                blocks_per_sec,
            } => {
                check_device(device)?;
                if mib == 0 {
                    return bad("diskverify: --mib must be at least 1".into());
                }
                if !(blocks_per_sec.is_finite() && blocks_per_sec > 0.0) {
                    return bad(format!(
                        "diskverify: --blocks-per-sec must be > 0, got {blocks_per_sec}"
                    ));
                }
            }
            WorkloadSpec::Memdirty { mib, mbps } | WorkloadSpec::Batch { mib, mbps } => {
                let kind = self.name();
                if mib == 0 {
                    return bad(format!("{kind}: --mib must be at least 1"));
                }
                if !(mbps.is_finite() && mbps >= 0.0) {
                    return bad(format!("{kind}: --mbps must be a rate >= 0, got {mbps}"));
                }
            }
            WorkloadSpec::Cpu { percent, threads } => {
                if !(0.0..=100.0).contains(&percent) {
                    return bad(format!(
                        "cpu: --percent must be within 0..=100, got {percent}"
                    ));
                }
                if threads == 0 {
                    return bad("cpu: --threads must be at least 1".into());
                }
            }
            WorkloadSpec::Barrier { threads } => {
                if !(2..=MAX_BARRIER_THREADS).contains(&threads) {
                    return bad(format!(
                        "barrier: --threads must be within 2..={MAX_BARRIER_THREADS}, got {threads}"
                    ));
                }
            }
            WorkloadSpec::Wakeup { threads } => {
                if !(2..=MAX_WAKEUP_THREADS).contains(&threads) {
                    return bad(format!(
                        "wakeup: --threads must be within 2..={MAX_WAKEUP_THREADS}, got {threads}"
                    ));
                }
            }
            WorkloadSpec::EchoServer { port } | WorkloadSpec::Service { port } => {
                if port == 0 {
                    return bad(format!("{}: --port must be 1..=65535", self.name()));
                }
            }
            WorkloadSpec::Verifier { mib, pages_per_sec } => {
                if mib == 0 {
                    return bad("verifier: --mib must be at least 1".into());
                }
                if !(pages_per_sec.is_finite() && pages_per_sec > 0.0) {
                    return bad(format!(
                        "verifier: --pages-per-sec must be > 0, got {pages_per_sec}"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Parses the command-line form, e.g. `memdirty --mib 128 --mbps 50`.
    pub fn parse_args(text: &str) -> Result<WorkloadSpec, SpecError> {
        let mut words = text.split_whitespace();
        let kind = words
            .next()
            .ok_or_else(|| SpecError("empty workload".into()))?;
        let mut flags: Vec<(String, String)> = Vec::new();
        while let Some(flag) = words.next() {
            let (name, value) = match flag.strip_prefix("--") {
                Some(f) if f.contains('=') => {
                    let (n, v) = f.split_once('=').unwrap_or((f, ""));
                    (n.to_string(), v.to_string())
                }
                Some(f) => {
                    let v = words
                        .next()
                        .ok_or_else(|| SpecError(format!("{kind}: --{f} needs a value")))?;
                    (f.to_string(), v.to_string())
                }
                None => {
                    return Err(SpecError(format!(
                        "{kind}: unexpected word {flag:?}; flags look like --name VALUE"
                    )))
                }
            };
            flags.push((name, value));
        }
        let spec = match kind {
            "memdirty" => {
                let mut f = Flags::new(kind, flags, &["mib", "mbps"])?;
                WorkloadSpec::Memdirty {
                    mib: f.required("mib")?,
                    mbps: f.required("mbps")?,
                }
            }
            "batch" => {
                let mut f = Flags::new(kind, flags, &["mib", "mbps"])?;
                WorkloadSpec::Batch {
                    mib: f.required("mib")?,
                    mbps: f.required("mbps")?,
                }
            }
            "service" => {
                let mut f = Flags::new(kind, flags, &["port"])?;
                WorkloadSpec::Service {
                    port: f.required("port")?,
                }
            }
            "cpu" => {
                let mut f = Flags::new(kind, flags, &["percent", "threads"])?;
                WorkloadSpec::Cpu {
                    percent: f.required("percent")?,
                    threads: f.optional("threads")?.unwrap_or(1),
                }
            }
            "barrier" => {
                let mut f = Flags::new(kind, flags, &["threads"])?;
                WorkloadSpec::Barrier {
                    threads: f.optional("threads")?.unwrap_or(2),
                }
            }
            "wakeup" => {
                let mut f = Flags::new(kind, flags, &["threads"])?;
                WorkloadSpec::Wakeup {
                    threads: f.optional("threads")?.unwrap_or(4),
                }
            }
            "echo-server" => {
                let mut f = Flags::new(kind, flags, &["port"])?;
                WorkloadSpec::EchoServer {
                    port: f.required("port")?,
                }
            }
            "verifier" => {
                let mut f = Flags::new(kind, flags, &["mib", "pages-per-sec"])?;
                WorkloadSpec::Verifier {
                    mib: f.required("mib")?,
                    pages_per_sec: f
                        .optional("pages-per-sec")?
                        .unwrap_or(DEFAULT_VERIFIER_PAGES_PER_SEC),
                }
            }
            "diskverify" => {
                let mut f = Flags::new(kind, flags, &["device", "mib", "blocks-per-sec"])?;
                WorkloadSpec::Diskverify {
                    device: f.optional("device")?.unwrap_or_else(default_disk_device),
                    mib: f.required("mib")?,
                    blocks_per_sec: f
                        .optional("blocks-per-sec")?
                        .unwrap_or(DEFAULT_DISKVERIFY_BLOCKS_PER_SEC),
                }
            }
            other => {
                return Err(SpecError(format!(
                "unknown workload {other:?}; known: memdirty, cpu, barrier, wakeup, echo-server, verifier, diskverify, batch, service"
            )))
            }
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The command-line form, the inverse of [`WorkloadSpec::parse_args`].
    pub fn to_args(&self) -> String {
        match self {
            WorkloadSpec::Memdirty { mib, mbps } => format!("memdirty --mib {mib} --mbps {mbps}"),
            WorkloadSpec::Cpu { percent, threads } => {
                format!("cpu --percent {percent} --threads {threads}")
            }
            WorkloadSpec::EchoServer { port } => format!("echo-server --port {port}"),
            WorkloadSpec::Batch { mib, mbps } => format!("batch --mib {mib} --mbps {mbps}"),
            WorkloadSpec::Service { port } => format!("service --port {port}"),
            WorkloadSpec::Barrier { threads } => format!("barrier --threads {threads}"),
            WorkloadSpec::Wakeup { threads } => format!("wakeup --threads {threads}"),
            WorkloadSpec::Verifier { mib, pages_per_sec } => {
                format!("verifier --mib {mib} --pages-per-sec {pages_per_sec}")
            }
            WorkloadSpec::Diskverify {
                device,
                mib,
                blocks_per_sec,
            } => format!(
                "diskverify --device {device} --mib {mib} --blocks-per-sec {blocks_per_sec}"
            ),
        }
    }
}

/// The flags of one workload, checked against the names it accepts.
struct Flags {
    kind: String,
    flags: Vec<(String, String)>,
}

impl Flags {
    fn new(kind: &str, flags: Vec<(String, String)>, known: &[&str]) -> Result<Flags, SpecError> {
        if let Some((name, _)) = flags.iter().find(|(n, _)| !known.contains(&n.as_str())) {
            let list: Vec<String> = known.iter().map(|k| format!("--{k}")).collect();
            return Err(SpecError(format!(
                "{kind}: unknown flag --{name}; it takes {}",
                list.join(", ")
            )));
        }
        Ok(Flags {
            kind: kind.to_string(),
            flags,
        })
    }

    fn optional<T: std::str::FromStr>(&mut self, name: &str) -> Result<Option<T>, SpecError> {
        let Some(pos) = self.flags.iter().position(|(n, _)| n == name) else {
            return Ok(None);
        };
        let (_, value) = self.flags.remove(pos);
        value
            .parse()
            .map(Some)
            .map_err(|_| SpecError(format!("{}: --{name} {value:?} is not a number", self.kind)))
    }

    fn required<T: std::str::FromStr>(&mut self, name: &str) -> Result<T, SpecError> {
        self.optional(name)?
            .ok_or_else(|| SpecError(format!("{}: --{name} is required", self.kind)))
    }
}

/// Accepts a workload as its command-line text or as a tagged object; writes the object.
mod spec_text_or_object {
    use super::WorkloadSpec;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Object(WorkloadSpec),
    }

    pub fn serialize<S: Serializer>(spec: &WorkloadSpec, s: S) -> Result<S::Ok, S::Error> {
        spec.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<WorkloadSpec, D::Error> {
        let spec = match Either::deserialize(d)? {
            Either::Text(t) => WorkloadSpec::parse_args(&t).map_err(serde::de::Error::custom)?,
            Either::Object(o) => o,
        };
        spec.validate().map_err(serde::de::Error::custom)?;
        Ok(spec)
    }
}

/// One answer from the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Reply>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn success(id: u64, reply: Reply) -> Response {
        Response {
            id,
            ok: true,
            result: Some(reply),
            error: None,
        }
    }

    pub fn failure(id: u64, error: impl std::fmt::Display) -> Response {
        Response {
            id,
            ok: false,
            result: None,
            error: Some(error.to_string()),
        }
    }
}

/// The payload of a successful answer, tagged by `kind`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    Pong {
        version: String,
        uptime_s: f64,
    },
    Status(Status),
    Started {
        workload: String,
    },
    Stopped {
        workload: String,
    },
    Verify(VerifyReport),
    DiskCheck(DiskReport),
    Health(HealthReport),
    PoweringOff,
    Panicking,
    /// The guest hangs on its `cpus` CPUs once this answer is out.
    Hanging {
        cpus: u32,
    },
    TraceStarted {
        /// Guest vCPUs recorded (guest CPU n is vCPU n).
        cpus: Vec<u32>,
        start_ns: u64,
    },
    TraceChunk(TraceChunk),
    TraceStopped,
    /// Threads moved by `affinity`, and the guest time just before the first move.
    Moved {
        time_ns: u64,
        threads: Vec<u32>,
    },
    /// `recv_ns`/`send_ns`: the guest's `CLOCK_MONOTONIC` on taking the request and on
    /// answering it.
    Clock {
        recv_ns: u64,
        send_ns: u64,
    },
    Taint(TaintReport),
    Frozen(FreezeReport),
    Thawed(ThawReport),
}

/// A process's standing for dependency-aware migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TaintClass {
    /// Talks to the world outside the VM: a socket with a non-loopback peer, or a
    /// listener that accepted one.
    External,
    /// Shares a pipe, unix socket, shared memory or a file open for writing with an
    /// external process (transitively), or descends from a tainted one.
    Dependent,
    /// Nothing outside the VM can observe it: frozen during a dependency-aware move.
    Untainted,
    /// Never frozen: kernel threads, init, the guest agent itself.
    Exempt,
}

/// Through what a process got its taint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DependencyKind {
    /// A connected network socket whose peer is not loopback.
    NetworkPeer,
    /// A listening socket that accepted a non-loopback peer.
    Listener,
    Pipe,
    UnixSocket,
    /// A TCP or UDP socket connected over loopback to another process's socket (or
    /// waiting in its listener's queue).
    LoopbackSocket,
    SharedMemory,
    /// A file open for writing that a tainted process also has open.
    File,
    /// Inherited from the parent at fork.
    Parent,
    /// A tainted process waited on it while it was frozen (a pipe or socket to it filled).
    WaitedOn,
}

/// One reason a process is tainted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaintReason {
    pub kind: DependencyKind,
    /// The process's own fd that carries the dependency, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    /// The other end: a network address (`10.0.0.9:41234`), a path, or `pipe:[INODE]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The tainted process this one depends on (absent for external processes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_pid: Option<u32>,
    /// From the kernel event that created the dependency to the tracker marking it,
    /// when an event (not the start-up scan) found it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
}

/// One process as the taint tracker sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProcessTaint {
    pub pid: u32,
    pub ppid: u32,
    pub comm: String,
    pub class: TaintClass,
    /// In the freezer now.
    #[serde(default)]
    pub frozen: bool,
    /// Empty for untainted and exempt processes.
    #[serde(default)]
    pub reasons: Vec<TaintReason>,
}

/// The guest's answer to `taint`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaintReport {
    /// Kernel events keep the classification current (a freeze is under way); otherwise
    /// the report is a scan taken for this answer.
    pub event_driven: bool,
    /// Processes are frozen now.
    pub frozen: bool,
    /// Until the guest thaws by itself, when frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_left_ms: Option<u64>,
    /// Kernel events handled, and those the kernel could not deliver (then the tracker
    /// rescanned, so nothing was missed for long).
    #[serde(default)]
    pub events: u64,
    #[serde(default)]
    pub lost_events: u64,
    pub processes: Vec<ProcessTaint>,
    /// How the last freeze ended, once one has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_thaw: Option<ThawReport>,
}

/// The guest's answer to `freeze`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FreezeReport {
    /// Pids frozen now.
    pub frozen: Vec<u32>,
    /// Processes left running because they are tainted, and exempt ones.
    pub tainted: u32,
    pub exempt: u32,
    pub deadline_ms: u64,
    /// This `freeze` renewed a freeze already under way.
    pub renewed: bool,
}

/// Why a freeze ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ThawCause {
    /// The host asked (`thaw`).
    Host,
    /// The host went silent past the deadline.
    Deadline,
}

/// One process a freeze held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FrozenProcess {
    pub pid: u32,
    pub comm: String,
    /// How long it stayed frozen.
    pub frozen_ms: f64,
    /// Thawed before the end because it became tainted during the freeze.
    #[serde(default)]
    pub thawed_early: bool,
}

/// How a freeze ended: answered to `thaw`, and kept for `taint` as `last_thaw`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ThawReport {
    pub cause: ThawCause,
    /// Every process the freeze held, those thawed early included.
    pub processes: Vec<FrozenProcess>,
    /// From the freeze to its end.
    pub freeze_ms: f64,
}

/// Guest scheduler records taken from the guest agent's buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceChunk {
    /// Base64 of packed 24-byte records (`tern_trace::packed`), guest clock.
    pub data: String,
    pub records: u64,
    /// Records left in the buffer (read again soon).
    pub pending: u64,
    /// Since the recording started: records the guest kernel could not write, and
    /// records the agent's full buffer did not keep.
    pub lost: u64,
    pub dropped: u64,
    /// Names of threads first seen in this chunk.
    pub comms: Vec<(u32, String)>,
    /// The guest's clock when the chunk was taken.
    pub now_ns: u64,
}

/// A snapshot of the guest for `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub uptime_s: f64,
    /// 1, 5 and 15 minute load averages.
    pub load: [f64; 3],
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    pub workloads: Vec<WorkloadStatus>,
}

/// One workload's progress, as counted by the workload itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub name: String,
    /// The command line it was started with.
    pub spec: String,
    pub running: bool,
    pub seconds: f64,
    /// Pages written (memdirty, verifier, batch), busy milliseconds (cpu), barriers
    /// passed (barrier), handoffs (wakeup), bytes echoed (echo-server, service).
    pub work: u64,
    /// Work per second since the paced phase began (memdirty, batch: after the initial
    /// fill): MB/s for memdirty and batch, percent busy for cpu, pages/s for the
    /// verifier, barriers/s, handoffs/s, bytes/s echoed.
    pub rate: f64,
    /// `batch` only: pages found holding what the previous pass wrote when the job came
    /// to rewrite them. A page that held anything else is reported in `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The verifier's state: its counter and whether memory still holds what it wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerifyReport {
    /// Writes done so far; must keep growing across a migration.
    pub counter: u64,
    /// Checksum of the region as it is in memory now.
    pub checksum: u64,
    /// Checksum of the content the counter implies; differs from `checksum` if memory was lost.
    pub expected: u64,
    pub ok: bool,
    pub mib: u64,
    /// Pages whose content differs from what the counter implies (0 when `ok`).
    pub bad_pages: u64,
}

/// What `disk-check` read back from a disk `diskverify` writes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskReport {
    pub device: String,
    pub mib: u64,
    /// The newest write found on the disk (0: none).
    pub counter: u64,
    /// The writes `diskverify` counted as durable in this boot, when it ran; the disk
    /// must hold at least these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub written: Option<u64>,
    /// Blocks checked, and those whose content is not what `counter` implies (garbled,
    /// or older than they should be: a lost write).
    pub blocks: u64,
    pub bad_blocks: u64,
    /// No bad block and no durable write missing.
    pub ok: bool,
}

/// What the kernel log says about the guest's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HealthReport {
    pub ok: bool,
    pub lines_scanned: u64,
    /// Kernel log lines that report an oops, panic, BUG or corruption.
    pub findings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(line: &str) -> Request {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn simple_commands_parse() {
        assert_eq!(parse(r#"{"id":7,"cmd":"ping"}"#).command, Command::Ping);
        assert_eq!(parse(r#"{"id":7,"cmd":"ping"}"#).id, 7);
        assert_eq!(parse(r#"{"cmd":"verify"}"#).id, 0);
        assert_eq!(
            parse(r#"{"id":1,"cmd":"stop","workload":"cpu"}"#).command,
            Command::Stop {
                workload: "cpu".into()
            }
        );
    }

    #[test]
    fn workload_as_text_or_object() {
        let want = Command::Start {
            workload: WorkloadSpec::Memdirty {
                mib: 128,
                mbps: 50.0,
            },
        };
        let text = parse(r#"{"id":2,"cmd":"start","workload":"memdirty --mib 128 --mbps 50"}"#);
        let obj =
            parse(r#"{"id":2,"cmd":"start","workload":{"kind":"memdirty","mib":128,"mbps":50}}"#);
        assert_eq!(text.command, want);
        assert_eq!(obj.command, want);
    }

    #[test]
    fn bad_workloads_are_refused_with_a_reason() {
        let err = |t: &str| WorkloadSpec::parse_args(t).unwrap_err().to_string();
        assert!(err("memdirty --mib 0 --mbps 5").contains("--mib"));
        assert!(err("memdirty --mib 4").contains("--mbps is required"));
        assert!(err("memdirty --mib four --mbps 1").contains("not a number"));
        assert!(err("cpu --percent 150").contains("0..=100"));
        assert!(err("cpu --percent 10 --speed 3").contains("unknown flag --speed"));
        assert!(err("fork-bomb").contains("unknown workload"));
        assert!(err("echo-server --port").contains("needs a value"));
        assert!(err("barrier --threads 1").contains("2..=64"));
        assert!(err("barrier --threads 65").contains("2..=64"));
        assert!(err("wakeup --threads 1").contains("2..=256"));
        assert!(err("wakeup --threads 257").contains("2..=256"));
        assert!(err("wakeup --tokens 2").contains("unknown flag --tokens"));
        let line = r#"{"id":1,"cmd":"start","workload":{"kind":"memdirty","mib":0,"mbps":1}}"#;
        assert!(serde_json::from_str::<Request>(line).is_err());
        assert!(err("diskverify --mib 4 --device /etc/passwd").contains("/dev/"));
        assert!(err("diskverify --mib 4 --device /dev/../etc/x").contains("/dev/"));
        assert!(err("diskverify --mib 0").contains("--mib"));
        assert!(err("diskverify --mib 4 --blocks-per-sec 0").contains("> 0"));
        assert!(err("batch --mib 0 --mbps 5").contains("batch: --mib"));
        assert!(err("batch --mib 4 --mbps -1").contains("batch: --mbps"));
        assert!(err("batch --mib 4").contains("--mbps is required"));
        assert!(err("service --port 0").contains("service: --port"));
        assert!(err("service --port 80 --host x").contains("unknown flag --host"));
    }

    #[test]
    fn batch_and_service_parse() {
        assert_eq!(
            WorkloadSpec::parse_args("batch --mib 64 --mbps 90").unwrap(),
            WorkloadSpec::Batch {
                mib: 64,
                mbps: 90.0
            }
        );
        let line = r#"{"cmd":"start","workload":{"kind":"service","port":7000}}"#;
        assert_eq!(
            parse(line).command,
            Command::Start {
                workload: WorkloadSpec::Service { port: 7000 }
            }
        );
        assert_eq!(WorkloadSpec::Service { port: 7000 }.name(), "service");
    }

    #[test]
    fn diskverify_defaults_to_the_first_virtio_disk() {
        assert_eq!(
            WorkloadSpec::parse_args("diskverify --mib 4").unwrap(),
            WorkloadSpec::Diskverify {
                device: "/dev/vda".into(),
                mib: 4,
                blocks_per_sec: DEFAULT_DISKVERIFY_BLOCKS_PER_SEC,
            }
        );
        assert_eq!(
            parse(r#"{"cmd":"disk-check","mib":4}"#).command,
            Command::DiskCheck {
                device: None,
                mib: Some(4)
            }
        );
    }

    #[test]
    fn equals_form_and_defaults() {
        assert_eq!(
            WorkloadSpec::parse_args("barrier").unwrap(),
            WorkloadSpec::Barrier { threads: 2 }
        );
        assert_eq!(
            WorkloadSpec::parse_args("wakeup").unwrap(),
            WorkloadSpec::Wakeup { threads: 4 }
        );
        assert_eq!(
            WorkloadSpec::parse_args("cpu --percent=40").unwrap(),
            WorkloadSpec::Cpu {
                percent: 40.0,
                threads: 1
            }
        );
    }

    #[test]
    fn responses_round_trip() {
        let r = Response::success(
            3,
            Reply::Verify(VerifyReport {
                counter: 10,
                checksum: 5,
                expected: 5,
                ok: true,
                mib: 4,
                bad_pages: 0,
            }),
        );
        let line = serde_json::to_string(&r).unwrap();
        assert!(line.contains(r#""kind":"verify""#), "{line}");
        assert_eq!(serde_json::from_str::<Response>(&line).unwrap(), r);
        let f = Response::failure(4, "nope");
        let back: Response = serde_json::from_str(&serde_json::to_string(&f).unwrap()).unwrap();
        assert_eq!(back, f);
    }

    fn spec() -> impl Strategy<Value = WorkloadSpec> {
        prop_oneof![
            (1u64..4096, 0u32..100_000).prop_map(|(mib, r)| WorkloadSpec::Memdirty {
                mib,
                mbps: f64::from(r) / 100.0
            }),
            (0u32..=100, 1u32..8).prop_map(|(p, threads)| WorkloadSpec::Cpu {
                percent: f64::from(p),
                threads
            }),
            (1u16..=u16::MAX).prop_map(|port| WorkloadSpec::EchoServer { port }),
            (1u16..=u16::MAX).prop_map(|port| WorkloadSpec::Service { port }),
            (1u64..4096, 0u32..100_000).prop_map(|(mib, r)| WorkloadSpec::Batch {
                mib,
                mbps: f64::from(r) / 100.0
            }),
            (2u32..=MAX_BARRIER_THREADS).prop_map(|threads| WorkloadSpec::Barrier { threads }),
            (2u32..=MAX_WAKEUP_THREADS).prop_map(|threads| WorkloadSpec::Wakeup { threads }),
            (1u64..64, 1u32..10_000).prop_map(|(mib, r)| WorkloadSpec::Verifier {
                mib,
                pages_per_sec: f64::from(r)
            }),
            ("[a-z]{1,4}", 1u64..64, 1u32..10_000).prop_map(|(dev, mib, r)| {
                WorkloadSpec::Diskverify {
                    device: format!("/dev/{dev}"),
                    mib,
                    blocks_per_sec: f64::from(r),
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn args_round_trip(s in spec()) {
            prop_assert_eq!(WorkloadSpec::parse_args(&s.to_args()).unwrap(), s);
        }

        #[test]
        fn request_json_round_trips(s in spec(), id in any::<u64>()) {
            let req = Request { id, command: Command::Start { workload: s } };
            let line = serde_json::to_string(&req).unwrap();
            prop_assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), req);
        }

        #[test]
        fn arbitrary_text_never_panics(t in ".{0,80}") {
            let _ = WorkloadSpec::parse_args(&t);
            let _ = serde_json::from_str::<Request>(&t);
        }
    }
}
