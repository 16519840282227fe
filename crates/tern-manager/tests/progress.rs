//! A running migration's telemetry, from the sim hosts' pre-copy model through the
//! control loop to the API: `GET /v1/migrations/{id}` and `?running=true` carry
//! `progress` while it runs, and none once it ended.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_manager::decide::HostAddresses;

use serde_json::Value;
use tern_manager::control::Control;
use tern_manager::decide::Command;
use tern_manager::manager::system_clock;
use tern_manager::state::{BalancerSettings, Capacity, VmSpec};
use tern_manager::store::SqliteStore;
use tern_manager::Manager;
use tern_simhost::SimCluster;

const TOKEN: &str = "progress-token";

async fn get(base: &str, path: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("{base}{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_migration_reports_its_rounds_through_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("tern.db")).unwrap();
    let manager = Arc::new(
        Manager::open(Box::new(store), system_clock())
            .unwrap()
            .serving(HostAddresses::Sim),
    );
    let sim = SimCluster::new();
    // Real time at a tenth of the model's: a 2 GiB busy guest takes a few seconds.
    sim.set_migration_pace(0.1);
    let mut cmds = vec![Command::PutSettings(BalancerSettings {
        enabled: false,
        ..BalancerSettings::default()
    })];
    for h in ["a", "b"] {
        sim.add_host(h);
        cmds.push(Command::RegisterHost {
            name: h.into(),
            address: "sim:".into(),
            capacity: Capacity {
                cpus: 8.0,
                memory_mib: 32768,
            },
        });
    }
    cmds.push(Command::CreateVm {
        name: "busy".into(),
        spec: VmSpec::sized(2, 2048),
        host: Some("a".into()),
        template: None,
    });
    for r in manager.execute_many(cmds).unwrap() {
        r.unwrap();
    }
    let control = Control::new(manager.clone(), sim.clone());
    control.settle().await.unwrap();
    sim.set_utilisation("busy", 0.8).await.unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tern_manager::api::serve(
        listener,
        manager.clone(),
        vec![TOKEN.into()],
        async {
            let _ = stop_rx.await;
        },
    ));

    manager
        .execute(Command::MigrateVm {
            name: "busy".into(),
            to: Some("b".into()),
            policy: Some(tern_api::migration::PolicyKind::Adaptive),
        })
        .unwrap();
    control.dispatch().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen: Vec<Value> = Vec::new();
    loop {
        control.collect().unwrap();
        let (s, m) = get(&base, "/v1/migrations/1").await;
        assert_eq!(s, 200, "{m}");
        if !m["finished"].is_null() {
            assert!(
                m.get("progress").is_none(),
                "a finished migration has progress: {m}"
            );
            assert_eq!(m["result"]["status"], "succeeded", "{m}");
            break;
        }
        if let Some(p) = m.get("progress") {
            let (_, running) = get(&base, "/v1/migrations?running=true").await;
            if let Some(r) = running.as_array().and_then(|a| a.first()) {
                assert_eq!(r["vm"], "busy");
            }
            seen.push(p.clone());
        }
        assert!(Instant::now() < deadline, "still running after 30 s: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!seen.is_empty(), "no progress observed while it ran");
    let rounds: Vec<u64> = seen.iter().map(|p| p["round"].as_u64().unwrap()).collect();
    assert!(rounds.windows(2).all(|w| w[0] <= w[1]), "{rounds:?}");
    // Round 1 (all 2 GiB) is seen moving before it ends, not only once it is done.
    let num = |p: &Value, k: &str| p[k].as_u64().unwrap();
    assert!(
        seen.iter().any(|p| num(p, "round") == 0
            && num(p, "running_round") == 1
            && (1..2048 << 20).contains(&num(p, "bytes_transferred"))),
        "round 1 not seen under way: {seen:?}"
    );
    let sent: Vec<u64> = seen.iter().map(|p| num(p, "bytes_transferred")).collect();
    assert!(sent.windows(2).all(|w| w[0] <= w[1]), "{sent:?}");
    let last = seen.last().unwrap();
    assert!(last["round"].as_u64().unwrap() >= 1, "{last}");
    assert!(
        last["bytes_transferred"].as_u64().unwrap() >= 2048 << 20,
        "{last}"
    );
    // A busy guest dirties memory; the model reports it.
    assert!(
        last["dirty_rate_bytes_per_s"].as_f64().unwrap() > 0.0,
        "{last}"
    );
    assert!(manager.live().all().is_empty());
    let (s, _) = get(&base, "/v1/migrations/99").await;
    assert_eq!(s, 404);
    let (s, e) = get(&base, "/v1/migrations/x").await;
    assert_eq!(s, 400);
    assert!(e["error"].as_str().unwrap().contains("whole number"), "{e}");
    let _ = stop_tx.send(());
    server.await.unwrap().unwrap();
}
