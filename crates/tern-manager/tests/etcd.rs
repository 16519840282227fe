//! Several managers over a real 3-member etcd cluster on loopback ports: exactly one
//! leads, followers pass requests on, a killed leader is replaced within seconds, and
//! every write that was answered 2xx is still there afterwards. Also: a store that does
//! not hold the leader key writes nothing.
//!
//! Needs Debian's `etcd-server` (`etcd`); without it the tests skip with a reason unless
//! `CI` is set, where they fail.

use std::collections::BTreeSet;
use std::net::TcpListener as StdListener;
use std::process::{Child, Command as Process, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_manager::decide::HostAddresses;

use reqwest::StatusCode;
use serde_json::{json, Value};
use tern_manager::control::Control;
use tern_manager::ha::election::Election;
use tern_manager::ha::{forward, Leadership};
use tern_manager::manager::system_clock;
use tern_manager::state::{Change, EventKind};
use tern_manager::store::etcd::gateway::Gateway;
use tern_manager::store::etcd::{Keys, REQUEST_TIMEOUT};
use tern_manager::store::{EtcdStore, Store};
use tern_manager::{Error, Manager};
use tern_simhost::SimCluster;

const TOKEN: &str = "ha-test";
const PREFIX: &str = "/tern/";
/// etcd's smallest lease TTL with its default election timeout.
const TTL_S: i64 = 2;

/// Whether the tests can run; `None` means skip (only allowed outside CI).
fn etcd_binary() -> Option<&'static str> {
    let found = Process::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return Some("etcd");
    }
    if std::env::var_os("CI").is_some() {
        panic!("etcd is not installed; scripts/setup installs Debian's etcd-server");
    }
    eprintln!("skipped: etcd is not installed (apt-get install etcd-server, or run scripts/setup)");
    None
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Three etcd members on loopback; killed and their data removed when dropped, also
/// when a test fails.
struct EtcdCluster {
    members: Vec<Child>,
    endpoints: Vec<String>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    async fn start(bin: &str) -> EtcdCluster {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            endpoints: ports
                .iter()
                .map(|(c, _)| format!("http://127.0.0.1:{c}"))
                .collect(),
            _dir: tempfile::tempdir().unwrap(),
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).unwrap();
            let child = Process::new(bin)
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(dir.path().join(format!("m{i}")))
                .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                .arg(format!(
                    "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                ))
                .arg(format!("--initial-cluster={}", initial.join(",")))
                .arg("--initial-cluster-state=new")
                .arg(format!(
                    "--initial-cluster-token=tern-{}",
                    std::process::id()
                ))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("starting etcd");
            cluster.members.push(child);
        }
        cluster._dir = dir;
        // Generous: three members electing a leader on two busy cores can take a while,
        // and this wait is set-up, not the behaviour under test.
        cluster.wait_healthy(Duration::from_secs(60)).await;
        cluster
    }

    async fn wait_healthy(&self, limit: Duration) {
        let http = client();
        let started = Instant::now();
        {
            for e in &self.endpoints {
                loop {
                    let ok = http
                        .get(format!("{e}/health"))
                        .send()
                        .await
                        .ok()
                        .filter(|r| r.status().is_success());
                    if let Some(r) = ok {
                        if r.text().await.unwrap_or_default().contains("true") {
                            break;
                        }
                    }
                    assert!(
                        started.elapsed() < limit,
                        "etcd member {e} not healthy after {limit:?}; see its log in {}",
                        self._dir.path().display()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            let _ = m.kill();
            let _ = m.wait();
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

/// One manager on a runtime of its own, so killing it is dropping the runtime: its tasks
/// stop mid-flight, nothing is revoked or flushed, as when the process dies.
struct Replica {
    url: String,
    leadership: Arc<Leadership>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Replica {
    fn start(endpoints: &[String], sim: Arc<SimCluster>) -> Replica {
        let std_listener = StdListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", std_listener.local_addr().unwrap());
        let leadership = Arc::new(Leadership::new(url.clone()));
        let store = EtcdStore::open(endpoints, PREFIX, leadership.clone()).unwrap();
        let manager = Arc::new(
            Manager::open(Box::new(store), system_clock())
                .unwrap()
                .serving(HostAddresses::Sim),
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let election = Election {
            gateway: Arc::new(Gateway::new(endpoints, REQUEST_TIMEOUT).unwrap()),
            key: Keys::new(PREFIX).leader(),
            ttl_s: TTL_S,
            poll: Duration::from_millis(250),
        };
        let l = leadership.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            let control = Control::new(manager.clone(), sim);
            forward::run(
                listener,
                manager,
                control,
                vec![TOKEN.into()],
                l,
                election,
                std::future::pending(),
            )
            .await
        });
        Replica {
            url,
            leadership,
            rt: Some(rt),
        }
    }

    fn leads(&self) -> bool {
        self.rt.is_some() && self.leadership.term().is_some()
    }

    fn kill(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Replica {
    /// Stops it and waits for the calls already running (they run on blocking threads,
    /// which dropping a runtime does not end).
    fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            tokio::task::block_in_place(|| rt.shutdown_timeout(Duration::from_secs(5)));
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until exactly one live replica leads and every live follower names it.
async fn one_leader(replicas: &[Replica], limit: Duration) -> usize {
    let started = Instant::now();
    loop {
        let leaders: Vec<usize> = (0..replicas.len())
            .filter(|&i| replicas[i].leads())
            .collect();
        if let [l] = leaders[..] {
            let agreed = replicas
                .iter()
                .filter(|r| r.rt.is_some() && !r.leads())
                .all(|r| r.leadership.leader().as_deref() == Some(&replicas[l].url));
            if agreed {
                return l;
            }
        }
        assert!(leaders.len() <= 1, "two managers lead at once: {leaders:?}");
        assert!(
            started.elapsed() < limit,
            "no single leader after {limit:?} (leaders: {leaders:?})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `body` to `base`; the status and JSON answer, or `None` if nothing answered.
async fn post(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: Value,
) -> Option<(StatusCode, Value)> {
    let r = http
        .post(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .ok()?;
    let status = r.status();
    Some((status, r.json().await.unwrap_or(Value::Null)))
}

async fn get(http: &reqwest::Client, base: &str, path: &str) -> (StatusCode, Value) {
    let r = http
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap_or(Value::Null))
}

/// Creates VMs named `prefix-N` round-robin through `targets` for `span`; returns the
/// names that were answered 2xx. Every other answer must be a 503 saying why.
async fn create_vms(
    http: &reqwest::Client,
    targets: &[String],
    prefix: &str,
    span: Duration,
) -> BTreeSet<String> {
    let mut accepted = BTreeSet::new();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < span {
        let name = format!("{prefix}-{i}");
        let base = &targets[i % targets.len()];
        let body = json!({ "name": name, "spec": { "vcpus": 1, "memory_mib": 64 } });
        match post(http, base, "/v1/vms", body).await {
            Some((s, _)) if s.is_success() => {
                accepted.insert(name);
            }
            Some((s, v)) => {
                let msg = v["error"].as_str().unwrap_or_default();
                assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{name} via {base}: {v}");
                // Refused or failed before commit: never counted, so never "lost". An etcd
                // request may time out on a loaded machine; a client retries those.
                assert!(
                    msg.starts_with("not the leader") || msg.starts_with("etcd:"),
                    "{name} via {base}: {msg}"
                );
            }
            // The killed manager: nothing listens any more.
            None => {}
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    accepted
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_forwards_survives_its_loss_and_keeps_every_accepted_write() {
    let Some(bin) = etcd_binary() else { return };
    let etcd = EtcdCluster::start(bin).await;
    let sim = SimCluster::new();
    for h in ["h1", "h2", "h3"] {
        sim.add_host(h);
    }
    let mut replicas: Vec<Replica> = (0..3)
        .map(|_| Replica::start(&etcd.endpoints, sim.clone()))
        .collect();
    let http = client();
    let leader = one_leader(&replicas, Duration::from_secs(15)).await;
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();

    // Hosts registered through a follower land at the leader.
    for h in ["h1", "h2", "h3"] {
        let body = json!({ "name": h, "address": "sim:", "capacity": { "cpus": 8.0, "memory_mib": 65536 } });
        let (s, v) = post(&http, &replicas[followers[0]].url, "/v1/hosts", body)
            .await
            .expect("the follower answers");
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    let (s, hosts) = get(&http, &replicas[followers[1]].url, "/v1/hosts").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(hosts.as_array().unwrap().len(), 3, "{hosts}");
    // The OpenAPI document is served locally by any manager.
    let (s, _) = get(&http, &replicas[followers[1]].url, "/openapi.json").await;
    assert_eq!(s, StatusCode::OK);

    let everyone: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let mut accepted = create_vms(&http, &everyone, "before", Duration::from_secs(2)).await;
    assert!(
        accepted.len() > 20,
        "only {} VMs created in 2 s",
        accepted.len()
    );

    // Kill the leader while clients keep writing through every manager.
    let writer = {
        let http = http.clone();
        let everyone = everyone.clone();
        tokio::spawn(
            async move { create_vms(&http, &everyone, "during", Duration::from_secs(6)).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    replicas[leader].kill();
    let new_leader = one_leader(&replicas, Duration::from_secs(10)).await;
    let takeover = killed.elapsed();
    assert_ne!(new_leader, leader);
    eprintln!(
        "takeover after the leader was killed: {:.2} s",
        takeover.as_secs_f64()
    );
    assert!(
        takeover < Duration::from_secs(5),
        "takeover took {takeover:?}"
    );
    let during = writer.await.unwrap();
    assert!(!during.is_empty(), "no write accepted around the takeover");
    accepted.extend(during);

    // Every accepted write is there, through either survivor and in etcd itself.
    for &i in &followers {
        let (s, vms) = get(&http, &replicas[i].url, "/v1/vms").await;
        assert_eq!(s, StatusCode::OK, "{vms}");
        let have: BTreeSet<String> = vms
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect();
        let lost: Vec<&String> = accepted.difference(&have).collect();
        assert!(lost.is_empty(), "accepted but lost: {lost:?}");
    }
    // Only the new leader's control loop acts now; it starts every VM, those the old
    // leader accepted included, on the (shared) simulated hosts.
    let survivor = &replicas[followers[0]].url;
    let started = Instant::now();
    loop {
        let (_, vms) = get(&http, survivor, "/v1/vms").await;
        let pending = vms
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["state"] != "running")
            .count();
        if pending == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{pending} VMs still not running after 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Each VM runs on exactly one host: no leader started a second copy.
    let mut copies = Vec::new();
    for h in ["h1", "h2", "h3"] {
        copies.extend(sim.host(h).unwrap().vm_names().await);
    }
    let distinct: BTreeSet<&String> = copies.iter().collect();
    assert_eq!(distinct.len(), copies.len(), "a VM runs twice");
    assert!(accepted.iter().all(|v| distinct.contains(v)));
    // Stopped first, so nothing commits between the two reads below.
    for r in &mut replicas {
        r.stop();
    }
    let check = EtcdStore::open(&etcd.endpoints, PREFIX, Arc::new(Leadership::new("x"))).unwrap();
    let snap = check.load().unwrap();
    assert!(accepted.iter().all(|v| snap.vms.contains_key(v)));
    // Events are numbered 1..=n across both leaders, no number given twice.
    let events = check.events_since(0, 100_000).unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert_eq!(snap.last_event, seqs.len() as u64);
    let created = events
        .iter()
        .filter(|e| matches!(&e.kind, EventKind::VmCreated { .. }))
        .count();
    assert_eq!(created, snap.vms.len());
    eprintln!(
        "{} writes accepted, all present; {} events numbered without gaps",
        accepted.len(),
        seqs.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_does_not_hold_the_leader_key_writes_nothing() {
    let Some(bin) = etcd_binary() else { return };
    let etcd = EtcdCluster::start(bin).await;
    let gateway = Arc::new(Gateway::new(&etcd.endpoints, REQUEST_TIMEOUT).unwrap());
    let election = Election {
        gateway: gateway.clone(),
        key: Keys::new(PREFIX).leader(),
        ttl_s: TTL_S,
        poll: Duration::from_millis(100),
    };
    let a = Arc::new(Leadership::new("http://a"));
    let (stop_a, stopped) = tokio::sync::oneshot::channel::<()>();
    let campaign = {
        let a = a.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = stopped.await;
            };
            election.run(a, || async { Ok(()) }, stop).await
        })
    };
    wait_for(|| a.term().is_some(), Duration::from_secs(30)).await;
    let mut store_a = EtcdStore::open(&etcd.endpoints, PREFIX, a.clone()).unwrap();
    let register = |n: &str| Change::Event(EventKind::HostRegistered { host: n.into() });
    let events = tokio::task::block_in_place(|| store_a.commit(1, &[register("h1")])).unwrap();
    assert_eq!(events[0].seq, 1);

    // A follower's store refuses before asking etcd.
    let b = Arc::new(Leadership::new("http://b"));
    let mut store_b = EtcdStore::open(&etcd.endpoints, PREFIX, b.clone()).unwrap();
    let err = tokio::task::block_in_place(|| store_b.commit(2, &[register("h2")])).unwrap_err();
    assert!(matches!(err, Error::NotLeader(_)), "{err}");
    // One that believes it leads in a term that is not the key's is fenced by etcd, and
    // steps down.
    b.lead(
        a.term().unwrap() + 1000,
        Instant::now() + Duration::from_secs(30),
    );
    let err = tokio::task::block_in_place(|| store_b.commit(2, &[register("h2")])).unwrap_err();
    assert!(matches!(err, Error::NotLeader(_)), "{err}");
    assert_eq!(b.term(), None);
    // So does the real leader's store once its view is stale (someone else wrote).
    let events = tokio::task::block_in_place(|| store_a.commit(3, &[register("h3")])).unwrap();
    assert_eq!(events[0].seq, 2);
    let mut stale = EtcdStore::open(&etcd.endpoints, PREFIX, a.clone()).unwrap();
    tokio::task::block_in_place(|| stale.commit(4, &[register("h4")])).unwrap_err();
    let all = tokio::task::block_in_place(|| store_a.events_since(0, 100)).unwrap();
    let hosts: Vec<String> = all
        .iter()
        .map(|e| match &e.kind {
            EventKind::HostRegistered { host } => host.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(hosts, ["h1", "h3"]);
    let _ = stop_a.send(());
    campaign.await.unwrap();
}

async fn wait_for(cond: impl Fn() -> bool, limit: Duration) {
    let started = Instant::now();
    while !cond() {
        assert!(
            started.elapsed() < limit,
            "condition not met after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
