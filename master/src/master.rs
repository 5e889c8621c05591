//! The master's state machine and its event loop.
//!
//! One actor task owns all state ([`Master`]); the gRPC and HTTP edges send it [`Command`]s and await replies, so no
//! state is shared or locked. Time enters only through `Instant::now()` at the top of each handler and the periodic
//! tick; the allocation policy itself lives in [`crate::allocator`] and is pure.
//!
//! Protocol duties enforced here:
//! * every unary scheduler call must name the framework's current stream (a stale or foreign caller is refused);
//! * a framework can only launch on its own outstanding offers, within the offered resources, and can only kill,
//!   acknowledge or reconcile its own tasks;
//! * status updates are applied once per uuid (a repeat of the latest) but forwarded on every retry; acknowledgements are relayed to the
//!   agent that owns the update; updates for frameworks that no longer exist are acknowledged by the master so
//!   agents stop retrying them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use corral_proto::v1::{self, event, master_message, operation};
use corral_proto::v1::{StatusReason, StatusSource, TaskState};
use corral_proto::{AgentId, FrameworkId, OfferId, Resources, TaskId, now_seconds};
use tokio::sync::{broadcast, mpsc, oneshot};
use tonic::Status;
use tracing::{debug, info, warn};

use crate::allocator::{Allocation, Allocator, AllocatorConfig, Quota};
use crate::election::Leadership;
use crate::metrics::METRICS;
use crate::registry::{AgentRecord, Change, FrameworkRecord, QuotaRecord, Registry, RegistryError};

/// Where a framework's events go (the server side of its Subscribe stream).
pub type EventSender = mpsc::UnboundedSender<Result<v1::Event, Status>>;
/// Where an agent's messages go (the server side of its Session stream).
pub type AgentSender = mpsc::UnboundedSender<Result<v1::MasterMessage, Status>>;

/// Default `refuse_seconds` for declined and unused offer resources (as in Mesos).
const DEFAULT_REFUSE_SECONDS: f64 = 5.0;
/// How many completed tasks each framework keeps for `/state`.
const MAX_COMPLETED_TASKS: usize = 1000;
/// How many torn-down frameworks `/state` shows.
const MAX_COMPLETED_FRAMEWORKS: usize = 50;
/// The longest failover timeout or refuse period accepted (one year), so `Instant` arithmetic cannot overflow.
const MAX_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

/// Master settings.
#[derive(Debug, Clone)]
pub struct MasterConfig {
    /// `host:port` other components reach this master at.
    pub advertise: String,
    /// An agent silent this long is UNREACHABLE.
    pub agent_ping_timeout: Duration,
    /// How often agents send heartbeats.
    pub agent_heartbeat_interval: Duration,
    /// After a master restart, how long agents from the registry have to re-register.
    pub agent_reregister_timeout: Duration,
    /// Outstanding offers are rescinded after this long (none: never).
    pub offer_timeout: Option<Duration>,
    /// How often frameworks get a HEARTBEAT event.
    pub framework_heartbeat_interval: Duration,
    /// Period of the housekeeping tick (timeouts, filter expiry, allocation).
    pub tick: Duration,
    /// Role weights given on the command line.
    pub weights: Vec<(String, f64)>,
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            advertise: "127.0.0.1:5050".into(),
            agent_ping_timeout: Duration::from_secs(15),
            agent_heartbeat_interval: Duration::from_secs(1),
            agent_reregister_timeout: Duration::from_secs(120),
            offer_timeout: Some(Duration::from_secs(60)),
            framework_heartbeat_interval: Duration::from_secs(5),
            tick: Duration::from_millis(100),
            weights: Vec::new(),
        }
    }
}

/// A request to the master actor.
pub enum Command {
    Subscribe { info: v1::FrameworkInfo, tx: EventSender, reply: oneshot::Sender<Result<(), Status>> },
    FrameworkClosed { framework_id: FrameworkId, stream_id: String },
    Call { header: Option<v1::CallHeader>, call: Call, reply: oneshot::Sender<Result<(), Status>> },
    AgentMessage { conn: u64, message: v1::AgentMessage, tx: AgentSender },
    AgentClosed { conn: u64 },
    State { reply: oneshot::Sender<serde_json::Value> },
    /// One part of the state (`/state/agents`, …).
    View { view: crate::state::View, reply: oneshot::Sender<serde_json::Value> },
    /// A receiver of the `/api/v1/events` stream.
    Events { reply: oneshot::Sender<broadcast::Receiver<serde_json::Value>> },
    /// Set the state gauges of [`METRICS`] (before a scrape).
    PublishMetrics { reply: oneshot::Sender<()> },
    /// An operator's write (`/api/v1/…`).
    Operate { op: Operation, reply: oneshot::Sender<Result<serde_json::Value, OperatorError>> },
    /// End the term: drop every stream and stop.
    Stop,
}

/// An operator's write through `/api/v1`; the edge has parsed it, the actor validates it against the state.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    SetWeight { role: String, weight: f64 },
    SetQuota { role: String, quota: Quota },
    RemoveQuota { role: String },
    Teardown { framework: FrameworkId },
    /// No new offers on the agent; its tasks are killed after `deadline_seconds`.
    Drain { agent: AgentId, deadline_seconds: f64 },
    /// End a drain: the agent's resources are offered again.
    Up { agent: AgentId },
    /// Reserve unreserved, unused resources of an agent for roles (`cpus(analytics):2`), or give them back.
    Reserve { agent: AgentId, resources: Resources },
    Unreserve { agent: AgentId, resources: Resources },
    /// Kill a task on the operator's behalf (its framework gets the updates as usual).
    KillTask { framework: FrameworkId, task: TaskId, grace_seconds: Option<f64> },
}

/// Why an operator write was refused: the HTTP status, what is wrong, and the request field at fault.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorError {
    pub code: u16,
    pub message: String,
    pub field: Option<&'static str>,
}

impl OperatorError {
    pub fn bad(field: &'static str, message: impl Into<String>) -> Self {
        OperatorError { code: 400, message: message.into(), field: Some(field) }
    }

    fn unavailable(status: Status) -> Self {
        OperatorError { code: 503, message: status.message().to_string(), field: None }
    }
}

/// A unary scheduler call.
pub enum Call {
    Accept(v1::AcceptRequest),
    Decline(v1::DeclineRequest),
    Revive(v1::ReviveRequest),
    Suppress(v1::SuppressRequest),
    Kill(v1::KillRequest),
    Acknowledge(v1::AcknowledgeRequest),
    AcknowledgeBatch(v1::AcknowledgeBatchRequest),
    Reconcile(v1::ReconcileRequest),
    Message(v1::MessageRequest),
    Teardown,
    UpdateFramework(v1::UpdateFrameworkRequest),
}

impl Call {
    fn name(&self) -> &'static str {
        match self {
            Call::Accept(_) => "ACCEPT",
            Call::Decline(_) => "DECLINE",
            Call::Revive(_) => "REVIVE",
            Call::Suppress(_) => "SUPPRESS",
            Call::Kill(_) => "KILL",
            Call::Acknowledge(_) => "ACKNOWLEDGE",
            Call::AcknowledgeBatch(_) => "ACKNOWLEDGE_BATCH",
            Call::Reconcile(_) => "RECONCILE",
            Call::Message(_) => "MESSAGE",
            Call::Teardown => "TEARDOWN",
            Call::UpdateFramework(_) => "UPDATE_FRAMEWORK",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AgentState {
    /// Known from the registry after a master restart, not re-registered yet.
    Recovering,
    Registered,
    /// Its stream dropped; offers stop, tasks keep running until the ping timeout.
    Disconnected,
    Unreachable,
}

impl AgentState {
    /// The name `/state` and the metrics use, e.g. `REGISTERED`.
    pub fn name(self) -> &'static str {
        match self {
            AgentState::Recovering => "RECOVERING",
            AgentState::Registered => "REGISTERED",
            AgentState::Disconnected => "DISCONNECTED",
            AgentState::Unreachable => "UNREACHABLE",
        }
    }
}

pub(crate) struct Agent {
    pub info: v1::AgentInfo,
    pub total: Resources,
    pub state: AgentState,
    pub conn: Option<(u64, AgentSender)>,
    pub last_seen: Instant,
    pub registered_time: f64,
    pub tasks: HashSet<(FrameworkId, TaskId)>,
    pub usage: HashMap<(String, String), v1::resource_usage::TaskUsage>,
}

/// What the master keeps of a task: the agent holds its TaskInfo (command, health check, …), so the master keeps only
/// what it tracks and shows. At a million tasks every field here costs megabytes.
pub(crate) struct Task {
    pub id: TaskId,
    /// `None` when the name is the task id (the common case).
    name: Option<String>,
    pub agent_id: AgentId,
    pub resources: Resources,
    pub role: String,
    pub state: TaskState,
    pub status: Option<v1::TaskStatus>,
    /// (state, timestamp) history.
    pub statuses: Vec<(TaskState, f64)>,
    /// A kill that could not be delivered yet (agent disconnected), with its grace override.
    kill_pending: Option<Option<f64>>,
    /// Whether the framework acknowledged `status` (true when it needs none).
    acked: bool,
}

impl Task {
    fn name_unless_id(info: &v1::TaskInfo) -> Option<String> {
        (!info.name.is_empty() && info.name != info.task_id).then(|| info.name.clone())
    }

    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(self.id.as_str())
    }
}

pub(crate) struct Framework {
    pub info: v1::FrameworkInfo,
    pub conn: Option<(String, EventSender)>,
    pub disconnected_at: Option<Instant>,
    pub registered_time: f64,
    pub tasks: BTreeMap<TaskId, Task>,
    pub completed_tasks: VecDeque<Task>,
    pub offers: HashSet<OfferId>,
}

pub(crate) struct OfferEntry {
    pub framework_id: FrameworkId,
    pub agent_id: AgentId,
    pub role: String,
    pub resources: Resources,
    expires: Option<Instant>,
}

/// The master's whole state. Mutated only by the actor loop.
pub struct Master {
    pub(crate) config: MasterConfig,
    pub(crate) registry: Box<dyn Registry>,
    pub(crate) allocator: Allocator,
    pub(crate) agents: HashMap<AgentId, Agent>,
    pub(crate) frameworks: HashMap<FrameworkId, Framework>,
    pub(crate) completed_frameworks: VecDeque<serde_json::Value>,
    completed_framework_ids: HashSet<FrameworkId>,
    pub(crate) offers: HashMap<OfferId, OfferEntry>,
    agent_conns: HashMap<u64, AgentId>,
    run_id: String,
    offer_counter: u64,
    pub(crate) start_time: f64,
    started: Instant,
    last_heartbeat: Instant,
    self_tx: mpsc::UnboundedSender<Command>,
    /// This term's right to lead; checked before every step.
    leadership: Leadership,
    /// Set when a registry write was fenced off: another master leads.
    deposed: bool,
    /// Changes for `/api/v1/events` subscribers (tasks, agents, frameworks), newest last.
    pub(crate) events: broadcast::Sender<serde_json::Value>,
    /// Agents under maintenance: no offers; their tasks are killed once the deadline passes.
    pub(crate) drains: HashMap<AgentId, Drain>,
}

/// An agent being drained (`POST /api/v1/agents/{id}/drain`), until it is brought back `up`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Drain {
    /// Seconds since the epoch after which its tasks are killed.
    pub deadline: f64,
    /// Whether the kills were sent.
    pub killed: bool,
}

/// What an operator may reserve or unreserve: reserved resources (`cpus(analytics):2`), no volumes.
fn check_reservation(resources: &Resources) -> Result<(), OperatorError> {
    if resources.is_empty() {
        return Err(OperatorError::bad("resources", "names no resources"));
    }
    if !resources.unreserved().is_empty() || !resources.volumes().is_empty() {
        return Err(OperatorError::bad(
            "resources",
            format!("{resources} must name reserved resources like cpus(analytics):2, without volumes (destroy volumes first)"),
        ));
    }
    Ok(())
}

/// How many events a slow `/api/v1/events` subscriber may fall behind before it is told it missed some.
const EVENTS_BUFFER: usize = 4096;

/// Sends an event to `/api/v1/events` subscribers; builds it only when there are some (a million task
/// transitions with nobody listening cost nothing).
fn publish(events: &broadcast::Sender<serde_json::Value>, make: impl FnOnce() -> serde_json::Value) {
    if events.receiver_count() > 0 {
        let _ = events.send(make());
    }
}

/// A `/api/v1/events` event: a task changed state.
fn task_event(framework_id: &FrameworkId, task_id: &TaskId, agent_id: &AgentId, state: TaskState) -> serde_json::Value {
    serde_json::json!({
        "type": "TASK_UPDATED",
        "framework_id": framework_id,
        "task_id": task_id,
        "agent_id": agent_id,
        "state": state.name(),
        "timestamp": now_seconds(),
    })
}

/// A `/api/v1/events` event about an agent or a framework.
fn event_of(kind: &str, id_key: &str, id: &str, detail: serde_json::Value) -> serde_json::Value {
    let mut event = serde_json::json!({"type": kind, id_key: id, "timestamp": now_seconds()});
    if let (Some(event), serde_json::Value::Object(detail)) = (event.as_object_mut(), detail) {
        event.extend(detail);
    }
    event
}

fn fail(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

fn valid_seconds(field: &str, v: f64) -> Result<f64, Status> {
    if v.is_finite() && (0.0..=MAX_SECONDS).contains(&v) {
        Ok(v)
    } else {
        Err(fail(format!("{field} must be between 0 and {MAX_SECONDS} seconds, got {v}")))
    }
}

/// Checks a framework's name, roles and timeouts, and fills defaults (role `*`).
pub fn validate_framework_info(info: &mut v1::FrameworkInfo) -> Result<(), Status> {
    if info.name.trim().is_empty() {
        return Err(fail("framework_info.name must not be empty"));
    }
    if info.roles.is_empty() {
        info.roles.push("*".into());
    }
    for role in &info.roles {
        if role != "*" {
            corral_proto::resources::validate_role(role).map_err(|e| fail(format!("framework_info.roles: {e}")))?;
        }
    }
    let mut seen = HashSet::new();
    info.roles.retain(|r| seen.insert(r.clone()));
    valid_seconds("framework_info.failover_timeout_seconds", info.failover_timeout_seconds)?;
    if !info.id.is_empty() {
        FrameworkId::new(info.id.clone()).map_err(|e| fail(format!("framework_info.id: {e}")))?;
    }
    Ok(())
}

fn framework_record(info: &v1::FrameworkInfo, registered_time: f64) -> FrameworkRecord {
    FrameworkRecord {
        id: info.id.clone(),
        name: info.name.clone(),
        roles: info.roles.clone(),
        failover_timeout_seconds: info.failover_timeout_seconds,
        user: info.user.clone(),
        hostname: info.hostname.clone(),
        labels: info.labels.clone().into_iter().collect(),
        registered_time,
    }
}

fn status(
    framework_id: &FrameworkId,
    task_id: &str,
    agent_id: &str,
    state: TaskState,
    reason: StatusReason,
    message: impl Into<String>,
) -> v1::TaskStatus {
    v1::TaskStatus {
        task_id: task_id.to_string(),
        state: state as i32,
        agent_id: agent_id.to_string(),
        source: StatusSource::SourceMaster as i32,
        reason: reason as i32,
        message: message.into(),
        uuid: Vec::new(),
        timestamp: now_seconds(),
        healthy: None,
        framework_id: framework_id.to_string(),
    }
}

impl Master {
    /// Loads the registry and builds the master. Frameworks and agents from the registry start out waiting to
    /// re-subscribe / re-register.
    pub async fn recover(
        config: MasterConfig,
        mut registry: Box<dyn Registry>,
        self_tx: mpsc::UnboundedSender<Command>,
        leadership: Leadership,
    ) -> anyhow::Result<Master> {
        let stored = registry.load().await?;
        let mut allocator = Allocator::new(AllocatorConfig::default());
        for (role, weight) in stored.weights.iter().map(|(r, w)| (r.clone(), *w)).chain(config.weights.clone()) {
            allocator.set_weight(&role, weight)?;
        }
        for (role, record) in &stored.quotas {
            let parse = |text: &str| Resources::parse(text).map_err(|e| e.to_string());
            let quota = parse(&record.guarantee).and_then(|guarantee| Ok(Quota { guarantee, limit: parse(&record.limit)? }));
            if let Err(e) = quota.and_then(|q| allocator.set_quota(role, q).map_err(|e| e.to_string())) {
                warn!(role, "ignoring the stored quota: {e}");
            }
        }
        let now = Instant::now();
        let mut master = Master {
            config,
            registry,
            allocator,
            agents: HashMap::new(),
            frameworks: HashMap::new(),
            completed_frameworks: VecDeque::new(),
            completed_framework_ids: HashSet::new(),
            offers: HashMap::new(),
            agent_conns: HashMap::new(),
            run_id: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
            offer_counter: 0,
            start_time: now_seconds(),
            started: now,
            last_heartbeat: now,
            self_tx,
            leadership,
            deposed: false,
            events: broadcast::channel(EVENTS_BUFFER).0,
            drains: HashMap::new(),
        };
        for (agent, deadline) in stored.drains {
            match AgentId::new(agent) {
                Ok(id) => {
                    master.drains.insert(id, Drain { deadline, killed: false });
                }
                Err(e) => warn!("skipping a stored drain of an invalid agent id: {e}"),
            }
        }
        for record in stored.frameworks.into_values() {
            let Ok(id) = FrameworkId::new(record.id.clone()) else {
                warn!(id = %record.id, "skipping registry framework with an invalid id");
                continue;
            };
            let info = v1::FrameworkInfo {
                name: record.name,
                id: record.id,
                roles: record.roles,
                failover_timeout_seconds: record.failover_timeout_seconds,
                user: record.user,
                hostname: record.hostname,
                labels: record.labels.into_iter().collect(),
            };
            master.add_recovered_framework(id, info, record.registered_time, now);
        }
        for record in stored.agents.into_values() {
            let (Ok(id), Ok(total)) = (AgentId::new(record.id.clone()), Resources::parse(&record.resources)) else {
                warn!(id = %record.id, "skipping registry agent with an invalid id or resources");
                continue;
            };
            let info = v1::AgentInfo {
                id: record.id,
                hostname: record.hostname,
                port: record.port,
                resources: total.to_proto(),
                ..Default::default()
            };
            master.agents.insert(
                id,
                Agent {
                    info,
                    total,
                    state: AgentState::Recovering,
                    conn: None,
                    last_seen: now,
                    registered_time: record.registered_time,
                    tasks: HashSet::new(),
                    usage: HashMap::new(),
                },
            );
        }
        info!(
            frameworks = master.frameworks.len(),
            agents = master.agents.len(),
            "recovered registry; waiting for re-registrations"
        );
        Ok(master)
    }

    fn add_recovered_framework(&mut self, id: FrameworkId, info: v1::FrameworkInfo, registered_time: f64, now: Instant) {
        if let Err(e) = self.allocator.add_framework(id.clone(), &info.roles, false) {
            warn!("{e}");
        }
        self.frameworks.insert(
            id,
            Framework {
                info,
                conn: None,
                disconnected_at: Some(now),
                registered_time,
                tasks: BTreeMap::new(),
                completed_tasks: VecDeque::new(),
                offers: HashSet::new(),
            },
        );
    }

    /// Runs the actor until every command sender is gone, until [`Command::Stop`], or until this master may no
    /// longer lead (its lease lapsed, or a registry write was fenced off). Leadership is checked before each
    /// command, so a master frozen past its lease (SIGSTOP, a long stall) acts on nothing after it wakes: it drops
    /// every stream instead.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    if !self.may_lead() {
                        break;
                    }
                    self.handle(cmd).await;
                    // Drain what queued up meanwhile, then allocate once for the whole batch.
                    while let Ok(cmd) = rx.try_recv() {
                        if !self.may_lead() {
                            break;
                        }
                        self.handle(cmd).await;
                    }
                }
                _ = tick.tick() => {
                    if !self.may_lead() {
                        break;
                    }
                    self.housekeeping(Instant::now()).await
                }
            }
            if !self.may_lead() {
                break;
            }
            self.allocate(Instant::now());
        }
        self.step_down();
    }

    fn may_lead(&self) -> bool {
        !self.deposed && self.leadership.holds(Instant::now())
    }

    /// Ends every framework and agent stream with UNAVAILABLE, so clients look for the new leader.
    fn step_down(&mut self) {
        warn!("this master is no longer the leader; dropping every framework and agent connection");
        fn gone<T>() -> Result<T, Status> {
            Err(Status::unavailable("this master is no longer the leader"))
        }
        for f in self.frameworks.values_mut() {
            if let Some((_, tx)) = f.conn.take() {
                let _ = tx.send(gone());
            }
        }
        for a in self.agents.values_mut() {
            if let Some((_, tx)) = a.conn.take() {
                let _ = tx.send(gone());
            }
        }
    }

    /// Writes to the registry; a fenced write deposes this master.
    async fn write(&mut self, changes: Vec<Change>) -> Result<(), Status> {
        let started = Instant::now();
        let result = self.registry.apply(changes).await;
        METRICS.registry_write_seconds.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(()) => Ok(()),
            Err(RegistryError::Fenced) => {
                self.deposed = true;
                Err(Status::unavailable("this master is no longer the leader"))
            }
            Err(e) => Err(Status::unavailable(format!("registry write failed: {e}"))),
        }
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe { info, tx, reply } => {
                let result = self.subscribe(info, tx).await;
                let _ = reply.send(result);
            }
            Command::FrameworkClosed { framework_id, stream_id } => {
                self.framework_closed(&framework_id, &stream_id, Instant::now()).await
            }
            Command::Call { header, call, reply } => {
                let result = self.call(header, call).await;
                let _ = reply.send(result);
            }
            Command::AgentMessage { conn, message, tx } => self.agent_message(conn, message, tx).await,
            Command::AgentClosed { conn } => self.agent_closed(conn),
            Command::State { reply } => {
                let _ = reply.send(self.state_json());
            }
            Command::View { view, reply } => {
                let _ = reply.send(self.view_json(&view));
            }
            Command::Events { reply } => {
                let _ = reply.send(self.events.subscribe());
            }
            Command::PublishMetrics { reply } => {
                self.publish_metrics();
                let _ = reply.send(());
            }
            Command::Operate { op, reply } => {
                let result = self.operate(op).await;
                let _ = reply.send(result);
            }
            // Ends the term: the loop stops before the next step.
            Command::Stop => self.deposed = true,
        }
    }

    // ------------------------------------------------------------------------------------------------------------
    // Frameworks

    async fn subscribe(&mut self, mut info: v1::FrameworkInfo, tx: EventSender) -> Result<(), Status> {
        validate_framework_info(&mut info)?;
        let id = if info.id.is_empty() {
            let id = FrameworkId::generate(&format!("{}-fw-", self.run_id));
            info.id = id.to_string();
            id
        } else {
            let id = FrameworkId::new(info.id.clone()).map_err(|e| fail(e.to_string()))?;
            if self.completed_framework_ids.contains(&id) {
                return Err(Status::failed_precondition(format!(
                    "framework {id} was torn down; subscribe without an id to start a new framework"
                )));
            }
            if !self.frameworks.contains_key(&id) {
                return Err(Status::not_found(format!(
                    "framework id {id} is unknown to this master; subscribe without an id to start a new framework"
                )));
            }
            id
        };
        let registered_time = self.frameworks.get(&id).map(|f| f.registered_time).unwrap_or_else(now_seconds);
        self.write(vec![Change::PutFramework(framework_record(&info, registered_time))]).await?;

        let stream_id = uuid::Uuid::new_v4().to_string();
        match self.frameworks.get_mut(&id) {
            Some(f) => {
                if let Some((_, old)) = f.conn.take() {
                    let _ = old.send(Ok(error_event("framework failed over to a new subscription")));
                }
                f.info = info.clone();
                f.disconnected_at = None;
                self.allocator.update_framework_roles(&id, &info.roles);
                info!(framework = %id, name = %info.name, "framework re-subscribed");
                let detail = serde_json::json!({"name": info.name, "connected": true});
                publish(&self.events, || event_of("FRAMEWORK_UPDATED", "framework_id", id.as_str(), detail));
            }
            None => {
                self.allocator
                    .add_framework(id.clone(), &info.roles, true)
                    .map_err(|e| Status::internal(e.to_string()))?;
                self.frameworks.insert(
                    id.clone(),
                    Framework {
                        info: info.clone(),
                        conn: None,
                        disconnected_at: None,
                        registered_time,
                        tasks: BTreeMap::new(),
                        completed_tasks: VecDeque::new(),
                        offers: HashSet::new(),
                    },
                );
                info!(framework = %id, name = %info.name, roles = ?info.roles, "framework subscribed");
                let detail = serde_json::json!({"name": info.name, "roles": info.roles, "connected": true});
                publish(&self.events, || event_of("FRAMEWORK_ADDED", "framework_id", id.as_str(), detail));
            }
        }
        self.allocator.set_framework_active(&id, true);
        let subscribed = v1::Event {
            event: Some(event::Event::Subscribed(event::Subscribed {
                framework_id: id.to_string(),
                stream_id: stream_id.clone(),
                heartbeat_interval_seconds: self.config.framework_heartbeat_interval.as_secs_f64(),
                master: self.config.advertise.clone(),
            })),
        };
        let _ = tx.send(Ok(subscribed));
        let watcher = tx.clone();
        let self_tx = self.self_tx.clone();
        let (fid, sid) = (id.clone(), stream_id.clone());
        tokio::spawn(async move {
            watcher.closed().await;
            let _ = self_tx.send(Command::FrameworkClosed { framework_id: fid, stream_id: sid });
        });
        if let Some(f) = self.frameworks.get_mut(&id) {
            // Updates forwarded while the framework was away (e.g. during a master failover) would otherwise wait
            // for the agent's next retry, which backs off to a minute: send each task's unacknowledged latest now.
            for task in f.tasks.values().filter(|t| !t.acked) {
                let update = event::Event::Update(event::Update { status: task.status.clone() });
                let _ = tx.send(Ok(v1::Event { event: Some(update) }));
            }
            f.conn = Some((stream_id, tx));
        }
        Ok(())
    }

    async fn framework_closed(&mut self, id: &FrameworkId, stream_id: &str, now: Instant) {
        let Some(f) = self.frameworks.get_mut(id) else { return };
        if f.conn.as_ref().map(|(s, _)| s.as_str()) != Some(stream_id) {
            return; // an older stream, already replaced
        }
        f.conn = None;
        f.disconnected_at = Some(now);
        let timeout = f.info.failover_timeout_seconds;
        info!(framework = %id, failover_timeout = timeout, "framework disconnected");
        let detail = serde_json::json!({"connected": false});
        publish(&self.events, || event_of("FRAMEWORK_UPDATED", "framework_id", id.as_str(), detail));
        self.allocator.set_framework_active(id, false);
        self.rescind_framework_offers(id, false);
        if timeout <= 0.0 {
            self.remove_framework(id, "its failover timeout is 0 and it disconnected").await;
        }
    }

    /// Tears a framework down: kills its tasks, forgets its offers and allocations, removes it from the registry.
    /// Applies an operator's write: validated first, stored in the registry, then applied, so a refused or failed
    /// write changes nothing.
    async fn operate(&mut self, op: Operation) -> Result<serde_json::Value, OperatorError> {
        match op {
            Operation::SetWeight { role, weight } => {
                if !(weight.is_finite() && weight > 0.0) {
                    return Err(OperatorError::bad("weight", format!("must be a positive number, not {weight}")));
                }
                self.write(vec![Change::SetWeight(role.clone(), weight)]).await.map_err(OperatorError::unavailable)?;
                self.allocator.set_weight(&role, weight).expect("validated above");
                info!(role, weight, "role weight set by the operator");
                Ok(serde_json::json!({"role": role, "weight": weight}))
            }
            Operation::SetQuota { role, quota } => {
                quota.validate().map_err(|reason| OperatorError::bad("quota", reason))?;
                let record = QuotaRecord { guarantee: quota.guarantee.to_string(), limit: quota.limit.to_string() };
                self.write(vec![Change::SetQuota(role.clone(), record)]).await.map_err(OperatorError::unavailable)?;
                self.allocator.set_quota(&role, quota.clone()).expect("validated above");
                info!(role, guarantee = %quota.guarantee, limit = %quota.limit, "role quota set by the operator");
                Ok(serde_json::json!({
                    "role": role,
                    "guarantee": quota.guarantee.to_json_summary(),
                    "limit": quota.limit.to_json_summary(),
                }))
            }
            Operation::RemoveQuota { role } => {
                self.write(vec![Change::RemoveQuota(role.clone())]).await.map_err(OperatorError::unavailable)?;
                self.allocator.set_quota(&role, Quota::default()).expect("no quota is valid");
                info!(role, "role quota removed by the operator");
                Ok(serde_json::json!({"role": role}))
            }
            Operation::Drain { agent, deadline_seconds } => {
                if !(deadline_seconds.is_finite() && (0.0..=30.0 * 86400.0).contains(&deadline_seconds)) {
                    return Err(OperatorError::bad("deadline_seconds", format!("must be between 0 and 2592000 (30 days), not {deadline_seconds}")));
                }
                self.known_agent(&agent)?;
                let deadline = now_seconds() + deadline_seconds;
                self.write(vec![Change::SetDrain(agent.to_string(), deadline)]).await.map_err(OperatorError::unavailable)?;
                self.drains.insert(agent.clone(), Drain { deadline, killed: false });
                self.allocator.set_agent_active(&agent, false);
                self.rescind_agent_offers(&agent);
                info!(agent = %agent, deadline_seconds, "draining agent: no new offers, tasks killed at the deadline");
                let detail = serde_json::json!({"draining": true, "deadline": deadline});
                publish(&self.events, || event_of("AGENT_UPDATED", "agent_id", agent.as_str(), detail));
                self.kill_drained();
                Ok(serde_json::json!({"agent": agent, "deadline": deadline}))
            }
            Operation::Up { agent } => {
                self.known_agent(&agent)?;
                self.write(vec![Change::RemoveDrain(agent.to_string())]).await.map_err(OperatorError::unavailable)?;
                self.drains.remove(&agent);
                let connected = self.agents.get(&agent).is_some_and(|a| a.state == AgentState::Registered);
                self.allocator.set_agent_active(&agent, connected);
                info!(agent = %agent, "agent is up: its resources are offered again");
                publish(&self.events, || event_of("AGENT_UPDATED", "agent_id", agent.as_str(), serde_json::json!({"draining": false})));
                Ok(serde_json::json!({"agent": agent}))
            }
            Operation::Reserve { agent, resources } => {
                check_reservation(&resources)?;
                self.convert_free(&agent, "RESERVE", resources.with_role(None), resources).await
            }
            Operation::Unreserve { agent, resources } => {
                check_reservation(&resources)?;
                let to = resources.with_role(None);
                self.convert_free(&agent, "UNRESERVE", resources, to).await
            }
            Operation::KillTask { framework, task, grace_seconds } => {
                let active = self.frameworks.get(&framework).and_then(|f| f.tasks.get(&task)).map(|t| t.agent_id.clone());
                let Some(agent) = active else {
                    return Err(OperatorError { code: 404, message: format!("no active task {task} of framework {framework}"), field: Some("task") });
                };
                let req = v1::KillRequest { task_id: task.to_string(), agent_id: agent.to_string(), kill_grace_period_seconds: grace_seconds, header: None };
                self.kill(&framework, req).map_err(|e| OperatorError::bad("grace_seconds", e.message()))?;
                info!(framework = %framework, task = %task, "task kill requested by the operator");
                Ok(serde_json::json!({"framework": framework, "task": task, "agent": agent}))
            }
            Operation::Teardown { framework } => {
                if !self.frameworks.contains_key(&framework) {
                    return Err(OperatorError { code: 404, message: format!("no framework {framework}"), field: Some("framework") });
                }
                self.remove_framework(&framework, "torn down by the operator").await;
                Ok(serde_json::json!({"framework": framework}))
            }
        }
    }

    fn known_agent(&self, agent: &AgentId) -> Result<(), OperatorError> {
        if self.agents.contains_key(agent) {
            Ok(())
        } else {
            Err(OperatorError { code: 404, message: format!("no agent {agent}"), field: Some("agent") })
        }
    }

    /// An operator's RESERVE or UNRESERVE: converts `from` into `to` among the agent's free resources (outstanding
    /// offers on it are rescinded first), records it and tells the agent.
    async fn convert_free(&mut self, agent: &AgentId, name: &str, from: Resources, to: Resources) -> Result<serde_json::Value, OperatorError> {
        self.known_agent(agent)?;
        self.rescind_agent_offers(agent);
        let free = self.allocator.free(agent).cloned().unwrap_or_default();
        if !free.contains(&from) {
            return Err(OperatorError {
                code: 409,
                message: format!("agent {agent} does not have {from} free (free: {free})"),
                field: Some("resources"),
            });
        }
        self.allocator.convert_free(agent, &from, &to);
        if let Some(a) = self.agents.get_mut(agent) {
            a.total.subtract(&from);
            a.total.add(&to);
        }
        let list = to.to_proto();
        let op = match name {
            "RESERVE" => operation::Operation::Reserve(operation::Reserve { resources: list }),
            _ => operation::Operation::Unreserve(operation::Unreserve { resources: from.to_proto() }),
        };
        info!(agent = %agent, "{name} by the operator: {from} -> {to}");
        self.checkpoint_agent_resources(agent, vec![v1::Operation { operation: Some(op) }]).await;
        let total = self.agents.get(agent).map(|a| a.total.to_json_summary());
        Ok(serde_json::json!({"agent": agent, "resources": total}))
    }

    /// Kills the tasks of drained agents whose deadline passed (once; a disconnected agent gets them on return).
    fn kill_drained(&mut self) {
        let wall = now_seconds();
        let due: Vec<AgentId> =
            self.drains.iter().filter(|(_, d)| !d.killed && d.deadline <= wall).map(|(a, _)| a.clone()).collect();
        for agent in due {
            let tasks: Vec<(FrameworkId, TaskId)> = self.agents.get(&agent).map(|a| a.tasks.iter().cloned().collect()).unwrap_or_default();
            for (fid, tid) in tasks {
                let req = v1::KillRequest { task_id: tid.to_string(), agent_id: agent.to_string(), ..Default::default() };
                let _ = self.kill(&fid, req);
            }
            info!(agent = %agent, "drain deadline passed: its tasks are being killed");
            if let Some(d) = self.drains.get_mut(&agent) {
                d.killed = true;
            }
        }
    }

    async fn remove_framework(&mut self, id: &FrameworkId, why: &str) {
        self.rescind_framework_offers(id, false);
        let Some(mut f) = self.frameworks.remove(id) else { return };
        info!(framework = %id, "removing framework: {why}");
        publish(&self.events, || event_of("FRAMEWORK_REMOVED", "framework_id", id.as_str(), serde_json::json!({"why": why})));
        if let Some((_, tx)) = f.conn.take() {
            let _ = tx.send(Ok(error_event(&format!("framework removed: {why}"))));
        }
        for (task_id, mut task) in std::mem::take(&mut f.tasks) {
            if !task.state.is_terminal() {
                self.send_to_agent(
                    &task.agent_id,
                    master_message::Message::KillTask(master_message::KillTask {
                        framework_id: id.to_string(),
                        task_id: task_id.to_string(),
                        kill_grace_period_seconds: None,
                    }),
                );
                task.state = TaskState::TaskKilled;
                task.statuses.push((TaskState::TaskKilled, now_seconds()));
                publish(&self.events, || task_event(id, &task_id, &task.agent_id, TaskState::TaskKilled));
            }
            if let Some(agent) = self.agents.get_mut(&task.agent_id) {
                agent.tasks.remove(&(id.clone(), task_id.clone()));
            }
            push_bounded(&mut f.completed_tasks, task, MAX_COMPLETED_TASKS);
        }
        self.allocator.remove_framework(id);
        if let Err(e) = self.write(vec![Change::RemoveFramework(id.to_string())]).await {
            warn!(framework = %id, "could not remove framework from the registry: {}", e.message());
        }
        self.completed_framework_ids.insert(id.clone());
        let summary = self.framework_json(id, &f, false, true);
        if self.completed_frameworks.len() >= MAX_COMPLETED_FRAMEWORKS {
            self.completed_frameworks.pop_front();
        }
        self.completed_frameworks.push_back(summary);
    }

    async fn call(&mut self, header: Option<v1::CallHeader>, call: Call) -> Result<(), Status> {
        let header = header.ok_or_else(|| fail(format!("{}: header (framework_id, stream_id) is required", call.name())))?;
        let id = FrameworkId::new(header.framework_id.clone())
            .map_err(|e| fail(format!("{}: header.framework_id: {e}", call.name())))?;
        let f = self
            .frameworks
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("{}: framework {id} is not known", call.name())))?;
        match &f.conn {
            Some((sid, _)) if *sid == header.stream_id => {}
            Some(_) => {
                return Err(Status::permission_denied(format!(
                    "{}: stream {:?} is not framework {id}'s current subscription",
                    call.name(),
                    header.stream_id
                )));
            }
            None => {
                return Err(Status::failed_precondition(format!(
                    "{}: framework {id} is not subscribed",
                    call.name()
                )));
            }
        }
        let now = Instant::now();
        match call {
            Call::Accept(req) => self.accept(&id, req, now).await,
            Call::Decline(req) => {
                let refuse = refuse_duration(req.filters.as_ref())?;
                for offer_id in &req.offer_ids {
                    if let Some(o) = self.use_offer(&id, offer_id) {
                        METRICS.offers("declined", 1);
                        self.recover_offer(o, Some((now, refuse)));
                    }
                }
                Ok(())
            }
            Call::Revive(req) => {
                self.allocator.revive(&id, &req.roles);
                Ok(())
            }
            Call::Suppress(req) => {
                self.allocator.suppress(&id, &req.roles);
                Ok(())
            }
            Call::Kill(req) => self.kill(&id, req),
            Call::Acknowledge(req) => self.acknowledge(&id, &req.agent_id, &req.task_id, req.uuid)
                .map_err(|e| fail(format!("ACKNOWLEDGE: {e}"))),
            Call::AcknowledgeBatch(req) => {
                let total = req.updates.len();
                let refused: Vec<String> = req
                    .updates
                    .into_iter()
                    .filter_map(|u| self.acknowledge(&id, &u.agent_id, &u.task_id, u.uuid).err())
                    .collect();
                match refused.first() {
                    None => Ok(()),
                    Some(first) => Err(fail(format!(
                        "ACKNOWLEDGE_BATCH: {} of {total} refused (the rest were applied); first: {first}",
                        refused.len()
                    ))),
                }
            }
            Call::Reconcile(req) => self.reconcile(&id, req),
            Call::Message(_) => Err(Status::failed_precondition(
                "MESSAGE: corral tasks run without an executor, so there is nobody to deliver framework messages to",
            )),
            Call::Teardown => {
                self.remove_framework(&id, "the framework asked for teardown").await;
                Ok(())
            }
            Call::UpdateFramework(req) => self.update_framework(&id, req).await,
        }
    }

    async fn update_framework(&mut self, id: &FrameworkId, req: v1::UpdateFrameworkRequest) -> Result<(), Status> {
        let mut info = req.framework_info.ok_or_else(|| fail("UPDATE_FRAMEWORK: framework_info is required"))?;
        validate_framework_info(&mut info)?;
        if info.id != id.as_str() {
            return Err(fail(format!("UPDATE_FRAMEWORK: framework_info.id {:?} does not match {id}", info.id)));
        }
        let registered = self.frameworks.get(id).map(|f| f.registered_time).unwrap_or_default();
        self.write(vec![Change::PutFramework(framework_record(&info, registered))]).await?;
        self.allocator.update_framework_roles(id, &info.roles);
        if let Some(f) = self.frameworks.get_mut(id) {
            f.info = info;
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------------------------------
    // Offers

    fn allocate(&mut self, now: Instant) {
        if !self.may_lead() {
            return;
        }
        let started = Instant::now();
        let allocations = self.allocator.allocate(now);
        METRICS.allocation_seconds.observe(started.elapsed().as_secs_f64());
        if allocations.is_empty() {
            return;
        }
        let mut batches: HashMap<FrameworkId, Vec<v1::Offer>> = HashMap::new();
        for Allocation { framework_id, agent_id, role, resources } in allocations {
            let (Some(f), Some(agent)) = (self.frameworks.get_mut(&framework_id), self.agents.get(&agent_id)) else {
                self.allocator.recover(&agent_id, &framework_id, &role, &resources, None);
                continue;
            };
            self.offer_counter += 1;
            let offer_id = OfferId::new(format!("{}-O{}", self.run_id, self.offer_counter)).expect("offer ids are valid");
            let offer = v1::Offer {
                id: offer_id.to_string(),
                framework_id: framework_id.to_string(),
                agent_id: agent_id.to_string(),
                hostname: agent.info.hostname.clone(),
                resources: resources.to_proto(),
                attributes: agent.info.attributes.clone(),
                allocation_role: role.clone(),
            };
            f.offers.insert(offer_id.clone());
            batches.entry(framework_id.clone()).or_default().push(offer);
            let expires = self.config.offer_timeout.map(|t| now + t);
            self.offers.insert(offer_id, OfferEntry { framework_id, agent_id, role, resources, expires });
        }
        if !self.may_lead() {
            // Leadership lapsed while allocating: these offers must not go out (another master may offer the
            // same resources now). The actor stops at its next step.
            return;
        }
        for (framework_id, offers) in batches {
            debug!(framework = %framework_id, count = offers.len(), "sending offers");
            self.send_event(&framework_id, event::Event::Offers(event::Offers { offers }));
        }
    }

    /// Takes an outstanding offer of this framework out of the table (for accept or decline).
    fn use_offer(&mut self, framework_id: &FrameworkId, offer_id: &str) -> Option<OfferEntry> {
        let entry = self.offers.get(offer_id)?;
        if &entry.framework_id != framework_id {
            return None;
        }
        let entry = self.offers.remove(offer_id)?;
        if let Some(f) = self.frameworks.get_mut(framework_id) {
            f.offers.remove(offer_id);
        }
        Some(entry)
    }

    fn recover_offer(&mut self, entry: OfferEntry, refuse: Option<(Instant, Duration)>) {
        self.allocator.recover(&entry.agent_id, &entry.framework_id, &entry.role, &entry.resources, refuse);
    }

    fn rescind(&mut self, offer_id: &OfferId, notify: bool) {
        let Some(entry) = self.offers.remove(offer_id) else { return };
        METRICS.offers("rescinded", 1);
        if let Some(f) = self.frameworks.get_mut(&entry.framework_id) {
            f.offers.remove(offer_id);
        }
        if notify {
            self.send_event(
                &entry.framework_id.clone(),
                event::Event::Rescind(event::Rescind { offer_id: offer_id.to_string() }),
            );
        }
        self.recover_offer(entry, None);
    }

    fn rescind_framework_offers(&mut self, id: &FrameworkId, notify: bool) {
        let ids: Vec<OfferId> = self.frameworks.get(id).map(|f| f.offers.iter().cloned().collect()).unwrap_or_default();
        for offer_id in ids {
            self.rescind(&offer_id, notify);
        }
    }

    fn rescind_agent_offers(&mut self, agent_id: &AgentId) {
        let ids: Vec<OfferId> =
            self.offers.iter().filter(|(_, o)| &o.agent_id == agent_id).map(|(id, _)| id.clone()).collect();
        for offer_id in ids {
            self.rescind(&offer_id, true);
        }
    }

    async fn accept(&mut self, id: &FrameworkId, req: v1::AcceptRequest, now: Instant) -> Result<(), Status> {
        let refuse = refuse_duration(req.filters.as_ref())?;
        if req.operations.iter().any(|op| op.operation.is_none()) {
            return Err(fail("ACCEPT: an operation has no type"));
        }
        // Find out whether the offers are usable before consuming any of them.
        let mut problem = None;
        if req.offer_ids.is_empty() {
            problem = Some("ACCEPT names no offers".to_string());
        }
        let mut agent: Option<(AgentId, String)> = None;
        let mut offered = Resources::new();
        for offer_id in &req.offer_ids {
            match self.offers.get(offer_id.as_str()) {
                None => problem = Some(format!("offer {offer_id} is no longer valid")),
                Some(o) if &o.framework_id != id => problem = Some(format!("offer {offer_id} is not this framework's")),
                Some(o) => {
                    offered.add(&o.resources);
                    match &agent {
                        Some((a, r)) if *a != o.agent_id || *r != o.role => {
                            problem = Some("the accepted offers must all be for one agent and one role".to_string())
                        }
                        _ => agent = Some((o.agent_id.clone(), o.role.clone())),
                    }
                }
            }
        }
        let tasks_in = |op: &v1::Operation| match &op.operation {
            Some(operation::Operation::Launch(l)) => l.task_infos.clone(),
            Some(operation::Operation::LaunchGroup(l)) => l.task_infos.clone(),
            _ => Vec::new(),
        };
        if let Some(problem) = problem {
            // Usable offers of this framework named in a bad ACCEPT go back to the pool.
            for offer_id in &req.offer_ids {
                if let Some(o) = self.use_offer(id, offer_id) {
                    self.recover_offer(o, None);
                }
            }
            for task in req.operations.iter().flat_map(tasks_in) {
                let s = status(id, &task.task_id, &task.agent_id, TaskState::TaskDropped, StatusReason::ReasonInvalidOffers, problem.clone());
                self.send_event(id, event::Event::Update(event::Update { status: Some(s) }));
            }
            return Ok(());
        }
        let (agent_id, role) = agent.expect("at least one valid offer");
        // Operations that change resources are checked as a whole first: a bad one refuses the ACCEPT and
        // leaves the offers untouched.
        let steps = self.plan(&req.operations, &agent_id, &role, &offered).map_err(|e| fail(format!("ACCEPT: {e}")))?;
        let mut available = Resources::new();
        for offer_id in &req.offer_ids {
            if let Some(o) = self.use_offer(id, offer_id) {
                available.add(&o.resources);
            }
        }
        let mut launched: HashSet<String> = HashSet::new();
        let mut applied = Vec::new();
        for step in steps {
            let (tasks, group) = match step {
                Step::Convert { name, from, to, op } => {
                    if !available.contains(&from) {
                        let message = format!("{name} skipped: an earlier launch in the same ACCEPT used {from}");
                        self.send_event(id, event::Event::Error(event::Error { message }));
                        continue;
                    }
                    available.subtract(&from);
                    available.add(&to);
                    self.allocator.convert(&agent_id, id, &role, &from, &to);
                    if let Some(a) = self.agents.get_mut(&agent_id) {
                        a.total.subtract(&from);
                        a.total.add(&to);
                    }
                    info!(framework = %id, agent = %agent_id, "{name}: {from} -> {to}");
                    applied.push(op);
                    continue;
                }
                Step::Launch(tasks, group) => (tasks, group),
            };
            let mut remaining = available.clone();
            let mut checked = Vec::new();
            let mut group_error = None;
            for task in &tasks {
                match self.validate_task(id, task, &agent_id, &remaining, &launched) {
                    Ok(res) => {
                        remaining.subtract(&res);
                        launched.insert(task.task_id.clone());
                        checked.push((task.clone(), Ok(res)));
                    }
                    Err(msg) => {
                        group_error.get_or_insert_with(|| format!("task {}: {msg}", task.task_id));
                        checked.push((task.clone(), Err(msg)));
                    }
                }
            }
            if group && group_error.is_some() {
                let why = format!("task group rejected: {}", group_error.unwrap_or_default());
                for (task, _) in checked {
                    launched.remove(&task.task_id);
                    self.reject_task(id, &task, &agent_id, &why);
                }
                continue;
            }
            for (task, result) in checked {
                match result {
                    Ok(res) => {
                        available.subtract(&res);
                        self.launch(id, task, &agent_id, &role, res);
                    }
                    Err(msg) => self.reject_task(id, &task, &agent_id, &msg),
                }
            }
        }
        if !applied.is_empty() {
            self.checkpoint_agent_resources(&agent_id, applied).await;
        }
        if !available.is_empty() {
            self.allocator.recover(&agent_id, id, &role, &available, Some((now, refuse)));
        }
        Ok(())
    }

    /// Checks RESERVE, UNRESERVE, CREATE and DESTROY in order against what the offers hold (launches are
    /// checked task by task later). Errors name the operation by position and kind.
    fn plan(&self, ops: &[v1::Operation], agent_id: &AgentId, role: &str, offered: &Resources) -> Result<Vec<Step>, String> {
        let mut avail = offered.clone();
        let existing: HashSet<String> = self
            .agents
            .get(agent_id)
            .map(|a| a.total.volumes().into_iter().map(|(_, v, _)| v.persistence_id).collect())
            .unwrap_or_default();
        let mut steps = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let parse = |name: &str, list: &[v1::Resource]| {
                let r = Resources::from_proto(list).map_err(|e| format!("operation {i} ({name}): {e}"))?;
                if r.is_empty() {
                    return Err(format!("operation {i} ({name}) names no resources"));
                }
                Ok(r)
            };
            let only_role = |name: &str, r: &Resources| {
                if role == "*" {
                    return Err(format!("operation {i} ({name}): offers for role * cannot be reserved; subscribe with a role"));
                }
                if !r.unreserved().is_empty() || r.reservation_roles() != [role] {
                    return Err(format!("operation {i} ({name}): {r} must all be reserved for the offer's role {role:?}"));
                }
                Ok(())
            };
            let (name, from, to) = match &op.operation {
                Some(operation::Operation::Launch(l)) => {
                    steps.push(Step::Launch(l.task_infos.clone(), false));
                    continue;
                }
                Some(operation::Operation::LaunchGroup(l)) => {
                    steps.push(Step::Launch(l.task_infos.clone(), true));
                    continue;
                }
                Some(operation::Operation::Reserve(r)) => {
                    let to = parse("RESERVE", &r.resources)?;
                    only_role("RESERVE", &to)?;
                    if !to.volumes().is_empty() {
                        return Err(format!("operation {i} (RESERVE): reserve plain disk, then CREATE the volume"));
                    }
                    ("RESERVE", to.with_role(None), to)
                }
                Some(operation::Operation::Unreserve(r)) => {
                    let from = parse("UNRESERVE", &r.resources)?;
                    only_role("UNRESERVE", &from)?;
                    if !from.volumes().is_empty() {
                        return Err(format!("operation {i} (UNRESERVE): DESTROY the volume first"));
                    }
                    let to = from.with_role(None);
                    ("UNRESERVE", from, to)
                }
                Some(operation::Operation::Create(c)) => {
                    let to = parse("CREATE", &c.volumes)?;
                    only_role("CREATE", &to)?;
                    let volumes = to.volumes();
                    if volumes.is_empty() || to.without_volumes().get_scalar("disk") != to.get_scalar("disk") || to.get_scalar("disk") != volumes.iter().map(|v| v.2).sum::<f64>() {
                        return Err(format!("operation {i} (CREATE): {to} must be persistent volumes only"));
                    }
                    for (_, v, _) in &volumes {
                        if existing.contains(&v.persistence_id) || avail.volumes().iter().any(|(_, x, _)| x.persistence_id == v.persistence_id) {
                            return Err(format!("operation {i} (CREATE): volume {} already exists on agent {agent_id}", v.persistence_id));
                        }
                    }
                    ("CREATE", to.without_volumes(), to)
                }
                Some(operation::Operation::Destroy(d)) => {
                    let from = parse("DESTROY", &d.volumes)?;
                    if from.volumes().is_empty() {
                        return Err(format!("operation {i} (DESTROY): {from} holds no volume"));
                    }
                    let to = from.without_volumes();
                    ("DESTROY", from, to)
                }
                None => return Err(format!("operation {i} has no type")),
            };
            if !avail.contains(&from) {
                return Err(format!("operation {i} ({name}): the offers do not hold {from} (they hold {avail})"));
            }
            avail.subtract(&from);
            avail.add(&to);
            steps.push(Step::Convert { name, from, to, op: op.clone() });
        }
        Ok(steps)
    }

    /// Records an agent's changed reservations and volumes in the registry and tells the agent.
    async fn checkpoint_agent_resources(&mut self, agent_id: &AgentId, operations: Vec<v1::Operation>) {
        let Some(a) = self.agents.get(agent_id) else { return };
        let record = AgentRecord {
            id: agent_id.to_string(),
            hostname: a.info.hostname.clone(),
            port: a.info.port,
            resources: a.total.to_string(),
            registered_time: a.registered_time,
        };
        let total = a.total.to_proto();
        if let Err(e) = self.write(vec![Change::PutAgent(record)]).await {
            warn!(agent = %agent_id, "could not record the agent's new reservations: {}", e.message());
            if self.deposed {
                return;
            }
        }
        self.send_to_agent(
            agent_id,
            master_message::Message::ApplyOperations(master_message::ApplyOperations { operations, total }),
        );
    }

    fn reject_task(&mut self, id: &FrameworkId, task: &v1::TaskInfo, agent_id: &AgentId, why: &str) {
        info!(framework = %id, task = %task.task_id, "task rejected: {why}");
        let s = status(id, &task.task_id, agent_id.as_str(), TaskState::TaskError, StatusReason::ReasonTaskInvalid, why);
        self.send_event(id, event::Event::Update(event::Update { status: Some(s) }));
    }

    /// Checks one task of an ACCEPT; returns its resources.
    fn validate_task(
        &self,
        framework_id: &FrameworkId,
        task: &v1::TaskInfo,
        agent_id: &AgentId,
        available: &Resources,
        launched: &HashSet<String>,
    ) -> Result<Resources, String> {
        let task_id = TaskId::new(task.task_id.clone()).map_err(|e| e.to_string())?;
        if !task.agent_id.is_empty() && task.agent_id != agent_id.as_str() {
            return Err(format!("task agent_id {:?} is not the offer's agent {agent_id}", task.agent_id));
        }
        let f = &self.frameworks[framework_id];
        if f.tasks.contains_key(&task_id) || launched.contains(task_id.as_str()) {
            return Err(format!("task id {task_id} is already in use by this framework"));
        }
        let command = task.command.as_ref().ok_or("task has no command")?;
        if command.value.trim().is_empty() && (command.shell || command.arguments.is_empty()) {
            return Err("task command is empty".into());
        }
        let resources = Resources::from_proto(&task.resources).map_err(|e| format!("task resources: {e}"))?;
        if resources.get_scalar("cpus") <= 0.0 && resources.get_scalar("mem") <= 0.0 {
            return Err("task must ask for some cpus or mem".into());
        }
        if !available.contains(&resources) {
            return Err(format!("task resources {resources} are not within the offered resources {available}"));
        }
        valid_seconds("kill_grace_period_seconds", task.kill_grace_period_seconds).map_err(|s| s.message().to_string())?;
        if let Some(hc) = &task.health_check {
            corral_proto::health::validate(hc)?;
            let needs_port = hc.r#type != v1::health_check::Type::Command as i32 && hc.port == 0;
            if needs_port && resources.ranges("ports").is_empty() {
                return Err("health_check checks the task's first port, but the task has no ports".into());
            }
        }
        Ok(resources)
    }

    fn launch(&mut self, framework_id: &FrameworkId, mut info: v1::TaskInfo, agent_id: &AgentId, role: &str, resources: Resources) {
        let task_id = TaskId::new(info.task_id.clone()).expect("validated");
        info.agent_id = agent_id.to_string();
        info.allocation_role = role.to_string();
        if info.name.is_empty() {
            info.name = info.task_id.clone();
        }
        let Some(f) = self.frameworks.get_mut(framework_id) else { return };
        let framework = f.info.clone();
        f.tasks.insert(
            task_id.clone(),
            Task {
                id: task_id.clone(),
                name: Task::name_unless_id(&info),
                agent_id: agent_id.clone(),
                resources,
                role: role.to_string(),
                state: TaskState::TaskStaging,
                status: None,
                statuses: vec![(TaskState::TaskStaging, now_seconds())],
                kill_pending: None,
                acked: true,
            },
        );
        if let Some(agent) = self.agents.get_mut(agent_id) {
            agent.tasks.insert((framework_id.clone(), task_id.clone()));
        }
        publish(&self.events, || task_event(framework_id, &task_id, agent_id, TaskState::TaskStaging));
        info!(framework = %framework_id, task = %task_id, agent = %agent_id, "launching task");
        self.send_to_agent(
            agent_id,
            master_message::Message::RunTask(master_message::RunTask { framework: Some(framework), task: Some(info) }),
        );
    }

    // ------------------------------------------------------------------------------------------------------------
    // Tasks: kill, acknowledge, reconcile

    fn kill(&mut self, id: &FrameworkId, req: v1::KillRequest) -> Result<(), Status> {
        let task_id = TaskId::new(req.task_id.clone()).map_err(|e| fail(format!("KILL: {e}")))?;
        if let Some(g) = req.kill_grace_period_seconds {
            valid_seconds("KILL: kill_grace_period_seconds", g)?;
        }
        let task = self.frameworks.get_mut(id).and_then(|f| f.tasks.get_mut(&task_id));
        match task {
            Some(task) if !task.state.is_terminal() => {
                let agent_id = task.agent_id.clone();
                let connected = self.agents.get(&agent_id).is_some_and(|a| a.conn.is_some());
                if connected {
                    self.send_to_agent(
                        &agent_id,
                        master_message::Message::KillTask(master_message::KillTask {
                            framework_id: id.to_string(),
                            task_id: task_id.to_string(),
                            kill_grace_period_seconds: req.kill_grace_period_seconds,
                        }),
                    );
                } else {
                    // Delivered when the agent re-registers.
                    task.kill_pending = Some(req.kill_grace_period_seconds);
                }
            }
            Some(task) => {
                let s = task.status.clone().unwrap_or_else(|| {
                    status(id, task_id.as_str(), task.agent_id.as_str(), task.state, StatusReason::ReasonReconciliation, "")
                });
                self.send_event(id, event::Event::Update(event::Update { status: Some(reconciled(s)) }));
            }
            None => {
                let s = status(
                    id,
                    task_id.as_str(),
                    &req.agent_id,
                    TaskState::TaskLost,
                    StatusReason::ReasonTaskUnknown,
                    format!("cannot kill task {task_id}: the master does not know it"),
                );
                self.send_event(id, event::Event::Update(event::Update { status: Some(s) }));
            }
        }
        Ok(())
    }

    /// Applies a framework's acknowledgement of a task's update and relays it to the agent; the error says why not.
    fn acknowledge(&mut self, id: &FrameworkId, agent_id: &str, task_id: &str, uuid: Vec<u8>) -> Result<(), String> {
        let task_id = TaskId::new(task_id).map_err(|e| e.to_string())?;
        let agent_id = AgentId::new(agent_id).map_err(|e| e.to_string())?;
        if uuid.is_empty() {
            return Err(format!("task {task_id}: uuid is empty; updates without a uuid need no acknowledgement"));
        }
        let Some(f) = self.frameworks.get_mut(id) else { return Ok(()) };
        if let Some(task) = f.tasks.get_mut(&task_id) {
            if task.agent_id != agent_id {
                return Err(format!("task {task_id} runs on {}, not {agent_id}", task.agent_id));
            }
            let is_latest = task.status.as_ref().is_some_and(|s| s.uuid == uuid);
            task.acked |= is_latest;
            if is_latest && task.state.is_terminal() {
                let task = f.tasks.remove(&task_id).expect("present");
                push_bounded(&mut f.completed_tasks, task, MAX_COMPLETED_TASKS);
                if let Some(agent) = self.agents.get_mut(&agent_id) {
                    agent.tasks.remove(&(id.clone(), task_id.clone()));
                }
            }
        }
        self.send_to_agent(
            &agent_id,
            master_message::Message::Acknowledge(master_message::Acknowledge {
                framework_id: id.to_string(),
                task_id: task_id.to_string(),
                uuid,
            }),
        );
        Ok(())
    }

    fn reconcile(&mut self, id: &FrameworkId, req: v1::ReconcileRequest) -> Result<(), Status> {
        let f = &self.frameworks[id];
        let latest = |task: &Task, task_id: &TaskId| {
            let s = task.status.clone().unwrap_or_else(|| {
                status(id, task_id.as_str(), task.agent_id.as_str(), task.state, StatusReason::ReasonReconciliation, "")
            });
            let mut s = reconciled(s);
            s.state = task.state as i32;
            s
        };
        let mut out = Vec::new();
        if req.tasks.is_empty() {
            out.extend(f.tasks.iter().map(|(task_id, task)| latest(task, task_id)));
        } else {
            for t in &req.tasks {
                let task_id = TaskId::new(t.task_id.clone()).map_err(|e| fail(format!("RECONCILE: {e}")))?;
                let known = f
                    .tasks
                    .get(&task_id)
                    .or_else(|| f.completed_tasks.iter().rev().find(|c| c.id == task_id));
                if let Some(task) = known {
                    out.push(latest(task, &task_id));
                    continue;
                }
                // An unknown task may still be reported by an agent that has not re-registered since a failover:
                // say nothing until it has (the framework asks again), as Mesos does for transitioning agents.
                let agent_state = self.agents.get(t.agent_id.as_str()).map(|a| a.state);
                let recovering = |a: &Agent| a.state == AgentState::Recovering;
                let (state, message) = match agent_state {
                    Some(AgentState::Recovering) => continue,
                    None if t.agent_id.is_empty() && self.agents.values().any(recovering) => continue,
                    Some(AgentState::Unreachable) => (TaskState::TaskUnreachable, "the task's agent is unreachable"),
                    _ => (TaskState::TaskLost, "task is unknown to the master"),
                };
                out.push(status(id, task_id.as_str(), &t.agent_id, state, StatusReason::ReasonReconciliation, message));
            }
        }
        for s in out {
            self.send_event(id, event::Event::Update(event::Update { status: Some(s) }));
        }
        Ok(())
    }

    // ------------------------------------------------------------------------------------------------------------
    // Agents

    async fn agent_message(&mut self, conn: u64, message: v1::AgentMessage, tx: AgentSender) {
        use v1::agent_message::Message;
        let now = Instant::now();
        let Some(message) = message.message else { return };
        if let Message::Register(reg) = message {
            if let Err(e) = self.register_agent(conn, reg, tx.clone(), now).await {
                warn!("agent registration refused: {}", e.message());
                let _ = tx.send(Err(e));
            }
            return;
        }
        let Some(agent_id) = self.agent_conns.get(&conn).cloned() else {
            let _ = tx.send(Err(Status::failed_precondition("register first: the first message must be REGISTER")));
            return;
        };
        if let Some(agent) = self.agents.get_mut(&agent_id) {
            agent.last_seen = now;
        }
        match message {
            Message::Heartbeat(_) | Message::Register(_) => {}
            Message::StatusUpdate(s) => self.status_update(&agent_id, s),
            Message::Usage(usage) => {
                if let Some(agent) = self.agents.get_mut(&agent_id) {
                    agent.usage = usage
                        .tasks
                        .into_iter()
                        .map(|u| ((u.framework_id.clone(), u.task_id.clone()), u))
                        .collect();
                }
            }
        }
    }

    async fn register_agent(
        &mut self,
        conn: u64,
        reg: v1::RegisterAgent,
        tx: AgentSender,
        now: Instant,
    ) -> Result<(), Status> {
        let mut info = reg.agent_info.ok_or_else(|| fail("REGISTER: agent_info is required"))?;
        if info.hostname.trim().is_empty() {
            return Err(fail("REGISTER: agent_info.hostname must not be empty"));
        }
        if info.port == 0 || info.port > u16::MAX as u32 {
            return Err(fail(format!("REGISTER: agent_info.port {} is not a valid port", info.port)));
        }
        let mut total = Resources::from_proto(&info.resources).map_err(|e| fail(format!("REGISTER: {e}")))?;
        let reregister = !info.id.is_empty();
        let agent_id = if reregister {
            AgentId::new(info.id.clone()).map_err(|e| fail(format!("REGISTER: {e}")))?
        } else {
            let id = AgentId::generate(&format!("{}-agent-", self.run_id));
            info.id = id.to_string();
            id
        };
        // Validate the reported tasks before changing anything.
        let mut reported: Vec<(FrameworkId, TaskId, v1::TaskInfo, v1::TaskStatus, Resources)> = Vec::new();
        for task in reg.tasks {
            let status = reg
                .task_statuses
                .iter()
                .find(|s| s.task_id == task.task_id)
                .cloned()
                .ok_or_else(|| fail(format!("REGISTER: task {} has no status", task.task_id)))?;
            let fid = FrameworkId::new(status.framework_id.clone()).map_err(|e| fail(format!("REGISTER: {e}")))?;
            let tid = TaskId::new(task.task_id.clone()).map_err(|e| fail(format!("REGISTER: {e}")))?;
            let res = Resources::from_proto(&task.resources).map_err(|e| fail(format!("REGISTER: task {tid}: {e}")))?;
            reported.push((fid, tid, task, status, res));
        }
        let registered_time = self.agents.get(&agent_id).map(|a| a.registered_time).unwrap_or_else(now_seconds);
        // Reservations and volumes are recorded by the master before the agent hears of them: when an agent
        // comes back with the same resources but older reservations (it missed an ApplyOperations), the master's
        // record wins and is sent to it again.
        let mut resend_total = false;
        if let Some(known) = self.agents.get(&agent_id)
            && known.total != total
            && known.total.flatten() == total.flatten()
        {
            warn!(agent = %agent_id, agent_view = %total, master_view = %known.total, "agent missed reservation changes; resending them");
            total = known.total.clone();
            resend_total = true;
        }
        let changed = self.agents.get(&agent_id).is_none_or(|a| a.total != total || a.info.hostname != info.hostname);
        if changed {
            self.write(vec![Change::PutAgent(AgentRecord {
                id: agent_id.to_string(),
                hostname: info.hostname.clone(),
                port: info.port,
                resources: total.to_string(),
                registered_time,
            })])
            .await?;
        }
        // Replace any previous connection and offers of this agent.
        self.rescind_agent_offers(&agent_id);
        self.allocator.remove_agent(&agent_id);
        let previous = self.agents.remove(&agent_id);
        if let Some((old_conn, _)) = previous.as_ref().and_then(|a| a.conn.as_ref()) {
            self.agent_conns.remove(old_conn);
        }
        let was_unreachable = previous.as_ref().is_some_and(|a| a.state == AgentState::Unreachable);
        let mut known: HashSet<(FrameworkId, TaskId)> = previous.map(|a| a.tasks).unwrap_or_default();

        let mut used = Vec::new();
        let mut kills = Vec::new();
        let mut agent_tasks = HashSet::new();
        for (fid, tid, task, mut st, res) in reported {
            known.remove(&(fid.clone(), tid.clone()));
            if self.completed_framework_ids.contains(&fid) {
                kills.push((fid, tid, None));
                continue;
            }
            if !self.frameworks.contains_key(&fid) {
                let finfo = reg.frameworks.iter().find(|f| f.id == fid.as_str()).cloned().unwrap_or_else(|| {
                    v1::FrameworkInfo { id: fid.to_string(), name: fid.to_string(), ..Default::default() }
                });
                self.add_recovered_framework(fid.clone(), finfo, now_seconds(), now);
            }
            let state = TaskState::try_from(st.state).unwrap_or(TaskState::TaskUnknown);
            let role = if task.allocation_role.is_empty() { "*".to_string() } else { task.allocation_role.clone() };
            if !state.is_terminal() {
                used.push((fid.clone(), role.clone(), res.clone()));
            }
            agent_tasks.insert((fid.clone(), tid.clone()));
            let f = self.frameworks.get_mut(&fid).expect("ensured above");
            match f.tasks.get_mut(&tid) {
                Some(t) => {
                    let was = t.state;
                    if was != state && t.state.may_become(state) {
                        t.state = state;
                        t.statuses.push((state, now_seconds()));
                        publish(&self.events, || task_event(&fid, &tid, &agent_id, state));
                    }
                    if let Some(g) = t.kill_pending.take() {
                        kills.push((fid.clone(), tid.clone(), g));
                    }
                    if was == TaskState::TaskUnreachable || was_unreachable {
                        st.source = StatusSource::SourceMaster as i32;
                        st.reason = StatusReason::ReasonAgentReregistered as i32;
                        st.uuid.clear();
                        st.message = format!("agent {agent_id} re-registered");
                        let ev = event::Event::Update(event::Update { status: Some(st) });
                        self.send_event(&fid, ev);
                    }
                }
                None => {
                    let t = Task {
                        id: tid.clone(),
                        name: Task::name_unless_id(&task),
                        agent_id: agent_id.clone(),
                        resources: res,
                        role,
                        state,
                        status: Some(st.clone()),
                        statuses: vec![(state, st.timestamp)],
                        kill_pending: None,
                        acked: true,
                    };
                    publish(&self.events, || task_event(&fid, &tid, &agent_id, state));
                    f.tasks.insert(tid, t);
                }
            }
        }
        // Tasks the master had on this agent that the agent no longer knows are gone.
        for (fid, tid) in known {
            let Some(t) = self.frameworks.get_mut(&fid).and_then(|f| f.tasks.get_mut(&tid)) else { continue };
            if t.state.is_terminal() {
                continue;
            }
            t.state = TaskState::TaskLost;
            t.statuses.push((TaskState::TaskLost, now_seconds()));
            publish(&self.events, || task_event(&fid, &tid, &agent_id, TaskState::TaskLost));
            let s = status(&fid, tid.as_str(), agent_id.as_str(), TaskState::TaskLost, StatusReason::ReasonAgentReregistered,
                format!("agent {agent_id} re-registered without task {tid}"));
            t.status = Some(s.clone());
            self.send_event(&fid, event::Event::Update(event::Update { status: Some(s) }));
        }

        self.allocator
            .add_agent(agent_id.clone(), total.clone(), used)
            .map_err(|e| Status::internal(e.to_string()))?;
        if self.drains.contains_key(&agent_id) {
            // Still under maintenance: its resources stay out of offers.
            self.allocator.set_agent_active(&agent_id, false);
        }
        info!(agent = %agent_id, hostname = %info.hostname, resources = %total, tasks = agent_tasks.len(),
            "agent {}", if reregister { "re-registered" } else { "registered" });
        let detail = serde_json::json!({"hostname": info.hostname, "state": "REGISTERED", "reregistered": reregister});
        publish(&self.events, || event_of("AGENT_UPDATED", "agent_id", agent_id.as_str(), detail));
        self.agents.insert(
            agent_id.clone(),
            Agent {
                info,
                total,
                state: AgentState::Registered,
                conn: Some((conn, tx.clone())),
                last_seen: now,
                registered_time,
                tasks: agent_tasks,
                usage: HashMap::new(),
            },
        );
        self.agent_conns.insert(conn, agent_id.clone());
        let _ = tx.send(Ok(v1::MasterMessage {
            message: Some(master_message::Message::Registered(master_message::Registered {
                agent_id: agent_id.to_string(),
                heartbeat_interval_seconds: self.config.agent_heartbeat_interval.as_secs_f64(),
            })),
        }));
        if resend_total {
            let total = self.agents[&agent_id].total.to_proto();
            self.send_to_agent(
                &agent_id,
                master_message::Message::ApplyOperations(master_message::ApplyOperations { operations: Vec::new(), total }),
            );
        }
        for (fid, tid, grace) in kills {
            self.send_to_agent(
                &agent_id,
                master_message::Message::KillTask(master_message::KillTask {
                    framework_id: fid.to_string(),
                    task_id: tid.to_string(),
                    kill_grace_period_seconds: grace,
                }),
            );
        }
        Ok(())
    }

    fn agent_closed(&mut self, conn: u64) {
        let Some(agent_id) = self.agent_conns.remove(&conn) else { return };
        let Some(agent) = self.agents.get_mut(&agent_id) else { return };
        if agent.conn.as_ref().is_some_and(|(c, _)| *c == conn) {
            agent.conn = None;
            if agent.state == AgentState::Registered {
                agent.state = AgentState::Disconnected;
            }
            info!(agent = %agent_id, "agent disconnected; its resources leave the offer pool");
            let detail = serde_json::json!({"state": "DISCONNECTED"});
            publish(&self.events, || event_of("AGENT_UPDATED", "agent_id", agent_id.as_str(), detail));
            self.allocator.set_agent_active(&agent_id, false);
            self.rescind_agent_offers(&agent_id);
        }
    }

    fn status_update(&mut self, agent_id: &AgentId, s: v1::TaskStatus) {
        let ack = |master: &mut Master| {
            if !s.uuid.is_empty() {
                master.send_to_agent(
                    agent_id,
                    master_message::Message::Acknowledge(master_message::Acknowledge {
                        framework_id: s.framework_id.clone(),
                        task_id: s.task_id.clone(),
                        uuid: s.uuid.clone(),
                    }),
                );
            }
        };
        let (Ok(fid), Ok(tid)) = (FrameworkId::new(s.framework_id.clone()), TaskId::new(s.task_id.clone())) else {
            warn!(agent = %agent_id, "status update with an invalid framework or task id; acknowledging to drop it");
            ack(self);
            return;
        };
        let Some(f) = self.frameworks.get_mut(&fid) else {
            debug!(framework = %fid, task = %tid, "update for a framework that is gone; acknowledging it");
            ack(self);
            return;
        };
        let state = TaskState::try_from(s.state).unwrap_or(TaskState::TaskUnknown);
        let Some(task) = f.tasks.get_mut(&tid) else {
            debug!(framework = %fid, task = %tid, "update for a task that is no longer active; acknowledging it");
            ack(self);
            return;
        };
        if &task.agent_id != agent_id {
            warn!(agent = %agent_id, task = %tid, "update from an agent that does not run this task; ignored");
            return;
        }
        // An agent sends a task's next update only once the previous one is acknowledged, and resends only the
        // latest, so a repeat of the latest applied uuid is the only duplicate that can arrive.
        let repeat = !s.uuid.is_empty() && task.status.as_ref().is_some_and(|x| x.uuid == s.uuid);
        let fresh = !repeat;
        let mut recover = None;
        if fresh && task.state.may_become(state) {
            if state != task.state || task.status.as_ref().map(|x| x.healthy) != Some(s.healthy) {
                task.statuses.push((state, s.timestamp));
                publish(&self.events, || task_event(&fid, &tid, agent_id, state));
            }
            task.state = state;
            task.status = Some(s.clone());
            task.acked = s.uuid.is_empty();
            if state.is_terminal() {
                recover = Some((task.role.clone(), task.resources.clone()));
            }
            info!(framework = %fid, task = %tid, state = state.name(), "{}", s.message);
        }
        if repeat {
            // The agent resends it, so no acknowledgement reached it: a re-subscribing framework gets it again.
            task.acked = false;
        }
        if let Some((role, resources)) = recover {
            self.allocator.recover(agent_id, &fid, &role, &resources, None);
        }
        self.send_event(&fid, event::Event::Update(event::Update { status: Some(s) }));
    }

    fn mark_unreachable(&mut self, agent_id: &AgentId) {
        self.rescind_agent_offers(agent_id);
        self.allocator.remove_agent(agent_id);
        let Some(agent) = self.agents.get_mut(agent_id) else { return };
        warn!(agent = %agent_id, "agent unreachable: no message within the ping timeout");
        agent.state = AgentState::Unreachable;
        let detail = serde_json::json!({"state": "UNREACHABLE"});
        publish(&self.events, || event_of("AGENT_UPDATED", "agent_id", agent_id.as_str(), detail));
        if let Some((conn, tx)) = agent.conn.take() {
            let _ = tx.send(Err(Status::unavailable("agent marked unreachable after its ping timeout")));
            self.agent_conns.remove(&conn);
        }
        let tasks: Vec<(FrameworkId, TaskId)> = agent.tasks.iter().cloned().collect();
        for (fid, tid) in tasks {
            let Some(t) = self.frameworks.get_mut(&fid).and_then(|f| f.tasks.get_mut(&tid)) else { continue };
            if t.state.is_terminal() {
                continue;
            }
            t.state = TaskState::TaskUnreachable;
            t.statuses.push((TaskState::TaskUnreachable, now_seconds()));
            publish(&self.events, || task_event(&fid, &tid, agent_id, TaskState::TaskUnreachable));
            let s = status(&fid, tid.as_str(), agent_id.as_str(), TaskState::TaskUnreachable,
                StatusReason::ReasonAgentUnreachable, format!("agent {agent_id} is unreachable"));
            self.send_event(&fid, event::Event::Update(event::Update { status: Some(s) }));
        }
    }

    // ------------------------------------------------------------------------------------------------------------
    // Time

    async fn housekeeping(&mut self, now: Instant) {
        let expired: Vec<OfferId> = self
            .offers
            .iter()
            .filter(|(_, o)| o.expires.is_some_and(|t| t <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for offer_id in expired {
            debug!(offer = %offer_id, "offer timed out; rescinding");
            self.rescind(&offer_id, true);
        }
        let reregister_deadline = self.started + self.config.agent_reregister_timeout;
        let silent: Vec<AgentId> = self
            .agents
            .iter()
            .filter(|(_, a)| match a.state {
                AgentState::Registered | AgentState::Disconnected => {
                    now.duration_since(a.last_seen) > self.config.agent_ping_timeout
                }
                AgentState::Recovering => now > reregister_deadline,
                AgentState::Unreachable => false,
            })
            .map(|(id, _)| id.clone())
            .collect();
        for agent_id in silent {
            self.mark_unreachable(&agent_id);
        }
        self.kill_drained();
        let gone: Vec<FrameworkId> = self
            .frameworks
            .iter()
            .filter(|(_, f)| {
                f.conn.is_none()
                    && f.disconnected_at.is_some_and(|t| {
                        now.duration_since(t).as_secs_f64() >= f.info.failover_timeout_seconds
                    })
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.remove_framework(&id, "its failover timeout passed").await;
        }
        if now.duration_since(self.last_heartbeat) >= self.config.framework_heartbeat_interval {
            self.last_heartbeat = now;
            let ids: Vec<FrameworkId> = self.frameworks.keys().cloned().collect();
            for id in ids {
                self.send_event(&id, event::Event::Heartbeat(event::Heartbeat {}));
            }
        }
    }

    // ------------------------------------------------------------------------------------------------------------
    // Sending

    fn send_event(&mut self, framework_id: &FrameworkId, event: event::Event) {
        if let Some((_, tx)) = self.frameworks.get(framework_id).and_then(|f| f.conn.as_ref()) {
            match &event {
                event::Event::Update(_) => {
                    METRICS.status_updates.inc();
                }
                event::Event::Offers(o) => METRICS.offers("sent", o.offers.len()),
                _ => {}
            }
            let _ = tx.send(Ok(v1::Event { event: Some(event) }));
        }
    }

    fn send_to_agent(&self, agent_id: &AgentId, message: master_message::Message) {
        if let Some((_, tx)) = self.agents.get(agent_id).and_then(|a| a.conn.as_ref()) {
            let _ = tx.send(Ok(v1::MasterMessage { message: Some(message) }));
        }
    }
}

fn error_event(message: &str) -> v1::Event {
    v1::Event { event: Some(event::Event::Error(event::Error { message: message.to_string() })) }
}

/// One checked operation of an ACCEPT.
enum Step {
    Launch(Vec<v1::TaskInfo>, bool),
    Convert { name: &'static str, from: Resources, to: Resources, op: v1::Operation },
}

/// A status answered by reconciliation: no uuid, reason RECONCILIATION.
fn reconciled(mut s: v1::TaskStatus) -> v1::TaskStatus {
    s.uuid.clear();
    s.reason = StatusReason::ReasonReconciliation as i32;
    s.source = StatusSource::SourceMaster as i32;
    s.timestamp = now_seconds();
    s
}

fn refuse_duration(filters: Option<&v1::Filters>) -> Result<Duration, Status> {
    let secs = filters.and_then(|f| f.refuse_seconds).unwrap_or(DEFAULT_REFUSE_SECONDS);
    Ok(Duration::from_secs_f64(valid_seconds("filters.refuse_seconds", secs)?))
}

fn push_bounded<T>(queue: &mut VecDeque<T>, item: T, max: usize) {
    if queue.len() >= max {
        queue.pop_front();
    }
    queue.push_back(item);
}
