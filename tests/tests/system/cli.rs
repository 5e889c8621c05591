//! The `corral` CLI against a real cluster: golden tests of its tables and JSON (ids and addresses replaced by
//! placeholders; `UPDATE_GOLDEN=1` rewrites the files in `tests/golden/`), exit codes and errors.

use std::path::Path;
use std::time::Duration;

use corral_proto::v1::TaskState;
use corral_tests::{Cluster, ClusterSpec, FrameworkEvent, TestFramework};

/// Replaces what differs between runs (ids, ports, pids) with placeholders.
fn normalize(text: &str, replacements: &[(&str, &str)]) -> String {
    let mut out = replacements.iter().fold(text.to_string(), |out, (from, to)| out.replace(from, to));
    while let Some(at) = out.find("with pid ").map(|i| i + "with pid ".len()).filter(|&i| out[i..].starts_with(|c: char| c.is_ascii_digit())) {
        let end = at + out[at..].find(|c: char| !c.is_ascii_digit()).unwrap_or(out.len() - at);
        out.replace_range(at..end, "<PID>");
    }
    out
}

fn golden(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden").join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} is missing (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(actual, expected, "`{name}` differs from {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_output_matches_the_golden_files_and_exit_codes_hold() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("golden", "analytics", 60.0)).await;
    let offer = fw.launch_one("g1", "echo golden-out; sleep 600", "cpus:0.5;mem:64").await;
    fw.wait_update("g1", TaskState::TaskRunning).await;
    // No offers outstanding, so every figure is fixed.
    fw.driver.suppress(Vec::new()).await.unwrap();
    loop {
        while let Some(event) = fw.next(Duration::from_millis(100)).await {
            if let FrameworkEvent::Offers(offers) = event {
                fw.driver.decline(offers.iter().map(|o| o.id.clone()), Some(600.0)).await.unwrap();
            }
        }
        if cluster.state().await["outstanding_offers"] == 0 {
            break;
        }
    }
    let (_, state) = cluster.master_get("/state").await;
    let agent_addr = format!("127.0.0.1:{}", state["agents"][0]["port"]);
    let fid = fw.framework_id.clone();
    let agent = offer.agent_id.clone();
    let master = cluster.master_addr();
    let version = env!("CARGO_PKG_VERSION");
    let replacements = [
        (fid.as_str(), "<FRAMEWORK>"),
        (agent.as_str(), "<AGENT>"),
        (agent_addr.as_str(), "<AGENT_ADDR>"),
        (master.as_str(), "<MASTER>"),
        (version, "<VERSION>"),
    ];
    let run = |args: Vec<String>| {
        let cluster = &cluster;
        async move { cluster.cli(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    let words = |s: &str| s.split(' ').map(str::to_string).collect::<Vec<_>>();

    for (name, args) in [
        ("cluster-status", words("cluster status")),
        ("node-list", words("node list")),
        ("node-show", vec!["node".into(), "show".into(), agent.to_string()]),
        ("framework-show", vec!["framework".into(), "show".into(), "golden".into()]),
        ("task-list", words("task list")),
        ("task-show", words("task show g1")),
        ("role-list", words("role list")),
        ("role-list-json", words("--json role list")),
        ("role-quota", words("role quota analytics --guarantee cpus:1;mem:128 --limit cpus:2")),
        ("role-weight", words("role weight analytics 2.5")),
        ("role-list-after", words("role list")),
        ("reservation-add", vec!["reservation".into(), "add".into(), agent.to_string(), "cpus(analytics):1".into()]),
        ("node-show-reserved", vec!["node".into(), "show".into(), agent.to_string()]),
        ("reservation-remove", vec!["reservation".into(), "remove".into(), agent.to_string(), "cpus(analytics):1".into()]),
        ("node-drain", vec!["node".into(), "drain".into(), agent.to_string(), "--deadline".into(), "10m".into()]),
        ("node-up", vec!["node".into(), "up".into(), agent.to_string()]),
    ] {
        let (code, out, err) = run(args).await;
        assert_eq!(code, 0, "{name}: {out}\n{err}");
        golden(name, &normalize(&out, &replacements));
    }

    let (code, out, _) = run(words("task log g1")).await;
    assert_eq!((code, out.as_str()), (0, "golden-out\n"));
    let (code, out, err) = run(words("task kill g1 --wait")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "KILL  task g1 ended TASK_KILLED\n");

    // Exit codes scripts rely on, with errors that say what is wrong.
    for (args, code, needle) in [
        (words("task show nope"), 4, "no task matches \"nope\""),
        (words("node show nope"), 4, "no node matches \"nope\""),
        (words("framework teardown nope"), 4, "no framework matches \"nope\""),
        (words("role weight analytics 0"), 1, "weight: must be a positive number"),
        (words("role quota analytics --guarantee cpus:3 --limit cpus:2"), 1, "exceeds its limit"),
        (vec!["reservation".into(), "add".into(), agent.to_string(), "cpus(analytics):99".into()], 1, "does not have"),
        (words("--master 127.0.0.1:1 cluster status"), 3, "127.0.0.1:1"),
        (words("node drain"), 2, "NODE"),
    ] {
        let (got, out, err) = run(args.clone()).await;
        assert_eq!(got, code, "{args:?}: {out}\n{err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }

    let (code, out, _) = run(words("completion bash")).await;
    assert!(code == 0 && out.contains("_corral()") && out.contains("drain"), "{out}");
    let (code, out, _) = run(words("completion fish")).await;
    assert!(code == 0 && out.contains("complete -c corral"), "{out}");
}
