//! `dependency-aware` migration on a real guest between two lab hosts: the guest freezes
//! its untainted processes for the pre-copy and is thawed whatever happens.
//!
//! The guest runs a batch loop started from its serial console's root shell, a process
//! of its own that nothing outside the VM depends on: it counts into a file. One guest,
//! booted once, goes through:
//!
//! 1. its guest agent stopped (SIGSTOP): the freeze is not answered, the migration goes
//!    on as `adaptive` and says why;
//! 2. a move that succeeds: the destination thaws the guest (cause `host`), the loop was
//!    frozen and counts again; then, with a second batch process rewriting its memory,
//!    a move with `adaptive` and one back with `dependency-aware`, which freezes the
//!    writer and converges without throttling the vCPUs (both measured);
//! 3. a cancel during pre-copy: the source thaws the guest after the rollback;
//! 4. the source agent killed during pre-copy: nobody renews the freeze, the guest thaws
//!    by itself at the deadline (cause `deadline`);
//! 5. the destination agent killed during pre-copy: the rollback thaws the guest on the
//!    source.
//!
//! Needs root, iproute2, QEMU and the `tern` binary of this build tree; without them it
//! says why and passes, except under `CI`, where it must run.

mod common;

use std::time::{Duration, Instant};

use futures_util::{FutureExt, SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tern_agent::client::AgentClient;
use tern_agent::migration::freeze::{FREEZE_DEADLINE, RENEW_EVERY};
use tern_api::client::console::{connect, ConsoleStream};
use tern_api::guest::{TaintClass, TaintReport, ThawCause};
use tern_api::migration::{DependencyOutcome, ThawSite};
use tern_lab::{self as lab, LabState};
use tokio_tungstenite::tungstenite::Message;

const VM: &str = "dep1";
/// Over this link cap the pre-copy of the guest's 64 MiB working set lasts half a minute:
/// time to look at the frozen guest and break the migration on purpose.
const SLOW_MBIT: u64 = 16;
/// The link cap of the moves compared with and without the freeze: a batch process
/// rewriting its memory from /dev/urandom under TCG dirties about as much.
const MEASURE_MBIT: u64 = 100;

fn can_run() -> bool {
    let (tern, built) = common::tern_binary_need();
    tern_testkit::require_lab("dependency-aware migration lab test", &[(&tern, built)])
}

struct Lab {
    state: LabState,
    hosts: Vec<AgentClient>,
}

impl Lab {
    /// Starts a `dependency-aware` migration of the test VM; returns its id.
    async fn send(&self, from: usize, to: usize, max_mbit: Option<u64>) -> String {
        self.send_with(from, to, max_mbit, "dependency-aware").await
    }

    async fn send_with(
        &self,
        from: usize,
        to: usize,
        max_mbit: Option<u64>,
        policy: &str,
    ) -> String {
        let options = match max_mbit {
            Some(m) => json!({ "max_mbit": m }),
            None => json!({}),
        };
        let body = json!({ "vm": VM, "destination": self.state.hosts[to].url, "token": "",
                           "policy": policy, "options": options });
        let v: Value = self.hosts[from]
            .http()
            .send(Method::POST, "/v1/migrations", Some(&body))
            .await
            .unwrap();
        v["id"].as_str().unwrap().to_string()
    }

    async fn status(&self, host: usize, id: &str) -> Value {
        self.hosts[host]
            .http()
            .get(&format!("/v1/migrations/{id}"))
            .await
            .unwrap()
    }

    /// Waits until the migration ended; its view.
    async fn finished(&self, host: usize, id: &str) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.status(host, id).await;
            if matches!(s["phase"].as_str(), Some("completed" | "rolled_back")) {
                return s;
            }
            assert!(t0.elapsed() < Duration::from_secs(180), "stuck: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the migration is in pre-copy with the guest frozen.
    async fn frozen_in_precopy(&self, host: usize, id: &str) -> DependencyOutcome {
        let t0 = Instant::now();
        loop {
            let s = self.status(host, id).await;
            assert_ne!(
                s["phase"], "completed",
                "ended before it could be broken: {s}"
            );
            assert_ne!(s["phase"], "rolled_back", "{s}");
            if s["phase"] == "pre_copy" && !s["dependency"].is_null() {
                let d: DependencyOutcome = serde_json::from_value(s["dependency"].clone()).unwrap();
                assert_eq!(d.fallback_reason, None, "{s}");
                return d;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "never frozen: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the source renewed the freeze at least once.
    async fn renewed(&self, host: usize, id: &str) -> DependencyOutcome {
        let t0 = Instant::now();
        loop {
            let s = self.status(host, id).await;
            assert_eq!(
                s["phase"], "pre_copy",
                "left pre-copy before a renewal: {s}"
            );
            let d = dependency(&s);
            if d.renewals >= 1 {
                assert_eq!(d.renewals_failed, 0, "{s}");
                return d;
            }
            assert!(t0.elapsed() < 3 * RENEW_EVERY, "never renewed: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The guest's taint report through host `host`'s agent. Retried: the first request
    /// on a guest channel that just moved can go unanswered.
    async fn taint(&self, host: usize) -> TaintReport {
        let t0 = Instant::now();
        loop {
            match self.hosts[host].taint(VM).await {
                Ok(r) => return r,
                // A refusal is an answer: only silence is retried.
                Err(e)
                    if t0.elapsed() < Duration::from_secs(40)
                        && !e.to_string().contains("refused") =>
                {
                    eprintln!("taint on h{}: {e}; retrying", host + 1)
                }
                Err(e) => panic!("taint on h{}: {e}", host + 1),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn console(&self, host: usize) -> ConsoleStream {
        let tls = self.state.tls().unwrap();
        let url = &self.state.hosts[host].url;
        let t0 = Instant::now();
        loop {
            match connect(
                url,
                &format!("/v1/vms/{VM}/console"),
                "",
                tls.clone(),
                Duration::from_secs(10),
            )
            .await
            {
                Ok(ws) => return ws,
                // The last attach may not have been let go yet.
                Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                    eprintln!("console on h{}: {e}; retrying", host + 1);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("console on h{}: {e}", host + 1),
            }
        }
    }

    /// Runs `line` in the guest's root shell on host `host`; its output.
    async fn shell(&self, host: usize, line: &str) -> String {
        let mut ws = self.console(host).await;
        let out = ask(&mut ws, &marked(&format!("$({line})")), ">>").await;
        let _ = ws.close(None).await;
        let start = out.find("<<").expect("an answer") + 2;
        out[start..].split(">>").next().unwrap().trim().to_string()
    }

    /// The batch loop's pid, once its shell has written it: it starts in the
    /// background, so the first read can come before the write.
    async fn batch_pid(&self, host: usize) -> u32 {
        for _ in 0..100 {
            if let Ok(pid) = self
                .shell(host, "cat /tmp/batch.pid 2>/dev/null")
                .await
                .parse()
            {
                return pid;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        panic!("the batch loop wrote no pid in 10 s");
    }

    /// The batch loop's count (its first is written just after its pid).
    async fn count(&self, host: usize) -> u64 {
        let mut s = String::new();
        for _ in 0..10 {
            s = self.shell(host, "cat /tmp/batch 2>/dev/null").await;
            if let Ok(n) = s.parse() {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("count {s:?}")
    }

    /// Checks the batch loop counts on host `host`.
    async fn counts(&self, host: usize) {
        let a = self.count(host).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let b = self.count(host).await;
        assert!(
            b > a,
            "the batch loop does not count on h{}: {a} then {b}",
            host + 1
        );
    }

    /// Waits until host `host` holds no copy of the VM.
    async fn gone(&self, host: usize) {
        let t0 = Instant::now();
        while self.hosts[host]
            .list_vms()
            .await
            .unwrap()
            .iter()
            .any(|v| v.info.id == VM)
        {
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "h{} kept its copy",
                host + 1
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A shell command that prints `text` between `<<` and `>>`, written so that the
/// console's echo of the command holds neither.
fn marked(text: &str) -> String {
    format!("echo \"<\"\"<{text}>\"\">\"")
}

/// Types `line` and waits for `answer`; typed again every few seconds until answered
/// (the shell may be frozen, or not up yet).
async fn ask(ws: &mut ConsoleStream, line: &str, answer: &str) -> String {
    let t0 = Instant::now();
    loop {
        ws.send(Message::Binary(format!("{line}\n").into_bytes()))
            .await
            .unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => seen.extend_from_slice(&b),
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("the console ended: {other:?}"),
                Err(_) => break,
            }
            let text = String::from_utf8_lossy(&seen).into_owned();
            if text.contains("<<") && text.contains(answer) {
                return text;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no {answer:?} after typing {line:?}; last read:\n{}",
            String::from_utf8_lossy(&seen)
        );
    }
}

async fn boot(lab: &Lab, img: &tern_hv::image::GuestImage) {
    common::boot_guest(&lab.hosts[0], img, VM, 256).await;
    // A working set for the pre-copy to carry (the writer is a thread of the guest
    // agent, which is never frozen).
    let start = json!({"cmd": "start", "workload": "memdirty --mib 64 --mbps 1"});
    let a = lab.hosts[0].guest(VM, &start).await.unwrap();
    assert_eq!(a["ok"], true, "{a}");
    // The batch loop: its own process, talking to nothing outside the VM.
    // The count goes in by rename: a reader between `>`'s truncation and its write
    // would see an empty file.
    let batch = "sh -c 'echo $$ > /tmp/batch.pid; n=0; while :; do n=$((n+1)); echo $n > /tmp/batch.new; mv /tmp/batch.new /tmp/batch; sleep 0.2; done' </dev/null >/dev/null 2>&1 &";
    let mut ws = lab.console(0).await;
    ask(
        &mut ws,
        &format!("{batch} {}", marked("started")),
        "started>>",
    )
    .await;
    let _ = ws.close(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_is_thawed_whatever_becomes_of_the_migration() {
    if !can_run() {
        return;
    }
    let img = tern_hv::image::ensure_image_async(tern_testkit::test_cache_dir(), |s| {
        eprintln!("image: {s}")
    })
    .await
    .expect("guest image builds");
    let dir = tempfile::tempdir().unwrap();
    let (state, hosts) = common::two_hosts(&dir, 2048).await;
    let lab_dir = state.dir.clone();
    // Not spawned: restarting an agent reports progress through a callback that is not
    // `Sync`. A panic is caught so the lab goes down all the same.
    let outcome = std::panic::AssertUnwindSafe(scenario(Lab { state, hosts }, img))
        .catch_unwind()
        .await;
    lab::down(&lab_dir, &|s| eprintln!("{s}"))
        .await
        .expect("lab down");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn dependency(view: &Value) -> DependencyOutcome {
    serde_json::from_value(view["dependency"].clone())
        .unwrap_or_else(|e| panic!("no dependency outcome ({e}): {view}"))
}

fn kill(pid: Option<u32>) {
    let pid = pid.expect("the agent runs").to_string();
    let ok = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -KILL {pid}");
}

async fn scenario(mut lab: Lab, img: tern_hv::image::GuestImage) {
    boot(&lab, &img).await;
    let batch = lab.batch_pid(0).await;
    lab.counts(0).await;
    let before = lab.taint(0).await;
    let p = before.processes.iter().find(|p| p.pid == batch);
    assert_eq!(
        p.map(|p| p.class),
        Some(TaintClass::Untainted),
        "{before:?}"
    );

    // 1. The guest agent does not answer: the move goes on as adaptive, and says why.
    lab.shell(0, "kill -STOP $(pidof tern-guest); echo stopped")
        .await;
    let id = lab.send(0, 1, None).await;
    let v = lab.finished(0, &id).await;
    assert_eq!(v["phase"], "completed", "{v}");
    let d = dependency(&v);
    let reason = d.fallback_reason.clone().unwrap_or_default();
    assert!(reason.contains("no answer"), "{v}");
    assert_eq!((d.frozen, d.thawed_on), (0, None), "{v}");
    eprintln!("1. fallback: {reason}");
    lab.shell(1, "kill -CONT $(pidof tern-guest); echo continued")
        .await;
    // A freeze that was waiting in the stopped agent's channel may have been carried
    // out late; the guest's own deadline undoes it, a thaw sooner.
    let a = lab.hosts[1].guest(VM, &json!({"cmd": "thaw"})).await;
    eprintln!("1. thaw after continuing: {a:?}");
    assert!(!lab.taint(1).await.frozen);

    // 2. A move that succeeds: frozen for the pre-copy, thawed on the destination.
    let id = lab.send(1, 0, None).await;
    let v = lab.finished(1, &id).await;
    assert_eq!(v["phase"], "completed", "{v}");
    let d = dependency(&v);
    eprintln!("2. completed: {}", v["dependency"]);
    assert_eq!(d.fallback_reason, None, "{v}");
    assert!(d.frozen >= 1, "nothing frozen: {v}");
    assert_eq!(d.thawed_on, Some(ThawSite::Destination), "{v}");
    assert_eq!(d.thaw_error, None, "{v}");
    let thaw = d.thaw.clone().expect("a thaw report");
    assert_eq!(thaw.cause, ThawCause::Host);
    let held = thaw.processes.iter().find(|p| p.pid == batch);
    assert!(
        held.is_some_and(|p| p.frozen_ms > 0.0),
        "the batch loop was not frozen: {thaw:?}"
    );
    let paused = d.batch_paused_ms().unwrap();
    eprintln!(
        "2. batch_paused_ms {paused:.0}, freeze_ms {:.0}",
        thaw.freeze_ms
    );
    let t = lab.taint(0).await;
    assert!(!t.frozen && t.processes.iter().all(|p| !p.frozen), "{t:?}");
    assert_eq!(t.last_thaw.map(|l| l.cause), Some(ThawCause::Host));
    lab.counts(0).await;

    // 2b. What the freeze saves: a second batch process rewrites 32 MiB of its own
    //     (a tmpfs file, guest RAM) from /dev/urandom; moved with `adaptive` it is
    //     pre-copied while it writes, with `dependency-aware` it is frozen and sent once.
    let dirty = "sh -c 'echo $$ > /tmp/dirty.pid; while :; do dd if=/dev/urandom of=/tmp/dirty bs=1M count=32 conv=notrunc 2>/dev/null; done' </dev/null >/dev/null 2>&1 &";
    let mut ws = lab.console(0).await;
    ask(
        &mut ws,
        &format!("{dirty} {}", marked("dirtying")),
        "dirtying>>",
    )
    .await;
    let _ = ws.close(None).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dirty_loop: u32 = lab.shell(0, "cat /tmp/dirty.pid").await.parse().unwrap();
    let mut moved = Vec::new();
    for (from, to, policy) in [(0, 1, "adaptive"), (1, 0, "dependency-aware")] {
        let id = lab.send_with(from, to, Some(MEASURE_MBIT), policy).await;
        let v = lab.finished(from, &id).await;
        assert_eq!(v["phase"], "completed", "{v}");
        let r = &v["result"];
        eprintln!(
            "2b. {policy}: {} bytes, {} rounds, total {} ms, downtime {} ms, throttle {}%, stop {}, {}",
            r["bytes"], r["rounds"], r["total_ms"], r["downtime_ms"], r["max_throttle_percent"],
            r["stop_reason"], v["dependency"]
        );
        moved.push(v);
    }
    // With the writer frozen only the guest agent's slow writer is left: no round has
    // to slow the vCPUs (and with them the processes that serve) to converge.
    let d = dependency(&moved[1]);
    let thaw = d.thaw.expect("thawed");
    // The loop's shell, always: a `dd` only when the freeze came while one ran (between
    // two, the shell's forked child has not become `dd` yet).
    assert!(
        thaw.processes.iter().any(|p| p.pid == dirty_loop),
        "the writer loop {dirty_loop} was not frozen: {thaw:?}"
    );
    assert_eq!(
        moved[1]["result"]["max_throttle_percent"], 0,
        "{}",
        moved[1]
    );
    lab.shell(0, "kill $(cat /tmp/dirty.pid); echo stopped")
        .await;

    // 3. Cancelled during pre-copy: thawed on the source once it runs there again.
    let count = lab.count(0).await;
    let id = lab.send(0, 1, Some(SLOW_MBIT)).await;
    lab.frozen_in_precopy(0, &id).await;
    let t = lab.taint(0).await;
    assert!(t.frozen, "{t:?}");
    assert!(
        t.processes.iter().any(|p| p.pid == batch && p.frozen),
        "{t:?}"
    );
    // Cancelled once the freeze was renewed: the renewals went to the right guest.
    lab.renewed(0, &id).await;
    lab.hosts[0].cancel_migration(&id).await.unwrap();
    let v = lab.finished(0, &id).await;
    assert_eq!(v["phase"], "rolled_back", "{v}");
    let d = dependency(&v);
    eprintln!("3. cancelled: {}", v["dependency"]);
    assert_eq!(d.thawed_on, Some(ThawSite::Source), "{v}");
    assert_eq!(d.thaw.map(|t| t.cause), Some(ThawCause::Host), "{v}");
    assert!(d.renewals >= 1 && d.renewals_failed == 0, "{v}");
    let t = lab.taint(0).await;
    assert!(!t.frozen && t.processes.iter().all(|p| !p.frozen), "{t:?}");
    assert!(lab.count(0).await > count);
    lab.gone(1).await;

    // 4. The source agent killed during pre-copy: nobody renews the freeze; the guest
    //    thaws by itself at the deadline. A new agent adopts the guest.
    let id = lab.send(0, 1, Some(SLOW_MBIT)).await;
    lab.frozen_in_precopy(0, &id).await;
    lab.renewed(0, &id).await;
    kill(lab.state.hosts[0].pid);
    let killed = Instant::now();
    let name = lab.state.hosts[0].name.clone();
    lab::restart_agent(&mut lab.state, &name, &|s| eprintln!("{s}"))
        .await
        .expect("agent restarts");
    let t = loop {
        let t = lab.taint(0).await;
        if !t.frozen {
            break t;
        }
        assert!(
            killed.elapsed() < FREEZE_DEADLINE + Duration::from_secs(20),
            "still frozen {:?} after the source agent died: {t:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let after = killed.elapsed();
    eprintln!("4. thawed by the deadline {after:?} after the source agent was killed");
    assert_eq!(
        t.last_thaw.map(|l| l.cause),
        Some(ThawCause::Deadline),
        "{after:?}"
    );
    lab.counts(0).await;
    // The destination gives up its copy once the streams stay silent.
    lab.gone(1).await;

    // 5. The destination agent killed during pre-copy: rolled back, thawed on the source.
    let id = lab.send(0, 1, Some(SLOW_MBIT)).await;
    lab.frozen_in_precopy(0, &id).await;
    kill(lab.state.hosts[1].pid);
    let v = lab.finished(0, &id).await;
    assert_eq!(v["phase"], "rolled_back", "{v}");
    let d = dependency(&v);
    eprintln!(
        "5. destination killed: {} ({})",
        v["dependency"], v["error"]
    );
    assert_eq!(d.thawed_on, Some(ThawSite::Source), "{v}");
    assert_eq!(d.thaw.map(|t| t.cause), Some(ThawCause::Host), "{v}");
    let t = lab.taint(0).await;
    assert!(!t.frozen && t.processes.iter().all(|p| !p.frozen), "{t:?}");
    lab.counts(0).await;
}
