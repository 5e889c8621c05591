//! Dynamic reservations and persistent volumes through ACCEPT, on a real agent.

use std::time::{Duration, Instant};

use corral_proto::v1::TaskState;
use corral_sdk::{OfferPool, Resources, TaskBuilder, ops};
use corral_tests::{Cluster, ClusterSpec, FrameworkEvent, TestFramework};
use nix::sys::signal::Signal;

fn res(s: &str) -> Resources {
    Resources::parse(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_volume_outlives_tasks_and_agent_restarts_until_destroyed() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("db", "store", 60.0)).await;
    let offer = fw.offers().await.remove(0);
    let reserved = res("cpus(store):0.5;mem(store):64;disk(store):32");
    let volume = Resources::volume("store", "v1", "data", 32.0);
    let writer = TaskBuilder::new("writer")
        .shell("echo hello > data/file")
        .resources(&res("cpus(store):0.5;mem(store):64").plus(&volume))
        .build();
    fw.driver
        .accept([&offer.id], vec![ops::reserve(&reserved), ops::create(&volume), ops::launch(vec![writer])], Some(0.0))
        .await
        .unwrap();
    assert_eq!(fw.wait_terminal("writer").await.state, TaskState::TaskFinished as i32);
    let state = cluster.wait_state("volume recorded", |s| s["agents"][0]["resources_text"].as_str().unwrap().contains("[v1:data]")).await;
    assert_eq!(state["agents"][0]["reserved_resources"]["store"]["disk"], 32.0);
    let work = cluster.agent_dir(0).canonicalize().unwrap();
    assert_eq!(std::fs::read_to_string(work.join("volumes/store/v1/file")).unwrap(), "hello\n");

    // Another role never sees the reservation or the volume.
    let mut web = TestFramework::start(&cluster.master_addr(), TestFramework::info("web", "web", 60.0)).await;

    // The agent restarts: the volume and reservations survive in its checkpoint and the registry.
    cluster.agents[0].as_ref().unwrap().signal(Signal::SIGKILL);
    cluster.agents[0].as_mut().unwrap().wait_timeout(corral_tests::WAIT);
    cluster.start_agent(0);
    cluster.wait_agents_registered(1).await;

    let offer = fw.live_offer(|o| OfferPool::new(o).unwrap().take_volume("v1").is_some()).await;
    let mut pool = OfferPool::new(&offer).unwrap();
    let vol = pool.take_volume("v1").unwrap();
    let reader = TaskBuilder::new("reader").shell("cat data/file").resources(&pool.take(&res("cpus:0.1;mem:32"), 0).unwrap().plus(&vol)).build();
    fw.driver.launch_with(&offer, vec![reader], Some(0.0)).await.unwrap();
    assert_eq!(fw.wait_terminal("reader").await.state, TaskState::TaskFinished as i32);
    assert_eq!(cluster.sandbox_file(&offer.agent_id, "reader", "stdout").await, "hello\n");

    let deadline = Instant::now() + Duration::from_secs(2);
    while let Some(e) = web.next(deadline.saturating_duration_since(Instant::now())).await {
        if let FrameworkEvent::Offers(offers) = e {
            for o in offers {
                let r = Resources::from_proto(&o.resources).unwrap();
                assert!(r.reservation_roles().is_empty() && r.volumes().is_empty(), "role web was offered {r}");
                web.driver.decline([&o.id], Some(0.0)).await.unwrap();
            }
        }
    }

    // DESTROY deletes the data; UNRESERVE gives the resources back to everyone.
    let offer = fw.live_offer(|o| OfferPool::new(o).unwrap().take_volume("v1").is_some()).await;
    fw.driver.accept([&offer.id], vec![ops::destroy(&volume)], Some(0.0)).await.unwrap();
    // The reservation may come back split over several offers of the agent: accept them together.
    let offers = fw.live_offers(|r| r.contains(&reserved)).await;
    let ids: Vec<String> = offers.into_iter().map(|o| o.id).collect();
    fw.driver.accept(&ids, vec![ops::unreserve(&reserved)], Some(0.0)).await.unwrap();
    cluster.wait_state("reservation gone", |s| s["agents"][0]["reserved_resources"].as_object().is_some_and(|m| m.is_empty())).await;
    let deadline = Instant::now() + corral_tests::WAIT;
    while work.join("volumes/store/v1").exists() {
        assert!(Instant::now() < deadline, "the volume's directory was not deleted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_operations_refuse_the_accept_and_leave_the_offer_usable() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("db", "store", 60.0)).await;
    let offer = fw.offers().await.remove(0);
    let escape = corral_proto::v1::Resource {
        name: "disk".into(),
        r#type: corral_proto::v1::resource::Type::Scalar as i32,
        scalar: 8.0,
        role: "store".into(),
        volume: Some(corral_proto::v1::Volume { persistence_id: "v".into(), container_path: "../../etc".into() }),
        ..Default::default()
    };
    let create_escape = corral_proto::v1::Operation {
        operation: Some(corral_proto::v1::operation::Operation::Create(corral_proto::v1::operation::Create { volumes: vec![escape] })),
    };
    let cases = [
        (vec![ops::reserve(&res("disk(store):8")), create_escape], "container path"),
        (vec![ops::reserve(&res("cpus(other):1"))], "reserved for the offer's role"),
        (vec![ops::reserve(&res("cpus(store):99"))], "do not hold"),
        (vec![ops::create(&Resources::volume("store", "v", "data", 8.0))], "do not hold"),
        (vec![ops::destroy(&Resources::volume("store", "ghost", "data", 8.0))], "do not hold"),
        (vec![ops::unreserve(&res("cpus(store):1"))], "do not hold"),
    ];
    for (operations, why) in cases {
        let err = fw.driver.accept([&offer.id], operations, None).await.unwrap_err();
        assert!(err.to_string().contains(why), "{why}: {err}");
    }
    // The offer was never consumed.
    let task = TaskBuilder::new("ok").shell("true").resources(&res("cpus:0.1;mem:32")).build();
    fw.driver.launch(&offer, vec![task]).await.unwrap();
    assert_eq!(fw.wait_terminal("ok").await.state, TaskState::TaskFinished as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_execute_with_a_volume_keeps_data_between_runs() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let run = ["execute", "--name", "journal", "--role", "store", "--volume", "data:16", "--resources", "cpus:0.1;mem:32", "--command", "date >> data/log; wc -l < data/log"];
    let (code, out, err) = cluster.cli(&run).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (code, out, err) = cluster.cli(&run).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let (_, log, _) = cluster.cli(&["task", "log", "journal"]).await;
    assert_eq!(log.trim(), "2", "the second run saw the first run's line");
    let (code, _, err) = cluster.cli(&["execute", "--name", "x", "--command", "true", "--volume", "data:16"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("--role"), "{err}");
    let (code, _, err) = cluster.cli(&["execute", "--name", "x", "--role", "r", "--command", "true", "--volume", "../x:16"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("container path"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_that_missed_a_reservation_change_gets_it_again_on_reregistration() {
    let mut cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("db", "store", 60.0)).await;
    let offer = fw.offers().await.remove(0);
    let volume = Resources::volume("store", "kept", "data", 16.0);
    fw.driver
        .accept([&offer.id], vec![ops::reserve(&res("disk(store):16")), ops::create(&volume)], Some(0.0))
        .await
        .unwrap();
    let work = cluster.agent_dir(0).canonicalize().unwrap();
    let checkpoint = work.join("meta/resources");
    let deadline = Instant::now() + corral_tests::WAIT;
    while !std::fs::read_to_string(&checkpoint).unwrap_or_default().contains("[kept:data]") {
        assert!(Instant::now() < deadline, "the agent never checkpointed the volume");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent goes down and comes back as if the CREATE had never reached it.
    cluster.agents[0].as_ref().unwrap().signal(Signal::SIGKILL);
    cluster.agents[0].as_mut().unwrap().wait_timeout(corral_tests::WAIT);
    std::fs::remove_file(&checkpoint).unwrap();
    std::fs::remove_dir_all(work.join("volumes")).unwrap();
    cluster.start_agent(0);
    cluster.wait_agents_registered(1).await;
    let state = cluster.state().await;
    assert!(state["agents"][0]["resources_text"].as_str().unwrap().contains("[kept:data]"), "the master kept the volume");
    while !(std::fs::read_to_string(&checkpoint).unwrap_or_default().contains("[kept:data]") && work.join("volumes/store/kept").is_dir()) {
        assert!(Instant::now() < deadline, "the agent did not get the volume back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
