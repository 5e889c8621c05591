//! Replicated masters: the etcd side of the election.
//!
//! [`contend`] drives a [`Contender`] with real etcd calls: it grants a lease, keeps it alive, campaigns in the
//! election `<prefix>/leader` with this master's advertised address as the value, and polls who leads for the
//! followers' redirects. When the contender says *lead*, a new term starts: a master actor recovered from the
//! etcd registry, every write of which is fenced on this term's leader key. When it says *stop*, the term ends
//! at once (leadership revoked first, then every stream dropped).
//!
//! Every etcd call runs in its own task and reports back as an [`Input`], so a slow or unreachable etcd never
//! stalls the keep-alives, and the lease deadline is enforced by the clock, not by etcd answering.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use corral_discovery::EtcdSpec;
use etcd_client::Client;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::api::Role;
use crate::election::{Action, Contender, Input, Leadership};
use crate::registry::etcd::{EtcdRegistry, Fence};
use crate::{MasterConfig, Term};

/// How replicated masters use etcd.
#[derive(Debug, Clone)]
pub struct HaConfig {
    pub etcd: EtcdSpec,
    /// TTL of the leader's lease: a dead leader is replaced within about this long.
    pub lease_ttl: Duration,
}

/// Longest a single etcd request (other than a campaign, which waits by design) may take.
const ETCD_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause before retrying a failed grant, campaign or leader observation.
const RETRY: Duration = Duration::from_millis(300);

/// Contends for leadership until `stop` turns true; serves terms in between.
pub async fn contend(
    config: MasterConfig,
    ha: HaConfig,
    role: watch::Sender<Role>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // Campaigns block until won, so they get a client without a request timeout.
    let client = ha.etcd.connect(Some(ETCD_TIMEOUT)).await?;
    let waiting_client = ha.etcd.connect(None).await?;
    let (inputs_tx, mut inputs) = mpsc::unbounded_channel::<Input>();
    let watcher = tokio::spawn(watch_leader(client.clone(), waiting_client.clone(), ha.etcd.clone(), inputs_tx.clone()));
    let (mut contender, mut actions) = Contender::new(&config.advertise);
    let mut lease_tasks: HashMap<i64, Vec<JoinHandle<()>>> = HashMap::new();
    let mut term: Option<(Term, Leadership)> = None;
    // Grant attempts since the last lease was granted (for logging etcd outages without flooding).
    let mut grant_attempts = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    info!(etcd = %ha.etcd, lease_ttl = ?ha.lease_ttl, "contending for leadership");
    loop {
        for action in std::mem::take(&mut actions) {
            match action {
                Action::GrantLease => {
                    tokio::spawn(grant(client.clone(), ha.lease_ttl, inputs_tx.clone(), grant_attempts));
                    grant_attempts += 1;
                }
                Action::KeepAlive { id } => {
                    let task = tokio::spawn(keep_alive(client.clone(), id, ha.lease_ttl, inputs_tx.clone()));
                    lease_tasks.entry(id).or_default().push(task);
                }
                Action::Campaign { id } => {
                    let campaign = campaign(waiting_client.clone(), ha.etcd.election_name(), config.advertise.clone(), id);
                    let tx = inputs_tx.clone();
                    let task = tokio::spawn(async move {
                        let _ = tx.send(campaign.await);
                    });
                    lease_tasks.entry(id).or_default().push(task);
                }
                Action::Lead { key, rev } => {
                    let until = contender.valid_until().unwrap_or_else(Instant::now);
                    let leadership = Leadership::until(until);
                    let fence = Fence { key, rev };
                    let registry = EtcdRegistry::new(client.clone(), ha.etcd.registry_prefix(), fence);
                    match Term::start(config.clone(), Box::new(registry), leadership.clone()).await {
                        Ok(t) => {
                            info!(address = %config.advertise, "elected leader");
                            let _ = role.send(Role::Leading(t.handle()));
                            term = Some((t, leadership));
                        }
                        Err(e) => {
                            warn!("elected, but cannot recover from the registry: {e:#}; stepping down");
                            let _ = inputs_tx.send(Input::Deposed);
                        }
                    }
                }
                Action::StopLeading => {
                    if let Some((t, leadership)) = term.take() {
                        leadership.revoke();
                        let _ = role.send(Role::Following { leader: None });
                        t.stop().await;
                        warn!("stopped leading");
                    }
                }
                Action::Resign { key } => {
                    if let Some((_, leadership)) = &term {
                        leadership.revoke();
                        let _ = role.send(Role::Following { leader: None });
                    }
                    resign(client.clone(), key).await;
                }
                Action::Abandon { id } => {
                    for task in lease_tasks.remove(&id).unwrap_or_default() {
                        task.abort();
                    }
                    let mut c = client.clone();
                    tokio::spawn(async move {
                        if let Err(e) = c.lease_revoke(id).await {
                            debug!(lease = id, "revoking an abandoned lease failed (it expires by itself): {e}");
                        }
                    });
                }
                Action::Follow { leader } => {
                    if term.is_none() {
                        let _ = role.send(Role::Following { leader });
                    }
                }
                Action::Exit => {
                    watcher.abort();
                    return Ok(());
                }
            }
        }
        if let (Some((_, leadership)), Some(until)) = (&term, contender.valid_until()) {
            leadership.extend(until);
        }
        let input = tokio::select! {
            Some(input) = inputs.recv() => input,
            _ = tick.tick() => Input::Tick(Instant::now()),
            _ = async { term.as_mut().expect("guarded").0.stopped().await }, if term.is_some() => {
                // The actor stopped by itself: its lease lapsed or a fenced write failed.
                if let Some((_, leadership)) = term.take() {
                    leadership.revoke();
                    let _ = role.send(Role::Following { leader: None });
                }
                Input::Deposed
            }
            _ = stop.wait_for(|stop| *stop) => Input::Shutdown,
        };
        if matches!(input, Input::Granted { .. }) {
            grant_attempts = 0;
        }
        actions = contender.handle(input);
    }
}

async fn grant(mut client: Client, ttl: Duration, tx: mpsc::UnboundedSender<Input>, attempt: u64) {
    let sent = Instant::now();
    let input = match client.lease_grant(ttl.as_secs().max(1) as i64, None).await {
        Ok(r) => Input::Granted { id: r.id(), ttl: Duration::from_secs(r.ttl().max(0) as u64), sent },
        Err(e) => {
            // Once, then about every 10 s while etcd stays unreachable.
            if attempt.is_multiple_of(30) {
                warn!("cannot get a lease from etcd, so this master cannot lead (retrying): {e}");
            }
            tokio::time::sleep(RETRY).await;
            Input::GrantFailed
        }
    };
    let _ = tx.send(input);
}

/// Renews lease `id` every third of its TTL, reporting each answer with the time its request was sent.
async fn keep_alive(mut client: Client, id: i64, ttl: Duration, tx: mpsc::UnboundedSender<Input>) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    loop {
        match client.lease_keep_alive(id).await {
            Ok((mut keeper, mut answers)) => loop {
                let sent = Instant::now();
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(period, answers.message()).await {
                    Ok(Ok(Some(answer))) => {
                        let ttl = Duration::from_secs(answer.ttl().max(0) as u64);
                        if tx.send(Input::KeptAlive { id, ttl, sent }).is_err() || ttl.is_zero() {
                            return;
                        }
                    }
                    Ok(Ok(None)) | Ok(Err(_)) | Err(_) => break,
                }
                tokio::time::sleep(period.saturating_sub(sent.elapsed())).await;
            },
            Err(e) => debug!(lease = id, "keep-alive failed: {e}"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

async fn campaign(mut client: Client, name: String, me: String, id: i64) -> Input {
    match client.campaign(name, me, id).await {
        Ok(r) => match r.leader() {
            Some(key) => Input::Won { id, key: key.key().to_vec(), rev: key.rev() },
            None => Input::CampaignFailed { id },
        },
        Err(e) => {
            debug!(lease = id, "campaign failed: {e}");
            tokio::time::sleep(RETRY).await;
            Input::CampaignFailed { id }
        }
    }
}

/// Deletes our leader key (named after our lease, so ours alone), so a follower's campaign returns at once.
async fn resign(mut client: Client, key: Vec<u8>) {
    match client.delete(key, None).await {
        Ok(_) => info!("resigned leadership"),
        Err(e) => warn!("could not resign (the lease will expire instead): {e}"),
    }
}

/// Tells the contender who leads, so followers can name the leader in their refusals: etcd's Observe pushes each
/// new leader at once; a poll every second also catches "nobody leads" and lost observe streams.
async fn watch_leader(mut client: Client, mut waiting: Client, spec: EtcdSpec, tx: mpsc::UnboundedSender<Input>) {
    let observe = async {
        loop {
            if let Ok(mut stream) = waiting.observe(spec.election_name()).await {
                while let Ok(Some(response)) = stream.message().await {
                    if tx.send(Input::LeaderSeen(response.kv().and_then(corral_discovery::leader_of))).is_err() {
                        return;
                    }
                }
            }
            tokio::time::sleep(RETRY).await;
        }
    };
    let poll = async {
        loop {
            if let Ok(leader) = spec.leader(&mut client).await
                && tx.send(Input::LeaderSeen(leader)).is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        _ = observe => {}
        _ = poll => {}
    }
}
