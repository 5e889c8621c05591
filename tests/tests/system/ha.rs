//! Replicated masters: leader election in a real etcd, failover under load, fencing of a deposed leader, etcd
//! restarts and clean resignation.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use corral_master::registry::etcd::{EtcdRegistry, Fence};
use corral_master::registry::{Change, FrameworkRecord, Registry, RegistryError};
use corral_proto::v1::{self, scheduler_client::SchedulerClient};
use corral_sdk::{Resources, TaskBuilder, TaskState};
use corral_tests::ha::{HaCluster, registered_agents};
use corral_tests::{ClusterSpec, FrameworkEvent, TestFramework, WAIT};
use nix::sys::signal::Signal;
use serde_json::Value;

const TTL: Duration = Duration::from_secs(2);

fn spec(agents: usize) -> ClusterSpec {
    ClusterSpec { agents, ..ClusterSpec::default() }
}

async fn raw_subscribe(
    addr: &str,
    name: &str,
) -> Result<tonic::Streaming<v1::Event>, tonic::Status> {
    let mut client = SchedulerClient::connect(format!("http://{addr}")).await.expect("connect");
    let info = v1::FrameworkInfo { name: name.into(), failover_timeout_seconds: 60.0, ..Default::default() };
    client.subscribe(v1::SubscribeRequest { framework_info: Some(info) }).await.map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_masters_elect_one_leader_and_followers_point_to_it() {
    let cluster = HaCluster::start(3, TTL, spec(2)).await;
    let leader = cluster.wait_agreed_leader().await;
    let leader_addr = cluster.addr(leader);
    for i in 0..3 {
        let state = cluster.state_of(i).await.unwrap();
        assert_eq!(state["leader"], leader_addr.as_str(), "master {i}: {state:#}");
        assert_eq!(state["is_leader"], i == leader, "master {i}");
        assert_eq!(state["address"], cluster.addr(i).as_str());
        let (code, _, health) = cluster.get(i, "/health").await.unwrap();
        assert_eq!((code, &health["status"], &health["is_leader"]), (200, &Value::from("ok"), &Value::from(i == leader)));
    }
    // Agents given the list and given etcd:// both registered with the leader.
    assert_eq!(registered_agents(&cluster.state_of(leader).await.unwrap()), 2);

    let follower = (leader + 1) % 3;
    // REST on a follower: other endpoints are redirected to the leader with 307 (method and body kept).
    let (code, headers, _) = cluster.get(follower, "/api/v1/anything?x=1").await.unwrap();
    assert_eq!(code, 307);
    assert_eq!(headers["location"], format!("http://{leader_addr}/api/v1/anything?x=1").as_str());
    // gRPC on a follower: UNAVAILABLE with the leader in `corral-leader`.
    let refused = raw_subscribe(&cluster.addr(follower), "direct").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    let hint = corral_discovery::leader_hint(&refused).expect("a leader hint");
    assert_eq!(hint.addr, leader_addr);
    assert!(hint.term > 0, "the hint carries the leader's term: {hint:?}");
    assert!(refused.message().contains(&leader_addr), "{}", refused.message());

    // The SDK, given only a follower, or only etcd, ends up subscribed with the leader, and can launch.
    let mut via_follower = TestFramework::start(&cluster.addr(follower), TestFramework::info("f", "*", 60.0)).await;
    assert_eq!(via_follower.master, leader_addr);
    let mut via_etcd = TestFramework::start(&cluster.etcd.url(), TestFramework::info("e", "*", 60.0)).await;
    assert_eq!(via_etcd.master, leader_addr);
    via_follower.launch_one("t1", "sleep 600", "cpus:0.1;mem:16").await;
    via_follower.wait_update("t1", TaskState::TaskRunning).await;
    via_etcd.launch_one("t2", "sleep 600", "cpus:0.1;mem:16").await;
    via_etcd.wait_update("t2", TaskState::TaskRunning).await;

    // The CLI finds the leader from a follower address and from etcd.
    for master in [cluster.addr(follower), cluster.etcd.url()] {
        let out = tokio::process::Command::new(corral_tests::bin("corral"))
            .args(["task", "list", "--json"])
            .env("CORRAL_MASTER", &master)
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let tasks: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(tasks.as_array().map(Vec::len), Some(2), "via {master}: {tasks:#}");
    }
}

/// The agents' view of every task: (framework, task) → (state, pending updates).
async fn agent_tasks(leader_state: &Value) -> BTreeMap<(String, String), (String, u64)> {
    let mut out = BTreeMap::new();
    for agent in leader_state["agents"].as_array().unwrap() {
        let url = format!("http://{}:{}/state", agent["hostname"].as_str().unwrap(), agent["port"]);
        let state: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        for t in state["tasks"].as_array().unwrap() {
            let key = (t["framework_id"].as_str().unwrap().to_string(), t["id"].as_str().unwrap().to_string());
            let value = (t["state"].as_str().unwrap().to_string(), t["pending_updates"].as_u64().unwrap_or(0));
            assert!(out.insert(key.clone(), value).is_none(), "task {key:?} runs twice");
        }
    }
    out
}

/// Declines offers the test does not use; they come back a second later.
async fn decline(fw: &TestFramework, offers: &[v1::Offer]) {
    let _ = fw.driver.decline(offers.iter().map(|o| &o.id), Some(1.0)).await;
}

/// Waits for a status of `task_id`, asking the master to reconcile it every second until one comes.
async fn reconcile_until_known(fw: &mut TestFramework, task_id: &str, agent_id: &str) -> v1::TaskStatus {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let _ = fw.driver.reconcile(vec![(task_id.to_string(), agent_id.to_string())]).await;
        let until = Instant::now() + Duration::from_secs(1);
        while let Some(event) = fw.next(until.saturating_duration_since(Instant::now())).await {
            match event {
                FrameworkEvent::Update(s) if s.task_id == task_id => return s,
                FrameworkEvent::Offers(offers) => decline(fw, &offers).await,
                _ => {}
            }
        }
    }
    panic!("no status for {task_id} within {WAIT:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_the_leader_ten_times_while_a_framework_launches() {
    let mut cluster = HaCluster::start(3, TTL, spec(2)).await;
    let mut fw = TestFramework::start(&cluster.master_list(), TestFramework::info("steady", "*", 300.0)).await;
    let need = Resources::parse("cpus:0.05;mem:8").unwrap();
    let mut running: BTreeSet<String> = BTreeSet::new();
    let mut seen_running: BTreeSet<String> = BTreeSet::new();
    let mut failovers = Vec::new();
    let mut lost = 0;
    for round in 0..10 {
        // One task launched and running before the kill ...
        let a = format!("r{round}-a");
        let offer = fw.live_offer(|o| Resources::from_proto(&o.resources).unwrap().contains(&need)).await;
        let task = TaskBuilder::new(&a).shell("sleep 600").resources(&need).build();
        fw.driver.launch_with(&offer, vec![task], Some(0.0)).await.unwrap();
        fw.wait_update(&a, TaskState::TaskRunning).await;
        running.insert(a);
        // ... and one launched as the leader dies.
        let b = format!("r{round}-b");
        let offer = fw.live_offer(|o| Resources::from_proto(&o.resources).unwrap().contains(&need)).await;
        let agent_id = offer.agent_id.clone();
        let task = TaskBuilder::new(&b).shell("sleep 600").resources(&need).build();
        let (old, _) = cluster.wait_leader(None).await;
        let driver = fw.driver.clone();
        let launch = tokio::spawn(async move { driver.launch_with(&offer, vec![task], Some(0.0)).await });
        // Half the rounds kill at once (the ACCEPT may not even arrive), half once the master has answered it.
        if round % 2 == 1 {
            let _ = launch.await;
        }
        let killed_at = Instant::now();
        cluster.kill_master(old);
        let (new, to_leader) = cluster.wait_leader(Some(old)).await;
        fw.wait_for("re-subscription", |e| matches!(e, FrameworkEvent::Registered { .. }).then_some(())).await;
        let resubscribed = killed_at.elapsed();
        cluster.wait_leader_state("both agents back", |s| registered_agents(s) == 2).await;
        let all_back = killed_at.elapsed();
        // The in-flight task either reached its agent (and runs) or never did (and the master says so); it is
        // never started twice, and never killed.
        let s = reconcile_until_known(&mut fw, &b, &agent_id).await;
        match TaskState::try_from(s.state).unwrap() {
            TaskState::TaskRunning | TaskState::TaskStarting | TaskState::TaskStaging => {
                running.insert(b);
            }
            TaskState::TaskLost => lost += 1,
            other => panic!("in-flight task {b} became {other:?}: {s:?}"),
        }
        eprintln!(
            "failover {round}: master {old} killed, master {new} leads after {:.2}s; framework re-subscribed after \
             {:.2}s; both agents re-registered after {:.2}s",
            to_leader.as_secs_f64(),
            resubscribed.as_secs_f64(),
            all_back.as_secs_f64()
        );
        failovers.push(to_leader);
        cluster.start_master(old);
        // Every task that ran is still RUNNING in the new leader's view.
        let state = cluster
            .wait_leader_state("every task RUNNING", |s| {
                running.iter().all(|t| {
                    corral_tests::Cluster::find_task(s, t).is_some_and(|x| x["state"] == "TASK_RUNNING")
                })
            })
            .await;
        let on_agents = agent_tasks(&state).await;
        assert_eq!(on_agents.keys().map(|(_, t)| t.clone()).collect::<BTreeSet<_>>(), running, "round {round}");
        assert!(on_agents.values().all(|(state, _)| state == "TASK_RUNNING"), "{on_agents:?}");
        // Drain updates seen so far: no task was ever reported killed, failed or lost while running.
        let until = Instant::now() + Duration::from_millis(500);
        while let Some(e) = fw.next(until.saturating_duration_since(Instant::now())).await {
            if let FrameworkEvent::Offers(offers) = &e {
                decline(&fw, offers).await;
            }
            if let FrameworkEvent::Update(s) = e {
                let state = TaskState::try_from(s.state).unwrap();
                if state == TaskState::TaskRunning {
                    seen_running.insert(s.task_id.clone());
                }
                assert!(
                    !(running.contains(&s.task_id) && corral_sdk::is_terminal(&s)),
                    "running task {} reported {state:?}: {s:?}",
                    s.task_id
                );
            }
        }
    }
    // Every update the agents sent was acknowledged, so it reached the framework at least once.
    let deadline = Instant::now() + WAIT;
    loop {
        let (leader, _) = cluster.wait_leader(None).await;
        let state = cluster.state_of(leader).await.unwrap();
        let pending: u64 = agent_tasks(&state).await.values().map(|(_, p)| p).sum();
        if pending == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{pending} status updates never acknowledged");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    failovers.sort();
    eprintln!("launches in flight at the kill: {} reached their agent and run, {lost} never did (TASK_LOST)", 10 - lost);
    eprintln!(
        "SIGKILL failover with a {}s lease over {} runs: median {:.2}s, max {:.2}s",
        TTL.as_secs(),
        failovers.len(),
        failovers[failovers.len() / 2].as_secs_f64(),
        failovers.last().unwrap().as_secs_f64()
    );
    assert!(running.len() >= 10, "{running:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_stops_offering_and_cannot_write() {
    let cluster = HaCluster::start(3, TTL, spec(1)).await;
    let (old, _) = cluster.wait_leader(None).await;
    let old_addr = cluster.addr(old);
    // Framework A talks to the leader directly and never looks elsewhere; it holds every offer.
    let mut a = raw_subscribe(&old_addr, "a").await.unwrap();
    let mut offered = Vec::new();
    while offered.is_empty() {
        match tokio::time::timeout(WAIT, a.message()).await.expect("offers for A").unwrap().unwrap().event {
            Some(v1::event::Event::Offers(o)) => offered = o.offers,
            _ => continue,
        }
    }
    cluster.signal_master(old, Signal::SIGSTOP);
    let (new, _) = cluster.wait_leader(Some(old)).await;
    // B, through the master list, gets the same agent's resources from the new leader.
    let mut b = TestFramework::start(&cluster.master_list(), TestFramework::info("b", "*", 60.0)).await;
    assert_eq!(b.master, cluster.addr(new));
    let b_offer = b.live_offer(|o| o.agent_id == offered[0].agent_id).await;
    assert!(!b_offer.id.is_empty());
    tokio::time::sleep(TTL).await;
    cluster.signal_master(old, Signal::SIGCONT);
    // A's stream ends with UNAVAILABLE, and no offer came from the deposed master after it woke.
    let ended = loop {
        match tokio::time::timeout(WAIT, a.message()).await.expect("A's stream ends") {
            Ok(Some(v1::Event { event: Some(v1::event::Event::Offers(o)) })) => {
                panic!("deposed master made an offer after waking: {o:?}")
            }
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended:?}");
    // It knows it follows now, names the new leader, and refuses anything that would write.
    let deadline = Instant::now() + WAIT;
    loop {
        let state = cluster.state_of(old).await.unwrap();
        assert_eq!(state["is_leader"], false);
        if state["leader"] == cluster.addr(new).as_str() {
            break;
        }
        assert!(Instant::now() < deadline, "the deposed master never named the new leader: {state:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let refused = raw_subscribe(&old_addr, "c").await.unwrap_err();
    assert_eq!(corral_discovery::leader_hint(&refused).map(|l| l.addr), Some(cluster.addr(new)));
    let registry = cluster.etcd.keys("/corral/registry/frameworks/").await;
    assert_eq!(registry.len(), 2, "A and B only: {registry:?}");
    // B still works with the new leader.
    let task = TaskBuilder::new("b1").shell("sleep 600").resources(&Resources::parse("cpus:0.1;mem:16").unwrap()).build();
    b.driver.launch_with(&b_offer, vec![task], Some(0.0)).await.unwrap();
    b.wait_update("b1", TaskState::TaskRunning).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_writes_are_fenced_on_the_leader_key() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = corral_tests::ha::Etcd::start(dir.path()).await;
    let mut client = etcd.client().await;
    let lease = client.lease_grant(30, None).await.unwrap().id();
    let won = client.campaign("/t/leader", "me:1", lease).await.unwrap();
    let key = won.leader().unwrap();
    let fence = Fence { key: key.key().to_vec(), rev: key.rev() };
    let mut registry = EtcdRegistry::new(client.clone(), "/t/registry/".into(), fence);
    let framework = |id: &str| FrameworkRecord {
        id: id.into(),
        name: "n".into(),
        roles: vec!["web".into()],
        failover_timeout_seconds: 5.0,
        user: String::new(),
        hostname: String::new(),
        labels: Default::default(),
        registered_time: 1.0,
    };
    registry.apply(vec![Change::PutFramework(framework("f1")), Change::SetWeight("web".into(), 2.5)]).await.unwrap();
    registry.apply(vec![Change::PutFramework(framework("f2")), Change::RemoveFramework("f1".into())]).await.unwrap();
    let stored = registry.load().await.unwrap();
    assert_eq!(stored.frameworks.keys().collect::<Vec<_>>(), vec!["f2"]);
    assert_eq!(stored.frameworks["f2"], framework("f2"));
    assert_eq!(stored.weights["web"], 2.5);
    // The lease ends (as when a leader freezes past its TTL): the key is gone, and so is the right to write.
    client.lease_revoke(lease).await.unwrap();
    let err = registry.apply(vec![Change::RemoveFramework("f2".into())]).await.unwrap_err();
    assert!(matches!(err, RegistryError::Fenced), "{err}");
    assert!(registry.load().await.unwrap().frameworks.contains_key("f2"), "the refused write changed nothing");
    // A corrupt record is an error naming its key, not an empty registry.
    client.put("/t/registry/agents/a1", "{oops", None).await.unwrap();
    let err = registry.load().await.unwrap_err();
    assert!(err.to_string().contains("/t/registry/agents/a1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_resumes_after_etcd_restarts() {
    let mut cluster = HaCluster::start(3, TTL, spec(1)).await;
    let mut fw = TestFramework::start(&cluster.master_list(), TestFramework::info("patient", "*", 300.0)).await;
    fw.launch_one("before", "sleep 600", "cpus:0.1;mem:16").await;
    fw.wait_update("before", TaskState::TaskRunning).await;
    let keys_before = cluster.etcd.keys("/corral/registry/").await;
    assert_eq!(keys_before.len(), 2, "{keys_before:?}");

    cluster.etcd.stop();
    // Without etcd no master may lead: the leader steps down once its lease can no longer be renewed.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut leading = 0;
        for i in 0..3 {
            leading += usize::from(cluster.state_of(i).await.is_some_and(|s| s["is_leader"] == true));
        }
        if leading == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "a master kept leading without etcd");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.etcd.restart().await;
    cluster.wait_leader(None).await;
    cluster.wait_leader_state("the agent back", |s| registered_agents(s) == 1).await;
    fw.wait_for("re-subscription", |e| matches!(e, FrameworkEvent::Registered { .. }).then_some(())).await;
    assert_eq!(cluster.etcd.keys("/corral/registry/").await, keys_before, "registry data survived");
    let state = cluster
        .wait_leader_state("the task RUNNING", |s| {
            corral_tests::Cluster::find_task(s, "before").is_some_and(|t| t["state"] == "TASK_RUNNING")
        })
        .await;
    let framework = &state["frameworks"].as_array().unwrap()[0];
    assert_eq!(framework["id"], fw.framework_id.as_str());
    fw.launch_one("after", "sleep 600", "cpus:0.1;mem:16").await;
    fw.wait_update("after", TaskState::TaskRunning).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_resigns_so_a_follower_takes_over_at_once() {
    // A long lease: a takeover well inside it can only come from resignation.
    let ttl = Duration::from_secs(20);
    let mut cluster = HaCluster::start(3, ttl, spec(1)).await;
    let mut fw = TestFramework::start(&cluster.master_list(), TestFramework::info("calm", "*", 300.0)).await;
    fw.launch_one("t", "sleep 600", "cpus:0.1;mem:16").await;
    fw.wait_update("t", TaskState::TaskRunning).await;
    let (old, _) = cluster.wait_leader(None).await;
    cluster.signal_master(old, Signal::SIGTERM);
    let (_, took) = cluster.wait_leader(Some(old)).await;
    eprintln!("clean resign: a follower leads after {:.3}s (lease TTL {}s)", took.as_secs_f64(), ttl.as_secs());
    assert!(took < ttl / 2, "takeover took {took:?}: the leader did not resign");
    let status = cluster.masters[old].as_mut().unwrap().wait_timeout(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "the old leader exits cleanly: {status:?}");
    cluster.masters[old] = None;
    fw.wait_for("re-subscription", |e| matches!(e, FrameworkEvent::Registered { .. }).then_some(())).await;
    cluster
        .wait_leader_state("agent and task back", |s| {
            registered_agents(s) == 1
                && corral_tests::Cluster::find_task(s, "t").is_some_and(|t| t["state"] == "TASK_RUNNING")
        })
        .await;
}
