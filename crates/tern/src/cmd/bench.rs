//! `tern bench`: benchmarks that run tern beside a peer tool and report ratios.
//! One submodule per peer.

mod api;
mod balance;
mod hbal;
mod migration;
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
    /// Two 2-vCPU guests running `barrier` on one 2-core lab host under each vCPU
    /// scheduling policy (none, pin, gang): barrier rates and co-run shares.
    Vcpu(vcpu::Args),
}

/// A manager's API served on a loopback port for one benchmark, stopped by [`Served::stop`].
struct Served {
    /// `http://127.0.0.1:PORT`.
    base: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    /// Serves `manager` on a free loopback port, accepting `token`.
    async fn start(
        manager: std::sync::Arc<tern_manager::Manager>,
        token: &str,
    ) -> anyhow::Result<Served> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(tern_manager::api::serve(
            listener,
            manager,
            vec![token.into()],
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Served { base, stop, server })
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
        Command::Vcpu(args) => vcpu::run(args),
    }
}
