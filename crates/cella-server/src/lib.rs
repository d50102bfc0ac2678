//! cella's HTTP front: E2B's REST API and the sandbox proxy on one listener.
//!
//! Routing happens before anything else: a request that names a sandbox (the
//! `E2b-Sandbox-Id` header, or a Host of the form `<port>-<sandboxID>.<domain>`) is forwarded
//! into that sandbox ([`proxy`]); every other request is the REST API ([`rest`]). Handlers only
//! parse, authenticate and hand a typed command to [`cella_core::manager::Manager`].

pub mod error;
pub mod proxy;
pub mod rest;
pub mod upstream;

use std::sync::Arc;

use axum::Router;
use cella_core::manager::Manager;

/// Shared state of all handlers.
#[derive(Clone)]
pub struct AppState {
    /// The sandbox manager.
    pub manager: Arc<Manager>,
    /// Connection pool and dialer for proxied requests.
    pub proxy: proxy::ProxyClient,
}

impl AppState {
    /// State over a manager, with the default proxy settings.
    pub fn new(manager: Arc<Manager>) -> AppState {
        AppState::with_port_grace(manager, proxy::DEFAULT_PORT_GRACE)
    }

    /// State whose proxy waits up to `grace` for a port of a young sandbox to open.
    pub fn with_port_grace(manager: Arc<Manager>, grace: std::time::Duration) -> AppState {
        AppState {
            proxy: proxy::ProxyClient::new(manager.clone(), grace),
            manager,
        }
    }
}

/// The whole HTTP application: proxy routing in front of the REST router.
pub fn app(state: AppState) -> Router {
    rest::router(state.clone()).layer(axum::middleware::from_fn_with_state(
        state,
        proxy::route_or_next,
    ))
}

/// Record a metrics sample of every live sandbox every `interval`, for the time series that
/// `GET /sandboxes/{id}/metrics` answers. Runs until the returned task is aborted.
pub fn spawn_metrics_sampler(
    state: AppState,
    interval: std::time::Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let ids = state.manager.live_ids();
            let samples = ids.into_iter().map(|id| {
                let state = state.clone();
                async move {
                    let disk = state.proxy.agent_disk_used(&id).await;
                    // A sandbox that went away meanwhile has nothing to record.
                    let _ = state.manager.record_metrics(&id, disk);
                }
            });
            futures::future::join_all(samples).await;
        }
    })
}

/// Serve `app(state)` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Proxied streams carry small frames; never let Nagle hold them back.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
