//! The server loop over TLS with client certificates, revocation, and its limits
//! against slow and idle clients.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use tern_pki::ca::{Ca, Role};
use tern_pki::serve::{serve, Limits, TlsAcceptor};
use tern_pki::tls::{
    client_config, client_config_with, server_config, server_config_with, ClientAuth,
};
use tern_pki::{Identity, Trust};
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

/// An app answering the caller's certificate name and role, as the server loop saw it.
fn whoami() -> Router {
    Router::new().route(
        "/",
        get(|req: axum::extract::Request| async move {
            match req.extensions().get::<tern_pki::Secure>() {
                Some(tern_pki::Secure { peer: Some(p) }) => {
                    format!("{}/{}", p.name, p.role.as_str())
                }
                Some(tern_pki::Secure { peer: None }) => "tls".to_string(),
                None => "plain".to_string(),
            }
        }),
    )
}

#[tokio::test]
async fn handlers_see_the_name_and_role_of_the_client_certificate() {
    let d = tempfile::tempdir().unwrap();
    let ca = Ca::init(d.path()).unwrap();
    let server_id = ca
        .issue(Role::Manager, "manager", &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let trust = Trust::new(ca.cert_pem(), None).unwrap();
    let config = server_config_with(&server_id, &trust, ClientAuth::Optional).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = TlsAcceptor::new(config);
    tokio::spawn(serve(
        l,
        whoami(),
        Some(acceptor),
        Limits::default(),
        std::future::pending(),
    ));
    let url = format!("https://{addr}/");
    let host = ca.issue(Role::Host, "h7", &[]).unwrap();
    let said = |c: reqwest::Client| {
        let url = url.clone();
        async move { c.get(&url).send().await.unwrap().text().await.unwrap() }
    };
    assert_eq!(
        said(https(ca.cert_pem(), Some(&host), None)).await,
        "h7/host"
    );
    assert_eq!(
        said(https(ca.cert_pem(), None, None)).await,
        "tls",
        "optional"
    );
}

#[tokio::test]
async fn a_new_revocation_list_reaches_running_servers_and_clients_at_once() {
    let d = tempfile::tempdir().unwrap();
    let ca = Ca::init(d.path()).unwrap();
    let server_id = ca
        .issue(Role::Host, "h1", &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let alice = ca.issue(Role::Operator, "alice", &[]).unwrap();
    let server_trust = Trust::new(ca.cert_pem(), Some(&ca.crl_pem().unwrap())).unwrap();
    // Built once and never replaced: only the trust changes.
    let config = server_config_with(&server_id, &server_trust, ClientAuth::Required).unwrap();
    let addr = start(Some(TlsAcceptor::new(config)), Limits::default()).await;
    let url = format!("https://{addr}/");
    let client_trust = Trust::new(ca.cert_pem(), None).unwrap();
    let client = |id: &Identity| {
        reqwest::Client::builder()
            .use_preconfigured_tls(client_config_with(&client_trust, Some(id)).unwrap())
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let alice_http = client(&alice);
    assert!(alice_http.get(&url).send().await.is_ok());

    ca.revoke("alice").unwrap();
    assert!(server_trust.set_crl(&ca.crl_pem().unwrap()).unwrap());
    assert!(
        !server_trust.set_crl(&ca.crl_pem().unwrap()).unwrap(),
        "the same list"
    );
    assert!(
        alice_http.get(&url).send().await.is_err(),
        "a revoked client got in"
    );

    let bob = client(&ca.issue(Role::Operator, "bob", &[]).unwrap());
    assert!(bob.get(&url).send().await.is_ok());
    ca.revoke("h1").unwrap();
    client_trust.set_crl(&ca.crl_pem().unwrap()).unwrap();
    assert!(
        bob.get(&url).send().await.is_err(),
        "a revoked server was trusted"
    );
}

#[test]
fn a_revocation_list_must_be_the_cas_and_no_older_than_the_one_held() {
    let d = tempfile::tempdir().unwrap();
    let ca = Ca::init(d.path()).unwrap();
    let first = ca.crl_pem().unwrap();
    ca.issue(Role::Host, "h1", &[]).unwrap();
    ca.revoke("h1").unwrap();
    let second = ca.crl_pem().unwrap();
    let trust = Trust::new(ca.cert_pem(), Some(&first)).unwrap();
    assert!(trust.set_crl(&second).unwrap());
    let e = trust.set_crl(&first).unwrap_err();
    assert!(e.to_string().contains("older"), "{e}");
    assert_eq!(trust.crl_pem().as_deref(), Some(second.as_str()));

    let other_dir = tempfile::tempdir().unwrap();
    let other = Ca::init(other_dir.path()).unwrap();
    let e = trust.set_crl(&other.crl_pem().unwrap()).unwrap_err();
    assert!(e.to_string().contains("cluster CA"), "{e}");
    assert!(trust.set_crl("not a list").is_err());
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
