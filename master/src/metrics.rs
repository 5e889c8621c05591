//! The master's Prometheus metrics, served at `GET /metrics` in the OpenMetrics text format.
//!
//! Counters and histograms are updated where things happen (offers sent, declined and rescinded, status updates
//! forwarded, allocation cycles, registry writes). Gauges of the state — agents, frameworks and tasks by state,
//! resources by role — are set from the state by the leading actor at scrape time, so they are never stale and
//! cost nothing between scrapes. One set per process: counters run on across leadership terms.

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label pairs, e.g. `[("state", "TASK_RUNNING")]`.
pub type Labels = Vec<(&'static str, String)>;

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub struct Metrics {
    registry: Registry,
    pub is_leader: Gauge,
    pub agents: Family<Labels, Gauge>,
    pub frameworks: Family<Labels, Gauge>,
    pub tasks: Family<Labels, Gauge>,
    pub resources: Family<Labels, Gauge<f64, AtomicU64>>,
    pub offers: Family<Labels, Counter>,
    pub status_updates: Counter,
    pub allocation_seconds: Histogram,
    pub registry_write_seconds: Histogram,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("corral_master");
        let (is_leader, agents, frameworks, tasks) = (Gauge::default(), Family::default(), Family::default(), Family::default());
        let (resources, offers, status_updates) = (Family::default(), Family::default(), Counter::default());
        // 10 µs to ~1.3 s.
        let allocation_seconds = Histogram::new(exponential_buckets(0.00001, 2.0, 18));
        // 100 µs to ~3.3 s (etcd round trips, file fsyncs).
        let registry_write_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register("is_leader", "1 while this master leads", is_leader.clone());
        registry.register("agents", "Agents by state (leader only)", agents.clone());
        registry.register("frameworks", "Frameworks by connection (leader only)", frameworks.clone());
        registry.register("tasks", "Active and recently completed tasks by state (leader only)", tasks.clone());
        registry.register(
            "resources",
            "Resources by kind (total on live agents, used by tasks, offered), role and resource (leader only)",
            resources.clone(),
        );
        registry.register("offers", "Offers by event: sent, declined, rescinded", offers.clone());
        registry.register("status_updates_forwarded", "Task status updates forwarded to frameworks", status_updates.clone());
        registry.register("allocation_cycle_seconds", "Duration of allocation cycles", allocation_seconds.clone());
        registry.register("registry_write_seconds", "Latency of registry writes", registry_write_seconds.clone());
        Metrics {
            registry,
            is_leader,
            agents,
            frameworks,
            tasks,
            resources,
            offers,
            status_updates,
            allocation_seconds,
            registry_write_seconds,
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    pub fn offers(&self, event: &'static str, count: usize) {
        self.offers.get_or_create(&vec![("event", event.to_string())]).inc_by(count as u64);
    }

    /// Forgets the state gauges (a follower has no state to show).
    pub fn clear_state(&self) {
        self.agents.clear();
        self.frameworks.clear();
        self.tasks.clear();
        self.resources.clear();
    }
}
