//! Serving the API: a bound listener and a shutdown future in, so tests bind port 0.
//! Connections go through `tern_pki::serve`: TLS when the agent has an identity, and
//! header-read and idle timeouts and a connection cap either way.

use crate::error::AgentError;
use crate::state::AppState;
use axum::extract::DefaultBodyLimit;
use axum::Router;
use std::future::Future;
use std::time::Duration;
use tern_pki::serve::{Limits, TlsAcceptor};

/// How often the load sampler measures the VMs.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The whole application: the VM API, the migration and trace endpoints, behind the token
/// check, reading request bodies up to [`crate::api::MAX_BODY_BYTES`].
pub fn app(state: AppState) -> Router {
    crate::api::router(state.clone())
        .merge(crate::migration::routes(state.clone()))
        .merge(crate::trace::routes(state.clone()))
        .merge(crate::vcpu::routes(state.clone()))
        .layer(DefaultBodyLimit::max(crate::api::MAX_BODY_BYTES))
        .with_state(state)
}

/// How connections are served.
#[derive(Clone, Default)]
pub struct Serving {
    /// TLS (mutual, with the cluster CA) when set; plain HTTP otherwise.
    pub tls: Option<TlsAcceptor>,
    pub limits: Limits,
    pub on_exit: OnExit,
}

/// What becomes of the host's VMs when the agent stops serving.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnExit {
    /// Destroy them: an agent in a test process, whose QEMUs would die with its driver
    /// anyway, or one told so (`tern agent --stop-vms-on-exit`).
    #[default]
    StopVms,
    /// Leave the guests running for the next agent to adopt, so restarting or upgrading
    /// the agent does not stop them. Migrations under way end first: outgoing ones are
    /// cancelled (the guest stays here), incoming copies that never ran are destroyed.
    KeepVms,
}

/// How long a stopping agent waits for its outgoing migrations to roll back.
pub const WIND_DOWN: Duration = Duration::from_secs(20);

/// Serves plain HTTP with the default limits; see [`serve_with`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    serve_with(listener, state, Serving::default(), shutdown).await
}

/// Serves until `shutdown` resolves, sampling VM load meanwhile. On the way out the
/// host's VMs are destroyed or left running, as `serving.on_exit` says.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AppState,
    serving: Serving,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let sampler = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tick.tick().await;
                if let Err(e) = state.sample_load().await {
                    tracing::warn!(error = %e, "load sample failed");
                }
            }
        })
    };
    let watcher = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(state.watch.every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                state.watch_guests().await;
            }
        })
    };
    let served = tern_pki::serve::serve(
        listener,
        app(state.clone()),
        serving.tls,
        serving.limits,
        shutdown,
    )
    .await
    .map_err(AgentError::io("serving HTTP"));
    sampler.abort();
    watcher.abort();
    match serving.on_exit {
        OnExit::StopVms => {
            for vm in state.hv.list().await.unwrap_or_default() {
                if let Err(e) = state.destroy_vm(&vm.id).await {
                    tracing::warn!(vm = %vm.id, error = %e, "could not destroy VM at shutdown");
                }
            }
        }
        OnExit::KeepVms => {
            end_migrations(&state, WIND_DOWN).await;
            let kept = state.hv.release().await;
            if !kept.is_empty() {
                eprintln!(
                    "tern agent: left {} VMs running for the next agent to adopt: {}",
                    kept.len(),
                    kept.join(" ")
                );
            }
        }
    }
    served
}

/// Cancels the outgoing migrations under way and waits up to `within` for them to roll
/// back, so no guest is left paused between two hosts; destroys the incoming copies that
/// never ran here (no agent would resume them, and the source keeps its guest).
async fn end_migrations(state: &AppState, within: Duration) {
    use std::sync::atomic::Ordering;
    let reg = &state.migrations;
    let outbound: Vec<_> = reg
        .outbound
        .lock()
        .expect("registry lock")
        .values()
        .filter(|o| !o.snapshot().phase.is_final())
        .cloned()
        .collect();
    for o in &outbound {
        o.cancel.store(true, Ordering::SeqCst);
    }
    let deadline = tokio::time::Instant::now() + within;
    while outbound.iter().any(|o| !o.snapshot().phase.is_final())
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let inbound: Vec<String> = reg
        .inbound
        .lock()
        .expect("registry lock")
        .iter()
        .filter(|(_, i)| !i.resumed.load(Ordering::SeqCst))
        .map(|(id, _)| id.clone())
        .collect();
    for id in inbound {
        if let Err(e) = crate::migration::dest::abort(state, reg, &id).await {
            tracing::warn!(migration = %id, error = %e, "could not end an incoming migration");
        }
    }
}
