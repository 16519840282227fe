//! The web page in Debian's headless Chromium against a manager on a port-0 listener with
//! in-process sim hosts: the rendered DOM shows every host, the VM count, a migration in
//! progress with its telemetry, the migration once it has run, and each VM's buttons for
//! the actions its state allows, which call the API when pressed (asking first for a
//! delete) and show its refusal; every route the page calls is one the API has. Without
//! chromium the test is skipped (with the reason printed) unless `CI` is set, in which
//! case it fails.

use std::path::Path;
use std::process::Command as Process;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_manager::decide::HostAddresses;

use tern_manager::control::Control;
use tern_manager::decide::Command;
use tern_manager::manager::system_clock;
use tern_manager::state::{BalancerSettings, Capacity, VmSpec};
use tern_manager::store::SqliteStore;
use tern_manager::Manager;
use tern_simhost::SimCluster;

const TOKEN: &str = "web-test-token";
const CHROMIUM: &str = "/usr/bin/chromium";
const HOSTS: [&str; 3] = ["rack1-h1", "rack1-h2", "rack2-h3"];
const VMS: usize = 7;

/// The chromium binary, or `None` (with the reason printed) when it is missing outside CI.
fn chromium() -> Option<&'static Path> {
    let p = Path::new(CHROMIUM);
    if p.exists() {
        return Some(p);
    }
    if std::env::var_os("CI").is_some() {
        panic!("{CHROMIUM} is missing; scripts/setup installs Debian's chromium");
    }
    eprintln!("skipped: {CHROMIUM} is missing (apt-get install chromium)");
    None
}

/// The page as Chromium renders it after its scripts ran for a few seconds of virtual time.
fn dump_dom(browser: &Path, url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Process::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--virtual-time-budget=5000")
        .arg("--dump-dom")
        .arg(url)
        .output()
        .expect("chromium starts");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && dom.contains("</html>"),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    dom
}

/// The text of the element with `id`, tags stripped (the DOM dump is plain HTML).
fn text_of(dom: &str, id: &str) -> String {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no element #{id} in the page:\n{dom}"));
    let rest = &dom[start..];
    let open = rest.find('>').unwrap() + 1;
    let mut depth = 0usize;
    let mut out = String::new();
    let mut in_tag = false;
    let mut tag = String::new();
    for c in rest[open..].chars() {
        match c {
            '<' => {
                in_tag = true;
                tag.clear();
            }
            '>' if in_tag => {
                in_tag = false;
                let void = tag.ends_with('/') || tag.starts_with("!");
                if tag.starts_with('/') {
                    if depth == 0 {
                        break;
                    }
                    depth -= 1;
                } else if !void {
                    depth += 1;
                }
                out.push(' ');
            }
            _ if in_tag => tag.push(c),
            _ => out.push(c),
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The API and page on a port-0 listener.
struct Served {
    base: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Served {
    async fn start(manager: &Arc<Manager>) -> Served {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tern_manager::api::serve(
            listener,
            manager.clone(),
            vec![TOKEN.into()],
            async move {
                let _ = stopped.await;
            },
        ));
        Served { base, stop, task }
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

/// The sim hosts of [`HOSTS`].
fn sim_hosts() -> Arc<SimCluster> {
    let sim = SimCluster::new();
    for h in HOSTS {
        sim.add_host(h);
    }
    sim
}

/// A manager over a fresh SQLite store with [`HOSTS`] registered as sim hosts.
fn manager(dir: &Path, capacity: Capacity) -> Arc<Manager> {
    let store = SqliteStore::open(&dir.join("tern.db")).unwrap();
    let manager = Arc::new(
        Manager::open(Box::new(store), system_clock())
            .unwrap()
            .serving(HostAddresses::Sim),
    );
    for h in HOSTS {
        manager
            .execute(Command::RegisterHost {
                name: h.into(),
                address: "sim:".into(),
                capacity,
            })
            .unwrap();
    }
    manager
}

/// A manager with [`HOSTS`] of `capacity` as sim hosts, the balancer off (the only
/// migrations are those a test asks for), and `vms` of 1 vCPU and 1 GiB running on the
/// first host.
async fn cluster(
    dir: &Path,
    capacity: Capacity,
    vms: impl IntoIterator<Item = String>,
) -> (Arc<Manager>, Arc<SimCluster>, Arc<Control>) {
    let manager = manager(dir, capacity);
    let sim = sim_hosts();
    manager
        .execute(Command::PutSettings(BalancerSettings {
            enabled: false,
            interval_s: 1,
            ..BalancerSettings::default()
        }))
        .unwrap();
    let control = Control::new(manager.clone(), sim.clone());
    for name in vms {
        manager
            .execute(Command::CreateVm {
                name,
                spec: VmSpec::sized(1, 1024),
                host: Some(HOSTS[0].into()),
                template: None,
            })
            .unwrap();
    }
    control.settle().await.unwrap();
    (manager, sim, control)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_hosts_vms_and_a_migration_in_chromium() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (manager, sim, control) = cluster(
        dir.path(),
        Capacity {
            cpus: 8.0,
            memory_mib: 32768,
        },
        (0..VMS).map(|i| format!("web-vm-{i}")),
    )
    .await;
    // Two busy VMs, measured over a short interval, give the first host a CPU load.
    for vm in ["web-vm-0", "web-vm-1"] {
        sim.set_utilisation(vm, 1.0).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    control.collect_reports().await.unwrap();

    // web-vm-0's host reports its guest panicked (what an agent's health watch says).
    let (host, report) = manager.read(|s| {
        let host = s.vms["web-vm-0"].observed_host.clone().unwrap();
        let vms = s
            .vms_observed_on(&host)
            .map(|v| tern_api::manager::VmLoad {
                name: v.name.parse().unwrap(),
                cpu_used: v.cpu_used,
                guest: (v.name == "web-vm-0").then(|| tern_api::health::GuestHealth {
                    state: tern_api::health::GuestState::Panicked,
                    reason: "Kernel panic - not syncing: sysrq triggered crash".into(),
                    since_ms: 1,
                }),
                powered_off: false,
            })
            .collect();
        let report = tern_api::manager::LoadReport {
            cpu_used: s.hosts[&host].cpu_used.unwrap_or(0.0),
            vms,
            store_free_mib: None,
        };
        (host, report)
    });
    manager
        .execute(Command::Heartbeat { host, report })
        .unwrap();

    let served = Served::start(&manager).await;
    let base = served.base.clone();
    let url = format!("{base}/?token={TOKEN}");

    let b = browser.to_owned();
    let u = url.clone();
    let dom = tokio::task::spawn_blocking(move || dump_dom(&b, &u))
        .await
        .unwrap();
    let hosts = text_of(&dom, "hosts");
    for h in HOSTS {
        assert!(
            hosts.contains(h),
            "host {h} missing from the hosts table: {hosts}"
        );
    }
    let first = format!("{} active ", HOSTS[0]);
    let cpu = hosts
        .split(&first)
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|c| c.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no CPU load for {}: {hosts}", HOSTS[0]));
    assert!(
        (1.5..=2.5).contains(&cpu),
        "two busy vCPUs show as {cpu} cores: {hosts}"
    );
    assert!(
        hosts.contains("7.0 / 32 GiB"),
        "memory of 7 VMs of 1 GiB: {hosts}"
    );
    assert_eq!(text_of(&dom, "host-count"), HOSTS.len().to_string());
    assert_eq!(text_of(&dom, "vm-count"), VMS.to_string());
    assert!(text_of(&dom, "vms").contains("web-vm-6"), "{dom}");
    // The guest column: what the host reports, the reason as a tooltip; a dash for the
    // guests the simulated hosts do not watch.
    assert!(
        dom.contains(r#"<span class="guest-panicked" title="Kernel panic - not syncing: sysrq triggered crash">panicked</span>"#),
        "{dom}"
    );
    // Each running VM has the buttons of what a running VM allows, and only those.
    assert_eq!(
        dom.matches("data-action=\"pause\"").count(),
        VMS,
        "a pause button per running VM: {dom}"
    );
    assert!(
        text_of(&dom, "vms").contains("0.00 stop reboot pause suspend delete"),
        "{dom}"
    );
    assert!(!dom.contains("data-action=\"start\""), "{dom}");
    assert!(
        !text_of(&dom, "recent").contains("web-vm-"),
        "no migration yet"
    );
    assert!(text_of(&dom, "events").contains("vm_created"), "{dom}");
    assert!(
        dom.contains("<polyline"),
        "the score chart has a line: {dom}"
    );

    // A migration by hand, as an operator would ask through the API.
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/vms/web-vm-3/migrate"))
        .bearer_auth(TOKEN)
        .json(&serde_json::json!({ "to": HOSTS[2] }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::ACCEPTED);
    // Paced so that it runs while the browser looks: a busy guest's first round quickly,
    // then all but frozen, so the page shows a round done and the next under way.
    sim.set_utilisation("web-vm-3", 1.0).await.unwrap();
    sim.set_migration_pace(0.2);
    control.dispatch().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !manager.live().all().values().any(|p| p.round >= 1) {
        assert!(Instant::now() < deadline, "no round reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sim.set_migration_pace(1000.0);
    let b = browser.to_owned();
    let u = url.clone();
    let dom = tokio::task::spawn_blocking(move || dump_dom(&b, &u))
        .await
        .unwrap();
    let running = text_of(&dom, "running");
    assert!(
        running.contains(&format!(
            "web-vm-3 {} {} adaptive pre-copy",
            HOSTS[0], HOSTS[2]
        )),
        "the running migration is not shown: {running}"
    );
    // After the phase: elapsed (a number and a unit), then the round.
    let after: Vec<&str> = running
        .split(" pre-copy ")
        .nth(1)
        .unwrap()
        .split(' ')
        .collect();
    let round: u32 = after[2]
        .parse()
        .unwrap_or_else(|_| panic!("round: {running}"));
    assert!(round >= 1, "{running}");
    assert!(running.contains("/s"), "a dirty rate: {running}");
    assert!(
        running.contains("GB") || running.contains("MB"),
        "bytes: {running}"
    );
    assert_eq!(text_of(&dom, "running-count"), "1");
    sim.set_migration_pace(0.0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while manager.read(|s| !s.running.is_empty()) {
        assert!(Instant::now() < deadline, "the migration did not finish");
        control.settle().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let b = browser.to_owned();
    let dom = tokio::task::spawn_blocking(move || dump_dom(&b, &url))
        .await
        .unwrap();
    let recent = text_of(&dom, "recent");
    assert!(
        recent.contains(&format!("web-vm-3 {} {}", HOSTS[0], HOSTS[2])),
        "the migration is not listed: {recent}"
    );
    assert!(recent.contains("succeeded"), "{recent}");
    assert!(
        text_of(&dom, "events").contains("migration_finished"),
        "{dom}"
    );
    assert_eq!(text_of(&dom, "vm-count"), VMS.to_string());

    // Without a token the page asks for one instead of showing data.
    let b = browser.to_owned();
    let dom = tokio::task::spawn_blocking(move || dump_dom(&b, &base))
        .await
        .unwrap();
    assert_eq!(text_of(&dom, "host-count"), "0");
    assert!(text_of(&dom, "status").contains("token"), "{dom}");

    served.stop().await;
}

#[tokio::test]
async fn history_answers_scores_and_the_latest_events_behind_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let manager = manager(
        dir.path(),
        Capacity {
            cpus: 4.0,
            memory_mib: 8192,
        },
    );
    let served = Served::start(&manager).await;
    let base = served.base.clone();
    let http = reqwest::Client::new();
    let get = |q: &str, token: Option<&str>| {
        let mut r = http.get(format!("{base}/v1/history{q}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let r = get("", None).await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    for bad in ["?events=501", "?events=x", "?nope=1"] {
        let r = get(bad, Some(TOKEN)).await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::BAD_REQUEST, "{bad}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("events"),
            "{bad}: {body}"
        );
    }
    let r = get("?events=2", Some(TOKEN)).await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["last_event"], 3);
    let seqs: Vec<u64> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [2, 3], "the latest two, oldest first");
    let scores = body["scores"].as_array().unwrap();
    assert!(!scores.is_empty(), "the first request samples at once");
    assert_eq!(scores[0]["hosts"], 3);
    assert_eq!(scores[0]["score"], 0.0, "an empty cluster is even");
    // The page and its assets need no token: they hold no data.
    for (path, ctype) in [
        ("/", "text/html"),
        ("/web/app.js", "text/javascript"),
        ("/web/style.css", "text/css"),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::OK, "{path}");
        let t = r.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(t.starts_with(ctype), "{path}: {t}");
    }
    served.stop().await;
}

/// The `ROUTES` table of app.js: key, method and path of every call the page makes.
fn page_routes() -> Vec<(String, String, String)> {
    let js = include_str!("../src/web/assets/app.js");
    let start = js
        .find("const ROUTES = {")
        .expect("app.js has a ROUTES table");
    let block = &js[start..start + js[start..].find("};").unwrap()];
    // Every other place of the script names a route by its key, never by a path.
    let rest = js.replacen(block, "", 1);
    assert!(
        !rest.contains("\"/v1/") && !rest.contains("`/v1/"),
        "app.js calls a path outside its ROUTES table"
    );
    block
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (key, value) = l.trim().split_once(": ")?;
            let value = value.trim_end_matches(',').trim_matches('"');
            let (method, path) = value.split_once(' ').unwrap();
            Some((key.to_owned(), method.to_owned(), path.to_owned()))
        })
        .collect()
}

#[test]
fn every_route_the_page_calls_is_in_the_openapi_document() {
    let doc: serde_json::Value = serde_json::from_str(&tern_manager::api::openapi::json()).unwrap();
    let routes = page_routes();
    assert!(routes.len() >= 13, "{routes:?}");
    for (key, method, path) in &routes {
        assert!(
            doc["paths"][path][method.to_lowercase()].is_object(),
            "app.js route {key}: {method} {path} is not in the API"
        );
    }
    // Each action the table can offer has a route of that name.
    let table = tern_manager::web::vm_action_table();
    for a in table.actions.values().flatten() {
        assert!(
            routes.iter().any(|(k, _, _)| k == a),
            "action {a} has no route in app.js"
        );
    }
}

#[tokio::test]
async fn the_allowed_actions_per_state_are_what_the_lifecycle_routes_take() {
    let dir = tempfile::tempdir().unwrap();
    let (manager, _sim, _control) = cluster(
        dir.path(),
        Capacity {
            cpus: 4.0,
            memory_mib: 8192,
        },
        ["act".to_owned()],
    )
    .await;
    let served = Served::start(&manager).await;
    let base = served.base.clone();
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{base}/v1/vm-actions"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    let table: serde_json::Value = http
        .get(format!("{base}/v1/vm-actions"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let allowed = |state: &str| -> Vec<String> {
        table["actions"][state]
            .as_array()
            .unwrap_or_else(|| panic!("no state {state}: {table}"))
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        allowed("running"),
        ["stop", "reboot", "pause", "suspend", "delete"]
    );
    assert_eq!(allowed("stopped"), ["start", "delete"]);
    assert_eq!(allowed("paused"), ["stop", "resume", "suspend", "delete"]);
    assert_eq!(allowed("suspended"), ["restore", "delete"]);
    assert!(allowed("migrating").is_empty());
    assert_eq!(
        table["actions"].as_object().unwrap().len(),
        tern_api::manager::VmState::ALL.len()
    );
    // Walk a VM through the machine by the page's routes: in each state, an action the
    // table offers is taken and one it does not is refused with the API's 409.
    let post = |action: &str| {
        http.post(format!("{base}/v1/vms/act/{action}"))
            .bearer_auth(TOKEN)
            .send()
    };
    for (state, take, then) in [
        ("running", "pause", "paused"),
        ("paused", "resume", "running"),
    ] {
        for a in [
            "start", "stop", "reboot", "pause", "resume", "suspend", "restore",
        ] {
            if allowed(state).iter().any(|x| x == a) {
                continue;
            }
            let r = post(a).await.unwrap();
            assert_eq!(
                r.status(),
                reqwest::StatusCode::CONFLICT,
                "{a} when {state}"
            );
            let body: serde_json::Value = r.json().await.unwrap();
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("is {state}")),
                "{a}: {body}"
            );
        }
        assert!(allowed(state).iter().any(|x| x == take));
        let r = post(take).await.unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::OK, "{take} when {state}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["state"], then);
    }
    served.stop().await;
}

/// The page with a script after `app.js` that presses its buttons as a person would
/// (answering `confirm` itself: no for `web-vm-4`, yes otherwise) and writes what the
/// page's status line said after each press into `#harness`.
const CLICKS: &str = r#"<pre id="harness"></pre>
<script>
"use strict";
window.confirm = (q) => { document.title += "|asked"; return !q.includes("web-vm-4"); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const said = () => document.getElementById("vm-action").textContent;
async function press(vm, action, answered = true) {
  let b = null;
  for (let i = 0; i < 100 && !b; i++) {
    b = document.querySelector(`button[data-vm="${vm}"][data-action="${action}"]`);
    if (!b) await sleep(100);
  }
  if (!b) return `no ${action} button for ${vm}`;
  const before = said();
  b.click();
  if (!answered) return said() === before ? "nothing sent" : said();
  for (let i = 0; i < 100 && (said() === before || said().endsWith("...")); i++) await sleep(50);
  return said();
}
(async () => {
  const out = [];
  out.push(await press("web-vm-5", "pause"));
  out.push(await press("web-vm-6", "delete"));
  const asked = document.title;
  out.push(await press("web-vm-4", "delete", false));
  out.push(document.title === asked + "|asked" ? "declined" : "not asked");
  // The state the page was drawn with no longer allows it: the manager's 409 shows.
  await act("web-vm-3", "resume");
  out.push(said(), document.getElementById("vm-action").className);
  document.getElementById("harness").textContent = out.join("\n");
})();
</script>
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buttons_call_the_api_ask_first_and_show_a_refusal_in_chromium() {
    let Some(browser) = chromium() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (manager, _sim, _control) = cluster(
        dir.path(),
        Capacity {
            cpus: 8.0,
            memory_mib: 32768,
        },
        (3..VMS).map(|i| format!("web-vm-{i}")),
    )
    .await;
    // The API as `serve` has it, and the page with the clicking script at another path.
    let (stop_tx, stopping) = tokio::sync::watch::channel(false);
    let page = include_str!("../src/web/assets/index.html")
        .replace("</body>", &format!("{CLICKS}</body>"));
    let app = tern_manager::api::router(manager.clone(), vec![TOKEN.into()], stopping).route(
        "/clicks",
        axum::routing::get(move || async move { axum::response::Html(page) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut stopped = stop_tx.subscribe();
    let server = tokio::spawn(tern_pki::serve::serve(
        listener,
        app,
        None,
        tern_pki::serve::Limits::default(),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));

    let url = format!("{base}/clicks?token={TOKEN}");
    let dom = tokio::task::spawn_blocking(move || dump_dom(browser, &url))
        .await
        .unwrap();
    let harness = text_of(&dom, "harness");
    for want in [
        "pause web-vm-5: paused",
        "delete web-vm-6: deleting",
        "nothing sent declined",
        r#"resume web-vm-3 refused: VM "web-vm-3" is running: resume needs it paused error"#,
    ] {
        assert!(harness.contains(want), "{want:?} not in {harness:?}");
    }
    let state = |vm: &str| manager.read(|s| s.vms.get(vm).map(|v| v.state));
    assert_eq!(state("web-vm-5"), Some(tern_api::manager::VmState::Paused));
    assert_eq!(state("web-vm-4"), Some(tern_api::manager::VmState::Running));
    assert_ne!(state("web-vm-6"), Some(tern_api::manager::VmState::Running));
    stop_tx.send(true).unwrap();
    server.await.unwrap().unwrap();
}
