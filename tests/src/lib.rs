//! The system-test harness: real `corral-master` and `corral-agent` processes on free loopback ports in a
//! temporary directory, and scripted frameworks built on the real SDK.
//!
//! Everything a test starts is stopped when its [`Cluster`] is dropped — agents are drained (SIGUSR1 kills their
//! tasks), then every process is SIGKILLed, and finally any process still carrying one of this cluster's
//! sandboxes in its environment (a task or shim that outlived a SIGKILLed agent) is killed too.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use corral_sdk::{Driver, Scheduler, SchedulerDriver, async_trait, v1};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::sync::mpsc;

pub mod ha;

/// How long harness waits last before a test fails. Generous: CI machines are slow and shared.
pub const WAIT: Duration = Duration::from_secs(30);

/// Directory holding the built binaries (`CORRAL_BIN_DIR`, or the cargo target dir of this test).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CORRAL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // A test runs from target/<profile>/deps/, a bench binary from target/<profile>/.
    let dir = exe.parent().expect("exe dir");
    if dir.join("corral-master").is_file() { dir.to_path_buf() } else { dir.parent().expect("target dir").to_path_buf() }
}

/// Path of one of our binaries; panics with a hint when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --bins` before the tests", path.display());
    path
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A port `p` on 127.0.0.1 such that `p + offset` is free too, for every offset (for tools that derive ports).
pub fn free_port_with(offsets: &[u16]) -> u16 {
    loop {
        let port = free_port();
        let free = |p: Option<u16>| p.is_some_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if offsets.iter().all(|o| free(port.checked_add(*o))) {
            return port;
        }
    }
}

/// A child process that is killed when dropped.
pub struct Process {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, program: &Path, args: &[String], dir: &Path) -> Process {
        Self::spawn_with_env(name, program, args, &[], dir)
    }

    /// Like [`Process::spawn`], with extra environment variables (e.g. configuration as `CORRAL_*`).
    pub fn spawn_with_env(name: &str, program: &Path, args: &[String], env: &[(&str, String)], dir: &Path) -> Process {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            // CORRAL_TEST_LOG (e.g. "debug") raises the log level of every process a test starts.
            .env("RUST_LOG", std::env::var("CORRAL_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Process { name: name.to_string(), child, log }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        let _ = kill(self.pid(), signal);
    }

    /// Waits for the process to exit; `None` on timeout.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The tail of the process's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub agents: usize,
    pub agent_resources: String,
    pub master_args: Vec<String>,
    pub agent_args: Vec<String>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            agents: 1,
            agent_resources: "cpus:2;mem:1024;disk:1024".into(),
            master_args: Vec::new(),
            agent_args: vec!["--status-update-retry=500ms".into(), "--usage-interval=300ms".into()],
        }
    }
}

/// A running cluster of real processes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    /// This cluster's own cgroup root name (removed with the cluster).
    pub cgroup_root: String,
    pub master_port: u16,
    pub master: Option<Process>,
    pub agents: Vec<Option<Process>>,
    spec: ClusterSpec,
    http: reqwest::Client,
}

impl Cluster {
    /// Starts a master and `spec.agents` agents and waits until every agent is registered.
    pub async fn start(spec: ClusterSpec) -> Cluster {
        let dir = tempfile::Builder::new().prefix("corral-test-").tempdir().expect("tempdir");
        let cgroup_root = format!("corral-test-{}", dir.path().file_name().unwrap().to_string_lossy().replace('.', ""));
        let mut cluster = Cluster {
            cgroup_root,
            master_port: free_port(),
            dir,
            master: None,
            agents: Vec::new(),
            spec: spec.clone(),
            http: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client"),
        };
        cluster.start_master().await;
        for i in 0..spec.agents {
            cluster.agents.push(None);
            cluster.start_agent(i);
        }
        cluster.wait_agents_registered(spec.agents).await;
        cluster
    }

    /// `127.0.0.1:<port>` of the master.
    pub fn master_addr(&self) -> String {
        format!("127.0.0.1:{}", self.master_port)
    }

    pub fn master_url(&self) -> String {
        format!("http://{}", self.master_addr())
    }

    /// (Re)starts the master on its port with its work dir.
    pub async fn start_master(&mut self) {
        let mut args = vec![
            "--ip=127.0.0.1".to_string(),
            format!("--port={}", self.master_port),
            format!("--work-dir={}", self.dir.path().join("master").display()),
        ];
        args.extend(self.spec.master_args.clone());
        self.master = Some(Process::spawn("master", &bin("corral-master"), &args, self.dir.path()));
        let url = format!("{}/health", self.master_url());
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if self.http.get(&url).send().await.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("master did not come up:\n{}", self.master.as_ref().map(|m| m.log_tail()).unwrap_or_default());
    }

    /// Starts (or restarts, with the same work dir) agent `i`.
    pub fn start_agent(&mut self, i: usize) {
        let p = spawn_agent(self.dir.path(), i, &self.master_addr(), &self.spec, &self.cgroup_root);
        if i >= self.agents.len() {
            self.agents.resize_with(i + 1, || None);
        }
        self.agents[i] = Some(p);
    }

    pub fn agent_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{i}"))
    }

    /// The master's `/state`.
    pub async fn state(&self) -> Value {
        let url = format!("{}/state", self.master_url());
        self.http.get(&url).send().await.expect("GET /state").json().await.expect("/state is JSON")
    }

    /// Polls `/state` until `check` holds; panics with the last state and logs after [`WAIT`].
    pub async fn wait_state(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Ok(r) = self.http.get(format!("{}/state", self.master_url())).send().await
                && let Ok(state) = r.json::<Value>().await
            {
                if check(&state) {
                    return state;
                }
                last = state;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("timed out waiting for {what}; last state:\n{last:#}\nmaster log:\n{}", self.logs());
    }

    pub async fn wait_agents_registered(&self, n: usize) -> Value {
        self.wait_state(&format!("{n} registered agents"), |s| {
            s["agents"].as_array().is_some_and(|a| a.iter().filter(|x| x["state"] == "REGISTERED").count() == n)
        })
        .await
    }

    /// A task from `/state` (active or completed), with its framework.
    pub fn find_task<'a>(state: &'a Value, task_id: &str) -> Option<&'a Value> {
        let frameworks = state["frameworks"].as_array().into_iter().flatten();
        let completed = state["completed_frameworks"].as_array().into_iter().flatten();
        frameworks
            .chain(completed)
            .flat_map(|f| {
                let tasks = f["tasks"].as_array().into_iter().flatten();
                tasks.chain(f["completed_tasks"].as_array().into_iter().flatten())
            })
            .find(|t| t["id"] == task_id)
    }

    /// GET on an agent's HTTP API (agent by id from `/state`).
    /// GET on the master: status code and JSON body (Null when the body is not JSON).
    pub async fn master_get(&self, path_and_query: &str) -> (u16, Value) {
        let r = self.http.get(format!("{}{path_and_query}", self.master_url())).send().await.expect("master GET");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    pub async fn agent_get(&self, agent_id: &str, path_and_query: &str) -> (u16, Value) {
        let state = self.state().await;
        let agent = state["agents"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["id"] == agent_id))
            .unwrap_or_else(|| panic!("agent {agent_id} not in /state"));
        let url = format!("http://{}:{}{}", agent["hostname"].as_str().unwrap(), agent["port"], path_and_query);
        let r = self.http.get(&url).send().await.expect("agent GET");
        let code = r.status().as_u16();
        (code, r.json().await.unwrap_or(Value::Null))
    }

    /// A task as the agent's `/state` shows it (active or completed).
    pub async fn agent_task(&self, agent_id: &str, task_id: &str) -> Value {
        let (_, state) = self.agent_get(agent_id, "/state").await;
        state["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(state["completed_tasks"].as_array().into_iter().flatten())
            .rfind(|t| t["id"] == task_id)
            .cloned()
            .unwrap_or_else(|| panic!("task {task_id} not on agent {agent_id}: {state:#}"))
    }

    /// A task's cgroup directory in a v1 controller hierarchy of this machine.
    pub async fn task_cgroup_dir(&self, agent_id: &str, task_id: &str, controller: &str) -> PathBuf {
        let t = self.agent_task(agent_id, task_id).await;
        task_cgroup(&self.cgroup_root, controller, t["cgroup"].as_str().expect("task has a cgroup"))
    }

    /// A task's sandbox file as text, read through the agent's `/files/read`.
    pub async fn sandbox_file(&self, agent_id: &str, task_id: &str, file: &str) -> String {
        let (_, agent_state) = self.agent_get(agent_id, "/state").await;
        let sandbox = agent_state["tasks"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(agent_state["completed_tasks"].as_array().into_iter().flatten())
            .find(|t| t["id"] == task_id)
            .map(|t| t["sandbox"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("task {task_id} not on agent {agent_id}: {agent_state:#}"));
        let path = format!("{sandbox}/{file}");
        let query = format!("/files/read?path={}", urlencode(&path));
        let (code, body) = self.agent_get(agent_id, &query).await;
        assert_eq!(code, 200, "{body}");
        body["data"].as_str().unwrap_or_default().to_string()
    }

    /// The logs of every process, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in self.master.iter().chain(self.agents.iter().flatten()) {
            out.push_str(&format!("--- {} ---\n{}\n", p.name, p.log_tail()));
        }
        out
    }

    /// Runs the `corral` CLI against this cluster; returns (exit code, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = tokio::process::Command::new(bin("corral"))
            .args(args)
            .env("CORRAL_MASTER", self.master_url())
            .env_remove("RUST_LOG")
            .output()
            .await
            .expect("run corral");
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        drain_agents(&mut self.agents);
        self.master = None;
        kill_strays(self.dir.path());
        remove_cgroups(&self.cgroup_root);
    }
}

/// Agent `i` of a test cluster in `dir`: loopback, a free HTTP port, its own 1000 ports, `spec`'s resources and
/// flags, tasks under `cgroup_root`.
pub fn spawn_agent(dir: &Path, i: usize, master: &str, spec: &ClusterSpec, cgroup_root: &str) -> Process {
    let first_port = 31000 + i * 1000;
    let mut args = vec![
        format!("--master={master}"),
        "--ip=127.0.0.1".to_string(),
        "--port=0".to_string(),
        format!("--work-dir={}", dir.join(format!("agent-{i}")).display()),
        format!("--resources={};ports:[{}-{}]", spec.agent_resources, first_port, first_port + 999),
        format!("--cgroup-root={cgroup_root}"),
    ];
    args.extend(spec.agent_args.clone());
    Process::spawn(&format!("agent-{i}"), &bin("corral-agent"), &args, dir)
}

/// Drains every agent (SIGUSR1 kills its tasks), waits for them to exit, and forgets them.
pub fn drain_agents(agents: &mut Vec<Option<Process>>) {
    for p in agents.iter().flatten() {
        p.signal(Signal::SIGUSR1);
    }
    for p in agents.iter_mut().flatten() {
        p.wait_timeout(Duration::from_secs(10));
    }
    agents.clear();
}

/// Removes a cgroup root (in every hierarchy) when dropped, also when a test fails half-way.
pub struct CgroupGuard(pub String);

impl Drop for CgroupGuard {
    fn drop(&mut self) {
        remove_cgroups(&self.0);
    }
}

/// Where this machine's cgroup hierarchies are: each v1 controller mount, or the unified v2 mount.
pub fn cgroup_mounts() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let mut mounts: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.join("cgroup.procs").exists()).collect())
        .unwrap_or_default();
    if root.join("cgroup.procs").exists() {
        mounts.push(root.to_path_buf());
    }
    mounts
}

/// The task's cgroup directory in the v1 `controller` hierarchy (or the v2 one when `controller` is "").
pub fn task_cgroup(cgroup_root: &str, controller: &str, task_cgroup: &str) -> PathBuf {
    Path::new("/sys/fs/cgroup").join(controller).join(cgroup_root).join(task_cgroup)
}

/// Kills whatever is left in a cgroup tree and removes it, deepest first, in every hierarchy.
pub fn remove_cgroups(cgroup_root: &str) {
    for mount in cgroup_mounts() {
        remove_cgroup_tree(&mount.join(cgroup_root));
    }
}

/// Kills whatever is left in one cgroup directory tree and removes it, deepest first.
pub fn remove_cgroup_tree(dir: &Path) {
    if !dir.is_dir() {
        return;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..100 {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir(dir);
}

/// Kills every process whose environment or command line mentions `dir` (tasks and shims of this cluster).
pub fn kill_strays(dir: &Path) {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else { return };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        if pid as u32 == me {
            continue;
        }
        let mentions = |file: &str| {
            std::fs::read(entry.path().join(file))
                .map(|b| String::from_utf8_lossy(&b).contains(&needle))
                .unwrap_or(false)
        };
        if mentions("environ") || mentions("cmdline") {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Drops offers from events that came before a re-subscription: the master that made them is gone.
fn forget_offers(events: &mut std::collections::VecDeque<FrameworkEvent>) {
    events.retain(|e| !matches!(e, FrameworkEvent::Offers(_)));
}

/// What a [`TestFramework`] saw.
#[derive(Debug, Clone)]
pub enum FrameworkEvent {
    /// Subscribed (again) through the master at `master`.
    Registered { framework_id: String, master: String },
    Offers(Vec<v1::Offer>),
    Rescinded(String),
    Update(v1::TaskStatus),
    Error(String),
    Disconnected,
}

struct Forwarder {
    tx: mpsc::UnboundedSender<(FrameworkEvent, Driver)>,
}

#[async_trait]
impl Scheduler for Forwarder {
    async fn registered(&mut self, driver: &Driver, framework_id: &str, master: &str) {
        let event = FrameworkEvent::Registered { framework_id: framework_id.into(), master: master.into() };
        let _ = self.tx.send((event, driver.clone()));
    }
    async fn offers(&mut self, driver: &Driver, offers: Vec<v1::Offer>) {
        let _ = self.tx.send((FrameworkEvent::Offers(offers), driver.clone()));
    }
    async fn rescinded(&mut self, driver: &Driver, offer_id: &str) {
        let _ = self.tx.send((FrameworkEvent::Rescinded(offer_id.into()), driver.clone()));
    }
    async fn status_update(&mut self, driver: &Driver, status: &v1::TaskStatus) {
        let _ = self.tx.send((FrameworkEvent::Update(status.clone()), driver.clone()));
    }
    async fn error(&mut self, driver: &Driver, message: &str) {
        let _ = self.tx.send((FrameworkEvent::Error(message.into()), driver.clone()));
    }
    async fn disconnected(&mut self, driver: &Driver) {
        let _ = self.tx.send((FrameworkEvent::Disconnected, driver.clone()));
    }
}

/// A framework whose every event the test reads in order; it decides nothing by itself.
pub struct TestFramework {
    pub driver: Driver,
    pub framework_id: String,
    /// The master it first subscribed through.
    pub master: String,
    rx: mpsc::UnboundedReceiver<(FrameworkEvent, Driver)>,
    task: tokio::task::JoinHandle<Result<(), corral_sdk::DriverError>>,
    /// Events read past by `wait_*` helpers, kept for later helpers.
    backlog: std::collections::VecDeque<FrameworkEvent>,
}

impl TestFramework {
    /// Subscribes and waits for SUBSCRIBED.
    pub async fn start(master: &str, info: v1::FrameworkInfo) -> TestFramework {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(SchedulerDriver::new(corral_sdk::Masters::parse(master).expect("master address"), info).run(Forwarder { tx }));
        let (framework_id, master, driver) = loop {
            match tokio::time::timeout(WAIT, rx.recv()).await {
                Ok(Some((FrameworkEvent::Registered { framework_id, master }, driver))) => {
                    break (framework_id, master, driver);
                }
                Ok(Some(_)) => continue,
                Ok(None) => panic!("framework driver ended before subscribing: {:?}", task.await),
                Err(_) => panic!("framework did not subscribe within {WAIT:?}"),
            }
        };
        TestFramework { driver, framework_id, master, rx, task, backlog: Default::default() }
    }

    /// A framework with this name, role and failover timeout.
    pub fn info(name: &str, role: &str, failover_timeout: f64) -> v1::FrameworkInfo {
        v1::FrameworkInfo {
            name: name.into(),
            roles: vec![role.into()],
            failover_timeout_seconds: failover_timeout,
            ..Default::default()
        }
    }

    /// The next event, waiting at most `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> Option<FrameworkEvent> {
        if let Some(e) = self.backlog.pop_front() {
            return Some(e);
        }
        match tokio::time::timeout(timeout, self.rx.recv()).await {
            Ok(Some((event, _))) => Some(event),
            _ => None,
        }
    }

    /// Waits for the first event `pick` accepts; others are kept for later.
    pub async fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&FrameworkEvent) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        let mut skipped = Vec::new();
        let mut found = None;
        // First the backlog, in order.
        let mut rest = std::collections::VecDeque::new();
        while let Some(e) = self.backlog.pop_front() {
            if found.is_none()
                && let Some(t) = pick(&e)
            {
                if matches!(e, FrameworkEvent::Registered { .. }) {
                    forget_offers(&mut rest);
                }
                found = Some(t);
                continue;
            }
            rest.push_back(e);
        }
        self.backlog = rest;
        if let Some(t) = found {
            return t;
        }
        while Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some((event, _))) => {
                    if let Some(t) = pick(&event) {
                        self.backlog.extend(skipped);
                        if matches!(event, FrameworkEvent::Registered { .. }) {
                            forget_offers(&mut self.backlog);
                        }
                        return t;
                    }
                    skipped.push(event);
                }
                _ => break,
            }
        }
        panic!("timed out waiting for {what}; saw {skipped:#?}");
    }

    /// Waits for offers and returns them.
    pub async fn offers(&mut self) -> Vec<v1::Offer> {
        self.wait_for("offers", |e| match e {
            FrameworkEvent::Offers(o) => Some(o.clone()),
            _ => None,
        })
        .await
    }

    /// Outstanding offers of one agent whose resources together satisfy `pick` (to accept them at once).
    pub async fn live_offers(&mut self, pick: impl Fn(&corral_sdk::Resources) -> bool) -> Vec<v1::Offer> {
        self.pick_live(|live| {
            let mut agents: Vec<&str> = live.iter().map(|o| o.agent_id.as_str()).collect();
            agents.dedup();
            let agent = agents.into_iter().find(|a| {
                let mut union = corral_sdk::Resources::new();
                for o in live.iter().filter(|o| o.agent_id == *a) {
                    union.add(&corral_sdk::Resources::from_proto(&o.resources).unwrap_or_default());
                }
                pick(&union)
            })?;
            Some(live.iter().enumerate().filter(|(_, o)| o.agent_id == agent).map(|(i, _)| i).collect())
        })
        .await
    }

    /// The first offer still outstanding (not rescinded) that `pick` accepts.
    pub async fn live_offer(&mut self, pick: impl Fn(&v1::Offer) -> bool) -> v1::Offer {
        self.pick_live(|live| live.iter().position(&pick).map(|i| vec![i])).await.remove(0)
    }

    /// Gathers outstanding offers (honouring RESCIND) until `choose` picks some of them; the others are declined
    /// (refuse 0) so they come back, and events other than offers are kept for later helpers.
    async fn pick_live(&mut self, choose: impl Fn(&[v1::Offer]) -> Option<Vec<usize>>) -> Vec<v1::Offer> {
        let deadline = Instant::now() + WAIT;
        let mut live: Vec<v1::Offer> = Vec::new();
        let mut kept = Vec::new();
        let chosen = loop {
            // Take in everything already queued before choosing, so rescinds are seen.
            let wait = if live.is_empty() { deadline.saturating_duration_since(Instant::now()) } else { Duration::from_millis(100) };
            match self.next(wait).await {
                Some(FrameworkEvent::Offers(o)) => live.extend(o),
                Some(FrameworkEvent::Rescinded(id)) => live.retain(|o| o.id != id),
                Some(e @ FrameworkEvent::Registered { .. }) => {
                    // A new subscription (e.g. after a master failover): earlier offers are void.
                    live.clear();
                    kept.push(e);
                }
                Some(other) => kept.push(other),
                None => {
                    if let Some(indexes) = choose(&live) {
                        let (mine, rest): (Vec<_>, Vec<_>) =
                            live.drain(..).enumerate().partition(|(i, _)| indexes.contains(i));
                        live = rest.into_iter().map(|(_, o)| o).collect();
                        break mine.into_iter().map(|(_, o)| o).collect();
                    }
                    for o in live.drain(..) {
                        let _ = self.driver.decline([&o.id], Some(0.0)).await;
                    }
                    assert!(Instant::now() < deadline, "no matching offers within {WAIT:?}");
                }
            }
        };
        for o in live {
            let _ = self.driver.decline([&o.id], Some(0.0)).await;
        }
        self.backlog.extend(kept);
        chosen
    }

    /// Waits for an update of `task_id` into `state`.
    pub async fn wait_update(&mut self, task_id: &str, state: v1::TaskState) -> v1::TaskStatus {
        self.wait_for(&format!("{task_id} {}", state.name()), |e| match e {
            FrameworkEvent::Update(s) if s.task_id == task_id && s.state == state as i32 => Some(s.clone()),
            _ => None,
        })
        .await
    }

    /// Waits for the first terminal update of `task_id`.
    pub async fn wait_terminal(&mut self, task_id: &str) -> v1::TaskStatus {
        self.wait_for(&format!("{task_id} terminal"), |e| match e {
            FrameworkEvent::Update(s) if s.task_id == task_id && corral_sdk::is_terminal(s) => Some(s.clone()),
            _ => None,
        })
        .await
    }

    /// Launches one task with `command` and `resources` on the first offer that holds it.
    pub async fn launch_one(&mut self, task_id: &str, command: &str, resources: &str) -> v1::Offer {
        let need = corral_sdk::Resources::parse(resources).expect("test resources");
        loop {
            for offer in self.offers().await {
                let mut pool = corral_sdk::OfferPool::new(&offer).expect("offer");
                if let Some(res) = pool.take(&need, 0) {
                    let task = corral_sdk::TaskBuilder::new(task_id).shell(command).resources(&res).build();
                    self.driver.launch_with(&offer, vec![task], Some(0.0)).await.expect("launch");
                    return offer;
                }
                self.driver.decline([&offer.id], Some(0.0)).await.expect("decline");
            }
        }
    }

    /// Simulates the framework process dying: its stream drops without a teardown.
    pub fn crash(self) {
        self.task.abort();
    }
}

impl Drop for TestFramework {
    fn drop(&mut self) {
        self.task.abort();
    }
}
