//! `tern lab`: a lab of hosts on this machine (namespaces, bridge, shaped links, agents).

use super::{agent_error, bad_input};
use std::path::PathBuf;
use tern_lab::{self as lab, LabError, LabOptions};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Create N hosts as network namespaces and start one agent in each.
    Up(UpArgs),
    /// Show the hosts, their addresses and whether their agents answer.
    Status(OutArgs),
    /// Restart one host's agent as a service manager would (SIGTERM, then the same
    /// command again): its guests keep running and the new agent adopts them.
    RestartAgent(RestartArgs),
    /// Delete every VM through its agent, stop the agents and remove everything the lab
    /// made.
    Down(OutArgs),
}

#[derive(clap::Args, Debug)]
pub struct RestartArgs {
    /// The host whose agent restarts (h1, h2, ...).
    pub host: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Number of hosts (1-99).
    #[arg(long)]
    pub hosts: u32,
    /// Shape each host's link to this many Mbit/s in each direction [default: unshaped].
    #[arg(long, value_name = "MBIT")]
    pub link_mbit: Option<u32>,
    /// Memory each host offers guests, in MiB [default: this machine's memory / hosts].
    #[arg(long)]
    pub host_memory_mib: Option<u64>,
    /// CPUs each host reports [default: this machine's].
    #[arg(long)]
    pub host_cpus: Option<u32>,
    /// The agents boot only kernels and initramfs images under this directory
    /// [default: the image cache, $TERN_CACHE or ~/.cache/tern].
    #[arg(long, value_name = "DIR")]
    pub image_dir: Option<std::path::PathBuf>,
    /// Port a manager will listen on at the lab's root address (198.18.K.254): the
    /// agents renew their leases with it, and stop their guests when they cannot.
    #[arg(long, value_name = "PORT")]
    pub manager_port: Option<u16>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Leave TLS out: the agents serve plain HTTP and take the lab's bearer token
    /// (LAB/token). By default the lab makes a CA (LAB/ca), the agents get host
    /// certificates and serve mutual TLS only, LAB/ca/operator holds a client
    /// certificate, and `tern manager --ca LAB/ca` adopts the CA. The lab's addresses
    /// are reachable from this machine only.
    #[arg(long)]
    pub insecure_plain_http: bool,
}

#[derive(clap::Args, Debug)]
pub struct OutArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `$TERN_STATE/lab`, else `~/.local/state/tern/lab`.
pub fn lab_dir() -> anyhow::Result<PathBuf> {
    if let Some(s) = std::env::var_os("TERN_STATE") {
        return Ok(PathBuf::from(s).join("lab"));
    }
    let home = std::env::var_os("HOME")
        .ok_or_else(|| bad_input("neither TERN_STATE nor HOME is set: set TERN_STATE=DIR"))?;
    Ok(PathBuf::from(home).join(".local/state/tern/lab"))
}

/// Exit code 2 for what the user can fix (a bad shape, no root, no lab up), as for the
/// agent's own errors.
fn lab_error(e: LabError) -> anyhow::Error {
    match e {
        LabError::BadRequest(m) => bad_input(m),
        LabError::Agent(e) => agent_error(e),
        other => other.into(),
    }
}

pub fn run(c: Command) -> anyhow::Result<()> {
    let dir = lab_dir()?;
    let rt = tokio::runtime::Runtime::new()?;
    let progress = |s: &str| eprintln!("{s}");
    match c {
        Command::Up(a) => {
            let opts = LabOptions {
                hosts: a.hosts,
                link_mbit: a.link_mbit,
                dir,
                tern_binary: std::env::current_exe()?,
                host_memory_mib: a.host_memory_mib,
                host_cpus: a.host_cpus,
                image_dir: a
                    .image_dir
                    .unwrap_or_else(tern_hv::image::default_cache_dir),
                manager_port: a.manager_port,
            };
            let up = if a.insecure_plain_http {
                rt.block_on(lab::up_insecure_plain_http(&opts, &progress))
            } else {
                rt.block_on(lab::up(&opts, &progress))
            };
            let state = up.map_err(lab_error)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&state)?);
            } else {
                match &state.ca_dir {
                    Some(ca) => println!(
                        "lab up: {} hosts, mutual TLS; CA in {} (tern manager --ca {0}), \
                         client certificate in {}",
                        state.hosts.len(),
                        ca.display(),
                        ca.join("operator").display()
                    ),
                    None => println!(
                        "lab up: {} hosts, plain HTTP (--insecure-plain-http), token in {}",
                        state.hosts.len(),
                        state.token_file.display()
                    ),
                }
                for h in &state.hosts {
                    println!("  {:<4} {:<15} {}", h.name, h.addr, h.url);
                }
            }
            Ok(())
        }
        Command::Status(a) => {
            let state = lab::load(&dir).map_err(lab_error)?.ok_or_else(|| {
                bad_input(format!("no lab is up (no state in {})", dir.display()))
            })?;
            let hosts = rt.block_on(lab::status(&state)).map_err(lab_error)?;
            if a.json {
                let v = serde_json::json!({ "lab": state, "hosts": hosts });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!(
                    "lab 198.18.{}.0/24, links {}, token in {}",
                    state.index,
                    state
                        .link_mbit
                        .map_or("unshaped".into(), |m| format!("{m} Mbit/s")),
                    state.token_file.display()
                );
                for h in &hosts {
                    let health = match (&h.report, &h.error) {
                        (Some(r), _) => format!(
                            "ok, {} VMs, {} of {} MiB, {:.2} cores",
                            r.load.vms,
                            r.load.vm_memory_mib,
                            r.capacity.memory_mib,
                            r.load.vm_cpu_cores
                        ),
                        (None, Some(e)) => format!("NOT ANSWERING: {e}"),
                        (None, None) => "unknown".into(),
                    };
                    println!("  {:<4} {:<15} {}", h.name, h.addr, health);
                }
            }
            // Scripts can wait on `tern lab status` until every host answers.
            let down = hosts.iter().filter(|h| h.report.is_none()).count();
            if down > 0 {
                anyhow::bail!("{down} of {} lab hosts do not answer", hosts.len());
            }
            Ok(())
        }
        Command::RestartAgent(a) => {
            let mut state = lab::load(&dir).map_err(lab_error)?.ok_or_else(|| {
                bad_input(format!("no lab is up (no state in {})", dir.display()))
            })?;
            let (old, new) = rt
                .block_on(lab::restart_agent(&mut state, &a.host, &progress))
                .map_err(lab_error)?;
            if a.json {
                let v = serde_json::json!({"host": a.host, "old_pid": old, "pid": new});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{}: agent restarted (pid {new}) and answering", a.host);
            }
            Ok(())
        }
        Command::Down(a) => {
            let removed = rt.block_on(lab::down(&dir, &progress)).map_err(lab_error)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&removed)?);
            } else {
                println!("lab down: removed {} things", removed.len());
                for r in removed {
                    println!("  {r}");
                }
            }
            Ok(())
        }
    }
}
