//! `tern agent vm`: VMs on one host, straight against its agent (`--agent URL` with a
//! client certificate, `--tls-dir`, or a token file for an agent without TLS),
//! with the host-level actions the manager does not offer (start, pause, resume, stop,
//! metrics, guest requests, traces, the serial console).

use super::super::{agent_error, bad_input};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;
use tern_agent::client::AgentClient;
use tern_agent::vms::{CreateVm, VmView};
use tern_hv::{Action, Nic, VmSpec};
use tern_model::VmName;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The agent's URL, e.g. http://198.18.0.1:7070.
    #[arg(long, env = "TERN_AGENT", global = true)]
    pub agent: Option<String>,
    /// A file whose first line is the token, mode 0600 (an agent without TLS); or set
    /// TERN_TOKEN.
    #[arg(long, global = true)]
    pub token_file: Option<PathBuf>,
    /// A directory with ca.pem, cert.pem and key.pem: the client certificate the cluster
    /// CA issued (`tern ca issue`, or the lab's `operator` directory).
    #[arg(long, env = "TERN_TLS_DIR", global = true, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Create a VM (and start it unless --no-start).
    Create(CreateArgs),
    /// List the host's VMs.
    List,
    /// Show one VM.
    Show {
        id: String,
    },
    /// Destroy a VM and remove its files.
    Delete {
        id: String,
    },
    Start {
        id: String,
    },
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Power a VM off (it can be started again).
    Stop {
        id: String,
    },
    /// CPU time of the vCPU threads and memory.
    Metrics {
        id: String,
    },
    /// Attach to a running or paused VM's serial console; on a terminal, Ctrl-]
    /// detaches. Without a terminal stdin goes to the console and the console to stdout
    /// until stdin ends (or --timeout).
    Console {
        id: String,
        #[command(flatten)]
        args: super::console::ConsoleArgs,
    },
    /// Send one request to the guest agent: a JSON object, or a command word followed by
    /// a workload, e.g. `ping`, `verify`, `start memdirty --mib 128 --mbps 50`.
    Guest {
        id: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        request: Vec<String>,
    },
    /// Record which cores ran the VM's vCPUs: a Chrome/Perfetto trace and a summary of
    /// run, steal and idle time and migrations per vCPU (docs/trace.md).
    Trace(super::trace::TraceArgs),
}

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    pub id: VmName,
    /// A JSON spec file (fields as in docs/agent-api.md); flags below override it.
    #[arg(long, value_name = "FILE")]
    pub spec: Option<PathBuf>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    #[arg(long)]
    pub memory_mib: Option<u64>,
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    #[arg(long)]
    pub initramfs: Option<PathBuf>,
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Add a NIC on the host's bridge; give a MAC or `auto`. Repeatable.
    #[arg(long, value_name = "MAC|auto")]
    pub nic: Vec<String>,
    /// Define the VM without running it.
    #[arg(long)]
    pub no_start: bool,
}

/// The guest request from the words given on the command line (pure).
pub fn guest_request(words: &[String]) -> Result<Value, String> {
    let first = words.first().ok_or("give a request, e.g. `ping`")?;
    if first.trim_start().starts_with('{') {
        return serde_json::from_str(&words.join(" ")).map_err(|e| format!("request JSON: {e}"));
    }
    /// `cmd` and its one argument as the guest protocol spells them; the agent and the
    /// guest check the rest.
    #[derive(serde::Serialize)]
    struct Words<'a> {
        cmd: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        workload: Option<String>,
    }
    let workload = (words.len() > 1).then(|| words[1..].join(" "));
    Ok(serde_json::to_value(Words {
        cmd: first,
        workload,
    })
    .expect("a request serialises"))
}

fn spec_from(a: &CreateArgs) -> anyhow::Result<VmSpec> {
    let mut spec: VmSpec = match &a.spec {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| bad_input(format!("--spec {}: {e}", p.display())))?;
            serde_json::from_str(&text)
                .map_err(|e| bad_input(format!("--spec {}: {e}", p.display())))?
        }
        None => serde_json::from_str("{}").expect("an empty spec parses"),
    };
    if let Some(v) = a.vcpus {
        spec.vcpus = v;
    }
    if let Some(m) = a.memory_mib {
        spec.memory_mib = m;
    }
    if a.kernel.is_some() {
        spec.kernel = a.kernel.clone();
    }
    if a.initramfs.is_some() {
        spec.initramfs = a.initramfs.clone();
    }
    if let Some(c) = &a.cmdline {
        spec.cmdline = c.clone();
    }
    spec.nics.extend(a.nic.iter().map(|m| Nic {
        mac: (m != "auto").then(|| m.clone()),
    }));
    // Checked here too so a bad spec fails before any request is sent.
    spec.validate().map_err(bad_input)?;
    Ok(spec)
}

fn print_vm(v: &VmView) {
    let cores = v.cpu_cores.map_or("-".into(), |c| format!("{c:.2}"));
    let guest = v.guest.as_ref().map_or("-", |g| g.state.as_str());
    println!(
        "{:<20} {:<10} guest {:<12} {:>3} vCPU {:>7} MiB  cpu {:>5}  {}",
        v.info.id,
        v.info.state.to_string(),
        guest,
        v.info.spec.vcpus,
        v.info.spec.memory_mib,
        cores,
        v.info.macs.join(",")
    );
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let agent = args
        .agent
        .clone()
        .ok_or_else(|| bad_input("give the agent with --agent URL (or TERN_AGENT)"))?;
    let env_token = std::env::var("TERN_TOKEN").ok().filter(|t| !t.is_empty());
    let token = match (&args.token_file, env_token) {
        (Some(f), _) => tern_agent::state::read_token(f).map_err(agent_error)?,
        (None, Some(t)) => t,
        (None, None) if args.tls_dir.is_some() => String::new(),
        (None, None) => {
            return Err(bad_input(
                "give a client certificate with --tls-dir DIR, or the agent's token with \
                 --token-file FILE or TERN_TOKEN",
            ))
        }
    };
    let tls = match &args.tls_dir {
        Some(d) => {
            let id = tern_pki::Identity::load(d).map_err(bad_input)?;
            Some(tern_pki::tls::client_config(&id.ca_pem, Some(&id), None).map_err(bad_input)?)
        }
        None => None,
    };
    // A trace answers when its recording ends.
    let timeout = match &args.command {
        Command::Trace(t) => t.duration + Duration::from_secs(60),
        _ => Duration::from_secs(60),
    };
    let options = tern_api::client::ClientOptions {
        // A trace's answer is every recorded event.
        max_body_bytes: super::trace::MAX_TRACE_BYTES,
        ..tern_api::client::ClientOptions::with_timeout(timeout)
    };
    let client = tern_api::client::Client::with_tls(&agent, &token, options, tls.clone())
        .map(AgentClient::from)
        .map_err(agent_error)?;
    let rt = tokio::runtime::Runtime::new()?;
    let out = |v: &dyn erased::Json| -> anyhow::Result<()> {
        println!("{}", v.pretty()?);
        Ok(())
    };
    let act = |id: &str, a: Action| -> anyhow::Result<()> {
        let v = rt.block_on(client.act(id, a)).map_err(agent_error)?;
        if args.json {
            out(&v)
        } else {
            print_vm(&v);
            Ok(())
        }
    };
    match &args.command {
        Command::Create(a) => {
            let req = CreateVm {
                id: a.id.clone(),
                spec: spec_from(a)?,
                start: !a.no_start,
                reuse_disks: false,
            };
            let v = rt.block_on(client.create_vm(&req)).map_err(agent_error)?;
            if args.json {
                out(&v)?
            } else {
                print_vm(&v)
            }
        }
        Command::List => {
            let vms = rt.block_on(client.list_vms()).map_err(agent_error)?;
            if args.json {
                out(&vms)?
            } else {
                vms.iter().for_each(print_vm)
            }
        }
        Command::Show { id } => {
            let v = rt.block_on(client.show_vm(id)).map_err(agent_error)?;
            if args.json {
                out(&v)?
            } else {
                print_vm(&v);
                for (k, p) in [
                    ("memory file", &v.info.memory_file),
                    ("guest socket", &v.info.control_socket),
                    ("console", &v.info.console_log),
                ] {
                    if let Some(p) = p {
                        println!("  {k}: {}", p.display());
                    }
                }
            }
        }
        Command::Delete { id } => {
            rt.block_on(client.delete_vm(id)).map_err(agent_error)?;
            if args.json {
                out(&json!({ "deleted": id }))?
            } else {
                println!("deleted {id}")
            }
        }
        Command::Start { id } => act(id, Action::Start)?,
        Command::Pause { id } => act(id, Action::Pause)?,
        Command::Resume { id } => act(id, Action::Resume)?,
        Command::Stop { id } => act(id, Action::Stop)?,
        Command::Metrics { id } => {
            let m = rt.block_on(client.metrics(id)).map_err(agent_error)?;
            if args.json {
                out(&m)?
            } else {
                println!(
                    "{id}: vCPU time {:.3} s over {} threads, rss {} MiB of {} MiB",
                    m.vcpu_cpu_ns as f64 / 1e9,
                    m.vcpus.len(),
                    m.rss_bytes >> 20,
                    m.memory_bytes >> 20
                );
            }
        }
        Command::Console { id, args: a } => {
            return super::console::attach(
                &agent,
                &a.path(id),
                &token,
                tls,
                a,
                &format!("VM {id} on {agent}"),
                agent_error,
            )
        }
        Command::Guest { id, request } => {
            let req = guest_request(request).map_err(bad_input)?;
            let v = rt.block_on(client.guest(id, &req)).map_err(agent_error)?;
            out(&v)?
        }
        Command::Trace(t) => {
            let s = super::trace::run(t, |req| {
                rt.block_on(client.trace(&t.id, req))
                    .map(tern_api::trace::ClusterTrace::one)
                    .map_err(agent_error)
            })?;
            if args.json {
                out(&s)?
            } else {
                super::trace::print(&s, &t.out)
            }
        }
    }
    Ok(())
}

/// Lets one closure print any serialisable value.
mod erased {
    pub trait Json {
        fn pretty(&self) -> serde_json::Result<String>;
    }
    impl<T: serde::Serialize> Json for T {
        fn pretty(&self) -> serde_json::Result<String> {
            serde_json::to_string_pretty(self)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        s.split(' ').map(str::to_string).collect()
    }

    #[test]
    fn guest_requests() {
        assert_eq!(guest_request(&w("ping")).unwrap(), json!({"cmd": "ping"}));
        assert_eq!(
            guest_request(&w("start memdirty --mib 8 --mbps 5")).unwrap(),
            json!({"cmd": "start", "workload": "memdirty --mib 8 --mbps 5"})
        );
        assert_eq!(
            guest_request(&w(r#"{"cmd": "verify"}"#)).unwrap(),
            json!({"cmd": "verify"})
        );
        assert!(guest_request(&w("{broken")).is_err());
        assert!(guest_request(&[]).is_err());
    }
}
