//! `tern bench`: benchmarks that run tern beside a peer tool and report ratios.
//! One submodule per peer.

mod hbal;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Generated unbalanced clusters: Ganeti's `hbal -C` against `tern plan`.
    Hbal(hbal::Args),
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Hbal(args) => hbal::run(args),
    }
}
