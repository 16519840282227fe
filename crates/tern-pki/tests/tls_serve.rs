//! The server loop over TLS with client certificates, revocation, and its limits
//! against slow and idle clients.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use tern_pki::ca::{Ca, Role};
use tern_pki::serve::{serve, Limits, TlsAcceptor};
use tern_pki::tls::{client_config, server_config, ClientAuth};
use tern_pki::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn app() -> Router {
    Router::new().route("/", get(|| async { "ok" }))
}

async fn start(tls: Option<TlsAcceptor>, limits: Limits) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(serve(l, app(), tls, limits, std::future::pending()));
    addr
}

fn https(ca_pem: &str, id: Option<&Identity>, crl: Option<&str>) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(client_config(ca_pem, id, crl).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

#[tokio::test]
async fn mutual_tls_admits_only_unrevoked_certificates_of_the_cluster_ca() {
    let d = tempfile::tempdir().unwrap();
    let ca = Ca::init(d.path()).unwrap();
    let server_id = ca
        .issue(Role::Host, "h1", &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let operator = ca.issue(Role::Operator, "alice", &[]).unwrap();
    let crl = ca.crl_pem().unwrap();
    let acceptor =
        TlsAcceptor::new(server_config(&server_id, Some(&crl), ClientAuth::Required).unwrap());
    let addr = start(Some(acceptor.clone()), Limits::default()).await;
    let url = format!("https://{addr}/");

    let ok = https(ca.cert_pem(), Some(&operator), None)
        .get(&url)
        .send()
        .await;
    assert_eq!(ok.unwrap().text().await.unwrap(), "ok");

    // No client certificate: refused during the handshake.
    assert!(https(ca.cert_pem(), None, None)
        .get(&url)
        .send()
        .await
        .is_err());

    // A certificate from another CA, and a client that trusts another CA.
    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::init(other_dir.path()).unwrap();
    let stranger = other.issue(Role::Operator, "alice", &[]).unwrap();
    assert!(https(ca.cert_pem(), Some(&stranger), None)
        .get(&url)
        .send()
        .await
        .is_err());
    assert!(https(other.cert_pem(), Some(&stranger), None)
        .get(&url)
        .send()
        .await
        .is_err());

    // Plain HTTP to a TLS port gets nothing.
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/"))
        .send()
        .await;
    assert!(plain.map(|r| !r.status().is_success()).unwrap_or(true));

    // Revoked: refused once the server takes the new list.
    ca.revoke("alice").unwrap();
    let crl = ca.crl_pem().unwrap();
    acceptor.set(server_config(&server_id, Some(&crl), ClientAuth::Required).unwrap());
    assert!(https(ca.cert_pem(), Some(&operator), None)
        .get(&url)
        .send()
        .await
        .is_err());

    // A client holding the list refuses a revoked server.
    ca.revoke("h1").unwrap();
    let crl = ca.crl_pem().unwrap();
    let fresh = ca.issue(Role::Operator, "bob", &[]).unwrap();
    let e = https(ca.cert_pem(), Some(&fresh), Some(&crl))
        .get(&url)
        .send()
        .await;
    assert!(e.is_err());
}

#[tokio::test]
async fn a_certificate_names_the_address_it_serves() {
    let d = tempfile::tempdir().unwrap();
    let ca = Ca::init(d.path()).unwrap();
    // Issued for another address: a client calling 127.0.0.1 refuses it.
    let id = ca
        .issue(Role::Host, "h1", &["198.18.0.1".parse().unwrap()])
        .unwrap();
    let acceptor = TlsAcceptor::new(server_config(&id, None, ClientAuth::None).unwrap());
    let addr = start(Some(acceptor), Limits::default()).await;
    let r = https(ca.cert_pem(), None, None)
        .get(format!("https://{addr}/"))
        .send()
        .await;
    assert!(r.is_err(), "a certificate for another address was accepted");
}

#[tokio::test]
async fn a_host_key_made_on_the_host_is_signed_by_the_ca() {
    let d = tempfile::tempdir().unwrap();
    let ca = Ca::init(d.path()).unwrap();
    let (key_pem, csr) = tern_pki::identity::new_key_and_csr("h1").unwrap();
    let cert_pem = ca
        .sign_csr(&csr, Role::Host, "h1", &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let id = Identity {
        ca_pem: ca.cert_pem().to_string(),
        cert_pem,
        key_pem,
    };
    let acceptor = TlsAcceptor::new(server_config(&id, None, ClientAuth::None).unwrap());
    let addr = start(Some(acceptor), Limits::default()).await;
    let r = https(ca.cert_pem(), None, None)
        .get(format!("https://{addr}/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
}

/// Whether the server closed `s` (a read returns end of file or an error).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn slow_and_idle_clients_are_dropped_while_real_requests_get_in() {
    let limits = Limits {
        header_timeout: Duration::from_millis(800),
        idle_timeout: Duration::from_secs(2),
        max_connections: 1024,
    };
    let addr = start(None, limits).await;
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        slow.push(s);
    }
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    let t = Instant::now();
    let r = reqwest::get(format!("http://{addr}/")).await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
    for s in slow.iter_mut().chain(idle.iter_mut()) {
        assert!(
            closed_within(s, Duration::from_secs(3)).await,
            "a half-sent or silent connection was held past the header timeout"
        );
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_after_the_idle_timeout() {
    let limits = Limits {
        header_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_millis(500),
        max_connections: 16,
    };
    let addr = start(None, limits).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // A whole request, answered; then the client says nothing more. The header
    // timeout (30 s) is far; the idle timeout must close it.
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once() {
    let limits = Limits {
        header_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        max_connections: 8,
    };
    let addr = start(None, limits).await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut extra = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await);
    // Freeing one slot lets a real request in again.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = reqwest::get(format!("http://{addr}/")).await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ok");
}
