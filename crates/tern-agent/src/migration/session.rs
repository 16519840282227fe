//! The registry of migrations an agent runs. The values of the migration API (phases,
//! requests, views) are `tern_api::migration`; they are re-exported here.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tern_migrate::RoundProgress;

pub use tern_api::migration::{
    IncomingPhase, IncomingView, MigrationResult, MigrationView, Phase, PrepareRequest,
    SendOptions, SendRequest, Ticket,
};

use super::incoming::Progress;
use super::outgoing::RoundMeter;

/// What moves the memory.
pub use tern_api::migration::MigrationEngine as Engine;

/// The engine a send request asks for (pure): its `policy` with its options; the error
/// says what to change.
pub fn engine(policy: Engine, options: &SendOptions) -> Result<Engine, String> {
    match policy {
        Engine::QemuNative { auto_converge } => Ok(Engine::QemuNative {
            auto_converge: auto_converge || options.auto_converge,
        }),
        Engine::Tern(_) if options.auto_converge => {
            Err("options.auto_converge applies to policy qemu-native only".into())
        }
        tern => Ok(tern),
    }
}

/// One outgoing migration as the registry holds it.
pub struct Outbound {
    pub view: Mutex<MigrationView>,
    pub cancel: AtomicBool,
    /// The memory streams count the round under way here.
    pub meter: Arc<RoundMeter>,
    /// When it was registered; the oldest finished ones are forgotten first.
    pub born: Instant,
}

impl Outbound {
    pub fn new(view: MigrationView) -> Self {
        Outbound {
            view: Mutex::new(view),
            cancel: AtomicBool::new(false),
            meter: Arc::default(),
            born: Instant::now(),
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
    /// When it was registered; the oldest finished ones are forgotten first.
    pub born: Instant,
    /// The host whose certificate prepared it: with host identities only that host may
    /// open its streams and act on it.
    pub source: Option<String>,
    /// The vCPU policy the source applied to the VM: applied here once it runs here.
    pub vcpu_policy: tern_api::vcpu::VcpuPolicy,
    /// Its local disks are exported over NBD for the source's mirror until resume.
    pub exports_disks: bool,
    /// The thaw a `resume?thaw=true` started as the VM ran here, for the source's
    /// `thaw` to collect (a failed one is tried again there).
    pub thaw: tokio::sync::OnceCell<Result<tern_api::guest::ThawReport, String>>,
}

impl Inbound {
    /// A migration of `vm` that starts receiving now.
    pub fn new(vm: &str) -> Self {
        Inbound {
            vm: vm.to_owned(),
            phase: Mutex::new((IncomingPhase::Receiving, None)),
            progress: Progress::default(),
            cancel: AtomicBool::new(false),
            resumed: AtomicBool::new(false),
            gate: tokio::sync::Mutex::new(()),
            born: Instant::now(),
            source: None,
            vcpu_policy: tern_api::vcpu::VcpuPolicy::None,
            exports_disks: false,
            thaw: tokio::sync::OnceCell::new(),
        }
    }

    /// Whether it still holds the VM (receiving, or complete and waiting for resume).
    fn is_open(&self) -> bool {
        !matches!(
            self.phase.lock().expect("incoming phase lock").0,
            IncomingPhase::Failed | IncomingPhase::Running
        )
    }
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

/// Finished migrations a registry keeps (per direction) so their views can still be
/// read; older ones are forgotten, so a long-lived agent's registry stays small.
pub const KEEP_FINISHED: usize = 64;

/// Why a VM cannot start a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Busy;

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
        busy(&out, &inb, vm)
    }

    /// Registers an outgoing migration unless its VM takes part in one already: the
    /// check and the insert happen under the registry's locks, so two sends of one VM
    /// cannot both pass. Forgets the oldest finished migrations beyond [`KEEP_FINISHED`].
    pub fn begin_outbound(&self, id: &str, job: Arc<Outbound>) -> Result<(), Busy> {
        let mut out = self.outbound.lock().expect("registry lock");
        let inb = self.inbound.lock().expect("registry lock");
        let vm = job.view.lock().expect("migration view lock").vm.clone();
        if busy(&out, &inb, &vm) {
            return Err(Busy);
        }
        out.insert(id.to_owned(), job);
        prune(
            &mut out,
            |o| !o.view.lock().expect("migration view lock").phase.is_final(),
            |o| o.born,
        );
        Ok(())
    }

    /// Registers an incoming migration, forgetting the oldest finished ones beyond
    /// [`KEEP_FINISHED`].
    pub fn begin_inbound(&self, id: &str, job: Arc<Inbound>) {
        let mut inb = self.inbound.lock().expect("registry lock");
        inb.insert(id.to_owned(), job);
        prune(&mut inb, |i| i.is_open(), |i| i.born);
    }
}

fn busy(
    out: &BTreeMap<String, Arc<Outbound>>,
    inb: &BTreeMap<String, Arc<Inbound>>,
    vm: &str,
) -> bool {
    out.values().any(|o| {
        let v = o.view.lock().expect("migration view lock");
        v.vm == vm && !v.phase.is_final()
    }) || inb.values().any(|i| i.vm == vm && i.is_open())
}

/// Removes the oldest entries that are no longer `open`, keeping [`KEEP_FINISHED`] of them.
fn prune<T>(
    map: &mut BTreeMap<String, Arc<T>>,
    open: impl Fn(&T) -> bool,
    born: impl Fn(&T) -> Instant,
) {
    let mut finished: Vec<(Instant, String)> = map
        .iter()
        .filter(|(_, v)| !open(v))
        .map(|(k, v)| (born(v), k.clone()))
        .collect();
    if finished.len() <= KEEP_FINISHED {
        return;
    }
    finished.sort();
    let excess = finished.len() - KEEP_FINISHED;
    for (_, k) in finished.into_iter().take(excess) {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_migrate::RoundTelemetry;

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
        assert_eq!(r.policy, Engine::Tern(tern_migrate::PolicyKind::Adaptive));
        assert_eq!(r.options, SendOptions::default());
        assert!(serde_json::from_str::<SendRequest>(
            r#"{"vm":"v","destination":"d","token":"t","polcy":"xen"}"#
        )
        .is_err());
    }

    #[test]
    fn engines_parse_from_the_policy_field() {
        let o = SendOptions::default();
        let name = |s: &str| s.parse::<Engine>();
        assert_eq!(
            engine(name("xen").unwrap(), &o),
            Ok(Engine::Tern(tern_migrate::PolicyKind::Xen))
        );
        let ac = SendOptions {
            auto_converge: true,
            ..o.clone()
        };
        assert_eq!(
            engine(name("qemu-native").unwrap(), &ac).map(Engine::name),
            Ok("qemu-native-auto-converge")
        );
        assert!(engine(name("adaptive").unwrap(), &ac)
            .unwrap_err()
            .contains("qemu-native only"));
        assert!(name("fast")
            .unwrap_err()
            .to_string()
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
        let mut view = MigrationView::new("m", "v", "http://h:1", Engine::default());
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
    fn registries_keep_running_migrations_and_only_the_newest_finished_ones() {
        let r = Registry::default();
        let job = |vm: &str, phase: Phase| {
            let mut v = MigrationView::new("m", vm, "http://h:1", Engine::default());
            v.phase = phase;
            Arc::new(Outbound::new(v))
        };
        r.begin_outbound("running", job("live", Phase::PreCopy))
            .unwrap();
        for n in 0..3 * KEEP_FINISHED {
            r.begin_outbound(
                &format!("done-{n}"),
                job(&format!("v{n}"), Phase::Completed),
            )
            .unwrap();
        }
        let out = r.outbound.lock().unwrap();
        assert_eq!(out.len(), KEEP_FINISHED + 1);
        assert!(out.contains_key("running"));
        assert!(out.contains_key(&format!("done-{}", 3 * KEEP_FINISHED - 1)));
        assert!(
            !out.contains_key("done-0"),
            "the oldest finished one is forgotten"
        );
        drop(out);
        assert_eq!(
            r.begin_outbound("again", job("live", Phase::Preparing)),
            Err(Busy)
        );
        for n in 0..3 * KEEP_FINISHED {
            let i = Arc::new(Inbound::new(&format!("v{n}")));
            i.set(IncomingPhase::Failed, None);
            r.begin_inbound(&format!("in-{n}"), i);
        }
        assert_eq!(r.inbound.lock().unwrap().len(), KEEP_FINISHED);
    }

    #[test]
    fn ids_differ() {
        let r = Registry::default();
        assert_ne!(r.new_id("m"), r.new_id("m"));
    }
}
