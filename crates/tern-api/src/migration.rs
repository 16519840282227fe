//! The agent's migration endpoints (`/v1/migrations`, `/v1/incoming`): what a source
//! is asked and shows, what a destination prepares and reports, and the telemetry of
//! each pre-copy round both the engine and the model produce.
//!
//! A source migration walks these phases, each entered once, in order:
//!
//! ```text
//!  Preparing ─► Connecting ─► PreCopy ─► StopAndCopy ─► DeviceState ─► Resuming ─► Completed
//!      │            │            │            │              │             │
//!      └────────────┴────────────┴────┬───────┴──────────────┴─────────────┘
//!                                     ▼  any error, timeout or cancel
//!                               RolledBack (VM running on the source, destination cleaned)
//! ```

use serde::{Deserialize, Serialize};

use crate::agent::VmSpec;
use tern_model::VmName;

/// Where a source migration is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema), schema(as = MigrationPhase))]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Preparing,
    Connecting,
    PreCopy,
    StopAndCopy,
    DeviceState,
    Resuming,
    Completed,
    RolledBack,
}

impl Phase {
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Completed | Phase::RolledBack)
    }
}

/// A built-in pre-copy termination policy of tern's engine, by name (`tern-migrate`
/// holds what each decides). Names are read as `FromStr` does: case-insensitive, with
/// the aliases `qemu-rule` and `none`/`stop-and-copy`; written as [`PolicyKind::as_str`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// Stop when the remainder fits the downtime budget (QEMU's rule).
    Qemu,
    /// Xen's caps: 30 rounds, 3× memory, fewer than 50 dirty pages.
    Xen,
    /// Fragment-aware: hold back hot fragments, stop when rounds stop paying, throttle.
    #[default]
    Adaptive,
    /// No live rounds: pause and copy everything.
    StopCopy,
    /// The guest freezes its untainted processes (those nothing outside the VM depends
    /// on) for the pre-copy, so their memory is sent once; the rest is pre-copied under
    /// the adaptive rules. Falls back to `adaptive` when the guest agent does not answer.
    DependencyAware,
}

impl PolicyKind {
    /// Every built-in policy, in a stable order.
    pub const ALL: [PolicyKind; 5] = [
        PolicyKind::Qemu,
        PolicyKind::Xen,
        PolicyKind::Adaptive,
        PolicyKind::StopCopy,
        PolicyKind::DependencyAware,
    ];

    /// The canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::Qemu => "qemu",
            PolicyKind::Xen => "xen",
            PolicyKind::Adaptive => "adaptive",
            PolicyKind::StopCopy => "stop-copy",
            PolicyKind::DependencyAware => "dependency-aware",
        }
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy name that no policy answers to; the message lists those that do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownPolicy(pub String);

impl std::fmt::Display for UnknownPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "unknown migration policy `{}`: use one of qemu (alias qemu-rule), xen, adaptive, stop-copy (alias none), dependency-aware",
            self.0
        )
    }
}

impl std::error::Error for UnknownPolicy {}

impl std::str::FromStr for PolicyKind {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "qemu" | "qemu-rule" => Ok(PolicyKind::Qemu),
            "xen" => Ok(PolicyKind::Xen),
            "adaptive" => Ok(PolicyKind::Adaptive),
            "stop-copy" | "stop-and-copy" | "none" => Ok(PolicyKind::StopCopy),
            "dependency-aware" => Ok(PolicyKind::DependencyAware),
            _ => Err(UnknownPolicy(s.to_owned())),
        }
    }
}

/// Read as [`FromStr`](std::str::FromStr) reads it, so the wire takes the aliases the
/// command line does and a wrong name is refused with the list of right ones.
impl<'de> Deserialize<'de> for PolicyKind {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// What moves a migration's memory, by the name `SendRequest.policy` takes and views
/// and results carry: tern's engine under a termination policy, or QEMU's own migration
/// of the whole VM (`qemu-native`; `qemu-native-auto-converge` with QEMU's
/// auto-converge on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MigrationEngine {
    Tern(PolicyKind),
    QemuNative { auto_converge: bool },
}

impl Default for MigrationEngine {
    fn default() -> Self {
        MigrationEngine::Tern(PolicyKind::Adaptive)
    }
}

impl MigrationEngine {
    /// The phases a source migration walks with this engine, in order.
    pub fn phases(self) -> &'static [Phase] {
        match self {
            MigrationEngine::Tern(_) => &[
                Phase::Preparing,
                Phase::Connecting,
                Phase::PreCopy,
                Phase::StopAndCopy,
                Phase::DeviceState,
                Phase::Resuming,
            ],
            // QEMU's migration covers the live rounds, the stop and the device state.
            MigrationEngine::QemuNative { .. } => {
                &[Phase::Preparing, Phase::PreCopy, Phase::Resuming]
            }
        }
    }

    /// The name the wire carries.
    pub fn name(self) -> &'static str {
        match self {
            MigrationEngine::Tern(p) => p.as_str(),
            MigrationEngine::QemuNative {
                auto_converge: false,
            } => "qemu-native",
            MigrationEngine::QemuNative {
                auto_converge: true,
            } => "qemu-native-auto-converge",
        }
    }
}

impl std::fmt::Display for MigrationEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// An engine name that is neither a policy nor QEMU's migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownEngine(pub String);

impl std::fmt::Display for UnknownEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}, or qemu-native", UnknownPolicy(self.0.clone()))
    }
}

impl std::error::Error for UnknownEngine {}

impl std::str::FromStr for MigrationEngine {
    type Err = UnknownEngine;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "qemu-native" => Ok(MigrationEngine::QemuNative {
                auto_converge: false,
            }),
            "qemu-native-auto-converge" => Ok(MigrationEngine::QemuNative {
                auto_converge: true,
            }),
            _ => s
                .parse()
                .map(MigrationEngine::Tern)
                .map_err(|_| UnknownEngine(s.to_owned())),
        }
    }
}

impl Serialize for MigrationEngine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for MigrationEngine {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = std::borrow::Cow::<'de, str>::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for MigrationEngine {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        let names = PolicyKind::ALL
            .iter()
            .map(|p| p.as_str())
            .chain(["qemu-native", "qemu-native-auto-converge"]);
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(names))
            .description(Some(
                "tern's engine under a termination policy (aliases: qemu-rule, none), or \
                 QEMU's own migration of the whole VM",
            ))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for MigrationEngine {}

/// `POST /v1/migrations`: move `vm` from this host to the agent at `destination`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z0-9][a-z0-9-]{0,47}$"))]
    pub vm: VmName,
    /// The destination agent's base URL, e.g. `http://198.18.0.2:7070`.
    pub destination: String,
    /// The destination agent's bearer token.
    pub token: String,
    /// `xen`, `qemu` (alias `qemu-rule`), `adaptive` or `stop-copy` for tern's engine;
    /// `qemu-native` for QEMU's own migration of the whole VM (the benchmark's peer).
    #[serde(default)]
    pub policy: MigrationEngine,
    #[serde(default)]
    pub options: SendOptions,
}

/// The largest bandwidth cap a migration takes, in Mbit/s (10 Tbit/s): far above any
/// link, and small enough that the cap in bytes per second cannot overflow.
pub const MAX_MBIT: u64 = 10_000_000;

/// Tuning of one migration; every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields, default)]
pub struct SendOptions {
    /// Parallel memory streams.
    pub streams: u16,
    /// LZ4-compress page batches where that shrinks them.
    pub compress: bool,
    /// Bandwidth cap in Mbit/s; absent: as fast as the link allows.
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 10000000))]
    pub max_mbit: Option<u64>,
    /// The downtime the policy aims for.
    pub downtime_limit_ms: u64,
    /// Live rounds end (not converged) after this long; for `qemu-native`, the
    /// migration is cancelled (VM stays here) after this long.
    pub max_precopy_s: f64,
    /// `qemu-native` only: QEMU's `auto-converge` capability.
    pub auto_converge: bool,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            streams: 2,
            compress: false,
            max_mbit: None,
            downtime_limit_ms: 300,
            max_precopy_s: 60.0,
            auto_converge: false,
        }
    }
}

impl SendOptions {
    /// Checks ranges; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=16).contains(&self.streams) {
            return Err(format!(
                "options.streams must be 1..=16, got {}",
                self.streams
            ));
        }
        if let Some(m) = self.max_mbit.filter(|m| !(1..=MAX_MBIT).contains(m)) {
            return Err(format!(
                "options.max_mbit must be 1..={MAX_MBIT} (omit it for no cap), got {m}"
            ));
        }
        if !(1..=60_000).contains(&self.downtime_limit_ms) {
            return Err(format!(
                "options.downtime_limit_ms must be 1..=60000, got {}",
                self.downtime_limit_ms
            ));
        }
        if !(self.max_precopy_s > 0.0 && self.max_precopy_s <= 3600.0) {
            return Err(format!(
                "options.max_precopy_s must be in (0, 3600], got {}",
                self.max_precopy_s
            ));
        }
        Ok(())
    }
}

/// `POST /v1/migrations/incoming`: the destination prepares to receive `vm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    #[cfg_attr(feature = "openapi", schema(value_type = String, pattern = "^[a-z0-9][a-z0-9-]{0,47}$"))]
    pub vm: VmName,
    pub spec: VmSpec,
    /// QEMU carries the memory itself (no tern memory streams, no `x-ignore-shared`).
    #[serde(default)]
    pub native: bool,
    /// The VM's vCPU policy on the source: the destination applies it once the VM runs
    /// there. Left out when `none`, so a destination that predates it takes the request.
    #[serde(default, skip_serializing_if = "crate::vcpu::VcpuPolicy::is_none")]
    pub vcpu_policy: crate::vcpu::VcpuPolicy,
}

/// The destination's answer to a prepare: where to send memory and device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Ticket {
    pub migration: String,
    /// Secret every stream of this migration must present in its `Hello`: 32 random
    /// bytes, hex encoded.
    pub stream_token: String,
    /// The port tern's memory streams connect to (0 for `qemu-native`, which has none).
    pub memory_port: u16,
    /// The port of the device-state stream that carries QEMU's migration stream; the
    /// same listener as `memory_port`. No QEMU listens on the network.
    pub device_port: u16,
    /// For a VM with local disks: the port of the destination QEMU's NBD server, which
    /// exports the new overlays to the source's block mirror over TLS with the cluster
    /// CA (both ends present host certificates; only the source's is let in).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd_port: Option<u16>,
}

/// The result of a finished migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MigrationResult {
    /// From the request to the guest running whole on the destination: resumed, and
    /// thawed there when `dependency-aware` froze part of it. Destroying the stale copy
    /// on the source comes after (`cleanup_ms`), as QEMU's own total ends before its
    /// source process is ended.
    pub total_ms: u64,
    /// From pausing the source to the destination running.
    pub downtime_ms: u64,
    /// From the destination running to the source's copy destroyed and its memory
    /// freed; the migration's answer waits for it, its `total_ms` does not.
    #[serde(default)]
    pub cleanup_ms: u64,
    /// Bytes of memory streams, device state included.
    pub bytes: u64,
    /// Live rounds before the stop-and-copy (QEMU's dirty-sync count is not
    /// reported for `qemu-native`: 0 there).
    pub rounds: u32,
    /// Guest memory that is not zero pages when the migration started (M of the
    /// lower bound M/B); unknown for `qemu-native`.
    pub nonzero_bytes: Option<u64>,
    pub converged: bool,
    pub policy: MigrationEngine,
    pub stop_reason: StopReason,
    pub max_throttle_percent: u8,
    /// Where the downtime went: final scan and send, QEMU's device state, resume on the
    /// destination (tern's engine only).
    pub downtime_parts_ms: Option<[u64; 3]>,
    /// What round 1's probe measured (tern's engine, when round 1 was split for it):
    /// the reading the round-1 throttle was sized from (the view's first round shows
    /// the throttle), for an operator asking why a move was throttled and for checking
    /// the migration model against the engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe: Option<FirstRoundProbe>,
    /// Filled in by whoever checks the guest afterwards (the benchmark, the tests): the
    /// engine itself cannot see inside the guest.
    pub guest_ok: Option<bool>,
}

/// What `GET /v1/migrations/{id}` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MigrationView {
    pub id: String,
    pub vm: String,
    pub destination: String,
    pub policy: MigrationEngine,
    pub phase: Phase,
    /// Why the migration was rolled back.
    pub error: Option<String>,
    /// Completed rounds.
    pub rounds: Vec<RoundTelemetry>,
    /// The round being sent, while one is (the stop-and-copy pass included): how far it
    /// got. Absent between rounds, before the first and after the last.
    #[serde(default)]
    pub current: Option<RoundProgress>,
    /// For a VM with local disks: how far the block mirror to the destination got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<DiskCopyProgress>,
    /// `dependency-aware` only: what the guest froze, how the freeze ended, or why the
    /// migration went on as `adaptive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependency: Option<DependencyOutcome>,
    pub result: Option<MigrationResult>,
}

/// A `dependency-aware` migration's dealings with the guest agent: the freeze before
/// pre-copy and the thaw once the VM runs again, on the destination or, after a
/// rollback, on the source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DependencyOutcome {
    /// Untainted processes the guest froze for the pre-copy.
    pub frozen: u32,
    /// Processes left running because something outside the VM depends on them.
    pub tainted: u32,
    /// Processes never frozen (kernel threads, init, the guest agent).
    pub exempt: u32,
    /// How long the guest took to answer the first `freeze` (the pre-copy waits for it).
    #[serde(default)]
    pub freeze_answer_ms: u64,
    /// Set when the guest froze nothing: why, and the migration went on as `adaptive`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback_reason: Option<String>,
    /// Renewals of the freeze's deadline during pre-copy, and how many went unanswered.
    #[serde(default)]
    pub renewals: u32,
    #[serde(default)]
    pub renewals_failed: u32,
    /// Where the guest was thawed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thawed_on: Option<ThawSite>,
    /// The guest's answer to `thaw`: every frozen process and how long it was frozen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thaw: Option<crate::guest::ThawReport>,
    /// Why the thaw was not confirmed, when it was not; the guest then thaws by itself
    /// when the freeze's deadline passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thaw_error: Option<String>,
}

impl DependencyOutcome {
    /// The freeze did not happen: the migration goes on as `adaptive`.
    pub fn fallback(reason: impl Into<String>) -> Self {
        DependencyOutcome {
            fallback_reason: Some(reason.into()),
            ..DependencyOutcome::default()
        }
    }

    /// The longest any process stayed frozen (what batch work paused for), once the
    /// thaw was confirmed.
    pub fn batch_paused_ms(&self) -> Option<f64> {
        let thaw = self.thaw.as_ref()?;
        Some(
            thaw.processes
                .iter()
                .map(|p| p.frozen_ms)
                .fold(0.0, f64::max),
        )
    }
}

/// The host whose agent thawed a `dependency-aware` migration's guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ThawSite {
    /// The migration completed: the destination thawed it once it ran there.
    Destination,
    /// The migration was rolled back: the source thawed it once it ran here again.
    Source,
}

/// The block mirror of a migration's local disks, summed over its disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiskCopyProgress {
    /// Bytes QEMU's mirror jobs copied so far.
    pub copied_bytes: u64,
    /// Bytes they have to copy in all; grows while the guest writes.
    pub total_bytes: u64,
    /// Every job has caught up and now mirrors each write as it happens; once the
    /// migration completed, the destination's copy is whole.
    pub ready: bool,
}

impl MigrationView {
    /// A migration about to start: nothing sent, nothing decided.
    pub fn new(id: &str, vm: &str, destination: &str, policy: MigrationEngine) -> Self {
        MigrationView {
            id: id.to_string(),
            vm: vm.to_string(),
            destination: destination.to_string(),
            policy,
            phase: Phase::Preparing,
            error: None,
            rounds: Vec::new(),
            current: None,
            disks: None,
            dependency: None,
            result: None,
        }
    }
}

/// Where an incoming migration is, as the destination sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum IncomingPhase {
    Receiving,
    MemoryComplete,
    Running,
    Failed,
}

/// `GET /v1/migrations/incoming/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IncomingView {
    pub migration: String,
    pub vm: String,
    pub phase: IncomingPhase,
    pub bytes: u64,
    pub rounds: u64,
    pub error: Option<String>,
}

/// Telemetry of one completed pre-copy round.
///
/// Times are seconds and rates bytes per second, as `f64`, because the simulator adds
/// thousands of them and the engine measures them with sub-millisecond resolution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RoundTelemetry {
    /// 1-based round number; round 1 is the first full pass over memory.
    pub round: u32,
    /// Pages put on the wire in this round.
    pub pages_sent: u64,
    /// Bytes put on the wire in this round (after compression and zero-page flags, for the
    /// engine; pages times page size, for the model).
    pub bytes_sent: u64,
    /// Distinct pages whose content changed while this round ran, whether or not they
    /// belong to a held-back fragment: the dirtying the guest did, not what will be sent.
    pub pages_changed: u64,
    /// `pages_changed` times page size over the round's duration: the guest's effective
    /// dirty rate as seen through one round (a page rewritten twice counts once).
    pub dirty_rate_bytes_per_s: f64,
    /// Throughput the link gave this round; policies use it to predict the downtime of
    /// a stop-and-copy and to size a throttle.
    pub bandwidth_bytes_per_s: f64,
    /// Pages that differ from the destination's copy at the end of the round, held-back
    /// fragments included: what a stop-and-copy started now would send.
    pub remaining_pages: u64,
    /// Of `remaining_pages`, those in fragments the policy held back this round.
    pub held_back_pages: u64,
    /// `remaining_pages` over the bandwidth, plus the fixed cost of stopping (final scan,
    /// device state): the downtime if the VM were paused now.
    pub predicted_downtime_s: f64,
    /// Wall time of this round.
    pub duration_s: f64,
    /// Time since the migration started, at the end of this round.
    pub elapsed_s: f64,
    /// Share of vCPU time taken away from the guest while this round ran (0 = none).
    pub throttle_percent: u8,
}

/// What the engine measured part way into round 1, after sending its first stretch of
/// memory: enough to see how fast the guest dirties pages while most of round 1 is
/// still to go, so a throttle can start before the guest has re-dirtied its whole
/// working set behind the copy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FirstRoundProbe {
    /// Distinct pages whose content changed during the probe window.
    pub pages_changed: u64,
    /// Length of the probe window (from the scan before round 1 to the probe's scan).
    pub window_s: f64,
    /// Throughput the link gave the probe's stretch.
    pub bandwidth_bytes_per_s: f64,
    /// Bytes of non-zero memory round 1 still has to send.
    pub bytes_left: u64,
    /// Fixed cost of stopping (final scan, device state), as for
    /// [`RoundTelemetry::predicted_downtime_s`].
    pub stop_cost_s: f64,
    /// Where the probe saw the guest writing, for a guest that rewrites a buffer in
    /// order: absent when nothing changed. Not used by the policy; it places such a
    /// writer for the migration model, which otherwise knows it only from before the
    /// move.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writer_seen: Option<WriterSeen>,
}

/// The last page of the longest stretch the probe saw changed (no gap over 64 pages),
/// and when the probe's scan read it: a guest rewriting memory in order had written
/// that page and not the next one then.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WriterSeen {
    /// Guest page number.
    pub page: u64,
    /// Seconds from the start of round 1 to the scan reading `page`.
    pub at_s: f64,
}

impl FirstRoundProbe {
    /// The guest's distinct-page dirty rate over the window, bytes per second.
    pub fn dirty_rate_bytes_per_s(&self, page_size: u64) -> f64 {
        if self.window_s > 0.0 {
            (self.pages_changed * page_size) as f64 / self.window_s
        } else {
            0.0
        }
    }
}

/// A round part way through: how far the engine got sending it (or a point inside a
/// model round), so a round that carries gigabytes is seen moving before it ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RoundProgress {
    /// 1-based, as in [`RoundTelemetry::round`]; the stop-and-copy pass is the round
    /// after the last live one.
    pub round: u32,
    /// Pages this round sends, zero pages included.
    pub pages_planned: u64,
    /// Of those, pages on the wire so far.
    pub pages_sent: u64,
    /// Bytes on the wire so far this round.
    pub bytes_sent: u64,
    /// Since this round began.
    pub duration_s: f64,
    /// Since the migration's live phase began, as [`RoundTelemetry::elapsed_s`].
    pub elapsed_s: f64,
}

/// Why iteration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The policy never iterates (plain stop-and-copy).
    Immediate,
    /// Nothing differs from the destination any more.
    NothingDirty,
    /// The predicted downtime fits the budget.
    FitsDowntime,
    /// Fewer dirty pages are left than the policy's threshold (Xen: 50).
    FewDirtyPages,
    /// A further round no longer shrinks what remains, and the remainder fits the budget.
    NoLongerShrinking,
    /// The policy's own round cap (Xen: 30).
    RoundCap,
    /// The policy's own volume cap (Xen: 3× memory sent).
    VolumeCap,
    /// Throttling reached its maximum and the remainder still does not fit.
    ThrottleExhausted,
    /// The fixed cost of stopping (final scan, device state) alone exceeds the budget,
    /// so no amount of iterating or throttling can meet it.
    BudgetUnreachable,
    /// The safety cap (`Limits::max_rounds` in tern-migrate) was reached.
    SafetyRounds,
    /// The safety cap (`Limits::max_elapsed_s` in tern-migrate) was reached.
    SafetyTime,
}

impl StopReason {
    /// Whether stopping for this reason means the policy reached its goal rather than
    /// being cut off by a cap.
    pub fn converged(self) -> bool {
        matches!(
            self,
            StopReason::Immediate
                | StopReason::NothingDirty
                | StopReason::FitsDowntime
                | StopReason::FewDirtyPages
                | StopReason::NoLongerShrinking
        )
    }
}
