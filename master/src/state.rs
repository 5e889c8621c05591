//! `/state`: the master's view as JSON, in the shape Mesos' `/state` made familiar (agents, frameworks with their
//! tasks, completed frameworks, roles, totals). Rendered inside the actor from its own state; read-only.

use corral_proto::{FrameworkId, Resources};
use serde_json::{Value, json};

use crate::master::{AgentState, Framework, Master, Task};

impl Master {
    pub(crate) fn state_json(&self) -> Value {
        let mut agents: Vec<_> = self.agents.iter().collect();
        agents.sort_by(|a, b| a.0.cmp(b.0));
        let mut total = Resources::new();
        let mut used = Resources::new();
        let mut offered = Resources::new();
        let agents_json: Vec<Value> = agents
            .into_iter()
            .map(|(id, a)| {
                let mut agent_used = Resources::new();
                for (fid, tid) in &a.tasks {
                    if let Some(t) = self.frameworks.get(fid).and_then(|f| f.tasks.get(tid))
                        && !t.state.is_terminal()
                    {
                        agent_used.add(&t.resources);
                    }
                }
                let mut agent_offered = Resources::new();
                for o in self.offers.values().filter(|o| &o.agent_id == id) {
                    agent_offered.add(&o.resources);
                }
                let live = matches!(a.state, AgentState::Registered | AgentState::Disconnected);
                if live {
                    total.add(&a.total);
                    used.add(&agent_used);
                    offered.add(&agent_offered);
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
                    "state": match a.state {
                        AgentState::Recovering => "RECOVERING",
                        AgentState::Registered => "REGISTERED",
                        AgentState::Disconnected => "DISCONNECTED",
                        AgentState::Unreachable => "UNREACHABLE",
                    },
                    "active": a.state == AgentState::Registered,
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
        let mut frameworks: Vec<_> = self.frameworks.iter().collect();
        frameworks.sort_by(|a, b| a.0.cmp(b.0));
        let frameworks_json: Vec<Value> = frameworks.into_iter().map(|(id, f)| self.framework_json(id, f, true)).collect();
        let mut free = total.clone();
        free.subtract(&used);
        free.subtract(&offered);
        let roles: Vec<Value> = self
            .allocator
            .roles()
            .into_iter()
            .map(|role| {
                let members: Vec<&str> = self
                    .frameworks
                    .iter()
                    .filter(|(_, f)| f.info.roles.contains(&role))
                    .map(|(id, _)| id.as_str())
                    .collect();
                let mut allocated = Resources::new();
                for f in self.frameworks.values() {
                    for t in f.tasks.values().filter(|t| t.role == role && !t.state.is_terminal()) {
                        allocated.add(&t.resources);
                    }
                }
                json!({
                    "name": role,
                    "weight": self.allocator.weight(&role),
                    "share": self.allocator.role_share(&role),
                    "frameworks": members,
                    "allocated": allocated.to_json_summary(),
                })
            })
            .collect();
        json!({
            "version": corral_proto::VERSION,
            "address": self.config.advertise,
            "leader": self.config.advertise,
            "is_leader": true,
            "start_time": self.start_time,
            "elected_time": self.start_time,
            "agents": agents_json,
            "frameworks": frameworks_json,
            "completed_frameworks": self.completed_frameworks,
            "roles": roles,
            "totals": {
                "total": total.to_json_summary(),
                "used": used.to_json_summary(),
                "offered": offered.to_json_summary(),
                "free": free.to_json_summary(),
            },
            "outstanding_offers": self.offers.len(),
        })
    }

    pub(crate) fn framework_json(&self, id: &FrameworkId, f: &Framework, active: bool) -> Value {
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
        json!({
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
            "tasks": f.tasks.values().map(|t| self.task_json(id, t)).collect::<Vec<_>>(),
            "completed_tasks": f.completed_tasks.iter().map(|t| self.task_json(id, t)).collect::<Vec<_>>(),
        })
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
