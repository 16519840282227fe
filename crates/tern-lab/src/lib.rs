//! A lab of hosts on one machine: network namespaces joined by veth pairs and a bridge,
//! each host's link shaped with `tc`, one `tern agent` per host. The lab records what it
//! made in a state file before making it, so `down` removes exactly that, even after an
//! `up` that failed half-way, and nothing else.
//!
//! `tern lab up|status|down`, `tern demo`, `tern bench migration` and the tests that move
//! real guests between hosts build their hosts with it.
//!
//! [`up`] makes a lab CA (`DIR/ca`), enrols every agent with a host certificate for its
//! name and address, and issues an operator certificate (`DIR/ca/operator`): the agents
//! then serve mutual TLS only, and `tern manager --ca DIR/ca` adopts the CA.
//! [`up_insecure_plain_http`] leaves TLS out (agents share a bearer token over plain
//! HTTP): the lab's addresses are reachable from this machine only.
//!
//! Agents leave their guests running when they stop, so [`down`] destroys every VM
//! through its agent first, and kills whatever QEMU is left after the agents exit.
//!
//! # Layout
//! - [`plan`]: the plan (names, addresses, the `ip`/`tc` commands), pure.
//! - this file: runs the plan: [`up`], [`status`], [`down`], the state file ([`load`]).
//! - [`error`]: the lab's error type, [`LabError`].

pub mod error;
pub mod plan;

pub use error::LabError;
use plan::{LabShape, AGENT_PORT, HOST_BRIDGE};
use serde::{Deserialize, Serialize};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tern_agent::client::AgentClient;
use tern_agent::host::HostReport;
use tern_hv::qemu::net::run;

/// What `tern lab up` was asked for.
#[derive(Debug, Clone)]
pub struct LabOptions {
    pub hosts: u32,
    pub link_mbit: Option<u32>,
    /// Where the state file, tokens, logs and the hosts' state directories go.
    pub dir: PathBuf,
    /// The `tern` binary the agents run.
    pub tern_binary: PathBuf,
    /// Memory each host offers guests; default: the machine's memory split evenly.
    pub host_memory_mib: Option<u64>,
    /// CPUs each host reports; default: the machine's.
    pub host_cpus: Option<u32>,
    /// Where the kernels and initramfs images the hosts' VMs boot lie (the agents'
    /// `--image-dir`): usually the image cache.
    pub image_dir: PathBuf,
    /// A manager will listen on this port of the lab's root address: the agents renew
    /// their hosts' leases with it (and fence when they cannot), using the lab token.
    pub manager_port: Option<u16>,
}

/// One host of a running lab.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabHost {
    pub name: String,
    pub netns: String,
    pub addr: String,
    pub url: String,
    /// The agent's process id, once started.
    pub pid: Option<u32>,
    pub state_dir: PathBuf,
    pub mem_dir: PathBuf,
    /// With a lab CA: the CA certificate to check the agent by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// With a lab CA: the operator's client certificate and key (ca.pem, cert.pem,
    /// key.pem), for `tern agent vm --tls-dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_dir: Option<PathBuf>,
    /// With a lab CA: the operator's client certificate, inside `tls_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// With a lab CA: the operator's client key (mode 0600), inside `tls_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Without a lab CA: the bearer token the agent takes (mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// The command that starts its agent (`ip netns exec NETNS tern agent ...`), run
    /// again by [`restart_agent`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub agent_argv: Vec<String>,
}

impl LabHost {
    /// The host's own disk store (`--local-store`): only this host's namespace uses
    /// it, as a host's local disk would be.
    pub fn local_store_dir(&self) -> PathBuf {
        self.state_dir.join("local-store")
    }
}

/// The lab state file: everything `down` needs to undo `up`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabState {
    pub index: u8,
    /// The manager URL the agents renew their leases with, when the lab was made for one.
    #[serde(default)]
    pub manager_url: Option<String>,
    pub link_mbit: Option<u32>,
    pub dir: PathBuf,
    pub token_file: PathBuf,
    /// Parent of the hosts' memory directories (on tmpfs).
    pub mem_root: PathBuf,
    pub switch_netns: String,
    pub root_link: String,
    pub root_addr: String,
    pub hosts: Vec<LabHost>,
    /// The lab CA's directory, when the lab was made with one ([`up`]; none with
    /// [`up_insecure_plain_http`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_dir: Option<PathBuf>,
}

impl LabState {
    pub fn shape(&self) -> LabShape {
        LabShape {
            index: self.index,
            hosts: self.hosts.len() as u32,
            link_mbit: self.link_mbit,
        }
    }

    /// The disk store every host of the lab is given: one folder all namespaces see,
    /// standing in for an NFS or CephFS mount, so VMs with disks migrate between hosts.
    pub fn store_dir(&self) -> PathBuf {
        self.dir.join("store")
    }

    pub fn token(&self) -> Result<String, LabError> {
        Ok(tern_agent::state::read_token(&self.token_file)?)
    }

    /// The operator's TLS configuration, when the lab has a CA.
    pub fn tls(&self) -> Result<Option<rustls::ClientConfig>, LabError> {
        let Some(dir) = self.ca_dir.as_ref().map(|d| operator_dir(d)) else {
            return Ok(None);
        };
        let id = tern_pki::Identity::load(&dir)?;
        Ok(Some(tern_pki::tls::client_config(
            &id.ca_pem,
            Some(&id),
            None,
        )?))
    }

    /// A client for the agent at `url`: mutual TLS with the operator's certificate in a
    /// lab with a CA, else the lab's bearer token.
    pub fn client(&self, url: &str, timeout: Duration) -> Result<AgentClient, LabError> {
        match self.tls()? {
            Some(tls) => Ok(AgentClient::new_tls(url, "", timeout, Some(tls))?),
            None => Ok(AgentClient::new(url, &self.token()?, timeout)?),
        }
    }
}

/// How one host is doing, for `tern lab status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostStatus {
    pub name: String,
    pub addr: String,
    pub url: String,
    pub agent_running: bool,
    /// The agent's own report, when it answered.
    pub report: Option<HostReport>,
    pub error: Option<String>,
}

/// The lab state file inside `dir`.
pub fn state_file(dir: &Path) -> PathBuf {
    dir.join("lab.json")
}

/// Refuses to go on without root, which namespaces and `tc` need.
pub fn require_root() -> Result<(), LabError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if effective_uid(&status) == Some(0) {
        Ok(())
    } else {
        Err(LabError::BadRequest(
            "tern lab needs root (it creates network namespaces and tc qdiscs): run it with sudo"
                .into(),
        ))
    }
}

/// The effective uid from `/proc/self/status` text (pure).
pub fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// Loads the state of the lab in `dir`, if one is up.
pub fn load(dir: &Path) -> Result<Option<LabState>, LabError> {
    let path = state_file(dir);
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| LabError::BadState { path, source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LabError::io(format!("reading {}", path.display()))(e)),
    }
}

fn save(state: &LabState) -> Result<(), LabError> {
    let path = state_file(&state.dir);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_string_pretty(state).expect("lab state serialises");
    std::fs::write(&tmp, text).map_err(LabError::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(LabError::io(format!("writing {}", path.display())))
}

async fn output(program: &str, args: &[&str]) -> Result<String, LabError> {
    let out = tokio::process::Command::new(program)
        .args(args)
        .output()
        .await
        .map_err(LabError::io(format!(
            "running {program} (install iproute2)"
        )))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn random_token() -> Result<String, LabError> {
    use std::io::Read;
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(LabError::io("reading /dev/urandom"))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// The operator's identity inside a lab CA's directory.
fn operator_dir(ca_dir: &Path) -> PathBuf {
    ca_dir.join("operator")
}

/// Builds the lab with a lab CA, starts its agents and waits until each answers: each
/// agent gets a host certificate for its name and address and serves mutual TLS only; an
/// operator certificate is issued for the caller. On any failure what was made is
/// removed again. `progress` receives one line per step.
pub async fn up(opts: &LabOptions, progress: &dyn Fn(&str)) -> Result<LabState, LabError> {
    up_with(opts, true, progress).await
}

/// [`up`] without TLS: the agents serve plain HTTP and take the lab's bearer token. Only
/// for a lab, whose addresses this machine alone reaches.
pub async fn up_insecure_plain_http(
    opts: &LabOptions,
    progress: &dyn Fn(&str),
) -> Result<LabState, LabError> {
    up_with(opts, false, progress).await
}

async fn up_with(
    opts: &LabOptions,
    tls: bool,
    progress: &dyn Fn(&str),
) -> Result<LabState, LabError> {
    let shape0 = LabShape {
        index: 0,
        hosts: opts.hosts,
        link_mbit: opts.link_mbit,
    };
    shape0.validate().map_err(LabError::BadRequest)?;
    require_root()?;
    if let Some(s) = load(&opts.dir)? {
        return Err(LabError::BadRequest(format!(
            "a lab with {} hosts is already up (state in {}): run `tern lab down` first",
            s.hosts.len(),
            state_file(&opts.dir).display()
        )));
    }
    std::fs::create_dir_all(&opts.dir)
        .map_err(LabError::io(format!("creating {}", opts.dir.display())))?;
    let token_file = opts.dir.join("token");
    write_private(&token_file, &random_token()?)?;
    let shape = claim_index(shape0).await?;
    let index = shape.index;
    let mem_root = PathBuf::from(format!("/dev/shm/tern-lab-{index}"));
    let ca_dir = tls.then(|| opts.dir.join("ca"));
    let operator = ca_dir
        .as_ref()
        .map(|d| tern_pki::identity::IdentityFiles::in_dir(&operator_dir(d)));
    let url = |i: u32| {
        let u = shape.agent_url(i);
        if tls {
            u.replacen("http://", "https://", 1)
        } else {
            u
        }
    };
    let mut state = LabState {
        index,
        manager_url: opts.manager_port.map(|p| {
            // A manager on the lab CA serves HTTPS; only loopback may be plain HTTP.
            let scheme = if tls { "https" } else { "http" };
            format!("{scheme}://{}:{p}", shape.root_addr())
        }),
        link_mbit: opts.link_mbit,
        dir: opts.dir.clone(),
        token_file: token_file.clone(),
        mem_root: mem_root.clone(),
        switch_netns: shape.switch_ns(),
        root_link: shape.root_link(),
        root_addr: shape.root_addr().to_string(),
        hosts: (1..=shape.hosts)
            .map(|i| LabHost {
                name: shape.host_name(i),
                netns: shape.host_ns(i),
                addr: shape.host_addr(i).to_string(),
                url: url(i),
                pid: None,
                state_dir: opts.dir.join("hosts").join(shape.host_name(i)),
                mem_dir: mem_root.join(shape.host_name(i)),
                ca_file: ca_dir.as_ref().map(|d| tern_pki::Ca::cert_path(d)),
                tls_dir: ca_dir.as_ref().map(|d| operator_dir(d)),
                cert_file: operator.as_ref().map(|f| f.cert.clone()),
                key_file: operator.as_ref().map(|f| f.key.clone()),
                token_file: (!tls).then(|| token_file.clone()),
                agent_argv: Vec::new(),
            })
            .collect(),
        ca_dir,
    };
    // Recorded before anything else is made, so `down` can undo a half-built lab.
    if let Err(e) = save(&state) {
        let _ = run("ip", &["netns", "del", &shape.switch_ns()]).await;
        return Err(e);
    }
    match build(&mut state, &shape, opts, progress).await {
        Ok(()) => Ok(state),
        Err(e) => {
            progress("lab: failed, removing what was made");
            let _ = down(&opts.dir, progress).await;
            Err(e)
        }
    }
}

/// Picks a free lab index and claims it by creating its switch namespace; when another
/// lab took the same index in the meantime, tries the next one.
async fn claim_index(shape: LabShape) -> Result<LabShape, LabError> {
    let mut taken: Vec<String> = Vec::new();
    loop {
        let mut ns = plan::parse_netns_list(&output("ip", &["netns", "list"]).await?);
        ns.extend(taken.iter().cloned());
        let addrs = plan::parse_addrs(&output("ip", &["-4", "-o", "addr", "show"]).await?);
        let index = plan::pick_index(&ns, &addrs).ok_or(LabError::NoFreeIndex)?;
        let s = LabShape { index, ..shape };
        let c = s.claim_command();
        let args: Vec<&str> = c[1..].iter().map(String::as_str).collect();
        match run(&c[0], &args).await {
            Ok(()) => return Ok(s),
            Err(tern_hv::HvError::Command { stderr, .. }) if stderr.contains("exists") => {
                taken.push(s.switch_ns());
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn build(
    state: &mut LabState,
    shape: &LabShape,
    opts: &LabOptions,
    progress: &dyn Fn(&str),
) -> Result<(), LabError> {
    progress(&format!(
        "lab: creating {} hosts in 198.18.{}.0/24 (links: {})",
        shape.hosts,
        shape.index,
        shape
            .link_mbit
            .map_or("unshaped".to_string(), |m| format!("{m} Mbit/s"))
    ));
    for c in shape.up_commands() {
        let args: Vec<&str> = c[1..].iter().map(String::as_str).collect();
        run(&c[0], &args).await?;
    }
    let capacity = tern_agent::host::detect_capacity()?;
    let memory = opts
        .host_memory_mib
        .unwrap_or(capacity.memory_mib / u64::from(shape.hosts));
    let cpus = opts.host_cpus.unwrap_or(capacity.cpus);
    if let Some(dir) = &state.ca_dir {
        progress(&format!("lab: making a lab CA in {}", dir.display()));
        let ca = tern_pki::Ca::init(dir)?;
        for h in &state.hosts {
            let addr: std::net::IpAddr = h.addr.parse().map_err(|source| LabError::BadAddress {
                addr: h.addr.clone(),
                source,
            })?;
            ca.issue(tern_pki::Role::Host, &h.name, &[addr])?
                .save(&h.state_dir.join("tls"))?;
        }
        ca.issue(tern_pki::Role::Operator, "operator", &[])?
            .save(&operator_dir(dir))?;
    }
    for i in 0..state.hosts.len() {
        let h = state.hosts[i].clone();
        progress(&format!("lab: starting agent {} at {}", h.name, h.url));
        for d in [&h.state_dir, &h.mem_dir] {
            std::fs::create_dir_all(d)
                .map_err(LabError::io(format!("creating {}", d.display())))?;
        }
        let mut cmd = std::process::Command::new("ip");
        if let Some(url) = &state.manager_url {
            cmd.args(["netns", "exec", &h.netns])
                .arg(&opts.tern_binary)
                .args(["agent", "--manager", url])
                .arg("--manager-token-file")
                .arg(&state.token_file);
        } else {
            cmd.args(["netns", "exec", &h.netns])
                .arg(&opts.tern_binary)
                .arg("agent");
        }
        cmd.args(["--listen", &format!("{}:{AGENT_PORT}", h.addr)])
            .arg("--state-dir")
            .arg(&h.state_dir)
            .args(match &state.ca_dir {
                Some(_) => ["--tls-dir".into(), h.state_dir.join("tls")],
                None => ["--token-file".into(), state.token_file.clone()],
            })
            .arg("--mem-dir")
            .arg(&h.mem_dir)
            .arg("--image-dir")
            .arg(&opts.image_dir)
            .arg("--store")
            .arg(state.store_dir())
            .arg("--local-store")
            .arg(h.local_store_dir())
            .args(["--bridge", HOST_BRIDGE, "--name", &h.name])
            .args([
                "--cpus",
                &cpus.to_string(),
                "--memory-mib",
                &memory.to_string(),
            ]);
        let argv: Vec<String> = std::iter::once(cmd.get_program())
            .chain(cmd.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        state.hosts[i].agent_argv = argv;
        let child = spawn_agent(&state.hosts[i], false)?;
        state.hosts[i].pid = Some(child);
        save(state)?;
    }
    for h in &state.hosts {
        wait_healthy(h, state.client(&h.url, Duration::from_secs(2))?).await?;
        progress(&format!("lab: {} is up", h.name));
    }
    Ok(())
}

fn write_private(path: &Path, text: &str) -> Result<(), LabError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| writeln!(f, "{text}"))
        .map_err(LabError::io(format!("writing {}", path.display())))
}

/// Starts `h`'s agent from its recorded command, its output to `STATE/agent.log`
/// (appended to on a restart); its pid.
fn spawn_agent(h: &LabHost, append: bool) -> Result<u32, LabError> {
    let (program, args) = h.agent_argv.split_first().ok_or_else(|| {
        LabError::BadRequest(format!(
            "the lab's state records no agent command for {}: bring the lab down and up again",
            h.name
        ))
    })?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(h.state_dir.join("agent.log"))
        .map_err(LabError::io("opening the agent log"))?;
    let log2 = log.try_clone().map_err(LabError::io("agent log"))?;
    let child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        // Its own process group: a Ctrl-C meant for the CLI does not reach the agents.
        .process_group(0)
        .spawn()
        .map_err(LabError::io("starting `ip netns exec ... tern agent`"))?;
    Ok(child.id())
}

/// Stops host `name`'s agent the way a service manager restarts it (SIGTERM, which
/// leaves its guests running; SIGKILL after 15 s) and starts it again with the same
/// command: the new agent adopts the guests. Saves the new pid; returns (old, new).
pub async fn restart_agent(
    state: &mut LabState,
    name: &str,
    progress: &dyn Fn(&str),
) -> Result<(Option<u32>, u32), LabError> {
    let i = state
        .hosts
        .iter()
        .position(|h| h.name == name)
        .ok_or_else(|| {
            let names: Vec<&str> = state.hosts.iter().map(|h| h.name.as_str()).collect();
            LabError::BadRequest(format!(
                "the lab has no host {name:?}; its hosts: {}",
                names.join(", ")
            ))
        })?;
    let old = state.hosts[i]
        .pid
        .filter(|&p| alive(p) && cmdline_has(p, "agent"));
    if let Some(pid) = old {
        progress(&format!("lab: stopping {name}'s agent (pid {pid})"));
        stop_agents(&[pid]).await;
    }
    let pid = spawn_agent(&state.hosts[i], true)?;
    state.hosts[i].pid = Some(pid);
    save(state)?;
    progress(&format!("lab: {name}'s agent started again (pid {pid})"));
    let h = state.hosts[i].clone();
    wait_healthy(&h, state.client(&h.url, Duration::from_secs(2))?).await?;
    Ok((old, pid))
}

async fn wait_healthy(h: &LabHost, client: AgentClient) -> Result<(), LabError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let err = match client.host().await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if !h.pid.is_some_and(alive) || tokio::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(h.state_dir.join("agent.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(LabError::AgentDown {
                host: h.name.clone(),
                cause: Box::new(err),
                log_tail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether process `pid` exists and has not exited.
pub fn alive(pid: u32) -> bool {
    // A zombie has exited; only its parent has not collected it yet.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next())
                .is_some_and(|st| st != "Z")
        })
        .unwrap_or(false)
}

fn cmdline_has(pid: u32, word: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).contains(word))
        .unwrap_or(false)
}

/// Asks every agent how it is.
pub async fn status(state: &LabState) -> Result<Vec<HostStatus>, LabError> {
    let mut out = Vec::new();
    for h in &state.hosts {
        let running = h.pid.is_some_and(alive);
        let client = state.client(&h.url, Duration::from_secs(2))?;
        let (report, error) = match client.host().await {
            Ok(r) => (Some(r), None),
            Err(e) => (None, Some(e.to_string())),
        };
        out.push(HostStatus {
            name: h.name.clone(),
            addr: h.addr.clone(),
            url: h.url.clone(),
            agent_running: running,
            report,
            error,
        });
    }
    Ok(out)
}

/// Destroys the VMs, stops the agents (and kills any QEMU left), removes the namespaces, links, memory
/// directories and the lab directory. Returns what it removed.
pub async fn down(dir: &Path, progress: &dyn Fn(&str)) -> Result<Vec<String>, LabError> {
    let state = load(dir)?.ok_or_else(|| {
        LabError::BadRequest(format!(
            "no lab is up: no state file at {}",
            state_file(dir).display()
        ))
    })?;
    let mut removed = stop_vms(&state, progress).await;
    let agents: Vec<u32> = state
        .hosts
        .iter()
        .filter_map(|h| h.pid)
        .filter(|&p| alive(p) && cmdline_has(p, "agent"))
        .collect();
    progress(&format!("lab: stopping {} agents", agents.len()));
    stop_agents(&agents).await;
    removed.extend(agents.iter().map(|p| format!("agent process {p}")));
    let qemus = leftover_qemus(&state);
    signal(&qemus, "KILL").await;
    removed.extend(qemus.iter().map(|p| format!("QEMU process {p}")));

    progress("lab: removing namespaces and links");
    for c in state.shape().down_commands() {
        let args: Vec<&str> = c[1..].iter().map(String::as_str).collect();
        match run(&c[0], &args).await {
            Ok(()) => removed.push(c.join(" ")),
            // Never made (an `up` that failed early) or already gone.
            Err(e) => tracing::debug!(error = %e, "lab teardown step skipped"),
        }
    }
    for d in [&state.mem_root, &state.dir] {
        if d.exists() {
            std::fs::remove_dir_all(d)
                .map_err(LabError::io(format!("removing {}", d.display())))?;
            removed.push(format!("directory {}", d.display()));
        }
    }
    Ok(removed)
}

/// Destroys every VM of every host through its agent, as an operator would with `tern
/// agent vm delete`: a stopping agent leaves its guests running. An agent that does not
/// answer is skipped (its QEMUs are killed by pid file once the agents are gone).
async fn stop_vms(state: &LabState, progress: &dyn Fn(&str)) -> Vec<String> {
    let mut stopped = Vec::new();
    for h in &state.hosts {
        let Ok(client) = state.client(&h.url, Duration::from_secs(10)) else {
            continue;
        };
        let Ok(vms) = client.list_vms().await else {
            continue;
        };
        for vm in vms {
            match client.delete_vm(&vm.info.id).await {
                Ok(()) => stopped.push(format!("VM {} on {}", vm.info.id, h.name)),
                Err(e) => progress(&format!(
                    "lab: could not delete VM {} on {}: {e}",
                    vm.info.id, h.name
                )),
            }
        }
    }
    progress(&format!("lab: stopped {} VMs", stopped.len()));
    stopped
}

/// QEMU processes whose pid files sit under the lab's host directories.
fn leftover_qemus(state: &LabState) -> Vec<u32> {
    let mut out = Vec::new();
    for h in &state.hosts {
        let Ok(rd) = std::fs::read_dir(h.state_dir.join("run")) else {
            continue;
        };
        for e in rd.flatten() {
            let pid = std::fs::read_to_string(e.path().join("qemu.pid"))
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if let Some(p) = pid.filter(|&p| alive(p) && cmdline_has(p, "qemu")) {
                out.push(p);
            }
        }
    }
    out
}

/// SIGTERM to agents `pids`, which leaves their guests running; an agent ends its
/// migrations on the way out, so it gets 15 s before SIGKILL.
async fn stop_agents(pids: &[u32]) {
    signal(pids, "TERM").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while pids.iter().any(|&p| alive(p)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stubborn: Vec<u32> = pids.iter().copied().filter(|&p| alive(p)).collect();
    signal(&stubborn, "KILL").await;
}

async fn signal(pids: &[u32], sig: &str) {
    for p in pids {
        let _ = run("kill", &[&format!("-{sig}"), &p.to_string()]).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euid_from_status() {
        let s = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t0\n";
        assert_eq!(effective_uid(s), Some(0));
        assert_eq!(effective_uid("Uid:\t5\t7\t7\t7"), Some(7));
        assert_eq!(effective_uid(""), None);
    }

    #[test]
    fn no_lab_means_no_state() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(load(d.path()).unwrap(), None);
    }

    #[test]
    fn liveness() {
        assert!(alive(std::process::id()));
        assert!(cmdline_has(std::process::id(), "tern"));
    }
}
