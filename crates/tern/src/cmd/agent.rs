//! `tern agent`: the host daemon, serving the agent API until SIGINT or SIGTERM.

use super::{agent_error, bad_input};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tern_agent::host::{detect_capacity, Capacity};
use tern_agent::{AppState, HostConfig};
use tern_hv::qemu::{QemuConfig, QemuDriver};
use tern_hv::sim::SimDriver;

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
    /// File whose first line is the bearer token clients must send.
    #[arg(long, value_name = "FILE")]
    pub token_file: PathBuf,
    /// Directory for guest RAM files, on tmpfs [default: /dev/shm/tern/<hash of state dir>].
    #[arg(long, value_name = "DIR")]
    pub mem_dir: Option<PathBuf>,
    /// Kernels and initramfs images VMs may boot must lie under this directory
    /// [default: the image cache, $TERN_CACHE or ~/.cache/tern].
    #[arg(long, value_name = "DIR")]
    pub image_dir: Option<PathBuf>,
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
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match (args.command, args.daemon) {
        (Some(AgentCommand::Vm(a)), _) => super::vm::agent::run(*a),
        (None, Some(d)) => serve(d),
        (None, None) => Err(bad_input(
            "give the daemon's --listen, --state-dir and --token-file, or a subcommand \
             (`tern agent vm --help`)",
        )),
    }
}

fn serve(args: Daemon) -> anyhow::Result<()> {
    let token = tern_agent::state::read_token(&args.token_file).map_err(agent_error)?;
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
            let qemu = Arc::new(QemuDriver::new(QemuConfig::new(
                host.state_dir.join("run"),
                mem_dir,
                args.bridge.clone(),
            )));
            let state = AppState::new(qemu.clone(), host).with_stream_ip(addr.ip());
            rt.block_on(reclaim(&state, &qemu));
            state
        }
        Driver::Sim => AppState::new(Arc::new(SimDriver::new()), host).with_stream_ip(addr.ip()),
    };
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        eprintln!(
            "tern agent {name}: serving on http://{addr} ({} CPUs, {} MiB for guests)",
            capacity.cpus, capacity.memory_mib
        );
        tern_agent::server::serve(listener, state, shutdown_signal())
            .await
            .map_err(agent_error)
    })
}

/// VMs recorded by an agent that did not end cleanly are gone with it (a host's VMs end
/// with its agent): remove their leftover QEMUs, taps and files, and their records.
async fn reclaim(state: &AppState, qemu: &QemuDriver) {
    for id in state.recorded_vms() {
        match qemu.reclaim(&id).await {
            Ok(was_running) => {
                let what = if was_running {
                    "its QEMU killed"
                } else {
                    "files removed"
                };
                eprintln!("tern agent: VM {id} left by a previous agent reclaimed ({what})");
            }
            Err(e) => eprintln!("tern agent: could not reclaim VM {id}: {e}"),
        }
        state.remove_record(&id);
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("tern agent: shutting down, destroying this host's VMs");
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
