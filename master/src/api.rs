//! The network edges: the `corral.v1.Scheduler` and `corral.v1.AgentService` gRPC services and the operator HTTP
//! endpoints, all on one port. Handlers only translate requests into [`Command`]s for the master actor; they hold
//! no state of their own.
//!
//! Whether this master leads is the [`Role`] the election publishes. A follower serves `/health` and its own
//! `/state`, refuses every gRPC call with UNAVAILABLE and the leader's address in the `corral-leader` metadata
//! (a session request first waits briefly for an election under way), and redirects every other HTTP request to
//! the leader (307, so writes keep their method and body).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request as HttpRequest, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response as HttpResponse};
use corral_discovery::{LEADER_METADATA, LEADER_TERM_METADATA, Leader};
use corral_proto::v1::{self, agent_service_server, scheduler_server};
use futures::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::allocator::Quota;
use crate::master::{Call, Command, OperatorError, Operation};
use crate::metrics::METRICS;
use corral_proto::{AgentId, FrameworkId, Resources};
use crate::state::{TaskFilter, View};

/// A cloneable handle to the master actor of the current leadership term.
#[derive(Clone)]
pub struct MasterHandle {
    tx: mpsc::UnboundedSender<Command>,
}

impl MasterHandle {
    pub fn new(tx: mpsc::UnboundedSender<Command>) -> Self {
        MasterHandle { tx }
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Status> {
        let stopped = || Status::unavailable("this master stopped leading; retry to find the leader");
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    async fn call(&self, header: Option<v1::CallHeader>, call: Call) -> Result<Response<v1::Empty>, Status> {
        self.ask(|reply| Command::Call { header, call, reply }).await??;
        Ok(Response::new(v1::Empty {}))
    }

    /// The master's `/state` document.
    pub async fn state(&self) -> Result<serde_json::Value, Status> {
        self.ask(|reply| Command::State { reply }).await
    }

    /// One part of the state.
    pub async fn view(&self, view: View) -> Result<serde_json::Value, Status> {
        self.ask(|reply| Command::View { view, reply }).await
    }

    /// A receiver of the events stream.
    async fn events(&self) -> Result<tokio::sync::broadcast::Receiver<serde_json::Value>, Status> {
        self.ask(|reply| Command::Events { reply }).await
    }

    /// Sets the state gauges of the metrics.
    async fn publish_metrics(&self) -> Result<(), Status> {
        self.ask(|reply| Command::PublishMetrics { reply }).await
    }

    /// An operator's write.
    pub async fn operate(&self, op: Operation) -> Result<Result<serde_json::Value, OperatorError>, Status> {
        self.ask(|reply| Command::Operate { op, reply }).await
    }
}

/// Whether this master leads, as the election last published it.
#[derive(Clone)]
pub enum Role {
    Leading(MasterHandle),
    /// Following this leader (None: none known yet).
    Following { leader: Option<Leader> },
}

/// What the network edges share: the current role and this master's own facts.
#[derive(Clone)]
pub struct Frontend {
    role: watch::Receiver<Role>,
    advertise: String,
    start_time: f64,
    next_conn: Arc<AtomicU64>,
}

impl Frontend {
    pub fn new(role: watch::Receiver<Role>, advertise: String) -> Self {
        Frontend { role, advertise, start_time: corral_proto::now_seconds(), next_conn: Arc::new(AtomicU64::new(1)) }
    }

    /// The leading actor, or UNAVAILABLE naming the leader.
    fn leader(&self) -> Result<MasterHandle, Status> {
        match &*self.role.borrow() {
            Role::Leading(handle) => Ok(handle.clone()),
            Role::Following { leader } => Err(not_leader(leader.as_ref())),
        }
    }

    /// Like [`Frontend::leader`], but while no leader is known (an election is under way) waits up to
    /// [`ELECTION_WAIT`] for one: a client opening a session learns the new leader (or is served, if this master
    /// wins) the moment it is elected, instead of pausing and polling. Ends early when this master shuts down.
    async fn leader_after_election(&self) -> Result<MasterHandle, Status> {
        let mut role = self.role.clone();
        let electing = |r: &Role| matches!(r, Role::Following { leader: None });
        let _ = tokio::time::timeout(ELECTION_WAIT, role.wait_for(|r| !electing(r))).await;
        self.leader()
    }

    fn is_leading(&self) -> bool {
        matches!(&*self.role.borrow(), Role::Leading(_))
    }

    fn leader_address(&self) -> Option<String> {
        match &*self.role.borrow() {
            Role::Leading(_) => Some(self.advertise.clone()),
            Role::Following { leader } => leader.as_ref().map(|l| l.addr.clone()),
        }
    }

    async fn call(&self, header: Option<v1::CallHeader>, call: Call) -> Result<Response<v1::Empty>, Status> {
        self.leader()?.call(header, call).await
    }
}

/// How long a session request waits at a master that knows no leader; well within clients' 3 s connect timeout.
const ELECTION_WAIT: Duration = Duration::from_secs(1);

/// A follower's refusal: UNAVAILABLE, with the leader's address in the message and in `corral-leader` metadata
/// (its term in `corral-leader-term`).
pub fn not_leader(leader: Option<&Leader>) -> Status {
    let Some(leader) = leader else {
        return Status::unavailable("this master is not the leader, and no leader is elected right now");
    };
    let mut status = Status::unavailable(format!("this master is not the leader; the leader is {}", leader.addr));
    if let Ok(value) = leader.addr.parse() {
        status.metadata_mut().insert(LEADER_METADATA, value);
    }
    status.metadata_mut().insert(LEADER_TERM_METADATA, leader.term.into());
    status
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::Event, Status>> + Send>>;
type MasterMessageStream = Pin<Box<dyn Stream<Item = Result<v1::MasterMessage, Status>> + Send>>;

#[tonic::async_trait]
impl scheduler_server::Scheduler for Frontend {
    type SubscribeStream = EventStream;

    async fn subscribe(&self, request: Request<v1::SubscribeRequest>) -> Result<Response<EventStream>, Status> {
        let info = request
            .into_inner()
            .framework_info
            .ok_or_else(|| Status::invalid_argument("SUBSCRIBE: framework_info is required"))?;
        let (tx, rx) = mpsc::unbounded_channel();
        self.leader_after_election().await?.ask(|reply| Command::Subscribe { info, tx, reply }).await??;
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
    async fn acknowledge_batch(&self, r: Request<v1::AcknowledgeBatchRequest>) -> Result<Response<v1::Empty>, Status> {
        let r = r.into_inner();
        self.call(r.header.clone(), Call::AcknowledgeBatch(r)).await
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
impl agent_service_server::AgentService for Frontend {
    type SessionStream = MasterMessageStream;

    async fn session(
        &self,
        request: Request<Streaming<v1::AgentMessage>>,
    ) -> Result<Response<MasterMessageStream>, Status> {
        let master = self.leader_after_election().await?.tx;
        let mut inbound = request.into_inner();
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
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
pub fn http_router(frontend: Frontend) -> axum::Router {
    axum::Router::new()
        .route("/health", axum::routing::get(health))
        .route("/state", axum::routing::get(state))
        .route("/metrics", axum::routing::get(metrics))
        .route("/state/agents", axum::routing::get(async |f: State<Frontend>| view(f, View::Agents).await))
        .route("/state/frameworks", axum::routing::get(async |f: State<Frontend>| view(f, View::Frameworks).await))
        .route("/state/roles", axum::routing::get(async |f: State<Frontend>| view(f, View::Roles).await))
        .route("/state/tasks", axum::routing::get(tasks))
        .route("/api/v1/roles/{role}/weight", axum::routing::put(set_weight))
        .route("/api/v1/roles/{role}/quota", axum::routing::put(set_quota).delete(remove_quota))
        .route("/api/v1/frameworks/{id}/teardown", axum::routing::post(teardown))
        .route("/api/v1/agents/{id}/drain", axum::routing::post(drain))
        .route("/api/v1/agents/{id}/up", axum::routing::post(up))
        .route("/api/v1/agents/{id}/reserve", axum::routing::post(async |f: State<Frontend>, p: Path<String>, b: Bytes| reserve(f, p, b, true).await))
        .route("/api/v1/agents/{id}/unreserve", axum::routing::post(async |f: State<Frontend>, p: Path<String>, b: Bytes| reserve(f, p, b, false).await))
        .route("/api/v1/events", axum::routing::get(events))
        .route("/api/v1/tasks/{task}/files/{file}", axum::routing::get(task_file))
        .route("/api/v1/tasks/{task}/kill", axum::routing::post(kill_task))
        .route("/", axum::routing::get(dashboard))
        .with_state(frontend)
}

/// Paths a follower answers itself; everything else is the leader's.
const FOLLOWER_PATHS: &[&str] = &["/", "/health", "/state", "/metrics"];

/// On a follower, sends every HTTP request but [`FOLLOWER_PATHS`] to the leader: 307 keeps the method and body.
/// (gRPC calls are refused by the services themselves, with the leader in their metadata.)
async fn redirect_to_leader(State(frontend): State<Frontend>, request: HttpRequest, next: Next) -> HttpResponse {
    let grpc = request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    if grpc || frontend.is_leading() || FOLLOWER_PATHS.contains(&request.uri().path())
    {
        return next.run(request).await;
    }
    match frontend.leader_address() {
        Some(leader) => {
            let path = request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let location = format!("http://{leader}{path}");
            (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, location)]).into_response()
        }
        None => error(StatusCode::SERVICE_UNAVAILABLE, "this master is not the leader, and no leader is elected right now"),
    }
}

fn error(code: StatusCode, message: &str) -> HttpResponse {
    (code, Json(serde_json::json!({"error": message}))).into_response()
}

/// An error naming the offending field: `{"error": "<field>: <message>", "field": "<field>"}`.
fn field_error(code: StatusCode, field: &str, message: &str) -> HttpResponse {
    (code, Json(serde_json::json!({"error": format!("{field}: {message}"), "field": field}))).into_response()
}

fn bad_field(field: &str, message: &str) -> HttpResponse {
    field_error(StatusCode::BAD_REQUEST, field, message)
}

async fn view(State(frontend): State<Frontend>, view: View) -> HttpResponse {
    let answer = async { frontend.leader()?.view(view).await };
    match answer.await {
        Ok(value) => Json(value).into_response(),
        // The term ended while we asked: the client retries and is sent to the new leader.
        Err(status) => error(StatusCode::SERVICE_UNAVAILABLE, status.message()),
    }
}

/// Sends an operator's write to the leader and answers with its result or a JSON error.
async fn operate(frontend: &Frontend, op: Result<Operation, OperatorError>) -> HttpResponse {
    let op = match op {
        Ok(op) => op,
        Err(e) => return operator_error(e),
    };
    match async { frontend.leader()?.operate(op).await }.await {
        Ok(Ok(value)) => Json(value).into_response(),
        Ok(Err(e)) => operator_error(e),
        Err(status) => error(StatusCode::SERVICE_UNAVAILABLE, status.message()),
    }
}

fn operator_error(e: OperatorError) -> HttpResponse {
    let code = StatusCode::from_u16(e.code).unwrap_or(StatusCode::BAD_REQUEST);
    match e.field {
        Some(field) => field_error(code, field, &e.message),
        None => error(code, &e.message),
    }
}

/// A write's JSON body as an object, or an error naming what is wrong with it.
fn json_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, OperatorError> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(other) => Err(OperatorError::bad("body", format!("expected a JSON object, got {other}"))),
        Err(e) => Err(OperatorError::bad("body", format!("malformed JSON: {e}"))),
    }
}

fn role_name(role: &str) -> Result<String, OperatorError> {
    corral_proto::resources::validate_role(role).map_err(|e| OperatorError::bad("role", e))?;
    Ok(role.to_string())
}

/// `PUT /api/v1/roles/{role}/weight` with `{"weight": 2.5}`.
async fn set_weight(State(frontend): State<Frontend>, Path(role): Path<String>, body: Bytes) -> HttpResponse {
    let op = (|| {
        let role = role_name(&role)?;
        let weight = json_object(&body)?
            .get("weight")
            .ok_or_else(|| OperatorError::bad("weight", "missing"))?
            .as_f64()
            .ok_or_else(|| OperatorError::bad("weight", "must be a number"))?;
        Ok(Operation::SetWeight { role, weight })
    })();
    operate(&frontend, op).await
}

/// `PUT /api/v1/roles/{role}/quota` with `{"guarantee": "cpus:2;mem:4096", "limit": "cpus:4;mem:8192"}` (either may
/// be left out: no guarantee, no limit).
async fn set_quota(State(frontend): State<Frontend>, Path(role): Path<String>, body: Bytes) -> HttpResponse {
    let op = (|| {
        let role = role_name(&role)?;
        let body = json_object(&body)?;
        if let Some(unknown) = body.keys().find(|k| !matches!(k.as_str(), "guarantee" | "limit")) {
            return Err(OperatorError::bad("body", format!("unknown field {unknown:?}; use guarantee and limit")));
        }
        let resources = |field: &'static str| -> Result<Resources, OperatorError> {
            match body.get(field) {
                None | Some(serde_json::Value::Null) => Ok(Resources::new()),
                Some(serde_json::Value::String(text)) => Resources::parse(text).map_err(|e| OperatorError::bad(field, e.to_string())),
                Some(other) => Err(OperatorError::bad(field, format!("must be a resource string like \"cpus:2;mem:1024\", not {other}"))),
            }
        };
        let quota = Quota { guarantee: resources("guarantee")?, limit: resources("limit")? };
        Ok(Operation::SetQuota { role, quota })
    })();
    operate(&frontend, op).await
}

/// `DELETE /api/v1/roles/{role}/quota`.
async fn remove_quota(State(frontend): State<Frontend>, Path(role): Path<String>) -> HttpResponse {
    operate(&frontend, role_name(&role).map(|role| Operation::RemoveQuota { role })).await
}

fn agent_id(id: String) -> Result<AgentId, OperatorError> {
    AgentId::new(id).map_err(|e| OperatorError::bad("agent", e.to_string()))
}

/// `POST /api/v1/agents/{id}/drain` with optional `{"deadline_seconds": 60}` (default 0): no new offers on the
/// agent; its tasks are killed when the deadline passes. Until `up`, across restarts and failovers.
async fn drain(State(frontend): State<Frontend>, Path(id): Path<String>, body: Bytes) -> HttpResponse {
    let op = (|| {
        let agent = agent_id(id)?;
        let deadline_seconds = if body.iter().all(u8::is_ascii_whitespace) {
            0.0
        } else {
            match json_object(&body)?.get("deadline_seconds") {
                None => 0.0,
                Some(v) => v.as_f64().ok_or_else(|| OperatorError::bad("deadline_seconds", "must be a number of seconds"))?,
            }
        };
        Ok(Operation::Drain { agent, deadline_seconds })
    })();
    operate(&frontend, op).await
}

/// `POST /api/v1/agents/{id}/up`: ends a drain.
async fn up(State(frontend): State<Frontend>, Path(id): Path<String>) -> HttpResponse {
    operate(&frontend, agent_id(id).map(|agent| Operation::Up { agent })).await
}

/// `POST /api/v1/agents/{id}/reserve` (or `/unreserve`) with `{"resources": "cpus(analytics):2;mem(analytics):1024"}`.
async fn reserve(State(frontend): State<Frontend>, Path(id): Path<String>, body: Bytes, reserve: bool) -> HttpResponse {
    let op = (|| {
        let agent = agent_id(id)?;
        let text = match json_object(&body)?.get("resources") {
            Some(serde_json::Value::String(text)) => text.clone(),
            Some(_) => return Err(OperatorError::bad("resources", "must be a resource string like \"cpus(analytics):2\"")),
            None => return Err(OperatorError::bad("resources", "missing")),
        };
        let resources = Resources::parse(&text).map_err(|e| OperatorError::bad("resources", e.to_string()))?;
        Ok(if reserve { Operation::Reserve { agent, resources } } else { Operation::Unreserve { agent, resources } })
    })();
    operate(&frontend, op).await
}

/// `POST /api/v1/tasks/{task}/kill` with `{"framework": "…", "grace_seconds": 5}` (grace optional).
async fn kill_task(State(frontend): State<Frontend>, Path(task): Path<String>, body: Bytes) -> HttpResponse {
    let op = (|| {
        let task = corral_proto::TaskId::new(task).map_err(|e| OperatorError::bad("task", e.to_string()))?;
        let body = json_object(&body)?;
        let framework = match body.get("framework") {
            Some(serde_json::Value::String(id)) => FrameworkId::new(id.as_str()).map_err(|e| OperatorError::bad("framework", e.to_string()))?,
            _ => return Err(OperatorError::bad("framework", "missing: the id of the task's framework")),
        };
        let grace_seconds = match body.get("grace_seconds") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(v.as_f64().ok_or_else(|| OperatorError::bad("grace_seconds", "must be a number"))?),
        };
        Ok(Operation::KillTask { framework, task, grace_seconds })
    })();
    operate(&frontend, op).await
}

/// `POST /api/v1/frameworks/{id}/teardown`: kills the framework's tasks and removes it.
async fn teardown(State(frontend): State<Frontend>, Path(id): Path<String>) -> HttpResponse {
    let op = FrameworkId::new(id).map_err(|e| OperatorError::bad("framework", e.to_string()));
    operate(&frontend, op.map(|framework| Operation::Teardown { framework })).await
}

/// `/state/tasks?state=&framework=&agent=&offset=&limit=`: one page of the matching tasks and their total.
async fn tasks(frontend: State<Frontend>, RawQuery(query): RawQuery) -> HttpResponse {
    let params: Vec<(String, String)> = match serde_urlencoded::from_str(query.as_deref().unwrap_or("")) {
        Ok(params) => params,
        Err(e) => return error(StatusCode::BAD_REQUEST, &format!("malformed query string: {e}")),
    };
    match TaskFilter::parse(params.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        Ok(filter) => view(frontend, View::Tasks(filter)).await,
        Err((field, message)) => bad_field(&field, &message),
    }
}

/// `GET /api/v1/events`: Server-Sent Events of task, agent and framework changes, in the order they happened.
/// Each event is named by its type (`SUBSCRIBED` first, then `TASK_UPDATED`, `AGENT_UPDATED`, `FRAMEWORK_ADDED`,
/// `FRAMEWORK_UPDATED`, `FRAMEWORK_REMOVED`) and carries JSON. A subscriber that falls thousands of events behind
/// gets one `LAGGED` event saying how many it missed (re-read `/state`). The stream ends when the term does.
async fn events(State(frontend): State<Frontend>) -> HttpResponse {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio_stream::wrappers::BroadcastStream;
    use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
    let rx = match async { frontend.leader()?.events().await }.await {
        Ok(rx) => rx,
        Err(status) => return error(StatusCode::SERVICE_UNAVAILABLE, status.message()),
    };
    let hello = serde_json::json!({"type": "SUBSCRIBED", "leader": frontend.advertise});
    let stream = tokio_stream::once(Ok(hello)).chain(BroadcastStream::new(rx)).map(|item| {
        let event = match item {
            Ok(value) => Event::default().event(value["type"].as_str().unwrap_or("EVENT")).data(value.to_string()),
            Err(BroadcastStreamRecvError::Lagged(missed)) => {
                Event::default().event("LAGGED").data(serde_json::json!({"type": "LAGGED", "missed": missed}).to_string())
            }
        };
        Ok::<_, std::convert::Infallible>(event)
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// The web dashboard: one page, embedded in the binary, that reads the API (and follows `/api/v1/events`).
async fn dashboard() -> HttpResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("dashboard.html")).into_response()
}

/// `GET /api/v1/tasks/{task}/files/{stdout|stderr}?framework=…&offset=…&length=…`: a chunk of a task's output, read
/// from its agent's sandbox (`{"data": "...", "offset": N}`, `offset=-1` gives the size), so a browser needs to
/// reach only the master.
async fn task_file(frontend: State<Frontend>, Path((task, file)): Path<(String, String)>, RawQuery(query): RawQuery) -> HttpResponse {
    if !matches!(file.as_str(), "stdout" | "stderr") {
        return bad_field("file", &format!("{file:?} is not stdout or stderr"));
    }
    let params: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
    let param = |name: &str| params.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let framework = match param("framework").map(FrameworkId::new) {
        Some(Ok(id)) => id,
        Some(Err(e)) => return bad_field("framework", &e.to_string()),
        None => return bad_field("framework", "missing"),
    };
    let (offset, length) = (param("offset").unwrap_or_else(|| "0".into()), param("length").unwrap_or_else(|| "65536".into()));
    if offset.parse::<i64>().is_err() || length.parse::<u64>().is_err() {
        return bad_field("offset", "offset and length must be whole numbers");
    }
    let handle = match frontend.leader() {
        Ok(h) => h,
        Err(status) => return error(StatusCode::SERVICE_UNAVAILABLE, status.message()),
    };
    let unknown = || error(StatusCode::NOT_FOUND, &format!("task {task} of framework {framework} is not known"));
    let Ok(task_id) = corral_proto::TaskId::new(task.as_str()) else { return unknown() };
    let agent = match handle.view(View::TaskAgent { framework: framework.clone(), task: task_id }).await {
        Ok(agent) if agent.is_null() => return unknown(),
        Ok(agent) => agent,
        Err(_) => return error(StatusCode::SERVICE_UNAVAILABLE, "this master stopped leading"),
    };
    let base = format!("http://{}:{}", agent["hostname"].as_str().unwrap_or_default(), agent["port"]);
    match read_from_agent(&base, framework.as_str(), &task, &file, &offset, &length).await {
        Ok((code, body)) => (StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY), Json(body)).into_response(),
        Err(e) => error(StatusCode::BAD_GATEWAY, &format!("cannot reach agent {base}: {e}")),
    }
}

/// Finds the task's sandbox in the agent's `/state` and reads `file` there through its `/files/read`.
async fn read_from_agent(base: &str, framework: &str, task: &str, file: &str, offset: &str, length: &str)
    -> Result<(u16, serde_json::Value), reqwest::Error> {
    static CLIENT: std::sync::LazyLock<reqwest::Client> = std::sync::LazyLock::new(|| {
        reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("an HTTP client")
    });
    let state: serde_json::Value = CLIENT.get(format!("{base}/state")).send().await?.json().await?;
    let sandbox = ["tasks", "completed_tasks"]
        .iter()
        .flat_map(|k| state[*k].as_array().cloned().unwrap_or_default())
        .filter(|t| t["id"] == task && t["framework_id"] == framework)
        .filter_map(|t| t["sandbox"].as_str().map(str::to_string))
        .next_back();
    let Some(sandbox) = sandbox else {
        return Ok((404, serde_json::json!({"error": format!("the agent no longer has task {task}'s sandbox")})));
    };
    let path = format!("{sandbox}/{file}");
    let response = CLIENT
        .get(format!("{base}/files/read"))
        .query(&[("path", path.as_str()), ("offset", offset), ("length", length)])
        .send()
        .await?;
    let code = response.status().as_u16();
    Ok((code, response.json().await?))
}

/// `GET /metrics`: Prometheus (OpenMetrics text). Every master answers; state gauges come from the leader only.
async fn metrics(State(frontend): State<Frontend>) -> HttpResponse {
    let leading = match frontend.leader() {
        Ok(handle) => handle.publish_metrics().await.is_ok(),
        Err(_) => false,
    };
    if !leading {
        METRICS.clear_state();
    }
    METRICS.is_leader.set(i64::from(leading));
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], METRICS.encode()).into_response()
}

async fn health(State(frontend): State<Frontend>) -> impl IntoResponse {
    Json(serde_json::json!({
        "status": "ok",
        "version": corral_proto::VERSION,
        "is_leader": frontend.is_leading(),
        "leader": frontend.leader_address(),
    }))
}

async fn state(State(frontend): State<Frontend>) -> HttpResponse {
    // (If the term ends while we ask, answer as the follower this master now is.)
    if let Ok(handle) = frontend.leader()
        && let Ok(state) = handle.state().await
    {
        return Json(state).into_response();
    }
    let term = match &*frontend.role.borrow() {
        Role::Following { leader: Some(leader) } => Some(leader.term),
        _ => None,
    };
    Json(serde_json::json!({
        "version": corral_proto::VERSION,
        "address": frontend.advertise,
        "leader": frontend.leader_address(),
        "leader_term": term,
        "is_leader": false,
        "start_time": frontend.start_time,
    }))
    .into_response()
}

/// gRPC services and HTTP routes on one router (HTTP/2 for gRPC, HTTP/1.1 or 2 for the rest).
pub fn router(frontend: Frontend) -> axum::Router {
    let grpc = tonic::service::Routes::new(scheduler_server::SchedulerServer::new(frontend.clone()))
        .add_service(agent_service_server::AgentServiceServer::new(frontend.clone()))
        .prepare()
        .into_axum_router();
    grpc.merge(http_router(frontend.clone()))
        .layer(axum::middleware::from_fn_with_state(frontend, redirect_to_leader))
}
