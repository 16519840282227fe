//! `tern manager --etcd URL,...`: one of several managers sharing their state in etcd;
//! the one holding the leader lease acts, the others pass requests to it (docs/ha.md).
//!
//! With `--ca DIR` (the same directory for every manager) each manager gets its own
//! certificate, named for the host it advertises, serves HTTPS, calls agents over
//! mutual TLS and passes requests to the leader over TLS.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_manager::api::Serving;
use tern_manager::client::http::HttpConnector;
use tern_manager::control::Control;
use tern_manager::ha::election::Election;
use tern_manager::ha::{forward, Leadership};
use tern_manager::manager::system_clock;
use tern_manager::store::etcd::gateway::{check_endpoint, Gateway};
use tern_manager::store::etcd::{Keys, REQUEST_TIMEOUT};
use tern_manager::store::EtcdStore;
use tern_manager::Manager;

/// Where the state lives in etcd.
const PREFIX: &str = "/tern/";
/// Lease TTL: a crashed leader is replaced after at most this long.
const LEASE_TTL_S: i64 = 3;
/// How often a follower looks for the leader.
const POLL: Duration = Duration::from_millis(500);

/// What `tern manager` parsed, for a manager over etcd.
pub struct Options {
    pub listen: SocketAddr,
    pub tokens: Vec<String>,
    pub agent_token: String,
    pub agent_timeout: Duration,
    pub etcd: Vec<String>,
    pub advertise: Option<String>,
    /// The cluster CA's directory, shared by every manager.
    pub ca: Option<PathBuf>,
    pub crl_refresh: Duration,
    /// The image catalogue's files, shared by every manager.
    pub catalog: PathBuf,
    /// How HA treats guests that stopped.
    pub ha_limits: tern_manager::decide::guest::HaLimits,
}

/// The URL other managers reach this one by: `--advertise`, else the listen address
/// when it names one host; `https://` with the cluster CA, else `http://`.
fn advertise_url(given: Option<&str>, listen: SocketAddr, tls: bool) -> anyhow::Result<String> {
    let scheme = if tls { "https" } else { "http" };
    match given {
        Some(url) => {
            let plain = url
                .strip_prefix(&format!("{scheme}://"))
                .map(|rest| format!("http://{rest}"));
            plain
                .as_deref()
                .ok_or(())
                .and_then(|p| check_endpoint(p).map_err(|_| ()))
                .map_err(|()| {
                    super::bad_input(format!(
                        "--advertise {url:?}: give {scheme}://HOST:PORT where the other \
                         managers reach this one, e.g. {scheme}://10.0.0.1:7080"
                    ))
                })?;
            Ok(url.trim_end_matches('/').to_owned())
        }
        None if listen.ip().is_unspecified() || listen.port() == 0 => {
            Err(super::bad_input(format!(
                "--listen {listen} names no single address other managers could use: \
                 give --advertise {scheme}://HOST:PORT"
            )))
        }
        None => Ok(format!("{scheme}://{listen}")),
    }
}

/// The host and port of an advertised URL `SCHEME://HOST:PORT` (checked before).
fn host_port(url: &str) -> (&str, &str) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (host, port) = rest.rsplit_once(':').unwrap_or((rest, ""));
    (host.trim_start_matches('[').trim_end_matches(']'), port)
}

/// This manager's certificate: named for the host it advertises (a DNS name goes into
/// the certificate as one; an address as an IP SAN with the listen address), saved in
/// `CA_DIR/managers/HOST-PORT` so managers sharing the directory keep their own keys.
fn manager_pki(
    dir: &std::path::Path,
    me: &str,
    listen: SocketAddr,
) -> anyhow::Result<super::manager::Pki> {
    let (host, port) = host_port(me);
    let mut ips = vec![listen.ip()];
    let name = match host.parse::<IpAddr>() {
        Ok(ip) => {
            ips.push(ip);
            "manager"
        }
        Err(_) => host,
    };
    let subdir = format!("managers/{}-{port}", host.replace(':', "_"));
    // Managers starting together must not each make a CA of their own: the directory
    // must hold one already (`tern ca init`).
    super::manager::pki(dir, false, &subdir, name, &ips)
}

pub fn run(o: Options) -> anyhow::Result<()> {
    for e in &o.etcd {
        check_endpoint(e).map_err(|err| super::bad_input(format!("--etcd: {err}")))?;
    }
    let me = advertise_url(o.advertise.as_deref(), o.listen, o.ca.is_some())?;
    let pki =
        o.ca.as_deref()
            .map(|d| manager_pki(d, &me, o.listen))
            .transpose()?;
    let leadership = Arc::new(Leadership::new(me.clone()));
    let store = EtcdStore::open(&o.etcd, PREFIX, leadership.clone())?;
    let manager = Arc::new(
        Manager::open(Box::new(store), system_clock())
            .with_context(|| format!("reading the state from etcd at {}", o.etcd.join(",")))?
            .with_catalog(o.catalog.clone())
            .with_ha_limits(o.ha_limits),
    );
    let agents = Arc::new(match &pki {
        Some(p) => HttpConnector::with_tls(o.agent_timeout, p.client.clone()),
        None => HttpConnector::new(&o.agent_token, o.agent_timeout),
    });
    let forwarding = match &pki {
        Some(p) => forward::Pki {
            serving: Serving {
                tls: Some(tern_pki::TlsAcceptor::new(p.server.clone())),
                limits: Default::default(),
                ca: Some(p.ca.clone()),
                trust: Some(p.trust.clone()),
                crl_refresh: Some(o.crl_refresh),
            },
            client: Some(p.client.clone()),
        },
        None => forward::Pki::default(),
    };
    let control = Control::new(manager.clone(), agents);
    let election = Election {
        gateway: Arc::new(Gateway::new(&o.etcd, REQUEST_TIMEOUT)?),
        key: Keys::new(PREFIX).leader(),
        ttl_s: LEASE_TTL_S,
        poll: POLL,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(o.listen)
            .await
            .with_context(|| format!("binding {}", o.listen))?;
        let scheme = if forwarding.client.is_some() {
            "https"
        } else {
            "http"
        };
        eprintln!(
            "tern manager: API on {scheme}://{} (advertised as {me}), state in etcd at {}; \
             campaigning for leadership",
            listener.local_addr()?,
            o.etcd.join(",")
        );
        let mut roles = leadership.watch();
        let l = leadership.clone();
        tokio::spawn(async move {
            while roles.changed().await.is_ok() {
                if *roles.borrow() {
                    eprintln!("tern manager: leading");
                } else {
                    eprintln!(
                        "tern manager: following (leader: {})",
                        l.leader().unwrap_or_else(|| "none yet".into())
                    );
                }
            }
        });
        let stop = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        forward::run_with(
            listener, manager, control, o.tokens, leadership, election, forwarding, stop,
        )
        .await?;
        eprintln!("tern manager: stopped");
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_url_must_be_reachable_by_others() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            advertise_url(None, at("10.0.0.1:7080"), false).unwrap(),
            "http://10.0.0.1:7080"
        );
        assert_eq!(
            advertise_url(Some("http://m1:7080/"), at("0.0.0.0:7080"), false).unwrap(),
            "http://m1:7080"
        );
        assert_eq!(
            advertise_url(None, at("10.0.0.1:7080"), true).unwrap(),
            "https://10.0.0.1:7080"
        );
        assert_eq!(
            advertise_url(Some("https://m1:7080"), at("0.0.0.0:7080"), true).unwrap(),
            "https://m1:7080"
        );
        for (given, listen, tls) in [
            (None, "0.0.0.0:7080", false),
            (None, "127.0.0.1:0", false),
            (Some("m1:7080"), "10.0.0.1:7080", false),
            (Some("http://m1:7080"), "10.0.0.1:7080", true),
            (Some("https://m1:7080"), "10.0.0.1:7080", false),
        ] {
            let err = advertise_url(given, at(listen), tls).unwrap_err();
            assert_eq!(super::super::exit_code(&err), 2, "{err}");
        }
        assert_eq!(host_port("https://m1:7080"), ("m1", "7080"));
        assert_eq!(host_port("https://[::1]:7080"), ("::1", "7080"));
    }
}
