//! `corral-bench`: measures what users choose a resource manager for, and prints a table (also written to
//! `target/bench/results.json`). Figures, not assertions: speed targets live here, never in tests.
//!
//! * `allocator` — the pure allocator in-process, in Mesos' benchmark shapes: every framework declines every offer
//!   with a filter until none wants anything, then all revive (DeclineOffers), and one cycle meeting thousands of
//!   quota guarantees (LargeAndSmallQuota); plus single events (offer declined, task finished, agent added);
//! * `launch` — real master, agent and task processes: accept → RUNNING latency, p50/p99, sequential launches,
//!   and the sustained launch rate, with cgroups and without in one run, beside the machine's raw spawn rate;
//! * `cgroups` — creating and removing one task's cgroups on this host;
//! * `failover` — a real etcd, three masters, agents and a framework: the leader is SIGKILLed (then, separately,
//!   SIGTERMed, so it resigns) again and again; time until a new leader is elected, until it sends the framework
//!   offers, and until every agent has re-registered;
//! * `placement` — a real master, simulated agents in a separate process (`sim-agents`: real gRPC sessions that
//!   answer each launch with TASK_RUNNING at once, no processes), SDK frameworks placing long-running tasks: tasks/s
//!   end to end, offers/s, status updates/s, and the master's RSS per agent and per task;
//! * `all` — every scenario; `--smoke` runs each at a tiny size (for CI, so the bench never rots).

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};

mod sim;
use nix::sys::signal::Signal;
use corral_master::allocator::{Allocation, Allocator, AllocatorConfig, Quota};
use corral_proto::{AgentId, FrameworkId, Resources};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(name = "corral-bench")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Tiny sizes, for a quick check that every scenario still runs.
    #[arg(long, global = true)]
    smoke: bool,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Allocator cycles in-process, in Mesos' benchmark shapes.
    Allocator {
        /// Agents and frameworks of the declining shape.
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        #[arg(long, default_value_t = 1_000)]
        frameworks: usize,
        /// Roles (one framework each) of the quota shape; agents follow from them as in Mesos.
        #[arg(long, default_value_t = 3_000)]
        quota_roles: usize,
    },
    /// accept → RUNNING latency and sustained launch rate with real processes, with cgroups and without, beside
    /// the machine's raw spawn rate.
    Launch {
        #[arg(long, default_value_t = 500)]
        count: usize,
    },
    /// Per-task cgroup setup and teardown on this host's hierarchy (needs root).
    Cgroups {
        #[arg(long, default_value_t = 200)]
        count: usize,
    },
    /// Leader failover with replicated masters: SIGKILL and clean resign.
    Failover {
        /// Failovers of each kind.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// The masters' lease TTL, in whole seconds.
        #[arg(long, default_value_t = 2)]
        lease_ttl: u64,
        #[arg(long, default_value_t = 3)]
        agents: usize,
    },
    /// Placement throughput against simulated agents, and the master's memory per agent and per task.
    Placement {
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        #[arg(long, default_value_t = 1_000_000)]
        tasks: usize,
        #[arg(long, default_value_t = 10)]
        frameworks: usize,
    },
    /// (Internal) run simulated agents against a master until killed; used by `placement`.
    #[command(hide = true)]
    SimAgents {
        #[arg(long)]
        master: String,
        #[arg(long)]
        count: usize,
        #[arg(long, default_value = "cpus:64;mem:262144;disk:1000000")]
        resources: String,
    },
    /// Every scenario at its default size.
    All,
}

/// One result row.
struct Row {
    scenario: &'static str,
    metric: String,
    value: f64,
    unit: &'static str,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Mesos' DeclineOffers shape: every agent runs 16 tasks of one framework; every offer is declined with a long
/// filter until no framework wants any agent; then all frameworks revive (one full cycle), and single events.
fn allocator_declining(agents: usize, frameworks: usize) -> Vec<Row> {
    let mut a = Allocator::new(AllocatorConfig::default());
    let now = Instant::now();
    let total = Resources::parse("cpus:24;mem:4096;disk:4096;ports:[31000-32000]").expect("resources");
    let used = Resources::parse("cpus:16;mem:2014;disk:1024;ports:[31000-31015]").expect("resources");
    let agent_ids: Vec<AgentId> = (0..agents).map(|i| AgentId::new(format!("a{i}")).expect("id")).collect();
    let fw_ids: Vec<FrameworkId> = (0..frameworks).map(|i| FrameworkId::new(format!("f{i}")).expect("id")).collect();
    let role = vec!["*".to_string()];
    for id in &fw_ids {
        a.add_framework(id.clone(), &role, true).expect("framework");
    }
    for (i, id) in agent_ids.iter().enumerate() {
        let tasks = vec![(fw_ids[i % frameworks].clone(), "*".to_string(), used.clone())];
        a.add_agent(id.clone(), total.clone(), tasks).expect("agent");
    }
    let label = format!("{agents} agents x {frameworks} frameworks");
    let mut rows = Vec::new();
    let mut row = |metric: String, value: f64, unit| rows.push(Row { scenario: "allocator", metric, value, unit });

    // Declining rounds: each framework is offered each agent once, then filters it for an hour.
    let refuse = Some((now, Duration::from_secs(3600)));
    let mut rounds = Vec::new();
    let mut offers = Vec::new();
    loop {
        for o in offers.drain(..) {
            let o: Allocation = o;
            a.recover(&o.agent_id, &o.framework_id, &o.role, &o.resources, refuse);
        }
        let t = Instant::now();
        offers = a.allocate(now);
        rounds.push(t.elapsed());
        if offers.is_empty() {
            break;
        }
    }
    let first = rounds[0];
    rounds.sort();
    row(format!("declining ({label}): first cycle, every agent offered"), ms(first), "ms");
    row(format!("declining ({label}): cycles until all filtered"), rounds.len() as f64, "cycles");
    row(format!("declining ({label}): cycle, median"), ms(percentile(&rounds, 0.5)), "ms");
    row(format!("declining ({label}): cycle, worst"), ms(*rounds.last().expect("one round")), "ms");

    // Every framework revives: a full cycle offering every agent again.
    for id in &fw_ids {
        a.revive(id, &[]);
    }
    let t = Instant::now();
    let offers = a.allocate(now);
    row(format!("full cycle after all revive ({label}, {} offers)", offers.len()), ms(t.elapsed()), "ms");
    assert_eq!(offers.len(), agents, "every agent offered once");

    // Single events, each followed by a cycle.
    let mut event = |name: &str, a: &mut Allocator| {
        let t = Instant::now();
        let n = a.allocate(now).len();
        row(format!("event: {name}, then a cycle ({n} offers)"), ms(t.elapsed()), "ms");
    };
    let o = &offers[0];
    a.recover(&o.agent_id, &o.framework_id, &o.role, &o.resources, refuse);
    event("offer declined", &mut a);
    // Agent 1 runs framework 1's tasks (see above); one of them ends.
    a.recover(&agent_ids[1], &fw_ids[1 % frameworks], "*", &Resources::parse("cpus:1;mem:64").expect("r"), None);
    event("task finished", &mut a);
    a.add_agent(AgentId::new("new-agent").expect("id"), total.clone(), Vec::new()).expect("agent");
    event("agent added", &mut a);
    rows
}

/// Mesos' LargeAndSmallQuota shape: agents of 2 cpus; 5/6 of the roles have a guarantee of half an agent, 1/6 of
/// two agents; one framework per role; one cycle satisfies every guarantee.
fn allocator_quota(roles: usize) -> Vec<Row> {
    let (small, large) = (roles * 5 / 6, roles / 6);
    let agents = small / 5 + large * 5;
    let mut a = Allocator::new(AllocatorConfig::default());
    let now = Instant::now();
    let total = Resources::parse("cpus:2;mem:2048;disk:2048").expect("resources");
    for i in 0..agents {
        a.add_agent(AgentId::new(format!("a{i}")).expect("id"), total.clone(), Vec::new()).expect("agent");
    }
    let mut named = Vec::new();
    for (count, kind, amount) in [(small, "small", "cpus:1;mem:1024;disk:1024"), (large, "large", "cpus:4;mem:4096;disk:4096")] {
        let amount = Resources::parse(amount).expect("quota");
        for i in 0..count {
            let role = format!("{kind}{i}");
            a.set_quota(&role, Quota { guarantee: amount.clone(), limit: amount.clone() }).expect("quota");
            named.push(role);
        }
    }
    for (i, role) in named.iter().enumerate() {
        a.add_framework(FrameworkId::new(format!("f{i}")).expect("id"), std::slice::from_ref(role), true).expect("fw");
    }
    let label = format!("{agents} agents x {} roles x {} frameworks", named.len(), named.len());
    let t = Instant::now();
    let offers = a.allocate(now);
    let first = t.elapsed();
    let t = Instant::now();
    let again = a.allocate(now);
    let second = t.elapsed();
    assert!(again.is_empty(), "every guarantee met in one cycle");
    vec![
        Row { scenario: "allocator", metric: format!("quota ({label}): cycle meeting every guarantee ({} offers)", offers.len()), value: ms(first), unit: "ms" },
        Row { scenario: "allocator", metric: format!("quota ({label}): next cycle, nothing to offer"), value: ms(second), unit: "ms" },
    ]
}

fn allocator(agents: usize, frameworks: usize, quota_roles: usize) -> Vec<Row> {
    let mut rows = allocator_declining(agents, frameworks);
    rows.extend(allocator_quota(quota_roles));
    rows
}

async fn launch(count: usize, isolation: &'static str) -> anyhow::Result<Vec<Row>> {
    use corral_sdk::{OfferPool, TaskBuilder, TaskState};
    use corral_tests::{Cluster, ClusterSpec, FrameworkEvent, TestFramework};
    let mut spec = ClusterSpec { agent_resources: "cpus:4;mem:4096;disk:1024".into(), ..ClusterSpec::default() };
    spec.agent_args.push(format!("--isolation={isolation}"));
    let cluster = Cluster::start(spec).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("bench", "*", 60.0)).await;
    let need = Resources::parse("cpus:0.01;mem:1").context("resources")?;
    let mut latencies = Vec::with_capacity(count);
    let started = Instant::now();
    for i in 0..count {
        let offer = fw.offers().await.remove(0);
        let mut pool = OfferPool::new(&offer)?;
        let res = pool.take(&need, 0).context("offer too small")?;
        let id = format!("t{i}");
        let task = TaskBuilder::new(&id).exec("/bin/true", Vec::new()).resources(&res).build();
        let t = Instant::now();
        fw.driver.launch_with(&offer, vec![task], Some(0.0)).await?;
        fw.wait_update(&id, TaskState::TaskRunning).await;
        latencies.push(t.elapsed());
        fw.wait_for("finish", |e| matches!(e, FrameworkEvent::Update(s) if s.task_id == id && corral_sdk::is_terminal(s)).then_some(())).await;
    }
    let total = started.elapsed();
    latencies.sort();
    Ok(vec![
        Row { scenario: "launch", metric: format!("[{isolation}] accept -> RUNNING p50 ({count} sequential launches)"), value: ms(percentile(&latencies, 0.5)), unit: "ms" },
        Row { scenario: "launch", metric: format!("[{isolation}] accept -> RUNNING p99"), value: ms(percentile(&latencies, 0.99)), unit: "ms" },
        Row { scenario: "launch", metric: format!("[{isolation}] accept -> RUNNING max"), value: ms(*latencies.last().unwrap_or(&Duration::ZERO)), unit: "ms" },
        Row { scenario: "launch", metric: format!("[{isolation}] sequential offer -> launch -> finish cycles"), value: count as f64 / total.as_secs_f64(), unit: "tasks/s" },
    ])
}

/// Launches `count` `/bin/true` tasks as fast as offers allow (every offer filled with as many tasks as fit, all
/// outstanding at once) and returns finished tasks per second, from the first ACCEPT to the last FINISHED.
async fn sustained(count: usize, isolation: &'static str) -> anyhow::Result<f64> {
    use corral_sdk::{OfferPool, TaskBuilder};
    use corral_tests::{Cluster, ClusterSpec, FrameworkEvent, TestFramework};
    let mut spec = ClusterSpec { agent_resources: "cpus:8;mem:8192;disk:1024".into(), ..ClusterSpec::default() };
    spec.agent_args.push(format!("--isolation={isolation}"));
    let cluster = Cluster::start(spec).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("bench", "*", 60.0)).await;
    let need = Resources::parse("cpus:0.01;mem:1").context("resources")?;
    let (mut launched, mut finished) = (0, 0);
    let mut started = None;
    while finished < count {
        match fw.next(Duration::from_secs(30)).await.context("no event for 30 s")? {
            FrameworkEvent::Offers(offers) => {
                for offer in offers {
                    let mut pool = OfferPool::new(&offer)?;
                    let mut tasks = Vec::new();
                    while launched < count
                        && let Some(res) = pool.take(&need, 0)
                    {
                        tasks.push(TaskBuilder::new(format!("s{launched}")).exec("/bin/true", Vec::new()).resources(&res).build());
                        launched += 1;
                    }
                    started.get_or_insert_with(Instant::now);
                    fw.driver.launch_with(&offer, tasks, Some(0.0)).await?;
                }
            }
            FrameworkEvent::Update(s) if corral_sdk::is_terminal(&s) => finished += 1,
            _ => {}
        }
    }
    Ok(count as f64 / started.map_or(1.0, |t| t.elapsed().as_secs_f64()))
}

/// How fast this machine spawns and reaps `programs` (each in turn, one loop per core, no corral involved), per
/// round: `/bin/true` alone is the raw spawn rate; the shim's binary and then `/bin/true` is the floor of any
/// launch through a per-task shim.
fn spawn_rate(count: usize, programs: &[(std::path::PathBuf, Option<&'static str>)]) -> anyhow::Result<f64> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let programs = programs.to_vec();
            std::thread::spawn(move || -> std::io::Result<()> {
                for _ in 0..count / threads {
                    for (program, arg) in &programs {
                        std::process::Command::new(program).args(arg).stdout(std::process::Stdio::null()).status()?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    for w in workers {
        w.join().map_err(|_| anyhow::anyhow!("spawn thread panicked"))??;
    }
    Ok((count / threads * threads) as f64 / started.elapsed().as_secs_f64())
}

/// Launch latency and sustained launch rate with cgroups and without, measured in one run, with their ratios and
/// the machine's raw spawn rate measured alongside.
async fn launch_both(count: usize) -> anyhow::Result<Vec<Row>> {
    let mut rows = launch(count, "cgroups").await?;
    rows.extend(launch(count, "none").await?);
    let p50 = |tag: &str| rows.iter().find(|r| r.metric.starts_with(tag) && r.metric.contains("p50")).map(|r| r.value).unwrap_or(0.0);
    let ratio = p50("[cgroups]") / p50("[none]").max(1e-9);
    rows.push(Row { scenario: "launch", metric: "p50 with cgroups / p50 without".into(), value: ratio, unit: "x" });
    let true_ = (std::path::PathBuf::from("/bin/true"), None);
    let raw = spawn_rate(count.max(100), std::slice::from_ref(&true_))?;
    rows.push(Row { scenario: "launch", metric: "raw spawn rate of this machine (/bin/true, one loop per core)".into(), value: raw, unit: "spawns/s" });
    let shim = (corral_tests::bin("corral-agent"), Some("--version"));
    let floor = spawn_rate(count.max(100), &[shim, true_])?;
    let metric = "launch floor: the shim's binary then /bin/true, spawned in turn, one loop per core".into();
    rows.push(Row { scenario: "launch", metric, value: floor, unit: "pairs/s" });
    for isolation in ["cgroups", "none"] {
        let rate = sustained(count, isolation).await?;
        rows.push(Row { scenario: "launch", metric: format!("[{isolation}] sustained launches, {count} tasks finished"), value: rate, unit: "tasks/s" });
        rows.push(Row { scenario: "launch", metric: format!("[{isolation}] sustained launch rate / raw spawn rate"), value: rate / raw.max(1e-9), unit: "x" });
        rows.push(Row { scenario: "launch", metric: format!("[{isolation}] sustained launch rate / launch floor"), value: rate / floor.max(1e-9), unit: "x" });
    }
    Ok(rows)
}

/// Creating a task's cgroups with limits and removing them again, on this host's real hierarchy.
fn cgroups(count: usize) -> anyhow::Result<Vec<Row>> {
    use corral_agent::isolation::{IsolationConfig, Limits, build};
    let root = format!("corral-bench-{}", std::process::id());
    let isolator = build(&IsolationConfig { kind: "cgroups".into(), hierarchy: "/sys/fs/cgroup".into(), root: root.clone() })?;
    let limits = Limits { cpus: 0.5, mem_mib: 64.0, cfs_quota: true, max_pids: Some(64) };
    let (mut setup, mut teardown) = (Vec::with_capacity(count), Vec::with_capacity(count));
    for i in 0..count {
        let task = format!("bench/fw+t{i}");
        let t = Instant::now();
        isolator.prepare(&task, &limits)?;
        setup.push(t.elapsed());
        let t = Instant::now();
        isolator.cleanup(&task)?;
        teardown.push(t.elapsed());
    }
    isolator.release("bench");
    corral_tests::remove_cgroups(&root);
    setup.sort();
    teardown.sort();
    let name = isolator.name();
    Ok(vec![
        Row { scenario: "cgroups", metric: format!("[{name}] setup (mkdir + limits) p50, {count} tasks"), value: ms(percentile(&setup, 0.5)), unit: "ms" },
        Row { scenario: "cgroups", metric: format!("[{name}] setup p99"), value: ms(percentile(&setup, 0.99)), unit: "ms" },
        Row { scenario: "cgroups", metric: format!("[{name}] teardown (freeze, kill, rmdir) p50"), value: ms(percentile(&teardown, 0.5)), unit: "ms" },
        Row { scenario: "cgroups", metric: format!("[{name}] teardown p99"), value: ms(percentile(&teardown, 0.99)), unit: "ms" },
    ])
}

/// The resident set of a process, in KiB.
fn rss_kib(pid: i32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
}

/// Places `tasks` long-running tasks with `frameworks` frameworks on `agents` simulated agents.
async fn placement(agents: usize, tasks: usize, frameworks: usize) -> anyhow::Result<Vec<Row>> {
    use corral_sdk::{OfferPool, TaskBuilder};
    use corral_tests::{Cluster, ClusterSpec, FrameworkEvent, Process, TestFramework};
    let spec = ClusterSpec {
        agents: 0,
        master_args: vec!["--agent-ping-timeout=120s".into(), "--offer-timeout=0s".into()],
        ..ClusterSpec::default()
    };
    let cluster = Cluster::start(spec).await;
    let master_pid = cluster.master.as_ref().context("master")?.pid().as_raw();
    let rss_empty = rss_kib(master_pid)?;
    let args = ["sim-agents".to_string(), format!("--master={}", cluster.master_addr()), format!("--count={agents}")];
    let _sim = Process::spawn("sim-agents", &std::env::current_exe()?, &args, cluster.dir.path());
    let registering = Instant::now();
    loop {
        let state = cluster.state().await;
        if state["agents"].as_array().map_or(0, Vec::len) == agents {
            break;
        }
        anyhow::ensure!(registering.elapsed() < Duration::from_secs(600), "agents did not register within 10 min");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let registered = registering.elapsed();
    let rss_agents = rss_kib(master_pid)?;

    let need = Resources::parse("cpus:0.01;mem:1").context("resources")?;
    let per_framework = tasks.div_ceil(frameworks);
    let started = Instant::now();
    let mut runs = Vec::new();
    for f in 0..frameworks {
        let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info(&format!("place-{f}"), "*", 600.0)).await;
        let need = need.clone();
        runs.push(tokio::spawn(async move {
            let (mut launched, mut running, mut offers, mut updates) = (0usize, 0usize, 0usize, 0usize);
            while running < per_framework {
                match fw.next(Duration::from_secs(60)).await.context("no event for 60 s")? {
                    FrameworkEvent::Offers(batch) => {
                        for offer in batch {
                            offers += 1;
                            let mut pool = OfferPool::new(&offer)?;
                            let mut tasks = Vec::new();
                            // A few hundred tasks per offer: enough to keep every agent busy, small enough for one message.
                            while launched < per_framework && tasks.len() < 200
                                && let Some(res) = pool.take(&need, 0)
                            {
                                tasks.push(TaskBuilder::new(format!("f{f}-t{launched}")).shell("sleep 1000000").resources(&res).build());
                                launched += 1;
                            }
                            if tasks.is_empty() {
                                fw.driver.decline([&offer.id], Some(600.0)).await?;
                            } else {
                                fw.driver.launch_with(&offer, tasks, Some(0.0)).await?;
                            }
                        }
                    }
                    FrameworkEvent::Update(s) => {
                        updates += 1;
                        if s.state == corral_sdk::TaskState::TaskRunning as i32 {
                            running += 1;
                        }
                    }
                    _ => {}
                }
            }
            anyhow::Ok((offers, updates))
        }));
    }
    let (mut offers, mut updates) = (0, 0);
    for r in runs {
        let (o, u) = r.await??;
        offers += o;
        updates += u;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rss_tasks = rss_kib(master_pid)?;
    let total = per_framework * frameworks;
    let label = format!("{agents} simulated agents, {total} tasks, {frameworks} frameworks");
    Ok(vec![
        Row { scenario: "placement", metric: format!("agents registered ({agents})"), value: registered.as_secs_f64(), unit: "s" },
        Row { scenario: "placement", metric: format!("tasks placed to RUNNING ({label})"), value: total as f64 / elapsed, unit: "tasks/s" },
        Row { scenario: "placement", metric: "offers received by frameworks".into(), value: offers as f64 / elapsed, unit: "offers/s" },
        Row { scenario: "placement", metric: "status updates received by frameworks".into(), value: updates as f64 / elapsed, unit: "updates/s" },
        Row { scenario: "placement", metric: "master RSS per agent".into(), value: (rss_agents - rss_empty) / agents.max(1) as f64, unit: "KiB" },
        Row { scenario: "placement", metric: "master RSS per task".into(), value: (rss_tasks - rss_agents) / total.max(1) as f64, unit: "KiB" },
    ])
}

/// Kills (SIGKILL) or stops (SIGTERM) the leader `count` times each and times the takeover.
async fn failover(count: usize, lease_ttl: u64, agents: usize) -> anyhow::Result<Vec<Row>> {
    use corral_tests::ha::{HaCluster, registered_agents};
    use corral_tests::{ClusterSpec, FrameworkEvent, TestFramework};
    let ttl = Duration::from_secs(lease_ttl);
    let mut cluster = HaCluster::start(3, ttl, ClusterSpec { agents, ..ClusterSpec::default() }).await;
    let mut fw = TestFramework::start(&cluster.master_list(), TestFramework::info("bench", "*", 300.0)).await;
    let mut rows = vec![Row { scenario: "failover", metric: "leader lease TTL".into(), value: ttl.as_secs_f64(), unit: "s" }];
    for (signal, name) in [(Signal::SIGKILL, "SIGKILL"), (Signal::SIGTERM, "SIGTERM (resign)")] {
        let (mut elected, mut offered, mut reregistered) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..count {
            let leader = cluster.wait_agreed_leader().await;
            // Forget what the old leader sent: only the new leader's offers count.
            while fw.next(Duration::from_millis(200)).await.is_some() {}
            let t = Instant::now();
            cluster.signal_master(leader, signal);
            let (_, took) = cluster.wait_leader(Some(leader)).await;
            elected.push(took);
            fw.wait_for("re-subscription", |e| matches!(e, FrameworkEvent::Registered { .. }).then_some(())).await;
            fw.wait_for("offers from the new leader", |e| matches!(e, FrameworkEvent::Offers(_)).then_some(())).await;
            offered.push(t.elapsed());
            cluster.wait_leader_state("every agent back", |s| registered_agents(s) == agents).await;
            reregistered.push(t.elapsed());
            cluster.kill_master(leader);
            cluster.start_master(leader);
        }
        for (what, mut times) in [
            ("new leader elected", elected),
            ("framework offered resources by the new leader", offered),
            ("every agent re-registered", reregistered),
        ] {
            times.sort();
            let metric = format!("[{name}] {what}, median of {count}");
            rows.push(Row { scenario: "failover", metric, value: ms(percentile(&times, 0.5)), unit: "ms" });
            let metric = format!("[{name}] {what}, max");
            rows.push(Row { scenario: "failover", metric, value: ms(*times.last().unwrap_or(&Duration::ZERO)), unit: "ms" });
        }
    }
    Ok(rows)
}

fn print(rows: &[Row]) -> anyhow::Result<()> {
    let width = rows.iter().map(|r| r.metric.len()).max().unwrap_or(10);
    println!("{:<10}  {:<width$}  {:>12}", "SCENARIO", "METRIC", "VALUE");
    for r in rows {
        println!("{:<10}  {:<width$}  {:>9.3} {}", r.scenario, r.metric, r.value, r.unit);
    }
    let json: Vec<Value> = rows.iter().map(|r| json!({"scenario": r.scenario, "metric": r.metric, "value": r.value, "unit": r.unit})).collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("results.json"), serde_json::to_string_pretty(&json)?)?;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut rows = Vec::new();
    match cli.scenario {
        Scenario::Allocator { agents, frameworks, quota_roles } => {
            rows.extend(if cli.smoke { allocator(100, 10, 60) } else { allocator(agents, frameworks, quota_roles) })
        }
        Scenario::Launch { count } => rows.extend(launch_both(if cli.smoke { 5 } else { count }).await?),
        Scenario::Cgroups { count } => rows.extend(cgroups(if cli.smoke { 5 } else { count })?),
        Scenario::Placement { agents, tasks, frameworks } => rows.extend(if cli.smoke {
            placement(20, 2000, 2).await?
        } else {
            placement(agents, tasks, frameworks).await?
        }),
        Scenario::SimAgents { master, count, resources } => return sim::run(&master, count, &resources).await,
        Scenario::Failover { count, lease_ttl, agents } => {
            rows.extend(failover(if cli.smoke { 1 } else { count }, lease_ttl, agents).await?)
        }
        Scenario::All => {
            rows.extend(if cli.smoke { allocator(100, 10, 60) } else { allocator(10_000, 1_000, 3_000) });
            rows.extend(launch_both(if cli.smoke { 5 } else { 500 }).await?);
            rows.extend(cgroups(if cli.smoke { 5 } else { 200 })?);
            // Full size: 10,000 simulated agents and 1,000,000 tasks (about 30 s and 2 GiB of master RSS).
            rows.extend(if cli.smoke { placement(20, 2000, 2).await? } else { placement(10_000, 1_000_000, 10).await? });
            rows.extend(failover(if cli.smoke { 1 } else { 10 }, 2, 3).await?);
        }
    }
    print(&rows)
}
