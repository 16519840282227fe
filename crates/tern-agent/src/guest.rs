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

impl GuestChannels {
    /// Sends `req` to the guest of VM `vm` through `socket` and returns its answer.
    pub async fn request(
        &self,
        vm: &str,
        socket: &Path,
        req: Value,
        timeout: Duration,
    ) -> Result<Value, AgentError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let req = with_id(req, id).map_err(AgentError::BadRequest)?;
        let slot = self
            .conns
            .lock()
            .expect("guest channel table lock")
            .entry(vm.to_string())
            .or_default()
            .clone();
        let mut conn = slot.lock().await;
        let err = |reason: String| AgentError::Guest {
            id: vm.to_string(),
            reason,
        };
        let io = |step: &'static str| {
            move |source: std::io::Error| AgentError::GuestChannel {
                id: vm.to_string(),
                step,
                source,
            }
        };
        let result = tokio::time::timeout(timeout, async {
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
                .map_err(io("sending"))?;
            loop {
                let mut buf = String::new();
                let n = c.reader.read_line(&mut buf).await.map_err(io("reading"))?;
                if n == 0 {
                    return Err(err("the guest closed the channel".to_string()));
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
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                *conn = None;
                Err(e)
            }
            Err(_) => Err(err(format!("no answer within {} ms", timeout.as_millis()))),
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
        let v = self.request(vm, socket, req, timeout).await?;
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

    /// Drops the connection of a VM that is gone or moved.
    pub fn forget(&self, vm: &str) {
        self.conns
            .lock()
            .expect("guest channel table lock")
            .remove(vm);
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
}
