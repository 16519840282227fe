//! `tern vm`: the cluster's VMs through the manager (list, show, create placed by the
//! manager or on `--host`, delete, migrate). `migrate` waits for the migration and shows a
//! live progress bar (round, transferred, remaining, dirty rate) while it runs; when
//! stdout is not a terminal, or with `--json`, the bar is hidden and the result printed as
//! JSON. `vcpu-policy` sets how the VM's host schedules its vCPU threads. `console`
//! attaches to its serial console ([`console`]). `tern agent vm`
//! talks to one agent instead.

pub mod agent;
pub mod console;
mod progress;
pub mod trace;

use reqwest::Method;
use serde_json::Value;
use tern_api::health::{HaPolicy, HaPolicySetting};
use tern_api::manager::{CreateVm, MigrationPolicySetting, VmAction, VmActionRequest, VmSpec};
use tern_api::vcpu::{VcpuPolicy, VcpuPolicySetting};
use tern_model::{HostName, VmName};

use super::host::{call, table, Conn};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
enum Command {
    /// Every VM, with its state, host and load.
    List,
    /// One VM; while it migrates, its migration's telemetry.
    Show { name: VmName },
    /// Create a VM; the manager places it unless --host names a host.
    Create(CreateArgs),
    /// Delete a VM; its host destroys it.
    Delete { name: VmName },
    /// Live-migrate a VM and watch it: a progress bar while it runs, the result at the end.
    Migrate {
        name: VmName,
        /// The destination host (default: the manager picks the best other host).
        #[arg(long)]
        to: Option<HostName>,
        /// The migration policy: adaptive, xen, qemu, stop-copy, dependency-aware
        /// (default: the VM's migration policy, else the balancer's default).
        #[arg(long)]
        policy: Option<tern_api::migration::PolicyKind>,
        /// Print the migration as started and return without waiting.
        #[arg(long)]
        no_wait: bool,
    },
    /// Set how the VM's host schedules its vCPU threads (none, pin, gang); kept with the
    /// VM, applied wherever it runs and carried along when it migrates.
    VcpuPolicy { name: VmName, policy: VcpuPolicy },
    /// Set what the manager does when the VM's guest panics or stops answering: restart
    /// (power it off and start it again on its host, within the restart limit) or leave
    /// (only show it). Clears a restart record that gave up.
    HaPolicy { name: VmName, policy: HaPolicy },
    /// Set the live-migration policy the VM's moves use when a migration names none:
    /// qemu, xen, adaptive, stop-copy, dependency-aware, or `default` for the
    /// cluster's (docs/dependency-aware.md, "Choosing the policy").
    MigrationPolicy { name: VmName, policy: String },
    /// The guest's processes as its guest agent classifies them for dependency-aware
    /// migration: external, dependent, untainted or exempt, why, and frozen or not.
    Taint { name: VmName },
    /// Log in to the VM as root with ssh at the address the manager handed it
    /// (`--nic`/`--ssh-key` at create); the rest of the line goes to ssh.
    Ssh {
        name: VmName,
        /// The private key to log in with [default: ssh's own].
        #[arg(short = 'i', long, value_name = "FILE")]
        identity: Option<std::path::PathBuf>,
        /// A command to run instead of a shell.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Grow a disk of a stopped VM (SIZE in MiB or with M, G, T); the guest sees the new
    /// size at its next boot.
    ResizeDisk {
        name: VmName,
        disk: String,
        size: String,
    },
    /// Boot a stopped VM from its disks.
    Start { name: VmName },
    /// Ask the guest to power off; power it off after --timeout seconds (or at once with
    /// --force). Its disks stay; `start` boots it again.
    Stop {
        name: VmName,
        /// Seconds the guest gets (1 to 600) [default: 30].
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        /// Power it off at once, without asking the guest.
        #[arg(long)]
        force: bool,
    },
    /// Reset a running VM: it boots again from its disks.
    Reboot { name: VmName },
    /// Attach to a running or paused VM's serial console; on a terminal, Ctrl-]
    /// detaches. Without a terminal stdin goes to the console and the console to stdout
    /// until stdin ends (or --timeout).
    Console {
        name: VmName,
        #[command(flatten)]
        args: console::ConsoleArgs,
    },
    /// Stop a running VM's vCPUs; its memory is kept.
    Pause { name: VmName },
    /// Run a paused VM again.
    Resume { name: VmName },
    /// Save the VM's memory and device state to the shared store and end its QEMU.
    Suspend { name: VmName },
    /// Run a suspended VM again from its saved state.
    Restore {
        name: VmName,
        /// The host to run it on (any host that sees the store) [default: its own while
        /// active, else the manager's choice].
        #[arg(long)]
        host: Option<HostName>,
    },
}

#[derive(clap::Args)]
struct CreateArgs {
    name: VmName,
    /// The template whose image, sizes, disks and command line it gets [default: the
    /// template named `default`, if there is one].
    #[arg(long)]
    template: Option<tern_model::TemplateName>,
    /// Virtual CPUs [default: the template's; without one, 1].
    #[arg(long)]
    vcpus: Option<u32>,
    /// Memory in MiB [default: the template's; without one, 1024].
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Boot this catalogue image instead of the template's (`tern image list`).
    #[arg(long, value_name = "NAME")]
    image: Option<tern_model::ImageName>,
    /// A disk: `SIZE` adds a blank disk (data0, data1, ...), `NAME=SIZE` sizes the
    /// template's disk NAME (e.g. `root=8G`) or adds a blank one; SIZE in MiB or with
    /// M, G or T. Options after a `:`, comma-separated: the bus, `virtio-scsi` (a SCSI
    /// controller, `/dev/sdX` in the guest) or `virtio-blk` (`/dev/vdX`), and the store,
    /// `local` (the host's own; a migration copies the disk) or `shared` [defaults: the
    /// template's, else virtio-blk and shared]. E.g. `root=8G:local`. Repeat for more.
    #[arg(long = "disk", value_name = "[NAME=]SIZE[:BUS,STORE]")]
    disks: Vec<String>,
    /// Kernel command line added after the image's and the template's.
    #[arg(long, value_name = "ARGS", default_value = "")]
    cmdline: String,
    /// A public key file (`~/.ssh/id_ed25519.pub`) whose keys root of the guest accepts
    /// (images that apply the guest configuration: Debian). Repeat for more.
    #[arg(long = "ssh-key", value_name = "FILE")]
    ssh_keys: Vec<std::path::PathBuf>,
    /// A NIC on the hosts' network with an address the manager hands out (it needs
    /// `tern manager --guest-network`); implied by --ssh-key.
    #[arg(long)]
    nic: bool,
    /// Put it on this host instead of letting the manager choose.
    #[arg(long)]
    host: Option<HostName>,
    /// The balancer never moves a pinned VM.
    #[arg(long)]
    pinned: bool,
    /// VMs sharing an affinity group are kept on one host.
    #[arg(long, value_name = "GROUP")]
    affinity: Option<String>,
    /// VMs sharing an anti-affinity group are kept on different hosts.
    #[arg(long, value_name = "GROUP")]
    anti_affinity: Option<String>,
    /// How its host schedules its vCPU threads: none, pin or gang (docs/trace.md).
    #[arg(long, value_name = "POLICY", default_value = "none")]
    vcpu_policy: VcpuPolicy,
    /// When its guest panics or stops answering: restart or leave (docs/manager.md,
    /// "Guest health").
    #[arg(long, value_name = "POLICY", default_value = "restart")]
    ha_policy: HaPolicy,
    /// The live-migration policy its moves use when a migration names none [default:
    /// the cluster's].
    #[arg(long, value_name = "POLICY")]
    migration_policy: Option<tern_api::migration::PolicyKind>,
}

/// A migration policy's name, or `default` for none of the VM's own (pure).
pub fn policy_or_default(s: &str) -> Result<Option<tern_api::migration::PolicyKind>, String> {
    match s {
        "default" => Ok(None),
        _ => s
            .parse()
            .map(Some)
            .map_err(|e: tern_api::migration::UnknownPolicy| format!("{e}, or default")),
    }
}

/// The sizes to ask for (pure but for one lookup): what was given; what was not is
/// left to the template (0) when one is named or the manager has a `default` one, and
/// is 1 vCPU and 1024 MiB for a VM without a template.
fn sizes(c: &Conn, x: &CreateArgs) -> anyhow::Result<(u32, u64)> {
    let given = (x.vcpus.unwrap_or(0), x.memory_mib.unwrap_or(0));
    if x.template.is_some() || (x.vcpus.is_some() && x.memory_mib.is_some()) {
        return Ok(given);
    }
    let client = c.client()?;
    let rt = tokio::runtime::Runtime::new()?;
    match rt.block_on(client.template("default")) {
        Ok(_) => Ok(given),
        Err(e) if e.is_not_found() => Ok((x.vcpus.unwrap_or(1), x.memory_mib.unwrap_or(1024))),
        Err(e) => Err(super::host::refused(e)),
    }
}

/// The lines of public key files, as `authorized_keys` takes them.
fn read_keys(files: &[std::path::PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut keys = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)
            .map_err(|e| super::bad_input(format!("--ssh-key {}: {e}", f.display())))?;
        for line in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            tern_api::guest_config::check_ssh_key(line)
                .map_err(|e| super::bad_input(format!("--ssh-key {}: {e}", f.display())))?;
            keys.push(line.to_owned());
        }
    }
    Ok(keys)
}

/// Runs ssh to the VM's address; its exit status becomes ours.
fn ssh(
    c: &Conn,
    name: &VmName,
    identity: Option<&std::path::Path>,
    command: &[String],
) -> anyhow::Result<()> {
    let v = call::<()>(c, Method::GET, &format!("/v1/vms/{name}"), None)?;
    let Some(addr) = v["spec"]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
    else {
        return Err(super::bad_input(format!(
            "VM {name} has no address: create it with --nic or --ssh-key on a manager \
             started with --guest-network"
        )));
    };
    let mut cmd = std::process::Command::new("ssh");
    // Each VM makes its own host key at first boot, and an address is handed to the
    // next VM once this one is deleted: the key is learnt, never pinned across VMs.
    cmd.args([
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
    ])
    .args(["-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]);
    if let Some(i) = identity {
        cmd.arg("-i").arg(i);
    }
    cmd.arg(format!("root@{addr}")).args(command);
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("running ssh (apt-get install openssh-client): {e}"))?;
    std::process::exit(status.code().unwrap_or(255));
}

/// `POST /v1/vms/NAME/ACTION`; the VM in its new state.
fn act(c: &Conn, name: &VmName, action: VmAction, req: VmActionRequest) -> anyhow::Result<Value> {
    let path = format!("/v1/vms/{name}/{}", action.as_str());
    let v = call(c, Method::POST, &path, Some(&req))?;
    if !c.json {
        eprintln!(
            "VM {name}: {} on {}",
            v["state"].as_str().unwrap_or("?"),
            v["observed_host"].as_str().unwrap_or("-")
        );
    }
    Ok(v)
}

/// `--disk` arguments as disks (pure): `SIZE` is a blank disk `dataN`, `NAME=SIZE` a
/// disk of that name, and either may end in `:OPTIONS`, comma-separated: a bus
/// (`virtio-blk`, `virtio-scsi`) and a store (`shared`, `local`), e.g. `8G:local`,
/// `data=2G:virtio-scsi,local`.
pub fn disk_args(args: &[String]) -> Result<Vec<tern_api::catalog::VmDisk>, String> {
    use tern_api::agent::{DiskBus, DiskStore};
    let mut n = 0;
    args.iter()
        .map(|a| {
            let (rest, opts) = match a.rsplit_once(':') {
                Some((rest, opts)) => (rest, opts.split(',').collect()),
                None => (a.as_str(), Vec::new()),
            };
            let (mut bus, mut store) = (None, None);
            for o in opts {
                match (o.parse::<DiskStore>(), o.parse::<DiskBus>()) {
                    (Ok(s), _) if store.is_none() => store = Some(s),
                    (_, Ok(b)) if bus.is_none() => bus = Some(b),
                    (Ok(_), _) | (_, Ok(_)) => {
                        return Err(format!("--disk {a}: {o:?} repeats what an option gave"))
                    }
                    _ => {
                        return Err(format!(
                            "--disk {a}: option {o:?}: give a bus (virtio-blk, virtio-scsi) \
                             or a store (shared, local)"
                        ))
                    }
                }
            }
            let (name, size) = match rest.split_once('=') {
                Some((name, size)) => (name.to_owned(), size),
                None => {
                    n += 1;
                    (format!("data{}", n - 1), rest)
                }
            };
            Ok(tern_api::catalog::VmDisk {
                name,
                size_mib: Some(parse_mib(size).map_err(|e| format!("--disk {a}: {e}"))?),
                from_image: false,
                store,
                bus,
            })
        })
        .collect()
}

/// A size in MiB: a number of MiB, or one with a unit M, G or T (pure).
pub fn parse_mib(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'M' | 'm')) => (&s[..i], 1),
        Some((i, 'G' | 'g')) => (&s[..i], 1024),
        Some((i, 'T' | 't')) => (&s[..i], 1024 * 1024),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("size {s:?}: give MiB (1024) or a number with M, G or T (8G)"))
}

const HEADER: [&str; 7] = [
    "NAME",
    "STATE",
    "GUEST",
    "HOST",
    "VCPUS",
    "MEMORY MiB",
    "CPU USED",
];

/// A VM record's guest column (pure): `failed` once HA gave up, else what its host
/// reports of its guest, `-` when nothing (not running).
fn guest_cell(v: &Value) -> String {
    if v["restarts"]["failed"].is_string() {
        return "failed".to_owned();
    }
    v["guest"]["state"].as_str().unwrap_or("-").to_owned()
}

/// One table row of a VM record (pure). A migrating VM's host reads `from -> to`.
fn vm_row(v: &Value) -> Vec<String> {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_owned();
    let host = match (v["observed_host"].as_str(), v["desired_host"].as_str()) {
        (Some(o), Some(d)) if o != d => format!("{o} -> {d}"),
        (Some(o), _) => o.to_owned(),
        (None, Some(d)) => d.to_owned(),
        (None, None) => "-".to_owned(),
    };
    vec![
        s(&v["name"]),
        s(&v["state"]),
        guest_cell(v),
        host,
        v["spec"]["vcpus"].to_string(),
        v["spec"]["memory_mib"].to_string(),
        v["cpu_used"]
            .as_f64()
            .map_or("-".to_owned(), |c| format!("{c:.2}")),
    ]
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let c = &a.conn;
    let v = match a.command {
        Command::List => call::<()>(c, Method::GET, "/v1/vms", None)?,
        Command::Show { name } => return show(c, name.as_str()),
        Command::Create(x) => {
            let (vcpus, memory_mib) = sizes(c, &x)?;
            let body = CreateVm {
                name: x.name,
                spec: VmSpec {
                    vcpus,
                    memory_mib,
                    pinned: x.pinned,
                    affinity: x.affinity,
                    anti_affinity: x.anti_affinity,
                    vcpu_policy: x.vcpu_policy,
                    ha_policy: x.ha_policy,
                    migration_policy: x.migration_policy,
                    image: x.image.map(String::from),
                    disks: disk_args(&x.disks).map_err(super::bad_input)?,
                    cmdline: x.cmdline,
                    template: None,
                    ssh_keys: read_keys(&x.ssh_keys)?,
                    nic: x.nic || !x.ssh_keys.is_empty(),
                    address: None,
                    gateway: None,
                },
                host: x.host,
                template: x.template,
            };
            call(c, Method::POST, "/v1/vms", Some(&body))?
        }
        Command::Delete { name } => {
            call::<()>(c, Method::DELETE, &format!("/v1/vms/{name}"), None)?
        }
        Command::Migrate {
            name,
            to,
            policy,
            no_wait,
        } => return progress::migrate(c, name.as_str(), to, policy, no_wait),
        Command::Ssh {
            name,
            identity,
            command,
        } => return ssh(c, &name, identity.as_deref(), &command),
        Command::ResizeDisk { name, disk, size } => {
            let size_mib = parse_mib(&size).map_err(super::bad_input)?;
            let path = format!("/v1/vms/{name}/disks/{disk}/resize");
            let body = tern_api::agent::ResizeDisk { size_mib };
            call(c, Method::POST, &path, Some(&body))?
        }
        Command::Start { name } => act(c, &name, VmAction::Start, Default::default())?,
        Command::Stop {
            name,
            timeout,
            force,
        } => {
            let req = VmActionRequest {
                timeout_s: timeout,
                force,
                host: None,
            };
            act(c, &name, VmAction::Stop, req)?
        }
        Command::Reboot { name } => act(c, &name, VmAction::Reboot, Default::default())?,
        Command::Console { name, args } => {
            return console::attach(
                &c.manager,
                &args.path(name.as_str()),
                &c.token()?,
                c.tls()?,
                &args,
                &format!("VM {name}"),
                super::host::refused,
            )
        }
        Command::Pause { name } => act(c, &name, VmAction::Pause, Default::default())?,
        Command::Resume { name } => act(c, &name, VmAction::Resume, Default::default())?,
        Command::Suspend { name } => act(c, &name, VmAction::Suspend, Default::default())?,
        Command::Restore { name, host } => {
            let req = VmActionRequest {
                host,
                ..Default::default()
            };
            act(c, &name, VmAction::Restore, req)?
        }
        Command::HaPolicy { name, policy } => {
            let path = format!("/v1/vms/{name}/ha-policy");
            let v = call(c, Method::PUT, &path, Some(&HaPolicySetting { policy }))?;
            match c.json {
                true => println!("{}", serde_json::to_string_pretty(&v)?),
                false => println!("VM {name}: HA policy {policy}"),
            }
            return Ok(());
        }
        Command::MigrationPolicy { name, policy } => {
            let policy = policy_or_default(&policy).map_err(super::bad_input)?;
            let path = format!("/v1/vms/{name}/migration-policy");
            let v = call(
                c,
                Method::PUT,
                &path,
                Some(&MigrationPolicySetting { policy }),
            )?;
            match c.json {
                true => println!("{}", serde_json::to_string_pretty(&v)?),
                false => println!(
                    "VM {name}: migration policy {}",
                    policy.map_or("default (the cluster's)", |p| p.as_str())
                ),
            }
            return Ok(());
        }
        Command::Taint { name } => {
            let v = call::<()>(c, Method::GET, &format!("/v1/vms/{name}/taint"), None)?;
            if c.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                let report: tern_api::guest::TaintReport = serde_json::from_value(v)?;
                table(&TAINT_HEADER, &taint_rows(&report));
                println!("{}", taint_summary(&report));
            }
            return Ok(());
        }
        Command::VcpuPolicy { name, policy } => {
            let path = format!("/v1/vms/{name}/vcpu-policy");
            let v = call(c, Method::PUT, &path, Some(&VcpuPolicySetting { policy }))?;
            match c.json {
                true => println!("{}", serde_json::to_string_pretty(&v)?),
                false => println!("VM {name}: vCPU policy {policy}"),
            }
            return Ok(());
        }
    };
    if c.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let rows: Vec<Vec<String>> = match &v {
            Value::Array(vs) => vs.iter().map(vm_row).collect(),
            one => vec![vm_row(one)],
        };
        table(&HEADER, &rows);
    }
    Ok(())
}

fn show(c: &Conn, name: &str) -> anyhow::Result<()> {
    let mut v = call::<()>(c, Method::GET, &format!("/v1/vms/{name}"), None)?;
    let running = call::<()>(c, Method::GET, "/v1/migrations?running=true", None)?;
    let migration = running
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["vm"] == name))
        .cloned();
    if c.json {
        if let Some(m) = migration {
            v["migration"] = m;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    table(&HEADER, &[vm_row(&v)]);
    let spec = &v["spec"];
    for (k, key) in [("affinity", "affinity"), ("anti-affinity", "anti_affinity")] {
        if let Some(g) = spec[key].as_str() {
            println!("  {k}: {g}");
        }
    }
    if let Some(p) = spec["vcpu_policy"].as_str().filter(|p| *p != "none") {
        println!("  vCPU policy: {p}");
    }
    if spec["pinned"] == true {
        println!("  pinned: the balancer never moves it");
    }
    if let Some(p) = spec["migration_policy"].as_str() {
        println!("  migration policy: {p}");
    }
    for line in health_lines(&v) {
        println!("  {line}");
    }
    if let Some(m) = migration {
        let memory = spec["memory_mib"].as_u64().unwrap_or(0) << 20;
        println!(
            "  migration {}: {} -> {} ({}), {}",
            m["id"],
            m["from"].as_str().unwrap_or("?"),
            m["to"].as_str().unwrap_or("?"),
            m["policy"].as_str().unwrap_or("?"),
            progress::describe(&m["progress"], memory)
        );
    }
    Ok(())
}

const TAINT_HEADER: [&str; 5] = ["PID", "COMM", "CLASS", "FROZEN", "REASONS"];

/// One row per guest process (pure): its reasons read like `fd 3 → 10.0.0.9:41234` or
/// `pipe:[1234] with pid 80 (nginx)`.
fn taint_rows(r: &tern_api::guest::TaintReport) -> Vec<Vec<String>> {
    let comm = |pid: u32| {
        r.processes
            .iter()
            .find(|p| p.pid == pid)
            .map(|p| p.comm.as_str())
    };
    r.processes
        .iter()
        .map(|p| {
            let reasons: Vec<String> = p.reasons.iter().map(|x| reason_text(x, comm)).collect();
            vec![
                p.pid.to_string(),
                p.comm.clone(),
                name_of(&p.class),
                if p.frozen { "yes" } else { "no" }.to_owned(),
                reasons.join("; "),
            ]
        })
        .collect()
}

/// A serde enum's wire name (`network_peer`, `untainted`).
fn name_of<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn reason_text<'a>(
    r: &tern_api::guest::TaintReason,
    comm: impl Fn(u32) -> Option<&'a str>,
) -> String {
    use tern_api::guest::DependencyKind as K;
    let mut words = Vec::new();
    if let Some(fd) = r.fd {
        words.push(format!("fd {fd}"));
    }
    match (&r.peer, r.kind) {
        (Some(peer), K::NetworkPeer | K::Listener) => words.push(format!("→ {peer}")),
        (Some(peer), _) => words.push(peer.clone()),
        (None, _) if words.is_empty() && r.via_pid.is_none() => words.push(name_of(&r.kind)),
        (None, _) => {}
    }
    if let Some(pid) = r.via_pid {
        let with = match r.kind {
            K::Parent => "child of",
            K::WaitedOn => "waited on by",
            _ => "with",
        };
        let name = comm(pid).map(|c| format!(" ({c})")).unwrap_or_default();
        words.push(format!("{with} pid {pid}{name}"));
    }
    words.join(" ")
}

/// The line under the taint table (pure): frozen now or not, and how the last freeze
/// ended.
fn taint_summary(r: &tern_api::guest::TaintReport) -> String {
    let mut line = match (r.frozen, r.deadline_left_ms) {
        (true, Some(ms)) => format!("frozen: the guest thaws by itself in {ms} ms unless renewed"),
        (true, None) => "frozen".to_owned(),
        (false, _) => "not frozen".to_owned(),
    };
    if let Some(t) = &r.last_thaw {
        line.push_str(&format!(
            "; last freeze: {:.0} ms, {} processes, ended by {}",
            t.freeze_ms,
            t.processes.len(),
            name_of(&t.cause)
        ));
    }
    line
}

/// What `show` says of a VM's guest health and HA (pure).
fn health_lines(v: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = v["start_error"].as_str() {
        let host = v["desired_host"].as_str().unwrap_or("?");
        out.push(format!("not started: {host} refused it ({e}); asked again"));
    }
    let g = &v["guest"];
    if let Some(state) = g["state"].as_str() {
        let mut line = format!("guest: {state}");
        if let Some(since) = g["since_ms"].as_u64() {
            line.push_str(&format!(" since {}", super::events::readable(since)));
        }
        if let Some(r) = g["reason"].as_str() {
            line.push_str(&format!(" ({r})"));
        }
        out.push(line);
    }
    let policy = v["spec"]["ha_policy"].as_str().unwrap_or("restart");
    let restarts = v["restarts"]["at_ms"].as_array().map_or(0, Vec::len);
    let mut line = format!("HA policy: {policy}");
    if restarts > 0 {
        line.push_str(&format!(", {restarts} recent restarts"));
    }
    if v["restarts"]["pending"] == true {
        line.push_str(", a restart under way");
    }
    out.push(line);
    if let Some(f) = v["restarts"]["failed"].as_str() {
        out.push(format!("HA gave up: {f}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn migration_policies_parse_by_name_and_default_clears() {
        use tern_api::migration::PolicyKind;
        assert_eq!(
            policy_or_default("dependency-aware"),
            Ok(Some(PolicyKind::DependencyAware))
        );
        assert_eq!(policy_or_default("default"), Ok(None));
        let e = policy_or_default("fast").unwrap_err();
        assert!(
            e.contains("dependency-aware") && e.ends_with("or default"),
            "{e}"
        );
    }

    #[test]
    fn taint_rows_say_which_fd_and_which_process_a_taint_comes_through() {
        let r: tern_api::guest::TaintReport = serde_json::from_value(json!({
            "event_driven": true, "frozen": true, "deadline_left_ms": 9000,
            "processes": [
                {"pid": 80, "ppid": 1, "comm": "nginx", "class": "external", "frozen": false,
                 "reasons": [{"kind": "network_peer", "fd": 3, "peer": "10.0.0.9:41234"}]},
                {"pid": 95, "ppid": 80, "comm": "worker", "class": "dependent", "frozen": false,
                 "reasons": [{"kind": "pipe", "peer": "pipe:[1234]", "via_pid": 80},
                             {"kind": "parent", "via_pid": 80}]},
                {"pid": 120, "ppid": 1, "comm": "batch", "class": "untainted", "frozen": true}
            ],
            "last_thaw": {"cause": "deadline", "processes": [], "freeze_ms": 15012.4}
        }))
        .unwrap();
        let rows = taint_rows(&r);
        assert_eq!(
            rows[0],
            ["80", "nginx", "external", "no", "fd 3 → 10.0.0.9:41234"]
        );
        assert_eq!(
            rows[1][4],
            "pipe:[1234] with pid 80 (nginx); child of pid 80 (nginx)"
        );
        assert_eq!(rows[2][2..4], ["untainted", "yes"]);
        assert_eq!(rows[2][4], "");
        let line = taint_summary(&r);
        assert!(
            line.starts_with("frozen: the guest thaws by itself in 9000 ms"),
            "{line}"
        );
        assert!(line.ends_with("ended by deadline"), "{line}");
    }

    #[test]
    fn guest_health_and_ha_show_in_rows_and_details() {
        let v = json!({"name": "web", "state": "running", "observed_host": "a",
                       "desired_host": "a", "spec": {"vcpus": 1, "memory_mib": 512,
                       "ha_policy": "leave"}, "cpu_used": 0.0,
                       "guest": {"state": "panicked", "reason": "pvpanic", "since_ms": 0}});
        assert_eq!(vm_row(&v)[2], "panicked");
        let lines = health_lines(&v);
        assert!(lines[0].starts_with("guest: panicked since "), "{lines:?}");
        assert!(lines[0].ends_with("(pvpanic)"), "{lines:?}");
        assert_eq!(lines[1], "HA policy: leave");
        let failed = json!({"name": "w", "state": "running", "spec": {},
                            "restarts": {"at_ms": [1, 2, 3], "failed": "guest panicked"}});
        assert_eq!(vm_row(&failed)[2], "failed");
        let lines = health_lines(&failed);
        assert_eq!(lines[0], "HA policy: restart, 3 recent restarts");
        assert_eq!(lines[1], "HA gave up: guest panicked");
        let off = json!({"name": "o", "state": "stopped", "spec": {}});
        assert_eq!(vm_row(&off)[2], "-");
        let refused = json!({"name": "p", "state": "pending", "desired_host": "h2",
                             "spec": {}, "start_error": "no such kernel"});
        assert_eq!(
            health_lines(&refused)[0],
            "not started: h2 refused it (no such kernel); asked again"
        );
    }

    #[test]
    fn rows_show_a_moving_vm_as_from_to() {
        let v = json!({"name": "web", "state": "migrating", "observed_host": "a",
                       "desired_host": "b", "spec": {"vcpus": 2, "memory_mib": 512},
                       "cpu_used": 0.5});
        assert_eq!(
            vm_row(&v),
            ["web", "migrating", "-", "a -> b", "2", "512", "0.50"]
        );
        let pending = json!({"name": "new", "state": "pending", "observed_host": null,
                             "desired_host": "c", "spec": {"vcpus": 1, "memory_mib": 64},
                             "cpu_used": 0.0});
        assert_eq!(vm_row(&pending)[3], "c");
    }

    #[test]
    fn disks_take_a_store_beside_the_bus() {
        use tern_api::agent::{DiskBus, DiskStore};
        let d = disk_args(&[
            "root=8G:local".into(),
            "1G:virtio-scsi,shared".into(),
            "2G:local,virtio-blk".into(),
        ])
        .unwrap();
        let got: Vec<_> = d.iter().map(|d| (d.store, d.bus)).collect();
        assert_eq!(
            got,
            [
                (Some(DiskStore::Local), None),
                (Some(DiskStore::Shared), Some(DiskBus::VirtioScsi)),
                (Some(DiskStore::Local), Some(DiskBus::VirtioBlk)),
            ]
        );
        for (bad, says) in [
            ("1G:local,shared", "repeats"),
            ("1G:virtio-scsi,virtio-blk", "repeats"),
            ("1G:nfs", "or a store (shared, local)"),
            ("1G:local,", "option \"\""),
        ] {
            let e = disk_args(&[bad.into()]).unwrap_err();
            assert!(e.starts_with(&format!("--disk {bad}: ")), "{e}");
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn disks_take_a_name_a_size_and_a_bus() {
        use tern_api::agent::DiskBus;
        let d = disk_args(&[
            "1G".into(),
            "logs=512:virtio-scsi".into(),
            "2G:virtio_scsi".into(),
            "root=8G:virtio-blk".into(),
        ])
        .unwrap();
        let got: Vec<_> = d
            .iter()
            .map(|d| (d.name.as_str(), d.size_mib, d.bus))
            .collect();
        assert_eq!(
            got,
            [
                ("data0", Some(1024), None),
                ("logs", Some(512), Some(DiskBus::VirtioScsi)),
                ("data1", Some(2048), Some(DiskBus::VirtioScsi)),
                ("root", Some(8192), Some(DiskBus::VirtioBlk)),
            ]
        );
        for (bad, says) in [
            ("1G:ide", "give a bus (virtio-blk, virtio-scsi) or a store"),
            ("1G:", "option \"\""),
            ("a=1G:scsi:virtio-scsi", "size \"1G:scsi\""),
            ("x=:virtio-scsi", "size \"\""),
        ] {
            let e = disk_args(&[bad.into()]).unwrap_err();
            assert!(e.starts_with(&format!("--disk {bad}: ")), "{e}");
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    #[test]
    fn names_that_break_the_rule_are_refused_before_any_request() {
        use clap::Parser;
        assert!(Cli::try_parse_from(["vm", "delete", "web-1"]).is_ok());
        for bad in ["", "a/b", "a?x", " a", "a%2F", "Web"] {
            for args in [
                vec!["vm", "show", bad],
                vec!["vm", "delete", bad],
                vec!["vm", "create", bad],
                vec!["vm", "migrate", "web-1", "--to", bad],
                vec!["vm", "vcpu-policy", bad, "pin"],
            ] {
                let e = Cli::try_parse_from(&args)
                    .err()
                    .unwrap_or_else(|| panic!("{args:?}"));
                assert!(e.to_string().contains("is invalid"), "{args:?}: {e}");
            }
        }
    }

    #[test]
    fn unknown_vcpu_policies_are_refused_saying_the_known_ones() {
        use clap::Parser;
        assert!(Cli::try_parse_from(["vm", "vcpu-policy", "web", "gang"]).is_ok());
        assert!(Cli::try_parse_from(["vm", "create", "web", "--vcpu-policy", "pin"]).is_ok());
        for args in [
            vec!["vm", "vcpu-policy", "web", "fifo"],
            vec!["vm", "create", "web", "--vcpu-policy", "fifo"],
        ] {
            let e = Cli::try_parse_from(&args).err().expect("refused");
            assert!(e.to_string().contains("none, pin, gang"), "{args:?}: {e}");
        }
    }
}
