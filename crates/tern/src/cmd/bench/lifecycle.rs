//! `tern bench lifecycle`: a VM's life through the manager on a fresh 2-host lab, each
//! step a case that passes or fails: boot from each template (time to the guest agent's
//! first answer), disk writes, live migration with a shared and with a local disk, suspend
//! on one host and restore on the other, an agent restarted under its VMs, and a host
//! whose agent dies, its VM restarted
//! elsewhere from its disk. Progress on stderr; a table, or JSON with `--json`; exit 1
//! when a case fails.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{json, Value};
use tern_api::client::{Client, ClientOptions};
use tern_lab::LabState;

use crate::cmd::bad_input;

#[derive(clap::Args)]
pub struct Args {
    /// Size of the local disk migrated with its VM, in MiB (64 to 65536).
    #[arg(long, default_value_t = 1024)]
    disk_mib: u64,
    /// Also boot the Debian 12 image (built into the cache first if missing, about 4
    /// minutes) and report its boot time.
    #[arg(long)]
    debian: bool,
    /// Link speed between the lab's hosts, in Mbit/s.
    #[arg(long, default_value_t = 1000)]
    link_mbit: u32,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// One step of the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Case {
    pub name: String,
    pub ok: bool,
    pub seconds: f64,
    pub detail: String,
}

/// One live migration through the manager.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationFigure {
    /// `shared` or `local`.
    pub disk: &'static str,
    pub total_ms: u64,
    pub downtime_ms: u64,
    /// The disk held every write `diskverify` made durable before and during the move.
    pub disk_ok: bool,
    /// The guest answered on the destination and its memory verifier found no lost page.
    pub guest_ok: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub cases: Vec<Case>,
    /// Seconds from `vm create` to the guest agent's first answer, per template.
    pub boot_s: BTreeMap<String, f64>,
    pub migrations: Vec<MigrationFigure>,
}

impl Report {
    /// The cases that failed (pure).
    pub fn failed(&self) -> Vec<&str> {
        self.cases
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect()
    }
}

/// Checks the flags before anything is built (pure).
fn check_args(a: &Args) -> Result<(), String> {
    if !(64..=65536).contains(&a.disk_mib) {
        return Err(format!("--disk-mib {}: give 64 to 65536 MiB", a.disk_mib));
    }
    if a.link_mbit == 0 {
        return Err("--link-mbit must be at least 1".into());
    }
    Ok(())
}

/// The MiB `diskverify` and the memory verifier cover: a few, so that the writes are
/// many per second without costing the TCG guest much.
const VERIFY_MIB: u64 = 16;
/// The lease the run gives hosts: short, so a dead host's VM restarts within seconds.
const LEASE_S: u64 = 8;
const RENEW_S: u64 = 2;
const HOST_MEMORY_MIB: u64 = 2048;
const SHARED_VM: &str = "lc-shared";
const LOCAL_VM: &str = "lc-local";
const DEBIAN_VM: &str = "lc-debian";

pub fn run(args: Args) -> anyhow::Result<()> {
    check_args(&args).map_err(bad_input)?;
    tern_lab::require_root().map_err(bad_input)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let report = super::with_lab_on(
        2,
        Some(args.link_mbit),
        HOST_MEMORY_MIB,
        Some(port),
        async |lab, _img, dir| {
            let mut manager = start_manager(lab, port, dir, &[]).await?;
            let r = lifecycle(lab, &manager.client, &args).await;
            manager.stop();
            r
        },
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    let failed = report.failed();
    if !failed.is_empty() {
        anyhow::bail!("{} case(s) failed: {}", failed.len(), failed.join(", "));
    }
    Ok(())
}

fn print_table(r: &Report) {
    let rows: Vec<Vec<String>> = r
        .cases
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                if c.ok { "ok" } else { "FAILED" }.into(),
                format!("{:.1}", c.seconds),
                c.detail.clone(),
            ]
        })
        .collect();
    crate::cmd::host::table(&["CASE", "RESULT", "SECONDS", "DETAIL"], &rows);
    for (t, s) in &r.boot_s {
        println!("boot {t}: {s:.1} s");
    }
    for m in &r.migrations {
        println!(
            "migration, {} disk: total {} ms, downtime {} ms, disk {}, guest {}",
            m.disk,
            m.total_ms,
            m.downtime_ms,
            if m.disk_ok { "ok" } else { "BAD" },
            if m.guest_ok { "ok" } else { "BAD" }
        );
    }
}

/// `tern manager` on the lab's root address and CA, killed when dropped.
pub(super) struct Manager {
    child: Option<Child>,
    pub client: Client,
}

impl Manager {
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `tern manager` for `lab` on `port` with `extra` arguments; waits until it
/// answers.
pub(super) async fn start_manager(
    lab: &LabState,
    port: u16,
    dir: &Path,
    extra: &[&str],
) -> anyhow::Result<Manager> {
    let ca = lab.ca_dir.as_ref().context("the lab has no CA")?;
    let url = lab
        .manager_url
        .clone()
        .context("the lab has no manager URL")?;
    let log = dir.join("manager.log");
    let out = std::fs::File::create(&log)?;
    let child = Command::new(std::env::current_exe()?)
        .args(["manager", "--listen", &format!("{}:{port}", lab.root_addr)])
        .arg("--ca")
        .arg(ca)
        .arg("--db")
        .arg(dir.join("manager.db"))
        .arg("--token-file")
        .arg(&lab.token_file)
        .args(extra)
        .env_remove("TERN_TOKEN")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting `tern manager`")?;
    let tls = lab.tls()?.context("the lab has no CA")?;
    let client = Client::with_tls(
        &url,
        &lab.token()?,
        ClientOptions::with_timeout(Duration::from_secs(60)),
        Some(tls),
    )?;
    let mut m = Manager {
        child: Some(child),
        client,
    };
    let up = wait_until("the manager answers", Duration::from_secs(30), async || {
        m.client.get::<Value>("/v1/hosts").await.is_ok()
    })
    .await;
    if up.is_err() {
        m.stop();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        anyhow::bail!("the manager did not come up; its log ends: {tail:?}");
    }
    eprintln!("manager: {url}");
    Ok(m)
}

/// Polls `ok` every 250 ms until it holds; an error naming `what` after `limit`.
pub(super) async fn wait_until(
    what: &str,
    limit: Duration,
    mut ok: impl AsyncFnMut() -> bool,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    loop {
        if ok().await {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > limit {
            anyhow::bail!("{what}: not within {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The run's handles: the lab, the manager and one agent client per host.
struct Run<'a> {
    lab: &'a LabState,
    m: &'a Client,
    agents: BTreeMap<String, tern_api::client::AgentClient>,
    report: Report,
}

impl Run<'_> {
    /// Records a case from what `r` answered: its detail, or the error as detail.
    fn record(&mut self, name: &str, t0: Instant, r: anyhow::Result<String>) -> bool {
        let seconds = t0.elapsed().as_secs_f64();
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(e) => (false, format!("{e:#}")),
        };
        eprintln!(
            "case {name}: {} in {seconds:.1} s: {detail}",
            if ok { "ok" } else { "FAILED" }
        );
        self.report.cases.push(Case {
            name: name.into(),
            ok,
            seconds,
            detail,
        });
        ok
    }

    async fn vm(&self, name: &str) -> anyhow::Result<Value> {
        Ok(self.m.get(&format!("/v1/vms/{name}")).await?)
    }

    /// Waits until the manager records `vm` in `state` on `host`.
    async fn wait_state(
        &self,
        vm: &str,
        state: &str,
        host: &str,
        limit: Duration,
    ) -> anyhow::Result<Duration> {
        let what = format!("{vm} {state} on {host}");
        wait_until(&what, limit, async || {
            self.vm(vm).await.is_ok_and(|v| {
                v["state"] == state && (state != "running" || v["observed_host"] == host)
            })
        })
        .await
    }

    /// One guest request to `vm` on `host`; the guest's `result`, or an error.
    async fn guest(&self, host: &str, vm: &str, req: Value) -> anyhow::Result<Value> {
        let agent = self.agents.get(host).context("no such host")?;
        let v = agent.guest(vm, &req).await?;
        if v["ok"] != true {
            anyhow::bail!("guest of {vm} on {host} answered {v}");
        }
        Ok(v["result"].clone())
    }

    /// Pings `vm` on `host` until it answers; how long that took.
    async fn wait_guest(&self, host: &str, vm: &str, limit: Duration) -> anyhow::Result<Duration> {
        wait_until(
            &format!("the guest of {vm} answers on {host}"),
            limit,
            async || self.guest(host, vm, json!({"cmd": "ping"})).await.is_ok(),
        )
        .await
    }

    /// `disk-check` of `vm`: (counter on disk, writes counted durable, bad blocks).
    async fn disk_check(&self, host: &str, vm: &str, after_reboot: bool) -> anyhow::Result<Disk> {
        let req = match after_reboot {
            true => {
                json!({"cmd": "disk-check", "device": tern_api::guest::DEFAULT_DISK_DEVICE, "mib": VERIFY_MIB})
            }
            false => json!({"cmd": "disk-check"}),
        };
        let r = self.guest(host, vm, req).await?;
        Ok(Disk {
            counter: r["counter"]
                .as_u64()
                .context("disk-check without a counter")?,
            written: r["written"].as_u64(),
            bad_blocks: r["bad_blocks"]
                .as_u64()
                .context("disk-check without bad_blocks")?,
        })
    }

    /// The memory verifier of `vm`: (counter, lost pages).
    async fn verify(&self, host: &str, vm: &str) -> anyhow::Result<(u64, u64)> {
        let r = self.guest(host, vm, json!({"cmd": "verify"})).await?;
        Ok((
            r["counter"].as_u64().unwrap_or(0),
            r["bad_pages"].as_u64().unwrap_or(u64::MAX),
        ))
    }

    async fn create(&self, body: Value) -> anyhow::Result<()> {
        let _: Value = self.m.post("/v1/vms", &body).await?;
        Ok(())
    }

    async fn act(&self, vm: &str, action: &str, body: Value) -> anyhow::Result<()> {
        let _: Value = self
            .m
            .post(&format!("/v1/vms/{vm}/{action}"), &body)
            .await?;
        Ok(())
    }
}

/// What `disk-check` read.
#[derive(Debug, Clone, Copy)]
struct Disk {
    counter: u64,
    written: Option<u64>,
    bad_blocks: u64,
}

/// The disk holds at least `floor` writes and every block is what its counter implies
/// (pure).
fn disk_verdict(d: &Disk, floor: u64) -> Result<String, String> {
    let durable = d.written.unwrap_or(0).max(floor);
    if d.bad_blocks > 0 {
        return Err(format!("{} bad blocks on the disk", d.bad_blocks));
    }
    if d.counter < durable {
        return Err(format!(
            "the disk holds {} writes, fewer than the {durable} made durable",
            d.counter
        ));
    }
    Ok(format!("disk holds {} writes, no bad block", d.counter))
}

async fn lifecycle(lab: &LabState, m: &Client, args: &Args) -> anyhow::Result<Report> {
    let mut agents = BTreeMap::new();
    for h in &lab.hosts {
        agents.insert(h.name.clone(), lab.client(&h.url, Duration::from_secs(30))?);
    }
    let mut run = Run {
        lab,
        m,
        agents,
        report: Report::default(),
    };
    setup(&run, args).await?;
    let (h1, h2) = ("h1", "h2");

    // Boot from each template: the shared-disk VM, then the local-disk one on h1.
    let t0 = Instant::now();
    let r = boot(&run, SHARED_VM, h1, "shared", 64).await;
    if let Ok(s) = &r {
        run.report.boot_s.insert("minimal".into(), *s);
    }
    let ok = run.record(
        "create-minimal",
        t0,
        r.map(|s| {
            format!("{SHARED_VM} on {h1}, 64 MiB shared disk: guest answered {s:.1} s after create")
        }),
    );
    if !ok {
        return Ok(run.report);
    }
    if args.debian {
        let t0 = Instant::now();
        let r = boot_debian(&run, h2).await;
        if let Ok(s) = &r {
            run.report.boot_s.insert("debian".into(), *s);
        }
        run.record(
            "create-debian",
            t0,
            r.map(|s| format!("{DEBIAN_VM} on {h2}: guest answered {s:.1} s after create")),
        );
    }
    let t0 = Instant::now();
    let r = boot(&run, LOCAL_VM, h1, "local", args.disk_mib).await;
    let local_ok = run.record(
        "create-local-disk",
        t0,
        r.map(|s| {
            format!(
                "{LOCAL_VM} on {h1}, {} MiB local disk: guest answered {s:.1} s after create",
                args.disk_mib
            )
        }),
    );

    // Writes on both disks and a memory verifier in both guests.
    let t0 = Instant::now();
    let mut vms = vec![SHARED_VM];
    if local_ok {
        vms.push(LOCAL_VM);
    }
    let r = start_writers(&run, h1, &vms).await;
    if !run.record("diskverify", t0, r) {
        return Ok(run.report);
    }

    for (vm, disk) in [(SHARED_VM, "shared"), (LOCAL_VM, "local")] {
        if vm == LOCAL_VM && !local_ok {
            continue;
        }
        let t0 = Instant::now();
        let r = migrate(&mut run, vm, disk, h1, h2).await;
        run.record(&format!("migrate-{disk}-disk"), t0, r);
    }

    // Both VMs now run on h2: its agent restarts under them.
    let t0 = Instant::now();
    let mut on_h2 = vec![SHARED_VM];
    if local_ok {
        on_h2.push(LOCAL_VM);
    }
    let r = agent_restart(&run, &on_h2, h2).await;
    run.record("agent-restart", t0, r);

    let t0 = Instant::now();
    let r = suspend_restore(&run, SHARED_VM, h1).await;
    if !run.record("suspend-restore", t0, r) {
        return Ok(run.report);
    }

    let t0 = Instant::now();
    let r = host_killed(&run, SHARED_VM, h1, h2).await;
    run.record("host-killed", t0, r);
    Ok(run.report)
}

/// The manager's settings, hosts, images and templates.
async fn setup(run: &Run<'_>, args: &Args) -> anyhow::Result<()> {
    let mut settings: Value = run.m.get("/v1/balancer").await?;
    // No balancing: the run moves its VMs itself. A short lease: the dead host's VM
    // restarts within seconds.
    settings["enabled"] = json!(false);
    settings["interval_s"] = json!(1);
    settings["lease_s"] = json!(LEASE_S);
    settings["renew_s"] = json!(RENEW_S);
    let _: Value = run.m.put("/v1/balancer", &settings).await?;
    for h in &run.lab.hosts {
        let body = json!({"name": h.name, "address": h.url,
                          "capacity": {"cpus": 2.0, "memory_mib": HOST_MEMORY_MIB}});
        let _: Value = run.m.post("/v1/hosts", &body).await?;
    }
    for h in &run.lab.hosts {
        let lease = tern_agent::fence::lease_file(&h.state_dir);
        wait_until(
            &format!("{} holds a lease", h.name),
            Duration::from_secs(30),
            async || lease.exists(),
        )
        .await?;
        wait_until(
            &format!("the manager knows {}'s store", h.name),
            Duration::from_secs(30),
            async || {
                let v: Result<Value, _> = run.m.get(&format!("/v1/hosts/{}", h.name)).await;
                v.is_ok_and(|v| v["store_free_mib"].is_u64())
            },
        )
        .await?;
    }
    eprintln!("image: importing minimal");
    cli(
        run.lab,
        &["image", "import", "minimal", "--from", "minimal"],
    )?;
    cli(
        run.lab,
        &[
            "template",
            "create",
            "minimal",
            "--image",
            "minimal",
            "--memory-mib",
            "256",
        ],
    )?;
    if args.debian {
        let cache = tern_hv::image::default_cache_dir();
        let img = tern_hv::image::debian::ensure_debian_image_async(cache, |s| {
            eprintln!("debian image: {s}")
        })
        .await
        .context("building the Debian image")?;
        eprintln!("image: importing debian");
        let p = |p: &PathBuf| p.to_string_lossy().into_owned();
        cli(
            run.lab,
            &[
                "image",
                "import",
                "debian",
                "--kernel",
                &p(&img.kernel),
                "--initramfs",
                &p(&img.initrd),
                "--disk",
                &p(&img.root_disk),
                "--cmdline",
                &img.cmdline,
            ],
        )?;
        cli(
            run.lab,
            &[
                "template",
                "create",
                "debian",
                "--image",
                "debian",
                "--memory-mib",
                "512",
            ],
        )?;
    }
    Ok(())
}

/// `tern ARGS --json` against the lab's manager; fails with its stderr.
pub(super) fn cli(lab: &LabState, args: &[&str]) -> anyhow::Result<Value> {
    let url = lab.manager_url.as_deref().context("no manager URL")?;
    let ca = lab.ca_dir.as_ref().context("no CA")?.join("ca.pem");
    let o = Command::new(std::env::current_exe()?)
        .args(args)
        .args(["--json", "--manager", url, "--token-file"])
        .arg(&lab.token_file)
        .arg("--ca-cert")
        .arg(&ca)
        .env_remove("TERN_TOKEN")
        .env_remove("TERN_MANAGER")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running tern {}", args.join(" ")))?;
    if !o.status.success() {
        anyhow::bail!(
            "tern {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&o.stdout)?)
}

/// Creates `vm` from the `minimal` template on `host` with one data disk of `mib` MiB
/// in `store`; seconds from the create call to the guest agent's first answer.
async fn boot(run: &Run<'_>, vm: &str, host: &str, store: &str, mib: u64) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    run.create(json!({
        "name": vm, "host": host, "template": "minimal",
        "spec": {"disks": [{"name": "data", "size_mib": mib, "store": store}]}
    }))
    .await?;
    run.wait_guest(host, vm, Duration::from_secs(180)).await?;
    Ok(t0.elapsed().as_secs_f64())
}

/// A VM from the `debian` template on `host`, timed to its guest agent's first answer,
/// then deleted (its memory is not needed for the rest of the run).
async fn boot_debian(run: &Run<'_>, host: &str) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    run.create(json!({"name": DEBIAN_VM, "host": host, "template": "debian", "spec": {}}))
        .await?;
    run.wait_guest(host, DEBIAN_VM, Duration::from_secs(600))
        .await?;
    let s = t0.elapsed().as_secs_f64();
    let _: Value = run.m.delete(&format!("/v1/vms/{DEBIAN_VM}")).await?;
    wait_until(
        &format!("{DEBIAN_VM} deleted"),
        Duration::from_secs(60),
        async || run.vm(DEBIAN_VM).await.is_err(),
    )
    .await?;
    Ok(s)
}

async fn start_writers(run: &Run<'_>, host: &str, vms: &[&str]) -> anyhow::Result<String> {
    for vm in vms {
        for w in [
            format!("diskverify --mib {VERIFY_MIB} --blocks-per-sec 100"),
            format!("verifier --mib {VERIFY_MIB}"),
        ] {
            run.guest(host, vm, json!({"cmd": "start", "workload": w}))
                .await?;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut out = Vec::new();
    for vm in vms {
        let d = run.disk_check(host, vm, false).await?;
        if d.counter == 0 {
            anyhow::bail!("{vm} wrote nothing to its disk in 3 s");
        }
        let v = disk_verdict(&d, 1).map_err(|e| anyhow::anyhow!("{vm}: {e}"))?;
        out.push(format!("{vm}: {v}"));
    }
    Ok(out.join("; "))
}

/// Live-migrates `vm` from `from` to `to` through the manager and checks its disk and
/// guest there; records the figure.
async fn migrate(
    run: &mut Run<'_>,
    vm: &str,
    disk: &'static str,
    from: &str,
    to: &str,
) -> anyhow::Result<String> {
    let before = run.disk_check(from, vm, false).await?;
    let started: Value = run
        .m
        .post(&format!("/v1/vms/{vm}/migrate"), &json!({"to": to}))
        .await?;
    let id = started["id"]
        .as_u64()
        .context("a migration without an id")?;
    let mut result = Value::Null;
    wait_until(
        &format!("the migration of {vm} ends"),
        Duration::from_secs(600),
        async || match run.m.get::<Value>(&format!("/v1/migrations/{id}")).await {
            Ok(v) if v["result"]["status"] != "running" => {
                result = v["result"].clone();
                true
            }
            _ => false,
        },
    )
    .await?;
    if result["status"] != "succeeded" {
        anyhow::bail!("the migration of {vm} ended {result}");
    }
    let (total_ms, downtime_ms) = (
        result["total_ms"].as_u64().unwrap_or(0),
        result["downtime_ms"].as_u64().unwrap_or(0),
    );
    run.wait_state(vm, "running", to, Duration::from_secs(30))
        .await?;
    run.wait_guest(to, vm, Duration::from_secs(30)).await?;
    let after = run.disk_check(to, vm, false).await;
    let disk_v = after
        .as_ref()
        .map_err(|e| format!("{e:#}"))
        .and_then(|d| disk_verdict(d, before.counter));
    let mem = run.verify(to, vm).await;
    let guest_v = match &mem {
        Ok((c, 0)) => Ok(format!("memory verifier at {c}, no page lost")),
        Ok((_, bad)) => Err(format!("{bad} pages lost")),
        Err(e) => Err(format!("{e:#}")),
    };
    run.report.migrations.push(MigrationFigure {
        disk,
        total_ms,
        downtime_ms,
        disk_ok: disk_v.is_ok(),
        guest_ok: guest_v.is_ok(),
    });
    let d = disk_v.map_err(|e| anyhow::anyhow!("disk: {e}"))?;
    let g = guest_v.map_err(|e| anyhow::anyhow!("guest: {e}"))?;
    Ok(format!(
        "{from} -> {to}: total {total_ms} ms, downtime {downtime_ms} ms; {d}; {g}"
    ))
}

/// The QEMU pid `host`'s agent reports for `vm`.
async fn qemu_pid(run: &Run<'_>, host: &str, vm: &str) -> anyhow::Result<u32> {
    let agent = run.agents.get(host).context("no such host")?;
    let vms = agent.list_vms().await?;
    vms.iter()
        .find(|v| v.info.id == vm)
        .and_then(|v| v.info.pid)
        .with_context(|| format!("{host}'s agent reports no QEMU for {vm}"))
}

/// Restarts `host`'s agent while `vms` run there with their writers: the new agent
/// adopts the same QEMUs (same pids), the manager keeps them running there, and every
/// disk write and memory page is intact.
async fn agent_restart(run: &Run<'_>, vms: &[&str], host: &str) -> anyhow::Result<String> {
    let mut before = Vec::new();
    for vm in vms {
        let d = run.disk_check(host, vm, false).await?;
        let (m, _) = run.verify(host, vm).await?;
        before.push((qemu_pid(run, host, vm).await?, d.counter, m));
    }
    let mut lab = tern_lab::load(&run.lab.dir)?.context("the lab's state is gone")?;
    let t0 = Instant::now();
    tern_lab::restart_agent(&mut lab, host, &|s| eprintln!("{s}")).await?;
    let back = t0.elapsed();
    let mut out = Vec::new();
    for (vm, (pid, disk, mem)) in vms.iter().zip(before) {
        run.wait_state(vm, "running", host, Duration::from_secs(30))
            .await?;
        let now = qemu_pid(run, host, vm).await?;
        if now != pid {
            anyhow::bail!("{vm} runs in QEMU {now}, not the adopted {pid}");
        }
        let d = disk_verdict(&run.disk_check(host, vm, false).await?, disk)
            .map_err(|e| anyhow::anyhow!("{vm}: disk: {e}"))?;
        let (m, bad) = run.verify(host, vm).await?;
        if bad > 0 || m <= mem {
            anyhow::bail!("{vm}: memory verifier: {bad} pages lost, counter {mem} -> {m}");
        }
        out.push(format!(
            "{vm} (QEMU {pid}): {d}, memory verifier {mem} -> {m}"
        ));
    }
    Ok(format!(
        "{host}'s agent restarted and answering in {:.1} s; {}",
        back.as_secs_f64(),
        out.join("; ")
    ))
}

/// Suspends `vm` where it runs and restores it on `on`; its disk and memory intact.
async fn suspend_restore(run: &Run<'_>, vm: &str, on: &str) -> anyhow::Result<String> {
    let from = run.vm(vm).await?["observed_host"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let before = run.disk_check(&from, vm, false).await?;
    let (mem_before, _) = run.verify(&from, vm).await?;
    let t0 = Instant::now();
    run.act(vm, "suspend", json!({})).await?;
    run.wait_state(vm, "suspended", "", Duration::from_secs(120))
        .await?;
    let suspended = t0.elapsed();
    let t1 = Instant::now();
    run.act(vm, "restore", json!({"host": on})).await?;
    run.wait_state(vm, "running", on, Duration::from_secs(120))
        .await?;
    run.wait_guest(on, vm, Duration::from_secs(30)).await?;
    let restored = t1.elapsed();
    let d = disk_verdict(&run.disk_check(on, vm, false).await?, before.counter)
        .map_err(|e| anyhow::anyhow!("disk: {e}"))?;
    let (mem_after, bad) = run.verify(on, vm).await?;
    if bad > 0 || mem_after < mem_before {
        anyhow::bail!("memory verifier: {bad} pages lost, counter {mem_before} -> {mem_after}");
    }
    Ok(format!(
        "suspended on {from} in {:.1} s, restored on {on} in {:.1} s; {d}; memory verifier {mem_before} -> {mem_after}",
        suspended.as_secs_f64(),
        restored.as_secs_f64()
    ))
}

/// Kills `dead`'s agent for good: its watchdog stops `vm` when the lease runs out, the
/// manager boots `vm` on `other` from its disk, which holds every write made durable.
async fn host_killed(run: &Run<'_>, vm: &str, dead: &str, other: &str) -> anyhow::Result<String> {
    let before = run.disk_check(dead, vm, false).await?;
    // The lab's state on disk: an agent restarted earlier in the run has a new pid.
    let lab = tern_lab::load(&run.lab.dir)?.context("the lab's state is gone")?;
    let h = lab
        .hosts
        .iter()
        .find(|h| h.name == dead)
        .context("no such host")?;
    let pid = h.pid.context("the agent has no pid")?;
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()?;
    if !killed.success() {
        anyhow::bail!("kill -KILL {pid} failed");
    }
    let t0 = Instant::now();
    wait_until("the agent exits", Duration::from_secs(30), async || {
        !tern_lab::alive(pid)
    })
    .await?;
    eprintln!("{dead}: agent killed; lease {LEASE_S} s");
    run.wait_state(vm, "running", other, Duration::from_secs(LEASE_S * 4 + 120))
        .await?;
    run.wait_guest(other, vm, Duration::from_secs(180)).await?;
    let up = t0.elapsed();
    let d = disk_verdict(&run.disk_check(other, vm, true).await?, before.counter)
        .map_err(|e| anyhow::anyhow!("disk: {e}"))?;
    Ok(format!(
        "{dead}'s agent SIGKILLed: {vm} answered on {other} after {:.1} s (lease {LEASE_S} s); {d}",
        up.as_secs_f64()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(counter: u64, written: Option<u64>, bad_blocks: u64) -> Disk {
        Disk {
            counter,
            written,
            bad_blocks,
        }
    }

    #[test]
    fn a_disk_passes_only_with_every_durable_write_and_no_bad_block() {
        assert!(disk_verdict(&disk(10, Some(10), 0), 5).is_ok());
        assert!(disk_verdict(&disk(10, None, 0), 10).is_ok());
        assert!(disk_verdict(&disk(9, None, 0), 10).is_err());
        assert!(disk_verdict(&disk(9, Some(10), 0), 1).is_err());
        assert!(disk_verdict(&disk(20, Some(10), 1), 1).is_err());
    }

    fn args(disk_mib: u64, link_mbit: u32) -> Args {
        Args {
            disk_mib,
            debian: false,
            link_mbit,
            json: false,
        }
    }

    #[test]
    fn flags_out_of_range_are_refused() {
        assert!(check_args(&args(1024, 1000)).is_ok());
        assert!(check_args(&args(63, 1000)).is_err());
        assert!(check_args(&args(65537, 1000)).is_err());
        assert!(check_args(&args(1024, 0)).is_err());
    }

    #[test]
    fn failed_cases_are_named() {
        let case = |name: &str, ok| Case {
            name: name.into(),
            ok,
            seconds: 1.0,
            detail: String::new(),
        };
        let r = Report {
            cases: vec![case("a", true), case("b", false), case("c", false)],
            ..Default::default()
        };
        assert_eq!(r.failed(), ["b", "c"]);
        let ok = Report {
            cases: vec![case("a", true)],
            ..Default::default()
        };
        assert!(ok.failed().is_empty());
    }
}
