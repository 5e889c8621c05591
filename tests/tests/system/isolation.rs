//! Isolation on the agent with this machine's real cgroups (v1 here), and cgroup v2 on a real cgroup2 mount.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use corral_proto::v1::{StatusReason, TaskState};
use corral_sdk::{OfferPool, Resources, TaskBuilder};
use corral_tests::{Cluster, ClusterSpec, TestFramework, WAIT};

/// Running (not a zombie waiting for a parent to reap it).
fn alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

async fn wait_file(cluster: &Cluster, agent: &str, task: &str, file: &str, needle: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = {
            let t = cluster.agent_task(agent, task).await;
            let path = format!("{}/{file}", t["sandbox"].as_str().unwrap());
            cluster.agent_get(agent, &format!("/files/read?path={path}")).await
        };
        let text = body["data"].as_str().unwrap_or_default().to_string();
        if code == 200 && text.contains(needle) {
            return text;
        }
        assert!(Instant::now() < deadline, "{file} of {task} never contained {needle:?}: {text:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_is_oom_killed_and_reported_with_its_limit() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    // `tail` keeps a whole "line" in memory: 128 MiB of zeros is 4x the 32 MiB limit.
    let offer = fw.launch_one("hog", "head -c 128M /dev/zero | tail > /dev/null", "cpus:0.1;mem:32").await;
    let s = fw.wait_terminal("hog").await;
    assert_eq!(s.state, TaskState::TaskFailed as i32, "{}", s.message);
    assert_eq!(s.reason, StatusReason::ReasonContainerLimitationMemory as i32, "{}", s.message);
    assert!(s.message.contains("mem:32"), "{}", s.message);
    for controller in ["memory", "cpu", "cpuacct", "freezer"] {
        let dir = cluster.task_cgroup_dir(&offer.agent_id, "hog", controller).await;
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_stays_within_the_pids_limit() {
    let mut spec = ClusterSpec::default();
    spec.agent_args.push("--max-pids-per-task=16".into());
    let cluster = Cluster::start(spec).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    // The classic recursive bomb; the leader then becomes `sleep` without forking.
    let offer = fw.launch_one("bomb", "f(){ f|f& }; f; exec sleep 600", "cpus:0.1;mem:64").await;
    fw.wait_update("bomb", TaskState::TaskRunning).await;
    let pids = cluster.task_cgroup_dir(&offer.agent_id, "bomb", "pids").await;
    assert_eq!(std::fs::read_to_string(pids.join("pids.max")).unwrap().trim(), "16");
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        let inside = procs(&pids);
        assert!(inside.len() <= 16, "{} processes in a cgroup limited to 16", inside.len());
        seen.extend(inside);
        let events = std::fs::read_to_string(pids.join("pids.events")).unwrap_or_default();
        let refused: u64 = events.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
        if refused > 0 {
            break; // the kernel refused forks at the limit: the bomb is contained
        }
        assert!(Instant::now() < deadline, "the bomb never reached the limit: {events:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The rest of the machine is unaffected: another task still starts.
    fw.launch_one("after", "echo ok", "cpus:0.1;mem:32").await;
    assert_eq!(fw.wait_terminal("after").await.state, TaskState::TaskFinished as i32);
    fw.driver.kill("bomb", &offer.agent_id, Some(0.0)).await.unwrap();
    fw.wait_terminal("bomb").await;
    seen.sort();
    seen.dedup();
    assert!(seen.iter().all(|p| !alive(*p)), "every process of the bomb is gone");
    assert!(!pids.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_double_fork_dies_with_its_cgroup_and_foreign_cgroups_are_left_alone() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    // A cgroup corral did not create, inside corral's own root.
    let foreign = PathBuf::from("/sys/fs/cgroup/memory").join(&cluster.cgroup_root).join("not-corrals");
    std::fs::create_dir_all(&foreign).unwrap();
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let offer = fw
        .launch_one(
            "escapee",
            "setsid sh -c 'echo $$ > daemon.pid; exec sleep 600' </dev/null >/dev/null 2>&1 & sleep 600",
            "cpus:0.1;mem:32",
        )
        .await;
    fw.wait_update("escapee", TaskState::TaskRunning).await;
    let text = wait_file(&cluster, &offer.agent_id, "escapee", "daemon.pid", "\n").await;
    let daemon: i32 = text.trim().parse().unwrap();
    assert!(alive(daemon));
    let memory = cluster.task_cgroup_dir(&offer.agent_id, "escapee", "memory").await;
    assert!(procs(&memory).contains(&daemon), "the daemon left its process group but not its cgroup");
    fw.driver.kill("escapee", &offer.agent_id, Some(0.5)).await.unwrap();
    assert_eq!(fw.wait_terminal("escapee").await.state, TaskState::TaskKilled as i32);
    assert!(!alive(daemon), "the detached daemon was killed with the task");
    assert!(!memory.exists(), "the task's cgroup was removed");
    assert!(foreign.exists(), "a cgroup the agent did not create is never removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_shares_split_a_contended_core_about_one_to_three() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let offer = fw.offers().await.remove(0);
    let mut pool = OfferPool::new(&offer).unwrap();
    // Both spin on cpu 0 only, so they compete for one core.
    let spin = "exec taskset -c 0 sh -c 'while :; do :; done'";
    let tasks: Vec<_> = [("light", "cpus:0.5;mem:32"), ("heavy", "cpus:1.5;mem:32")]
        .iter()
        .map(|(id, need)| {
            let res = pool.take(&Resources::parse(need).unwrap(), 0).unwrap();
            TaskBuilder::new(*id).shell(spin).resources(&res).build()
        })
        .collect();
    fw.driver.launch(&offer, tasks).await.unwrap();
    fw.wait_update("light", TaskState::TaskRunning).await;
    fw.wait_update("heavy", TaskState::TaskRunning).await;
    let light = cluster.task_cgroup_dir(&offer.agent_id, "light", "cpuacct").await;
    let heavy = cluster.task_cgroup_dir(&offer.agent_id, "heavy", "cpuacct").await;
    let read = |d: &Path| -> f64 { std::fs::read_to_string(d.join("cpuacct.usage")).unwrap().trim().parse().unwrap() };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (l0, h0) = (read(&light), read(&heavy));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (l1, h1) = (read(&light), read(&heavy));
    let ratio = (h1 - h0) / (l1 - l0);
    assert!((2.0..=4.5).contains(&ratio), "heavy/light cpu time = {ratio:.2}, expected about 3");
    assert_eq!(std::fs::read_to_string(cluster.task_cgroup_dir(&offer.agent_id, "light", "cpu").await.join("cpu.shares")).unwrap().trim(), "512");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_usage_appears_in_agent_and_master_state() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let offer = fw.launch_one("busy", "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; sleep 600", "cpus:0.5;mem:64").await;
    fw.wait_update("busy", TaskState::TaskRunning).await;
    let state = cluster
        .wait_state("usage in /state", |s| {
            Cluster::find_task(s, "busy").is_some_and(|t| {
                t["usage"]["mem_rss_bytes"].as_u64().unwrap_or(0) > 0 && t["usage"]["cpu_seconds"].as_f64().unwrap_or(0.0) > 0.05
            })
        })
        .await;
    assert!(Cluster::find_task(&state, "busy").unwrap()["usage"]["mem_rss_bytes"].as_u64().unwrap() < 64 * 1024 * 1024);
    let t = cluster.agent_task(&offer.agent_id, "busy").await;
    assert!(t["usage"]["cpu_seconds"].as_f64().unwrap() > 0.0, "{t}");
}

/// A cgroup2 mount to test on: the host's unified hierarchy, or a scratch one mounted for the test.
fn cgroup2_mount() -> (PathBuf, Option<tempfile::TempDir>) {
    use corral_agent::isolation::v2;
    let _ = v2::REQUIRED;
    for candidate in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let p = Path::new(candidate);
        if nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC) {
            return (p.to_path_buf(), None);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount").args(["-t", "cgroup2", "none"]).arg(dir.path()).status().unwrap().success();
    assert!(ok, "no cgroup2 mount on this machine and mounting a scratch one failed (needs root)");
    (dir.path().to_path_buf(), Some(dir))
}

#[test]
fn cgroup_v2_kills_everything_in_the_cgroup_and_removes_it_on_a_real_mount() {
    use corral_agent::isolation::{Isolator, Limits, v2::CgroupV2};
    use std::io::Write;
    let (mount, scratch) = cgroup2_mount();
    let root = format!("corral-test-v2-{}", std::process::id());
    // Removes the test's cgroups (killing what is left) even when an assertion fails.
    struct Cleanup(PathBuf, Option<tempfile::TempDir>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            corral_tests::remove_cgroup_tree(&self.0);
            if let Some(scratch) = &self.1 {
                let _ = std::process::Command::new("umount").arg(scratch.path()).status();
            }
        }
    }
    let _cleanup = Cleanup(mount.join(&root), scratch);
    // Controllers may all be bound to v1 on this host, so limits are not exercised here (the fake-cgroupfs unit
    // tests assert them); creating, joining, killing and removing are, for real.
    let iso = CgroupV2::new(&mount, &root, &[]).unwrap();
    let limits = Limits { cpus: 0.1, mem_mib: 32.0, cfs_quota: false, max_pids: None };
    let procs_file = iso.prepare("agent-x/fw+t", &limits).unwrap().remove(0);
    let dir = procs_file.parent().unwrap().to_path_buf();
    let mut child = std::process::Command::new("sh")
        .args(["-c", "read go; sleep 600 & setsid sleep 600 & echo forked; wait"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::fs::write(&procs_file, child.id().to_string()).unwrap();
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    let deadline = Instant::now() + WAIT;
    while procs(&dir).len() < 3 {
        assert!(Instant::now() < deadline, "children never appeared in {}", dir.display());
        std::thread::sleep(Duration::from_millis(10));
    }
    let inside = procs(&dir);
    iso.cleanup("agent-x/fw+t").unwrap();
    let _ = child.wait();
    assert!(inside.iter().all(|p| !alive(*p)), "cgroup.kill (or freeze+kill) reached every process");
    assert!(!dir.exists());
    iso.cleanup("agent-x/fw+t").unwrap();
}

#[test]
fn check_isolation_proves_this_node_isolates_tasks() {
    let root = format!("corral-test-check-{}", std::process::id());
    let out = std::process::Command::new(corral_tests::bin("corral-agent"))
        .args(["check-isolation", &format!("--cgroup-root={root}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let left: Vec<PathBuf> = corral_tests::cgroup_mounts().into_iter().map(|m| m.join(&root)).filter(|p| p.exists()).collect();
    corral_tests::remove_cgroups(&root);
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(text.lines().filter(|l| l.starts_with("ok")).count(), 4, "{text}");
    assert!(left.is_empty(), "the check left {left:?}");

    // A root the check did not create (an operator's, another agent's) is left in place.
    let shared = format!("{root}-shared");
    let memory_root = Path::new("/sys/fs/cgroup/memory").join(&shared);
    std::fs::create_dir_all(&memory_root).unwrap();
    let ok = std::process::Command::new(corral_tests::bin("corral-agent"))
        .args(["check-isolation", &format!("--cgroup-root={shared}")])
        .output()
        .unwrap()
        .status
        .success();
    let kept = memory_root.exists();
    corral_tests::remove_cgroups(&shared);
    assert!(ok && kept, "check passed: {ok}; existing root kept: {kept}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_cgroups_follow_the_documented_layout_even_when_two_frameworks_share_a_task_id() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut one = TestFramework::start(&cluster.master_addr(), TestFramework::info("one", "*", 60.0)).await;
    let offer = one.launch_one("same", "sleep 600", "cpus:0.1;mem:32").await;
    one.wait_update("same", TaskState::TaskRunning).await;
    // `one` gives back what it still holds, so `two` is offered the rest of the agent.
    one.driver.suppress(Vec::new()).await.unwrap();
    let held = one.live_offer(|_| true).await;
    one.driver.decline([&held.id], Some(3600.0)).await.unwrap();
    let mut two = TestFramework::start(&cluster.master_addr(), TestFramework::info("two", "*", 60.0)).await;
    two.launch_one("same", "sleep 600", "cpus:0.1;mem:32").await;
    two.wait_update("same", TaskState::TaskRunning).await;
    let agent = offer.agent_id.clone();
    let documented = PathBuf::from("/sys/fs/cgroup/memory").join(&cluster.cgroup_root).join(&agent).join("same");
    let second = PathBuf::from(format!("{}+{}", documented.display(), two.framework_id));
    assert!(documented.is_dir(), "{} (<cgroup-root>/<agent-id>/<task-id>)", documented.display());
    assert!(second.is_dir(), "{}", second.display());
    let (a, b) = (procs(&documented), procs(&second));
    assert!(!a.is_empty() && !b.is_empty() && a.iter().all(|p| !b.contains(p)), "each task in its own cgroup: {a:?} {b:?}");
    one.driver.kill("same", &agent, Some(0.0)).await.unwrap();
    one.wait_terminal("same").await;
    assert!(!documented.exists() && second.is_dir(), "killing one framework's task leaves the other's alone");
}
