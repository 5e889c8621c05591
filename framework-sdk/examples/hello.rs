//! A complete framework in one file: launches `--count` tasks that each print a greeting, prints every status
//! update, and tears itself down when all tasks have finished.
//!
//! ```text
//! cargo run -p corral-sdk --example hello -- 127.0.0.1:5050 3
//! ```

use std::collections::HashMap;

use corral_sdk::{Driver, Masters, OfferPool, Resources, Scheduler, SchedulerDriver, TaskBuilder, TaskState, async_trait, v1};

struct Hello {
    /// How many tasks still need launching.
    to_launch: usize,
    /// Final state of each task, by id.
    finished: HashMap<String, TaskState>,
    total: usize,
}

#[async_trait]
impl Scheduler for Hello {
    async fn registered(&mut self, _driver: &Driver, framework_id: &str, master: &str) {
        println!("registered as {framework_id} with {master}");
    }

    async fn offers(&mut self, driver: &Driver, offers: Vec<v1::Offer>) {
        let need = Resources::parse("cpus:0.1;mem:32").expect("valid resources");
        for offer in offers {
            let Ok(mut pool) = OfferPool::new(&offer) else { continue };
            let mut tasks = Vec::new();
            while self.to_launch > 0 {
                let Some(resources) = pool.take(&need, 0) else { break };
                let n = self.total - self.to_launch;
                self.to_launch -= 1;
                tasks.push(
                    TaskBuilder::new(format!("hello-{n}"))
                        .shell("echo \"hello from $CORRAL_TASK_ID on $CORRAL_AGENT_HOST\"")
                        .resources(&resources)
                        .build(),
                );
            }
            let result = if tasks.is_empty() {
                driver.decline([&offer.id], Some(30.0)).await
            } else {
                driver.launch(&offer, tasks).await
            };
            if let Err(e) = result {
                eprintln!("offer {}: {e}", offer.id);
            }
        }
    }

    async fn status_update(&mut self, driver: &Driver, status: &v1::TaskStatus) {
        let state = corral_sdk::state_of(status);
        println!("{} {} {}", status.task_id, state.name(), status.message);
        if state.is_terminal() {
            self.finished.insert(status.task_id.clone(), state);
            if self.finished.len() == self.total {
                let _ = driver.teardown().await;
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let mut args = std::env::args().skip(1);
    let master = args.next().unwrap_or_else(|| "127.0.0.1:5050".into());
    let count: usize = args.next().map(|c| c.parse()).transpose()?.unwrap_or(3);
    let framework = v1::FrameworkInfo { name: "hello".into(), failover_timeout_seconds: 60.0, ..Default::default() };
    let scheduler = Hello { to_launch: count, finished: HashMap::new(), total: count };
    SchedulerDriver::new(Masters::parse(&master).map_err(anyhow::Error::msg)?, framework).run(scheduler).await?;
    Ok(())
}
