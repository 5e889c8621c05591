//! Simulated agents for the placement benchmark: many `AgentService.Session` streams over real gRPC from one
//! process, each registering an agent with the given resources and answering every RUN_TASK at once with a
//! TASK_RUNNING update (no process is started). Acknowledgements are accepted and dropped; heartbeats keep the
//! agents alive.

use std::time::Duration;

use anyhow::Context;
use corral_proto::v1::{self, agent_message, agent_service_client::AgentServiceClient, master_message};
use corral_proto::{Resources, now_seconds};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// Agents per HTTP/2 connection (servers commonly cap concurrent streams per connection at a few hundred).
const AGENTS_PER_CONNECTION: usize = 100;

/// Runs `count` simulated agents against `master` until the process is killed.
pub async fn run(master: &str, count: usize, resources: &str) -> anyhow::Result<()> {
    let resources = Resources::parse(resources).context("--resources")?.to_proto();
    let mut agents = Vec::with_capacity(count);
    for chunk in 0..count.div_ceil(AGENTS_PER_CONNECTION) {
        let channel = corral_discovery::endpoint(master).map_err(anyhow::Error::msg)?.connect().await?;
        for i in chunk * AGENTS_PER_CONNECTION..((chunk + 1) * AGENTS_PER_CONNECTION).min(count) {
            let client = AgentServiceClient::new(channel.clone());
            agents.push(tokio::spawn(agent(client, i, resources.clone())));
        }
    }
    for a in agents {
        a.await??;
    }
    Ok(())
}

async fn agent(mut client: AgentServiceClient<tonic::transport::Channel>, i: usize, resources: Vec<v1::Resource>) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::unbounded_channel();
    let send = |m: agent_message::Message| {
        tx.send(v1::AgentMessage { message: Some(m) }).map_err(|_| anyhow::anyhow!("the session to the master closed"))
    };
    let info = v1::AgentInfo {
        hostname: format!("sim-{i}"),
        port: 1,
        resources,
        version: corral_proto::VERSION.into(),
        ..Default::default()
    };
    send(agent_message::Message::Register(v1::RegisterAgent { agent_info: Some(info), ..Default::default() }))?;
    let mut inbound = client.session(UnboundedReceiverStream::new(rx)).await?.into_inner();
    let mut agent_id = String::new();
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            message = inbound.next() => {
                let Some(message) = message else { return Ok(()) };
                match message?.message {
                    Some(master_message::Message::Registered(r)) => {
                        agent_id = r.agent_id;
                        heartbeat = tokio::time::interval(Duration::from_secs_f64(r.heartbeat_interval_seconds.max(0.1)));
                    }
                    Some(master_message::Message::RunTask(run)) => {
                        let (Some(framework), Some(task)) = (run.framework, run.task) else { continue };
                        let status = v1::TaskStatus {
                            task_id: task.task_id,
                            state: v1::TaskState::TaskRunning as i32,
                            agent_id: agent_id.clone(),
                            source: v1::StatusSource::SourceAgent as i32,
                            uuid: uuid::Uuid::new_v4().as_bytes().to_vec(),
                            timestamp: now_seconds(),
                            framework_id: framework.id,
                            ..Default::default()
                        };
                        send(agent_message::Message::StatusUpdate(status))?;
                    }
                    _ => {}
                }
            }
            _ = heartbeat.tick() => send(agent_message::Message::Heartbeat(agent_message::Heartbeat {}))?,
        }
    }
}
