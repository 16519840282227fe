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
}

/// Serves plain HTTP with the default limits; see [`serve_with`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    serve_with(listener, state, Serving::default(), shutdown).await
}

/// Serves until `shutdown` resolves, sampling VM load meanwhile. On the way out the
/// host's VMs are destroyed: their QEMUs are this agent's children and a host without
/// its agent cannot be managed.
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
    for vm in state.hv.list().await.unwrap_or_default() {
        if let Err(e) = state.destroy_vm(&vm.id).await {
            tracing::warn!(vm = %vm.id, error = %e, "could not destroy VM at shutdown");
        }
    }
    served
}
