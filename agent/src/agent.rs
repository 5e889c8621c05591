//! The agent's event loop: one actor owns the tasks, the status update manager and the master connection.
//!
//! * A connection task keeps one `AgentService.Session` stream to a master open, reconnecting with backoff and
//!   cycling through `--master` addresses; every new stream starts with REGISTER (with the checkpointed agent id
//!   and every task the agent still has, so a restarted master can rebuild its view).
//! * Each task gets a supervisor task that starts it through the shim and waits for the shim to exit.
//! * Status updates go through [`StatusUpdateManager`]: journalled to disk first, then sent, resent until acked.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use corral_proto::v1::{self, agent_message, master_message};
use corral_proto::v1::{StatusReason, StatusSource, TaskState};
use corral_discovery::{Attempt, Finder, Masters};
use corral_proto::{Resources, now_seconds};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tracing::{debug, info, warn};

use crate::checkpoint::Checkpoint;
use crate::health::{self, HealthState, Verdict};
use crate::isolation::{self, Isolator, Limits, Usage};
use crate::launcher::Launcher;
use crate::metrics::METRICS;
use crate::shim::{self, ExitRecord, ShimSpec};
use crate::status_update::{AckOutcome, Backoff, StatusUpdateManager, StreamKey};

const MAX_COMPLETED_TASKS: usize = 500;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Master addresses (`host:port`), tried in turn.
    pub masters: Masters,
    pub hostname: String,
    /// The HTTP port this agent serves on (sent to the master).
    pub port: u16,
    pub work_dir: PathBuf,
    pub resources: Resources,
    pub attributes: Vec<v1::Attribute>,
    /// Grace between SIGTERM and SIGKILL when a task does not set its own.
    pub default_kill_grace: Duration,
    pub update_backoff: Backoff,
    /// The `corral-agent` binary, run as `shim`.
    pub agent_exe: PathBuf,
    /// Hard-cap tasks' cpu time at their `cpus` (CFS quota), not only weight it.
    pub cfs_quota: bool,
    /// Limit on processes per task.
    pub max_pids: Option<u64>,
    /// How often task usage is sampled and reported to the master.
    pub usage_interval: Duration,
}

/// Something that happened, for the actor.
pub enum Event {
    Connected { conn: u64, tx: mpsc::UnboundedSender<v1::AgentMessage> },
    Disconnected { conn: u64 },
    FromMaster { conn: u64, message: Box<v1::MasterMessage> },
    TaskStarted { key: StreamKey, shim_pid: u32, pid: u32 },
    TaskLaunchFailed { key: StreamKey, message: String },
    TaskExited { key: StreamKey, record: Option<ExitRecord> },
    /// The task's cgroup was emptied and removed (off the actor thread); now its end can be reported.
    TaskReaped { key: StreamKey, record: Option<ExitRecord>, oom: bool },
    State { reply: oneshot::Sender<serde_json::Value> },
    /// Set the task gauges of the metrics (before a scrape).
    PublishMetrics { reply: oneshot::Sender<()> },
    HealthResult { key: StreamKey, result: Result<(), String> },
    /// Kill every task (SIGUSR1: drain before the agent goes away); replies when none is left running.
    KillAll { reply: oneshot::Sender<()> },
}

struct TaskRun {
    framework: v1::FrameworkInfo,
    info: v1::TaskInfo,
    state: TaskState,
    latest: v1::TaskStatus,
    sandbox: PathBuf,
    run_dir: PathBuf,
    shim_pid: Option<u32>,
    pid: Option<u32>,
    /// A kill arrived before the task started: (grace override).
    kill_requested: Option<Option<f64>>,
    exited: bool,
    /// The task's cgroup below the isolator's root.
    cgroup: String,
    limits: Limits,
    usage: Option<Usage>,
    health: Option<HealthState>,
    health_checker: Option<tokio::task::AbortHandle>,
    /// Why the task is being killed because of its health, if it is.
    unhealthy: Option<String>,
    /// When RUN_TASK arrived, until the task runs (for the launch latency metric).
    launched_at: Option<Instant>,
}

impl TaskRun {
    /// A task that has not started (or been re-attached) yet.
    #[allow(clippy::too_many_arguments)]
    fn new(
        framework: v1::FrameworkInfo,
        info: v1::TaskInfo,
        state: TaskState,
        latest: v1::TaskStatus,
        sandbox: PathBuf,
        run_dir: PathBuf,
        cgroup: String,
        limits: Limits,
    ) -> TaskRun {
        TaskRun {
            framework,
            info,
            state,
            latest,
            sandbox,
            run_dir,
            shim_pid: None,
            pid: None,
            kill_requested: None,
            exited: false,
            cgroup,
            limits,
            usage: None,
            health: None,
            health_checker: None,
            unhealthy: None,
            launched_at: None,
        }
    }
}

/// The agent's state. Mutated only by [`Agent::run`].
pub struct Agent {
    config: AgentConfig,
    agent_id: Option<String>,
    conn: Option<(u64, mpsc::UnboundedSender<v1::AgentMessage>)>,
    registered: bool,
    heartbeat: Duration,
    last_heartbeat: Instant,
    tasks: BTreeMap<StreamKey, TaskRun>,
    completed: VecDeque<serde_json::Value>,
    updates: StatusUpdateManager,
    checkpoint: Checkpoint,
    launcher: Launcher,
    isolator: Arc<dyn Isolator>,
    events: mpsc::UnboundedSender<Event>,
    drain_waiters: Vec<oneshot::Sender<()>>,
    last_usage: Instant,
}

impl Agent {
    pub fn new(config: AgentConfig, isolator: Arc<dyn Isolator>, events: mpsc::UnboundedSender<Event>) -> Self {
        let checkpoint = Checkpoint::new(&config.work_dir);
        Agent {
            agent_id: checkpoint.agent_id(),
            launcher: Launcher::new(config.work_dir.clone(), config.agent_exe.clone()),
            updates: StatusUpdateManager::new(config.update_backoff),
            checkpoint,
            config,
            conn: None,
            registered: false,
            heartbeat: Duration::from_secs(1),
            last_heartbeat: Instant::now(),
            tasks: BTreeMap::new(),
            completed: VecDeque::new(),
            isolator,
            events,
            drain_waiters: Vec::new(),
            last_usage: Instant::now(),
        }
    }

    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Event>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = rx.recv() => match event {
                    Some(event) => self.handle(event),
                    None => break,
                },
                _ = tick.tick() => self.tick(Instant::now()),
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Connected { conn, tx } => {
                self.conn = Some((conn, tx));
                self.registered = false;
                self.send(agent_message::Message::Register(self.registration()));
            }
            Event::Disconnected { conn } => {
                if self.conn.as_ref().is_some_and(|(c, _)| *c == conn) {
                    self.conn = None;
                    self.registered = false;
                }
            }
            Event::FromMaster { conn, message } => {
                if self.conn.as_ref().is_some_and(|(c, _)| *c == conn)
                    && let Some(message) = message.message
                {
                    self.on_master_message(message);
                }
            }
            Event::TaskStarted { key, shim_pid, pid } => self.task_started(key, shim_pid, pid),
            Event::TaskLaunchFailed { key, message } => {
                warn!(framework = %key.0, task = %key.1, "launch failed: {message}");
                if let Some(t) = self.tasks.get_mut(&key) {
                    t.exited = true;
                }
                self.cleanup_isolation(&key);
                self.update(&key, TaskState::TaskFailed, StatusReason::ReasonContainerLaunchFailed, message);
            }
            Event::TaskExited { key, record } => self.task_exited(key, record),
            Event::TaskReaped { key, record, oom } => self.task_reaped(key, record, oom),
            Event::HealthResult { key, result } => self.health_result(key, result),
            Event::State { reply } => {
                let _ = reply.send(self.state_json());
            }
            Event::PublishMetrics { reply } => {
                self.publish_metrics();
                let _ = reply.send(());
            }
            Event::KillAll { reply } => {
                let keys: Vec<StreamKey> = self.tasks.iter().filter(|(_, t)| !t.exited).map(|(k, _)| k.clone()).collect();
                for key in keys {
                    self.kill(&key, None);
                }
                self.drain_waiters.push(reply);
                self.check_drained();
            }
        }
    }

    /// Rebuilds the tasks of a previous run of this agent from its checkpoint (call before [`Agent::run`]):
    /// re-attaches to live shims, reports tasks that ended meanwhile with their real exit status, and queues
    /// every unacknowledged update for resending. Returns how many tasks were recovered.
    pub fn recover(&mut self) -> usize {
        let now = Instant::now();
        let Some(agent_id) = self.agent_id.clone() else { return 0 };
        let mut recovered = 0;
        for run_dir in self.checkpoint.task_dirs() {
            let Some((framework, info, replayed)) = self.checkpoint.load_task(&run_dir) else {
                warn!(dir = %run_dir.display(), "unreadable task checkpoint; skipped");
                continue;
            };
            let Some(latest) = replayed.latest.clone() else { continue };
            let state = TaskState::try_from(latest.state).unwrap_or(TaskState::TaskUnknown);
            if state.is_terminal() && replayed.pending.is_empty() {
                continue; // ended, and the framework knows
            }
            let key: StreamKey = (framework.id.clone(), info.task_id.clone());
            let resources = Resources::from_proto(&info.resources).unwrap_or_default();
            let shim_pid = self.launcher.live_shim(&run_dir);
            let mut run = TaskRun::new(
                framework,
                info,
                state,
                latest,
                self.launcher.sandbox_dir(&key.0, &key.1),
                run_dir.clone(),
                self.checkpoint
                    .task_cgroup(&run_dir)
                    .unwrap_or_else(|| isolation::task_path(&agent_id, &key.0, &key.1, |_| false)),
                Limits::from_resources(&resources, self.config.cfs_quota, self.config.max_pids),
            );
            run.shim_pid = shim_pid;
            run.pid = self.launcher.task_pid(&run_dir);
            run.exited = state.is_terminal();
            self.tasks.insert(key.clone(), run);
            self.updates.restore(key.clone(), replayed.pending, now);
            recovered += 1;
            if state.is_terminal() {
                continue; // its terminal update is pending and goes out on registration
            }
            match (self.launcher.exit_record(&run_dir), shim_pid) {
                (Some(record), _) => self.task_exited(key, Some(record)),
                (None, Some(pid)) => {
                    info!(framework = %key.0, task = %key.1, shim = pid, "re-attached to a running task");
                    self.watch_recovered(key.clone(), run_dir);
                    self.start_health_checks(&key);
                }
                (None, None) => {
                    if let Some(t) = self.tasks.get_mut(&key) {
                        t.exited = true;
                    }
                    self.cleanup_isolation(&key);
                    self.update(&key, TaskState::TaskFailed, StatusReason::ReasonAgentRestarted,
                        "the task's shim is gone (was the node restarted?)".to_string());
                }
            }
        }
        recovered
    }

    /// Waits for a shim this agent did not start (and so cannot `wait` for) to finish.
    fn watch_recovered(&self, key: StreamKey, run_dir: PathBuf) {
        let launcher = self.launcher.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            while launcher.exit_record(&run_dir).is_none() && launcher.live_shim(&run_dir).is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let record = launcher.exit_record(&run_dir);
            let _ = events.send(Event::TaskExited { key, record });
        });
    }

    fn registration(&self) -> v1::RegisterAgent {
        let mut frameworks: BTreeMap<String, v1::FrameworkInfo> = BTreeMap::new();
        let mut tasks = Vec::new();
        let mut statuses = Vec::new();
        for t in self.tasks.values() {
            frameworks.insert(t.framework.id.clone(), t.framework.clone());
            tasks.push(t.info.clone());
            let mut s = t.latest.clone();
            s.state = t.state as i32;
            statuses.push(s);
        }
        v1::RegisterAgent {
            agent_info: Some(v1::AgentInfo {
                id: self.agent_id.clone().unwrap_or_default(),
                hostname: self.config.hostname.clone(),
                port: self.config.port as u32,
                resources: self.config.resources.to_proto(),
                attributes: self.config.attributes.clone(),
                version: corral_proto::VERSION.to_string(),
            }),
            tasks,
            task_statuses: statuses,
            frameworks: frameworks.into_values().collect(),
        }
    }

    fn on_master_message(&mut self, message: master_message::Message) {
        use master_message::Message;
        match message {
            Message::Registered(r) => {
                if self.agent_id.as_deref() != Some(r.agent_id.as_str()) {
                    if let Err(e) = self.checkpoint.save_agent_id(&r.agent_id) {
                        warn!("cannot checkpoint the agent id: {e}");
                    }
                    self.agent_id = Some(r.agent_id.clone());
                }
                if r.heartbeat_interval_seconds.is_finite() && r.heartbeat_interval_seconds > 0.0 {
                    self.heartbeat = Duration::from_secs_f64(r.heartbeat_interval_seconds.clamp(0.05, 60.0));
                }
                self.registered = true;
                info!(agent = %r.agent_id, "registered with the master");
                for s in self.updates.resend_all(Instant::now()) {
                    self.send(agent_message::Message::StatusUpdate(s));
                }
            }
            Message::RunTask(run) => self.run_task(run),
            Message::KillTask(k) => {
                let key = (k.framework_id.clone(), k.task_id.clone());
                if self.tasks.contains_key(&key) {
                    self.kill(&key, k.kill_grace_period_seconds);
                } else {
                    // The master believes in a task this agent does not have.
                    let status = self.status_for(&key, TaskState::TaskLost, StatusReason::ReasonTaskUnknown,
                        format!("task {} is not known to this agent", k.task_id));
                    self.deliver(&key, status, None);
                }
            }
            Message::Acknowledge(a) => self.acknowledge(a),
            Message::ApplyOperations(ops) => self.apply_operations(ops),
            Message::Shutdown(s) => warn!("master asked this agent to shut down: {}", s.message),
        }
    }

    /// Creates and destroys volume directories for CREATE and DESTROY, then checkpoints the new resources.
    fn apply_operations(&mut self, ops: master_message::ApplyOperations) {
        use v1::operation::Operation;
        for op in ops.operations.iter().filter_map(|o| o.operation.as_ref()) {
            let (list, create) = match op {
                Operation::Create(c) => (&c.volumes, true),
                Operation::Destroy(d) => (&d.volumes, false),
                _ => continue,
            };
            let Ok(volumes) = Resources::from_proto(list) else { continue };
            for (role, v, _) in volumes.volumes() {
                let dir = self.launcher.volume_dir(&role, &v.persistence_id);
                let result = if create { std::fs::create_dir_all(&dir) } else { std::fs::remove_dir_all(&dir) };
                match result {
                    Ok(()) => info!(volume = %v.persistence_id, dir = %dir.display(), "{}", if create { "volume created" } else { "volume destroyed" }),
                    Err(e) => warn!(volume = %v.persistence_id, dir = %dir.display(), "volume operation failed: {e}"),
                }
            }
        }
        match Resources::from_proto(&ops.total) {
            Ok(total) => {
                // Every volume of the total has its directory, even if the CREATE itself was missed.
                for (role, v, _) in total.volumes() {
                    let dir = self.launcher.volume_dir(&role, &v.persistence_id);
                    if let Err(e) = std::fs::create_dir_all(&dir) {
                        warn!(volume = %v.persistence_id, dir = %dir.display(), "cannot create the volume directory: {e}");
                    }
                }
                if let Err(e) = self.checkpoint.save_resources(&total) {
                    warn!("cannot checkpoint the agent's resources: {e}");
                }
                self.config.resources = total;
            }
            Err(e) => warn!("master sent invalid resources: {e}"),
        }
    }

    fn run_task(&mut self, run: master_message::RunTask) {
        let (Some(framework), Some(info)) = (run.framework, run.task) else {
            warn!("RUN_TASK without framework or task; ignored");
            return;
        };
        let (Ok(fid), Ok(tid)) = (
            corral_proto::FrameworkId::new(framework.id.clone()),
            corral_proto::TaskId::new(info.task_id.clone()),
        ) else {
            warn!("RUN_TASK with an invalid framework or task id; ignored");
            return;
        };
        let key: StreamKey = (fid.to_string(), tid.to_string());
        if self.tasks.contains_key(&key) {
            warn!(task = %tid, "RUN_TASK for a task that already exists; ignored");
            return;
        }
        let sandbox = self.launcher.sandbox_dir(fid.as_str(), tid.as_str());
        let run_dir = self.launcher.run_dir(fid.as_str(), tid.as_str());
        let resources = Resources::from_proto(&info.resources).unwrap_or_default();
        let limits = Limits::from_resources(&resources, self.config.cfs_quota, self.config.max_pids);
        let agent_id = self.agent_id.clone().unwrap_or_default();
        let cgroup = isolation::task_path(&agent_id, fid.as_str(), tid.as_str(), |p| {
            self.tasks.values().any(|t| t.cgroup == p)
        });
        let placeholder = self.status_for(&key, TaskState::TaskStaging, StatusReason::ReasonUnspecified, String::new());
        let run = TaskRun::new(
            framework.clone(),
            info.clone(),
            TaskState::TaskStaging,
            placeholder,
            sandbox.clone(),
            run_dir.clone(),
            cgroup.clone(),
            limits.clone(),
        );
        self.tasks.insert(key.clone(), TaskRun { launched_at: Some(Instant::now()), ..run });
        self.update(&key, TaskState::TaskStarting, StatusReason::ReasonUnspecified, String::new());

        let mut spec = self.shim_spec(&fid, &info, &sandbox, &resources);
        let volumes: Vec<(PathBuf, String)> = resources
            .volumes()
            .into_iter()
            .map(|(role, v, _)| (self.launcher.volume_dir(&role, &v.persistence_id), v.container_path))
            .collect();
        let isolator = self.isolator.clone();
        let launcher = self.launcher.clone();
        let checkpoint = self.checkpoint.clone();
        let events = self.events.clone();
        let run_dir_ = run_dir.clone();
        tokio::spawn(async move {
            // Checkpointing and creating cgroups block (files, mkdir and writes in every hierarchy): off the actor
            // thread, so launches proceed in parallel. The task starts only once it is checkpointed, so a restarted
            // agent knows every task it started.
            let prepared = tokio::task::spawn_blocking(move || {
                if let Err(e) = checkpoint.save_task(&run_dir_, &framework, &info, &cgroup) {
                    warn!(task = %info.task_id, "cannot checkpoint the task: {e}");
                }
                isolator.prepare(&cgroup, &limits).map_err(|e| e.to_string())
            })
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
            spec.cgroup_procs = match prepared {
                Ok(procs) => procs,
                Err(e) => {
                    let _ = events.send(Event::TaskLaunchFailed { key, message: format!("isolation: {e}") });
                    return;
                }
            };
            match launcher.launch(&run_dir, &spec, &volumes).await {
                Ok(mut started) => {
                    let shim_pid = started.shim.id().unwrap_or(0);
                    let _ = events.send(Event::TaskStarted { key: key.clone(), shim_pid, pid: started.pid });
                    let _ = started.shim.wait().await;
                    let record = launcher.exit_record(&run_dir);
                    let _ = events.send(Event::TaskExited { key, record });
                }
                Err(e) => {
                    let _ = events.send(Event::TaskLaunchFailed { key, message: format!("{e:#}") });
                }
            }
        });
    }

    fn shim_spec(&self, fid: &corral_proto::FrameworkId, info: &v1::TaskInfo, sandbox: &std::path::Path, resources: &Resources) -> ShimSpec {
        let command = info.command.clone().unwrap_or_default();
        let mut env = BTreeMap::new();
        env.insert("PATH".to_string(), std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string()));
        if let Ok(lang) = std::env::var("LANG") {
            env.insert("LANG".into(), lang);
        }
        env.insert("HOME".into(), sandbox.display().to_string());
        env.insert("CORRAL_TASK_ID".into(), info.task_id.clone());
        env.insert("CORRAL_TASK_NAME".into(), info.name.clone());
        env.insert("CORRAL_FRAMEWORK_ID".into(), fid.to_string());
        env.insert("CORRAL_SANDBOX".into(), sandbox.display().to_string());
        env.insert("CORRAL_AGENT_HOST".into(), self.config.hostname.clone());
        env.insert("CORRAL_AGENT_ID".into(), self.agent_id.clone().unwrap_or_default());
        let ports: Vec<u64> = resources.ranges("ports").into_iter().flat_map(|(b, e)| b..=e).take(100).collect();
        for (i, port) in ports.iter().enumerate() {
            env.insert(format!("PORT{i}"), port.to_string());
        }
        if let Some(first) = ports.first() {
            env.insert("PORT".into(), first.to_string());
        }
        env.insert("PORTS".into(), ports.iter().map(u64::to_string).collect::<Vec<_>>().join(","));
        env.extend(command.environment.clone());
        ShimSpec {
            shell: needs_shell(&command),
            value: command.value,
            arguments: command.arguments,
            env,
            sandbox: sandbox.to_path_buf(),
            grace_seconds: self.grace(info, None).as_secs_f64(),
            cgroup_procs: Vec::new(),
        }
    }

    fn grace(&self, info: &v1::TaskInfo, overridden: Option<f64>) -> Duration {
        let secs = overridden
            .filter(|g| g.is_finite() && *g >= 0.0)
            .or(Some(info.kill_grace_period_seconds).filter(|g| g.is_finite() && *g > 0.0))
            .unwrap_or(self.config.default_kill_grace.as_secs_f64());
        Duration::from_secs_f64(secs.min(3600.0))
    }

    fn task_started(&mut self, key: StreamKey, shim_pid: u32, pid: u32) {
        let Some(t) = self.tasks.get_mut(&key) else { return };
        if let Some(at) = t.launched_at.take() {
            METRICS.launch_seconds.observe(at.elapsed().as_secs_f64());
        }
        t.shim_pid = Some(shim_pid);
        t.pid = Some(pid);
        let pending_kill = t.kill_requested.take();
        self.update(&key, TaskState::TaskRunning, StatusReason::ReasonUnspecified, format!("task started with pid {pid}"));
        if let Some(grace) = pending_kill {
            self.kill(&key, grace);
        } else {
            self.start_health_checks(&key);
        }
    }

    /// Starts the task's health checker, if it has a health check.
    fn start_health_checks(&mut self, key: &StreamKey) {
        let Some(t) = self.tasks.get(key) else { return };
        let Some(check) = t.info.health_check.clone() else { return };
        let policy = health::Policy::of(&check);
        let resources = Resources::from_proto(&t.info.resources).unwrap_or_default();
        let Ok(fid) = corral_proto::FrameworkId::new(key.0.clone()) else { return };
        let spec = self.shim_spec(&fid, &t.info, &t.sandbox, &resources);
        let first_port = resources.ranges("ports").first().and_then(|(b, _)| u16::try_from(*b).ok());
        let port = u16::try_from(check.port).ok().filter(|p| *p != 0).or(first_port);
        let target = health::Target { check, port, sandbox: t.sandbox.clone(), env: spec.env.into_iter().collect() };
        let events = self.events.clone();
        let key_for_checker = key.clone();
        let (delay, interval, timeout) = (policy.delay, policy.interval, policy.timeout);
        let checker = tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            loop {
                let result = health::check(&target, timeout).await;
                if events.send(Event::HealthResult { key: key_for_checker.clone(), result }).is_err() {
                    return;
                }
                tokio::time::sleep(interval).await;
            }
        });
        if let Some(t) = self.tasks.get_mut(key) {
            t.health = Some(HealthState::new(policy, Instant::now()));
            t.health_checker = Some(checker.abort_handle());
        }
    }

    fn health_result(&mut self, key: StreamKey, result: Result<(), String>) {
        let Some(t) = self.tasks.get_mut(&key) else { return };
        if t.exited || t.unhealthy.is_some() {
            return;
        }
        let Some(health) = t.health.as_mut() else { return };
        let verdict = health.record(result.is_ok(), Instant::now());
        let detail = result.err().unwrap_or_default();
        match verdict {
            Verdict::Unchanged => {}
            Verdict::Healthy(healthy) => {
                let message = if healthy { "health check passed".to_string() } else { format!("health check failed: {detail}") };
                let state = t.state;
                self.update(&key, state, StatusReason::ReasonTaskCheckStatusUpdated, message);
            }
            Verdict::Kill => {
                warn!(framework = %key.0, task = %key.1, "killing unhealthy task: {detail}");
                t.unhealthy = Some(detail);
                self.kill(&key, None);
            }
        }
    }

    /// The shim exited. Removing the cgroup (kill what is left, wait, rmdir) blocks, so it runs on a blocking
    /// thread; the terminal update follows in [`Agent::task_reaped`], so that when a framework learns a task
    /// ended, nothing of it is left running.
    fn task_exited(&mut self, key: StreamKey, record: Option<ExitRecord>) {
        let Some(t) = self.tasks.get_mut(&key) else { return };
        t.exited = true;
        if let Some(checker) = t.health_checker.take() {
            checker.abort();
        }
        // Ask about OOM before the cgroup (and its counters) is removed.
        let oom = self.isolator.oom_killed(&t.cgroup);
        let (isolator, cgroup, events) = (self.isolator.clone(), t.cgroup.clone(), self.events.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = isolator.cleanup(&cgroup) {
                warn!(cgroup = %cgroup, "isolation cleanup failed: {e}");
            }
            let _ = events.send(Event::TaskReaped { key, record, oom });
        });
    }

    fn task_reaped(&mut self, key: StreamKey, record: Option<ExitRecord>, oom: bool) {
        let Some(t) = self.tasks.get(&key) else { return };
        let unhealthy = t.unhealthy.clone();
        let killing = t.state == TaskState::TaskKilling;
        let mem_mib = t.limits.mem_mib;
        let (state, reason, message) = match &record {
            _ if oom => (
                TaskState::TaskFailed,
                StatusReason::ReasonContainerLimitationMemory,
                format!("Memory limit exceeded: the task used more than its mem:{mem_mib} MiB and was OOM-killed"),
            ),
            Some(r) if unhealthy.is_some() => (
                TaskState::TaskKilled,
                StatusReason::ReasonTaskHealthCheckFailed,
                format!("killed after failing its health check ({}); {}", unhealthy.unwrap_or_default(), shim::describe(r)),
            ),
            None => (
                TaskState::TaskFailed,
                StatusReason::ReasonCommandExecutorFailed,
                "the task's shim died without recording an exit status".to_string(),
            ),
            Some(r) if r.killed || killing => (TaskState::TaskKilled, StatusReason::ReasonKilledByRequest, shim::describe(r)),
            Some(r) if r.code == Some(0) => (TaskState::TaskFinished, StatusReason::ReasonUnspecified, shim::describe(r)),
            Some(r) => (TaskState::TaskFailed, StatusReason::ReasonCommandExecutorFailed, shim::describe(r)),
        };
        info!(framework = %key.0, task = %key.1, state = state.name(), "{message}");
        self.update(&key, state, reason, message);
        self.check_drained();
    }

    /// Removes a task's cgroup in the background (for tasks that never started or whose shim is gone).
    fn cleanup_isolation(&self, key: &StreamKey) {
        let Some(t) = self.tasks.get(key) else { return };
        let (isolator, cgroup) = (self.isolator.clone(), t.cgroup.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = isolator.cleanup(&cgroup) {
                warn!(cgroup = %cgroup, "isolation cleanup failed: {e}");
            }
        });
    }

    fn kill(&mut self, key: &StreamKey, grace_override: Option<f64>) {
        let Some(t) = self.tasks.get(key) else { return };
        if t.exited || t.state.is_terminal() {
            return;
        }
        let grace = self.grace(&t.info, grace_override);
        let (shim_pid, run_dir) = (t.shim_pid, t.run_dir.clone());
        if t.state != TaskState::TaskKilling {
            self.update(key, TaskState::TaskKilling, StatusReason::ReasonKilledByRequest, format!("killing with a {grace:?} grace period"));
        }
        match shim_pid {
            Some(pid) => {
                if let Err(e) = self.launcher.kill(&run_dir, pid, grace) {
                    warn!(task = %key.1, "kill failed: {e:#}");
                }
            }
            None => {
                if let Some(t) = self.tasks.get_mut(key) {
                    t.kill_requested = Some(grace_override);
                }
            }
        }
    }

    fn acknowledge(&mut self, a: master_message::Acknowledge) {
        let key: StreamKey = (a.framework_id, a.task_id);
        let outcome = self.updates.acknowledge(&key, &a.uuid, Instant::now());
        if outcome == AckOutcome::Ignored {
            debug!(task = %key.1, "stale acknowledgement ignored");
            return;
        }
        if let Some(t) = self.tasks.get(&key)
            && let Err(e) = self.checkpoint.journal_ack(&t.run_dir, &a.uuid)
        {
            warn!(task = %key.1, "cannot journal an acknowledgement: {e}");
        }
        match outcome {
            AckOutcome::Next(Some(next)) => self.send(agent_message::Message::StatusUpdate(next)),
            AckOutcome::Finished => {
                self.updates.remove(&key);
                if let Some(t) = self.tasks.remove(&key) {
                    let summary = self.task_json(&key, &t);
                    if self.completed.len() >= MAX_COMPLETED_TASKS {
                        self.completed.pop_front();
                    }
                    self.completed.push_back(summary);
                }
            }
            _ => {}
        }
    }

    fn status_for(&self, key: &StreamKey, state: TaskState, reason: StatusReason, message: String) -> v1::TaskStatus {
        v1::TaskStatus {
            task_id: key.1.clone(),
            state: state as i32,
            agent_id: self.agent_id.clone().unwrap_or_default(),
            source: StatusSource::SourceAgent as i32,
            reason: reason as i32,
            message,
            uuid: uuid::Uuid::new_v4().as_bytes().to_vec(),
            timestamp: now_seconds(),
            healthy: self.tasks.get(key).and_then(|t| t.health.as_ref()).and_then(HealthState::healthy),
            framework_id: key.0.clone(),
        }
    }

    /// Records a new state for a task and delivers the update reliably.
    fn update(&mut self, key: &StreamKey, state: TaskState, reason: StatusReason, message: String) {
        let status = self.status_for(key, state, reason, message);
        let run_dir = match self.tasks.get_mut(key) {
            Some(t) => {
                t.state = state;
                t.latest = status.clone();
                Some(t.run_dir.clone())
            }
            None => None,
        };
        self.deliver(key, status, run_dir);
    }

    fn deliver(&mut self, key: &StreamKey, status: v1::TaskStatus, run_dir: Option<PathBuf>) {
        if let Some(run_dir) = run_dir
            && let Err(e) = self.checkpoint.journal_update(&run_dir, &status)
        {
            warn!(task = %key.1, "cannot journal a status update: {e}");
        }
        let connected = self.registered;
        if let Some(now) = self.updates.update(status, Instant::now(), connected) {
            self.send(agent_message::Message::StatusUpdate(now));
        }
    }

    fn send(&self, message: agent_message::Message) {
        if let Some((_, tx)) = &self.conn {
            let _ = tx.send(v1::AgentMessage { message: Some(message) });
        }
    }

    fn tick(&mut self, now: Instant) {
        if !self.registered {
            return;
        }
        if now.duration_since(self.last_heartbeat) >= self.heartbeat {
            self.last_heartbeat = now;
            self.send(agent_message::Message::Heartbeat(agent_message::Heartbeat {}));
        }
        for s in self.updates.due(now) {
            debug!(task = %s.task_id, "resending unacknowledged status update");
            self.send(agent_message::Message::StatusUpdate(s));
        }
        if now.duration_since(self.last_usage) >= self.config.usage_interval {
            self.last_usage = now;
            self.report_usage();
        }
    }

    /// Samples each running task's cgroup and tells the master.
    fn report_usage(&mut self) {
        let mut report = Vec::new();
        for ((fid, tid), t) in self.tasks.iter_mut().filter(|(_, t)| !t.exited) {
            t.usage = self.isolator.usage(&t.cgroup);
            if let Some(u) = t.usage {
                report.push(v1::resource_usage::TaskUsage {
                    task_id: tid.clone(),
                    framework_id: fid.clone(),
                    cpu_seconds: u.cpu_seconds,
                    mem_rss_bytes: u.mem_bytes,
                });
            }
        }
        if !report.is_empty() {
            self.send(agent_message::Message::Usage(v1::ResourceUsage { tasks: report }));
        }
    }

    fn publish_metrics(&self) {
        METRICS.clear_tasks();
        for ((framework, task), t) in &self.tasks {
            METRICS.tasks.get_or_create(&vec![("state", t.state.name().to_string())]).inc();
            if let (false, Some(u)) = (t.exited, t.usage) {
                let labels = vec![("framework", framework.clone()), ("task", task.clone())];
                METRICS.task_cpu_seconds.get_or_create(&labels).set(u.cpu_seconds);
                METRICS.task_memory_bytes.get_or_create(&labels).set(i64::try_from(u.mem_bytes).unwrap_or(i64::MAX));
            }
        }
    }

    fn check_drained(&mut self) {
        if self.tasks.values().all(|t| t.exited) && !self.drain_waiters.is_empty() {
            if let Some(id) = &self.agent_id {
                self.isolator.release(id);
            }
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn task_json(&self, key: &StreamKey, t: &TaskRun) -> serde_json::Value {
        json!({
            "id": key.1,
            "framework_id": key.0,
            "name": t.info.name,
            "state": t.state.name(),
            "sandbox": t.sandbox.display().to_string(),
            "pid": t.pid,
            "resources": Resources::from_proto(&t.info.resources).unwrap_or_default().to_json_summary(),
            "message": t.latest.message,
            "pending_updates": self.updates.pending(key),
            "cgroup": t.cgroup,
            "healthy": t.health.as_ref().and_then(HealthState::healthy),
            "usage": t.usage.map(|u| json!({"cpu_seconds": u.cpu_seconds, "mem_bytes": u.mem_bytes})),
        })
    }

    fn state_json(&self) -> serde_json::Value {
        let attributes: serde_json::Map<String, serde_json::Value> =
            self.config.attributes.iter().map(|a| (a.name.clone(), json!(a.value))).collect();
        json!({
            "id": self.agent_id,
            "hostname": self.config.hostname,
            "port": self.config.port,
            "version": corral_proto::VERSION,
            "master": self.config.masters.to_string(),
            "registered": self.registered,
            "work_dir": self.config.work_dir.display().to_string(),
            "isolation": self.isolator.name(),
            "resources": self.config.resources.to_json_summary(),
            "resources_text": self.config.resources.to_string(),
            "attributes": attributes,
            "tasks": self.tasks.iter().map(|(k, t)| self.task_json(k, t)).collect::<Vec<_>>(),
            "completed_tasks": self.completed,
        })
    }
}

/// Keeps a session with the leading master open for as long as the agent runs: tries the masters in turn (or the
/// leader etcd names), follows a follower's `corral-leader` hint at once, and paces retries as [`Finder::after`] says.
pub async fn connect_loop(masters: Masters, events: mpsc::UnboundedSender<Event>) {
    use corral_proto::v1::agent_service_client::AgentServiceClient;
    let mut finder = Finder::new(masters);
    let mut conn = 0u64;
    loop {
        let addr = match finder.next().await {
            Ok(addr) => addr,
            Err(e) => {
                debug!("no master to try: {e}");
                let pause = finder.after("", Attempt::Failed);
                tokio::time::sleep(pause.unwrap_or_default()).await;
                continue;
            }
        };
        let connect = async {
            let channel = corral_discovery::endpoint(&addr).map_err(|e| e.to_string())?.connect().await;
            channel.map(AgentServiceClient::new).map_err(|e| e.to_string())
        };
        let attempt = match tokio::time::timeout(corral_discovery::CONNECT_TIMEOUT, connect).await {
            Ok(Ok(mut client)) => {
                conn += 1;
                let (tx, rx) = mpsc::unbounded_channel();
                if events.send(Event::Connected { conn, tx }).is_err() {
                    return;
                }
                let session = client.session(UnboundedReceiverStream::new(rx));
                let attempt = match tokio::time::timeout(corral_discovery::CONNECT_TIMEOUT, session).await {
                    Ok(Ok(response)) => {
                        let mut inbound = response.into_inner();
                        let mut served = false;
                        loop {
                            match inbound.next().await {
                                Some(Ok(message)) => {
                                    served = true;
                                    if events.send(Event::FromMaster { conn, message: Box::new(message) }).is_err() {
                                        return;
                                    }
                                }
                                Some(Err(status)) => {
                                    warn!(master = %addr, "session ended: {}", status.message());
                                    break;
                                }
                                None => {
                                    info!(master = %addr, "master closed the session");
                                    break;
                                }
                            }
                        }
                        // A session refused after it opened (e.g. a REGISTER the master rejects) must back off.
                        if served { Attempt::Ended } else { Attempt::Failed }
                    }
                    Ok(Err(status)) => {
                        let leader = corral_discovery::leader_hint(&status);
                        debug!(master = %addr, ?leader, "session refused: {}", status.message());
                        Attempt::Refused { leader }
                    }
                    Err(_) => {
                        warn!(master = %addr, "master did not answer within {:?}", corral_discovery::CONNECT_TIMEOUT);
                        Attempt::Unreachable
                    }
                };
                let _ = events.send(Event::Disconnected { conn });
                attempt
            }
            Ok(Err(e)) => {
                debug!(master = %addr, "cannot connect: {e}");
                Attempt::Unreachable
            }
            Err(_) => {
                debug!(master = %addr, "connecting timed out");
                Attempt::Unreachable
            }
        };
        if let Some(pause) = finder.after(&addr, attempt) {
            tokio::time::sleep(pause).await;
        }
    }
}

/// Whether a command runs through `/bin/sh -c`. A shell command does; so does a command without arguments (protobuf
/// cannot tell an unset `shell` from false, and `{"value": "sleep 600"}` means a command line), unless its value is
/// a plain path, which runs the same without a shell and one process cheaper.
fn needs_shell(command: &v1::CommandInfo) -> bool {
    const SPECIAL: &[char] = &['|', '&', ';', '<', '>', '(', ')', '$', '`', '\\', '"', '\'', '*', '?', '[', ']', '#', '~', '=', '%', '{', '}', '!'];
    let plain_path = command.value.contains('/') && !command.value.contains(|c: char| c.is_whitespace() || SPECIAL.contains(&c));
    command.shell || (command.arguments.is_empty() && !plain_path)
}


#[cfg(test)]
mod tests {
    use super::*;

    fn command(value: &str, shell: bool, arguments: &[&str]) -> v1::CommandInfo {
        v1::CommandInfo {
            value: value.into(),
            shell,
            arguments: arguments.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn only_plain_paths_without_arguments_skip_the_shell() {
        assert!(!needs_shell(&command("/bin/true", false, &[])), "a plain path runs directly");
        assert!(!needs_shell(&command("./run.sh", false, &[])));
        assert!(!needs_shell(&command("/bin/echo", false, &["a b"])), "arguments mean exec");
        assert!(needs_shell(&command("/bin/true", true, &[])), "an explicit shell is kept");
        for line in ["sleep 600", "true", "/bin/echo $HOME", "/x;rm", "/bin/a|b", "/bin/a>b", "FOO=1 /bin/a", "/bin/t*"] {
            assert!(needs_shell(&command(line, false, &[])), "{line:?} is a command line");
        }
    }
}
