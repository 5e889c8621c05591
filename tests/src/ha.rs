//! Replicated-master clusters: a real etcd (the Debian `etcd` binary) on free loopback ports, several
//! `corral-master` processes electing a leader in it, and agents that find the leader themselves.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::{ClusterSpec, Process, WAIT, bin, drain_agents, free_port, kill_strays, remove_cgroups, spawn_agent};

/// A single-member etcd cluster whose data survives restarts.
pub struct Etcd {
    pub port: u16,
    peer_port: u16,
    dir: PathBuf,
    process: Option<Process>,
}

impl Etcd {
    /// Starts etcd with its data under `dir/etcd` and waits until it answers.
    pub async fn start(dir: &Path) -> Etcd {
        let mut etcd = Etcd { port: free_port(), peer_port: free_port(), dir: dir.to_path_buf(), process: None };
        etcd.restart().await;
        etcd
    }

    /// `127.0.0.1:<port>`.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `etcd://127.0.0.1:<port>`, the form masters, agents and frameworks take.
    pub fn url(&self) -> String {
        format!("etcd://{}", self.endpoint())
    }

    /// (Re)starts the process on the same ports and data, and waits until it is healthy.
    pub async fn restart(&mut self) {
        let program = which("etcd").expect("etcd is not installed: the test command installs etcd-server");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client = format!("http://127.0.0.1:{}", self.port);
        let args = [
            "--name=test".to_string(),
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster=test={peer}"),
            "--log-level=warn".to_string(),
        ];
        self.process = Some(Process::spawn("etcd", &program, &args, &self.dir));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("client");
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(r) = http.get(format!("{client}/health")).send().await
                && r.json::<Value>().await.is_ok_and(|v| v["health"] == "true")
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("etcd did not come up:\n{}", self.process.as_ref().map(|p| p.log_tail()).unwrap_or_default());
    }

    /// Stops etcd cleanly (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.signal(Signal::SIGTERM);
            p.wait_timeout(Duration::from_secs(10));
        }
    }

    /// A client for direct reads and writes.
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([format!("http://{}", self.endpoint())], None).await.expect("etcd client")
    }

    /// Every key under `prefix`, as text.
    pub async fn keys(&self, prefix: &str) -> Vec<String> {
        let options = etcd_client::GetOptions::new().with_prefix().with_keys_only();
        let response = self.client().await.get(prefix, Some(options)).await.expect("etcd get");
        response.kvs().iter().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).collect()
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}

/// Several masters electing a leader in a real etcd, and agents that follow the leader.
pub struct HaCluster {
    pub dir: tempfile::TempDir,
    pub cgroup_root: String,
    pub etcd: Etcd,
    pub ports: Vec<u16>,
    pub masters: Vec<Option<Process>>,
    pub agents: Vec<Option<Process>>,
    pub lease_ttl: Duration,
    spec: ClusterSpec,
    http: reqwest::Client,
}

impl HaCluster {
    /// Starts etcd, `masters` masters with a `lease_ttl` lease, and `spec.agents` agents; even-numbered agents are
    /// given the master list, odd-numbered ones `etcd://`. Waits for one leader and every agent registered.
    pub async fn start(masters: usize, lease_ttl: Duration, spec: ClusterSpec) -> HaCluster {
        let dir = tempfile::Builder::new().prefix("corral-test-").tempdir().expect("tempdir");
        let cgroup_root = format!("corral-test-{}", dir.path().file_name().unwrap().to_string_lossy().replace('.', ""));
        let etcd = Etcd::start(dir.path()).await;
        let mut cluster = HaCluster {
            cgroup_root,
            etcd,
            ports: (0..masters).map(|_| free_port()).collect(),
            masters: (0..masters).map(|_| None).collect(),
            agents: Vec::new(),
            lease_ttl,
            spec: spec.clone(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            dir,
        };
        for i in 0..masters {
            cluster.start_master(i);
        }
        cluster.wait_leader(None).await;
        for i in 0..spec.agents {
            let master = if i % 2 == 0 { cluster.master_list() } else { cluster.etcd.url() };
            cluster.agents.push(Some(spawn_agent(cluster.dir.path(), i, &master, &spec, &cluster.cgroup_root)));
        }
        cluster.wait_leader_state("every agent registered", |s| registered_agents(s) == spec.agents).await;
        cluster
    }

    /// `127.0.0.1:<port>` of master `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    /// Every master, comma-separated (the `--master` form).
    pub fn master_list(&self) -> String {
        (0..self.ports.len()).map(|i| self.addr(i)).collect::<Vec<_>>().join(",")
    }

    /// (Re)starts master `i` (it joins as a follower while another leads).
    pub fn start_master(&mut self, i: usize) {
        let mut args = vec![
            "--ip=127.0.0.1".to_string(),
            format!("--port={}", self.ports[i]),
            format!("--work-dir={}", self.dir.path().join(format!("master-{i}")).display()),
            format!("--registry={}", self.etcd.url()),
            format!("--leader-lease-ttl={}s", self.lease_ttl.as_secs()),
            // Agents that never come back are marked unreachable 10 s after a failover.
            "--agent-reregister-timeout=10s".to_string(),
        ];
        args.extend(self.spec.master_args.clone());
        self.masters[i] = Some(Process::spawn(&format!("master-{i}"), &bin("corral-master"), &args, self.dir.path()));
    }

    /// SIGKILLs master `i` and reaps it.
    pub fn kill_master(&mut self, i: usize) {
        if let Some(mut p) = self.masters[i].take() {
            p.signal(Signal::SIGKILL);
            p.wait_timeout(Duration::from_secs(10));
        }
    }

    pub fn signal_master(&self, i: usize, signal: Signal) {
        self.masters[i].as_ref().expect("master is running").signal(signal);
    }

    /// GET `path` on master `i` (redirects are not followed); None when it does not answer.
    pub async fn get(&self, i: usize, path: &str) -> Option<(u16, reqwest::header::HeaderMap, Value)> {
        let r = self.http.get(format!("http://{}{path}", self.addr(i))).send().await.ok()?;
        let (code, headers) = (r.status().as_u16(), r.headers().clone());
        Some((code, headers, r.json().await.unwrap_or(Value::Null)))
    }

    /// `/state` of master `i`.
    pub async fn state_of(&self, i: usize) -> Option<Value> {
        self.get(i, "/state").await.map(|(_, _, v)| v)
    }

    /// The index of the one running master whose `/state` says it leads, if exactly one does.
    pub async fn leader(&self) -> Option<usize> {
        let mut leaders = Vec::new();
        for i in (0..self.ports.len()).filter(|&i| self.masters[i].is_some()) {
            if self.state_of(i).await.is_some_and(|s| s["is_leader"] == true) {
                leaders.push(i);
            }
        }
        (leaders.len() == 1).then(|| leaders[0])
    }

    /// Waits until exactly one master leads (other than `not`) and returns it with the time that took.
    pub async fn wait_leader(&self, not: Option<usize>) -> (usize, Duration) {
        let start = Instant::now();
        while start.elapsed() < WAIT {
            if let Some(i) = self.leader().await
                && Some(i) != not
            {
                return (i, start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no single leader within {WAIT:?}\n{}", self.logs());
    }

    /// Waits until every running master's `/state` names the same leader, and returns it.
    pub async fn wait_agreed_leader(&self) -> usize {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(leader) = self.leader().await {
                let mut agreed = true;
                for i in (0..self.ports.len()).filter(|&i| self.masters[i].is_some()) {
                    let named = self.state_of(i).await.map(|s| s["leader"].clone());
                    agreed &= named == Some(Value::from(self.addr(leader)));
                }
                if agreed {
                    return leader;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the masters did not agree on a leader within {WAIT:?}\n{}", self.logs());
    }

    /// Polls the leader's `/state` until `check` holds.
    pub async fn wait_leader_state(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(i) = self.leader().await
                && let Some(state) = self.state_of(i).await
            {
                if check(&state) {
                    return state;
                }
                last = state;
            }
            // Finely: the failover bench times re-registration with this.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}; last leader state:\n{last:#}\n{}", self.logs());
    }

    /// The tail of every process's log.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for p in self.masters.iter().chain(self.agents.iter()).flatten().chain(self.etcd.process.iter()) {
            out.push_str(&format!("--- {} ---\n{}\n", p.name, p.log_tail()));
        }
        out
    }
}

/// How many agents a `/state` shows as registered.
pub fn registered_agents(state: &Value) -> usize {
    state["agents"].as_array().map_or(0, |a| a.iter().filter(|x| x["state"] == "REGISTERED").count())
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        drain_agents(&mut self.agents);
        self.masters.clear();
        self.etcd.stop();
        kill_strays(self.dir.path());
        remove_cgroups(&self.cgroup_root);
    }
}
