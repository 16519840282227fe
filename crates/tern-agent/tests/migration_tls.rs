//! Migration streams between agents with host identities: the source checks the
//! destination's certificate (its CA and its address) before it sends anything. (The
//! destination's gate refusing plain TCP and other CAs is probed against the lab in the
//! fault suite, `tern bench faults`.)

use std::net::TcpListener;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tern_agent::migration::incoming::{self, Expect, Gate, Progress, Wanted};
use tern_agent::migration::memory::{changed_pages, DestMemory, SentDigests, SourceMemory};
use tern_agent::migration::outgoing::{Outgoing, StreamOptions};
use tern_agent::migration::secure::ClientTls;
use tern_agent::migration::wire::PAGE_SIZE;
use tern_agent::migration::MigrationError;
use tern_pki::ca::{Ca, Role};
use tern_pki::identity::Identity;
use tern_pki::tls::{client_config, server_config, server_config_with, ClientAuth};
use tern_pki::Trust;

const PAGES: u64 = 1024; // 4 MiB
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn loopback() -> std::net::IpAddr {
    std::net::Ipv4Addr::LOCALHOST.into()
}

fn host(ca: &Ca, name: &str) -> Identity {
    ca.issue(Role::Host, name, &[loopback()]).unwrap()
}

/// Streams opened as `id`, trusting the CA in `trust`, to the host named `name`.
fn tls_options(trust: &str, id: &Identity, name: &str) -> StreamOptions {
    let config = client_config(trust, Some(id), None).unwrap();
    StreamOptions {
        tls: Some(ClientTls::new(Arc::new(config), name).unwrap()),
        io_timeout: Duration::from_secs(5),
        ..StreamOptions::default()
    }
}

/// A destination gate with host identity `dest`, receiving into a fresh file while
/// `source` runs; returns what `source` returned and whether the memory arrived whole.
fn with_destination<T: Send>(
    dest_id: &Identity,
    source: impl FnOnce(std::net::SocketAddr, &SourceMemory) -> T + Send,
) -> (T, Result<(), MigrationError>) {
    let server = server_config(dest_id, None, ClientAuth::Required).unwrap();
    with_gate(server, None, source)
}

/// [`with_destination`] with the gate's TLS configuration and the host that prepared.
fn with_gate<T: Send>(
    server: Arc<rustls::ServerConfig>,
    prepared_by: Option<&str>,
    source: impl FnOnce(std::net::SocketAddr, &SourceMemory) -> T + Send,
) -> (T, Result<(), MigrationError>) {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut content = vec![0u8; PAGES as usize * PAGE_SIZE];
    for page in content.chunks_mut(PAGE_SIZE) {
        if rng.gen_ratio(1, 3) {
            rng.fill(page);
        }
    }
    let src_path = dir.path().join("source.mem");
    std::fs::write(&src_path, &content).unwrap();
    let mem = SourceMemory::open(&src_path).unwrap();
    let dest = DestMemory::open(&dir.path().join("dest.mem"), PAGES * PAGE_SIZE as u64).unwrap();
    let listener = TcpListener::bind((loopback(), 0)).unwrap();
    let addr = listener.local_addr().unwrap();
    let expect = Expect {
        migration: "m1".into(),
        token: TOKEN.into(),
        accept_timeout: Duration::from_secs(20),
        io_timeout: Duration::from_secs(5),
    };
    let wanted = Wanted {
        pages: Some(PAGES),
        device: false,
    };
    let prepared_by = prepared_by.map(str::to_owned);
    let (gate, admitted) =
        Gate::open_secure(listener, expect.clone(), wanted, Some(server), prepared_by).unwrap();
    let (progress, cancel) = (Progress::default(), AtomicBool::new(false));
    std::thread::scope(|s| {
        let memory = admitted.memory;
        let (dest, expect, progress, cancel) = (&dest, &expect, &progress, &cancel);
        let rx =
            s.spawn(move || incoming::receive_streams(&memory, dest, expect, progress, cancel));
        let t = source(addr, &mem);
        // A source that never got in: stop waiting for it.
        drop(gate);
        let received = rx.join().unwrap().map(|_| {
            let src = xxhash_rust::xxh3::xxh3_64(&content);
            assert_eq!(
                dest.digest(),
                src,
                "destination memory differs from the source"
            );
        });
        (t, received)
    })
}

fn migrate(mut out: Outgoing, mem: &SourceMemory) {
    let sent = SentDigests::new(mem.pages());
    let pages = changed_pages(mem, &sent, 2);
    out.send_round(1, mem, &sent, &pages, &AtomicBool::new(false))
        .unwrap();
    out.finish().unwrap();
}

#[test]
fn a_source_refuses_a_destination_of_another_ca_or_another_name() {
    let (cluster_dir, other_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let cluster = Ca::init(cluster_dir.path()).unwrap();
    let other = Ca::init(other_dir.path()).unwrap();
    let (impostor, src) = (host(&other, "h1"), host(&cluster, "h2"));
    let (refused, received) = with_destination(&impostor, |addr, _| {
        let opts = tls_options(&src.ca_pem, &src, "127.0.0.1");
        Outgoing::connect(addr, "m1", TOKEN, PAGES, opts).err()
    });
    assert_tls_refused(&refused);
    assert!(received.is_err());
    // A certificate from the right CA for another address is no better.
    let dest = host(&cluster, "h1");
    let (refused, _) = with_destination(&dest, |addr, _| {
        let opts = tls_options(&src.ca_pem, &src, "127.0.0.2");
        Outgoing::connect(addr, "m1", TOKEN, PAGES, opts).err()
    });
    assert_tls_refused(&refused);
}

fn assert_tls_refused(refused: &Option<MigrationError>) {
    assert!(
        matches!(refused, Some(MigrationError::Tls { .. })),
        "{refused:?}"
    );
}

/// Today's hole: any certificate of the cluster CA got past the gate's handshake, so a
/// host other than the source (or an operator) holding the token could feed the guest.
/// Now only the certificate of the host that prepared the migration is let in.
#[test]
fn a_stream_from_any_host_but_the_one_that_prepared_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Ca::init(dir.path()).unwrap();
    let (dest, src, third) = (
        host(&cluster, "h1"),
        host(&cluster, "h2"),
        host(&cluster, "h3"),
    );
    let operator = cluster.issue(Role::Operator, "alice", &[]).unwrap();
    let server = server_config(&dest, None, ClientAuth::Required).unwrap();
    let ((), received) = with_gate(server, Some("h2"), |addr, mem| {
        for (who, id) in [("host h3", &third), ("an operator", &operator)] {
            let opts = tls_options(&dest.ca_pem, id, "127.0.0.1");
            let e = Outgoing::connect(addr, "m1", TOKEN, PAGES, opts);
            assert!(e.is_err(), "{who} with the right token was admitted");
        }
        let opts = tls_options(&src.ca_pem, &src, "127.0.0.1");
        migrate(
            Outgoing::connect(addr, "m1", TOKEN, PAGES, opts).unwrap(),
            mem,
        );
    });
    received.unwrap();
}

/// Today's hole: the gate checked certificates against the revocation list as of the
/// agent's start. Now a list the agent takes while running reaches gates already open.
#[test]
fn a_running_gate_refuses_a_host_revoked_after_it_opened() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Ca::init(dir.path()).unwrap();
    let (dest, src) = (host(&cluster, "h1"), host(&cluster, "h2"));
    let trust = Trust::new(cluster.cert_pem(), Some(&cluster.crl_pem().unwrap())).unwrap();
    let server = server_config_with(&dest, &trust, ClientAuth::Required).unwrap();
    let (refused, received) = with_gate(server, Some("h2"), |addr, _| {
        cluster.revoke("h2").unwrap();
        trust.set_crl(&cluster.crl_pem().unwrap()).unwrap();
        let opts = tls_options(&src.ca_pem, &src, "127.0.0.1");
        Outgoing::connect(addr, "m1", TOKEN, PAGES, opts).err()
    });
    assert!(refused.is_some(), "a revoked host was admitted");
    assert!(received.is_err());
}
