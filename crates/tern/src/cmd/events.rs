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
        e["time"],
        e["type"].as_str().unwrap_or(""),
        rest.join(" ")
    )
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
