//! Guest health: whether each running guest still answers. Every
//! [`WatchConfig::every`] the agent pings each running VM's guest agent, asks QEMU
//! whether the guest panicked (its pvpanic device; QEMU then holds the guest, see
//! `tern_hv::qemu::args`) and reads what is new on its console for a kernel panic line.
//! [`judge`] turns those looks into the state the VM's views report (`docs/manager.md`,
//! "Guest health"):
//!
//! ```text
//!  QEMU starts ──► booting ──answer──► ok ◄──answer──┐
//!                     │                 │             │
//!                     │ no answer       │ no answer   │
//!                     │ > boot_within   │ > unresponsive_after
//!                     │ (when set)      │
//!                     └──────────► unresponsive ──────┘
//!  pvpanic, or "Kernel panic" on the console ──► panicked (until a new QEMU)
//! ```

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::Duration;

use tern_api::health::{GuestHealth, GuestState};
use tern_hv::qemu::CONSOLE_BOOT_MARKER;

/// How the agent watches its guests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchConfig {
    /// Time between two looks at every guest.
    pub every: Duration,
    /// Time a guest agent gets to answer one ping.
    pub ping_timeout: Duration,
    /// A guest that answered before and has not since for this long is unresponsive.
    pub unresponsive_after: Duration,
    /// When set, a guest that has not answered once this long after its QEMU started
    /// is unresponsive (booting under TCG on a busy host takes a while). Unset, such a
    /// guest stays `booting`: an image without the guest agent never answers, and is
    /// not for that a guest that stopped.
    pub boot_within: Option<Duration>,
}

impl Default for WatchConfig {
    fn default() -> Self {
        WatchConfig {
            every: Duration::from_secs(2),
            ping_timeout: Duration::from_secs(3),
            unresponsive_after: Duration::from_secs(20),
            boot_within: None,
        }
    }
}

impl WatchConfig {
    /// Refuses bounds that cannot work: a ping must be able to answer before the
    /// guest counts as silent.
    pub fn check(&self) -> Result<(), String> {
        if self.every.is_zero() || self.ping_timeout.is_zero() {
            return Err("the guest watch's interval and ping timeout must be above 0".into());
        }
        if self.unresponsive_after < self.every + self.ping_timeout {
            return Err(format!(
                "a guest cannot be unresponsive after {} s: pings go every {} s and wait {} s \
                 for an answer",
                self.unresponsive_after.as_secs_f64(),
                self.every.as_secs_f64(),
                self.ping_timeout.as_secs_f64()
            ));
        }
        Ok(())
    }
}

/// What one look at a running VM found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Look {
    /// Its QEMU's pid: a new one (a reboot, a restore, an arrival) starts a new watch.
    pub pid: u32,
    /// When the look was taken, on the agent's monotonic clock.
    pub at: Duration,
    /// Its guest agent answered a ping.
    pub answered: bool,
    /// QEMU holds the guest after its pvpanic device reported a panic.
    pub held_panicked: bool,
    /// A kernel panic line that appeared on its console since the last look.
    pub console_panic: Option<String>,
}

/// What the agent knows of one running VM's guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    pub pid: u32,
    /// When its QEMU was first seen, on the monotonic clock.
    pub started: Duration,
    pub last_answer: Option<Duration>,
    /// Why it is known to have panicked; kept until a new QEMU.
    pub panic: Option<String>,
    /// How far its console log has been read.
    pub console_offset: u64,
    pub health: GuestHealth,
}

/// The watch after `look` (pure). `wall_ms` is the wall clock then (for `since_ms`).
pub fn judge(prev: Option<&Watch>, look: &Look, wall_ms: u64, cfg: &WatchConfig) -> Watch {
    let fresh = prev.filter(|w| w.pid == look.pid).is_none();
    let (started, last_answer, mut panic, console_offset, health) = match prev {
        Some(w) if !fresh => (
            w.started,
            w.last_answer,
            w.panic.clone(),
            w.console_offset,
            w.health.clone(),
        ),
        _ => (
            look.at,
            None,
            None,
            0,
            GuestHealth {
                state: GuestState::Booting,
                reason: String::new(),
                since_ms: wall_ms,
            },
        ),
    };
    if panic.is_none() {
        panic = match (&look.console_panic, look.held_panicked) {
            (Some(line), true) => Some(format!("pvpanic; console: {line}")),
            (None, true) => Some("pvpanic: QEMU holds the guest after its panic".into()),
            (Some(line), false) => Some(format!("console: {line}")),
            (None, false) => None,
        };
    }
    let last_answer = if look.answered {
        Some(look.at)
    } else {
        last_answer
    };
    let secs = |d: Duration| d.as_secs();
    let (state, reason) = if let Some(p) = &panic {
        (GuestState::Panicked, p.clone())
    } else if look.answered {
        (GuestState::Ok, String::new())
    } else if let Some(t) = last_answer {
        let silent = look.at.saturating_sub(t);
        if silent > cfg.unresponsive_after {
            (
                GuestState::Unresponsive,
                format!("its guest agent has not answered for {} s", secs(silent)),
            )
        } else {
            (GuestState::Ok, String::new())
        }
    } else {
        let up = look.at.saturating_sub(started);
        if cfg.boot_within.is_some_and(|b| up > b) {
            (
                GuestState::Unresponsive,
                format!(
                    "its guest agent never answered in the {} s since its QEMU started",
                    secs(up)
                ),
            )
        } else {
            (GuestState::Booting, String::new())
        }
    };
    // The silence grows with every look; the state began when it was first judged so.
    let since_ms = if state == health.state {
        health.since_ms
    } else {
        wall_ms
    };
    let reason = if state == health.state && state == GuestState::Unresponsive {
        health.reason
    } else {
        reason
    };
    Watch {
        pid: look.pid,
        started,
        last_answer,
        panic,
        console_offset,
        health: GuestHealth {
            state,
            reason,
            since_ms,
        },
    }
}

/// Most of a console log read in one look: a guest printing faster than this between
/// two looks has its older lines skipped.
const CONSOLE_READ_MAX: u64 = 64 * 1024;

/// What the kernel prints first when it panics.
const PANIC_LINE: &str = "Kernel panic";

/// Reads `log` past `offset` for a kernel panic line; the new offset and the line, if
/// any. A QEMU not read before (`offset` `None`: a new one, or an agent that just
/// started) is read from the last [`CONSOLE_BOOT_MARKER`]: the log holds the VM's
/// earlier boots too. A file shorter than `offset` was started anew.
pub fn read_console(log: &Path, offset: Option<u64>) -> std::io::Result<(u64, Option<String>)> {
    let mut f = std::fs::File::open(log)?;
    let len = f.metadata()?.len();
    let from = match offset {
        Some(o) if o <= len => o,
        _ => 0,
    };
    let from = from.max(len.saturating_sub(CONSOLE_READ_MAX));
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.take(len - from).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let text = match offset {
        None => this_boot(&text),
        Some(_) => &text,
    };
    Ok((from + buf.len() as u64, panic_line(text)))
}

/// The part of console text after its last boot marker (all of it without one) (pure).
pub fn this_boot(text: &str) -> &str {
    text.rfind(CONSOLE_BOOT_MARKER)
        .map_or(text, |i| &text[i + CONSOLE_BOOT_MARKER.len()..])
}

/// The first kernel panic line in console text (pure).
pub fn panic_line(text: &str) -> Option<String> {
    text.lines()
        .find(|l| l.contains(PANIC_LINE))
        .map(|l| l.trim().chars().take(200).collect())
}

/// The watches of this host's running VMs, by VM id.
pub type Watches = HashMap<String, Watch>;

/// Milliseconds since the Unix epoch, for `since_ms`.
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl crate::state::AppState {
    /// Looks at every running guest once (concurrently) and records the judgement. VMs
    /// in a migration are left as they were (the engine owns them); watches of VMs no
    /// longer running are dropped. Every wait here has a bound: a ping its timeout, the
    /// QMP question the same.
    pub async fn watch_guests(&self) {
        let Ok(vms) = self.hv.list().await else {
            return;
        };
        let mut looks = tokio::task::JoinSet::new();
        let mut keep = std::collections::HashSet::new();
        for v in vms {
            let (tern_hv::VmState::Running, Some(pid)) = (v.state, v.pid) else {
                continue;
            };
            keep.insert(v.id.clone());
            if self.migrations.busy(&v.id) {
                continue;
            }
            let me = self.clone();
            looks.spawn(async move {
                let look = me.look(&v, pid).await;
                (v.id, look)
            });
        }
        while let Some(done) = looks.join_next().await {
            let Ok((id, (look, console_offset))) = done else {
                continue;
            };
            let mut watches = self.watches.lock().expect("guest watch lock");
            let prev = watches.get(&id);
            let mut next = judge(prev, &look, wall_ms(), &self.watch);
            if let Some(o) = console_offset {
                next.console_offset = o;
            }
            if prev.map(|p| p.health.state) != Some(next.health.state) {
                tracing::info!(vm = %id, state = %next.health.state, reason = %next.health.reason, "guest health");
            }
            watches.insert(id, next);
        }
        self.watches
            .lock()
            .expect("guest watch lock")
            .retain(|id, _| keep.contains(id));
    }

    /// One look at running VM `v` whose QEMU is `pid`, and how far its console was read.
    async fn look(&self, v: &tern_hv::VmInfo, pid: u32) -> (Look, Option<u64>) {
        let bound = self.watch.ping_timeout;
        let offset = {
            let watches = self.watches.lock().expect("guest watch lock");
            watches
                .get(&v.id)
                .filter(|w| w.pid == pid)
                .map(|w| w.console_offset)
        };
        let ping = async {
            let socket = v.control_socket.as_ref()?;
            let req = serde_json::json!({"cmd": "ping"});
            let answer =
                tokio::time::timeout(bound, self.guests.request(&v.id, socket, req, bound))
                    .await
                    .ok()?
                    .ok()?;
            answer.get("ok").and_then(serde_json::Value::as_bool)
        };
        let held = async {
            tokio::time::timeout(bound, self.hv.guest_panicked(&v.id))
                .await
                .is_ok_and(|r| r.unwrap_or(false))
        };
        let console = async {
            let log = v.console_log.clone()?;
            tokio::task::spawn_blocking(move || read_console(&log, offset).ok())
                .await
                .ok()
                .flatten()
        };
        // A guest QEMU holds cannot answer: no need to wait out the ping's timeout.
        let held_panicked = held.await;
        let (answered, console) = if held_panicked {
            (None, console.await)
        } else {
            tokio::join!(ping, console)
        };
        let at = self.epoch.elapsed();
        let (offset, console_panic) = match console {
            Some((o, line)) => (Some(o), line),
            None => (None, None),
        };
        (
            Look {
                pid,
                at,
                answered: answered == Some(true),
                held_panicked,
                console_panic,
            },
            offset,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg() -> WatchConfig {
        WatchConfig {
            every: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(1),
            unresponsive_after: Duration::from_secs(10),
            boot_within: Some(Duration::from_secs(60)),
        }
    }

    fn look(pid: u32, at_s: u64, answered: bool) -> Look {
        Look {
            pid,
            at: Duration::from_secs(at_s),
            answered,
            held_panicked: false,
            console_panic: None,
        }
    }

    /// Runs looks in order from no watch; the states seen.
    fn states(looks: &[Look]) -> Vec<GuestState> {
        let mut w: Option<Watch> = None;
        looks
            .iter()
            .map(|l| {
                let next = judge(w.as_ref(), l, l.at.as_millis() as u64, &cfg());
                let s = next.health.state;
                w = Some(next);
                s
            })
            .collect()
    }

    #[test]
    fn boots_answers_then_falls_silent() {
        use GuestState::*;
        let s = states(&[
            look(1, 0, false),
            look(1, 5, true),
            look(1, 10, false),
            look(1, 15, false),
            look(1, 16, false),
            look(1, 17, true),
        ]);
        assert_eq!(s, [Booting, Ok, Ok, Ok, Unresponsive, Ok]);
    }

    #[test]
    fn a_guest_that_never_answers_is_unresponsive_after_the_boot_bound() {
        use GuestState::*;
        let s = states(&[look(1, 0, false), look(1, 60, false), look(1, 61, false)]);
        assert_eq!(s, [Booting, Booting, Unresponsive]);
    }

    #[test]
    fn without_a_boot_bound_a_guest_that_never_answered_stays_booting() {
        let c = WatchConfig {
            boot_within: None,
            ..cfg()
        };
        let first = judge(None, &look(1, 0, false), 0, &c);
        let later = judge(Some(&first), &look(1, 100_000, false), 1, &c);
        assert_eq!(later.health.state, GuestState::Booting);
    }

    #[test]
    fn a_panic_sticks_until_a_new_qemu() {
        use GuestState::*;
        let mut l = look(1, 3, false);
        l.held_panicked = true;
        let first = judge(None, &look(1, 0, true), 0, &cfg());
        let p = judge(Some(&first), &l, 3000, &cfg());
        assert_eq!(p.health.state, Panicked);
        assert!(p.health.reason.contains("pvpanic"), "{}", p.health.reason);
        assert_eq!(p.health.since_ms, 3000);
        // Still panicked even if something answered on the old channel.
        let again = judge(Some(&p), &look(1, 4, true), 4000, &cfg());
        assert_eq!(
            (again.health.state, again.health.since_ms),
            (Panicked, 3000)
        );
        // A new QEMU (the VM was restarted) boots afresh.
        let reborn = judge(Some(&again), &look(2, 5, false), 5000, &cfg());
        assert_eq!(reborn.health.state, Booting);
        assert_eq!(reborn.console_offset, 0);
    }

    #[test]
    fn a_console_panic_line_alone_is_a_panic() {
        let mut l = look(1, 3, true);
        l.console_panic = Some("Kernel panic - not syncing: sysrq triggered crash".into());
        let w = judge(None, &l, 0, &cfg());
        assert_eq!(w.health.state, GuestState::Panicked);
        assert!(w.health.reason.contains("sysrq"));
    }

    #[test]
    fn console_lines_are_found_and_read_once() {
        assert_eq!(
            panic_line("boot\n[ 9.1] Kernel panic - not syncing: x\r\nmore"),
            Some("[ 9.1] Kernel panic - not syncing: x".into())
        );
        assert_eq!(panic_line("Oops"), None);
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        std::fs::write(&p, "hello\n").unwrap();
        let (off, none) = read_console(&p, Some(0)).unwrap();
        assert_eq!((off, none), (6, None));
        std::fs::write(&p, "hello\nKernel panic - x\n").unwrap();
        let (off, line) = read_console(&p, Some(off)).unwrap();
        assert_eq!(line.as_deref(), Some("Kernel panic - x"));
        assert_eq!(read_console(&p, Some(off)).unwrap(), (off, None));
        // A file started anew: read from its start.
        std::fs::write(&p, "x\n").unwrap();
        assert_eq!(read_console(&p, Some(off)).unwrap(), (2, None));
    }

    #[test]
    fn a_new_qemu_is_read_from_its_boot_marker_not_the_boot_before() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("console.log");
        let before = format!("\r\n{CONSOLE_BOOT_MARKER}\r\nboot 1\nKernel panic - one\n");
        std::fs::write(&p, format!("{before}\r\n{CONSOLE_BOOT_MARKER}\r\nboot 2\n")).unwrap();
        let (off, line) = read_console(&p, None).unwrap();
        assert_eq!(line, None, "the panic of boot 1 is not boot 2's");
        std::fs::write(
            &p,
            format!("{before}\r\n{CONSOLE_BOOT_MARKER}\r\nboot 2\nKernel panic - two\n"),
        )
        .unwrap();
        let (_, line) = read_console(&p, Some(off)).unwrap();
        assert_eq!(line.as_deref(), Some("Kernel panic - two"));
        // An agent that starts while boot 2 is held after its panic still sees it.
        let (_, line) = read_console(&p, None).unwrap();
        assert_eq!(line.as_deref(), Some("Kernel panic - two"));
        // A log without a marker (written before markers) is read whole.
        assert_eq!(this_boot("a\nb"), "a\nb");
    }

    #[test]
    fn bounds_are_checked() {
        assert!(WatchConfig::default().check().is_ok());
        let bad = WatchConfig {
            unresponsive_after: Duration::from_secs(1),
            ..cfg()
        };
        assert!(bad.check().is_err());
    }

    proptest! {
        /// Whatever the looks, a guest that answered within the bound is never called
        /// unresponsive, `since` changes exactly when the state does, and nothing but a
        /// new QEMU ends a panic.
        #[test]
        fn judged_states_follow_the_rules(
            steps in proptest::collection::vec((1u64..8, any::<bool>(), 0u8..20, 0u32..2), 1..60)
        ) {
            let c = cfg();
            let mut w: Option<Watch> = None;
            let mut at = 0;
            for (dt, answered, p, pid) in steps {
                at += dt;
                let l = Look {
                    pid,
                    at: Duration::from_secs(at),
                    answered,
                    held_panicked: p == 0,
                    console_panic: None,
                };
                let next = judge(w.as_ref(), &l, at * 1000, &c);
                let same_qemu = w.as_ref().is_some_and(|w| w.pid == pid);
                if let Some(prev) = w.as_ref().filter(|_| same_qemu) {
                    if prev.health.state == GuestState::Panicked {
                        prop_assert_eq!(next.health.state, GuestState::Panicked);
                    }
                    prop_assert_eq!(
                        next.health.since_ms == prev.health.since_ms,
                        next.health.state == prev.health.state
                    );
                }
                if next.health.state == GuestState::Unresponsive {
                    let recent = next
                        .last_answer
                        .is_some_and(|t| l.at - t <= c.unresponsive_after);
                    prop_assert!(!recent && !answered);
                }
                w = Some(next);
            }
        }
    }
}
