//! `corral execute`: a tiny framework that runs a command as one or more tasks and waits for them, like
//! `mesos-execute`. Exit status 0 only when every instance FINISHED.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use corral_sdk::{Driver, OfferPool, Resources, Scheduler, SchedulerDriver, TaskBuilder, TaskState, async_trait, v1};

use crate::client::Masters;

#[derive(Debug, clap::Args)]
pub struct ExecuteArgs {
    /// Task name; also the task id (with -N appended per instance when --instances > 1).
    #[arg(long)]
    name: String,
    /// Shell command to run.
    #[arg(long)]
    command: String,
    /// Resources per instance.
    #[arg(long, default_value = "cpus:0.1;mem:32")]
    resources: String,
    /// Ports per instance, taken from the offer and given to the task as PORT0, PORT1, … (and PORTS).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=100))]
    ports: u16,
    /// Number of instances.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10000))]
    instances: u32,
    /// Role to run in.
    #[arg(long, default_value = "*")]
    role: String,
    /// Environment for the task, KEY=VALUE (repeatable).
    #[arg(long = "env", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Seconds between SIGTERM and SIGKILL when the task is killed.
    #[arg(long)]
    kill_grace_period: Option<f64>,
    /// A persistent volume per instance, CONTAINER_PATH:SIZE_MIB (e.g. data:64); needs --role. Created on the
    /// first run (reserving the resources for the role) and reused by later runs with the same --name.
    #[arg(long, value_parser = parse_volume)]
    volume: Option<(String, f64)>,
    /// Health check: a shell command run in the task's sandbox; exit 0 means healthy.
    #[arg(long)]
    health_check_cmd: Option<String>,
    /// Seconds between health checks.
    #[arg(long, default_value_t = 10.0, requires = "health_check_cmd")]
    health_check_interval: f64,
    /// Seconds after start during which failed checks do not count.
    #[arg(long, default_value_t = 10.0, requires = "health_check_cmd")]
    health_check_grace: f64,
    /// Failed checks in a row that kill the task.
    #[arg(long, default_value_t = 3, requires = "health_check_cmd")]
    health_check_failures: u32,
    /// Give up (and kill what runs) after this long, e.g. 5m.
    #[arg(long, value_parser = humantime::parse_duration)]
    timeout: Option<Duration>,
}

fn parse_volume(s: &str) -> Result<(String, f64), String> {
    let (path, size) = s.rsplit_once(':').ok_or_else(|| format!("{s:?} is not CONTAINER_PATH:SIZE_MIB"))?;
    corral_proto::resources::validate_container_path(path)?;
    let size: f64 = size.parse().map_err(|_| format!("volume size {size:?} is not a number of MiB"))?;
    if !(size.is_finite() && size > 0.0) {
        return Err(format!("volume size {size} must be positive"));
    }
    Ok((path.to_string(), size))
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// Latest (state, message) per task id, shared with `run` for the exit code.
type States = Arc<Mutex<BTreeMap<String, (TaskState, String)>>>;

struct Execute {
    pending: Vec<v1::TaskInfo>,
    need: Resources,
    ports: usize,
    /// (container path, size) of each instance's persistent volume (its id is the task id).
    volume: Option<(String, f64)>,
    states: States,
    total: usize,
    json: bool,
    waiting_since: Instant,
    warned: bool,
}

#[async_trait]
impl Scheduler for Execute {
    async fn registered(&mut self, _driver: &Driver, framework_id: &str, master: &str) {
        if !self.json {
            eprintln!("subscribed to {master} as framework {framework_id}");
        }
    }

    async fn offers(&mut self, driver: &Driver, offers: Vec<v1::Offer>) {
        for offer in offers {
            let Ok(mut pool) = OfferPool::new(&offer) else { continue };
            let mut operations = Vec::new();
            let mut launched = Vec::new();
            while let Some(template) = self.pending.last() {
                let Some((task, mut ops)) = self.place(&mut pool, template) else { break };
                operations.append(&mut ops);
                launched.push(task);
                self.pending.pop();
            }
            let done = self.pending.is_empty();
            let result = if launched.is_empty() {
                driver.decline([&offer.id], Some(if done { 3600.0 } else { 1.0 })).await
            } else {
                for t in &launched {
                    self.report(&t.task_id, TaskState::TaskStaging, &format!("on {}", offer.hostname), None);
                }
                operations.push(corral_sdk::ops::launch(launched));
                driver.accept([&offer.id], operations, Some(if done { 3600.0 } else { 0.0 })).await
            };
            if let Err(e) = result {
                eprintln!("offer {}: {e}", offer.id);
            }
        }
        if self.pending.is_empty() {
            let _ = driver.suppress(Vec::new()).await;
        } else if !self.warned && self.waiting_since.elapsed() > Duration::from_secs(5) {
            self.warned = true;
            eprintln!("still waiting for offers that fit {} ({} instance(s) left)", self.need, self.pending.len());
        }
    }

    async fn status_update(&mut self, driver: &Driver, status: &v1::TaskStatus) {
        let state = corral_sdk::state_of(status);
        if self.states.lock().expect("lock").get(&status.task_id).is_some_and(|(s, _)| s.is_terminal()) {
            return;
        }
        self.report(&status.task_id, state, &status.message, status.healthy);
        let done = {
            let states = self.states.lock().expect("lock");
            states.len() == self.total && states.values().all(|(s, _)| s.is_terminal())
        };
        if done {
            let _ = driver.teardown().await;
        }
    }

    async fn error(&mut self, _driver: &Driver, message: &str) {
        eprintln!("master: {message}");
    }
}

impl Execute {
    /// Fits one instance into the offer: the task, and the operations its volume needs first (none without one,
    /// or when the offer already holds the instance's volume; else RESERVE + CREATE).
    fn place(&self, pool: &mut OfferPool, template: &v1::TaskInfo) -> Option<(v1::TaskInfo, Vec<v1::Operation>)> {
        let mut task = template.clone();
        let Some((path, size)) = &self.volume else {
            task.resources = pool.take(&self.need, self.ports)?.to_proto();
            return Some((task, Vec::new()));
        };
        let role = pool.role().to_string();
        if let Some(volume) = pool.take_volume(&task.task_id) {
            // A later run: the volume (and the reservation around it) is offered back to this role.
            let res = pool.take(&self.need, self.ports)?;
            task.resources = res.plus(&volume).to_proto();
            return Some((task, Vec::new()));
        }
        // First run: reserve what the task needs plus the disk, then carve the volume out of the disk.
        let wanted = self.need.plus(&Resources::scalar("disk", *size));
        let taken = pool.take(&wanted, self.ports)?;
        let reserved = taken.with_role(Some(&role));
        let plain_disk = Resources::scalar("disk", *size).with_role(Some(&role));
        let volume = Resources::volume(&role, &task.task_id, path, *size);
        let mut ops = Vec::new();
        let unreserved_part = taken.unreserved();
        if !unreserved_part.is_empty() {
            ops.push(corral_sdk::ops::reserve(&unreserved_part.with_role(Some(&role))));
        }
        ops.push(corral_sdk::ops::create(&volume));
        task.resources = reserved.minus(&plain_disk).plus(&volume).to_proto();
        Some((task, ops))
    }

    fn report(&mut self, task_id: &str, state: TaskState, message: &str, healthy: Option<bool>) {
        let mut states = self.states.lock().expect("lock");
        if states.get(task_id).is_some_and(|(s, m)| *s == state && m == message) {
            return;
        }
        states.insert(task_id.to_string(), (state, message.to_string()));
        if self.json {
            println!("{}", serde_json::json!({"task_id": task_id, "state": state.name(), "message": message, "healthy": healthy}));
        } else if message.is_empty() {
            println!("{task_id} {}", state.name());
        } else if healthy.is_some() {
            println!("{task_id} {} (healthy: {}) {message}", state.name(), healthy.unwrap_or_default());
        } else {
            println!("{task_id} {} {message}", state.name());
        }
    }
}

pub async fn run(masters: &Masters, args: ExecuteArgs, json: bool) -> anyhow::Result<i32> {
    let need = Resources::parse(&args.resources).map_err(|e| anyhow!("--resources: {e}"))?;
    if need.get_scalar("cpus") <= 0.0 && need.get_scalar("mem") <= 0.0 {
        return Err(anyhow!("--resources {:?} must include some cpus or mem", args.resources));
    }
    if args.role != "*" {
        corral_proto::resources::validate_role(&args.role).map_err(|e| anyhow!("--role: {e}"))?;
    } else if args.volume.is_some() {
        return Err(anyhow!("--volume needs --role: persistent volumes are reserved for a role"));
    }
    if args.command.trim().is_empty() {
        return Err(anyhow!("--command must not be empty"));
    }
    if let Some(g) = args.kill_grace_period
        && !(g.is_finite() && g >= 0.0)
    {
        return Err(anyhow!("--kill-grace-period must be a non-negative number of seconds"));
    }
    let ids: Vec<String> = if args.instances == 1 {
        vec![args.name.clone()]
    } else {
        (0..args.instances).map(|i| format!("{}-{i}", args.name)).collect()
    };
    for id in &ids {
        corral_proto::TaskId::new(id.clone()).map_err(|e| anyhow!("--name: {e}"))?;
    }
    for (flag, v) in [("--health-check-interval", args.health_check_interval), ("--health-check-grace", args.health_check_grace)] {
        if !(v.is_finite() && (0.0..=86_400.0).contains(&v)) || (flag == "--health-check-interval" && v == 0.0) {
            return Err(anyhow!("{flag} must be a number of seconds between 0 and 86400 (interval above 0), got {v}"));
        }
    }
    let health_check = args.health_check_cmd.as_ref().map(|cmd| v1::HealthCheck {
        r#type: v1::health_check::Type::Command as i32,
        command: cmd.clone(),
        delay_seconds: args.health_check_interval.min(15.0),
        interval_seconds: args.health_check_interval,
        timeout_seconds: args.health_check_interval.max(1.0),
        grace_period_seconds: args.health_check_grace,
        consecutive_failures: args.health_check_failures,
        ..Default::default()
    });
    if let Some(check) = &health_check {
        corral_proto::health::validate(check).map_err(|e| anyhow!("--health-check-*: {e}"))?;
    }
    let mut pending: Vec<v1::TaskInfo> = ids
        .iter()
        .map(|id| {
            let mut b = TaskBuilder::new(id.clone()).name(args.name.clone()).shell(args.command.clone());
            for (k, v) in &args.env {
                b = b.env(k.clone(), v.clone());
            }
            if let Some(g) = args.kill_grace_period {
                b = b.kill_grace_period(g);
            }
            if let Some(check) = &health_check {
                b = b.health_check(check.clone());
            }
            b.build()
        })
        .collect();
    pending.reverse();
    let framework = v1::FrameworkInfo {
        name: format!("corral-execute ({})", args.name),
        roles: vec![args.role.clone()],
        failover_timeout_seconds: 0.0,
        user: std::env::var("USER").unwrap_or_default(),
        ..Default::default()
    };
    let states: States = Arc::default();
    let scheduler = Execute {
        pending,
        need,
        ports: args.ports.into(),
        volume: args.volume.clone(),
        states: states.clone(),
        total: ids.len(),
        json,
        waiting_since: Instant::now(),
        warned: false,
    };
    let driver = SchedulerDriver::new(masters.spec.clone(), framework);
    let timeout = args.timeout.unwrap_or(Duration::from_secs(u64::MAX / 4));
    tokio::select! {
        result = driver.run(scheduler) => result.map_err(|e| anyhow!("{e}"))?,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted: the framework's tasks are killed as it disconnects");
            return Ok(130);
        }
        _ = tokio::time::sleep(timeout) => {
            eprintln!("timed out after {timeout:?}; the framework's tasks are killed as it disconnects");
            return Ok(1);
        }
    }
    let states = states.lock().expect("lock").clone();
    let failed: Vec<_> = states.iter().filter(|(_, (s, _))| *s != TaskState::TaskFinished).collect();
    if failed.is_empty() && states.len() == ids.len() {
        return Ok(0);
    }
    for (id, (state, message)) in failed {
        eprintln!("task {id} ended {}: {message}", state.name());
    }
    Ok(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_pairs() {
        assert_eq!(parse_env("A=b=c").unwrap(), ("A".into(), "b=c".into()));
        assert!(parse_env("A").is_err());
        assert!(parse_env("=x").is_err());
    }
}
