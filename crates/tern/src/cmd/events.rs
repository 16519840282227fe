//! `tern events`: the manager's event log, and with `--follow` the live stream.

use reqwest::Method;
use serde_json::Value;

use super::host::{call, refused, Conn};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    /// Only events numbered above this.
    #[arg(long, default_value_t = 0)]
    since: u64,
    /// At most this many (without --follow).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Keep printing events as they happen, until interrupted.
    #[arg(long, short)]
    follow: bool,
}

/// One event as a line: number, time, type, then its other fields.
fn line(e: &Value) -> String {
    let mut rest: Vec<String> = e
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| !matches!(k.as_str(), "seq" | "time" | "type"))
        .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"')))
        .collect();
    rest.sort();
    format!(
        "{:>6}  {}  {:<20} {}",
        e["seq"],
        e["time"]
            .as_u64()
            .map_or_else(|| e["time"].to_string(), readable),
        e["type"].as_str().unwrap_or(""),
        rest.join(" ")
    )
}

/// Epoch milliseconds as an RFC 3339 time in UTC, to the millisecond.
pub fn readable(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.replace_millisecond((ms % 1000) as u16).ok());
    t.and_then(|t| {
        t.format(&time::format_description::well_known::Rfc3339)
            .ok()
    })
    .unwrap_or_else(|| ms.to_string())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let c = &a.conn;
    if a.follow {
        let client = c.client()?;
        let json = c.json;
        let rt = tokio::runtime::Runtime::new()?;
        return rt
            .block_on(client.follow_events(a.since, |e| {
                let e = serde_json::to_value(e).expect("an event serialises");
                if json {
                    println!("{e}");
                } else {
                    println!("{}", line(&e));
                }
            }))
            .map_err(refused);
    }
    let path = format!("/v1/events?since={}&limit={}", a.since, a.limit);
    let v = call::<()>(c, Method::GET, &path, None)?;
    if c.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for e in v.as_array().into_iter().flatten() {
            println!("{}", line(e));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_utc_timestamps_to_the_millisecond() {
        assert_eq!(readable(0), "1970-01-01T00:00:00Z");
        assert_eq!(readable(1_796_500_705_123), "2026-12-05T19:58:25.123Z");
        let l = line(&serde_json::json!({
            "seq": 7, "time": 1_796_500_705_000u64, "type": "vm_created", "vm": "web1"
        }));
        assert!(l.contains("2026-12-05T19:58:25Z  vm_created"), "{l}");
        assert!(l.ends_with("vm=web1"), "{l}");
    }
}
