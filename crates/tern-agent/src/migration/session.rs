//! The values of the migration API and the registry of migrations an agent runs.
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

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tern_hv::VmSpec;
use tern_migrate::{RoundProgress, RoundTelemetry};

use super::incoming::Progress;
use super::outgoing::RoundMeter;

/// Where a source migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
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

/// `POST /v1/migrations`: move `vm` from this host to the agent at `destination`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    pub vm: String,
    /// The destination agent's base URL, e.g. `http://198.18.0.2:7070`.
    pub destination: String,
    /// The destination agent's bearer token.
    pub token: String,
    /// `xen`, `qemu-rule` (alias `qemu`), `adaptive` or `stop-copy` for tern's engine;
    /// `qemu-native` for QEMU's own migration of the whole VM (the benchmark's peer).
    #[serde(default = "adaptive")]
    pub policy: String,
    #[serde(default)]
    pub options: SendOptions,
}

fn adaptive() -> String {
    "adaptive".into()
}

/// Tuning of one migration; every field has a default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SendOptions {
    /// Parallel memory streams.
    pub streams: u16,
    /// LZ4-compress page batches where that shrinks them.
    pub compress: bool,
    /// Bandwidth cap in Mbit/s; absent: as fast as the link allows.
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
        if self.max_mbit == Some(0) {
            return Err("options.max_mbit must be positive (omit it for no cap)".into());
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

/// What moves the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// tern's engine under a `tern-migrate` policy.
    Tern(tern_migrate::PolicyKind),
    /// QEMU's own migration of the whole VM, RAM included.
    QemuNative { auto_converge: bool },
}

impl Engine {
    /// Parses the `policy` field (pure); the error names the accepted values.
    pub fn parse(policy: &str, options: &SendOptions) -> Result<Engine, String> {
        if policy.trim().eq_ignore_ascii_case("qemu-native") {
            return Ok(Engine::QemuNative {
                auto_converge: options.auto_converge,
            });
        }
        let kind = policy
            .parse::<tern_migrate::PolicyKind>()
            .map_err(|e| format!("{e}, or qemu-native"))?;
        if options.auto_converge {
            return Err("options.auto_converge applies to policy qemu-native only".into());
        }
        Ok(Engine::Tern(kind))
    }

    /// The name results carry.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Tern(p) => p.as_str(),
            Engine::QemuNative {
                auto_converge: false,
            } => "qemu-native",
            Engine::QemuNative {
                auto_converge: true,
            } => "qemu-native-auto-converge",
        }
    }
}

/// `POST /v1/incoming`: the destination prepares to receive `vm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    pub vm: String,
    pub spec: VmSpec,
    /// QEMU carries the memory itself (no tern memory streams, no `x-ignore-shared`).
    #[serde(default)]
    pub native: bool,
}

/// The destination's answer to a prepare: where to send memory and device state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ticket {
    pub migration: String,
    /// Secret the memory streams must present.
    pub stream_token: String,
    pub memory_port: u16,
    /// QEMU's `migrate-incoming` port on the destination.
    pub device_port: u16,
}

/// The result of a finished migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationResult {
    pub total_ms: u64,
    /// From pausing the source to the destination running.
    pub downtime_ms: u64,
    /// Bytes of memory streams, device state included.
    pub bytes: u64,
    /// Live rounds before the stop-and-copy (QEMU's dirty-sync count is not
    /// reported for `qemu-native`: 0 there).
    pub rounds: u32,
    /// Guest memory that is not zero pages when the migration started (M of the
    /// lower bound M/B); unknown for `qemu-native`.
    pub nonzero_bytes: Option<u64>,
    pub converged: bool,
    pub policy: String,
    pub stop_reason: tern_migrate::StopReason,
    pub max_throttle_percent: u8,
    /// Where the downtime went: final scan and send, QEMU's device state, resume on the
    /// destination (tern's engine only).
    pub downtime_parts_ms: Option<[u64; 3]>,
    /// Filled in by whoever checks the guest afterwards (the benchmark, the tests): the
    /// engine itself cannot see inside the guest.
    pub guest_ok: Option<bool>,
}

/// What `GET /v1/migrations/{id}` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationView {
    pub id: String,
    pub vm: String,
    pub destination: String,
    pub policy: String,
    pub phase: Phase,
    /// Why the migration was rolled back.
    pub error: Option<String>,
    /// Completed rounds.
    pub rounds: Vec<RoundTelemetry>,
    /// The round being sent, while one is (the stop-and-copy pass included): how far it
    /// got. Absent between rounds, before the first and after the last.
    #[serde(default)]
    pub current: Option<RoundProgress>,
    pub result: Option<MigrationResult>,
}

impl MigrationView {
    /// A migration about to start: nothing sent, nothing decided.
    pub fn new(id: &str, vm: &str, destination: &str, policy: &str) -> Self {
        MigrationView {
            id: id.to_string(),
            vm: vm.to_string(),
            destination: destination.to_string(),
            policy: policy.to_string(),
            phase: Phase::Preparing,
            error: None,
            rounds: Vec::new(),
            current: None,
            result: None,
        }
    }
}

/// One outgoing migration as the registry holds it.
pub struct Outbound {
    pub view: Mutex<MigrationView>,
    pub cancel: AtomicBool,
    /// The memory streams count the round under way here.
    pub meter: Arc<RoundMeter>,
}

impl Outbound {
    pub fn new(view: MigrationView) -> Self {
        Outbound {
            view: Mutex::new(view),
            cancel: AtomicBool::new(false),
            meter: Arc::default(),
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        self.view.lock().expect("migration view lock").phase = phase;
    }

    pub fn snapshot(&self) -> MigrationView {
        let mut v = self.view.lock().expect("migration view lock").clone();
        v.current = running_round(&v, self.meter.read());
        v
    }
}

/// The meter's round, if it is still under way for `view` (pure): a round whose
/// telemetry is already among the completed ones (the meter is read between the end of
/// a round and the start of the next) or a finished migration has none.
fn running_round(view: &MigrationView, meter: Option<RoundProgress>) -> Option<RoundProgress> {
    let done = view.rounds.last().map_or(0, |r| r.round);
    meter.filter(|c| c.round > done && !view.phase.is_final())
}

/// Where an incoming migration is, as the destination sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IncomingPhase {
    Receiving,
    MemoryComplete,
    Running,
    Failed,
}

/// `GET /v1/incoming/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IncomingView {
    pub migration: String,
    pub vm: String,
    pub phase: IncomingPhase,
    pub bytes: u64,
    pub rounds: u64,
    pub error: Option<String>,
}

/// One incoming migration as the registry holds it.
pub struct Inbound {
    pub vm: String,
    pub phase: Mutex<(IncomingPhase, Option<String>)>,
    pub progress: Progress,
    pub cancel: AtomicBool,
    /// Set once the destination VM was resumed: from then on it is the VM, not a copy.
    pub resumed: AtomicBool,
    /// Serialises resume, abort and the supervisor's clean-up, so a VM is never resumed
    /// and destroyed at once.
    pub gate: tokio::sync::Mutex<()>,
}

impl Inbound {
    pub fn set(&self, phase: IncomingPhase, error: Option<String>) {
        *self.phase.lock().expect("incoming phase lock") = (phase, error);
    }

    pub fn view(&self, id: &str) -> IncomingView {
        let (phase, error) = self.phase.lock().expect("incoming phase lock").clone();
        IncomingView {
            migration: id.to_string(),
            vm: self.vm.clone(),
            phase,
            bytes: self
                .progress
                .bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            rounds: self
                .progress
                .rounds
                .load(std::sync::atomic::Ordering::Relaxed),
            error,
        }
    }
}

/// Every migration this agent takes part in, as source or destination.
#[derive(Default)]
pub struct Registry {
    pub outbound: Mutex<BTreeMap<String, Arc<Outbound>>>,
    pub inbound: Mutex<BTreeMap<String, Arc<Inbound>>>,
    next: AtomicU64,
}

impl Registry {
    /// A fresh id, unique within this agent's life and unlikely to collide across hosts.
    pub fn new_id(&self, prefix: &str) -> String {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        format!("{prefix}-{}-{n}-{nanos:08x}", std::process::id())
    }

    /// A VM may take part in one migration at a time.
    pub fn busy(&self, vm: &str) -> bool {
        let out = self.outbound.lock().expect("registry lock");
        let inb = self.inbound.lock().expect("registry lock");
        out.values().any(|o| {
            let v = o.view.lock().expect("migration view lock");
            v.vm == vm && !v.phase.is_final()
        }) || inb.values().any(|i| {
            i.vm == vm
                && !matches!(
                    i.phase.lock().expect("incoming phase lock").0,
                    IncomingPhase::Failed | IncomingPhase::Running
                )
        })
    }
}

/// A random secret for the memory streams (not cryptographic strength beyond what the
/// lab needs: it keeps stray connections out, the API token guards the agent).
pub fn stream_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let a = h.finish();
    let b = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    format!("{a:016x}{b:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_with_a_message_naming_the_field() {
        assert!(SendOptions::default().validate().is_ok());
        let bad = SendOptions {
            streams: 0,
            ..SendOptions::default()
        };
        assert!(bad.validate().unwrap_err().contains("options.streams"));
        let bad = SendOptions {
            max_mbit: Some(0),
            ..SendOptions::default()
        };
        assert!(bad.validate().unwrap_err().contains("max_mbit"));
        let bad = SendOptions {
            max_precopy_s: f64::NAN,
            ..SendOptions::default()
        };
        assert!(bad.validate().unwrap_err().contains("max_precopy_s"));
    }

    #[test]
    fn send_request_defaults_to_adaptive_and_refuses_unknown_fields() {
        let r: SendRequest =
            serde_json::from_str(r#"{"vm":"v","destination":"http://h:1","token":"t"}"#).unwrap();
        assert_eq!(r.policy, "adaptive");
        assert_eq!(r.options, SendOptions::default());
        assert!(serde_json::from_str::<SendRequest>(
            r#"{"vm":"v","destination":"d","token":"t","polcy":"xen"}"#
        )
        .is_err());
    }

    #[test]
    fn engines_parse_from_the_policy_field() {
        let o = SendOptions::default();
        assert_eq!(
            Engine::parse("xen", &o),
            Ok(Engine::Tern(tern_migrate::PolicyKind::Xen))
        );
        let ac = SendOptions {
            auto_converge: true,
            ..o.clone()
        };
        assert_eq!(
            Engine::parse("qemu-native", &ac).map(Engine::name),
            Ok("qemu-native-auto-converge")
        );
        assert!(Engine::parse("adaptive", &ac)
            .unwrap_err()
            .contains("qemu-native only"));
        assert!(Engine::parse("fast", &o)
            .unwrap_err()
            .contains("qemu-native"));
    }

    #[test]
    fn the_running_round_shows_only_while_it_is_not_among_the_completed() {
        let round = |n: u32| RoundProgress {
            round: n,
            pages_planned: 100,
            pages_sent: 40,
            bytes_sent: 40 * 4096,
            duration_s: 0.5,
            elapsed_s: 1.5,
        };
        let mut view = MigrationView::new("m", "v", "http://h:1", "adaptive");
        view.phase = Phase::PreCopy;
        assert_eq!(running_round(&view, Some(round(1))), Some(round(1)));
        assert_eq!(running_round(&view, None), None);
        let done: RoundTelemetry = serde_json::from_value(serde_json::json!({
            "round": 1, "pages_sent": 100, "bytes_sent": 409600, "pages_changed": 0,
            "dirty_rate_bytes_per_s": 0.0, "bandwidth_bytes_per_s": 1e8,
            "remaining_pages": 0, "held_back_pages": 0, "predicted_downtime_s": 0.03,
            "duration_s": 1.0, "elapsed_s": 1.0, "throttle_percent": 0}))
        .unwrap();
        view.rounds.push(done);
        // Round 1 ended and its telemetry is in: the meter has not begun round 2 yet.
        assert_eq!(running_round(&view, Some(round(1))), None);
        assert_eq!(running_round(&view, Some(round(2))), Some(round(2)));
        view.phase = Phase::RolledBack;
        assert_eq!(running_round(&view, Some(round(2))), None);
    }

    #[test]
    fn ids_differ() {
        let r = Registry::default();
        assert_ne!(r.new_id("m"), r.new_id("m"));
    }
}
