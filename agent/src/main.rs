//! `corral-agent`: the node daemon, and (`corral-agent shim`) the per-task shim it starts.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use corral_agent::agent::{Agent, AgentConfig, Event, connect_loop};
use corral_agent::status_update::Backoff;
use corral_agent::{detect, http, isolation, shim};
use tokio::sync::{mpsc, oneshot};

/// corral agent: offers this node's resources to the cluster and runs tasks.
#[derive(Debug, Parser)]
#[command(name = "corral-agent", version)]
struct Cli {
    #[command(flatten)]
    args: Args,
}

/// The per-task shim. Parsed on its own, so that the agent's `CORRAL_*` environment can never make it demand
/// agent flags.
#[derive(Debug, Parser)]
#[command(name = "corral-agent shim")]
struct ShimCli {
    /// The task's run directory (spec.json, pid, exit.json).
    #[arg(long)]
    run_dir: std::path::PathBuf,
}

#[derive(Debug, clap::Args)]
struct Args {
    /// TOML file of settings, keyed by flag name (e.g. work-dir = "/var/lib/corral"); flags and CORRAL_* win.
    #[arg(long, env = "CORRAL_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Masters: host:port[,host:port…], or etcd://HOST:PORT[,HOST:PORT…][/prefix] to ask etcd who leads.
    #[arg(long, env = "CORRAL_MASTER")]
    master: String,
    /// Address to serve HTTP (state, sandbox files) on.
    #[arg(long, env = "CORRAL_IP", default_value = "0.0.0.0")]
    ip: std::net::IpAddr,
    /// HTTP port (0 picks a free one).
    #[arg(long, env = "CORRAL_PORT", default_value_t = 5051)]
    port: u16,
    /// Name or IP the master and CLI reach this agent at (default: --ip if set, else the host name).
    #[arg(long, env = "CORRAL_HOSTNAME")]
    hostname: Option<String>,
    /// Directory for sandboxes and checkpoints.
    #[arg(long, env = "CORRAL_WORK_DIR")]
    work_dir: std::path::PathBuf,
    /// Resources to offer, e.g. "cpus:4;mem:4096;ports:[31000-32000]"; what is left out is detected.
    #[arg(long, env = "CORRAL_RESOURCES")]
    resources: Option<String>,
    /// Attributes, e.g. "rack:r1;zone:a".
    #[arg(long, env = "CORRAL_ATTRIBUTES", default_value = "")]
    attributes: String,
    /// Task isolation: cgroups (v2 or v1, detected) or none.
    #[arg(long, env = "CORRAL_ISOLATION", default_value = "cgroups")]
    isolation: String,
    /// Where cgroup file systems are mounted.
    #[arg(long, env = "CORRAL_CGROUPS_HIERARCHY", default_value = "/sys/fs/cgroup")]
    cgroups_hierarchy: std::path::PathBuf,
    /// Name of corral's cgroup in each hierarchy; tasks live in <root>/<agent-id>/<task-id>.
    #[arg(long, env = "CORRAL_CGROUP_ROOT", default_value = "corral")]
    cgroup_root: String,
    /// Hard-cap each task's cpu time at its cpus (CFS quota) instead of only weighting it.
    #[arg(long, env = "CORRAL_CGROUPS_ENABLE_CFS")]
    cgroups_enable_cfs: bool,
    /// Maximum processes per task (pids controller); unlimited when not given.
    #[arg(long, env = "CORRAL_MAX_PIDS_PER_TASK", value_parser = clap::value_parser!(u64).range(1..))]
    max_pids_per_task: Option<u64>,
    /// How often task cpu/memory usage is sampled and reported.
    #[arg(long, env = "CORRAL_USAGE_INTERVAL", default_value = "5s", value_parser = humantime::parse_duration)]
    usage_interval: Duration,
    /// Grace period between SIGTERM and SIGKILL for tasks that do not set one.
    #[arg(long, env = "CORRAL_KILL_GRACE_PERIOD", default_value = "3s", value_parser = humantime::parse_duration)]
    default_kill_grace_period: Duration,
    /// First resend interval for unacknowledged status updates (doubles up to 1 min).
    #[arg(long, env = "CORRAL_STATUS_UPDATE_RETRY", default_value = "2s", value_parser = humantime::parse_duration)]
    status_update_retry: Duration,
    /// Log format.
    #[arg(long, env = "CORRAL_LOG_FORMAT", default_value = "human", value_parser = ["human", "json"])]
    log_format: String,
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if format == "json" { builder.json().init() } else { builder.init() }
}

/// Checks on this node that task isolation really works (memory limit and OOM detection, kill of every
/// process with its cgroup), using the real kernel and shim. Needs root.
#[derive(Debug, Parser)]
#[command(name = "corral-agent check-isolation")]
struct CheckCli {
    /// Where cgroup file systems are mounted.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroups_hierarchy: std::path::PathBuf,
    /// Cgroup root used for the check (removed afterwards).
    #[arg(long, default_value = "corral-check")]
    cgroup_root: String,
}

fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args_os();
    match argv.nth(1) {
        Some(a) if a == "shim" => {
            let shim = ShimCli::parse_from(std::iter::once("corral-agent shim".into()).chain(argv));
            return shim::run(&shim.run_dir);
        }
        Some(a) if a == "check-isolation" => {
            let check = CheckCli::parse_from(std::iter::once("corral-agent check-isolation".into()).chain(argv));
            let config = isolation::IsolationConfig {
                kind: "cgroups".into(),
                hierarchy: check.cgroups_hierarchy,
                root: check.cgroup_root,
            };
            let ok = tokio::runtime::Runtime::new()?.block_on(corral_agent::check::run(&config))?;
            std::process::exit(if ok { 0 } else { 1 });
        }
        _ => {}
    }
    let known: Vec<String> = {
        use clap::CommandFactory;
        Cli::command().get_arguments().filter_map(|a| a.get_long().map(str::to_string)).collect()
    };
    let cli = Cli::parse_from(corral_proto::config::expand_process_args(&known));
    tokio::runtime::Runtime::new()?.block_on(agent_main(cli.args))
}

async fn agent_main(args: Args) -> anyhow::Result<()> {
    init_logging(&args.log_format);
    let masters = corral_discovery::Masters::parse(&args.master).map_err(|e| anyhow::anyhow!("--master: {e}"))?;
    std::fs::create_dir_all(&args.work_dir).with_context(|| format!("cannot create --work-dir {}", args.work_dir.display()))?;
    let work_dir = args.work_dir.canonicalize()?;
    std::fs::create_dir_all(work_dir.join("sandboxes")).context("cannot create the sandboxes directory")?;
    let mut resources = detect::resources(args.resources.as_deref(), &work_dir).context("--resources")?;
    // Reservations and volumes made through the master live in the checkpoint and win over the flags.
    if let Some(checkpointed) = corral_agent::checkpoint::Checkpoint::new(&work_dir).resources() {
        if checkpointed.flatten().without_volumes() != resources.flatten() {
            tracing::warn!(flags = %resources, checkpoint = %checkpointed, "--resources differ from the checkpointed resources; keeping the checkpoint");
        }
        resources = checkpointed;
    }
    let attributes = detect::attributes(&args.attributes).map_err(anyhow::Error::msg).context("--attributes")?;
    if args.cgroup_root.is_empty() || args.cgroup_root.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        anyhow::bail!("--cgroup-root {:?} must be a relative name without '..' or empty parts", args.cgroup_root);
    }
    let isolation = isolation::IsolationConfig {
        kind: args.isolation.clone(),
        hierarchy: args.cgroups_hierarchy.clone(),
        root: args.cgroup_root.clone(),
    };
    let isolator: Arc<dyn isolation::Isolator> = isolation::build(&isolation)
        .with_context(|| format!("--isolation {} (use --isolation none to run tasks without cgroups)", args.isolation))?
        .into();
    let listener = tokio::net::TcpListener::bind((args.ip, args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.ip, args.port))?;
    let port = listener.local_addr()?.port();
    let hostname = args.hostname.clone().unwrap_or_else(|| corral_proto::config::default_advertised_host(args.ip));
    let config = AgentConfig {
        masters: masters.clone(),
        hostname,
        port,
        work_dir: work_dir.clone(),
        resources,
        attributes,
        default_kill_grace: args.default_kill_grace_period,
        update_backoff: Backoff { initial: args.status_update_retry, max: Duration::from_secs(60) },
        agent_exe: std::env::current_exe().context("cannot find the corral-agent binary for the shim")?,
        cfs_quota: args.cgroups_enable_cfs,
        max_pids: args.max_pids_per_task,
        usage_interval: args.usage_interval,
    };
    tracing::info!(port, resources = %config.resources, masters = %masters, isolation = isolator.name(),
        "corral-agent {} starting", corral_proto::VERSION);
    let (events, rx) = mpsc::unbounded_channel();
    let mut agent = Agent::new(config, isolator, events.clone());
    let recovered = agent.recover();
    if recovered > 0 {
        tracing::info!(tasks = recovered, "recovered tasks from the checkpoint");
    }
    let actor = tokio::spawn(agent.run(rx));
    tokio::spawn(connect_loop(masters, events.clone()));
    let app = http::router(events.clone(), &work_dir);
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    tokio::select! {
        // SIGTERM / Ctrl-C: the agent exits; tasks keep running under their shims (re-attached on restart).
        _ = term.recv() => tracing::info!("SIGTERM: exiting, tasks keep running"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: exiting, tasks keep running"),
        // SIGUSR1: kill every task first (decommissioning a node, or `corral dev up` cleaning up).
        _ = usr1.recv() => {
            tracing::info!("SIGUSR1: killing all tasks before exiting");
            let (reply, done) = oneshot::channel();
            let _ = events.send(Event::KillAll { reply });
            let _ = tokio::time::timeout(Duration::from_secs(30), done).await;
            // Give the final status updates a moment to reach the master.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    server.abort();
    actor.abort();
    Ok(())
}
