//! `batch` and `service` run as child processes of the agent: driven over `--stdio`,
//! their counters reach `status`, the service echoes from its own process, and stopping
//! one ends its process.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Agent {
    child: std::process::Child,
    input: std::process::ChildStdin,
    output: BufReader<std::process::ChildStdout>,
    id: u64,
}

impl Agent {
    fn start() -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tern-guest"))
            .args(["--stdio", "--verifier-mib", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let output = BufReader::new(child.stdout.take().unwrap());
        Agent {
            child,
            input,
            output,
            id: 0,
        }
    }

    fn ask(&mut self, mut req: Value) -> Value {
        self.id += 1;
        req["id"] = self.id.into();
        writeln!(self.input, "{req}").unwrap();
        let mut line = String::new();
        self.output.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }

    fn workload(&mut self, name: &str) -> Value {
        let st = self.ask(serde_json::json!({"cmd": "status"}));
        st["result"]["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} in {st}"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn batch_and_service_run_in_processes_of_their_own() {
    let mut agent = Agent::start();
    let started =
        agent.ask(serde_json::json!({"cmd": "start", "workload": "batch --mib 2 --mbps 8"}));
    assert_eq!(started["ok"], true, "{started}");
    let t0 = Instant::now();
    let batch = loop {
        let b = agent.workload("batch");
        if b["checked"].as_u64().unwrap_or(0) > 0 {
            break b;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "batch never checked a page: {b}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(batch["running"], true, "{batch}");
    assert!(batch.get("error").is_none(), "{batch}");

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = agent
        .ask(serde_json::json!({"cmd": "start", "workload": format!("service --port {port}")}));
    assert_eq!(started["ok"], true, "{started}");
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    // The service answers from another process than the agent's.
    let owner = std::fs::read_to_string(format!(
        "/proc/{}/task/{}/children",
        agent.child.id(),
        agent.child.id()
    ))
    .unwrap_or_default();
    assert_eq!(
        owner.split_whitespace().count(),
        2,
        "two child processes: {owner:?}"
    );

    // Starting it again replaces it: the old process is killed first, freeing the port.
    let again = agent
        .ask(serde_json::json!({"cmd": "start", "workload": format!("service --port {port}")}));
    assert_eq!(again["ok"], true, "{again}");

    assert_eq!(
        agent.ask(serde_json::json!({"cmd": "stop", "workload": "batch"}))["ok"],
        true
    );
    assert_eq!(
        agent.ask(serde_json::json!({"cmd": "stop", "workload": "service"}))["ok"],
        true
    );
    let t0 = Instant::now();
    loop {
        let left = std::fs::read_to_string(format!(
            "/proc/{}/task/{}/children",
            agent.child.id(),
            agent.child.id()
        ))
        .unwrap_or_default();
        if left.trim().is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "children left: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(agent.workload("batch")["running"], false);
}

#[test]
fn a_service_that_cannot_bind_is_refused_with_the_reason() {
    let taken = TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut agent = Agent::start();
    let r = agent
        .ask(serde_json::json!({"cmd": "start", "workload": format!("service --port {port}")}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().contains("cannot listen"),
        "{r}"
    );
}
