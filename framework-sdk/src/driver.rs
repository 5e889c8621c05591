//! The scheduler driver: owns the subscription to the master and calls the [`Scheduler`] for each event.
//!
//! Invariants:
//! * the framework id from the first SUBSCRIBED is reused on every re-subscription (failover keeps tasks);
//! * a status update with a uuid is acknowledged only after `Scheduler::status_update` returned, in order, batched
//!   with the others that arrive while an acknowledgement call is in flight;
//! * no event for 3 heartbeat intervals means the stream is dead: reconnect;
//! * masters are tried in turn (or the leader etcd names, for `etcd://`); a master that answers UNAVAILABLE with a
//!   `corral-leader` hint is followed at once; only failures back off (100 ms doubling to 1 s, with jitter).

use std::sync::Arc;
use std::time::Duration;

use corral_discovery::{Attempt, Finder, Masters};
use corral_proto::v1::{self, event, scheduler_client::SchedulerClient};
use tokio::sync::{Mutex, mpsc, watch};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::Scheduler;

/// Why the driver stopped, or why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("not subscribed to a master right now; retry after the next registered() callback")]
    NotSubscribed,
    #[error("the master refused the subscription: {0}")]
    Refused(String),
    #[error("the master removed this framework: {0}")]
    Removed(String),
    #[error("call failed: {0}")]
    Call(#[from] tonic::Status),
    #[error("invalid argument: {0}")]
    Invalid(String),
}

#[derive(Clone)]
struct Session {
    client: SchedulerClient<Channel>,
    header: v1::CallHeader,
}

/// A handle for making calls to the master; cheap to clone, valid across reconnections.
#[derive(Clone)]
pub struct Driver {
    session: Arc<Mutex<Option<Session>>>,
    framework_id: Arc<Mutex<Option<String>>>,
    stop: Arc<watch::Sender<bool>>,
}

impl Driver {
    async fn session(&self) -> Result<Session, DriverError> {
        self.session.lock().await.clone().ok_or(DriverError::NotSubscribed)
    }

    /// The framework id, once subscribed.
    pub async fn framework_id(&self) -> Option<String> {
        self.framework_id.lock().await.clone()
    }

    /// Accepts offers (all on one agent) with the given operations.
    pub async fn accept<I, S>(
        &self,
        offer_ids: I,
        operations: Vec<v1::Operation>,
        refuse_seconds: Option<f64>,
    ) -> Result<(), DriverError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let s = self.session().await?;
        let req = v1::AcceptRequest {
            header: Some(s.header.clone()),
            offer_ids: offer_ids.into_iter().map(|id| id.as_ref().to_string()).collect(),
            operations,
            filters: Some(v1::Filters { refuse_seconds }),
        };
        s.client.clone().accept(req).await?;
        Ok(())
    }

    /// Launches tasks on one offer; what the tasks leave unused is declined with the default filter.
    pub async fn launch(&self, offer: &v1::Offer, tasks: Vec<v1::TaskInfo>) -> Result<(), DriverError> {
        self.launch_with(offer, tasks, None).await
    }

    /// Launches tasks on one offer, declining what is left with `refuse_seconds`.
    pub async fn launch_with(
        &self,
        offer: &v1::Offer,
        tasks: Vec<v1::TaskInfo>,
        refuse_seconds: Option<f64>,
    ) -> Result<(), DriverError> {
        self.accept([&offer.id], vec![crate::ops::launch(tasks)], refuse_seconds).await
    }

    /// Declines offers; they are not offered again for `refuse_seconds` (master default 5 s).
    pub async fn decline<I, S>(&self, offer_ids: I, refuse_seconds: Option<f64>) -> Result<(), DriverError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let s = self.session().await?;
        let req = v1::DeclineRequest {
            header: Some(s.header.clone()),
            offer_ids: offer_ids.into_iter().map(|id| id.as_ref().to_string()).collect(),
            filters: Some(v1::Filters { refuse_seconds }),
        };
        s.client.clone().decline(req).await?;
        Ok(())
    }

    /// Asks for offers again in `roles` (all when empty), clearing decline filters.
    pub async fn revive(&self, roles: Vec<String>) -> Result<(), DriverError> {
        let s = self.session().await?;
        s.client.clone().revive(v1::ReviveRequest { header: Some(s.header.clone()), roles }).await?;
        Ok(())
    }

    /// Stops offers in `roles` (all when empty) until [`Driver::revive`].
    pub async fn suppress(&self, roles: Vec<String>) -> Result<(), DriverError> {
        let s = self.session().await?;
        s.client.clone().suppress(v1::SuppressRequest { header: Some(s.header.clone()), roles }).await?;
        Ok(())
    }

    /// Kills a task (SIGTERM, then SIGKILL after its grace period, or `grace_seconds` when given).
    pub async fn kill(&self, task_id: &str, agent_id: &str, grace_seconds: Option<f64>) -> Result<(), DriverError> {
        let s = self.session().await?;
        let req = v1::KillRequest {
            header: Some(s.header.clone()),
            task_id: task_id.into(),
            agent_id: agent_id.into(),
            kill_grace_period_seconds: grace_seconds,
        };
        s.client.clone().kill(req).await?;
        Ok(())
    }

    /// Asks for the latest state of `tasks` (task id, agent id), or of every task when empty.
    pub async fn reconcile(&self, tasks: Vec<(String, String)>) -> Result<(), DriverError> {
        let s = self.session().await?;
        let tasks = tasks
            .into_iter()
            .map(|(task_id, agent_id)| v1::reconcile_request::Task { task_id, agent_id })
            .collect();
        s.client.clone().reconcile(v1::ReconcileRequest { header: Some(s.header.clone()), tasks }).await?;
        Ok(())
    }

    /// Tears the framework down (all its tasks are killed) and stops the driver.
    pub async fn teardown(&self) -> Result<(), DriverError> {
        let s = self.session().await?;
        let result = s.client.clone().teardown(v1::TeardownRequest { header: Some(s.header.clone()) }).await;
        self.stop();
        result?;
        Ok(())
    }

    /// Makes [`SchedulerDriver::run`] return after the current callback. Tasks keep running until the
    /// framework's failover timeout passes.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Runs a [`Scheduler`] against a cluster.
pub struct SchedulerDriver {
    masters: Masters,
    framework: v1::FrameworkInfo,
    reconcile_on_subscribe: bool,
}

impl SchedulerDriver {
    /// `masters` is where to find the leader (see [`Masters::parse`]: `h1:5050,h2:5050` or `etcd://h:2379`);
    /// `framework.id` may be set to re-subscribe as an existing framework.
    pub fn new(masters: Masters, framework: v1::FrameworkInfo) -> Self {
        SchedulerDriver { masters, framework, reconcile_on_subscribe: true }
    }

    /// Whether to ask for implicit reconciliation after every (re-)subscription (default true).
    pub fn reconcile_on_subscribe(mut self, on: bool) -> Self {
        self.reconcile_on_subscribe = on;
        self
    }

    /// Runs until [`Driver::stop`] or [`Driver::teardown`], or until the master refuses or removes the framework.
    pub async fn run<S: Scheduler>(self, mut scheduler: S) -> Result<(), DriverError> {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let driver = Driver {
            session: Arc::new(Mutex::new(None)),
            framework_id: Arc::new(Mutex::new((!self.framework.id.is_empty()).then(|| self.framework.id.clone()))),
            stop: Arc::new(stop_tx),
        };
        let mut finder = Finder::new(self.masters.clone());
        loop {
            if *stop_rx.borrow() {
                return Ok(());
            }
            let outcome = tokio::select! {
                outcome = async {
                    match finder.next().await {
                        Ok(master) => self.session(&master, &driver, &mut scheduler).await.map(|end| (master, end)),
                        Err(e) => {
                            debug!("no master to try: {e}");
                            Ok((String::new(), SessionEnd::Over(Attempt::Failed)))
                        }
                    }
                } => outcome,
                _ = stop_rx.wait_for(|stopped| *stopped) => return Ok(()),
            };
            *driver.session.lock().await = None;
            let (master, attempt) = match outcome {
                Ok((_, SessionEnd::Stopped)) => return Ok(()),
                Ok((master, SessionEnd::Over(attempt))) => (master, attempt),
                Err(DriverError::Removed(_)) if *stop_rx.borrow() => return Ok(()),
                Err(e) => return Err(e),
            };
            if attempt == Attempt::Ended {
                scheduler.disconnected(&driver).await;
            }
            if *stop_rx.borrow() {
                return Ok(());
            }
            if let Some(pause) = finder.after(&master, attempt) {
                tokio::time::sleep(pause).await;
            }
        }
    }

    /// One subscription: connect, subscribe, dispatch events until the stream ends.
    async fn session<S: Scheduler>(
        &self,
        master: &str,
        driver: &Driver,
        scheduler: &mut S,
    ) -> Result<SessionEnd, DriverError> {
        let unreachable = Ok(SessionEnd::Over(Attempt::Unreachable));
        let connect = async {
            let channel = corral_discovery::endpoint(master).map_err(|e| e.to_string())?.connect().await;
            channel.map(SchedulerClient::new).map_err(|e| e.to_string())
        };
        let mut client = match tokio::time::timeout(corral_discovery::CONNECT_TIMEOUT, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                debug!(master, "cannot connect: {e}");
                return unreachable;
            }
            Err(_) => {
                debug!(master, "connecting timed out");
                return unreachable;
            }
        };
        let mut info = self.framework.clone();
        if let Some(id) = driver.framework_id.lock().await.clone() {
            info.id = id;
        }
        let subscribe = client.subscribe(v1::SubscribeRequest { framework_info: Some(info) });
        let subscribed = match tokio::time::timeout(corral_discovery::CONNECT_TIMEOUT, subscribe).await {
            Ok(subscribed) => subscribed,
            Err(_) => {
                debug!(master, "subscribe was not answered within {:?}", corral_discovery::CONNECT_TIMEOUT);
                return unreachable;
            }
        };
        let mut stream = match subscribed {
            Ok(r) => r.into_inner(),
            Err(status) => {
                return match status.code() {
                    tonic::Code::InvalidArgument
                    | tonic::Code::NotFound
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::PermissionDenied => Err(DriverError::Refused(status.message().to_string())),
                    tonic::Code::Unavailable => {
                        let leader = corral_discovery::leader_hint(&status);
                        debug!(master, ?leader, "subscribe refused: {}", status.message());
                        Ok(SessionEnd::Over(Attempt::Refused { leader }))
                    }
                    _ => {
                        debug!(master, "subscribe failed: {}", status.message());
                        Ok(SessionEnd::Over(Attempt::Failed))
                    }
                };
            }
        };
        let mut silence = Duration::from_secs(30);
        let mut subscribed = false;
        let mut acks = None;
        loop {
            let next = match tokio::time::timeout(silence, stream.next()).await {
                Ok(next) => next,
                Err(_) => {
                    warn!(master, "no event for {silence:?}; reconnecting");
                    return Ok(SessionEnd::Over(ended(subscribed)));
                }
            };
            let event = match next {
                Some(Ok(v1::Event { event: Some(e) })) => e,
                Some(Ok(_)) => continue,
                Some(Err(status)) => {
                    debug!(master, "event stream failed: {}", status.message());
                    return Ok(SessionEnd::Over(ended(subscribed)));
                }
                None => return Ok(SessionEnd::Over(ended(subscribed))),
            };
            match event {
                event::Event::Subscribed(s) => {
                    subscribed = true;
                    silence = Duration::from_secs_f64((s.heartbeat_interval_seconds * 3.0).clamp(1.0, 300.0));
                    *driver.framework_id.lock().await = Some(s.framework_id.clone());
                    let header = v1::CallHeader { framework_id: s.framework_id.clone(), stream_id: s.stream_id };
                    acks = Some(spawn_acknowledger(client.clone(), header.clone()));
                    *driver.session.lock().await = Some(Session { client: client.clone(), header });
                    info!(framework = %s.framework_id, master = %s.master, "subscribed");
                    scheduler.registered(driver, &s.framework_id, &s.master).await;
                    if self.reconcile_on_subscribe
                        && let Err(e) = driver.reconcile(Vec::new()).await
                    {
                        warn!("implicit reconciliation failed: {e}");
                    }
                }
                event::Event::Offers(o) => scheduler.offers(driver, o.offers).await,
                event::Event::Rescind(r) => scheduler.rescinded(driver, &r.offer_id).await,
                event::Event::Update(u) => {
                    let Some(status) = u.status else { continue };
                    scheduler.status_update(driver, &status).await;
                    if !status.uuid.is_empty()
                        && let Some(acks) = &acks
                    {
                        let v1::TaskStatus { agent_id, task_id, uuid, .. } = status;
                        let _ = acks.send(v1::acknowledge_batch_request::Update { agent_id, task_id, uuid });
                    }
                }
                event::Event::Error(e) => {
                    scheduler.error(driver, &e.message).await;
                    if e.message.starts_with("framework removed") {
                        return Err(DriverError::Removed(e.message));
                    }
                }
                event::Event::Message(_) | event::Event::Failure(_) | event::Event::Heartbeat(_) => {}
            }
            if *driver.stop.borrow() {
                return Ok(SessionEnd::Stopped);
            }
        }
    }
}

enum SessionEnd {
    Stopped,
    Over(Attempt),
}

/// How a stream that opened ended: as a served session once SUBSCRIBED arrived, else as a failed attempt.
fn ended(subscribed: bool) -> Attempt {
    if subscribed { Attempt::Ended } else { Attempt::Failed }
}

/// The most acknowledgements sent in one call.
const MAX_ACK_BATCH: usize = 4096;

/// Sends one session's acknowledgements in the background, in order: one call at a time, each carrying every
/// acknowledgement that piled up while the previous was in flight. At a trickle each goes alone at once; under load
/// a framework makes a few calls, not one per update. Dropping the sender ends the task once the queue is sent.
fn spawn_acknowledger(
    client: SchedulerClient<Channel>,
    header: v1::CallHeader,
) -> mpsc::UnboundedSender<v1::acknowledge_batch_request::Update> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut updates = Vec::new();
        while rx.recv_many(&mut updates, MAX_ACK_BATCH).await > 0 {
            let n = updates.len();
            let req = v1::AcknowledgeBatchRequest { header: Some(header.clone()), updates: std::mem::take(&mut updates) };
            if let Err(e) = client.clone().acknowledge_batch(req).await {
                // The agent resends unacknowledged updates, so these are retried naturally.
                debug!("acknowledging {n} updates failed: {}", e.message());
            }
        }
    });
    tx
}
