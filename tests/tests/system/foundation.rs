//! The foundation: launching, killing, DRF, offers, failover, registry, bad input, CLI.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use corral_proto::v1::{self, StatusReason, TaskState};
use corral_sdk::{OfferPool, Resources, TaskBuilder};
use corral_tests::{Cluster, ClusterSpec, FrameworkEvent, TestFramework, WAIT};
use nix::sys::signal::Signal;

fn spec(master_args: &[&str]) -> ClusterSpec {
    ClusterSpec { master_args: master_args.iter().map(|s| s.to_string()).collect(), ..ClusterSpec::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_runs_and_finishes_with_its_environment_and_sandbox() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let offer = fw.offers().await.remove(0);
    let mut pool = OfferPool::new(&offer).unwrap();
    let res = pool.take(&Resources::parse("cpus:0.5;mem:64").unwrap(), 2).unwrap();
    let task = TaskBuilder::new("hello")
        .shell("echo \"id=$CORRAL_TASK_ID port0=$PORT0 ports=$PORTS pwd=$(pwd) sandbox=$CORRAL_SANDBOX\"; echo to-stderr >&2")
        .resources(&res)
        .build();
    fw.driver.launch(&offer, vec![task]).await.unwrap();
    fw.wait_update("hello", TaskState::TaskStarting).await;
    fw.wait_update("hello", TaskState::TaskRunning).await;
    let done = fw.wait_terminal("hello").await;
    assert_eq!(done.state, TaskState::TaskFinished as i32, "{done:?}");
    assert!(done.message.contains("status 0"), "{}", done.message);

    let stdout = cluster.sandbox_file(&offer.agent_id, "hello", "stdout").await;
    let port0 = res.ranges("ports")[0].0;
    assert!(stdout.contains("id=hello"), "{stdout}");
    assert!(stdout.contains(&format!("port0={port0} ports={port0},{}", port0 + 1)), "{stdout}");
    let sandbox = stdout.split("sandbox=").nth(1).unwrap().trim();
    assert!(stdout.contains(&format!("pwd={sandbox}")), "the task runs in its sandbox: {stdout}");
    assert!(sandbox.ends_with(&format!("sandboxes/{}/hello", fw.framework_id)), "{sandbox}");
    assert_eq!(cluster.sandbox_file(&offer.agent_id, "hello", "stderr").await, "to-stderr\n");

    let state = cluster.wait_state("task completed in /state", |s| {
        Cluster::find_task(s, "hello").is_some_and(|t| t["state"] == "TASK_FINISHED")
    })
    .await;
    let t = Cluster::find_task(&state, "hello").unwrap();
    let states: Vec<&str> = t["statuses"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
    assert_eq!(states, ["TASK_STAGING", "TASK_STARTING", "TASK_RUNNING", "TASK_FINISHED"]);
    // Resources are back in the pool once the task ended.
    cluster.wait_state("resources returned", |s| s["totals"]["used"]["cpus"] == 0.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_fails_with_its_exit_code() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    fw.launch_one("bad", "echo failing; exit 7", "cpus:0.1;mem:32").await;
    let s = fw.wait_terminal("bad").await;
    assert_eq!(s.state, TaskState::TaskFailed as i32);
    assert!(s.message.contains("exited with status 7"), "{}", s.message);
    assert_eq!(s.source, v1::StatusSource::SourceAgent as i32);
    assert!(!s.uuid.is_empty(), "agent updates carry a uuid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_sends_sigterm_first_then_sigkill_after_the_grace_period() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    // A task that handles SIGTERM gets it and can exit cleanly.
    let offer = fw
        .launch_one("polite", "trap 'echo got-sigterm; exit 0' TERM; echo ready; while true; do sleep 0.1; done", "cpus:0.1;mem:32")
        .await;
    fw.wait_update("polite", TaskState::TaskRunning).await;
    let deadline = Instant::now() + WAIT;
    while !cluster.sandbox_file(&offer.agent_id, "polite", "stdout").await.contains("ready") {
        assert!(Instant::now() < deadline, "task never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fw.driver.kill("polite", &offer.agent_id, None).await.unwrap();
    fw.wait_update("polite", TaskState::TaskKilling).await;
    let s = fw.wait_terminal("polite").await;
    assert_eq!(s.state, TaskState::TaskKilled as i32, "{s:?}");
    assert!(cluster.sandbox_file(&offer.agent_id, "polite", "stdout").await.contains("got-sigterm"));

    // A task that ignores SIGTERM is SIGKILLed once its grace period (1 s) is over.
    let offer = fw.launch_one("stubborn", "trap '' TERM; echo ready; while true; do sleep 0.1; done", "cpus:0.1;mem:32").await;
    fw.wait_update("stubborn", TaskState::TaskRunning).await;
    while !cluster.sandbox_file(&offer.agent_id, "stubborn", "stdout").await.contains("ready") {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let asked = Instant::now();
    fw.driver.kill("stubborn", &offer.agent_id, Some(1.0)).await.unwrap();
    let s = fw.wait_terminal("stubborn").await;
    assert_eq!(s.state, TaskState::TaskKilled as i32);
    assert!(asked.elapsed() >= Duration::from_millis(900), "SIGKILL came before the grace period ended");
    assert!(s.message.contains("SIGKILL"), "{}", s.message);
}

/// Keeps launching one `sleep` task per offer (returning the rest at once) and counts the launches.
fn fill(mut fw: TestFramework, prefix: &'static str, launched: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let need = Resources::parse("cpus:1;mem:512").unwrap();
        loop {
            for offer in fw.offers().await {
                let mut pool = OfferPool::new(&offer).unwrap();
                match pool.take(&need, 0) {
                    Some(res) => {
                        let n = launched.fetch_add(1, Ordering::SeqCst);
                        let task = TaskBuilder::new(format!("{prefix}-{n}")).shell("sleep 600").resources(&res).build();
                        fw.driver.launch_with(&offer, vec![task], Some(0.0)).await.unwrap();
                    }
                    None => fw.driver.decline([&offer.id], Some(600.0)).await.unwrap(),
                }
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_roles_with_weights_one_and_three_share_the_cluster_one_to_three() {
    let cluster = Cluster::start(ClusterSpec {
        agents: 2,
        agent_resources: "cpus:4;mem:2048;disk:1024".into(),
        master_args: vec!["--weights=light=1,heavy=3".into()],
        ..ClusterSpec::default()
    })
    .await;
    let light = TestFramework::start(&cluster.master_addr(), TestFramework::info("light", "light", 60.0)).await;
    let heavy = TestFramework::start(&cluster.master_addr(), TestFramework::info("heavy", "heavy", 60.0)).await;
    let (l, h) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let fillers = [fill(light, "l", l.clone()), fill(heavy, "h", h.clone())];
    let state = cluster
        .wait_state("8 running tasks", |s| {
            s["frameworks"].as_array().unwrap().iter().flat_map(|f| f["tasks"].as_array().unwrap())
                .filter(|t| t["state"] == "TASK_RUNNING").count() == 8
        })
        .await;
    for f in fillers {
        f.abort();
    }
    let (l, h) = (l.load(Ordering::SeqCst), h.load(Ordering::SeqCst));
    assert_eq!((l, h), (2, 6), "8 cpus split 1:3 by weight; state: {state:#}");
    let roles = state["roles"].as_array().unwrap();
    let weight = |name: &str| roles.iter().find(|r| r["name"] == name).unwrap()["weight"].as_f64().unwrap();
    assert_eq!((weight("light"), weight("heavy")), (1.0, 3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decline_with_refuse_seconds_is_honoured_and_revive_clears_it() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let offer = fw.offers().await.remove(0);
    let declined = Instant::now();
    fw.driver.decline([&offer.id], Some(3.0)).await.unwrap();
    let offer = fw.offers().await.remove(0);
    let gap = declined.elapsed();
    assert!(gap >= Duration::from_millis(2900), "re-offered after {gap:?}, before refuse_seconds (3 s) passed");

    fw.driver.decline([&offer.id], Some(3600.0)).await.unwrap();
    assert!(next_offer_within(&mut fw, Duration::from_secs(2)).await.is_none(), "a 1 h filter held");
    fw.driver.revive(Vec::new()).await.unwrap();
    assert!(next_offer_within(&mut fw, Duration::from_secs(10)).await.is_some(), "revive clears decline filters");
}

async fn next_offer_within(fw: &mut TestFramework, t: Duration) -> Option<v1::Offer> {
    let deadline = Instant::now() + t;
    while Instant::now() < deadline {
        if let Some(FrameworkEvent::Offers(mut o)) = fw.next(deadline.saturating_duration_since(Instant::now())).await {
            return Some(o.remove(0));
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_timeout_rescinds_unanswered_offers() {
    let cluster = Cluster::start(spec(&["--offer-timeout=1s"])).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let offer = fw.offers().await.remove(0);
    let rescinded = fw
        .wait_for("rescind", |e| match e {
            FrameworkEvent::Rescinded(id) => Some(id.clone()),
            _ => None,
        })
        .await;
    assert_eq!(rescinded, offer.id);
    // Launching on a rescinded offer drops the task, and the resources come back as a new offer.
    let task = TaskBuilder::new("late").shell("true").resources(&Resources::parse("cpus:0.1;mem:32").unwrap()).build();
    fw.driver.launch(&offer, vec![task]).await.unwrap();
    let s = fw.wait_terminal("late").await;
    assert_eq!(s.state, TaskState::TaskDropped as i32);
    assert_eq!(s.reason, StatusReason::ReasonInvalidOffers as i32);
    assert!(s.message.contains("no longer valid"), "{}", s.message);
    let again = fw.offers().await.remove(0);
    assert_ne!(again.id, offer.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framework_resubscribes_with_its_id_and_keeps_its_tasks() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("keeper", "*", 60.0)).await;
    fw.launch_one("long", "sleep 600", "cpus:0.1;mem:32").await;
    let running = fw.wait_update("long", TaskState::TaskRunning).await;
    let id = fw.framework_id.clone();
    fw.crash();
    cluster
        .wait_state("framework disconnected", |s| {
            s["frameworks"].as_array().unwrap().iter().any(|f| f["id"] == id && f["connected"] == false)
        })
        .await;
    let mut info = TestFramework::info("keeper", "*", 60.0);
    info.id = id.clone();
    let mut again = TestFramework::start(&cluster.master_addr(), info).await;
    assert_eq!(again.framework_id, id);
    // The SDK reconciles on subscription: the task is reported RUNNING, with reason RECONCILIATION. (If the crashed
    // subscription had not acknowledged RUNNING yet, the master first re-sends that update itself.)
    again
        .wait_for("RUNNING by reconciliation", |e| match e {
            FrameworkEvent::Update(s)
                if s.task_id == "long"
                    && s.state == TaskState::TaskRunning as i32
                    && s.reason == StatusReason::ReasonReconciliation as i32 =>
            {
                Some(())
            }
            _ => None,
        })
        .await;
    let state = cluster.state().await;
    let t = Cluster::find_task(&state, "long").unwrap();
    assert_eq!(t["state"], "TASK_RUNNING");
    assert!(running.message.contains("pid"), "{}", running.message);
    // Kill still works through the new subscription.
    again.driver.kill("long", &running.agent_id, Some(0.0)).await.unwrap();
    assert_eq!(again.wait_terminal("long").await.state, TaskState::TaskKilled as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framework_gone_past_its_failover_timeout_has_its_tasks_killed() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("brief", "*", 1.0)).await;
    let offer = fw.launch_one("doomed", "echo $$ > pid; sleep 600", "cpus:0.1;mem:32").await;
    fw.wait_update("doomed", TaskState::TaskRunning).await;
    let id = fw.framework_id.clone();
    let pid: i32 = loop {
        let text = cluster.sandbox_file(&offer.agent_id, "doomed", "pid").await;
        if let Ok(p) = text.trim().parse() {
            break p;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    fw.crash();
    let state = cluster
        .wait_state("framework torn down", |s| {
            s["completed_frameworks"].as_array().unwrap().iter().any(|f| f["id"] == id)
        })
        .await;
    assert!(Cluster::find_task(&state, "doomed").is_some_and(|t| t["state"] == "TASK_KILLED"));
    let deadline = Instant::now() + WAIT;
    while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok() {
        assert!(Instant::now() < deadline, "task process {pid} survived its framework's teardown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A torn-down framework cannot come back under its old id.
    let mut info = TestFramework::info("brief", "*", 1.0);
    info.id = id;
    let err = corral_sdk::SchedulerDriver::new(corral_sdk::Masters::parse(&cluster.master_addr()).unwrap(), info)
        .run(NoOp)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("torn down"), "{err}");
}

struct NoOp;
#[corral_sdk::async_trait]
impl corral_sdk::Scheduler for NoOp {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_becomes_unreachable_and_comes_back_when_it_reregisters() {
    let mut cluster = Cluster::start(spec(&["--agent-ping-timeout=1s"])).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let offer = fw.launch_one("stranded", "sleep 600", "cpus:0.1;mem:32").await;
    fw.wait_update("stranded", TaskState::TaskRunning).await;
    cluster.agents[0].as_ref().unwrap().signal(Signal::SIGKILL);
    let s = fw.wait_update("stranded", TaskState::TaskUnreachable).await;
    assert_eq!(s.reason, StatusReason::ReasonAgentUnreachable as i32);
    let state = cluster.wait_state("agent unreachable", |s| s["agents"][0]["state"] == "UNREACHABLE").await;
    assert_eq!(state["totals"]["total"]["cpus"], 0.0, "an unreachable agent's resources leave the pool");

    cluster.start_agent(0);
    let state = cluster.wait_agents_registered(1).await;
    assert_eq!(state["agents"][0]["id"], offer.agent_id.as_str(), "the agent keeps its id across restarts");
    assert_eq!(state["totals"]["total"]["cpus"], 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_restart_with_the_file_registry_keeps_agents_frameworks_and_tasks() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("survivor", "*", 60.0)).await;
    let offer = fw.launch_one("steady", "sleep 600", "cpus:0.5;mem:64").await;
    fw.wait_update("steady", TaskState::TaskRunning).await;
    let (_, before) = cluster.agent_get(&offer.agent_id, "/state").await;
    let pid = before["tasks"][0]["pid"].clone();

    cluster.master.as_ref().unwrap().signal(Signal::SIGKILL);
    cluster.master.as_mut().unwrap().wait_timeout(WAIT);
    cluster.start_master().await;

    let id = fw.framework_id.clone();
    let state = cluster
        .wait_state("agent re-registered and framework re-subscribed", |s| {
            s["agents"][0]["state"] == "REGISTERED"
                && s["frameworks"].as_array().unwrap().iter().any(|f| f["id"] == id && f["connected"] == true)
        })
        .await;
    assert_eq!(state["agents"][0]["id"], offer.agent_id.as_str());
    let t = Cluster::find_task(&state, "steady").unwrap();
    assert_eq!(t["state"], "TASK_RUNNING");
    assert_eq!(state["totals"]["used"]["cpus"], 0.5, "the running task's resources stay accounted");
    let (_, after) = cluster.agent_get(&offer.agent_id, "/state").await;
    assert_eq!(after["tasks"][0]["pid"], pid, "the same process kept running");
    // The framework still controls its task.
    fw.wait_for("re-subscription", |e| matches!(e, FrameworkEvent::Registered { .. }).then_some(())).await;
    fw.driver.kill("steady", &offer.agent_id, Some(0.0)).await.unwrap();
    assert_eq!(fw.wait_terminal("steady").await.state, TaskState::TaskKilled as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_updates_are_retried_and_applied_once() {
    use corral_proto::v1::scheduler_client::SchedulerClient;
    use tokio_stream::StreamExt;
    let cluster = Cluster::start(ClusterSpec::default()).await;
    // A raw framework that acknowledges nothing until told to.
    let mut client = SchedulerClient::connect(cluster.master_url()).await.unwrap();
    let info = TestFramework::info("raw", "*", 60.0);
    let mut events = client.subscribe(v1::SubscribeRequest { framework_info: Some(info) }).await.unwrap().into_inner();
    let mut header = None;
    let mut updates: Vec<v1::TaskStatus> = Vec::new();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let Ok(Some(Ok(ev))) = tokio::time::timeout(WAIT, events.next()).await else { break };
        match ev.event {
            Some(v1::event::Event::Subscribed(s)) => {
                header = Some(v1::CallHeader { framework_id: s.framework_id, stream_id: s.stream_id });
            }
            Some(v1::event::Event::Offers(o)) if updates.is_empty() => {
                let offer = &o.offers[0];
                let task = TaskBuilder::new("once").shell("sleep 600").resources(&Resources::parse("cpus:0.1;mem:32").unwrap()).build();
                let op = v1::Operation { operation: Some(v1::operation::Operation::Launch(v1::operation::Launch { task_infos: vec![task] })) };
                client
                    .accept(v1::AcceptRequest { header: header.clone(), offer_ids: vec![offer.id.clone()], operations: vec![op], filters: None })
                    .await
                    .unwrap();
            }
            Some(v1::event::Event::Update(u)) => {
                updates.push(u.status.unwrap());
                // STARTING is never acknowledged: the agent must keep resending it (every 0.5 s, doubling).
                if updates.len() >= 3 {
                    break;
                }
            }
            _ => {}
        }
    }
    assert!(updates.len() >= 3, "updates seen: {updates:?}");
    assert!(updates.iter().all(|u| u.state == TaskState::TaskStarting as i32), "only the head is in flight: {updates:?}");
    assert!(updates.windows(2).all(|w| w[0].uuid == w[1].uuid), "retries carry the same uuid");
    let state = cluster.state().await;
    let statuses = Cluster::find_task(&state, "once").unwrap()["statuses"].as_array().unwrap().len();
    assert_eq!(statuses, 2, "STAGING + STARTING once, however often it was resent");
    // Acknowledge in a batch beside a bad entry: the bad one is named, the good one applied, so RUNNING follows.
    let header = header.unwrap();
    let ack = |task_id: &str| v1::acknowledge_batch_request::Update {
        agent_id: updates[0].agent_id.clone(),
        task_id: task_id.into(),
        uuid: updates[0].uuid.clone(),
    };
    let err = client
        .acknowledge_batch(v1::AcknowledgeBatchRequest { header: Some(header.clone()), updates: vec![ack("once"), ack("../x")] })
        .await
        .unwrap_err();
    assert!(err.message().contains("1 of 2 refused") && err.message().contains("../x"), "{err}");
    let running = loop {
        let ev = tokio::time::timeout(WAIT, events.next()).await.unwrap().unwrap().unwrap();
        if let Some(v1::event::Event::Update(u)) = ev.event {
            let s = u.status.unwrap();
            if s.state == TaskState::TaskRunning as i32 {
                break s;
            }
        }
    };
    // The single-update call works too.
    let single = v1::AcknowledgeRequest {
        header: Some(header.clone()),
        agent_id: running.agent_id.clone(),
        task_id: running.task_id.clone(),
        uuid: running.uuid.clone(),
    };
    client.acknowledge(single).await.unwrap();
    // A call on another framework's behalf, or from a stale stream, is refused.
    let forged = v1::CallHeader { framework_id: header.framework_id.clone(), stream_id: "not-the-stream".into() };
    let err = client
        .kill(v1::KillRequest { header: Some(forged), task_id: "once".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    client.teardown(v1::TeardownRequest { header: Some(header) }).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_launches_get_clear_errors_and_touch_nothing_else() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let offer = fw.offers().await.remove(0);
    let small = Resources::parse("cpus:0.1;mem:32").unwrap();
    let task = |id: &str, res: &Resources| TaskBuilder::new(id).shell("sleep 600").resources(res).build();
    let mut negative = task("negative", &small);
    negative.resources[0].scalar = -1.0;
    let mut no_command = task("no-command", &small);
    no_command.command = None;
    fw.driver
        .launch_with(
            &offer,
            vec![
                task("dup", &small),
                task("dup", &small),
                task("huge", &Resources::parse("cpus:64;mem:32").unwrap()),
                negative,
                no_command,
                task("bad/id", &small),
                task("nothing", &Resources::new()),
            ],
            Some(0.0),
        )
        .await
        .unwrap();
    let expect = [
        ("dup", "already in use"),
        ("huge", "not within the offered resources"),
        ("negative", "negative"),
        ("no-command", "no command"),
        ("bad/id", "'/'"),
        ("nothing", "some cpus or mem"),
    ];
    for (id, text) in expect {
        let s = fw.wait_update(id, TaskState::TaskError).await;
        assert!(s.message.contains(text), "{id}: {}", s.message);
        assert_eq!(s.reason, StatusReason::ReasonTaskInvalid as i32);
    }
    fw.wait_update("dup", TaskState::TaskRunning).await;

    // Another framework cannot use this framework's offer, and its attempt leaves that offer alone.
    let mut other = TestFramework::start(&cluster.master_addr(), TestFramework::info("other", "*", 60.0)).await;
    let mine = fw.offers().await.remove(0);
    other.driver.launch(&mine, vec![task("thief", &small)]).await.unwrap();
    let s = other.wait_terminal("thief").await;
    assert_eq!(s.state, TaskState::TaskDropped as i32);
    assert!(s.message.contains("not this framework's"), "{}", s.message);
    fw.driver.launch(&mine, vec![task("mine", &small)]).await.unwrap();
    fw.wait_update("mine", TaskState::TaskRunning).await;

    // Killing or reconciling an unknown task answers TASK_LOST.
    fw.driver.kill("ghost", "", None).await.unwrap();
    let s = fw.wait_update("ghost", TaskState::TaskLost).await;
    assert!(s.message.contains("does not know"), "{}", s.message);
    fw.driver.reconcile(vec![("phantom".into(), String::new())]).await.unwrap();
    let s = fw.wait_update("phantom", TaskState::TaskLost).await;
    assert_eq!(s.reason, StatusReason::ReasonReconciliation as i32);
    // The master is still healthy and the good tasks still run.
    let state = cluster.state().await;
    assert_eq!(Cluster::find_task(&state, "dup").unwrap()["state"], "TASK_RUNNING");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_subscriptions_and_flags_are_refused_with_the_field_named() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let cases = [
        (v1::FrameworkInfo { name: String::new(), ..Default::default() }, "name"),
        (v1::FrameworkInfo { name: "x".into(), roles: vec!["bad role".into()], ..Default::default() }, "roles"),
        (v1::FrameworkInfo { name: "x".into(), failover_timeout_seconds: -1.0, ..Default::default() }, "failover_timeout"),
        (v1::FrameworkInfo { name: "x".into(), id: "no-such-framework".into(), ..Default::default() }, "unknown"),
    ];
    for (info, field) in cases {
        let err = corral_sdk::SchedulerDriver::new(corral_sdk::Masters::parse(&cluster.master_addr()).unwrap(), info).run(NoOp).await.unwrap_err();
        assert!(err.to_string().contains(field), "{field}: {err}");
    }
    // Bad flags stop the binaries at once with a message naming the flag and value.
    let dir = tempfile::tempdir().unwrap();
    let run = |bin: &str, args: &[&str]| {
        let out = std::process::Command::new(corral_tests::bin(bin)).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let work = format!("--work-dir={}", dir.path().display());
    let (ok, err) = run("corral-master", &["--port=0", &work, "--weights=a=x"]);
    assert!(!ok && err.contains("weights") && err.contains("\"x\""), "{err}");
    let (ok, err) = run("corral-master", &["--port=0", &work, "--registry=zk://nope"]);
    assert!(!ok && err.contains("zk://nope"), "{err}");
    let (ok, err) = run("corral-agent", &["--master=127.0.0.1:1", &work, "--resources=cpus:abc"]);
    assert!(!ok && err.contains("cpus:abc"), "{err}");
    let (ok, err) = run("corral-agent", &["--master=nowhere", &work]);
    assert!(!ok && err.contains("nowhere"), "{err}");
    let (ok, err) = run("corral-agent", &["--master=127.0.0.1:1", &work, "--attributes=rack"]);
    assert!(!ok && err.contains("rack"), "{err}");
    let (ok, err) = run("corral-agent", &["--master=127.0.0.1:1", &work, "--isolation=vm"]);
    assert!(!ok && err.contains("vm"), "{err}");
    let (ok, err) = run("corral-agent", &["--master=127.0.0.1:1", &work, "--cgroup-root=../escape"]);
    assert!(!ok && err.contains("--cgroup-root") && err.contains("../escape"), "{err}");
    // A hierarchy whose corral root cannot be created: the error names the path.
    let fake = dir.path().join("fake-cgroupfs");
    std::fs::create_dir_all(fake.join("memory")).unwrap();
    std::fs::create_dir_all(fake.join("cpu")).unwrap();
    std::fs::write(fake.join("memory/corral"), "a file where the cgroup should be").unwrap();
    let hierarchy = format!("--cgroups-hierarchy={}", fake.display());
    let (ok, err) = run("corral-agent", &["--master=127.0.0.1:1", &work, &hierarchy]);
    assert!(!ok && err.contains("not writable") && err.contains("memory/corral"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_files_api_refuses_paths_outside_the_sandboxes() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let state = cluster.state().await;
    let agent = state["agents"][0]["id"].as_str().unwrap().to_string();
    let missing = format!("{}/sandboxes/fw/task/stdout", cluster.agent_dir(0).canonicalize().unwrap().display());
    for (path, code) in [("/etc/passwd", 403), ("/nonexistent", 403), (missing.as_str(), 404)] {
        let (got, body) = cluster.agent_get(&agent, &format!("/files/read?path={path}")).await;
        assert_eq!(got, code, "{path}: {body}");
        assert!(body["error"].as_str().is_some(), "{body}");
    }
    let (got, _) = cluster.agent_get(&agent, "/files/read").await;
    assert_eq!(got, 400);
    let (got, _) = cluster.agent_get(&agent, "/files/read?path=/x&offset=abc").await;
    assert_eq!(got, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_execute_lists_and_logs() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let (code, out, err) = cluster.cli(&["execute", "--name", "greet", "--command", "echo hello-cli; echo warn >&2"]).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let states: Vec<&str> = out.lines().map(|l| l.split_whitespace().nth(1).unwrap_or("")).collect();
    assert_eq!(states, ["TASK_STAGING", "TASK_STARTING", "TASK_RUNNING", "TASK_FINISHED"], "{out}");

    let (code, out, err) = cluster.cli(&["execute", "--name", "fail", "--command", "exit 4", "--instances", "2"]).await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(err.contains("task fail-0 ended TASK_FAILED: Command exited with status 4"), "{err}");
    assert!(err.contains("task fail-1 ended TASK_FAILED"), "{err}");

    let (code, _, err) = cluster.cli(&["execute", "--name", "x", "--command", "true", "--resources", "cpus:1;mem:-5"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("mem:-5") && err.contains("negative"), "{err}");
    let (code, _, err) = cluster.cli(&["execute", "--name", "a b", "--command", "true"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("--name") && err.contains("a b"), "{err}");

    let (code, out, _) = cluster.cli(&["task", "log", "greet"]).await;
    assert_eq!((code, out.as_str()), (0, "hello-cli\n"));
    let (code, out, _) = cluster.cli(&["task", "log", "greet", "--stderr"]).await;
    assert_eq!((code, out.as_str()), (0, "warn\n"));

    let (code, out, _) = cluster.cli(&["--json", "task", "list", "--all"]).await;
    assert_eq!(code, 0);
    let tasks: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut ids: Vec<&str> = tasks.as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, ["fail-0", "fail-1", "greet"]);
    let (code, out, _) = cluster.cli(&["task", "list", "--all"]).await;
    assert_eq!(code, 0);
    assert!(out.starts_with("NAME") && out.contains("TASK_FINISHED") && out.contains("TASK_FAILED"), "{out}");
    let (code, out, _) = cluster.cli(&["--json", "node", "list"]).await;
    assert_eq!(code, 0);
    let nodes: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes[0]["state"], "REGISTERED");
    let (code, out, _) = cluster.cli(&["framework", "list", "--all"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("corral-execute (greet)") && out.contains("COMPLETED"), "{out}");

    // An unreachable master is named in the error.
    let out = tokio::process::Command::new(corral_tests::bin("corral"))
        .args(["--master", "127.0.0.1:1", "node", "list"])
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "exit code 3: no master reachable");
    assert!(err.contains("127.0.0.1:1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_task_log_follow_streams_new_lines() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    fw.launch_one("ticker", "for i in 1 2 3 4 5; do echo tick-$i; sleep 0.4; done", "cpus:0.1;mem:32").await;
    fw.wait_update("ticker", TaskState::TaskRunning).await;
    let (code, out, err) = cluster.cli(&["task", "log", "ticker", "--follow"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "tick-1\ntick-2\ntick-3\ntick-4\ntick-5\n", "follow returns when the task ends, with all output");
    let (code, out, _) = cluster.cli(&["task", "log", "ticker", "--lines", "2"]).await;
    assert_eq!((code, out.as_str()), (0, "tick-4\ntick-5\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_up_runs_a_cluster_and_cleans_up_everything_on_ctrl_c() {
    dev_up_and_ctrl_c(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_up_ha_runs_etcd_and_three_masters_and_cleans_up_on_ctrl_c() {
    dev_up_and_ctrl_c(true).await;
}

async fn dev_up_and_ctrl_c(ha: bool) {
    let dir = tempfile::tempdir().unwrap();
    // dev up derives ports: masters at +100 and +200, etcd at +300 and +301, agent i at agent-port + i.
    let port = corral_tests::free_port_with(&[100, 200, 300, 301]);
    let cgroup_root = format!("corral-test-dev-{}-{ha}", std::process::id());
    let _cleanup = corral_tests::CgroupGuard(cgroup_root.clone());
    let mut args = vec![
        "dev".into(),
        "up".into(),
        "--agents=2".into(),
        format!("--port={port}"),
        format!("--agent-port={}", corral_tests::free_port_with(&[1])),
        format!("--work-dir={}", dir.path().join("cluster").display()),
        format!("--cgroup-root={cgroup_root}"),
    ];
    if ha {
        args.extend(["--ha".into(), "--leader-lease-ttl=2s".into()]);
    }
    let mut dev = corral_tests::Process::spawn("dev", &corral_tests::bin("corral"), &args, dir.path());
    let masters: Vec<String> = if ha { vec![port, port + 100, port + 200] } else { vec![port] }
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let master = masters.join(",");
    let deadline = Instant::now() + WAIT;
    loop {
        if Instant::now() > deadline || dev.log_tail().contains("error") {
            let logs: Vec<String> = std::fs::read_dir(dir.path().join("cluster"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| format!("--- {:?}\n{}", e.file_name(), std::fs::read_to_string(e.path()).unwrap_or_default()))
                .collect();
            panic!("dev up never printed its banner: {}\n{}", dev.log_tail(), logs.join("\n"));
        }
        if dev.log_tail().contains("cluster is up") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Start a long task, then stop the cluster while it runs.
    let mut execute = tokio::process::Command::new(corral_tests::bin("corral"))
        .args(["--master", &master, "execute", "--name", "bg", "--command", "sleep 600", "--timeout", "20s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    loop {
        let mut running = false;
        for m in &masters {
            let state: serde_json::Value = http.get(format!("http://{m}/state")).send().await.unwrap().json().await.unwrap();
            running |= Cluster::find_task(&state, "bg").is_some_and(|t| t["state"] == "TASK_RUNNING");
        }
        if running {
            break;
        }
        assert!(Instant::now() < deadline, "task never ran");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dev.signal(Signal::SIGINT);
    let status = dev.wait_timeout(WAIT).expect("dev up stops on Ctrl-C");
    assert!(status.success(), "{}", dev.log_tail());
    let _ = execute.wait().await;
    // Nothing it started is left: no master, agent, shim or task mentions its directory.
    let needle = dir.path().to_string_lossy().to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter_map(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let env = std::fs::read(e.path().join("environ")).unwrap_or_default();
            let text = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (text.contains(&needle) || String::from_utf8_lossy(&env).contains(&needle)).then_some(text)
        })
        .collect();
    assert!(left.is_empty(), "processes left behind: {left:?}");
    // The drained agents removed their own cgroups; only the (empty) root they shared is left.
    for mount in corral_tests::cgroup_mounts() {
        let root = mount.join(&cgroup_root);
        let children: Vec<_> = std::fs::read_dir(&root).map(|d| d.flatten().filter(|e| e.path().is_dir()).collect()).unwrap_or_default();
        assert!(children.is_empty(), "cgroups left in {}: {children:?}", root.display());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_configured_partly_through_the_environment_runs_tasks() {
    // As under systemd with an EnvironmentFile plus flags in ExecStart: some settings come from CORRAL_* variables,
    // which the agent's children (shims, tasks) must not misread as configuration of their own.
    let mut cluster = Cluster::start(ClusterSpec { agents: 0, ..ClusterSpec::default() }).await;
    let env = [
        ("CORRAL_MASTER", cluster.master_addr()),
        ("CORRAL_RESOURCES", "cpus:1;mem:256;disk:64".to_string()),
        ("CORRAL_ATTRIBUTES", "rack:r9".to_string()),
    ];
    let args = [
        format!("--work-dir={}", cluster.dir.path().join("env-agent").display()),
        "--ip=127.0.0.1".to_string(),
        "--port=0".to_string(),
        format!("--cgroup-root={}", cluster.cgroup_root),
    ];
    let agent = corral_tests::Process::spawn_with_env("env-agent", &corral_tests::bin("corral-agent"), &args, &env, cluster.dir.path());
    cluster.agents.push(Some(agent));
    let state = cluster.wait_agents_registered(1).await;
    assert_eq!(state["agents"][0]["attributes"]["rack"], "r9");
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let offer = fw.launch_one("envtask", "echo master=${CORRAL_MASTER:-unset}", "cpus:0.1;mem:32").await;
    assert!(offer.attributes.iter().any(|a| a.name == "rack" && a.value == "r9"), "attributes travel with offers: {:?}", offer.attributes);
    let s = fw.wait_terminal("envtask").await;
    assert_eq!(s.state, TaskState::TaskFinished as i32, "{}", s.message);
    // The agent's own configuration does not leak into tasks.
    assert_eq!(cluster.sandbox_file(&offer.agent_id, "envtask", "stdout").await, "master=unset\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_and_agent_read_a_config_file_that_flags_override() {
    let dir = tempfile::tempdir().unwrap();
    let port = corral_tests::free_port();
    let master_toml = dir.path().join("master.toml");
    std::fs::write(&master_toml, format!("ip = \"127.0.0.1\"\nport = {port}\nwork_dir = \"{}\"\nweights = \"batch=2\"\n", dir.path().join("m").display())).unwrap();
    let _master = corral_tests::Process::spawn("master", &corral_tests::bin("corral-master"), &[format!("--config={}", master_toml.display())], dir.path());
    let agent_toml = dir.path().join("agent.toml");
    std::fs::write(&agent_toml, format!(
        "master = \"127.0.0.1:{port}\"\nip = \"127.0.0.1\"\nport = 0\nwork-dir = \"{}\"\nresources = \"cpus:3;mem:300\"\nisolation = \"none\"\n",
        dir.path().join("a").display()
    )).unwrap();
    // The flag wins over the file's resources.
    let _agent = corral_tests::Process::spawn(
        "agent",
        &corral_tests::bin("corral-agent"),
        &[format!("--config={}", agent_toml.display()), "--resources=cpus:1;mem:100".into()],
        dir.path(),
    );
    let http = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    let state: serde_json::Value = loop {
        if let Ok(r) = http.get(format!("http://127.0.0.1:{port}/state")).send().await
            && let Ok(s) = r.json::<serde_json::Value>().await
            && s["agents"].as_array().is_some_and(|a| !a.is_empty())
        {
            break s;
        }
        assert!(Instant::now() < deadline, "cluster from config files never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(state["agents"][0]["resources"]["cpus"], 1.0);
    assert_eq!(state["agents"][0]["resources"]["mem"], 100.0);
    // The file's weights reached the allocator.
    let _fw = TestFramework::start(&format!("127.0.0.1:{port}"), TestFramework::info("b", "batch", 60.0)).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let state: serde_json::Value = http.get(format!("http://127.0.0.1:{port}/state")).send().await.unwrap().json().await.unwrap();
        if let Some(role) = state["roles"].as_array().unwrap().iter().find(|r| r["name"] == "batch") {
            assert_eq!(role["weight"], 2.0);
            break;
        }
        assert!(Instant::now() < deadline, "role batch never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A misspelt setting is named.
    std::fs::write(&master_toml, "prot = 1\n").unwrap();
    let out = std::process::Command::new(corral_tests::bin("corral-master")).arg(format!("--config={}", master_toml.display())).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(err.contains("\"prot\"") && err.contains("unknown setting"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_execute_gives_each_instance_its_own_ports() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let (code, out, err) = cluster
        .cli(&["execute", "--name", "srv", "--instances", "2", "--ports", "2", "--command", "echo \"$PORT0 $PORT1 $PORTS\""])
        .await;
    assert_eq!(code, 0, "{out}\n{err}");
    let mut seen = Vec::new();
    for id in ["srv-0", "srv-1"] {
        let (_, log, _) = cluster.cli(&["task", "log", id]).await;
        let parts: Vec<&str> = log.split_whitespace().collect();
        assert_eq!(parts.len(), 3, "{log:?}");
        assert_eq!(parts[2], format!("{},{}", parts[0], parts[1]));
        let agent_ports = 31000..=31999;
        for p in &parts[..2] {
            assert!(agent_ports.contains(&p.parse::<u32>().unwrap()), "{p} is from the agent's range");
        }
        seen.extend(parts[..2].iter().map(|s| s.to_string()));
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 4, "no port handed out twice: {seen:?}");
}
