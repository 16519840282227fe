//! The channel to each VM's guest agent (`tern-guest`): JSON lines over the VM's
//! virtio-serial socket. The agent numbers requests itself and waits for the answer with
//! the same `id`, so a late answer to a request that timed out is skipped, not misread.

use crate::error::AgentError;
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use tern_api::guest::{Command, Reply, Response};

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

type Slot = Arc<tokio::sync::Mutex<Option<Conn>>>;

/// One lazily opened connection per VM, reused across requests.
#[derive(Default)]
pub struct GuestChannels {
    conns: Mutex<HashMap<String, Slot>>,
    next_id: AtomicU64,
}

/// Puts our request id into a guest request (pure); the request must be a JSON object.
pub fn with_id(mut req: Value, id: u64) -> Result<Value, String> {
    let obj = req
        .as_object_mut()
        .ok_or("a guest request is a JSON object, e.g. {\"cmd\": \"ping\"}")?;
    if !obj.contains_key("cmd") {
        return Err("a guest request needs a \"cmd\" field, e.g. {\"cmd\": \"status\"}".into());
    }
    obj.insert("id".into(), Value::from(id));
    Ok(req)
}

/// A request written to a guest whose answer is still to be read; holds the VM's
/// channel so no other request interleaves.
pub struct Pending {
    vm: String,
    id: u64,
    conn: tokio::sync::OwnedMutexGuard<Option<Conn>>,
    started: std::time::Instant,
}

impl GuestChannels {
    /// Sends `req` to the guest of VM `vm` through `socket` and returns its answer.
    pub async fn request(
        &self,
        vm: &str,
        socket: &Path,
        req: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let pending = self.send(vm, socket, req, timeout).await?;
        pending
            .answer(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await
    }

    /// Writes `req` to the guest of VM `vm` (opening its channel if need be) without
    /// waiting for the answer: a request sent to a paused VM is read the moment it runs.
    pub async fn send(
        &self,
        vm: &str,
        socket: &Path,
        req: Value,
        timeout: Duration,
    ) -> Result<Pending, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let req = with_id(req, id).map_err(AgentError::BadRequest)?;
        let slot = self
            .conns
            .lock()
            .expect("guest channel table lock")
            .entry(vm.to_string())
            .or_default()
            .clone();
        let started = std::time::Instant::now();
        let mut conn = match tokio::time::timeout(timeout, slot.lock_owned()).await {
            Ok(c) => c,
            Err(_) => return Err(no_answer(vm, timeout)),
        };
        let io = |step: &'static str| {
            move |source: std::io::Error| AgentError::GuestChannel {
                id: vm.to_string(),
                step,
                source,
            }
        };
        let sent = tokio::time::timeout(timeout, async {
            if conn.is_none() {
                let s = UnixStream::connect(socket)
                    .await
                    .map_err(io("opening its channel"))?;
                let (r, w) = s.into_split();
                *conn = Some(Conn {
                    reader: BufReader::new(r),
                    writer: w,
                });
            }
            let c = conn.as_mut().expect("connection just opened");
            let mut line = req.to_string();
            line.push('\n');
            c.writer
                .write_all(line.as_bytes())
                .await
                .map_err(io("sending"))
        })
        .await;
        match sent {
            Ok(Ok(())) => Ok(Pending {
                vm: vm.to_string(),
                id,
                conn,
                started,
            }),
            Ok(Err(e)) => {
                *conn = None;
                Err(e)
            }
            Err(_) => {
                *conn = None;
                Err(no_answer(vm, timeout))
            }
        }
    }

    /// Sends one typed command and returns the guest's reply; a guest that refuses it
    /// (`ok: false`) is an error carrying the guest's reason.
    pub async fn call(
        &self,
        vm: &str,
        socket: &Path,
        cmd: &Command,
        timeout: Duration,
    ) -> Result<Reply, AgentError> {
        let req = serde_json::to_value(cmd).expect("guest commands serialise");
        typed_reply(vm, self.request(vm, socket, req, timeout).await?)
    }

    /// Writes one typed command; [`Pending::reply`] reads the guest's reply later.
    pub async fn send_command(
        &self,
        vm: &str,
        socket: &Path,
        cmd: &Command,
        timeout: Duration,
    ) -> Result<Pending, AgentError> {
        let req = serde_json::to_value(cmd).expect("guest commands serialise");
        self.send(vm, socket, req, timeout).await
    }

    /// Drops the connection of a VM that is gone or moved.
    pub fn forget(&self, vm: &str) {
        self.conns
            .lock()
            .expect("guest channel table lock")
            .remove(vm);
    }
}

/// A guest's answer as its typed reply; a refusal (`ok: false`) carries the guest's reason.
fn typed_reply(vm: &str, v: Value) -> Result<Reply, AgentError> {
    let refused = |reason: String| AgentError::Guest {
        id: vm.to_string(),
        reason,
    };
    let resp: Response =
        serde_json::from_value(v).map_err(|e| refused(format!("unreadable answer: {e}")))?;
    match (resp.ok, resp.result) {
        (true, Some(r)) => Ok(r),
        (true, None) => Err(refused("an answer without a result".into())),
        (false, _) => Err(AgentError::GuestRefused {
            id: vm.to_string(),
            reason: resp.error.unwrap_or_default(),
        }),
    }
}

fn no_answer(vm: &str, timeout: Duration) -> AgentError {
    AgentError::Guest {
        id: vm.to_string(),
        reason: format!("no answer within {} ms", timeout.as_millis()),
    }
}

impl Pending {
    /// [`Pending::answer`] as the guest's typed reply.
    pub async fn reply(self, timeout: Duration) -> Result<Reply, AgentError> {
        let vm = self.vm.clone();
        typed_reply(&vm, self.answer(timeout).await?)
    }

    /// The guest's answer to the request sent, skipping lines that are not it.
    pub async fn answer(self, timeout: Duration) -> Result<Value, AgentError> {
        let Pending {
            vm,
            id,
            mut conn,
            started,
        } = self;
        let vm = vm.as_str();
        let result = tokio::time::timeout(timeout, async {
            let c = conn.as_mut().expect("a pending request has its channel");
            loop {
                let mut buf = String::new();
                let n = c.reader.read_line(&mut buf).await.map_err(|source| {
                    AgentError::GuestChannel {
                        id: vm.to_string(),
                        step: "reading",
                        source,
                    }
                })?;
                if n == 0 {
                    return Err(AgentError::Guest {
                        id: vm.to_string(),
                        reason: "the guest closed the channel".to_string(),
                    });
                }
                // Lines that are not JSON (a guest console echo) or answer another id are skipped.
                if let Ok(v) = serde_json::from_str::<Value>(buf.trim()) {
                    if v.get("id").and_then(Value::as_u64) == Some(id) {
                        return Ok(v);
                    }
                }
            }
        })
        .await;
        tracing::debug!(
            vm,
            id,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "guest request ended"
        );
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                *conn = None;
                Err(e)
            }
            Err(_) => Err(no_answer(vm, timeout)),
        }
    }
}

impl crate::state::AppState {
    /// The socket of VM `vm`'s guest channel on this host.
    pub async fn guest_socket(&self, vm: &str) -> Result<std::path::PathBuf, AgentError> {
        let info = self.hv.info(vm).await?;
        info.control_socket.ok_or_else(|| AgentError::Guest {
            id: vm.to_string(),
            reason: format!("the {} driver has no guest channel", self.hv.kind()),
        })
    }

    /// One typed command to VM `vm`'s guest agent; its reply or its refusal.
    pub async fn call_guest(
        &self,
        vm: &str,
        cmd: &Command,
        timeout: Duration,
    ) -> Result<Reply, AgentError> {
        let socket = self.guest_socket(vm).await?;
        self.guests.call(vm, &socket, cmd, timeout).await
    }

    /// Writes one typed command to VM `vm`'s guest agent; its reply is read later.
    pub async fn send_guest(
        &self,
        vm: &str,
        cmd: &Command,
        timeout: Duration,
    ) -> Result<Pending, AgentError> {
        let socket = self.guest_socket(vm).await?;
        self.guests.send_command(vm, &socket, cmd, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ids_are_ours() {
        let r = with_id(json!({"cmd": "ping", "id": 99}), 3).unwrap();
        assert_eq!(r["id"], 3);
        assert!(with_id(json!("ping"), 1).is_err());
        assert!(with_id(json!({"x": 1}), 1).is_err());
    }

    #[tokio::test]
    async fn talks_json_lines_and_skips_stale_answers() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("g.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        // A stand-in guest on a real socket: answers first with a stale id, then correctly.
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Some(l) = lines.next_line().await.unwrap() {
                let v: Value = serde_json::from_str(&l).unwrap();
                let id = v["id"].as_u64().unwrap();
                let stale = json!({"id": id + 1000, "ok": true});
                let real = json!({"id": id, "ok": true, "result": {"kind": "pong"}});
                w.write_all(format!("noise\n{stale}\n{real}\n").as_bytes())
                    .await
                    .unwrap();
            }
        });
        let ch = GuestChannels::default();
        for _ in 0..2 {
            let v = ch
                .request("vm", &sock, json!({"cmd": "ping"}), Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(v["result"]["kind"], "pong");
        }
        let missing = ch
            .request(
                "other",
                &dir.path().join("none"),
                json!({"cmd": "ping"}),
                Duration::from_secs(1),
            )
            .await
            .unwrap_err();
        assert_eq!(missing.status().as_u16(), 502);
    }

    #[tokio::test]
    async fn a_request_sent_before_the_guest_reads_is_answered_later_and_holds_the_channel() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("g.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        // A stand-in for a paused guest: it reads nothing until told to run.
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            wait.await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Some(l) = lines.next_line().await.unwrap() {
                let v: Value = serde_json::from_str(&l).unwrap();
                let answer = json!({"id": v["id"], "ok": true,
                    "result": {"kind": "pong", "version": "t", "uptime_s": 1.0}});
                w.write_all(format!("{answer}\n").as_bytes()).await.unwrap();
            }
        });
        let ch = Arc::new(GuestChannels::default());
        let pending = ch
            .send_command("vm", &sock, &Command::Ping, Duration::from_secs(5))
            .await
            .unwrap();
        // A second request waits for the channel the first one holds.
        let second = {
            let ch = ch.clone();
            let sock = sock.clone();
            tokio::spawn(async move {
                let p = ch
                    .send_command("vm", &sock, &Command::Ping, Duration::from_secs(5))
                    .await?;
                p.reply(Duration::from_secs(5)).await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!second.is_finished());
        go.send(()).unwrap();
        assert!(matches!(
            pending.reply(Duration::from_secs(5)).await.unwrap(),
            Reply::Pong { .. }
        ));
        assert!(matches!(second.await.unwrap().unwrap(), Reply::Pong { .. }));
    }

    #[tokio::test]
    async fn an_unanswered_request_times_out_with_the_wait_named() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("g.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let held = tokio::spawn(async move { listener.accept().await.unwrap() });
        let ch = GuestChannels::default();
        let pending = ch
            .send_command("vm", &sock, &Command::Ping, Duration::from_secs(5))
            .await
            .unwrap();
        let e = pending.reply(Duration::from_millis(100)).await.unwrap_err();
        assert!(e.to_string().contains("no answer within 100 ms"), "{e}");
        drop(held);
    }
}
