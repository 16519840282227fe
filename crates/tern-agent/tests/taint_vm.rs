//! Taint tracking and the freezer in a real guest (the minimal image, bridged so its
//! processes have a non-loopback peer: this host). The guest's root shell on the serial
//! console builds each kind of dependency; a shell the guest runs over a TCP connection
//! to this host (`nc -e /bin/sh`: external, so never frozen) makes new ones during a
//! freeze. Checks the classes and reasons of `taint`, that a new dependency on a frozen
//! process thaws it within 50 ms of the kernel event, `thaw`, and that a freeze whose
//! host goes silent ends by itself at its deadline with every process running again.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tern_api::client::console::{connect, ConsoleStream};
use tern_api::guest::{
    DependencyKind, FreezeReport, ProcessTaint, TaintClass, TaintReport, ThawCause, ThawReport,
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

mod qemu_agent;
use qemu_agent::QemuAgent as Agent;

/// Apart from the other tests' subnets.
const HOST: &str = "198.19.252.1";
const GUEST: &str = "198.19.252.10";

/// Types `line` on the console and waits for its marker: the shell prints
/// `mark-N` computed, so the terminal's echo of the line does not count.
async fn console(ws: &mut ConsoleStream, n: &mut u32, line: &str) {
    *n += 1;
    let want = format!("mark-{}", *n + 1000);
    let typed = format!("{line}\necho mark-$(({} + 1000))\n", *n);
    let t0 = Instant::now();
    let mut seen = Vec::new();
    ws.send(Message::Binary(typed.into_bytes())).await.unwrap();
    while !String::from_utf8_lossy(&seen).contains(&want) {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no {want} after {line:?}; read:\n{}",
            String::from_utf8_lossy(&seen)
        );
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.extend_from_slice(&b),
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(other) => panic!("the console ended: {other:?}"),
        }
    }
}

/// The guest's external shell: a TCP connection from `nc -e /bin/sh` in the guest.
struct Remote {
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: tokio::net::tcp::OwnedWriteHalf,
    n: u32,
}

impl Remote {
    /// Runs `cmd` in the guest's shell; returns what it printed.
    async fn run(&mut self, cmd: &str) -> String {
        self.n += 1;
        let end = format!("end-{}", self.n);
        self.w
            .write_all(format!("{cmd}\necho {end}\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(30), self.r.read_line(&mut line))
                .await
                .unwrap_or_else(|_| panic!("no answer to {cmd:?}; so far {out:?}"))
                .unwrap();
            assert!(n > 0, "the guest's shell went away after {cmd:?}");
            if line.trim() == end {
                return out;
            }
            out.push_str(&line);
        }
    }

    async fn counter(&mut self) -> u64 {
        let t = self.run("cat /tmp/counter").await;
        t.trim().parse().unwrap_or_else(|_| panic!("counter {t:?}"))
    }
}

async fn guest(a: &Agent, req: Value) -> Value {
    let r = a.c.guest("tnt", &req).await.unwrap();
    assert_eq!(r["ok"], true, "{req} → {r}");
    r["result"].clone()
}

async fn taint(a: &Agent) -> TaintReport {
    serde_json::from_value(guest(a, json!({"cmd": "taint"})).await).unwrap()
}

/// `ps` in the guest: pid → command line.
async fn ps(sh: &mut Remote) -> BTreeMap<u32, String> {
    sh.run("ps -o pid,args")
        .await
        .lines()
        .skip(1)
        .filter_map(|l| {
            let (pid, args) = l.trim().split_once(' ')?;
            Some((pid.parse().ok()?, args.trim().to_string()))
        })
        .collect()
}

fn pid_of(ps: &BTreeMap<u32, String>, args: &str) -> u32 {
    let found: Vec<u32> = ps
        .iter()
        .filter(|(_, a)| a.as_str() == args)
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(found.len(), 1, "one {args:?} in {ps:?}");
    found[0]
}

fn proc_(r: &TaintReport, pid: u32) -> &ProcessTaint {
    r.processes
        .iter()
        .find(|p| p.pid == pid)
        .unwrap_or_else(|| panic!("pid {pid} not in the report"))
}

/// `pid` is of `class`, with a reason of `kind` (through `via`, when given).
fn check(r: &TaintReport, pid: u32, class: TaintClass, kind: DependencyKind, via: Option<u32>) {
    let p = proc_(r, pid);
    assert_eq!(p.class, class, "{p:?}");
    assert!(
        p.reasons
            .iter()
            .any(|x| x.kind == kind && (via.is_none() || x.via_pid == via)),
        "{p:?} has no {kind:?} reason via {via:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dependencies_taint_and_the_freezer_holds_the_rest() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let Some((_bridge, a)) = Agent::on_new_bridge("ttnt", HOST).await else {
        return;
    };
    let cfg = json!({"hostname": "tnt", "address": format!("{GUEST}/24"), "gateway": HOST});
    a.c.create_vm(&a.vm(
        "tnt",
        json!({"nics": [{}], "guest_config": cfg, "memory_mib": 384}),
    ))
    .await
    .unwrap();
    let t0 = Instant::now();
    while a.c.guest("tnt", &json!({"cmd": "ping"})).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(120), "guest never up");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // This host's ends: the shell's connection, and a sink holding data connections.
    let ctl = TcpListener::bind((HOST, 0)).await.unwrap();
    let data = TcpListener::bind((HOST, 0)).await.unwrap();
    let (ctl_port, data_port) = (
        ctl.local_addr().unwrap().port(),
        data.local_addr().unwrap().port(),
    );
    let sink = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = data.accept().await {
            held.push(s);
        }
    });

    let base = a.c.base().to_string();
    let mut ws = connect(
        &base,
        "/v1/vms/tnt/console",
        "t",
        None,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let mut n = 0;
    // The shell may come up after the agent: the first line is retried by its marker.
    let t1 = Instant::now();
    loop {
        let r = tokio::time::timeout(Duration::from_secs(10), console(&mut ws, &mut n, "cd /tmp"))
            .await;
        if r.is_ok() {
            break;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "no shell on the console"
        );
    }
    let nc = |port: u16| format!("nc {HOST} {port}");
    for line in [
        "mkfifo /tmp/fifo && mkdir -p /tmp/www".to_string(),
        format!("{} -e /bin/sh &", nc(ctl_port)),
        format!("sleep 1001 | {} >> /tmp/shared.log &", nc(data_port)),
        "sleep 1002 >> /tmp/shared.log &".into(),
        "tern-guest ipc unix-serve /tmp/u1 &".into(),
        format!(
            "sleep 1003 | {} | tern-guest ipc unix-connect /tmp/u1 &",
            nc(data_port)
        ),
        format!(
            "sleep 1004 | {} | tern-guest ipc shm /dev/shm/seg &",
            nc(data_port)
        ),
        "tern-guest ipc shm /dev/shm/seg &".into(),
        "httpd -f -p 8080 -h /tmp/www &".into(),
        "sleep 1007 &".into(),
        "sleep 1008 <> /tmp/fifo &".into(),
        "tern-guest ipc unix-serve /tmp/u2 &".into(),
        "sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.2; done' &".into(),
    ] {
        console(&mut ws, &mut n, &line).await;
    }
    let (s, _) = tokio::time::timeout(Duration::from_secs(30), ctl.accept())
        .await
        .expect("the guest's shell connects")
        .unwrap();
    let (r, w) = s.into_split();
    let mut sh = Remote {
        r: BufReader::new(r),
        w,
        n: 0,
    };
    let shell: u32 = sh.run("echo $$").await.trim().parse().unwrap();
    sh.run("sleep 1006 </dev/null >/dev/null 2>&1 &").await;
    // Let every pipeline connect and map before looking.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ps = ps(&mut sh).await;
    eprintln!("{ps:#?}");
    let nc_data = |s: &str| {
        let pids: Vec<u32> = ps
            .iter()
            .filter(|(_, a)| a.as_str() == nc(data_port))
            .map(|(p, _)| *p)
            .collect();
        // The pipeline's nc is the one just after its sleep.
        let sleep = pid_of(&ps, s);
        *pids.iter().find(|p| **p > sleep).unwrap()
    };
    let (nc1, nc3, nc4) = (
        nc_data("sleep 1001"),
        nc_data("sleep 1003"),
        nc_data("sleep 1004"),
    );
    let pid = |args: &str| pid_of(&ps, args);
    let u1 = pid("tern-guest ipc unix-serve /tmp/u1");
    let u1c = pid("tern-guest ipc unix-connect /tmp/u1");
    let shms: Vec<u32> = ps
        .iter()
        .filter(|(_, a)| a.as_str() == "tern-guest ipc shm /dev/shm/seg")
        .map(|(p, _)| *p)
        .collect();
    let (shm1, shm2) = (shms[0], shms[1]);
    let httpd = pid("httpd -f -p 8080 -h /tmp/www");
    let (s1007, s1008) = (pid("sleep 1007"), pid("sleep 1008"));
    let u2 = pid("tern-guest ipc unix-serve /tmp/u2");
    let counter_pid = *ps
        .iter()
        .find(|(_, a)| a.contains("/tmp/counter"))
        .unwrap()
        .0;

    // Every kind of dependency, from a scan.
    use DependencyKind as K;
    use TaintClass as C;
    let r = taint(&a).await;
    assert!(!r.event_driven && !r.frozen);
    check(&r, shell, C::External, K::NetworkPeer, None);
    let peer = proc_(&r, shell).reasons[0].peer.clone().unwrap();
    assert_eq!(peer, format!("{HOST}:{ctl_port}"));
    check(&r, nc1, C::External, K::NetworkPeer, None);
    check(&r, pid("sleep 1001"), C::Dependent, K::Pipe, Some(nc1));
    check(&r, pid("sleep 1002"), C::Dependent, K::File, Some(nc1));
    check(&r, u1c, C::Dependent, K::Pipe, Some(nc3));
    check(&r, u1, C::Dependent, K::UnixSocket, Some(u1c));
    check(&r, shm1, C::Dependent, K::Pipe, Some(nc4));
    check(&r, shm2, C::Dependent, K::SharedMemory, Some(shm1));
    check(&r, pid("sleep 1006"), C::Dependent, K::Parent, Some(shell));
    for p in [httpd, s1007, s1008, u2, counter_pid] {
        assert_eq!(proc_(&r, p).class, C::Untainted, "{:?}", proc_(&r, p));
    }
    assert_eq!(proc_(&r, 1).class, C::Exempt);
    assert!(r
        .processes
        .iter()
        .any(|p| p.comm == "tern-guest" && p.class == C::Exempt));

    // Freeze: the untainted stop, the tainted run.
    let f: FreezeReport =
        serde_json::from_value(guest(&a, json!({"cmd": "freeze", "deadline_ms": 30000})).await)
            .unwrap();
    eprintln!("frozen {:?}", f.frozen);
    assert!(!f.renewed);
    for p in [httpd, s1007, s1008, u2, counter_pid] {
        assert!(f.frozen.contains(&p), "{p} frozen");
    }
    for p in [shell, nc1, u1, shm2] {
        assert!(!f.frozen.contains(&p), "{p} runs");
    }
    let c0 = sh.counter().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sh.counter().await,
        c0,
        "the counter stands still while frozen"
    );
    let f: FreezeReport =
        serde_json::from_value(guest(&a, json!({"cmd": "freeze", "deadline_ms": 30000})).await)
            .unwrap();
    assert!(f.renewed);

    // New dependencies on frozen processes, made by tainted ones: a FIFO opened, a unix
    // connection into a frozen server's queue, a TCP connection from outside into a
    // frozen listener's queue.
    sh.run("exec 7>/tmp/fifo").await;
    sh.run("tern-guest ipc unix-connect /tmp/u2 </dev/null >/dev/null 2>&1 &")
        .await;
    let _outsider = TcpStream::connect((GUEST, 8080)).await.unwrap();
    let want = [(s1008, K::Pipe), (u2, K::UnixSocket), (httpd, K::Listener)];
    let t2 = Instant::now();
    let r = loop {
        let r = taint(&a).await;
        assert!(r.event_driven && r.frozen);
        if want.iter().all(|(p, _)| !proc_(&r, *p).frozen) {
            break r;
        }
        assert!(
            t2.elapsed() < Duration::from_secs(10),
            "not thawed: {:?}",
            want.map(|(p, _)| proc_(&r, p))
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut latencies = Vec::new();
    for (p, kind) in want {
        let pt = proc_(&r, p);
        assert!(matches!(pt.class, C::External | C::Dependent), "{pt:?}");
        let reason = pt.reasons.iter().find(|x| x.kind == kind);
        let reason = reason.unwrap_or_else(|| panic!("{pt:?} has no {kind:?} reason"));
        let ms = reason.latency_ms.expect("an event found it");
        eprintln!(
            "pid {p} ({}) tainted by {kind:?} {ms:.2} ms after the event",
            pt.comm
        );
        latencies.push(ms);
    }
    eprintln!(
        "event → classification: {latencies:?} ms; {} events, {} lost",
        r.events, r.lost_events
    );
    assert!(latencies.iter().all(|ms| *ms <= 50.0), "{latencies:?}");
    assert!(proc_(&r, s1007).frozen, "nothing happened to it");

    let t: ThawReport = serde_json::from_value(guest(&a, json!({"cmd": "thaw"})).await).unwrap();
    assert_eq!(t.cause, ThawCause::Host);
    let held = |pid| t.processes.iter().find(|p| p.pid == pid).unwrap();
    assert!(held(s1008).thawed_early && held(u2).thawed_early && held(httpd).thawed_early);
    assert!(!held(s1007).thawed_early);
    let c1 = sh.counter().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        sh.counter().await > c1,
        "the counter moves again after thaw"
    );

    // A host that goes silent: the guest thaws by itself at the deadline.
    let f: FreezeReport =
        serde_json::from_value(guest(&a, json!({"cmd": "freeze", "deadline_ms": 2000})).await)
            .unwrap();
    assert!(f.frozen.contains(&s1007) && f.frozen.contains(&counter_pid));
    let c2 = sh.counter().await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let r = taint(&a).await;
    assert!(!r.frozen && !r.event_driven);
    let last = r.last_thaw.expect("the freeze ended");
    assert_eq!(last.cause, ThawCause::Deadline);
    assert!(last.freeze_ms >= 2000.0, "{last:?}");
    assert!(r.processes.iter().all(|p| !p.frozen));
    let c3 = sh.counter().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        sh.counter().await > c3 && c3 >= c2,
        "the counter runs again after the deadline"
    );

    let bad =
        a.c.guest("tnt", &json!({"cmd": "freeze", "deadline_ms": 0}))
            .await
            .unwrap();
    assert_eq!(bad["ok"], false);
    assert!(
        bad["error"].as_str().unwrap().contains("deadline_ms"),
        "{bad}"
    );

    sink.abort();
    a.c.delete_vm("tnt").await.unwrap();
    a.shut().await;
}
