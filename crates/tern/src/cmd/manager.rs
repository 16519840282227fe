//! `tern manager`: the control plane, serving its REST API and driving the agents.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_manager::client::http::HttpConnector;
use tern_manager::control::Control;
use tern_manager::manager::system_clock;
use tern_manager::store::SqliteStore;
use tern_manager::Manager;

#[derive(clap::Args)]
pub struct Args {
    /// Address the API listens on, e.g. 127.0.0.1:7080 (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7080")]
    listen: String,
    /// SQLite file holding the cluster's state (created if missing).
    #[arg(long, default_value = "tern.db")]
    db: PathBuf,
    /// Bearer token API clients must send; several may be given.
    #[arg(long = "token", env = "TERN_TOKEN", value_delimiter = ',')]
    tokens: Vec<String>,
    /// Bearer token of the agents (default: the first API token).
    #[arg(long, env = "TERN_AGENT_TOKEN")]
    agent_token: Option<String>,
    /// Seconds an agent call may take before it counts as failed.
    #[arg(long, default_value_t = 30)]
    agent_timeout_s: u64,
    /// etcd client URLs (http://HOST:PORT, comma-separated): keep the state there instead
    /// of --db, shared with other managers; one leads, the others pass requests to it.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// With --etcd: the URL other managers reach this one by (default: http://LISTEN).
    #[arg(long)]
    advertise: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let tokens: Vec<String> = a.tokens.into_iter().filter(|t| !t.is_empty()).collect();
    if tokens.is_empty() {
        return Err(super::bad_input(
            "no API token: give --token TOKEN or set TERN_TOKEN (clients send it as \
             'Authorization: Bearer TOKEN')",
        ));
    }
    let addr: std::net::SocketAddr = a.listen.parse().map_err(|e| {
        super::bad_input(format!(
            "--listen {:?}: {e}; give HOST:PORT, e.g. 127.0.0.1:7080",
            a.listen
        ))
    })?;
    if !a.etcd.is_empty() {
        return super::manager_etcd::run(super::manager_etcd::Options {
            listen: addr,
            agent_token: a.agent_token.unwrap_or_else(|| tokens[0].clone()),
            tokens,
            agent_timeout: Duration::from_secs(a.agent_timeout_s),
            etcd: a.etcd,
            advertise: a.advertise,
        });
    }
    let store = SqliteStore::open(&a.db).map_err(|e| match e {
        tern_manager::Error::SchemaTooNew { .. } => super::bad_input(e),
        e => anyhow::Error::new(e).context(format!("opening {}", a.db.display())),
    })?;
    let manager = Arc::new(Manager::open(Box::new(store), system_clock())?);
    let agent_token = a.agent_token.unwrap_or_else(|| tokens[0].clone());
    let agents = Arc::new(HttpConnector::new(
        &agent_token,
        Duration::from_secs(a.agent_timeout_s),
    ));
    let control = Control::new(manager.clone(), agents);
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!(
            "tern manager: API on http://{} (OpenAPI at /openapi.json), state in {}",
            listener.local_addr()?,
            a.db.display()
        );
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let signal = async move {
            let _ = tokio::signal::ctrl_c().await;
            let _ = stop_tx.send(true);
        };
        tokio::spawn(signal);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let looping = tokio::spawn(control.run(wait(stop_rx.clone())));
        tern_manager::api::serve(listener, manager, tokens, wait(stop_rx)).await?;
        looping.await?;
        eprintln!("tern manager: stopped");
        anyhow::Ok(())
    })
}
