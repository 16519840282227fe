//! A small async QMP client over a Unix socket, with a timeout on every command.
//!
//! Why not the `qapi` crate: its generated schema crates are large to build on a 2-core
//! machine and the few commands tern uses (`cont`, `stop`, `quit`, `query-status`,
//! `query-cpus-fast`, the migration commands) need no typed schema. QMP is JSON lines:
//!
//! ```text
//! QEMU → {"QMP": {...}}                       greeting
//!      ← {"execute": "qmp_capabilities"}      leave negotiation mode
//!      ← {"execute": CMD, "arguments": {...}, "id": N}
//! QEMU → {"event": ...}*  then  {"return": ..., "id": N} | {"error": {...}, "id": N}
//! ```
//! Replies carry our `id`, so a reply that arrives after its command timed out is
//! recognised and skipped instead of being taken for the next command's answer.

use crate::error::{HvError, Result};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

/// Default time QEMU gets to answer one command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// One line from QEMU, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Greeting(Value),
    Event(Value),
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
}

/// Classifies one JSON line from QEMU (pure).
pub fn parse_message(line: &str) -> Result<Message> {
    let v: Value = serde_json::from_str(line).map_err(|source| HvError::BadJson {
        line: line.to_string(),
        source,
    })?;
    let id = v.get("id").and_then(Value::as_u64);
    if let Some(r) = v.get("return") {
        return Ok(Message::Return {
            id,
            value: r.clone(),
        });
    }
    if let Some(e) = v.get("error") {
        let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        return Ok(Message::Error {
            id,
            class: s("class"),
            desc: s("desc"),
        });
    }
    if v.get("event").is_some() {
        return Ok(Message::Event(v));
    }
    if let Some(g) = v.get("QMP") {
        return Ok(Message::Greeting(g.clone()));
    }
    Err(HvError::Protocol(format!("unexpected QMP message: {line}")))
}

/// The line that sends `command` (pure).
pub fn encode_command(id: u64, command: &str, args: Option<&Value>) -> String {
    let mut v = json!({ "execute": command, "id": id });
    if let Some(a) = args {
        v["arguments"] = a.clone();
    }
    let mut s = v.to_string();
    s.push('\n');
    s
}

/// A connected QMP session in command mode.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
    timeout: Duration,
    /// Events seen while waiting for replies, oldest first, for callers that care (e.g.
    /// `SHUTDOWN`, `MIGRATION`).
    events: Vec<Value>,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| HvError::Timeout {
                command: "connect".into(),
                ms: timeout.as_millis() as u64,
            })?
            .map_err(HvError::io(format!(
                "connecting to QMP at {}",
                path.display()
            )))?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
            timeout,
            events: Vec::new(),
        };
        match tokio::time::timeout(timeout, qmp.read_message()).await {
            Ok(Ok(Message::Greeting(_))) => {}
            Ok(Ok(m)) => return Err(HvError::Protocol(format!("expected greeting, got {m:?}"))),
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(HvError::Timeout {
                    command: "greeting".into(),
                    ms: timeout.as_millis() as u64,
                })
            }
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs `command` with the session's timeout and returns its `return` value.
    pub async fn execute(&mut self, command: &str, args: Option<Value>) -> Result<Value> {
        let t = self.timeout;
        self.execute_timeout(command, args, t).await
    }

    /// Runs `command`, waiting at most `timeout` for the reply.
    pub async fn execute_timeout(
        &mut self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let line = encode_command(id, command, args.as_ref());
        let fut = async {
            self.writer
                .write_all(line.as_bytes())
                .await
                .map_err(HvError::io(format!("sending QMP {command}")))?;
            loop {
                match self.read_message().await? {
                    Message::Return { id: Some(r), value } if r == id => return Ok(value),
                    Message::Error {
                        id: Some(r),
                        class,
                        desc,
                    } if r == id => {
                        return Err(HvError::Qmp {
                            command: command.to_string(),
                            class,
                            desc,
                        })
                    }
                    Message::Event(e) => self.events.push(e),
                    // A late reply to an earlier command that timed out.
                    _ => {}
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| HvError::Timeout {
                command: command.to_string(),
                ms: timeout.as_millis() as u64,
            })?
    }

    /// Events received so far; the buffer is emptied.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    async fn read_message(&mut self) -> Result<Message> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .await
                .map_err(HvError::io("reading from QMP"))?;
            if n == 0 {
                return Err(HvError::Protocol("QEMU closed the QMP socket".into()));
            }
            if !line.trim().is_empty() {
                return parse_message(line.trim());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_messages() {
        assert!(matches!(
            parse_message(r#"{"QMP": {"version": {}, "capabilities": []}}"#).unwrap(),
            Message::Greeting(_)
        ));
        assert_eq!(
            parse_message(r#"{"return": {}, "id": 3}"#).unwrap(),
            Message::Return {
                id: Some(3),
                value: json!({})
            }
        );
        assert_eq!(
            parse_message(r#"{"error": {"class": "GenericError", "desc": "no"}, "id": 4}"#)
                .unwrap(),
            Message::Error {
                id: Some(4),
                class: "GenericError".into(),
                desc: "no".into()
            }
        );
        assert!(matches!(
            parse_message(r#"{"event": "STOP", "timestamp": {}}"#).unwrap(),
            Message::Event(_)
        ));
        assert!(parse_message("{").is_err());
        assert!(parse_message("{}").is_err());
    }

    proptest::proptest! {
        // Whatever QEMU (or a corrupted socket) sends, the parser answers, never panics.
        #[test]
        fn parser_never_panics(line in ".{0,200}") {
            let _ = parse_message(&line);
        }

        #[test]
        fn replies_keep_their_id(id in proptest::prelude::any::<u64>()) {
            let line = json!({"return": {}, "id": id}).to_string();
            proptest::prop_assert_eq!(parse_message(&line).unwrap(), Message::Return { id: Some(id), value: json!({}) });
        }
    }

    #[test]
    fn encodes_commands() {
        let l = encode_command(7, "migrate", Some(&json!({"uri": "tcp:1.2.3.4:5"})));
        assert!(l.ends_with('\n'));
        let v: Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["execute"], "migrate");
        assert_eq!(v["id"], 7);
        assert_eq!(v["arguments"]["uri"], "tcp:1.2.3.4:5");
        let v: Value = serde_json::from_str(&encode_command(1, "cont", None)).unwrap();
        assert!(v.get("arguments").is_none());
    }
}
