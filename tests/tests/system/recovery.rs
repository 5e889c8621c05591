//! Agent restart recovery: tasks outlive their agent, which re-attaches to them when it comes back.

use std::time::Duration;

use corral_proto::v1::{StatusReason, TaskState};
use corral_sdk::{OfferPool, Resources, TaskBuilder};
use corral_tests::{Cluster, ClusterSpec, FrameworkEvent, TestFramework};
use nix::sys::signal::Signal;
use serde_json::Value;

fn pid_of(state: &Value, task: &str) -> i64 {
    state["tasks"].as_array().unwrap().iter().find(|t| t["id"] == task).unwrap()["pid"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_and_restarted_reattaches_to_its_tasks() {
    let mut cluster = Cluster::start(ClusterSpec { agents: 2, ..ClusterSpec::default() }).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let mut offers = fw.offers().await;
    while offers.len() < 2 {
        offers.extend(fw.offers().await);
    }
    let (victim_offer, bystander_offer) = (offers.remove(0), offers.remove(0));
    let need = Resources::parse("cpus:0.1;mem:32").unwrap();
    let mut pool = OfferPool::new(&victim_offer).unwrap();
    let tasks = [("a", "sleep 600"), ("b", "sleep 600"), ("quick", "sleep 2; echo done"), ("orphan", "sleep 600")]
        .iter()
        .map(|(id, cmd)| TaskBuilder::new(*id).shell(*cmd).resources(&pool.take(&need, 0).unwrap()).build())
        .collect();
    fw.driver.launch(&victim_offer, tasks).await.unwrap();
    let other = TaskBuilder::new("other").shell("sleep 600").resources(&need).build();
    fw.driver.launch(&bystander_offer, vec![other]).await.unwrap();
    for id in ["a", "b", "quick", "orphan", "other"] {
        fw.wait_update(id, TaskState::TaskRunning).await;
    }
    let victim = victim_offer.agent_id.clone();
    let (_, before) = cluster.agent_get(&victim, "/state").await;
    let (_, bystander_before) = cluster.agent_get(&bystander_offer.agent_id, "/state").await;
    let index = (0..2)
        .find(|i| Some(cluster.agent_dir(*i).canonicalize().unwrap().to_string_lossy().as_ref()) == before["work_dir"].as_str())
        .unwrap();

    cluster.agents[index].as_ref().unwrap().signal(Signal::SIGKILL);
    cluster.agents[index].as_mut().unwrap().wait_timeout(corral_tests::WAIT);
    // While the agent is gone: `quick` finishes by itself, and `orphan` loses its shim and process.
    let orphan_run = format!("{}/meta/tasks/{}/orphan", before["work_dir"].as_str().unwrap(), fw.framework_id);
    let orphan_shim: i32 = std::fs::read_to_string(format!("{orphan_run}/shim.pid")).unwrap().trim().parse().unwrap();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(orphan_shim), Signal::SIGKILL);
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_of(&before, "orphan") as i32), Signal::SIGKILL);
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.start_agent(index);
    cluster.wait_agents_registered(2).await;

    let done = fw.wait_terminal("quick").await;
    assert_eq!(done.state, TaskState::TaskFinished as i32, "{}", done.message);
    assert!(done.message.contains("status 0"), "{}", done.message);
    let gone = fw.wait_terminal("orphan").await;
    assert_eq!(gone.state, TaskState::TaskFailed as i32);
    assert_eq!(gone.reason, StatusReason::ReasonAgentRestarted as i32, "{}", gone.message);
    // No second FINISHED for `quick`, however the updates were resent.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut finished = 0;
    while let Some(e) = fw.next(Duration::from_millis(100)).await {
        if let FrameworkEvent::Update(s) = e
            && s.task_id == "quick"
            && s.state == TaskState::TaskFinished as i32
        {
            finished += 1;
        }
    }
    assert_eq!(finished, 0, "FINISHED of quick was reported again");

    let (_, after) = cluster.agent_get(&victim, "/state").await;
    for id in ["a", "b"] {
        assert_eq!(pid_of(&after, id), pid_of(&before, id), "{id} is the same process");
    }
    let (_, bystander_after) = cluster.agent_get(&bystander_offer.agent_id, "/state").await;
    assert_eq!(pid_of(&bystander_after, "other"), pid_of(&bystander_before, "other"), "the other agent's task is untouched");
    let state = cluster.state().await;
    for id in ["a", "b", "other"] {
        let t = Cluster::find_task(&state, id).unwrap();
        assert_eq!(t["state"], "TASK_RUNNING", "{id}");
        let states: Vec<&str> = t["statuses"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap()).collect();
        assert!(!states.iter().any(|s| *s == "TASK_LOST" || *s == "TASK_UNREACHABLE"), "{id}: {states:?}");
    }
    // The restarted agent controls its recovered tasks.
    fw.driver.kill("a", &victim, Some(0.0)).await.unwrap();
    assert_eq!(fw.wait_terminal("a").await.state, TaskState::TaskKilled as i32);
}
