//! What the probes share: their findings, the lab CA and strangers' CAs, an attacker's
//! listener that records every credential sent to it, slow clients, the lab's listening
//! sockets and processes, and an eavesdropper on the lab's switch.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use tern_pki::{Ca, Identity, Role};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{FaultError, Fixture, Outcome};

/// What a probe found: the checks that failed, what it measured, and whether a secret
/// reached someone it should not have.
#[derive(Debug, Default)]
pub(crate) struct Findings {
    failed: Vec<String>,
    measured: Vec<String>,
    leaked: bool,
}

impl Findings {
    /// Records `what` as a hole when `ok` is false.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) {
        if !ok {
            self.failed.push(what.into());
        }
    }

    /// A measurement for the detail line.
    pub fn note(&mut self, what: impl Into<String>) {
        self.measured.push(what.into());
    }

    /// A token, a key or guest memory reached a party that should not have it.
    pub fn leak(&mut self, what: impl Into<String>) {
        self.leaked = true;
        self.failed.push(what.into());
    }

    pub fn outcome(self) -> Outcome {
        let mut o = if self.failed.is_empty() {
            Outcome::pass(self.measured.join("; "))
        } else {
            let mut d = self.failed.join("; ");
            if !self.measured.is_empty() {
                d.push_str(&format!(" (measured: {})", self.measured.join("; ")));
            }
            Outcome::fail(d)
        };
        o.secrets_leaked = self.leaked;
        o
    }
}

/// A fresh directory for one probe's files under the suite's directory.
pub(crate) fn probe_dir(f: &Fixture, name: &str) -> Result<PathBuf, FaultError> {
    let d = f.dir.join("probes").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).map_err(FaultError::io(format!("creating {}", d.display())))?;
    Ok(d)
}

/// The lab's CA, which the manager adopted.
pub(crate) fn lab_ca(f: &Fixture) -> Result<Ca, FaultError> {
    let dir = f
        .lab
        .ca_dir
        .as_ref()
        .ok_or_else(|| FaultError::Setup("the lab was made without a CA".into()))?;
    Ok(Ca::load(dir)?)
}

/// A CA the lab does not trust, with an operator certificate and a host certificate
/// for `ip` from it.
pub(crate) fn stranger(f: &Fixture, ip: IpAddr) -> Result<(Identity, Identity), FaultError> {
    let ca = Ca::init(&probe_dir(f, "stranger-ca")?)?;
    Ok((
        ca.issue(Role::Operator, "operator", &[])?,
        ca.issue(Role::Host, "h1", &[ip])?,
    ))
}

/// The lab's root address (the manager's, on the lab's switch).
pub(crate) fn root_ip(f: &Fixture) -> Result<IpAddr, FaultError> {
    f.lab
        .root_addr
        .parse()
        .map_err(|_| FaultError::Setup(format!("lab root address {:?}", f.lab.root_addr)))
}

/// `ADDR:PORT` of a `scheme://ADDR:PORT` URL.
pub(crate) fn socket_of(url: &str) -> Result<SocketAddr, FaultError> {
    url.split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'))
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| FaultError::Setup(format!("{url:?} is not scheme://IP:PORT")))
}

/// A reqwest client trusting the lab CA, presenting `id` when given.
pub(crate) fn https(
    ca_pem: &str,
    id: Option<&Identity>,
    timeout: Duration,
) -> Result<reqwest::Client, FaultError> {
    reqwest::Client::builder()
        .use_preconfigured_tls(tern_pki::tls::client_config(ca_pem, id, None)?)
        .timeout(timeout)
        .build()
        .map_err(|e| FaultError::Setup(format!("an HTTPS client: {e}")))
}

/// The status and JSON body of a request (`Err`: no answer at all, as a string).
pub(crate) async fn call(req: reqwest::RequestBuilder) -> Result<(u16, serde_json::Value), String> {
    let r = req.send().await.map_err(|e| format!("{e}"))?;
    let status = r.status().as_u16();
    let body = r.bytes().await.unwrap_or_default();
    Ok((
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    ))
}

/// Accepts any client certificate, so the attacker learns whether one was sent.
#[derive(Debug)]
struct AnyClientCert(Arc<rustls::crypto::CryptoProvider>);

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        false
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn attacker_tls(id: &Identity) -> Result<Arc<rustls::ServerConfig>, FaultError> {
    let bad = |e: String| FaultError::Setup(format!("the attacker's TLS: {e}"));
    let provider = tern_pki::tls::provider();
    let certs = CertificateDer::pem_slice_iter(id.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(id.key_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AnyClientCert(provider)))
        .with_single_cert(certs, key)
        .map_err(|e| bad(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What reached an attacker's listener.
#[derive(Debug, Clone, Default)]
pub(crate) struct Seen {
    pub connections: u32,
    /// TLS handshakes the caller completed (it trusted the attacker's certificate).
    pub handshakes: u32,
    /// Handshakes in which the caller presented its certificate.
    pub client_certs: u32,
    /// Requests that carried an `Authorization` header (a bearer token).
    pub tokens: u32,
    /// First lines of the requests it read.
    pub requests: Vec<String>,
}

impl Seen {
    pub fn leaked(&self) -> bool {
        self.client_certs > 0 || self.tokens > 0
    }
}

/// A listener that takes TLS (presenting `id`, asking for any client certificate) and
/// plain HTTP on one port, answers 503, and records what callers sent it.
pub(crate) struct Attacker {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Attacker {
    pub async fn start(ip: IpAddr, id: &Identity) -> Result<Attacker, FaultError> {
        let config = attacker_tls(id)?;
        let l = TcpListener::bind((ip, 0))
            .await
            .map_err(FaultError::io(format!(
                "binding an attacker's listener on {ip}"
            )))?;
        let addr = l
            .local_addr()
            .map_err(FaultError::io("the attacker's address"))?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let s = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((c, _)) = l.accept().await {
                lock(&s).connections += 1;
                tokio::spawn(record(c, config.clone(), s.clone()));
            }
        });
        Ok(Attacker { addr, seen, task })
    }

    pub fn seen(&self) -> Seen {
        lock(&self.seen).clone()
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn record(c: TcpStream, config: Arc<rustls::ServerConfig>, seen: Arc<Mutex<Seen>>) {
    let t = Duration::from_secs(5);
    let mut first = [0u8; 1];
    if !matches!(tokio::time::timeout(t, c.peek(&mut first)).await, Ok(Ok(1))) {
        return;
    }
    if first[0] == 0x16 {
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let Ok(Ok(tls)) = tokio::time::timeout(t, acceptor.accept(c)).await else {
            return;
        };
        {
            let mut s = lock(&seen);
            s.handshakes += 1;
            if tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty())
            {
                s.client_certs += 1;
            }
        }
        read_request(tls, &seen).await;
    } else {
        read_request(c, &seen).await;
    }
}

async fn read_request<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, seen: &Mutex<Seen>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while buf.len() < 64 << 10 && !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
    }
    if buf.is_empty() {
        return;
    }
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    {
        let mut s = lock(seen);
        s.requests
            .push(text.lines().next().unwrap_or_default().to_string());
        if text.contains("\nauthorization:") {
            s.tokens += 1;
        }
    }
    let _ = s
        .write_all(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        )
        .await;
}

/// Whether the peer closed `s`: a read returns end of file or an error before `by`.
async fn closed_by<S: AsyncRead + Unpin>(s: &mut S, by: tokio::time::Instant) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout_at(by, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// The slow-client probe against a server at `addr` speaking TLS with `tls` (the
/// caller's certificate included: the attacker got through the handshake): 50
/// connections send half a request's headers, 200 say nothing at all. Then `real`
/// must be answered within a second, and the server must close every slow connection
/// within `header_timeout` plus 3 s. Returns what it measured, or the hole.
pub(crate) async fn slow_clients<F>(
    addr: SocketAddr,
    tls: rustls::ClientConfig,
    header_timeout: Duration,
    real: F,
) -> Result<String, String>
where
    F: std::future::Future<Output = bool>,
{
    let started = tokio::time::Instant::now();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let name = ServerName::from(addr.ip());
    let mut half = Vec::new();
    for _ in 0..50 {
        let c = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut s = connector
            .connect(name.clone(), c)
            .await
            .map_err(|e| format!("a TLS handshake with a lab certificate failed: {e}"))?;
        s.write_all(b"GET /v1/host HTTP/1.1\r\nHost: x\r\nAccept: ap")
            .await
            .map_err(|e| format!("write: {e}"))?;
        s.flush().await.map_err(|e| format!("write: {e}"))?;
        half.push(s);
    }
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(
            TcpStream::connect(addr)
                .await
                .map_err(|e| format!("connect: {e}"))?,
        );
    }
    let t = Instant::now();
    let answered = tokio::time::timeout(Duration::from_secs(1), real)
        .await
        .unwrap_or(false);
    let took = t.elapsed();
    if !answered {
        return Err(format!(
            "a real request got no answer within 1 s beside 50 half-sent requests and 200 idle sockets ({took:?})"
        ));
    }
    let by = started + header_timeout + Duration::from_secs(3);
    let mut held = 0;
    for s in &mut half {
        held += usize::from(!closed_by(s, by).await);
    }
    for s in &mut idle {
        held += usize::from(!closed_by(s, by).await);
    }
    if held > 0 {
        return Err(format!(
            "{held} of 250 slow connections were still open {:?} after they were made",
            by - started
        ));
    }
    Ok(format!(
        "a real request answered in {} ms beside 250 slow sockets; all closed within {:.1} s",
        took.as_millis(),
        started.elapsed().as_secs_f64()
    ))
}

/// The TCP and UDP sockets listening in network namespace `ns` (`None`: this one),
/// as `ss -ltunpH` prints them.
pub(crate) async fn listeners(ns: Option<&str>) -> Result<Vec<String>, FaultError> {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = tokio::process::Command::new("ip");
            c.args(["netns", "exec", ns, "ss"]);
            c
        }
        None => tokio::process::Command::new("ss"),
    };
    let out = cmd
        .arg("-ltunpH")
        .output()
        .await
        .map_err(FaultError::io("running ss (install iproute2)"))?;
    if !out.status.success() {
        return Err(FaultError::Setup(format!(
            "ss failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect())
}

/// Whether an `ss` line listens on every address (`0.0.0.0`, `*` or `[::]`).
pub(crate) fn on_every_address(line: &str) -> bool {
    line.split_whitespace().nth(4).is_some_and(|local| {
        ["0.0.0.0:", "*:", "[::]:", "0.0.0.0%"]
            .iter()
            .any(|p| local.starts_with(p))
    })
}

/// Resident memory of process `pid`, in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The process ids whose command line contains every one of `words`.
pub(crate) fn pids_with(words: &[&str]) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let c = String::from_utf8_lossy(&c).replace('\0', " ");
                words.iter().all(|w| c.contains(w))
            })
        })
        .collect()
}

/// The manager process the fixture started (its database lies in the fixture's
/// database directory).
pub(crate) fn manager_pid(f: &Fixture) -> Result<u32, FaultError> {
    let db = f.db_dir.join("manager.db");
    pids_with(&["manager", "--db", &db.to_string_lossy()])
        .into_iter()
        .next()
        .ok_or_else(|| FaultError::Setup("the manager process is not running".into()))
}

/// A VM of `memory_mib` the manager places on host `i` (the agent's default guest),
/// once it runs there. The manager destroys VMs it does not know of on its hosts, so
/// a probe's VMs go through it.
pub(crate) async fn managed_vm(
    f: &Fixture,
    i: usize,
    id: &str,
    memory_mib: u64,
) -> Result<(), FaultError> {
    let body = serde_json::json!({"name": id, "host": f.lab.hosts[i].name,
                                  "spec": {"vcpus": 1, "memory_mib": memory_mib}});
    f.manager_json(reqwest::Method::POST, "/v1/vms", Some(body))
        .await?;
    f.wait_recorded(&[id], Duration::from_secs(60)).await
}

/// [`managed_vm`] with 256 MiB, for probes that need a running QEMU, not a guest.
pub(crate) async fn plain_vm(f: &Fixture, i: usize, id: &str) -> Result<(), FaultError> {
    managed_vm(f, i, id, 256).await
}

/// How long [`quiet_rounds`] keeps the manager's rounds away.
pub(crate) const QUIET: Duration = Duration::from_secs(6);

/// Makes the manager's control rounds [`QUIET`] apart and returns just after one, so
/// that the next is [`QUIET`] away. A round destroys every VM a host lists that the
/// manager did not place there, and the incoming copies a probe prepares on an agent
/// itself are such VMs. `Fixture::reset` sets the suite's interval again, which takes
/// effect after the next round.
pub(crate) async fn quiet_rounds(f: &Fixture) -> Result<(), FaultError> {
    let mut settings = f
        .manager_json(reqwest::Method::GET, "/v1/balancer", None)
        .await?;
    settings["interval_s"] = serde_json::json!(QUIET.as_secs());
    f.manager_json(reqwest::Method::PUT, "/v1/balancer", Some(settings))
        .await?;
    next_round(f).await
}

/// Returns just after the manager's next control round (which records each host's
/// report).
pub(crate) async fn next_round(f: &Fixture) -> Result<(), FaultError> {
    let h = &f.lab.hosts[0].name;
    let beat = f.manager.host(h).await?.last_heartbeat;
    let t0 = Instant::now();
    // A round (which records each host's report) comes within the interval the last
    // one was scheduled with: [`QUIET`] after a quiet probe, the manager's default of
    // 30 s right after it started.
    let limit = Duration::from_secs(35);
    while f.manager.host(h).await?.last_heartbeat == beat {
        if t0.elapsed() > limit {
            return Err(FaultError::Timeout {
                what: "a control round of the manager".into(),
                limit,
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Deletes VM `id` through the manager and waits until no host runs it.
pub(crate) async fn drop_vm(f: &Fixture, id: &str) -> Result<(), FaultError> {
    match f.manager.delete_vm(id).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    f.wait(&format!("{id} is gone"), Duration::from_secs(30), || {
        f.hosts_of(id).is_empty()
    })
    .await?;
    Ok(())
}

/// A listener on `ip` that accepts connections and never says a word: a destination
/// that keeps a migration in its prepare call.
pub(crate) async fn silent_listener(
    ip: IpAddr,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), FaultError> {
    let l = TcpListener::bind((ip, 0))
        .await
        .map_err(FaultError::io(format!("binding a silent listener on {ip}")))?;
    let addr = l
        .local_addr()
        .map_err(FaultError::io("the silent listener's address"))?;
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    Ok((addr, task))
}

/// Recognises pages the guest's `memdirty` writes, wherever they sit in a byte string:
/// each of its words is a fixed noise word xored with a key of the page and pass, so
/// the xor of two neighbouring words is the xor of two neighbouring noise words,
/// whatever the page, the pass and the alignment of the bytes.
pub(crate) struct Marker {
    /// Sorted xors of neighbouring noise words.
    pairs: Vec<u64>,
    /// Which low 16 bits occur among `pairs`: most offsets are dismissed with one bit.
    filter: Vec<u64>,
}

impl Marker {
    pub fn memdirty() -> Marker {
        let noise = tern_guest::workload::memdirty::noise();
        let mut pairs: Vec<u64> = noise.windows(2).map(|w| w[0] ^ w[1]).collect();
        pairs.sort_unstable();
        let mut filter = vec![0u64; 1 << 10];
        for p in &pairs {
            let k = (*p & 0xffff) as usize;
            filter[k >> 6] |= 1 << (k & 63);
        }
        Marker { pairs, filter }
    }

    /// How many offsets of `bytes` start 16 bytes of a memdirty page. Only the first
    /// 8 offsets of every 64 are looked at (one of them is aligned with the guest's
    /// words), which finds any run of its content of 80 bytes or more at an eighth of
    /// the cost: a capture must keep up with the link.
    pub fn count(&self, bytes: &[u8]) -> u64 {
        let mut hits = 0;
        if bytes.len() < 16 {
            return 0;
        }
        let offsets = (0..bytes.len() - 15).filter(|o| o % 64 < 8);
        for o in offsets {
            let a = u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap_or_default());
            let b = u64::from_le_bytes(bytes[o + 8..o + 16].try_into().unwrap_or_default());
            let x = a ^ b;
            let k = (x & 0xffff) as usize;
            if self.filter[k >> 6] & (1 << (k & 63)) != 0 && self.pairs.binary_search(&x).is_ok() {
                hits += 1;
            }
        }
        hits
    }

    /// Offsets starting memdirty content in the file at `path`, counting up to `enough`.
    pub fn count_in_file(&self, path: &Path, enough: u64) -> std::io::Result<u64> {
        use std::io::Read;
        let mut f = std::fs::File::open(path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut hits = 0;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 || hits >= enough {
                return Ok(hits);
            }
            hits += self.count(&buf[..n]);
        }
    }
}

/// Writes `len` bytes of memdirty pages at `offset` of a guest's RAM file.
pub(crate) fn write_marker(path: &Path, offset: u64, len: u64) -> std::io::Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    use tern_guest::workload::memdirty::{fill_page, noise};
    let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.seek(SeekFrom::Start(offset))?;
    let noise = noise();
    let mut page = vec![0u64; tern_guest::PAGE_WORDS];
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    for p in 0..len / tern_guest::PAGE_SIZE as u64 {
        fill_page(&mut page, 1, p, &noise);
        for word in &page {
            w.write_all(&word.to_le_bytes())?;
        }
    }
    w.flush()
}

/// What an eavesdropper on the lab's switch saw.
#[derive(Debug, Default, Clone)]
pub(crate) struct Capture {
    pub frames: u64,
    pub bytes: u64,
    /// Offsets at which a frame held guest memory in the clear.
    pub marker_hits: u64,
}

/// Listens to every frame crossing network namespace `ns` (an `AF_PACKET` socket
/// opened inside it) until `stop`, looking for `marker` in each. One thread only
/// receives, another scans, so a slow scan delays the verdict, not the capture.
pub(crate) fn eavesdrop(ns: &str, marker: Marker) -> Result<Eavesdropper, FaultError> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = stop.clone();
    use rustix::net::{sockopt, AddressFamily, RecvFlags, SocketType};
    let netns = std::fs::File::open(Path::new("/run/netns").join(ns))
        .map_err(FaultError::io(format!("opening network namespace {ns}")))?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let (frames_tx, frames_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let receiver = std::thread::spawn(move || -> Result<(), String> {
        use std::os::fd::AsFd;
        // This thread moves into the lab's switch namespace for good; it ends with the
        // capture.
        let open = || -> Result<_, String> {
            rustix::thread::move_into_link_name_space(
                netns.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(|e| format!("entering the switch namespace: {e}"))?;
            let fd = rustix::net::socket(
                AddressFamily::PACKET,
                SocketType::RAW,
                Some(rustix::net::eth::ALL),
            )
            .map_err(|e| format!("an AF_PACKET socket: {e}"))?;
            let _ = sockopt::set_socket_recv_buffer_size_force(&fd, 64 << 20);
            sockopt::set_socket_timeout(
                &fd,
                sockopt::Timeout::Recv,
                Some(Duration::from_millis(100)),
            )
            .map_err(|e| format!("a receive timeout: {e}"))?;
            Ok(fd)
        };
        let fd = match open() {
            Ok(fd) => {
                let _ = ready_tx.send(Ok(()));
                fd
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.clone()));
                return Err(e);
            }
        };
        // Room for a whole GSO frame, which a veth hands over unsegmented.
        let mut buf = vec![0u8; 256 << 10];
        while !stopping.load(Ordering::SeqCst) {
            match rustix::net::recv(&fd, &mut buf[..], RecvFlags::empty()) {
                Ok((n, _)) => {
                    if frames_tx.send(buf[..n.min(buf.len())].to_vec()).is_err() {
                        return Ok(());
                    }
                }
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
                Err(e) => return Err(format!("capturing: {e}")),
            }
        }
        Ok(())
    });
    match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(FaultError::Setup(e)),
        Err(_) => {
            return Err(FaultError::Setup(
                "the eavesdropper did not start within 5 s".into(),
            ))
        }
    }
    let scanner = std::thread::spawn(move || {
        let mut seen = Capture::default();
        for frame in frames_rx {
            seen.frames += 1;
            seen.bytes += frame.len() as u64;
            seen.marker_hits += marker.count(&frame);
        }
        receiver
            .join()
            .map_err(|_| "the capture thread panicked".to_string())??;
        Ok(seen)
    });
    Ok(Eavesdropper { stop, scanner })
}

/// A capture under way.
pub(crate) struct Eavesdropper {
    stop: Arc<AtomicBool>,
    scanner: std::thread::JoinHandle<Result<Capture, String>>,
}

impl Eavesdropper {
    /// Stops capturing and returns what was seen, once every frame is scanned.
    pub fn finish(self) -> Result<Capture, FaultError> {
        self.stop.store(true, Ordering::SeqCst);
        self.scanner
            .join()
            .map_err(|_| FaultError::Setup("the eavesdropper panicked".into()))?
            .map_err(FaultError::Setup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_finds_memdirty_pages_at_any_offset_and_nothing_in_noise() {
        let m = Marker::memdirty();
        let noise = tern_guest::workload::memdirty::noise();
        let mut page = vec![0u64; tern_guest::PAGE_WORDS];
        tern_guest::workload::memdirty::fill_page(&mut page, 7, 1234, &noise);
        let bytes: Vec<u8> = page.iter().flat_map(|w| w.to_le_bytes()).collect();
        for shift in [0usize, 1, 3, 7] {
            let mut framed = vec![0xAB; shift];
            framed.extend_from_slice(&bytes[..1400]);
            assert!(m.count(&framed) >= 20, "shift {shift}");
        }
        // Bytes that are not memdirty's (here: a counter) hold no marker.
        let other: Vec<u8> = (0..1u32 << 16)
            .map(|i| i.wrapping_mul(2654435761) as u8)
            .collect();
        assert_eq!(m.count(&other), 0);
    }

    #[test]
    fn wildcard_listeners_are_recognised() {
        let line = |local: &str| format!("tcp LISTEN 0 128 {local} 0.0.0.0:* users:((\"x\"))");
        assert!(on_every_address(&line("0.0.0.0:4444")));
        assert!(on_every_address(&line("*:4444")));
        assert!(on_every_address(&line("[::]:4444")));
        assert!(!on_every_address(&line("198.18.0.2:7070")));
        assert!(!on_every_address(&line("127.0.0.1:53")));
    }
}
