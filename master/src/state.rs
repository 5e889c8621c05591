//! `/state`: the master's view as JSON, in the shape Mesos' `/state` made familiar (agents, frameworks with their
//! tasks, completed frameworks, roles, totals). Rendered inside the actor from its own state; read-only.

use std::collections::HashMap;

use corral_proto::v1::TaskState;
use corral_proto::{AgentId, FrameworkId, Resources, TaskId};
use serde_json::{Value, json};

use crate::master::{AgentState, Framework, Master, Task};

/// A part of the state served on its own (`/state/agents`, `/state/frameworks`, `/state/roles`, `/state/tasks`).
#[derive(Debug, Clone, PartialEq)]
pub enum View {
    Agents,
    Frameworks,
    Roles,
    Tasks(TaskFilter),
    /// Where a task (active or recently completed) ran: its agent's id, host and port, or null.
    TaskAgent { framework: FrameworkId, task: TaskId },
}

/// Which tasks `/state/tasks` lists, and which page of them.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskFilter {
    pub state: Option<TaskState>,
    pub framework: Option<FrameworkId>,
    pub agent: Option<AgentId>,
    pub offset: usize,
    pub limit: usize,
}

impl Default for TaskFilter {
    fn default() -> Self {
        TaskFilter { state: None, framework: None, agent: None, offset: 0, limit: Self::DEFAULT_LIMIT }
    }
}

impl TaskFilter {
    pub const DEFAULT_LIMIT: usize = 100;
    pub const MAX_LIMIT: usize = 10_000;

    /// Parses `/state/tasks` query parameters; the error names the parameter (`field`) and what is wrong.
    pub fn parse<'a>(params: impl IntoIterator<Item = (&'a str, &'a str)>) -> Result<TaskFilter, (String, String)> {
        let mut filter = TaskFilter::default();
        for (key, value) in params {
            let bad = |why: String| (key.to_string(), why);
            match key {
                "state" => {
                    let upper = value.to_ascii_uppercase();
                    let name = if upper.starts_with("TASK_") { upper } else { format!("TASK_{upper}") };
                    let state = TaskState::from_str_name(&name)
                        .filter(|s| *s != TaskState::Unspecified)
                        .ok_or_else(|| bad(format!("{value:?} is not a task state (e.g. TASK_RUNNING or running)")))?;
                    filter.state = Some(state);
                }
                "framework" => filter.framework = Some(FrameworkId::new(value).map_err(|e| bad(e.to_string()))?),
                "agent" => filter.agent = Some(AgentId::new(value).map_err(|e| bad(e.to_string()))?),
                "offset" => filter.offset = value.parse().map_err(|_| bad(format!("{value:?} is not a whole number")))?,
                "limit" => {
                    let limit: usize = value.parse().map_err(|_| bad(format!("{value:?} is not a whole number")))?;
                    if !(1..=Self::MAX_LIMIT).contains(&limit) {
                        return Err(bad(format!("must be between 1 and {}, not {limit}", Self::MAX_LIMIT)));
                    }
                    filter.limit = limit;
                }
                _ => return Err(bad("unknown parameter; use state, framework, agent, offset or limit".into())),
            }
        }
        Ok(filter)
    }

    fn matches(&self, framework_id: &FrameworkId, t: &Task) -> bool {
        self.state.is_none_or(|s| s == t.state)
            && self.framework.as_ref().is_none_or(|f| f == framework_id)
            && self.agent.as_ref().is_none_or(|a| *a == t.agent_id)
    }
}

/// What every agent has in use and on offer, summed in one pass over tasks and offers.
struct AgentSums<'a> {
    used: HashMap<&'a AgentId, Resources>,
    offered: HashMap<&'a AgentId, Resources>,
}

impl Master {
    pub(crate) fn state_json(&self) -> Value {
        let (agents, totals) = self.agents_json();
        json!({
            "version": corral_proto::VERSION,
            "address": self.config.advertise,
            "leader": self.config.advertise,
            "is_leader": true,
            "start_time": self.start_time,
            "elected_time": self.start_time,
            "agents": agents,
            "frameworks": self.frameworks_json(true),
            "completed_frameworks": self.completed_frameworks,
            "roles": self.roles_json(),
            "totals": totals,
            "outstanding_offers": self.offers.len(),
        })
    }

    pub(crate) fn view_json(&self, view: &View) -> Value {
        match view {
            View::Agents => {
                let (agents, totals) = self.agents_json();
                json!({"agents": agents, "totals": totals})
            }
            View::Frameworks => json!({
                "frameworks": self.frameworks_json(false),
                "completed_frameworks": self.completed_frameworks,
            }),
            View::Roles => json!({"roles": self.roles_json()}),
            View::Tasks(filter) => self.tasks_json(filter),
            View::TaskAgent { framework, task } => {
                let f = self.frameworks.get(framework);
                let t = f.and_then(|f| f.tasks.get(task).or_else(|| f.completed_tasks.iter().rev().find(|t| &t.id == task)));
                let agent = t.and_then(|t| self.agents.get(&t.agent_id).map(|a| (&t.agent_id, a)));
                agent.map_or(Value::Null, |(id, a)| json!({"id": id, "hostname": a.info.hostname, "port": a.info.port}))
            }
        }
    }

    fn agent_sums(&self) -> AgentSums<'_> {
        let mut sums = AgentSums { used: HashMap::new(), offered: HashMap::new() };
        for f in self.frameworks.values() {
            for t in f.tasks.values().filter(|t| !t.state.is_terminal()) {
                sums.used.entry(&t.agent_id).or_default().add(&t.resources);
            }
        }
        for o in self.offers.values() {
            sums.offered.entry(&o.agent_id).or_default().add(&o.resources);
        }
        sums
    }

    /// Every agent (sorted by id), and the cluster totals over live agents.
    fn agents_json(&self) -> (Vec<Value>, Value) {
        let sums = self.agent_sums();
        let none = Resources::new();
        let mut agents: Vec<_> = self.agents.iter().collect();
        agents.sort_by(|a, b| a.0.cmp(b.0));
        let mut total = Resources::new();
        let mut used = Resources::new();
        let mut offered = Resources::new();
        let agents_json: Vec<Value> = agents
            .into_iter()
            .map(|(id, a)| {
                let agent_used = sums.used.get(id).unwrap_or(&none);
                let agent_offered = sums.offered.get(id).unwrap_or(&none);
                if matches!(a.state, AgentState::Registered | AgentState::Disconnected) {
                    total.add(&a.total);
                    used.add(agent_used);
                    offered.add(agent_offered);
                }
                let reserved: serde_json::Map<String, Value> = a
                    .total
                    .reservation_roles()
                    .into_iter()
                    .map(|r| (r.to_string(), a.total.reserved_for(r).to_json_summary()))
                    .collect();
                let attributes: serde_json::Map<String, Value> =
                    a.info.attributes.iter().map(|x| (x.name.clone(), json!(x.value))).collect();
                json!({
                    "id": id,
                    "hostname": a.info.hostname,
                    "port": a.info.port,
                    "pid": format!("{}:{}", a.info.hostname, a.info.port),
                    "state": a.state.name(),
                    "active": a.state == AgentState::Registered && !self.drains.contains_key(id),
                    "draining": self.drains.get(id).map(|d| json!({"deadline": d.deadline, "tasks_killed": d.killed})),
                    "version": a.info.version,
                    "registered_time": a.registered_time,
                    "resources": a.total.to_json_summary(),
                    "resources_text": a.total.to_string(),
                    "used_resources": agent_used.to_json_summary(),
                    "offered_resources": agent_offered.to_json_summary(),
                    "unreserved_resources": a.total.unreserved().to_json_summary(),
                    "reserved_resources": reserved,
                    "attributes": attributes,
                    "task_count": a.tasks.len(),
                })
            })
            .collect();
        let mut free = total.clone();
        free.subtract(&used);
        free.subtract(&offered);
        let totals = json!({
            "total": total.to_json_summary(),
            "used": used.to_json_summary(),
            "offered": offered.to_json_summary(),
            "free": free.to_json_summary(),
        });
        (agents_json, totals)
    }

    /// Every framework (sorted by id), with its tasks when `with_tasks` (`/state/tasks` pages them otherwise).
    fn frameworks_json(&self, with_tasks: bool) -> Vec<Value> {
        let mut frameworks: Vec<_> = self.frameworks.iter().collect();
        frameworks.sort_by(|a, b| a.0.cmp(b.0));
        frameworks.into_iter().map(|(id, f)| self.framework_json(id, f, true, with_tasks)).collect()
    }

    fn roles_json(&self) -> Vec<Value> {
        let mut allocated: HashMap<&str, Resources> = HashMap::new();
        let mut members: HashMap<&str, Vec<&str>> = HashMap::new();
        for (id, f) in &self.frameworks {
            for role in &f.info.roles {
                members.entry(role).or_default().push(id.as_str());
            }
            for t in f.tasks.values().filter(|t| !t.state.is_terminal()) {
                allocated.entry(&t.role).or_default().add(&t.resources);
            }
        }
        self.allocator
            .roles()
            .into_iter()
            .map(|role| {
                let mut frameworks = members.get(role.as_str()).cloned().unwrap_or_default();
                frameworks.sort_unstable();
                let quota = self.allocator.quota(&role);
                json!({
                    "name": role,
                    "weight": self.allocator.weight(&role),
                    "share": self.allocator.role_share(&role),
                    "frameworks": frameworks,
                    "allocated": allocated.get(role.as_str()).cloned().unwrap_or_default().to_json_summary(),
                    "quota": {
                        "guarantee": quota.guarantee.to_json_summary(),
                        "limit": quota.limit.to_json_summary(),
                    },
                })
            })
            .collect()
    }

    /// One page of the tasks `filter` selects, by framework id then task id (active before completed).
    fn tasks_json(&self, filter: &TaskFilter) -> Value {
        let mut frameworks: Vec<_> = self.frameworks.iter().collect();
        frameworks.sort_by(|a, b| a.0.cmp(b.0));
        let matching = frameworks.into_iter().flat_map(|(id, f)| {
            f.tasks.values().chain(f.completed_tasks.iter()).filter(move |t| filter.matches(id, t)).map(move |t| (id, t))
        });
        let mut total = 0;
        let mut page = Vec::new();
        for (id, t) in matching {
            if total >= filter.offset && page.len() < filter.limit {
                page.push(self.task_json(id, t));
            }
            total += 1;
        }
        json!({"tasks": page, "total": total, "offset": filter.offset, "limit": filter.limit})
    }

    pub(crate) fn framework_json(&self, id: &FrameworkId, f: &Framework, active: bool, with_tasks: bool) -> Value {
        let mut used = Resources::new();
        for t in f.tasks.values().filter(|t| !t.state.is_terminal()) {
            used.add(&t.resources);
        }
        let mut offered = Resources::new();
        for offer_id in &f.offers {
            if let Some(o) = self.offers.get(offer_id) {
                offered.add(&o.resources);
            }
        }
        let mut out = json!({
            "id": id,
            "name": f.info.name,
            "roles": f.info.roles,
            "user": f.info.user,
            "hostname": f.info.hostname,
            "failover_timeout": f.info.failover_timeout_seconds,
            "active": active && f.conn.is_some(),
            "connected": f.conn.is_some(),
            "registered_time": f.registered_time,
            "used_resources": used.to_json_summary(),
            "offered_resources": offered.to_json_summary(),
            "offers": f.offers.len(),
            "task_count": f.tasks.len(),
            "completed_task_count": f.completed_tasks.len(),
        });
        if with_tasks {
            out["tasks"] = f.tasks.values().map(|t| self.task_json(id, t)).collect();
            out["completed_tasks"] = f.completed_tasks.iter().map(|t| self.task_json(id, t)).collect();
        }
        out
    }

    fn task_json(&self, framework_id: &FrameworkId, t: &Task) -> Value {
        let usage = self
            .agents
            .get(&t.agent_id)
            .and_then(|a| a.usage.get(&(framework_id.to_string(), t.id.to_string())))
            .map(|u| json!({"cpu_seconds": u.cpu_seconds, "mem_rss_bytes": u.mem_rss_bytes}));
        let status = t.status.as_ref();
        json!({
            "id": t.id,
            "name": t.name(),
            "framework_id": framework_id,
            "agent_id": t.agent_id,
            "state": t.state.name(),
            "role": t.role,
            "resources": t.resources.to_json_summary(),
            "message": status.map(|s| s.message.clone()).unwrap_or_default(),
            "healthy": status.and_then(|s| s.healthy),
            "statuses": t.statuses.iter().map(|(s, ts)| json!({"state": s.name(), "timestamp": ts})).collect::<Vec<_>>(),
            "usage": usage,
        })
    }
}

impl Master {
    /// Sets the state gauges of the metrics from the state (just before a scrape encodes them).
    pub(crate) fn publish_metrics(&self) {
        use crate::metrics::{Labels, METRICS};
        METRICS.clear_state();
        let label = |key: &'static str, value: &str| -> Labels { vec![(key, value.to_string())] };
        for a in self.agents.values() {
            METRICS.agents.get_or_create(&label("state", a.state.name())).inc();
        }
        let mut resources: HashMap<(&'static str, String, String), f64> = HashMap::new();
        let mut add = |kind: &'static str, role: &str, r: &Resources| {
            for name in crate::allocator::DRF_RESOURCES {
                *resources.entry((kind, role.to_string(), name.to_string())).or_default() += r.get_scalar(name);
            }
        };
        for a in self.agents.values().filter(|a| matches!(a.state, AgentState::Registered | AgentState::Disconnected)) {
            add("total", "*", &a.total.unreserved());
            for role in a.total.reservation_roles() {
                add("total", role, &a.total.reserved_for(role));
            }
        }
        for f in self.frameworks.values() {
            let connection = if f.conn.is_some() { "connected" } else { "disconnected" };
            METRICS.frameworks.get_or_create(&label("connection", connection)).inc();
            for t in f.tasks.values().chain(f.completed_tasks.iter()) {
                METRICS.tasks.get_or_create(&label("state", t.state.name())).inc();
                if !t.state.is_terminal() {
                    add("used", &t.role, &t.resources);
                }
            }
        }
        for o in self.offers.values() {
            add("offered", &o.role, &o.resources);
        }
        for ((kind, role, resource), value) in resources {
            let labels: Labels = vec![("kind", kind.to_string()), ("role", role), ("resource", resource)];
            METRICS.resources.get_or_create(&labels).set(value);
        }
    }
}
