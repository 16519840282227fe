//! `tern agent`: the host daemon, serving the agent API until SIGINT or SIGTERM. A stop
//! leaves the guests running for the next agent to adopt (so the agent can be restarted
//! or upgraded under them), unless `--stop-vms-on-exit` asks to destroy them.
//!
//! With a host identity (`--tls-dir`, or enrolled with `--join`) the agent serves mutual
//! TLS only: every client presents a certificate of the cluster CA, and the revocation
//! list is refreshed every 10 s (from the manager it joined or renews its lease with,
//! else from the directory; `--crl-refresh-s` changes the period). The new list, once
//! checked against the CA, reaches the API, the migration streams' gate and this
//! agent's calls to other agents at their next handshake. Its lease it renews with its
//! host certificate, no manager token needed.

use super::{agent_error, bad_input};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tern_agent::fence::{self, Fate};
use tern_agent::host::{detect_capacity, Capacity};
use tern_agent::server::{OnExit, Serving};
use tern_agent::{AppState, HostConfig};
use tern_api::client::ManagerClient;
use tern_api::client::{Client, ClientOptions};
use tern_api::manager::{JoinReply, JoinRequest};
use tern_hv::disk::Store;
use tern_hv::qemu::{QemuConfig, QemuDriver};
use tern_hv::sim::SimDriver;
use tern_pki::ca::JoinToken;
use tern_pki::tls::{client_config, client_config_with, server_config_with, ClientAuth};
use tern_pki::{Identity, TlsAcceptor, Trust};

/// Which driver runs the VMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Driver {
    /// Real guests under QEMU (KVM where the CPU virtualises, else TCG).
    Qemu,
    /// In-process simulated guests: no QEMU needed.
    Sim,
}

/// `tern agent [daemon flags]` runs the daemon; `tern agent vm ...` talks to one.
#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    #[command(subcommand)]
    pub command: Option<AgentCommand>,
    #[command(flatten)]
    pub daemon: Option<Daemon>,
}

#[derive(clap::Subcommand, Debug)]
pub enum AgentCommand {
    /// VMs on one host, straight against its agent (the cluster's VMs: `tern vm`).
    Vm(Box<super::vm::agent::Args>),
    /// The fencing watchdog the agent starts: stops the host's guests when the lease in
    /// STATE_DIR/lease runs out. Runs on its own so it outlives a crashed agent.
    Watchdog {
        /// The agent's state directory.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
    },
}

/// The daemon's flags.
#[derive(clap::Args, Debug)]
pub struct Daemon {
    /// Address and port to serve the API on, e.g. 198.18.0.1:7070 or 127.0.0.1:7070.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: String,
    /// This host's state: VM records, QEMU sockets and logs.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// File whose first line is the bearer token clients must send (mode 0600); for an
    /// agent without a host identity.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The host identity: ca.pem, cert.pem, key.pem (and crl.pem) [default with --join:
    /// STATE_DIR/tls]. With it the agent serves mutual TLS only.
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Enrol with the manager at this URL (https://...) before serving, if the identity
    /// directory holds no certificate yet; the key is made here and never leaves it.
    #[arg(long, value_name = "URL", requires = "join_token_file")]
    pub join: Option<String>,
    /// The one-time join token from `tern ca join-token` (mode 0600).
    #[arg(long, value_name = "FILE")]
    pub join_token_file: Option<PathBuf>,
    /// Seconds between refreshes of the revocation list.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub crl_refresh_s: u64,
    /// Directory for guest RAM files, on tmpfs [default: /dev/shm/tern/<hash of state dir>].
    #[arg(long, value_name = "DIR")]
    pub mem_dir: Option<PathBuf>,
    /// Kernels and initramfs images VMs may boot must lie under this directory
    /// [default: the image cache, $TERN_CACHE or ~/.cache/tern].
    #[arg(long, value_name = "DIR")]
    pub image_dir: Option<PathBuf>,
    /// The disk store: VM disks are made under DIR/vms, from images in DIR/images. Hosts
    /// that move VMs between them must share it (one NFS or CephFS mount, see
    /// docs/storage.md) [default: STATE_DIR/store].
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
    /// The local disk store: disks with `"store": "local"` are made under DIR/vms, from
    /// images in DIR/images, on this host only; live migration copies them to the
    /// destination's local store (needs a host identity, see docs/storage.md).
    #[arg(long, value_name = "DIR")]
    pub local_store: Option<PathBuf>,
    /// Bridge that guests' tap devices join (needed for VMs with NICs).
    #[arg(long)]
    pub bridge: Option<String>,
    /// Name the host reports [default: the machine's host name].
    #[arg(long)]
    pub name: Option<String>,
    /// CPUs offered to guests [default: the machine's].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory offered to guests in MiB [default: the machine's].
    #[arg(long)]
    pub memory_mib: Option<u64>,
    #[arg(long, value_enum, default_value = "qemu")]
    pub hypervisor: Driver,
    /// Manager URLs (comma-separated) to renew this host's lease with. With them, a
    /// watchdog stops this host's guests when the lease cannot be renewed, and the
    /// manager restarts them elsewhere only after that (docs/ha.md, "Fencing").
    #[arg(long = "manager", value_delimiter = ',', value_name = "URL")]
    pub managers: Vec<String>,
    /// File whose first line is the bearer token for the manager [default: --token-file],
    /// for an agent without a host identity (one with renews with its certificate).
    #[arg(long, value_name = "FILE")]
    pub manager_token_file: Option<PathBuf>,
    /// On SIGTERM or SIGINT, destroy this host's VMs before exiting. Without it they keep
    /// running and the next agent on this state directory adopts them (with --manager,
    /// the watchdog stops them if no agent renews the lease in time).
    #[arg(long)]
    pub stop_vms_on_exit: bool,
    /// Seconds a guest that answered before may stay silent (its guest agent answering
    /// no ping while its QEMU runs) before it is reported unresponsive (docs/manager.md,
    /// "Guest health").
    #[arg(long, value_name = "SECS", default_value_t = 20)]
    pub guest_unresponsive_after: u64,
    /// Seconds a new guest gets to answer its first ping before it is reported
    /// unresponsive (booting under TCG on a busy host is slow) [default: never: a guest
    /// whose image has no guest agent stays `booting`].
    #[arg(long, value_name = "SECS")]
    pub guest_boot_within: Option<u64>,
}

/// Opens `--local-store DIR`; it must not be the shared store, whose files every host
/// sees (a local disk there would be deleted by the source after a move).
fn local_store(dir: &std::path::Path, shared: &Store) -> anyhow::Result<Store> {
    let local =
        Store::open(dir).map_err(|e| bad_input(format!("--local-store {}: {e}", dir.display())))?;
    if local.root() == shared.root() {
        return Err(bad_input(format!(
            "--local-store {} is the shared --store: give a directory of this host's own",
            dir.display()
        )));
    }
    Ok(local)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match (args.command, args.daemon) {
        (Some(AgentCommand::Vm(a)), _) => super::vm::agent::run(*a),
        (Some(AgentCommand::Watchdog { state_dir }), _) => {
            tern_agent::fence::watchdog(&state_dir).map_err(agent_error)
        }
        (None, Some(d)) => serve(d),
        (None, None) => Err(bad_input(
            "give the daemon's --listen, --state-dir and --tls-dir, --join or --token-file, \
             or a subcommand (`tern agent vm --help`)",
        )),
    }
}

fn serve(args: Daemon) -> anyhow::Result<()> {
    let addr: SocketAddr = args.listen.parse().map_err(|e| {
        bad_input(format!(
            "--listen {:?}: {e} (give ADDR:PORT, e.g. 127.0.0.1:7070)",
            args.listen
        ))
    })?;
    let detected = detect_capacity().map_err(agent_error)?;
    let capacity = Capacity {
        cpus: args.cpus.unwrap_or(detected.cpus),
        memory_mib: args.memory_mib.unwrap_or(detected.memory_mib),
    };
    std::fs::create_dir_all(&args.state_dir).map_err(|e| {
        bad_input(format!(
            "--state-dir {}: cannot create it: {e}",
            args.state_dir.display()
        ))
    })?;
    let state_dir = args.state_dir.canonicalize()?;
    let mem_dir = args.mem_dir.clone().unwrap_or_else(|| {
        let h = tern_hv::spec::fnv1a(state_dir.as_os_str().as_encoded_bytes());
        PathBuf::from(format!("/dev/shm/tern/{h:016x}"))
    });
    let name = args.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "host".into())
    });
    let rt = tokio::runtime::Runtime::new()?;
    let tls_dir = match (&args.tls_dir, &args.join) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(_)) => Some(state_dir.join("tls")),
        (None, None) => None,
    };
    if let (Some(dir), Some(url), Some(token_file)) = (&tls_dir, &args.join, &args.join_token_file)
    {
        if !Identity::exists(dir) {
            rt.block_on(join(url, token_file, dir, &name, addr, capacity))?;
            eprintln!(
                "tern agent {name}: enrolled with {url}; identity in {}",
                dir.display()
            );
        }
    }
    // One trust for every link: a new revocation list reaches them all at once.
    let identity = match &tls_dir {
        Some(dir) => {
            let id = Identity::load(dir).map_err(bad_input)?;
            let crl = tern_pki::identity::load_crl(dir)?;
            let trust = Trust::new(&id.ca_pem, crl.as_deref()).map_err(bad_input)?;
            Some((dir.clone(), id, trust))
        }
        None => None,
    };
    let managers = manager_clients(&args, identity.as_ref().map(|(_, id, t)| (id, t)))?;
    if managers.is_empty() {
        // No lease is held: a lease file left by an earlier run must not fence anything.
        let _ = std::fs::remove_file(fence::lease_file(&state_dir));
    } else {
        ensure_watchdog(&state_dir)?;
    }
    let token = match (&args.token_file, &tls_dir) {
        (Some(f), _) => tern_agent::state::read_token(f).map_err(agent_error)?,
        // The certificate is the credential; no request is checked against a token.
        (None, Some(_)) => String::new(),
        (None, None) => {
            return Err(bad_input(
                "give --tls-dir DIR (a host identity), --join URL with --join-token-file, or \
                 --token-file FILE",
            ))
        }
    };
    let host = HostConfig {
        name: name.clone(),
        capacity,
        token,
        state_dir,
        image_dir: args
            .image_dir
            .clone()
            .unwrap_or_else(tern_hv::image::default_cache_dir),
    };
    let state = match args.hypervisor {
        Driver::Qemu => {
            let store_dir = args
                .store
                .clone()
                .unwrap_or_else(|| host.state_dir.join("store"));
            let store = Store::open(&store_dir)
                .map_err(|e| bad_input(format!("--store {}: {e}", store_dir.display())))?;
            let local = match &args.local_store {
                Some(dir) => Some(local_store(dir, &store)?),
                None => None,
            };
            let mut cfg = QemuConfig::new(host.state_dir.join("run"), mem_dir, args.bridge.clone());
            cfg.store = Some(store.clone());
            cfg.local_store = local.clone();
            let qemu = Arc::new(QemuDriver::new(cfg));
            let mut state = AppState::new(qemu.clone(), host)
                .with_stream_ip(addr.ip())
                .with_store(store);
            if let Some(local) = local {
                state = state.with_local_store(local);
            }
            rt.block_on(adopt_or_reclaim(&state, &qemu));
            state
        }
        Driver::Sim => AppState::new(Arc::new(SimDriver::new()), host).with_stream_ip(addr.ip()),
    };
    // Catalogue images missing from the store are copied from the managers it reports
    // to, with the same credentials.
    let watch = tern_agent::watch::WatchConfig {
        unresponsive_after: Duration::from_secs(args.guest_unresponsive_after),
        boot_within: args.guest_boot_within.map(Duration::from_secs),
        ..Default::default()
    };
    watch
        .check()
        .map_err(|e| bad_input(format!("--guest-unresponsive-after: {e}")))?;
    let state = state
        .with_image_source(managers.clone())
        .with_guest_watch(watch);
    let (state, serving) = match identity {
        Some((dir, id, trust)) => {
            let server = server_config_with(&id, &trust, ClientAuth::Required)?;
            // The migration streams' gate: the same mutual TLS as the API.
            let streams = server.clone();
            let client = client_config_with(&trust, Some(&id))?;
            let acceptor = TlsAcceptor::new(server);
            let every = Duration::from_secs(args.crl_refresh_s);
            let from = crl_source(&dir, &args.managers);
            rt.spawn(refresh_crl(dir.clone(), id, trust, from, every));
            let serving = Serving {
                tls: Some(acceptor),
                ..Default::default()
            };
            let state = state
                .with_tls(client)
                .with_stream_tls(streams)
                .with_identity_dir(dir.clone());
            (state, serving)
        }
        None => (state, Serving::default()),
    };
    let on_exit = if args.stop_vms_on_exit {
        OnExit::StopVms
    } else {
        OnExit::KeepVms
    };
    let serving = Serving { on_exit, ..serving };
    let scheme = if serving.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let state_dir = state.host.state_dir.clone();
    let fenced = !managers.is_empty();
    let served = rt.block_on(async move {
        if fenced {
            tokio::spawn(fence::renew_loop(managers, name.clone(), state_dir.clone()));
        }
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        eprintln!(
            "tern agent {name}: serving on {scheme}://{addr} ({} CPUs, {} MiB for guests)",
            capacity.cpus, capacity.memory_mib
        );
        tern_agent::server::serve_with(listener, state, serving, shutdown_signal(on_exit))
            .await
            .map_err(agent_error)
    });
    // Guests left running stay fenced: the watchdog stops them unless another agent
    // renews the lease in time. Destroyed ones leave nothing to fence.
    if fenced && on_exit == OnExit::StopVms {
        let dir = args.state_dir.canonicalize()?;
        let _ = std::fs::remove_file(fence::lease_file(&dir));
        if let Some(pid) = running_watchdog(&dir) {
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
    }
    served
}

/// Where an enrolled agent remembers the manager it joined, to fetch revocations from.
const MANAGER_FILE: &str = "manager.url";

/// Enrols this host: a new key and a signing request made here, sent with the join token
/// to the manager, which is checked against the CA certificate the token carries before
/// anything is sent; the certificate that comes back is saved beside the key in `dir`.
async fn join(
    url: &str,
    token_file: &std::path::Path,
    dir: &std::path::Path,
    name: &str,
    addr: SocketAddr,
    capacity: Capacity,
) -> anyhow::Result<()> {
    if addr.ip().is_unspecified() {
        return Err(bad_input(format!(
            "--listen {addr}: to join, listen on the address the manager and other hosts \
             reach this host by (it goes into the host's certificate)"
        )));
    }
    let text = tern_pki::files::read_private(token_file).map_err(bad_input)?;
    let token: JoinToken = serde_json::from_str(&text).map_err(|e| {
        bad_input(format!(
            "{}: not a join token from `tern ca join-token`: {e}",
            token_file.display()
        ))
    })?;
    let (key_pem, csr_pem) = tern_pki::identity::new_key_and_csr(name)?;
    let tls = client_config(&token.ca_pem, None, None)?;
    let client =
        Client::with_tls(url, "", ClientOptions::default(), Some(tls)).map_err(bad_input)?;
    let req = JoinRequest {
        token: token.token,
        name: name.parse().map_err(bad_input)?,
        address: format!("https://{addr}"),
        capacity: tern_api::manager::Capacity {
            cpus: f64::from(capacity.cpus),
            memory_mib: capacity.memory_mib,
        },
        csr_pem,
    };
    let reply: JoinReply = client
        .post("/v1/join", &req)
        .await
        .map_err(|e| super::host::refused(e).context(format!("joining {url}")))?;
    let id = Identity {
        ca_pem: reply.ca_pem,
        cert_pem: reply.cert_pem,
        key_pem,
    };
    let files = id.save(dir)?;
    tern_pki::files::write_public(&files.crl, reply.crl_pem.as_bytes())?;
    tern_pki::files::write_public(&dir.join(MANAGER_FILE), url.as_bytes())?;
    Ok(())
}

/// The manager to fetch revocation lists from: the one this host joined, else the first
/// it renews its lease with; `None`: re-read the identity directory's `crl.pem`.
fn crl_source(dir: &Path, managers: &[String]) -> Option<String> {
    std::fs::read_to_string(dir.join(MANAGER_FILE))
        .ok()
        .map(|u| u.trim().to_owned())
        .or_else(|| managers.first().cloned())
}

/// Every `every` (10 s by default): fetches the revocation list from `manager` over TLS
/// checked against the CA (or re-reads `crl.pem` when there is none) and gives it to
/// `trust`, which checks that the CA signed it and that it is not older than the one
/// held; every TLS link of the agent then checks against it from its next handshake.
async fn refresh_crl(
    dir: PathBuf,
    id: Identity,
    trust: Arc<Trust>,
    manager: Option<String>,
    every: Duration,
) {
    let fetcher = manager.as_deref().and_then(|url| {
        let tls = client_config_with(&trust, Some(&id)).ok()?;
        Client::with_tls(
            url,
            "",
            ClientOptions::with_timeout(Duration::from_secs(5)),
            Some(tls),
        )
        .ok()
    });
    let crl_file = tern_pki::identity::IdentityFiles::in_dir(&dir).crl;
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let fresh = match &fetcher {
            Some(c) => match c.get_text("/v1/ca/crl").await {
                Ok(pem) => Some(pem),
                Err(e) => {
                    tracing::warn!(error = %e, "could not fetch the revocation list; keeping the last");
                    None
                }
            },
            None => std::fs::read_to_string(&crl_file).ok(),
        };
        let Some(fresh) = fresh else { continue };
        match trust.set_crl(&fresh) {
            Ok(false) => {}
            Ok(true) => {
                if fetcher.is_some() {
                    if let Err(e) = tern_pki::files::write_public(&crl_file, fresh.as_bytes()) {
                        tracing::warn!(error = %e, "could not save the revocation list");
                    }
                }
                eprintln!("tern agent: revocation list updated");
            }
            Err(e) => tracing::warn!(error = %e, "the new revocation list was not taken"),
        }
    }
}

/// One client per `--manager` URL. An enrolled host checks the manager against its
/// cluster CA and renews with its own certificate, which is what the manager takes
/// over TLS; a host without an identity sends the manager token (plain-HTTP labs).
fn manager_clients(
    args: &Daemon,
    identity: Option<(&Identity, &Arc<Trust>)>,
) -> anyhow::Result<Vec<ManagerClient>> {
    if args.managers.is_empty() {
        return Ok(Vec::new());
    }
    let (token, tls) = match identity {
        Some((id, trust)) => (String::new(), Some(client_config_with(trust, Some(id))?)),
        None => {
            let file = args
                .manager_token_file
                .as_ref()
                .or(args.token_file.as_ref())
                .ok_or_else(|| {
                    bad_input(
                        "--manager without a host identity needs --manager-token-file FILE: \
                         the token the manager's API takes (or give --tls-dir or --join)",
                    )
                })?;
            (
                tern_agent::state::read_token(file).map_err(agent_error)?,
                None,
            )
        }
    };
    args.managers
        .iter()
        .map(|url| {
            Client::with_tls(
                url,
                &token,
                ClientOptions::with_timeout(RENEW_TIMEOUT),
                tls.clone(),
            )
            .map(ManagerClient::from)
            .map_err(|e| bad_input(format!("--manager {url:?}: {e}")))
        })
        .collect()
}

/// How long one lease renewal may take; well under a renewal period.
const RENEW_TIMEOUT: Duration = Duration::from_secs(2);

/// The watchdog already watching `state_dir`, if one runs (a restarted agent keeps it).
fn running_watchdog(state_dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(fence::watchdog_pid_file(state_dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let cmd = String::from_utf8_lossy(&cmd);
    (cmd.contains("watchdog") && cmd.contains(&*state_dir.to_string_lossy())).then_some(pid)
}

/// Starts the fencing watchdog unless one already watches `state_dir`. It gets its own
/// process group, so neither a signal to the agent's group nor the agent's death ends it.
fn ensure_watchdog(state_dir: &Path) -> anyhow::Result<()> {
    if running_watchdog(state_dir).is_some() {
        return Ok(());
    }
    let log_path = state_dir.join("watchdog.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| anyhow::anyhow!("opening {}: {e}", log_path.display()))?;
    let child = std::process::Command::new(std::env::current_exe()?)
        .args(["agent", "watchdog", "--state-dir"])
        .arg(state_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting the fencing watchdog: {e}"))?;
    // It writes its pid file first thing; wait for it so a second agent start does not
    // start a second watchdog.
    for _ in 0..100 {
        if running_watchdog(state_dir) == Some(child.id()) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(anyhow::anyhow!(
        "the fencing watchdog (pid {}) did not start; see {}",
        child.id(),
        state_dir.join("watchdog.log").display()
    ))
}

/// VMs recorded by an earlier agent (one that crashed, or was restarted to upgrade it):
/// a QEMU still running is adopted, guest untouched; what [`fence::fate`] says is a
/// leftover (a destination copy that never ran here, a QEMU gone or mute) is removed
/// with its taps, files and record. A host whose lease ran out stops its guests first,
/// in case its watchdog did not.
async fn adopt_or_reclaim(state: &AppState, qemu: &QemuDriver) {
    let dir = &state.host.state_dir;
    if fence::due(fence::boot_ms().unwrap_or(u64::MAX), fence::read_lease(dir)) {
        let killed = fence::stop_guests(&dir.join("run"));
        let _ = std::fs::rename(fence::lease_file(dir), fence::fenced_file(dir));
        eprintln!("tern agent: the lease ran out, stopped the QEMUs {killed:?}");
    }
    for id in state.recorded_vms() {
        let fate = match state.read_record(&id) {
            Ok((spec, incoming)) => {
                let (pid, runstate) = qemu.left_behind(&id).await.unwrap_or((None, None));
                let found = fence::Found {
                    qemu_alive: pid.is_some(),
                    incoming,
                    runstate,
                };
                match fence::fate(&found) {
                    Fate::Adopt => match qemu.adopt(&id, spec).await {
                        Ok(info) => {
                            state.incoming_resumed(&id);
                            eprintln!(
                                "tern agent: VM {id} adopted (QEMU pid {}, {:?})",
                                info.pid.unwrap_or(0),
                                info.state
                            );
                            match state.reapply_vcpu_policy(&id).await {
                                Ok(tern_api::vcpu::VcpuPolicy::None) => {}
                                Ok(p) => eprintln!("tern agent: VM {id}: vCPU policy {p} applied"),
                                Err(e) => eprintln!("tern agent: VM {id}: vCPU policy: {e}"),
                            }
                            continue;
                        }
                        Err(_) => "its QEMU could not be adopted",
                    },
                    Fate::Destroy(why) => why,
                }
            }
            Err(_) => "its record is unreadable",
        };
        match qemu.reclaim(&id).await {
            Ok(was_running) => {
                let what = if was_running {
                    "its QEMU killed"
                } else {
                    "files removed"
                };
                eprintln!("tern agent: VM {id} left by a previous agent removed: {fate} ({what})");
            }
            Err(e) => eprintln!("tern agent: could not remove VM {id} ({fate}): {e}"),
        }
        state.remove_record(&id);
    }
}

async fn shutdown_signal(on_exit: OnExit) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    match on_exit {
        OnExit::StopVms => eprintln!("tern agent: shutting down, destroying this host's VMs"),
        OnExit::KeepVms => eprintln!("tern agent: shutting down, leaving this host's VMs running"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_agent::AgentError;
    use tern_api::client::ClientError;

    fn code(e: AgentError) -> i32 {
        crate::cmd::exit_code(&agent_error(e))
    }

    #[test]
    fn user_faults_exit_2() {
        let remote = |status| {
            AgentError::Client(ClientError::Remote {
                method: reqwest::Method::GET,
                url: "http://x".into(),
                status,
                message: "b".into(),
            })
        };
        assert_eq!(code(AgentError::BadRequest("x".into())), 2);
        assert_eq!(code(remote(404)), 2, "unknown VM");
        assert_eq!(code(remote(401)), 2, "bad token");
        assert_eq!(code(remote(507)), 2, "no room");
        assert_eq!(code(remote(500)), 1);
        assert_eq!(code(AgentError::io("x")(std::io::Error::other("e"))), 1);
        let timeout = AgentError::Client(ClientError::Timeout {
            method: reqwest::Method::GET,
            url: "http://x".into(),
            after: std::time::Duration::from_secs(2),
        });
        assert_eq!(code(timeout), 1);
        let bad_url = AgentError::Client(ClientError::BadUrl { url: "nope".into() });
        assert_eq!(code(bad_url), 2);
    }
}
