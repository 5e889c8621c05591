//! `corral dev up`: a whole cluster on this machine for trying corral out — one master and N agents on loopback,
//! file registry, work dirs in a temporary directory. With `--ha`, a local etcd (the `etcd` binary on PATH, from
//! Debian's etcd-server) and three masters electing a leader in it instead. Stays in the foreground; on Ctrl-C (or
//! SIGTERM) it drains the agents (their tasks are killed), stops the masters and etcd, and removes the temporary
//! directory.

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
    /// High availability: a local etcd (on --port+300 and +301) and three masters (on --port, --port+100 and
    /// --port+200) electing a leader in it.
    #[arg(long)]
    ha: bool,
    /// With --ha: the leader's lease TTL (a killed leader is replaced within about this long).
    #[arg(long, default_value = "5s", requires = "ha")]
    leader_lease_ttl: String,
}

struct Proc {
    name: String,
    child: Child,
}

/// The processes started so far; dropping it stops them all (also on early errors).
struct Cluster {
    agents: Vec<Proc>,
    masters: Vec<Proc>,
    etcd: Option<Proc>,
}

impl Cluster {
    /// A process that exited, with its status.
    fn dead(&mut self) -> Option<(String, std::process::ExitStatus)> {
        self.masters
            .iter_mut()
            .chain(self.etcd.iter_mut())
            .chain(self.agents.iter_mut())
            .find_map(|p| p.child.try_wait().ok().flatten().map(|status| (p.name.clone(), status)))
    }

    fn stop(&mut self) {
        // Agents first, with SIGUSR1: they kill their tasks before exiting.
        for p in &self.agents {
            let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGUSR1);
        }
        for p in &mut self.agents {
            wait_or_kill(p, Duration::from_secs(20));
        }
        self.agents.clear();
        for p in self.masters.iter().chain(&self.etcd) {
            let _ = kill(Pid::from_raw(p.child.id() as i32), Signal::SIGTERM);
        }
        for p in self.masters.iter_mut().chain(&mut self.etcd) {
            wait_or_kill(p, Duration::from_secs(10));
        }
        self.masters.clear();
        self.etcd = None;
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

/// Starts a single-member etcd on loopback ports `base` (clients) and `base + 1` (peers), with its data in
/// `root/etcd` (fixed ports, so a kept --work-dir restarts with the membership it recorded); returns its URL.
async fn start_etcd(root: &Path, base: u16, cluster: &mut Cluster) -> anyhow::Result<String> {
    let program = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|d| d.join("etcd")).find(|p| p.is_file()))
        .ok_or_else(|| anyhow!("--ha needs etcd on PATH: apt-get install etcd-server (deploy/install-deps.sh does)"))?;
    let (client, peer) = (base, base.checked_add(1).ok_or_else(|| anyhow!("etcd port {base} is too high"))?);
    let (client_url, peer_url) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
    cluster.etcd = Some(spawn(
        "etcd",
        &program,
        &[
            "--name=corral-dev".into(),
            format!("--data-dir={}", root.join("etcd").display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=corral-dev={peer_url}"),
        ],
        root,
    )?);
    let health = format!("{client_url}/health");
    wait_until("etcd answering /health", Duration::from_secs(15), cluster, root, async || {
        get_json(&health).await.is_ok_and(|v| v["health"] == "true")
    })
    .await?;
    Ok(format!("etcd://127.0.0.1:{client}"))
}

/// Polls `check` until it holds; fails early, naming its log, when one of the cluster's processes exits.
async fn wait_until(
    what: &str,
    timeout: Duration,
    cluster: &mut Cluster,
    root: &Path,
    mut check: impl AsyncFnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        if let Some((name, status)) = cluster.dead() {
            return Err(anyhow!("{name} exited ({status}); see {}", root.join(format!("{name}.log")).display()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(anyhow!("{what} did not happen within {timeout:?}; see the logs in {}", root.display()))
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
    let mut cluster = Cluster { agents: Vec::new(), masters: Vec::new(), etcd: None };
    let master_addr = format!("127.0.0.1:{}", args.port);
    let mut master_args = vec!["--ip=127.0.0.1".to_string(), format!("--agent-ping-timeout={}", args.agent_ping_timeout)];
    let ports: Vec<u16> = if args.ha {
        let base = args.port.checked_add(300).ok_or_else(|| anyhow!("--port {} is too high for --ha", args.port))?;
        let etcd = start_etcd(&root, base, &mut cluster).await?;
        master_args.push(format!("--registry={etcd}"));
        master_args.push(format!("--leader-lease-ttl={}", args.leader_lease_ttl));
        (0..3).map(|k| args.port.checked_add(100 * k).ok_or_else(|| anyhow!("--port {} is too high for --ha", args.port))).collect::<Result<_, _>>()?
    } else {
        vec![args.port]
    };
    for (k, port) in ports.iter().enumerate() {
        let name = if args.ha { format!("master-{k}") } else { "master".to_string() };
        let mut margs = master_args.clone();
        margs.push(format!("--port={port}"));
        margs.push(format!("--work-dir={}", root.join(&name).display()));
        cluster.masters.push(spawn(&name, &master_bin, &margs, &root)?);
    }
    let masters = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let state_url = format!("http://{master_addr}/state");
    wait_until("a leading master", Duration::from_secs(20), &mut cluster, &root, async || {
        get_json(&state_url).await.is_ok_and(|s| s["leader"].is_string())
    })
    .await?;
    for i in 0..args.agents {
        let first_port = 31000 + u32::from(i) * 1000;
        let resources = format!("{};ports:[{}-{}]", args.agent_resources, first_port, first_port + 999);
        cluster.agents.push(spawn(
            &format!("agent-{i}"),
            &agent_bin,
            &[
                format!("--master={masters}"),
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
    let want = args.agents as usize;
    let cluster_masters = crate::client::Masters::parse(&masters).map_err(|e| anyhow!(e))?;
    wait_until("all agents registering", Duration::from_secs(20), &mut cluster, &root, async || {
        cluster_masters.state().await.ok().and_then(|s| s["agents"].as_array().map(|a| a.len())) == Some(want)
    })
    .await?;

    if args.ha {
        println!("corral dev cluster is up: 3 masters electing a leader in etcd, {} agent(s)", args.agents);
        println!("  masters:   {masters}   (any of them redirects to the leader)");
        println!("  work dir:  {}  (logs: etcd.log, master-N.log, agent-N.log)", root.display());
        println!("  try:       export CORRAL_MASTER={masters}");
    } else {
        println!("corral dev cluster is up: 1 master, {} agent(s)", args.agents);
        println!("  master:    http://{master_addr}   (state: http://{master_addr}/state)");
        println!("  work dir:  {}  (logs: master.log, agent-N.log)", root.display());
        println!("  try:       export CORRAL_MASTER=http://{master_addr}");
    }
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
                if let Some((name, status)) = cluster.dead() {
                    eprintln!("{name} exited unexpectedly ({status}); see {}", root.join(format!("{name}.log")).display());
                    break 1;
                }
            }
        }
    };
    println!("stopping: draining agents (their tasks are killed), then the master(s)");
    cluster.stop();
    drop(temp);
    Ok(code)
}
