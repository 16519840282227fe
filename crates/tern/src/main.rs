//! The `tern` binary: one command-line front end over the tern crates.
//!
//! Exit status: 0 on success, 2 when the input (a flag, file or spec) is wrong,
//! 1 when something else failed.

mod cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "A virtual cluster manager: balance hosts by live migration, simulate it at scale"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compute a balancing plan for a cluster snapshot (e.g. a Ganeti htools text file).
    Plan(cmd::plan::Args),
    /// Run the discrete-event simulator (PlanetLab benchmark or a custom scenario).
    #[command(subcommand)]
    Sim(cmd::sim::Command),
    /// Benchmarks that run tern beside a peer tool and report ratios.
    #[command(subcommand)]
    Bench(cmd::bench::Command),
    /// Build the guest image into the cache; list, import and delete the manager's
    /// catalogue of images.
    #[command(subcommand)]
    Image(cmd::image::Command),
    /// The manager's templates: an image with a VM's default sizes, disks and command
    /// line (`tern vm create --template`).
    Template(cmd::catalog::TemplateArgs),
    /// Run the host agent (HTTP API over this host's VMs); `tern agent vm` talks to one.
    Agent(Box<cmd::agent::Args>),
    /// A lab of hosts on this machine: network namespaces, shaped links, one agent each.
    #[command(subcommand)]
    Lab(cmd::lab::Command),
    /// The cluster's VMs through the manager: list, show, create, delete, and migrate with
    /// a live progress bar (`tern agent vm` talks to one agent).
    Vm(cmd::vm::Args),
    /// The cluster certificate authority: init, join tokens, certificates, revocation.
    #[command(subcommand)]
    Ca(cmd::ca::Command),
    /// Run the control plane: REST API, state in SQLite, balancing loop over the agents.
    Manager(cmd::manager::Args),
    /// Show the whole system: VMs created unevenly, balanced by live migration.
    Demo(cmd::demo::Args),
    /// The manager's hosts: list, show, register, remove, drain, activate.
    Host(cmd::host::Args),
    /// The balancer's settings on the manager, and its dry-run plan.
    Policy(cmd::policy::Args),
    /// The manager's event log (`--follow` for the live stream).
    Events(cmd::events::Args),
    /// Record a VM's scheduler trace through the manager: its vCPUs on the host's cores
    /// and its guest's processes on the vCPUs; a Perfetto file and a summary.
    Trace(cmd::trace::Args),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Plan(args) => cmd::plan::run(args),
        Command::Sim(c) => cmd::sim::run(c),
        Command::Bench(c) => cmd::bench::run(c),
        Command::Image(c) => cmd::image::run(c),
        Command::Template(a) => cmd::catalog::templates(a),
        Command::Agent(a) => cmd::agent::run(*a),
        Command::Lab(c) => cmd::lab::run(c),
        Command::Vm(a) => cmd::vm::run(a),
        Command::Ca(c) => cmd::ca::run(c),
        Command::Manager(a) => cmd::manager::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Host(a) => cmd::host::run(a),
        Command::Policy(a) => cmd::policy::run(a),
        Command::Events(a) => cmd::events::run(a),
        Command::Trace(a) => cmd::trace::run(a),
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(cmd::exit_code(&err));
    }
}
