//! `corral dev up`: a whole cluster on this machine for trying corral out — one master and N agents on loopback,
//! file registry, work dirs in a temporary directory. Stays in the foreground; on Ctrl-C (or SIGTERM) it drains
//! the agents (their tasks are killed), stops the master, and removes the temporary directory.

use std::path::{Path, PathBuf};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::client::get_json;

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Number of agents.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    agents: u16,
    /// Master port (gRPC, REST and dashboard).
    #[arg(long, default_value_t = 5050)]
    port: u16,
    /// First agent port; agent i listens on this + i.
    #[arg(long, default_value_t = 5051)]
    agent_port: u16,
    /// Resources per agent (ports are given each agent separately so agents on one host never clash).
    #[arg(long, default_value = "cpus:2;mem:2048;disk:10240")]
    agent_resources: String,
    /// Keep state here instead of a temporary directory (kept after exit).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Agent ping timeout for the master (e.g. 15s).
    #[arg(long, default_value = "15s")]
    agent_ping_timeout: String,
    /// Task isolation for the agents: cgroups or none (none works without root).
    #[arg(long, default_value = "cgroups")]
    isolation: String,
    /// Name of the agents' cgroup below each hierarchy.
    #[arg(long, default_value = "corral")]
    cgroup_root: String,
}

struct Proc {
    name: String,
    child: Child,
}

/// The processes started so far; dropping it stops them all (also on early errors).
struct Cluster {
    agents: Vec<Proc>,
    master: Option<Proc>,
}

impl Cluster {
    fn stop(&mut self) {
        // Agents first, with SIGUSR1: they kill their tasks before exiting.
        for p in &self.agents {
            let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGUSR1);
        }
        for p in &mut self.agents {
            wait_or_kill(p, Duration::from_secs(20));
        }
        self.agents.clear();
        if let Some(mut m) = self.master.take() {
            let _ = kill(Pid::from_raw(m.child.id() as i32), Signal::SIGTERM);
            wait_or_kill(&mut m, Duration::from_secs(10));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn wait_or_kill(p: &mut Proc, grace: Duration) {
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = p.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("{} did not stop in {grace:?}; killing it", p.name);
    let _ = p.child.kill();
    let _ = p.child.wait();
}

/// Finds a sibling binary of this `corral` executable (cargo puts them side by side).
fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the corral executable")?;
    let path = exe.with_file_name(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(anyhow!("{} not found next to {}; build the workspace first (cargo build --release)", name, exe.display()))
    }
}

fn spawn(name: &str, program: &Path, args: &[String], log_dir: &Path) -> anyhow::Result<Proc> {
    let log = std::fs::File::create(log_dir.join(format!("{name}.log")))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Own process group: a terminal's Ctrl-C reaches only `corral dev up`, which then stops them in order.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    Ok(Proc { name: name.to_string(), child })
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow!("{what} did not happen within {timeout:?}"))
}

pub async fn up(args: UpArgs) -> anyhow::Result<i32> {
    corral_proto::Resources::parse(&args.agent_resources).map_err(|e| anyhow!("--agent-resources: {e}"))?;
    let master_bin = sibling("corral-master")?;
    let agent_bin = sibling("corral-agent")?;
    let (temp, root) = match &args.work_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            (None, dir.canonicalize()?)
        }
        None => {
            let t = tempfile::Builder::new().prefix("corral-dev-").tempdir()?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let mut cluster = Cluster { agents: Vec::new(), master: None };
    let master_addr = format!("127.0.0.1:{}", args.port);
    cluster.master = Some(spawn(
        "master",
        &master_bin,
        &[
            "--ip=127.0.0.1".into(),
            format!("--port={}", args.port),
            format!("--work-dir={}", root.join("master").display()),
            format!("--agent-ping-timeout={}", args.agent_ping_timeout),
        ],
        &root,
    )?);
    let health = format!("http://{master_addr}/health");
    wait_until("the master answering /health", Duration::from_secs(15), async || get_json(&health).await.is_ok())
        .await
        .with_context(|| format!("see {}", root.join("master.log").display()))?;
    for i in 0..args.agents {
        let first_port = 31000 + u32::from(i) * 1000;
        let resources = format!("{};ports:[{}-{}]", args.agent_resources, first_port, first_port + 999);
        cluster.agents.push(spawn(
            &format!("agent-{i}"),
            &agent_bin,
            &[
                format!("--master={master_addr}"),
                "--ip=127.0.0.1".into(),
                format!("--port={}", args.agent_port + i),
                format!("--work-dir={}", root.join(format!("agent-{i}")).display()),
                format!("--resources={resources}"),
                format!("--attributes=host:dev-{i}"),
                format!("--isolation={}", args.isolation),
                format!("--cgroup-root={}", args.cgroup_root),
            ],
            &root,
        )?);
    }
    let state_url = format!("http://{master_addr}/state");
    let want = args.agents as usize;
    wait_until("all agents registering", Duration::from_secs(20), async || {
        get_json(&state_url).await.ok().and_then(|s| s["agents"].as_array().map(|a| a.len())) == Some(want)
    })
    .await
    .with_context(|| format!("see the agent logs in {}", root.display()))?;

    println!("corral dev cluster is up: 1 master, {} agent(s)", args.agents);
    println!("  master:    http://{master_addr}   (state: http://{master_addr}/state)");
    println!("  work dir:  {}  (logs: master.log, agent-N.log)", root.display());
    println!("  try:       export CORRAL_MASTER=http://{master_addr}");
    println!("             corral execute --name hello --command 'echo hello from corral'");
    println!("             corral task list --all");
    println!("Press Ctrl-C to stop the cluster and every task it runs.");

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    let code = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break 0,
            _ = term.recv() => break 0,
            _ = ticker.tick() => {
                let dead = cluster.master.iter_mut().chain(cluster.agents.iter_mut())
                    .find_map(|p| p.child.try_wait().ok().flatten().map(|st| (p.name.clone(), st)));
                if let Some((name, status)) = dead {
                    eprintln!("{name} exited unexpectedly ({status}); see {}", root.join(format!("{name}.log")).display());
                    break 1;
                }
            }
        }
    };
    println!("stopping: draining agents (their tasks are killed), then the master");
    cluster.stop();
    drop(temp);
    Ok(code)
}
