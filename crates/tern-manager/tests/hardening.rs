//! The manager's server against slow and idle clients.

use std::sync::Arc;
use std::time::Duration;

use tern_manager::manager::system_clock;
use tern_manager::store::SqliteStore;
use tern_manager::Manager;

/// 50 half-sent requests and 200 silent sockets: a real request still gets in at once,
/// and every slow socket is closed after the 10 s header timeout.
#[tokio::test]
async fn half_sent_requests_and_idle_sockets_do_not_hold_the_manager() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("tern.db")).unwrap();
    let manager = Arc::new(Manager::open(Box::new(store), system_clock()).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(tern_manager::api::serve(
        listener,
        manager,
        vec!["t".into()],
        std::future::pending(),
    ));
    let probe = move || tern_testkit::slow_clients_dropped(addr, Duration::from_secs(10));
    tokio::task::spawn_blocking(probe).await.unwrap().unwrap();
}
