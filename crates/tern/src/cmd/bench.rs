//! `tern bench`: benchmarks that run tern beside a peer tool and report ratios.
//! One submodule per peer.

mod api;
mod balance;
mod client;
mod dependency;
mod drain;
mod faults;
mod hbal;
mod layout;
mod lifecycle;
mod migration;
mod trace;
mod vcpu;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Generated unbalanced clusters: Ganeti's `hbal -C` against `tern plan`.
    Hbal(hbal::Args),
    /// The manager's balancing round over a generated uneven cluster: an easy round, the
    /// demo's hard first round, and API write latency while the hard round plans.
    Balance(balance::Args),
    /// The manager's API under concurrent clients on loopback: latency and errors.
    Api(api::Args),
    /// Live migration on a 2-host lab: tern's engine under each policy beside QEMU's own.
    Migration(migration::Args),
    /// Why dependency-aware migration pays: a guest with a service (hit by a client on
    /// another lab host) and a batch job, moved by QEMU, `adaptive` and
    /// `dependency-aware`; then a host of such guests drained through the manager.
    Dependency(dependency::Args),
    /// The fault and attack suite on a 3-host lab: probes of every closed hole and real
    /// faults (agents and the manager killed, a full disk, links cut, moves broken).
    Faults(faults::Args),
    /// Two 2-vCPU guests running `barrier` on one 2-core lab host under each vCPU
    /// scheduling policy (none, pin, gang): barrier rates and co-run shares.
    Vcpu(vcpu::Args),
    /// What recording scheduler events costs: a 2-vCPU guest whose threads wake each
    /// other, untraced, under tern's recorder (host level, both levels) and under
    /// `perf sched record`: throughput lost, events recorded and lost.
    Trace(trace::Args),
    /// A VM's life through the manager on a 2-host lab: boot per template, live
    /// migration with a shared and a local disk, suspend and restore on another host, a
    /// host's agent killed and its VM restarted elsewhere from its disk.
    Lifecycle(lifecycle::Args),
}

/// Builds (or finds) the guest image, brings up a lab of `hosts` hosts in a scratch
/// directory, runs `f` on it and takes the lab down whatever `f` answered. `f` gets the
/// lab, the image and the scratch directory (removed afterwards).
fn with_lab<T>(
    hosts: u32,
    link_mbit: Option<u32>,
    host_memory_mib: u64,
    f: impl AsyncFnOnce(
        &tern_lab::LabState,
        &tern_hv::image::GuestImage,
        &std::path::Path,
    ) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    with_lab_on(hosts, link_mbit, host_memory_mib, None, f)
}

/// [`with_lab`], the agents renewing their leases with a manager on `manager_port` of
/// the lab's root address when given (the caller starts that manager).
fn with_lab_on<T>(
    hosts: u32,
    link_mbit: Option<u32>,
    host_memory_mib: u64,
    manager_port: Option<u16>,
    f: impl AsyncFnOnce(
        &tern_lab::LabState,
        &tern_hv::image::GuestImage,
        &std::path::Path,
    ) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    use anyhow::Context as _;
    let rt = tokio::runtime::Runtime::new()?;
    let cache = tern_hv::image::default_cache_dir();
    let img = tern_hv::image::ensure_image(&cache, &mut |s| eprintln!("image: {s}"))
        .context("building the guest image")?;
    let dir = tempfile::tempdir()?;
    let opts = tern_lab::LabOptions {
        hosts,
        link_mbit,
        dir: dir.path().join("lab"),
        tern_binary: std::env::current_exe()?,
        host_memory_mib: Some(host_memory_mib),
        host_cpus: None,
        image_dir: cache,
        manager_port,
    };
    let progress = |s: &str| eprintln!("{s}");
    let lab = rt.block_on(tern_lab::up(&opts, &progress))?;
    let result = rt.block_on(f(&lab, &img, dir.path()));
    if result.is_err() {
        // The lab and its logs go with it: what the agents said last goes to stderr.
        for h in &lab.hosts {
            let log = std::fs::read_to_string(h.state_dir.join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("agent {} log, last lines:", h.name);
            for l in tail.iter().rev() {
                eprintln!("  {l}");
            }
        }
    }
    rt.block_on(tern_lab::down(&opts.dir, &progress))?;
    result
}

/// A manager's API served on a loopback port for one benchmark, stopped by [`Served::stop`].
struct Served {
    /// `https://127.0.0.1:PORT`, or `http://` without TLS.
    base: String,
    /// A client that trusts the server's certificate.
    client: reqwest::Client,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The benchmark's CA, removed when the benchmark ends.
    _ca: Option<tempfile::TempDir>,
}

impl Served {
    /// Serves `manager` on a free loopback port, accepting `token`: plain HTTP.
    async fn start(
        manager: std::sync::Arc<tern_manager::Manager>,
        token: &str,
    ) -> anyhow::Result<Served> {
        Self::start_with(manager, token, false).await
    }

    /// [`Served::start`], over HTTPS with a certificate from a CA made for the benchmark
    /// when `tls`, as `tern manager --ca` serves its API.
    async fn start_with(
        manager: std::sync::Arc<tern_manager::Manager>,
        token: &str,
        tls: bool,
    ) -> anyhow::Result<Served> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30));
        let (base, serving, client, ca) = if tls {
            let dir = tempfile::tempdir()?;
            let ca = tern_pki::Ca::init(&dir.path().join("ca"))?;
            let id = ca.issue(tern_pki::Role::Manager, "manager", &[addr.ip()])?;
            let server = tern_pki::tls::server_config(&id, None, tern_pki::tls::ClientAuth::None)?;
            let serving = tern_manager::api::Serving {
                tls: Some(tern_pki::TlsAcceptor::new(server)),
                ..Default::default()
            };
            let trust = tern_pki::tls::client_config(ca.cert_pem(), None, None)?;
            let client = builder.use_preconfigured_tls(trust).build()?;
            (format!("https://{addr}"), serving, client, Some(dir))
        } else {
            let serving = tern_manager::api::Serving::default();
            (format!("http://{addr}"), serving, builder.build()?, None)
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tern_manager::api::serve_with(
            listener,
            manager,
            vec![token.into()],
            serving,
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Served {
            base,
            client,
            stop,
            server,
            _ca: ca,
        })
    }

    /// Stops the server and waits for it, passing on its error.
    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await??;
        Ok(())
    }
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Hbal(args) => hbal::run(args),
        Command::Balance(args) => balance::run(args),
        Command::Api(args) => api::run(args),
        Command::Migration(args) => migration::run(args),
        Command::Dependency(args) => dependency::run(args),
        Command::Faults(args) => faults::run(args),
        Command::Vcpu(args) => vcpu::run(args),
        Command::Trace(args) => trace::run(args),
        Command::Lifecycle(args) => lifecycle::run(args),
    }
}
