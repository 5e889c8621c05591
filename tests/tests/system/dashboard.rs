//! The web dashboard in a real headless Chromium, driven through chromedriver's WebDriver API, against a real
//! cluster. Screenshots land in `target/dashboard-e2e/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use corral_proto::v1::TaskState;
use corral_tests::{Cluster, ClusterSpec, Process, TestFramework, WAIT, free_port};
use serde_json::{Value, json};

/// A headless Chromium session.
struct Browser {
    _driver: Process,
    http: reqwest::Client,
    session: String,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium whose profile lives in `dir` (so the cluster's cleanup finds it).
    async fn start(dir: &Path) -> Browser {
        let port = free_port();
        let driver = Process::spawn("chromedriver", Path::new("/usr/bin/chromedriver"), &[format!("--port={port}")], dir);
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + WAIT;
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start:\n{}", driver.log_tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = dir.join("chrome-profile");
        let capabilities = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,900", format!("--user-data-dir={}", profile.display())],
        }}}});
        let created: Value = http.post(format!("{base}/session")).json(&capabilities).send().await.unwrap().json().await.unwrap();
        let session = created["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}")).to_string();
        Browser { _driver: driver, http, session: format!("{base}/session/{session}") }
    }

    async fn command(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut request = self.http.request(method, format!("{}{path}", self.session));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let reply: Value = request.send().await.unwrap().json().await.unwrap();
        reply["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.command(reqwest::Method::POST, "/url", Some(json!({"url": url}))).await;
    }

    async fn text(&self) -> String {
        let script = json!({"script": "return document.body.innerText", "args": []});
        self.command(reqwest::Method::POST, "/execute/sync", Some(script)).await.as_str().unwrap_or_default().to_string()
    }

    /// Waits until the page shows every one of `needles` (ignoring case: headings are styled upper-case).
    async fn wait_text(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let text = self.text().await;
            if needles.iter().all(|n| text.to_lowercase().contains(&n.to_lowercase())) {
                return text;
            }
            assert!(Instant::now() < deadline, "the page never showed {needles:?}; it shows:\n{text}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let png = self.command(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    async fn close(self) {
        self.command(reqwest::Method::DELETE, "", None).await;
    }
}

fn artefacts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-e2e")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_agents_and_tasks_live_and_a_tasks_log() {
    let cluster = Cluster::start(ClusterSpec::default()).await;
    let mut fw = TestFramework::start(&cluster.master_addr(), TestFramework::info("web", "*", 60.0)).await;
    let offer = fw.launch_one("web-1", "echo hello-from-e2e; sleep 600", "cpus:0.5;mem:64").await;
    fw.wait_update("web-1", TaskState::TaskRunning).await;
    let browser = Browser::start(cluster.dir.path()).await;
    let home = format!("{}/", cluster.master_url());

    browser.goto(&home).await;
    let overview = browser.wait_text(&["Running tasks", "Cluster usage", "cpus"]).await;
    assert!(overview.contains(&cluster.master_addr()), "the overview names the leader:\n{overview}");
    browser.screenshot(&artefacts().join("overview.png")).await;

    browser.goto(&format!("{home}#/agents")).await;
    browser.wait_text(&[offer.agent_id.as_str(), "REGISTERED"]).await;

    browser.goto(&format!("{home}#/tasks")).await;
    browser.wait_text(&["web-1", "TASK_RUNNING"]).await;
    // Live: a task launched now appears without reloading (the page follows /api/v1/events).
    fw.launch_one("web-2", "sleep 600", "cpus:0.1;mem:16").await;
    browser.wait_text(&["web-2"]).await;
    browser.screenshot(&artefacts().join("tasks.png")).await;

    let fid = fw.framework_id.clone();
    browser.goto(&format!("{home}#/log/{fid}/web-1/stdout")).await;
    browser.wait_text(&["hello-from-e2e"]).await;
    browser.screenshot(&artefacts().join("log.png")).await;
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_followers_dashboard_names_and_links_the_leader() {
    use corral_tests::ha::HaCluster;
    let cluster = HaCluster::start(3, Duration::from_secs(2), ClusterSpec { agents: 0, ..ClusterSpec::default() }).await;
    let leader = cluster.wait_agreed_leader().await;
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let browser = Browser::start(cluster.dir.path()).await;
    browser.goto(&format!("http://{}/", cluster.addr(follower))).await;
    let leader_addr = cluster.addr(leader);
    let text = browser.wait_text(&["This master follows", &leader_addr]).await;
    assert!(text.contains("follower"), "{text}");
    let script = json!({"script": "return document.querySelector('#follower a').href", "args": []});
    let link = browser.command(reqwest::Method::POST, "/execute/sync", Some(script)).await;
    assert_eq!(link, format!("http://{leader_addr}/"));
    browser.close().await;
}
