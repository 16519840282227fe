//! High availability with real processes: one `tern manager` and three `tern agent`
//! daemons (the `sim` driver, so no QEMU is needed) talking HTTP on loopback. One agent
//! is killed with SIGKILL mid-run: the manager declares its host dead and restarts each of
//! its VMs on another host exactly once. Started again on the same state directory, the
//! agent comes back empty and active, and no VM is lost or running twice.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const TOKEN: &str = "ha-processes-token";

/// Children killed when the test ends, however it ends.
struct Procs(BTreeMap<String, Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.values_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tern(args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .env_remove("TERN_TOKEN")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn start_agent(dir: &Path, name: &str, port: u16) -> Child {
    let state = dir.join(name);
    let listen = format!("127.0.0.1:{port}");
    let token_file = dir.join("token");
    tern(
        &[
            "agent",
            "--hypervisor",
            "sim",
            "--listen",
            &listen,
            "--state-dir",
            state.to_str().unwrap(),
            "--token-file",
            token_file.to_str().unwrap(),
            "--name",
            name,
            "--cpus",
            "8",
            "--memory-mib",
            "16384",
        ],
        &dir.join(format!("{name}.log")),
    )
}

struct Http {
    client: reqwest::Client,
}

impl Http {
    async fn call(&self, method: reqwest::Method, url: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self.client.request(method, url).bearer_auth(TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        match req.send().await {
            Ok(r) => {
                let status = r.status().as_u16();
                let v = r.json::<Value>().await.unwrap_or(Value::Null);
                (status, v)
            }
            Err(_) => (0, Value::Null),
        }
    }

    async fn get(&self, url: &str) -> Value {
        let (status, v) = self.call(reqwest::Method::GET, url, None).await;
        assert_eq!(status, 200, "GET {url}: {v}");
        v
    }

    /// The VM ids an agent runs, or None when it does not answer.
    async fn agent_vms(&self, port: u16) -> Option<Vec<String>> {
        let (status, v) = self
            .call(
                reqwest::Method::GET,
                &format!("http://127.0.0.1:{port}/v1/vms"),
                None,
            )
            .await;
        if status != 200 {
            return None;
        }
        let list = v.as_array().or_else(|| v["vms"].as_array())?;
        Some(
            list.iter()
                .map(|vm| vm["id"].as_str().unwrap().to_owned())
                .collect(),
        )
    }
}

/// The events of one type, wherever the event record nests its kind.
fn events_of(events: &Value, kind: &str) -> Vec<Value> {
    let list = events
        .as_array()
        .or_else(|| events["events"].as_array())
        .cloned()
        .unwrap_or_default();
    list.into_iter()
        .filter_map(|e| {
            if e["type"] == kind {
                return Some(e);
            }
            e.as_object()?.values().find(|v| v["type"] == kind).cloned()
        })
        .collect()
}

async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(t0.elapsed() < limit, "timed out after {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_s_vms_restart_once_elsewhere_and_it_returns_empty() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::set_permissions(
        &token_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let http = Http {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap(),
    };
    let ports: BTreeMap<String, u16> = ["h1", "h2", "h3"]
        .iter()
        .map(|h| (h.to_string(), free_port()))
        .collect();
    let mut procs = Procs(BTreeMap::new());
    for (h, &p) in &ports {
        procs.0.insert(h.clone(), start_agent(dir.path(), h, p));
    }
    let mport = free_port();
    let manager = format!("http://127.0.0.1:{mport}");
    let db = dir.path().join("tern.db");
    procs.0.insert(
        "manager".into(),
        tern(
            &[
                "manager",
                "--listen",
                &format!("127.0.0.1:{mport}"),
                "--db",
                db.to_str().unwrap(),
                "--token-file",
                token_file.to_str().unwrap(),
                "--agent-timeout-s",
                "2",
            ],
            &dir.path().join("manager.log"),
        ),
    );
    let logs = || {
        ["manager", "h1", "h2", "h3"]
            .iter()
            .map(|n| {
                let l = std::fs::read_to_string(dir.path().join(format!("{n}.log")))
                    .unwrap_or_default();
                format!("--- {n}\n{l}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    wait_for(
        "the manager and agents answer",
        Duration::from_secs(30),
        || async {
            let (s, _) = http
                .call(reqwest::Method::GET, &format!("{manager}/v1/hosts"), None)
                .await;
            let mut up = s == 200;
            for &p in ports.values() {
                up &= http.agent_vms(p).await.is_some();
            }
            up.then_some(())
        },
    )
    .await;

    // Quick rounds and a short silence limit; no balancing, so VMs move only by HA.
    let mut settings = http.get(&format!("{manager}/v1/balancer")).await;
    settings["enabled"] = json!(false);
    settings["interval_s"] = json!(1);
    settings["dead_after_s"] = json!(3);
    let (s, v) = http
        .call(
            reqwest::Method::PUT,
            &format!("{manager}/v1/balancer"),
            Some(settings),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    for (h, p) in &ports {
        let (s, v) = http
            .call(
                reqwest::Method::POST,
                &format!("{manager}/v1/hosts"),
                Some(
                    json!({"name": h, "address": format!("http://127.0.0.1:{p}"),
                            "capacity": {"cpus": 8.0, "memory_mib": 16384}}),
                ),
            )
            .await;
        assert!(s == 200 || s == 201, "registering {h}: {s} {v}");
    }
    let mut vms = Vec::new();
    for (i, h) in ["h1", "h1", "h2", "h2", "h3", "h3"].iter().enumerate() {
        let name = format!("vm-{i}");
        let (s, v) = http
            .call(
                reqwest::Method::POST,
                &format!("{manager}/v1/vms"),
                Some(json!({"name": name, "host": h,
                            "spec": {"vcpus": 1, "memory_mib": 512}})),
            )
            .await;
        assert!(s == 200 || s == 201, "creating {name}: {s} {v}");
        vms.push(name);
    }
    let on_h2: Vec<String> = vec!["vm-2".into(), "vm-3".into()];
    wait_for(
        "every VM runs on the host it was created on",
        Duration::from_secs(30),
        || async {
            let mut all = Vec::new();
            for &p in ports.values() {
                all.extend(http.agent_vms(p).await?);
            }
            all.sort();
            (all == vms).then_some(())
        },
    )
    .await;
    assert_eq!(http.agent_vms(ports["h2"]).await.unwrap(), on_h2);

    // SIGKILL: no chance to clean up or say goodbye.
    let mut h2 = procs.0.remove("h2").unwrap();
    h2.kill().unwrap();
    h2.wait().unwrap();

    let survivors = [ports["h1"], ports["h3"]];
    wait_for(
        "h2 declared dead and its VMs running on h1 or h3",
        Duration::from_secs(60),
        || async {
            let host = http.get(&format!("{manager}/v1/hosts/h2")).await;
            if host["state"] != "dead" {
                return None;
            }
            let mut all = Vec::new();
            for p in survivors {
                all.extend(http.agent_vms(p).await?);
            }
            all.sort();
            for vm in &on_h2 {
                let v = http.get(&format!("{manager}/v1/vms/{vm}")).await;
                if v["state"] != "running" {
                    return None;
                }
            }
            (all == vms).then_some(())
        },
    )
    .await;
    let restarted = |events: &Value| {
        let mut r: Vec<String> = events_of(events, "vm_restarted")
            .iter()
            .map(|e| e["vm"].as_str().unwrap().to_owned())
            .collect();
        r.sort();
        r
    };
    let events = http.get(&format!("{manager}/v1/events?since=0")).await;
    assert_eq!(restarted(&events), on_h2, "{events}\n{}", logs());
    for vm in &on_h2 {
        let v = http.get(&format!("{manager}/v1/vms/{vm}")).await;
        let host = &v["observed_host"];
        assert!(host == "h1" || host == "h3", "{v}");
        assert_eq!(host, &v["desired_host"], "{v}");
    }

    // The agent comes back on its old state directory.
    procs
        .0
        .insert("h2".into(), start_agent(dir.path(), "h2", ports["h2"]));
    wait_for("h2 active again", Duration::from_secs(60), || async {
        let host = http.get(&format!("{manager}/v1/hosts/h2")).await;
        (host["state"] == "active").then_some(())
    })
    .await;
    // A few more rounds: nothing restarts twice, nothing runs twice, nothing is lost.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut all = Vec::new();
    for &p in ports.values() {
        all.extend(http.agent_vms(p).await.expect("an agent stopped answering"));
    }
    all.sort();
    assert_eq!(all, vms, "{}", logs());
    let events = http.get(&format!("{manager}/v1/events?since=0")).await;
    assert_eq!(restarted(&events), on_h2, "{events}");
    for vm in &vms {
        let v = http.get(&format!("{manager}/v1/vms/{vm}")).await;
        assert_eq!(v["state"], "running", "{v}");
        let host = v["observed_host"].as_str().unwrap().to_owned();
        let there = http.agent_vms(ports[&host]).await.unwrap();
        assert!(
            there.contains(vm),
            "{vm} is recorded on {host} but not there"
        );
    }
}
