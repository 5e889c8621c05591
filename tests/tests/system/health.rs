//! Health checks run by the agent: COMMAND, TCP and HTTP, against real task processes.

use corral_proto::v1::{self, StatusReason, TaskState, health_check::Type};
use corral_sdk::{OfferPool, Resources, TaskBuilder};
use corral_tests::{Cluster, ClusterSpec, FrameworkEvent, TestFramework};

/// Quick checks for tests: first check at once, every 0.2 s, two failures kill.
fn quick(kind: Type) -> v1::HealthCheck {
    v1::HealthCheck {
        r#type: kind as i32,
        delay_seconds: 0.01,
        interval_seconds: 0.2,
        timeout_seconds: 2.0,
        grace_period_seconds: 0.01,
        consecutive_failures: 2,
        ..Default::default()
    }
}

async fn launch(fw: &mut TestFramework, id: &str, command: &str, check: v1::HealthCheck, ports: usize) {
    let offer = fw.offers().await.remove(0);
    let mut pool = OfferPool::new(&offer).unwrap();
    let res = pool.take(&Resources::parse("cpus:0.2;mem:64").unwrap(), ports).unwrap();
    let task = TaskBuilder::new(id).shell(command).resources(&res).health_check(check).build();
    fw.driver.launch_with(&offer, vec![task], Some(0.0)).await.unwrap();
}

async fn wait_health(fw: &mut TestFramework, id: &str, healthy: bool) -> v1::TaskStatus {
    fw.wait_for(&format!("{id} healthy={healthy}"), |e| match e {
        FrameworkEvent::Update(s) if s.task_id == id && s.healthy == Some(healthy) && s.state == TaskState::TaskRunning as i32 => {
            Some(s.clone())
        }
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_check_reports_health_changes_and_kills_an_unhealthy_task() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let check = v1::HealthCheck { command: "test -f ok".into(), ..quick(Type::Command) };
    launch(&mut fw, "flaky", "touch ok; sleep 1.5; rm ok; sleep 600", check, 0).await;
    let s = wait_health(&mut fw, "flaky", true).await;
    assert_eq!(s.reason, StatusReason::ReasonTaskCheckStatusUpdated as i32);
    let state = cluster.wait_state("healthy in /state", |s| Cluster::find_task(s, "flaky").is_some_and(|t| t["healthy"] == true)).await;
    assert_eq!(Cluster::find_task(&state, "flaky").unwrap()["state"], "TASK_RUNNING");
    let s = wait_health(&mut fw, "flaky", false).await;
    assert!(s.message.contains("health check failed"), "{}", s.message);
    let end = fw.wait_terminal("flaky").await;
    assert_eq!(end.state, TaskState::TaskKilled as i32, "{}", end.message);
    assert_eq!(end.reason, StatusReason::ReasonTaskHealthCheckFailed as i32, "{}", end.message);
    assert_eq!(end.healthy, Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_http_checks_against_a_real_listening_task() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    let server = "exec python3 -m http.server \"$PORT0\" --bind 127.0.0.1";
    // The server needs a moment to listen: refusals within the grace period do not count.
    let starting = |kind: Type, path: &str| v1::HealthCheck { path: path.into(), grace_period_seconds: 3.0, ..quick(kind) };
    launch(&mut fw, "tcp", server, starting(Type::Tcp, ""), 1).await;
    launch(&mut fw, "http", server, starting(Type::Http, "/"), 1).await;
    launch(&mut fw, "http-404", server, starting(Type::Http, "/missing"), 1).await;
    wait_health(&mut fw, "tcp", true).await;
    wait_health(&mut fw, "http", true).await;
    // A 404 is unhealthy; the grace period is over at once, so the task is killed after two failures.
    let end = fw.wait_terminal("http-404").await;
    assert_eq!(end.state, TaskState::TaskKilled as i32, "{}", end.message);
    assert_eq!(end.reason, StatusReason::ReasonTaskHealthCheckFailed as i32);
    assert!(end.message.contains("404"), "{}", end.message);
    let state = cluster.state().await;
    for id in ["tcp", "http"] {
        let t = Cluster::find_task(&state, id).unwrap();
        assert_eq!((t["state"].as_str(), t["healthy"].as_bool()), (Some("TASK_RUNNING"), Some(true)), "{id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_health_checks_are_refused_at_launch() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("t", "*", 60.0)).await;
    launch(&mut fw, "no-cmd", "sleep 1", quick(Type::Command), 0).await;
    let s = fw.wait_update("no-cmd", TaskState::TaskError).await;
    assert!(s.message.contains("health_check.command"), "{}", s.message);
    launch(&mut fw, "no-port", "sleep 1", quick(Type::Tcp), 0).await;
    let s = fw.wait_update("no-port", TaskState::TaskError).await;
    assert!(s.message.contains("no ports"), "{}", s.message);
    // The CLI checks its flags before it connects.
    let (code, _, err) = cluster.cli(&["execute", "--name", "x", "--command", "true", "--health-check-cmd", "true", "--health-check-interval=-1"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("--health-check-interval") && err.contains("-1"), "{err}");
}
