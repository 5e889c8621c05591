//! corral-master: the leader that owns the cluster's view.
//!
//! * [`allocator`] — pure DRF allocation (no I/O);
//! * [`registry`] — durable storage of frameworks, agents and weights (file or etcd);
//! * [`election`] — leader election and the leadership lease, as a pure state machine;
//! * [`ha`] — the etcd side of the election: lease, campaign, terms;
//! * [`master`] — the state machine and its actor loop (one actor per leadership term);
//! * [`api`] — gRPC services and operator HTTP, which only talk to the actor (or refuse, on a follower);
//! * `state` — the `/state` JSON document.

pub mod allocator;
pub mod api;
pub mod election;
pub mod ha;
pub mod master;
pub mod metrics;
pub mod registry;
mod state;

use std::net::SocketAddr;

use axum::serve::ListenerExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::{Frontend, MasterHandle, Role};
use crate::election::Leadership;
pub use master::MasterConfig;

/// Where the master keeps its registry, which also decides how it comes to lead.
pub enum Backend {
    /// A single master with a local registry: it leads from the start.
    Alone(Box<dyn registry::Registry>),
    /// Replicated masters electing a leader in etcd.
    Etcd(ha::HaConfig),
}

/// Serves gRPC and HTTP on `listener` until `shutdown` resolves; leads alone or contends in etcd.
pub async fn serve(
    config: MasterConfig,
    backend: Backend,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (role_tx, role_rx) = watch::channel(Role::Following { leader: None });
    let app = api::router(Frontend::new(role_rx, config.advertise.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let control = tokio::spawn(async move {
        match backend {
            Backend::Alone(registry) => lead_alone(config, registry, role_tx, stop_rx).await,
            Backend::Etcd(ha) => ha::contend(config, ha, role_tx, stop_rx).await,
        }
    });
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // gRPC messages are small and latency-bound: without TCP_NODELAY, Nagle's algorithm and delayed ACKs add
    // ~40 ms stalls to request/response round trips (measured: accept -> RUNNING p50 88 ms before, see bench).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let (result_tx, result_rx) = tokio::sync::oneshot::channel();
    axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move {
            // The server stops once leadership is given up (streams dropped, election resigned), or failed.
            let result = control.await.unwrap_or_else(|e| Err(anyhow::anyhow!("leadership task failed: {e}")));
            let _ = result_tx.send(result);
        })
        .await?;
    result_rx.await.unwrap_or(Ok(()))
}

async fn lead_alone(
    config: MasterConfig,
    registry: Box<dyn registry::Registry>,
    role: watch::Sender<Role>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let term = Term::start(config, registry, Leadership::forever()).await?;
    let _ = role.send(Role::Leading(term.handle()));
    let _ = stop.wait_for(|stop| *stop).await;
    let _ = role.send(Role::Following { leader: None });
    term.stop().await;
    Ok(())
}

/// One leadership term: a master actor recovered from the registry.
pub(crate) struct Term {
    tx: mpsc::UnboundedSender<master::Command>,
    join: JoinHandle<()>,
}

impl Term {
    pub(crate) async fn start(
        config: MasterConfig,
        registry: Box<dyn registry::Registry>,
        leadership: Leadership,
    ) -> anyhow::Result<Term> {
        let (tx, rx) = mpsc::unbounded_channel();
        let master = master::Master::recover(config, registry, tx.clone(), leadership).await?;
        Ok(Term { tx, join: tokio::spawn(master.run(rx)) })
    }

    pub(crate) fn handle(&self) -> MasterHandle {
        MasterHandle::new(self.tx.clone())
    }

    /// Resolves when the actor stopped on its own (deposed).
    pub(crate) async fn stopped(&mut self) {
        let _ = (&mut self.join).await;
    }

    /// Ends the term: the actor drops every stream and stops.
    pub(crate) async fn stop(self) {
        let _ = self.tx.send(master::Command::Stop);
        let _ = self.join.await;
    }
}
