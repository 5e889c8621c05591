//! The agent's Prometheus metrics, served at `GET /metrics` in the OpenMetrics text format: tasks by state, launch
//! latency (RUN_TASK received → task process running), and each live task's cpu time and memory from its cgroup.
//! Task gauges are set from the agent's state at scrape time.

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label pairs, e.g. `[("state", "TASK_RUNNING")]`.
pub type Labels = Vec<(&'static str, String)>;

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub struct Metrics {
    registry: Registry,
    pub tasks: Family<Labels, Gauge>,
    pub launch_seconds: Histogram,
    pub task_cpu_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    pub task_memory_bytes: Family<Labels, Gauge>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("corral_agent");
        let (tasks, task_cpu_seconds, task_memory_bytes) = (Family::default(), Family::default(), Family::default());
        // 100 µs to ~3.3 s.
        let launch_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register("tasks", "Tasks by state", tasks.clone());
        registry.register("launch_seconds", "From RUN_TASK received to the task's process running", launch_seconds.clone());
        registry.register("task_cpu_seconds", "CPU time used by a live task (from its cgroup)", task_cpu_seconds.clone());
        registry.register("task_memory_bytes", "Memory used by a live task (from its cgroup)", task_memory_bytes.clone());
        Metrics { registry, tasks, launch_seconds, task_cpu_seconds, task_memory_bytes }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// Forgets the per-task gauges before they are set again from the state.
    pub fn clear_tasks(&self) {
        self.tasks.clear();
        self.task_cpu_seconds.clear();
        self.task_memory_bytes.clear();
    }
}
