//! `tern bench`: benchmarks that run tern beside a peer tool and report ratios.
//! One submodule per peer.

mod api;
mod balance;
mod hbal;
mod migration;

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
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Hbal(args) => hbal::run(args),
        Command::Balance(args) => balance::run(args),
        Command::Api(args) => api::run(args),
        Command::Migration(args) => migration::run(args),
    }
}
