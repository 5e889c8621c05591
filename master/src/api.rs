//! The network edges: the `corral.v1.Scheduler` and `corral.v1.AgentService` gRPC services and the operator HTTP
//! endpoints, all on one port. Handlers only translate requests into [`Command`]s for the master actor; they hold
//! no state of their own.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use corral_proto::v1::{self, agent_service_server, scheduler_server};
use futures::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::master::{Call, Command};

/// A cloneable handle to the master actor.
#[derive(Clone)]
pub struct MasterHandle {
    tx: mpsc::UnboundedSender<Command>,
    next_conn: Arc<AtomicU64>,
}

impl MasterHandle {
    pub fn new(tx: mpsc::UnboundedSender<Command>) -> Self {
        MasterHandle { tx, next_conn: Arc::new(AtomicU64::new(1)) }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| Status::unavailable("master is shutting down"))?;
        rx.await.map_err(|_| Status::unavailable("master is shutting down"))
    }

    async fn call(&self, header: Option<v1::CallHeader>, call: Call) -> Result<Response<v1::Empty>, Status> {
        self.ask(|reply| Command::Call { header, call, reply }).await??;
        Ok(Response::new(v1::Empty {}))
    }

    /// The master's `/state` document.
    pub async fn state(&self) -> Result<serde_json::Value, Status> {
        self.ask(|reply| Command::State { reply }).await
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;
type MasterMessageStream = Pin<Box<dyn Stream<Item = Result<v1::MasterMessage, Status>> + Send>>;

#[tonic::async_trait]
impl scheduler_server::Scheduler for MasterHandle {
    type SubscribeStream = EventStream;

    async fn subscribe(&self, request: Request<v1::SubscribeRequest>) -> Result<Response<EventStream>, Status> {
        let info = request
            .into_inner()
            .framework_info
            .ok_or_else(|| Status::invalid_argument("SUBSCRIBE: framework_info is required"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.ask(|reply| Command::Subscribe { info, tx, reply }).await??;
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }

    async fn accept(&self, r: Request<v1::AcceptRequest>) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        self.call(r.header.clone(), Call::Accept(r)).await
    }
    async fn decline(&self, r: Request<v1::DeclineRequest>) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        self.call(r.header.clone(), Call::Decline(r)).await
    }
    async fn revive(&self, r: Request<v1::ReviveRequest>) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        self.call(r.header.clone(), Call::Revive(r)).await
    }
    async fn suppress(&self, r: Request<v1::SuppressRequest>) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        self.call(r.header.clone(), Call::Suppress(r)).await
    }
    async fn kill(&self, r: Request<v1::KillRequest>) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        self.call(r.header.clone(), Call::Kill(r)).await
    }
    async fn acknowledge(&self, r: Request<v1::AcknowledgeRequest>) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        self.call(r.header.clone(), Call::Acknowledge(r)).await
    }
    async fn reconcile(&self, r: Request<v1::ReconcileRequest>) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        self.call(r.header.clone(), Call::Reconcile(r)).await
    }
    async fn message(&self, r: Request<v1::MessageRequest>) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        self.call(r.header.clone(), Call::Message(r)).await
    }
    async fn teardown(&self, r: Request<v1::TeardownRequest>) -> Result<Response<v1::Empty>, Status> {
        self.call(r.into_inner().header, Call::Teardown).await
    }
    async fn update_framework(&self, r: Request<v1::UpdateFrameworkRequest>) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        self.call(r.header.clone(), Call::UpdateFramework(r)).await
    }
}

#[tonic::async_trait]
impl agent_service_server::AgentService for MasterHandle {
    type SessionStream = MasterMessageStream;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<MasterMessageStream>, Status> {
        let mut inbound = request.into_inner();
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let master = self.tx.clone();
        tokio::spawn(async move {
            while let Some(message) = inbound.next().await {
                match message {
                    Ok(message) => {
                        if master.send(Command::AgentMessage { conn, message, tx: tx.clone() }).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(conn, "agent stream error: {e}");
                        break;
                    }
                }
            }
            let _ = master.send(Command::AgentClosed { conn });
        });
        Ok(Response::new(Box::pin(UnboundedReceiverStream::new(rx))))
    }
}

/// The operator HTTP routes.
pub fn http_router(handle: MasterHandle) -> axum::Router {
    axum::Router::new()
        .route("/health", axum::routing::get(health))
        .route("/state", axum::routing::get(state))
        .with_state(handle)
}

async fn health() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok", "version": corral_proto::VERSION}))
}

async fn state(State(handle): State<MasterHandle>) -> impl IntoResponse {
    match handle.state().await {
        Ok(state) => (StatusCode::OK, Json(state)),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({"error": e.message()}))),
    }
}

/// gRPC services and HTTP routes on one router (HTTP/2 for gRPC, HTTP/1.1 or 2 for the rest).
pub fn router(handle: MasterHandle) -> axum::Router {
    let grpc = tonic::service::Routes::new(scheduler_server::SchedulerServer::new(handle.clone()))
        .add_service(agent_service_server::AgentServiceServer::new(handle.clone()))
        .prepare()
        .into_axum_router();
    grpc.merge(http_router(handle))
}
