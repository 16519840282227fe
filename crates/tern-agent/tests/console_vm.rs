//! The serial console of a real guest through the agent: the log replays the boot, the
//! guest image's root shell on ttyS0 answers what is typed, one client at a time, the
//! console log keeps what went by, and the console comes back after a reboot and goes
//! with the VM's QEMU.

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use std::time::{Duration, Instant};
use tern_api::client::console::{connect, ConsoleStream};
use tern_hv::Action;
use tokio_tungstenite::tungstenite::Message;

mod qemu_agent;
use qemu_agent::QemuAgent as Agent;

/// Reads the console until `want` shows (in what came since the call) or `within`
/// passes; returns what was read.
async fn read_until(ws: &mut ConsoleStream, want: &str, within: Duration) -> String {
    let mut seen = Vec::new();
    let deadline = Instant::now() + within;
    while !String::from_utf8_lossy(&seen).contains(want) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.extend_from_slice(&b),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            other => panic!(
                "no {want:?} on the console: {other:?}; read:\n{}",
                String::from_utf8_lossy(&seen)
            ),
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// Types `line` and waits for `answer`: the shell may not be up yet when the guest agent
/// is, so the line is typed again until it is answered.
async fn ask(ws: &mut ConsoleStream, line: &str, answer: &str) -> String {
    let t0 = Instant::now();
    loop {
        ws.send(Message::Binary(format!("{line}\n").into_bytes()))
            .await
            .unwrap();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, ws.next()).await {
                Ok(Some(Ok(Message::Binary(b)))) => seen.extend_from_slice(&b),
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("the console ended: {other:?}"),
                Err(_) => break,
            }
            let text = String::from_utf8_lossy(&seen).into_owned();
            if text.contains(answer) {
                return text;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no {answer:?} after typing {line:?}; last read:\n{}",
            String::from_utf8_lossy(&seen)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_reaches_the_guest_shell() {
    if !tern_testkit::require_qemu() {
        return;
    }
    let a = Agent::start(
        "h1",
        tempfile::tempdir().unwrap(),
        None,
        Duration::from_secs(30),
    )
    .await;
    let c = &a.c;
    let v = c.create_vm(&a.vm("g1", json!({"vcpus": 1}))).await.unwrap();
    let log = v.info.console_log.clone().unwrap();
    let socket = v.info.console_socket.clone().unwrap();
    assert!(socket.ends_with("console.sock"), "{socket:?}");
    let t0 = Instant::now();
    while c.guest("g1", &json!({"cmd": "ping"})).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(120), "guest never up");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let base = c.base().to_string();
    let t = Duration::from_secs(10);

    // The boot, printed while nobody was attached, is in the log and replayed.
    let mut ws = connect(&base, "/v1/vms/g1/console?log=65536", "t", None, t)
        .await
        .unwrap();
    read_until(&mut ws, "tern-init: starting tern-guest", t).await;
    // What is typed reaches the shell: it computes the answer, which is not the echo.
    let out = ask(&mut ws, "echo tern-$((6*7))", "tern-42").await;
    eprintln!("console:\n{out}");

    // One client at a time.
    let e = connect(&base, "/v1/vms/g1/console", "t", None, t)
        .await
        .err()
        .expect("a second attach is refused");
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("attached"), "{e}");
    ws.close(None).await.unwrap();
    drop(ws);

    // Free again once the first has left; the log kept what went by.
    let t1 = Instant::now();
    let mut ws = loop {
        match connect(&base, "/v1/vms/g1/console", "t", None, t).await {
            Ok(ws) => break ws,
            Err(e) if e.status() == Some(409) && t1.elapsed() < t => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("attach after detach: {e}"),
        }
    };
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("tern-42"), "{text}");

    // A paused guest keeps its console; after a reboot it is there again.
    c.act("g1", Action::Pause).await.unwrap();
    c.act("g1", Action::Resume).await.unwrap();
    ask(&mut ws, "echo paused-$((1+1))", "paused-2").await;
    drop(ws);
    c.act("g1", Action::Reboot).await.unwrap();
    let mut ws = loop {
        match connect(&base, "/v1/vms/g1/console", "t", None, t).await {
            Ok(ws) => break ws,
            Err(e) if e.status() == Some(409) && t1.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("attach after reboot: {e}"),
        }
    };
    ask(&mut ws, "echo again-$((2+3))", "again-5").await;

    // The attach ends when the VM's QEMU does, and says why.
    c.act("g1", Action::Stop).await.unwrap();
    let end = tokio::time::timeout(t, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => break f.map(|f| f.reason.into_owned()),
                Some(Ok(_)) => {}
                other => panic!("the console ended without a close: {other:?}"),
            }
        }
    })
    .await
    .expect("closed when the VM stopped");
    assert!(end.unwrap_or_default().contains("QEMU ended"));
    let e = connect(&base, "/v1/vms/g1/console", "t", None, t)
        .await
        .err()
        .unwrap();
    assert_eq!(e.status(), Some(409), "{e}");
    assert!(e.to_string().contains("stopped"), "{e}");
    a.shut().await;
}
