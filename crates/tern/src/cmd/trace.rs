//! `tern trace VM`: the VM's scheduler trace through the manager, which asks the agent of
//! the VM's host (`POST /v1/vms/{name}/trace`) and, when the VM migrates during the
//! window, the agent of its new host for the rest; the same checks, trace file and
//! summary as `tern agent vm trace` (docs/trace.md), with each host's part.

use std::time::Duration;

use super::host::{refused, Conn};
use super::vm::trace::{print, run as record, TraceArgs, MAX_TRACE_BYTES};
use tern_api::trace::ClusterTrace;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    #[command(flatten)]
    trace: TraceArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let options = tern_api::client::ClientOptions {
        max_body_bytes: MAX_TRACE_BYTES,
        // The recording's length, and time for the manager and the agent around it.
        ..tern_api::client::ClientOptions::with_timeout(a.trace.duration + Duration::from_secs(90))
    };
    let client = a.conn.client_with(options)?;
    let rt = tokio::runtime::Runtime::new()?;
    let path = format!("/v1/vms/{}/trace", a.trace.id);
    let report = record(&a.trace, |req| {
        rt.block_on(client.http().post::<_, ClusterTrace>(&path, req))
            .map_err(refused)
    })?;
    if a.conn.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report, &a.trace.out);
    }
    Ok(())
}
