//! `tern bench`: benchmarks that run tern beside a peer tool and report ratios.
//! One submodule per peer.

mod api;
mod hbal;
mod migration;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Generated unbalanced clusters: Ganeti's `hbal -C` against `tern plan`.
    Hbal(hbal::Args),
    /// One balancing decision of the manager over a generated uneven cluster.
    Balance(super::demo::BenchArgs),
    /// The manager's API under concurrent clients on loopback: latency and errors.
    Api(api::Args),
    /// Live migration on a 2-host lab: tern's engine under each policy beside QEMU's own.
    Migration(migration::Args),
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Hbal(args) => hbal::run(args),
        Command::Balance(args) => super::demo::bench(args),
        Command::Api(args) => api::run(args),
        Command::Migration(args) => migration::run(args),
    }
}
