//! `tern manager`: the control plane, serving its REST API and driving the agents.
//!
//! With `--ca DIR` the manager holds the cluster CA (created on first start): its API
//! is HTTPS with a certificate from that CA, hosts enrol with one-time join tokens,
//! renew their leases with their own certificates, and are called over mutual TLS
//! only; the revocation list is re-read from DIR every `--crl-refresh-s`. Without it
//! the API is plain HTTP and only on a loopback address. HA managers (`--etcd`) take
//! the same `--ca DIR`, each with a certificate of its own.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_manager::api::Serving;
use tern_manager::client::http::HttpConnector;
use tern_manager::control::Control;
use tern_manager::manager::system_clock;
use tern_manager::store::SqliteStore;
use tern_manager::Manager;
use tern_pki::tls::{client_config_with, server_config_with, ClientAuth};
use tern_pki::{Ca, Role, TlsAcceptor, Trust};

#[derive(clap::Args)]
pub struct Args {
    /// Address the API listens on, e.g. 127.0.0.1:7080 (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:7080")]
    listen: String,
    /// SQLite file holding the cluster's state (created if missing, mode 0600).
    #[arg(long, default_value = "tern.db")]
    db: PathBuf,
    /// Directory holding the image catalogue's files (`tern image import`; created if
    /// missing, mode 0700) [default: `catalog` beside --db]. Managers sharing one etcd
    /// must see one directory (an NFS mount), as they share --ca.
    #[arg(long, value_name = "DIR")]
    catalog: Option<PathBuf>,
    /// The hosts' network guests get static addresses on (IPv4 CIDR, e.g.
    /// 198.18.0.0/24): `tern vm create --nic` hands each VM the first free one.
    #[arg(long, value_name = "CIDR")]
    guest_network: Option<String>,
    /// The gateway guests on --guest-network are told.
    #[arg(long, value_name = "IP", requires = "guest_network")]
    guest_gateway: Option<String>,
    /// The cluster CA's directory (created if missing, or one `tern lab up` made; with
    /// --etcd it must exist, from `tern ca init`): the API becomes HTTPS, hosts join with
    /// tokens, agents are called over mutual TLS.
    #[arg(long, value_name = "DIR")]
    ca: Option<PathBuf>,
    /// Files whose first line is a bearer token API clients may send (mode 0600); the
    /// TERN_TOKEN environment variable adds comma-separated ones.
    #[arg(long = "token-file", value_name = "FILE")]
    token_files: Vec<PathBuf>,
    /// File holding the agents' bearer token, for agents without TLS (default: the
    /// first API token); or TERN_AGENT_TOKEN.
    #[arg(long, value_name = "FILE")]
    agent_token_file: Option<PathBuf>,
    /// Seconds an agent call may take before it counts as failed.
    #[arg(long, default_value_t = 30)]
    agent_timeout_s: u64,
    /// etcd client URLs (http://HOST:PORT, comma-separated): keep the state there instead
    /// of --db, shared with other managers; one leads, the others pass requests to it.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// With --etcd: the URL other managers reach this one by (default: http://LISTEN,
    /// or https://LISTEN with --ca); with --ca its host goes into this manager's
    /// certificate.
    #[arg(long)]
    advertise: Option<String>,
    /// With --ca: seconds between re-reads of the CA directory's revocation list (for
    /// revocations made by `tern ca revoke` or another manager).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    crl_refresh_s: u64,
    /// Seconds a guest must be reported panicked or unresponsive before its VM's HA
    /// policy acts (docs/manager.md, "Guest health").
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(0..=86400))]
    guest_grace_s: u64,
    /// Seconds HA waits after restarting a guest before it may restart it again;
    /// doubled for each further restart in the window.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=86400))]
    guest_backoff_s: u64,
    /// Guest restarts allowed within --guest-window-s; a guest down again after that
    /// many is left `failed`.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    guest_max_restarts: u32,
    /// The window, in seconds, within which --guest-max-restarts counts restarts.
    #[arg(long, default_value_t = 1800, value_parser = clap::value_parser!(u64).range(1..=604800))]
    guest_window_s: u64,
}

impl Args {
    /// How HA treats guests that stopped, from the flags.
    fn ha_limits(&self) -> tern_manager::decide::guest::HaLimits {
        tern_manager::decide::guest::HaLimits {
            grace_ms: self.guest_grace_s * 1000,
            backoff_ms: self.guest_backoff_s * 1000,
            max_restarts: self.guest_max_restarts,
            window_ms: self.guest_window_s * 1000,
        }
    }
}

/// The API tokens: from files, then from TERN_TOKEN; never from the command line, where
/// every user of the machine can read them.
fn api_tokens(files: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut tokens = Vec::new();
    for f in files {
        tokens.push(tern_pki::files::read_token(f).map_err(super::bad_input)?);
    }
    if let Ok(env) = std::env::var("TERN_TOKEN") {
        tokens.extend(env.split(',').map(str::trim).map(String::from));
    }
    tokens.retain(|t| !t.is_empty());
    if tokens.is_empty() {
        return Err(super::bad_input(
            "no API token: give --token-file FILE (first line: the token, mode 0600) or set \
             TERN_TOKEN (clients send it as 'Authorization: Bearer TOKEN')",
        ));
    }
    Ok(tokens)
}

fn agent_token(a: &Args, tokens: &[String]) -> anyhow::Result<String> {
    if let Some(f) = &a.agent_token_file {
        return tern_pki::files::read_token(f).map_err(super::bad_input);
    }
    Ok(std::env::var("TERN_AGENT_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| tokens[0].clone()))
}

/// `--guest-network` and `--guest-gateway`, checked.
fn guest_network(a: &Args) -> anyhow::Result<Option<tern_manager::decide::network::GuestNetwork>> {
    a.guest_network
        .as_deref()
        .map(|n| {
            tern_manager::decide::network::GuestNetwork::parse(n, a.guest_gateway.as_deref())
                .map_err(|e| super::bad_input(format!("--guest-network: {e}")))
        })
        .transpose()
}

/// The catalogue directory: `dir`, or `catalog` beside `db`; made 0700 if missing, as
/// it holds what every VM boots.
pub fn catalog_dir(dir: Option<&Path>, db: &Path) -> anyhow::Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.to_path_buf(),
        None => db
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("catalog"),
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| super::bad_input(format!("--catalog {}: {e}", dir.display())))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("--catalog {}", dir.display()))?;
    Ok(dir)
}

/// Opens the database, created 0600 (SQLite gives its journal files the same mode).
fn open_db(db: &Path) -> anyhow::Result<SqliteStore> {
    if !db.exists() {
        tern_pki::files::write_private(db, b"")?;
    }
    tern_pki::files::make_private(db)?;
    for side in ["-wal", "-shm", "-journal"] {
        let mut p = db.as_os_str().to_owned();
        p.push(side);
        let p = PathBuf::from(p);
        if p.exists() {
            tern_pki::files::make_private(&p)?;
        }
    }
    SqliteStore::open(db).map_err(|e| match e {
        tern_manager::Error::SchemaTooNew { .. } => super::bad_input(e),
        e => anyhow::Error::new(e).context(format!("opening {}", db.display())),
    })
}

/// The cluster CA, and what the manager serves and calls agents with.
pub(crate) struct Pki {
    pub ca: Arc<Ca>,
    /// The CA and revocation list every TLS link of this manager checks peers against.
    pub trust: Arc<Trust>,
    /// Optional client certificates: hosts show theirs to renew leases, users need none.
    pub server: Arc<rustls::ServerConfig>,
    /// With this manager's certificate: to agents, and to the leader when following.
    pub client: rustls::ClientConfig,
}

/// Loads the CA in `dir` (creating it first when `create`) and issues this manager a
/// certificate named `name` for the loopbacks and `ips`, saved in `dir/SUBDIR` (each
/// manager sharing the directory has its own).
pub(crate) fn pki(
    dir: &Path,
    create: bool,
    subdir: &str,
    name: &str,
    ips: &[IpAddr],
) -> anyhow::Result<Pki> {
    let ca = if create {
        let (ca, created) = Ca::open_or_init(dir).map_err(super::bad_input)?;
        if created {
            eprintln!("tern manager: created the cluster CA in {}", dir.display());
        }
        ca
    } else {
        Ca::load(dir).map_err(super::bad_input)?
    };
    let mut all: Vec<IpAddr> = vec!["127.0.0.1".parse()?, "::1".parse()?];
    for ip in ips {
        if !ip.is_unspecified() && !all.contains(ip) {
            all.push(*ip);
        }
    }
    let id = ca.issue(Role::Manager, name, &all)?;
    id.save(&dir.join(subdir))?;
    let trust = Trust::new(ca.cert_pem(), Some(&ca.crl_pem()?))?;
    Ok(Pki {
        server: server_config_with(&id, &trust, ClientAuth::Optional)?,
        client: client_config_with(&trust, Some(&id))?,
        trust,
        ca: Arc::new(ca),
    })
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let tokens = api_tokens(&a.token_files)?;
    let addr: SocketAddr = a.listen.parse().map_err(|e| {
        super::bad_input(format!(
            "--listen {:?}: {e}; give HOST:PORT, e.g. 127.0.0.1:7080",
            a.listen
        ))
    })?;
    let ha_limits = a.ha_limits();
    if !a.etcd.is_empty() {
        return super::manager_etcd::run(super::manager_etcd::Options {
            listen: addr,
            agent_token: agent_token(&a, &tokens)?,
            tokens,
            agent_timeout: Duration::from_secs(a.agent_timeout_s),
            etcd: a.etcd,
            advertise: a.advertise,
            ca: a.ca,
            crl_refresh: Duration::from_secs(a.crl_refresh_s),
            catalog: catalog_dir(a.catalog.as_deref(), Path::new("tern.db"))?,
            ha_limits,
        });
    }
    if a.ca.is_none() && !addr.ip().is_loopback() {
        return Err(super::bad_input(format!(
            "--listen {addr}: without --ca the API is plain HTTP, which is served on a \
             loopback address only; give --ca DIR for HTTPS with the cluster CA"
        )));
    }
    let store = open_db(&a.db)?;
    let catalog = catalog_dir(a.catalog.as_deref(), &a.db)?;
    let mut manager = Manager::open(Box::new(store), system_clock())?
        .with_catalog(catalog)
        .with_ha_limits(ha_limits);
    if let Some(net) = guest_network(&a)? {
        manager = manager.with_guest_network(net);
    }
    let manager = Arc::new(manager);
    let timeout = Duration::from_secs(a.agent_timeout_s);
    let pki =
        a.ca.as_deref()
            .map(|d| pki(d, true, "manager", "manager", &[addr.ip()]))
            .transpose()?;
    let (agents, serving) = match &pki {
        Some(p) => (
            HttpConnector::with_tls(timeout, p.client.clone()),
            Serving {
                tls: Some(TlsAcceptor::new(p.server.clone())),
                limits: Default::default(),
                ca: Some(p.ca.clone()),
                trust: Some(p.trust.clone()),
                crl_refresh: Some(Duration::from_secs(a.crl_refresh_s)),
            },
        ),
        None => (
            HttpConnector::new(&agent_token(&a, &tokens)?, timeout),
            Serving::default(),
        ),
    };
    let control = Control::new(manager.clone(), Arc::new(agents));
    let scheme = if pki.is_some() { "https" } else { "http" };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        eprintln!(
            "tern manager: API on {scheme}://{} (OpenAPI at /openapi.json), state in {}",
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
        tern_manager::api::serve_with(listener, manager, tokens, serving, wait(stop_rx)).await?;
        looping.await?;
        eprintln!("tern manager: stopped");
        anyhow::Ok(())
    })
}
