//! What the tests that run real guests under `tern agent` share.

use std::time::{Duration, Instant};

use serde_json::json;
use tern_agent::client::AgentClient;

/// The verifier counter of the guest of VM `vm`, checked (its memory checksum holds);
/// retried for 30 s while the guest's agent does not answer.
pub async fn guest_counter(agent: &AgentClient, vm: &str) -> u64 {
    let t0 = Instant::now();
    loop {
        match agent.guest(vm, &json!({"cmd": "verify"})).await {
            Ok(v) if v["ok"] == true => {
                assert_eq!(v["result"]["ok"], true, "checksum: {v}");
                return v["result"]["counter"].as_u64().unwrap();
            }
            r if t0.elapsed() < Duration::from_secs(30) => {
                eprintln!("guest {vm}: {r:?}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => panic!("guest {vm} does not answer: {r:?}"),
        }
    }
}
