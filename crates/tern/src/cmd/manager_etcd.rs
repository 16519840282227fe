//! `tern manager --etcd URL,...`: one of several managers sharing their state in etcd;
//! the one holding the leader lease acts, the others pass requests to it (docs/ha.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
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
}

/// The URL other managers reach this one by: `--advertise`, else the listen address
/// when it names one host.
fn advertise_url(given: Option<&str>, listen: SocketAddr) -> anyhow::Result<String> {
    match given {
        Some(url) => {
            check_endpoint(url).map_err(|_| {
                super::bad_input(format!(
                    "--advertise {url:?}: give http://HOST:PORT where the other managers \
                     reach this one, e.g. http://10.0.0.1:7080"
                ))
            })?;
            Ok(url.trim_end_matches('/').to_owned())
        }
        None if listen.ip().is_unspecified() || listen.port() == 0 => {
            Err(super::bad_input(format!(
                "--listen {listen} names no single address other managers could use: \
                 give --advertise http://HOST:PORT"
            )))
        }
        None => Ok(format!("http://{listen}")),
    }
}

pub fn run(o: Options) -> anyhow::Result<()> {
    for e in &o.etcd {
        check_endpoint(e).map_err(|err| super::bad_input(format!("--etcd: {err}")))?;
    }
    let me = advertise_url(o.advertise.as_deref(), o.listen)?;
    let leadership = Arc::new(Leadership::new(me.clone()));
    let store = EtcdStore::open(&o.etcd, PREFIX, leadership.clone())?;
    let manager = Arc::new(
        Manager::open(Box::new(store), system_clock())
            .with_context(|| format!("reading the state from etcd at {}", o.etcd.join(",")))?,
    );
    let agents = Arc::new(HttpConnector::new(&o.agent_token, o.agent_timeout));
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
        eprintln!(
            "tern manager: API on http://{} (advertised as {me}), state in etcd at {}; \
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
        forward::run(
            listener, manager, control, o.tokens, leadership, election, stop,
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
            advertise_url(None, at("10.0.0.1:7080")).unwrap(),
            "http://10.0.0.1:7080"
        );
        assert_eq!(
            advertise_url(Some("http://m1:7080/"), at("0.0.0.0:7080")).unwrap(),
            "http://m1:7080"
        );
        for (given, listen) in [
            (None, "0.0.0.0:7080"),
            (None, "127.0.0.1:0"),
            (Some("m1:7080"), "10.0.0.1:7080"),
        ] {
            let err = advertise_url(given, at(listen)).unwrap_err();
            assert_eq!(super::super::exit_code(&err), 2, "{err}");
        }
    }
}
