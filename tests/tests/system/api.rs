//! The operator REST API on the master: state views, filters, paging and bad input.

use corral_proto::v1::TaskState;
use corral_sdk::{OfferPool, Resources, TaskBuilder};
use corral_tests::{Cluster, ClusterSpec, TestFramework};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_views_list_agents_frameworks_roles_and_filtered_pages_of_tasks() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("api", "*", 60.0)).await;
    let offer = fw.offers().await.remove(0);
    let mut pool = OfferPool::new(&offer).unwrap();
    let small = Resources::parse("cpus:0.1;mem:16").unwrap();
    let task = |id: &str, cmd: &str, pool: &mut OfferPool| TaskBuilder::new(id).shell(cmd).resources(&pool.take(&small, 0).unwrap()).build();
    let tasks = vec![task("a1", "sleep 600", &mut pool), task("a2", "sleep 600", &mut pool), task("a3", "true", &mut pool)];
    fw.driver.launch(&offer, tasks).await.unwrap();
    fw.wait_update("a1", TaskState::TaskRunning).await;
    fw.wait_update("a2", TaskState::TaskRunning).await;
    fw.wait_update("a3", TaskState::TaskFinished).await;
    let fid = fw.framework_id.clone();
    let agent = offer.agent_id.clone();
    // The finished task moves to the completed list once its update is acknowledged.
    cluster.wait_state("a3 completed", |s| Cluster::find_task(s, "a3").is_some_and(|t| t["state"] == "TASK_FINISHED")).await;

    let (code, agents) = cluster.master_get("/state/agents").await;
    assert_eq!(code, 200);
    assert_eq!(agents["agents"].as_array().unwrap().len(), 1);
    assert_eq!(agents["agents"][0]["id"], agent.as_str());
    assert_eq!(agents["agents"][0]["used_resources"]["cpus"], 0.2, "two running tasks of 0.1 cpus");
    assert_eq!(agents["totals"]["used"]["cpus"], 0.2);

    let (code, frameworks) = cluster.master_get("/state/frameworks").await;
    assert_eq!(code, 200);
    let f = &frameworks["frameworks"][0];
    assert_eq!(f["id"], fid.as_str());
    assert_eq!(f["task_count"], 2);
    assert_eq!(f["completed_task_count"], 1);
    assert!(f.get("tasks").is_none(), "tasks are paged by /state/tasks, not inlined: {f}");

    let (code, roles) = cluster.master_get("/state/roles").await;
    assert_eq!(code, 200);
    let star = roles["roles"].as_array().unwrap().iter().find(|r| r["name"] == "*").expect("role *");
    assert_eq!(star["frameworks"], serde_json::json!([fid.as_str()]));
    assert_eq!(star["allocated"]["cpus"], 0.2);

    let ids = |v: &Value| v["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap().to_string()).collect::<Vec<_>>();
    let (code, all) = cluster.master_get("/state/tasks").await;
    assert_eq!(code, 200);
    assert_eq!((all["total"].as_u64(), ids(&all)), (Some(3), vec!["a1".to_string(), "a2".into(), "a3".into()]));
    let (_, running) = cluster.master_get("/state/tasks?state=running").await;
    assert_eq!((running["total"].as_u64(), ids(&running)), (Some(2), vec!["a1".to_string(), "a2".into()]));
    let (_, finished) = cluster.master_get("/state/tasks?state=TASK_FINISHED").await;
    assert_eq!(ids(&finished), vec!["a3".to_string()]);
    let (_, page) = cluster.master_get("/state/tasks?offset=1&limit=1").await;
    assert_eq!((page["total"].as_u64(), ids(&page)), (Some(3), vec!["a2".to_string()]));
    let (_, mine) = cluster.master_get(&format!("/state/tasks?framework={fid}&agent={agent}&limit=10")).await;
    assert_eq!(mine["total"], 3);
    let (_, none) = cluster.master_get("/state/tasks?framework=someone-else").await;
    assert_eq!((none["total"].as_u64(), ids(&none).len()), (Some(0), 0));

    // Bad input: 400 naming the parameter, and nothing else changes.
    for (query, field) in [
        ("state=bogus", "state"),
        ("state=", "state"),
        ("limit=0", "limit"),
        ("limit=100000", "limit"),
        ("offset=-1", "offset"),
        ("agent=../x", "agent"),
        ("frame=x", "frame"),
    ] {
        let (code, body) = cluster.master_get(&format!("/state/tasks?{query}")).await;
        assert_eq!(code, 400, "{query}: {body}");
        assert_eq!(body["field"], field, "{query}: {body}");
        assert!(body["error"].as_str().unwrap().starts_with(&format!("{field}: ")), "{query}: {body}");
    }
    let (_, after) = cluster.master_get("/state/tasks").await;
    assert_eq!(after["total"], 3);

    // A task's output through the master (read from its agent's sandbox).
    let (code, out) = cluster.master_get(&format!("/api/v1/tasks/a1/files/stdout?framework={fid}&offset=-1")).await;
    assert_eq!((code, out["offset"].as_u64()), (200, Some(0)), "{out}");
    for (path, code, field) in [
        (format!("/api/v1/tasks/a1/files/passwd?framework={fid}"), 400, Some("file")),
        ("/api/v1/tasks/a1/files/stdout".to_string(), 400, Some("framework")),
        (format!("/api/v1/tasks/a1/files/stdout?framework={fid}&offset=x"), 400, Some("offset")),
        (format!("/api/v1/tasks/nope/files/stdout?framework={fid}"), 404, None),
    ] {
        let (got, body) = cluster.master_get(&path).await;
        assert_eq!((got, body["field"].as_str()), (code, field), "{path}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_set_weights_and_quotas_that_survive_a_restart_and_tear_down_frameworks() {
    use corral_tests::WAIT;
    use nix::sys::signal::Signal;
    let mut cluster = Cluster::start(ClusterSpec::default()).await;
    let http = reqwest::Client::new();
    // The restarted master keeps its port.
    let base = cluster.master_url();
    let url = |path: &str| format!("{base}{path}");
    let send = |method: reqwest::Method, path: &str, body: Option<&str>| {
        let mut request = http.request(method, url(path));
        if let Some(body) = body {
            request = request.header("content-type", "application/json").body(body.to_string());
        }
        async move {
            let r = request.send().await.expect("request");
            let code = r.status().as_u16();
            (code, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let put = |path: &'static str, body: &'static str| send(reqwest::Method::PUT, path, Some(body));

    // A limit caps what the role is offered: the agent has 2 cpus, the role may hold 1.5.
    let (code, body) = put("/api/v1/roles/analytics/quota", r#"{"guarantee": "cpus:1;mem:128", "limit": "cpus:1.5;mem:512"}"#).await;
    assert_eq!(code, 200, "{body}");
    let (code, body) = put("/api/v1/roles/analytics/weight", r#"{"weight": 3}"#).await;
    assert_eq!(code, 200, "{body}");
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("an", "analytics", 60.0)).await;
    let offered: f64 = fw.offers().await.iter().map(|o| Resources::from_proto(&o.resources).unwrap().get_scalar("cpus")).sum();
    assert_eq!(offered, 1.5, "offers stop at the role's limit");

    let role = |s: &Value| s["roles"].as_array().unwrap().iter().find(|r| r["name"] == "analytics").cloned().unwrap_or(Value::Null);
    let set = |s: &Value| {
        let r = role(s);
        r["weight"] == 3.0 && r["quota"]["guarantee"]["cpus"] == 1.0 && r["quota"]["limit"]["cpus"] == 1.5
    };
    assert!(set(&cluster.master_get("/state/roles").await.1));

    // Bad input: 4xx naming the field, nothing changes.
    let del = |path: &'static str| send(reqwest::Method::DELETE, path, None);
    let post = |path: &'static str| send(reqwest::Method::POST, path, None);
    for (response, code, field) in [
        (put("/api/v1/roles/analytics/weight", r#"{"weight": -1}"#).await, 400, "weight"),
        (put("/api/v1/roles/analytics/weight", r#"{"weight": "heavy"}"#).await, 400, "weight"),
        (put("/api/v1/roles/analytics/weight", r#"{}"#).await, 400, "weight"),
        (put("/api/v1/roles/analytics/weight", r#"{"weight": 2"#).await, 400, "body"),
        (put("/api/v1/roles/analytics/weight", r#"[2]"#).await, 400, "body"),
        (put("/api/v1/roles/bad%20role/weight", r#"{"weight": 2}"#).await, 400, "role"),
        (put("/api/v1/roles/analytics/quota", r#"{"limit": "cpus:-1"}"#).await, 400, "limit"),
        (put("/api/v1/roles/analytics/quota", r#"{"guarantee": "cpus:3", "limit": "cpus:2"}"#).await, 400, "quota"),
        (put("/api/v1/roles/analytics/quota", r#"{"guarantee": "cpus(analytics):1"}"#).await, 400, "quota"),
        (put("/api/v1/roles/analytics/quota", r#"{"guarantee": 2}"#).await, 400, "guarantee"),
        (put("/api/v1/roles/analytics/quota", r#"{"guarantees": "cpus:1"}"#).await, 400, "body"),
        (post("/api/v1/frameworks/no-such-framework/teardown").await, 404, "framework"),
        (post("/api/v1/frameworks/bad%20id/teardown").await, 400, "framework"),
    ] {
        assert_eq!((response.0, &response.1["field"]), (code, &Value::from(field)), "{}", response.1);
        assert!(response.1["error"].as_str().unwrap().starts_with(&format!("{field}: ")), "{}", response.1);
    }
    assert!(set(&cluster.master_get("/state/roles").await.1), "refused writes changed nothing");

    // Weights and quotas are in the registry: a restarted master has them.
    cluster.master.as_ref().unwrap().signal(Signal::SIGKILL);
    cluster.master.as_mut().unwrap().wait_timeout(WAIT);
    cluster.start_master().await;
    cluster.wait_state("the role back with its weight and quota", set).await;

    let (code, body) = del("/api/v1/roles/analytics/quota").await;
    assert_eq!(code, 200, "{body}");
    let unlimited = cluster.master_get("/state/roles").await.1;
    assert_eq!(role(&unlimited)["quota"]["limit"]["cpus"], 0.0, "{unlimited}");

    let fid = fw.framework_id.clone();
    let (code, body) = send(reqwest::Method::POST, &format!("/api/v1/frameworks/{fid}/teardown"), None).await;
    assert_eq!(code, 200, "{body}");
    let state = cluster.wait_state("the framework torn down", |s| s["frameworks"].as_array().unwrap().is_empty()).await;
    assert_eq!(state["completed_frameworks"][0]["id"], fid.as_str());
}

/// Scrapes `url` and parses it as Prometheus exposition (a parser, not string matching).
async fn scrape(url: &str) -> Vec<prometheus_parse::Sample> {
    let text = reqwest::get(url).await.expect("GET /metrics").text().await.expect("body");
    let lines = text.lines().map(|l| Ok(l.to_string()));
    prometheus_parse::Scrape::parse(lines).expect("valid Prometheus exposition").samples
}

/// The value of the sample of `metric` carrying `labels`.
fn value(samples: &[prometheus_parse::Sample], metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    use prometheus_parse::Value;
    let sample = samples.iter().find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(v)))?;
    match &sample.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        Value::Histogram(buckets) => buckets.iter().map(|b| b.count).reduce(f64::max),
        Value::Summary(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_and_move_when_tasks_run() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let master = format!("{}/metrics", cluster.master_url());
    let before = scrape(&master).await;
    assert_eq!(value(&before, "corral_master_is_leader", &[]), Some(1.0));
    assert_eq!(value(&before, "corral_master_agents", &[("state", "REGISTERED")]), Some(1.0));
    assert_eq!(value(&before, "corral_master_tasks", &[("state", "TASK_RUNNING")]), None);
    assert_eq!(value(&before, "corral_master_resources", &[("kind", "total"), ("role", "*"), ("resource", "cpus")]), Some(2.0));

    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("m", "*", 60.0)).await;
    let offer = fw.launch_one("m1", "sleep 600", "cpus:0.5;mem:64").await;
    fw.wait_update("m1", TaskState::TaskRunning).await;
    let after = scrape(&master).await;
    assert_eq!(value(&after, "corral_master_tasks", &[("state", "TASK_RUNNING")]), Some(1.0));
    assert_eq!(value(&after, "corral_master_resources", &[("kind", "used"), ("role", "*"), ("resource", "cpus")]), Some(0.5));
    assert_eq!(value(&after, "corral_master_frameworks", &[("connection", "connected")]), Some(1.0));
    assert!(value(&after, "corral_master_offers_total", &[("event", "sent")]).unwrap() >= 1.0);
    assert!(value(&after, "corral_master_status_updates_forwarded_total", &[]).unwrap() >= 2.0, "STARTING and RUNNING");
    assert!(value(&after, "corral_master_allocation_cycle_seconds", &[]).unwrap() >= 1.0, "cycles counted");

    let (_, state) = cluster.master_get("/state").await;
    let agent = state["agents"].as_array().unwrap().iter().find(|a| a["id"] == offer.agent_id.as_str()).unwrap().clone();
    let agent_url = format!("http://{}:{}/metrics", agent["hostname"].as_str().unwrap(), agent["port"]);
    let deadline = std::time::Instant::now() + corral_tests::WAIT;
    let samples = loop {
        let samples = scrape(&agent_url).await;
        // Usage is sampled every 300 ms in tests.
        if value(&samples, "corral_agent_task_memory_bytes", &[("task", "m1")]).is_some() || std::time::Instant::now() > deadline {
            break samples;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(value(&samples, "corral_agent_tasks", &[("state", "TASK_RUNNING")]), Some(1.0));
    assert_eq!(value(&samples, "corral_agent_launch_seconds", &[]), Some(1.0), "one launch observed");
    assert!(value(&samples, "corral_agent_task_memory_bytes", &[("task", "m1")]).unwrap() > 0.0);
    assert!(value(&samples, "corral_agent_task_cpu_seconds", &[("task", "m1")]).is_some());

    // The exposition ends with the OpenMetrics EOF marker.
    let text = reqwest::get(&master).await.unwrap().text().await.unwrap();
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
}

/// Reads Server-Sent Events from `response` until `done` holds for the events so far (or WAIT passes).
async fn read_events(response: &mut reqwest::Response, done: impl Fn(&[(String, Value)]) -> bool) -> Vec<(String, Value)> {
    let deadline = tokio::time::Instant::now() + corral_tests::WAIT;
    let (mut buffer, mut events) = (String::new(), Vec::new());
    while !done(&events) {
        let chunk = tokio::time::timeout_at(deadline, response.chunk()).await;
        let Ok(Ok(Some(chunk))) = chunk else { break };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim_start().to_string());
            if let (Some(name), Some(data)) = (field("event:"), field("data:")) {
                events.push((name, serde_json::from_str(&data).expect("event data is JSON")));
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_delivers_a_tasks_transitions_in_order() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut stream = reqwest::get(format!("{}/api/v1/events", cluster.master_url())).await.unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let hello = read_events(&mut stream, |e| !e.is_empty()).await;
    assert_eq!(hello[0].0, "SUBSCRIBED");

    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("ev", "*", 60.0)).await;
    fw.launch_one("e1", "sleep 0.2", "cpus:0.1;mem:16").await;
    fw.wait_terminal("e1").await;
    let finished = |events: &[(String, Value)]| events.iter().any(|(_, e)| e["task_id"] == "e1" && e["state"] == "TASK_FINISHED");
    let events = read_events(&mut stream, finished).await;
    let fid = fw.framework_id.clone();
    assert!(events.iter().any(|(name, e)| name == "FRAMEWORK_ADDED" && e["framework_id"] == fid.as_str()), "{events:?}");
    let states: Vec<&str> = events
        .iter()
        .filter(|(name, e)| name == "TASK_UPDATED" && e["task_id"] == "e1")
        .map(|(_, e)| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["TASK_STAGING", "TASK_STARTING", "TASK_RUNNING", "TASK_FINISHED"], "{events:?}");
    assert!(events.iter().all(|(name, e)| e["type"] == name.as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_reserve_resources_and_drain_agents_until_they_are_up_again() {
    use corral_tests::{FrameworkEvent, WAIT};
    use nix::sys::signal::Signal;
    use std::time::Duration;
    let mut cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("d", "analytics", 60.0)).await;
    let agent = fw.offers().await[0].agent_id.clone();
    let http = reqwest::Client::new();
    let base = cluster.master_url();
    let post = |path: String, body: &'static str| {
        let request = http.post(format!("{base}{path}")).body(body);
        async move {
            let r = request.send().await.expect("request");
            (r.status().as_u16(), r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };

    // Reservations: only free resources, only named for a role.
    let (code, body) = post(format!("/api/v1/agents/{agent}/reserve"), r#"{"resources": "cpus(analytics):1;mem(analytics):128"}"#).await;
    assert_eq!(code, 200, "{body}");
    let agents = cluster.master_get("/state/agents").await.1;
    assert_eq!(agents["agents"][0]["reserved_resources"]["analytics"]["cpus"], 1.0, "{agents}");
    for (path, body, code, field) in [
        (format!("/api/v1/agents/{agent}/reserve"), r#"{"resources": "cpus:1"}"#, 400, "resources"),
        (format!("/api/v1/agents/{agent}/reserve"), r#"{"resources": "cpus(analytics):5"}"#, 409, "resources"),
        (format!("/api/v1/agents/{agent}/reserve"), r#"{"resources": "cpus(analytics):-1"}"#, 400, "resources"),
        (format!("/api/v1/agents/{agent}/reserve"), r#"{"resources": 1}"#, 400, "resources"),
        (format!("/api/v1/agents/{agent}/reserve"), r#"{"resources": "#, 400, "body"),
        ("/api/v1/agents/no-such-agent/reserve".to_string(), r#"{"resources": "cpus(analytics):1"}"#, 404, "agent"),
        (format!("/api/v1/agents/{agent}/drain"), r#"{"deadline_seconds": -5}"#, 400, "deadline_seconds"),
        (format!("/api/v1/agents/{agent}/drain"), r#"{"deadline_seconds": "soon"}"#, 400, "deadline_seconds"),
        ("/api/v1/agents/no-such-agent/drain".to_string(), "", 404, "agent"),
    ] {
        let (got, reply) = post(path.clone(), body).await;
        assert_eq!((got, reply["field"].as_str()), (code, Some(field)), "{path} {body}: {reply}");
    }
    let agents = cluster.master_get("/state/agents").await.1;
    assert_eq!(agents["agents"][0]["reserved_resources"]["analytics"]["cpus"], 1.0, "refused writes changed nothing");

    // (The reservation rescinded the first offer: launch on a live one.)
    let need = Resources::parse("cpus:0.1;mem:16").unwrap();
    let offer = fw.live_offers(|r| r.contains(&need)).await.remove(0);
    let task = TaskBuilder::new("d1").shell("sleep 600").resources(&OfferPool::new(&offer).unwrap().take(&need, 0).unwrap()).build();
    fw.driver.launch(&offer, vec![task]).await.unwrap();
    fw.wait_update("d1", TaskState::TaskRunning).await;

    // Drain: offers stop at once, the task is killed at the deadline.
    let (code, body) = post(format!("/api/v1/agents/{agent}/drain"), r#"{"deadline_seconds": 1}"#).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(fw.wait_terminal("d1").await.state, TaskState::TaskKilled as i32);
    let quiet_until = std::time::Instant::now() + Duration::from_millis(1500);
    while let Some(event) = fw.next(quiet_until.saturating_duration_since(std::time::Instant::now())).await {
        assert!(!matches!(event, FrameworkEvent::Offers(_)), "a draining agent is not offered");
    }
    let agents = cluster.master_get("/state/agents").await.1;
    assert_eq!((agents["agents"][0]["active"].as_bool(), agents["agents"][0]["draining"].is_object()), (Some(false), true));

    // The drain is in the registry: a restarted master keeps the agent out of offers.
    cluster.master.as_ref().unwrap().signal(Signal::SIGKILL);
    cluster.master.as_mut().unwrap().wait_timeout(WAIT);
    cluster.start_master().await;
    let state = cluster.wait_state("the agent back, still draining", |s| s["agents"][0]["state"] == "REGISTERED").await;
    assert!(state["agents"][0]["draining"].is_object(), "{state}");

    let (code, body) = post(format!("/api/v1/agents/{agent}/up"), "").await;
    assert_eq!(code, 200, "{body}");
    assert!(!fw.offers().await.is_empty(), "offers resume once the agent is up");
    let agents = cluster.master_get("/state/agents").await.1;
    assert_eq!((agents["agents"][0]["active"].as_bool(), agents["agents"][0]["draining"].is_null()), (Some(true), true));

    // Killing a task on the operator's behalf: bad input is refused.
    for (path, body, code, field) in [
        ("/api/v1/tasks/d1/kill".to_string(), r#"{}"#, 400, "framework"),
        ("/api/v1/tasks/d1/kill".to_string(), r#"{"framework": "no-such-framework"}"#, 404, "task"),
        ("/api/v1/tasks/bad%20id/kill".to_string(), r#"{"framework": "x"}"#, 400, "task"),
        ("/api/v1/tasks/d1/kill".to_string(), r#"{"framework": "x", "grace_seconds": "soon"}"#, 400, "grace_seconds"),
    ] {
        let (got, reply) = post(path.clone(), body).await;
        assert_eq!((got, reply["field"].as_str()), (code, Some(field)), "{path} {body}: {reply}");
    }

    let (code, body) = post(format!("/api/v1/agents/{agent}/unreserve"), r#"{"resources": "cpus(analytics):1;mem(analytics):128"}"#).await;
    assert_eq!(code, 200, "{body}");
    let agents = cluster.master_get("/state/agents").await.1;
    assert_eq!(agents["agents"][0]["reserved_resources"], serde_json::json!({}), "{agents}");
    assert_eq!(agents["agents"][0]["unreserved_resources"]["cpus"], 2.0);
}
