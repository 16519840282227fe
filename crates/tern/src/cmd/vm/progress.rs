//! `tern vm migrate`: starts a migration through the manager and follows it with
//! `GET /v1/migrations/{id}`, drawing the telemetry the manager relays from the source
//! as a progress bar whose fill is the share of memory already current on the destination
//! (it moves inside a round too: the source reports the round it sends as it goes).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;
use tern_api::client::{ClientError, ManagerClient};
use tern_api::manager::MigrateVm;
use tern_model::HostName;

use super::super::host::{refused, Conn};

/// Time between polls of the migration.
const POLL: Duration = Duration::from_millis(200);

/// Failed polls in a row (a manager restarting, a leader changing) before giving up.
const MAX_FAILED_POLLS: u32 = 50;

/// `1.5 GiB`, `120 MiB`, `512 B` (pure).
fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n.max(0.0);
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// `250 ms`, `3.88 s` (pure).
fn millis(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else {
        format!("{ms:.0} ms")
    }
}

/// One line of telemetry (pure): the round being sent (or the last done, between
/// rounds), transferred, remaining, dirty rate, predicted downtime and phase; `null`
/// before the source's first report. The dirty rate and the downtime are measured per
/// round, so they appear once the first round is done; during round 1 the link's rate
/// so far stands in their place.
pub fn describe(p: &Value, memory_bytes: u64) -> String {
    if p.is_null() {
        return format!("starting ({} to copy)", bytes(memory_bytes as f64));
    }
    let num = |k: &str| p[k].as_f64().unwrap_or(0.0);
    let phase = p["phase"].as_str().unwrap_or("?").replace('_', "-");
    let sent = bytes(num("bytes_transferred"));
    let left = bytes(num("bytes_remaining"));
    let running = p["running_round"].as_u64().unwrap_or(0);
    match (p["round"].as_u64().unwrap_or(0), running) {
        (0, 0) => format!("first round | sent {sent} | remaining {left} | {phase}"),
        (0, round) => format!(
            "round {round} | sent {sent} | remaining {left} | link {}/s | {phase}",
            bytes(num("bandwidth_bytes_per_s")),
        ),
        (done, running) => format!(
            "round {} | sent {sent} | remaining {left} | dirty {}/s | downtime ~{} | {phase}",
            running.max(done),
            bytes(num("dirty_rate_bytes_per_s")),
            millis(num("predicted_downtime_ms")),
        ),
    }
}

/// How much of the guest's memory is current on the destination (pure): the bar's fill.
fn current_bytes(p: &Value, memory_bytes: u64) -> u64 {
    memory_bytes.saturating_sub(p["bytes_remaining"].as_u64().unwrap_or(memory_bytes))
}

/// The migration's final record, with what was seen of it on the way (pure).
fn summary(record: &Value, last: &Value, updates: u32) -> Value {
    let mut out = record.clone();
    out["last_progress"] = last.clone();
    out["progress_updates"] = updates.into();
    out
}

pub fn migrate(
    c: &Conn,
    name: &str,
    to: Option<HostName>,
    policy: Option<tern_api::migration::PolicyKind>,
    no_wait: bool,
) -> anyhow::Result<()> {
    let client = c.client()?;
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(follow(&client, c.json, name, to, policy, no_wait))
}

async fn follow(
    client: &ManagerClient,
    json_out: bool,
    name: &str,
    to: Option<HostName>,
    policy: Option<tern_api::migration::PolicyKind>,
    no_wait: bool,
) -> anyhow::Result<()> {
    let http = client.http();
    let vm: Value = http
        .get(&format!("/v1/vms/{name}"))
        .await
        .map_err(refused)?;
    let memory = vm["spec"]["memory_mib"].as_u64().unwrap_or(0) << 20;
    let body = MigrateVm { to, policy };
    let started: Value = http
        .post(&format!("/v1/vms/{name}/migrate"), &body)
        .await
        .map_err(refused)?;
    let id = started["id"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("the manager's answer has no migration id: {started}"))?;
    let route = format!(
        "{} -> {} ({})",
        started["from"].as_str().unwrap_or("?"),
        started["to"].as_str().unwrap_or("?"),
        started["policy"].as_str().unwrap_or("?")
    );
    if no_wait {
        if json_out {
            println!("{}", serde_json::to_string_pretty(&started)?);
        } else {
            println!("migration {id} of {name} started: {route}; `tern vm show {name}` follows it");
        }
        return Ok(());
    }
    let drawn = !json_out && std::io::stdout().is_terminal();
    let bar = ProgressBar::with_draw_target(
        Some(memory),
        if drawn {
            ProgressDrawTarget::stdout()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template("{spinner} {prefix} [{bar:24}] {percent:>3}% {msg}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("{name} {route}"));
    bar.set_message(describe(&Value::Null, memory));
    bar.enable_steady_tick(Duration::from_millis(120));
    let (mut last, mut updates, mut failures) = (Value::Null, 0u32, 0u32);
    let record = loop {
        match http.get::<Value>(&format!("/v1/migrations/{id}")).await {
            Ok(m) if !m["finished"].is_null() => break m,
            Ok(m) => {
                failures = 0;
                let p = &m["progress"];
                if !p.is_null() && *p != last {
                    updates += 1;
                    bar.set_position(current_bytes(p, memory));
                    bar.set_message(describe(p, memory));
                    last = p.clone();
                }
            }
            Err(
                e @ ClientError::Remote {
                    status: 400..=499, ..
                },
            ) => return Err(refused(e)),
            Err(e) => {
                failures += 1;
                if failures >= MAX_FAILED_POLLS {
                    bar.abandon();
                    return Err(anyhow::anyhow!(
                        "lost the manager while migration {id} ran ({e}); \
                         `tern vm show {name}` tells how it ended"
                    ));
                }
            }
        }
        tokio::time::sleep(POLL).await;
    };
    bar.finish_and_clear();
    let result = &record["result"];
    if drawn {
        if result["status"] == "succeeded" {
            println!(
                "migrated {name} {route}: total {:.2} s, downtime {} ms",
                result["total_ms"].as_f64().unwrap_or(0.0) / 1e3,
                result["downtime_ms"],
            );
        }
    } else {
        println!(
            "{}",
            serde_json::to_string_pretty(&summary(&record, &last, updates))?
        );
    }
    if result["status"] != "succeeded" {
        return Err(anyhow::anyhow!(
            "migration {id} of {name} ({route}) failed: {}; the VM keeps running on {}",
            result["error"].as_str().unwrap_or("no reason given"),
            record["from"].as_str().unwrap_or("its host")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
    }

    #[test]
    fn a_line_names_round_bytes_rate_and_phase() {
        let p = json!({"phase": "pre_copy", "round": 3, "bytes_transferred": 3u64 << 30,
                       "bytes_remaining": 128u64 << 20, "dirty_rate_bytes_per_s": 40.0 * 1048576.0,
                       "predicted_downtime_ms": 251.4});
        assert_eq!(
            describe(&p, 2 << 30),
            "round 3 | sent 3.0 GiB | remaining 128.0 MiB | dirty 40.0 MiB/s | downtime ~251 ms | pre-copy"
        );
        assert!(describe(&Value::Null, 2 << 30).contains("2.0 GiB to copy"));
        let first = json!({"phase": "pre_copy", "round": 0, "bytes_transferred": 0,
                           "bytes_remaining": 2u64 << 30});
        assert_eq!(
            describe(&first, 2 << 30),
            "first round | sent 0 B | remaining 2.0 GiB | pre-copy"
        );
        // Part way into round 1, and into round 4 after three.
        let during = json!({"phase": "pre_copy", "round": 0, "running_round": 1,
                            "bytes_transferred": 1u64 << 30, "bytes_remaining": 1u64 << 30,
                            "bandwidth_bytes_per_s": 110.0 * 1048576.0});
        assert_eq!(
            describe(&during, 2 << 30),
            "round 1 | sent 1.0 GiB | remaining 1.0 GiB | link 110.0 MiB/s | pre-copy"
        );
        assert_eq!(current_bytes(&during, 2 << 30), 1 << 30);
        let mut later = p.clone();
        later["running_round"] = 4.into();
        assert!(describe(&later, 2 << 30).starts_with("round 4 | sent 3.0 GiB"));
        assert_eq!(millis(3880.0), "3.88 s");
        assert_eq!(current_bytes(&p, 2 << 30), (2 << 30) - (128 << 20));
        assert_eq!(current_bytes(&Value::Null, 1024), 0);
    }

    #[test]
    fn the_summary_keeps_the_record_and_adds_what_was_seen() {
        let r = json!({"id": 4, "result": {"status": "succeeded"}});
        let s = summary(&r, &json!({"round": 2}), 5);
        assert_eq!(s["id"], 4);
        assert_eq!(s["last_progress"]["round"], 2);
        assert_eq!(s["progress_updates"], 5);
    }
}
