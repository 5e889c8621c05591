//! The DRF allocator: decides which framework is offered which agent's free resources.
//!
//! Pure and deterministic: no I/O, no clock (callers pass `now`), no randomness beyond a seeded shuffle. The master
//! turns each [`Allocation`] into an offer and tells the allocator when resources come back ([`Allocator::recover`]).
//!
//! Policy (hierarchical weighted DRF, as in Mesos): for each agent with free resources, roles are visited in order
//! of weighted dominant share (lowest first), and within a role its frameworks in order of their own dominant share.
//! The first framework that wants resources (active, not suppressed for the role, not filtered for this agent) gets
//! everything on the agent it may use: unreserved resources plus those reserved for the role.
//!
//! Invariant (checked by property tests): for every agent, `free + Σ allocations == total`. A resource is therefore
//! never offered twice at once: once allocated it is not free until recovered.
//!
//! Incremental: shares are kept in ordered sets updated on each change, and [`Allocator::allocate`] returns at once
//! when nothing changed since the last cycle and no decline filter has expired.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use corral_proto::{AgentId, FrameworkId, Resources};
use rand::SeedableRng;
use rand::seq::SliceRandom;

/// The scalar resources DRF compares shares over.
const DRF_RESOURCES: [&str; 4] = ["cpus", "mem", "disk", "gpus"];

/// Smallest amounts worth offering (Mesos' `--min_allocatable_resources` default): 0.01 cpus or 32 MiB.
const MIN_CPUS_MILLI: i64 = 10;
const MIN_MEM_MILLI: i64 = 32_000;

/// Resources handed to one framework in one role on one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub framework_id: FrameworkId,
    pub agent_id: AgentId,
    pub role: String,
    pub resources: Resources,
}

/// Why the allocator refused a call. These are caller bugs or races, never panics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AllocatorError {
    #[error("agent {0} is already known to the allocator")]
    DuplicateAgent(AgentId),
    #[error("framework {0} is already known to the allocator")]
    DuplicateFramework(FrameworkId),
    #[error("weight for role {role:?} must be a positive finite number, got {weight}")]
    BadWeight { role: String, weight: f64 },
}

/// A totally ordered non-negative share (f64 bits order like the values for non-negative numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Share(u64);

impl Share {
    fn of(value: f64) -> Share {
        Share(if value.is_finite() && value > 0.0 { value.to_bits() } else { 0 })
    }
}

/// Scalar totals in thousandths, indexed like [`DRF_RESOURCES`].
type Scalars = [i64; 4];

fn scalars_of(r: &Resources) -> Scalars {
    DRF_RESOURCES.map(|n| r.scalar_milli(n))
}

fn add_scalars(a: &mut Scalars, b: &Scalars, sign: i64) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += sign * y;
    }
}

fn dominant_share(allocated: &Scalars, total: &Scalars) -> f64 {
    allocated
        .iter()
        .zip(total)
        .filter(|(_, t)| **t > 0)
        .map(|(a, t)| *a as f64 / *t as f64)
        .fold(0.0, f64::max)
}

#[derive(Debug)]
struct AgentEntry {
    total: Resources,
    free: Resources,
    /// What is allocated (offered or in use) per (framework, role).
    allocations: HashMap<(FrameworkId, String), Resources>,
    active: bool,
}

#[derive(Debug)]
struct Filter {
    resources: Resources,
    until: Instant,
}

#[derive(Debug)]
struct FrameworkEntry {
    roles: Vec<String>,
    active: bool,
    suppressed: HashSet<String>,
    filters: HashMap<AgentId, Filter>,
    /// Allocated scalars per role (for the framework's share within the role).
    allocated: HashMap<String, Scalars>,
    /// Agents this framework holds allocations on.
    agents: HashSet<AgentId>,
}

#[derive(Debug)]
struct RoleEntry {
    weight: f64,
    allocated: Scalars,
    /// Frameworks subscribed to this role, ordered by their share within it.
    frameworks: BTreeSet<(Share, FrameworkId)>,
    shares: HashMap<FrameworkId, Share>,
}

impl RoleEntry {
    fn new(weight: f64) -> Self {
        RoleEntry { weight, allocated: [0; 4], frameworks: BTreeSet::new(), shares: HashMap::new() }
    }
}

/// Allocator settings.
#[derive(Debug, Clone)]
pub struct AllocatorConfig {
    /// Seed for the per-cycle agent shuffle (fairness across agents, reproducible in tests).
    pub seed: u64,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        AllocatorConfig { seed: 0x5eed }
    }
}

/// The allocator's whole state. See the module docs for the policy.
#[derive(Debug)]
pub struct Allocator {
    agents: HashMap<AgentId, AgentEntry>,
    frameworks: HashMap<FrameworkId, FrameworkEntry>,
    roles: HashMap<String, RoleEntry>,
    /// Roles in order of weighted dominant share.
    role_order: BTreeSet<(Share, String)>,
    role_shares: HashMap<String, Share>,
    weights: HashMap<String, f64>,
    total: Scalars,
    /// Active agents with allocatable free resources: the only ones a cycle visits.
    candidates: HashSet<AgentId>,
    /// Something changed since the last cycle.
    dirty: bool,
    /// The earliest time any decline filter expires (filters are only scanned from then on).
    next_expiry: Option<Instant>,
    rng: rand::rngs::SmallRng,
}

impl Allocator {
    pub fn new(config: AllocatorConfig) -> Self {
        Allocator {
            agents: HashMap::new(),
            frameworks: HashMap::new(),
            roles: HashMap::new(),
            role_order: BTreeSet::new(),
            role_shares: HashMap::new(),
            weights: HashMap::new(),
            total: [0; 4],
            candidates: HashSet::new(),
            dirty: false,
            next_expiry: None,
            rng: rand::rngs::SmallRng::seed_from_u64(config.seed),
        }
    }

    // ----------------------------------------------------------------------------------------------------------
    // Agents

    /// Adds an agent with its total resources and what its running tasks already use.
    pub fn add_agent(
        &mut self,
        id: AgentId,
        total: Resources,
        used: Vec<(FrameworkId, String, Resources)>,
    ) -> Result<(), AllocatorError> {
        if self.agents.contains_key(&id) {
            return Err(AllocatorError::DuplicateAgent(id));
        }
        add_scalars(&mut self.total, &scalars_of(&total), 1);
        self.agents.insert(
            id.clone(),
            AgentEntry { free: total.clone(), total, allocations: HashMap::new(), active: true },
        );
        for (framework_id, role, resources) in used {
            self.allocate_on(&id, &framework_id, &role, &resources);
        }
        self.refresh_all_shares();
        self.refresh_candidate(&id);
        self.dirty = true;
        Ok(())
    }

    /// Removes an agent and every allocation on it. Unknown agents are ignored.
    pub fn remove_agent(&mut self, id: &AgentId) {
        let Some(agent) = self.agents.remove(id) else { return };
        for ((framework_id, role), resources) in agent.allocations {
            self.account(&framework_id, &role, &scalars_of(&resources), -1);
            if let Some(f) = self.frameworks.get_mut(&framework_id) {
                f.agents.remove(id);
            }
        }
        for f in self.frameworks.values_mut() {
            f.filters.remove(id);
        }
        add_scalars(&mut self.total, &scalars_of(&agent.total), -1);
        self.candidates.remove(id);
        self.refresh_all_shares();
        self.dirty = true;
    }

    /// An inactive agent keeps its allocations but gets no new offers (e.g. while disconnected).
    pub fn set_agent_active(&mut self, id: &AgentId, active: bool) {
        if let Some(a) = self.agents.get_mut(id) {
            a.active = active;
            self.refresh_candidate(id);
            self.dirty = true;
        }
    }

    pub fn has_agent(&self, id: &AgentId) -> bool {
        self.agents.contains_key(id)
    }

    // ----------------------------------------------------------------------------------------------------------
    // Frameworks and roles

    /// Adds a framework subscribed to `roles`; `used` lists what its tasks already hold (allocated elsewhere via
    /// [`Allocator::add_agent`] is fine too: call order does not matter).
    pub fn add_framework(&mut self, id: FrameworkId, roles: &[String], active: bool) -> Result<(), AllocatorError> {
        if self.frameworks.contains_key(&id) {
            return Err(AllocatorError::DuplicateFramework(id));
        }
        self.frameworks.insert(
            id.clone(),
            FrameworkEntry {
                roles: Vec::new(),
                active,
                suppressed: HashSet::new(),
                filters: HashMap::new(),
                allocated: HashMap::new(),
                agents: HashSet::new(),
            },
        );
        self.update_framework_roles(&id, roles);
        self.dirty = true;
        Ok(())
    }

    pub fn has_framework(&self, id: &FrameworkId) -> bool {
        self.frameworks.contains_key(id)
    }

    /// Changes the roles a framework is subscribed to. Allocations in a dropped role stay accounted to it until
    /// recovered.
    pub fn update_framework_roles(&mut self, id: &FrameworkId, roles: &[String]) {
        let Some(f) = self.frameworks.get_mut(id) else { return };
        let old: Vec<String> = std::mem::replace(&mut f.roles, roles.to_vec());
        for role in old.iter().filter(|r| !roles.contains(r)) {
            if let Some(entry) = self.roles.get_mut(role)
                && let Some(share) = entry.shares.remove(id)
            {
                entry.frameworks.remove(&(share, id.clone()));
            }
            self.drop_role_if_unused(role);
        }
        for role in roles.iter().filter(|r| !old.contains(r)) {
            self.ensure_role(role);
            let share = self.framework_share(id, role);
            let entry = self.roles.get_mut(role).expect("role was just ensured");
            entry.frameworks.insert((share, id.clone()));
            entry.shares.insert(id.clone(), share);
        }
        self.dirty = true;
    }

    /// Removes a framework and recovers everything allocated to it.
    pub fn remove_framework(&mut self, id: &FrameworkId) {
        let Some(f) = self.frameworks.get(id) else { return };
        let agents: Vec<AgentId> = f.agents.iter().cloned().collect();
        for agent_id in agents {
            let keys: Vec<(FrameworkId, String)> = self.agents[&agent_id]
                .allocations
                .keys()
                .filter(|(fid, _)| fid == id)
                .cloned()
                .collect();
            for (fid, role) in keys {
                let resources = self.agents[&agent_id].allocations[&(fid.clone(), role.clone())].clone();
                self.recover(&agent_id, &fid, &role, &resources, None);
            }
        }
        self.update_framework_roles(id, &[]);
        self.frameworks.remove(id);
        self.dirty = true;
    }

    /// An inactive framework keeps its allocations but gets no offers (e.g. while disconnected).
    pub fn set_framework_active(&mut self, id: &FrameworkId, active: bool) {
        if let Some(f) = self.frameworks.get_mut(id) {
            f.active = active;
            self.dirty = true;
        }
    }

    /// Stops offers to the framework in `roles` (all its roles when empty).
    pub fn suppress(&mut self, id: &FrameworkId, roles: &[String]) {
        if let Some(f) = self.frameworks.get_mut(id) {
            let roles = if roles.is_empty() { f.roles.clone() } else { roles.to_vec() };
            f.suppressed.extend(roles);
        }
    }

    /// Resumes offers in `roles` (all when empty) and clears the framework's decline filters.
    pub fn revive(&mut self, id: &FrameworkId, roles: &[String]) {
        if let Some(f) = self.frameworks.get_mut(id) {
            if roles.is_empty() {
                f.suppressed.clear();
            } else {
                f.suppressed.retain(|r| !roles.contains(r));
            }
            f.filters.clear();
            self.dirty = true;
        }
    }

    /// Sets a role's weight (default 1). A role with weight 3 is entitled to three times the share of weight 1.
    pub fn set_weight(&mut self, role: &str, weight: f64) -> Result<(), AllocatorError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AllocatorError::BadWeight { role: role.to_string(), weight });
        }
        self.weights.insert(role.to_string(), weight);
        if let Some(entry) = self.roles.get_mut(role) {
            entry.weight = weight;
        }
        self.refresh_role_share(role);
        self.dirty = true;
        Ok(())
    }

    pub fn weight(&self, role: &str) -> f64 {
        self.weights.get(role).copied().unwrap_or(1.0)
    }

    // ----------------------------------------------------------------------------------------------------------
    // Allocations

    /// Marks resources as used by a framework outside of an offer (tasks found on a re-registering agent after the
    /// agent was added).
    pub fn track_used(&mut self, agent_id: &AgentId, framework_id: &FrameworkId, role: &str, resources: &Resources) {
        if self.agents.contains_key(agent_id) {
            self.allocate_on(agent_id, framework_id, role, resources);
            self.refresh_candidate(agent_id);
        }
    }

    /// Converts allocated resources in place (RESERVE, UNRESERVE, CREATE, DESTROY): the agent's total and the
    /// framework's allocation change from `from` to `to` (same amounts), free resources do not.
    pub fn convert(&mut self, agent_id: &AgentId, framework_id: &FrameworkId, role: &str, from: &Resources, to: &Resources) {
        let Some(agent) = self.agents.get_mut(agent_id) else { return };
        let Some(held) = agent.allocations.get_mut(&(framework_id.clone(), role.to_string())) else { return };
        if !held.contains(from) {
            return;
        }
        held.subtract(from);
        held.add(to);
        agent.total.subtract(from);
        agent.total.add(to);
        self.dirty = true;
    }

    /// Gives resources back: an offer declined, rescinded or partly used, or a task that ended. With `refuse`, the
    /// framework is not offered these resources (or a subset) on this agent again for that long.
    pub fn recover(
        &mut self,
        agent_id: &AgentId,
        framework_id: &FrameworkId,
        role: &str,
        resources: &Resources,
        refuse: Option<(Instant, Duration)>,
    ) {
        let Some(agent) = self.agents.get_mut(agent_id) else { return };
        let key = (framework_id.clone(), role.to_string());
        let Some(held) = agent.allocations.get_mut(&key) else { return };
        // Never recover more than was allocated: a confused caller must not mint resources.
        let back = resources.intersection(held);
        held.subtract(&back);
        if held.is_empty() {
            agent.allocations.remove(&key);
            if !agent.allocations.keys().any(|(f, _)| f == framework_id)
                && let Some(f) = self.frameworks.get_mut(framework_id)
            {
                f.agents.remove(agent_id);
            }
        }
        agent.free.add(&back);
        self.account(framework_id, role, &scalars_of(&back), -1);
        if let (Some((now, duration)), Some(f)) = (refuse, self.frameworks.get_mut(framework_id))
            && !duration.is_zero()
        {
            let until = now + duration;
            f.filters.insert(agent_id.clone(), Filter { resources: back, until });
            self.next_expiry = Some(self.next_expiry.map_or(until, |t| t.min(until)));
        }
        self.refresh_candidate(agent_id);
        self.dirty = true;
    }

    /// One allocation cycle over the agents with free resources. Returns at once (empty) when nothing changed
    /// since the last cycle and no filter has expired.
    pub fn allocate(&mut self, now: Instant) -> Vec<Allocation> {
        let expired = self.expire_filters(now);
        if !self.dirty && !expired {
            return Vec::new();
        }
        self.dirty = false;
        let mut agents: Vec<AgentId> = self.candidates.iter().cloned().collect();
        agents.sort_unstable();
        agents.shuffle(&mut self.rng);
        let mut out = Vec::new();
        for agent_id in agents {
            self.allocate_agent(&agent_id, now, &mut out);
        }
        out
    }

    fn allocate_agent(&mut self, agent_id: &AgentId, now: Instant, out: &mut Vec<Allocation>) {
        // Each pass hands one role the agent's free resources for that role; further passes can only find
        // resources reserved for other roles.
        let mut skip_roles: HashSet<String> = HashSet::new();
        loop {
            let Some(agent) = self.agents.get(agent_id) else { return };
            if !agent.active || !is_allocatable(&agent.free) {
                return;
            }
            // Most roles hold no reservation on this agent and may use exactly its unreserved resources.
            let unreserved = agent.free.unreserved();
            let reserved_roles = agent.free.reservation_roles();
            let mut chosen = None;
            for (_, role) in &self.role_order {
                if skip_roles.contains(role) {
                    continue;
                }
                let offerable = if reserved_roles.contains(&role.as_str()) {
                    agent.free.allocatable_to(role)
                } else if is_allocatable(&unreserved) {
                    unreserved.clone()
                } else {
                    continue;
                };
                if !is_allocatable(&offerable) {
                    continue;
                }
                let entry = &self.roles[role];
                let framework = entry.frameworks.iter().map(|(_, id)| id).find(|id| {
                    let f = &self.frameworks[*id];
                    f.active
                        && !f.suppressed.contains(role)
                        && !f
                            .filters
                            .get(agent_id)
                            .is_some_and(|filter| filter.until > now && filter.resources.contains(&offerable))
                });
                if let Some(framework_id) = framework {
                    chosen = Some((framework_id.clone(), role.clone(), offerable));
                    break;
                }
            }
            let Some((framework_id, role, resources)) = chosen else { return };
            self.allocate_on(agent_id, &framework_id, &role, &resources);
            skip_roles.insert(role.clone());
            out.push(Allocation { framework_id, agent_id: agent_id.clone(), role, resources });
            self.refresh_candidate(agent_id);
        }
    }

    fn allocate_on(&mut self, agent_id: &AgentId, framework_id: &FrameworkId, role: &str, resources: &Resources) {
        let Some(agent) = self.agents.get_mut(agent_id) else { return };
        agent.free.subtract(resources);
        agent
            .allocations
            .entry((framework_id.clone(), role.to_string()))
            .or_default()
            .add(resources);
        if let Some(f) = self.frameworks.get_mut(framework_id) {
            f.agents.insert(agent_id.clone());
        }
        self.ensure_role(role);
        self.account(framework_id, role, &scalars_of(resources), 1);
    }

    /// Adds (`sign` 1) or removes (-1) scalars from the role's and the framework's accounts and re-sorts both.
    fn account(&mut self, framework_id: &FrameworkId, role: &str, delta: &Scalars, sign: i64) {
        if let Some(entry) = self.roles.get_mut(role) {
            add_scalars(&mut entry.allocated, delta, sign);
        }
        if let Some(f) = self.frameworks.get_mut(framework_id) {
            let acc = f.allocated.entry(role.to_string()).or_insert([0; 4]);
            add_scalars(acc, delta, sign);
            if acc.iter().all(|v| *v <= 0) {
                f.allocated.remove(role);
            }
        }
        self.refresh_framework_share(framework_id, role);
        self.refresh_role_share(role);
        if sign < 0 {
            self.drop_role_if_unused(role);
        }
    }

    fn expire_filters(&mut self, now: Instant) -> bool {
        if self.next_expiry.is_none_or(|t| t > now) {
            return false;
        }
        let mut expired = false;
        let mut next: Option<Instant> = None;
        for f in self.frameworks.values_mut() {
            let before = f.filters.len();
            f.filters.retain(|_, filter| filter.until > now);
            expired |= f.filters.len() != before;
            if let Some(t) = f.filters.values().map(|x| x.until).min() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        self.next_expiry = next;
        expired
    }

    fn refresh_candidate(&mut self, agent_id: &AgentId) {
        match self.agents.get(agent_id) {
            Some(a) if a.active && is_allocatable(&a.free) => {
                self.candidates.insert(agent_id.clone());
            }
            _ => {
                self.candidates.remove(agent_id);
            }
        }
    }

    fn ensure_role(&mut self, role: &str) {
        if !self.roles.contains_key(role) {
            self.roles.insert(role.to_string(), RoleEntry::new(self.weight(role)));
            self.role_order.insert((Share::of(0.0), role.to_string()));
            self.role_shares.insert(role.to_string(), Share::of(0.0));
        }
    }

    fn drop_role_if_unused(&mut self, role: &str) {
        if let Some(entry) = self.roles.get(role)
            && entry.frameworks.is_empty()
            && entry.allocated.iter().all(|v| *v <= 0)
        {
            self.roles.remove(role);
            if let Some(share) = self.role_shares.remove(role) {
                self.role_order.remove(&(share, role.to_string()));
            }
        }
    }

    fn framework_share(&self, id: &FrameworkId, role: &str) -> Share {
        let allocated = self.frameworks.get(id).and_then(|f| f.allocated.get(role)).copied().unwrap_or([0; 4]);
        Share::of(dominant_share(&allocated, &self.total))
    }

    fn refresh_framework_share(&mut self, id: &FrameworkId, role: &str) {
        let share = self.framework_share(id, role);
        if let Some(entry) = self.roles.get_mut(role)
            && let Some(old) = entry.shares.get_mut(id)
            && *old != share
        {
            entry.frameworks.remove(&(*old, id.clone()));
            entry.frameworks.insert((share, id.clone()));
            *old = share;
        }
    }

    fn refresh_role_share(&mut self, role: &str) {
        let Some(entry) = self.roles.get(role) else { return };
        let share = Share::of(dominant_share(&entry.allocated, &self.total) / entry.weight);
        if let Some(old) = self.role_shares.get_mut(role)
            && *old != share
        {
            self.role_order.remove(&(*old, role.to_string()));
            self.role_order.insert((share, role.to_string()));
            *old = share;
        }
    }

    /// The cluster total changed: every share is relative to it.
    fn refresh_all_shares(&mut self) {
        let roles: Vec<String> = self.roles.keys().cloned().collect();
        for role in roles {
            let ids: Vec<FrameworkId> = self.roles[&role].shares.keys().cloned().collect();
            for id in ids {
                self.refresh_framework_share(&id, &role);
            }
            self.refresh_role_share(&role);
        }
    }

    // ----------------------------------------------------------------------------------------------------------
    // Read-only views (for /state and tests)

    /// Free (neither offered nor used) resources on an agent.
    pub fn free(&self, agent_id: &AgentId) -> Option<&Resources> {
        self.agents.get(agent_id).map(|a| &a.free)
    }

    /// A role's weighted dominant share.
    pub fn role_share(&self, role: &str) -> f64 {
        self.roles
            .get(role)
            .map(|e| dominant_share(&e.allocated, &self.total) / e.weight)
            .unwrap_or(0.0)
    }

    /// Roles known to the allocator (subscribed or holding resources).
    pub fn roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = self.roles.keys().cloned().collect();
        roles.sort();
        roles
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        for (id, a) in &self.agents {
            let mut sum = a.free.clone();
            for r in a.allocations.values() {
                sum.add(r);
            }
            assert_eq!(sum, a.total, "agent {id}: free + allocations != total");
        }
        for (role, entry) in &self.roles {
            let mut sum = [0i64; 4];
            for a in self.agents.values() {
                for ((_, r), res) in &a.allocations {
                    if r == role {
                        add_scalars(&mut sum, &scalars_of(res), 1);
                    }
                }
            }
            assert_eq!(sum, entry.allocated, "role {role} accounting");
        }
    }
}

/// Worth offering: at least 0.01 cpus or 32 MiB of memory.
fn is_allocatable(r: &Resources) -> bool {
    r.scalar_milli("cpus") >= MIN_CPUS_MILLI || r.scalar_milli("mem") >= MIN_MEM_MILLI
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn agent(n: usize) -> AgentId {
        AgentId::new(format!("agent-{n}")).unwrap()
    }
    fn fw(n: usize) -> FrameworkId {
        FrameworkId::new(format!("fw-{n}")).unwrap()
    }
    fn res(s: &str) -> Resources {
        Resources::parse(s).unwrap()
    }
    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }
    /// An allocator with agent-1 holding `resources` and fw-1 subscribed to `role`.
    fn one_agent_one_framework(resources: &str, role: &str) -> Allocator {
        let mut a = Allocator::new(AllocatorConfig::default());
        a.add_agent(agent(1), res(resources), vec![]).unwrap();
        a.add_framework(fw(1), &roles(&[role]), true).unwrap();
        a
    }

    #[test]
    fn offers_an_agent_to_the_only_framework_once() {
        let mut a = one_agent_one_framework("cpus:4;mem:1024", "*");
        let now = Instant::now();
        let offers = a.allocate(now);
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].resources, res("cpus:4;mem:1024"));
        assert!(a.allocate(now).is_empty(), "nothing is offered twice");
        a.add_framework(fw(2), &roles(&["*"]), true).unwrap();
        assert!(a.allocate(now).is_empty(), "a second framework gets nothing already offered");
        a.check_invariants();
    }

    #[test]
    fn lower_dominant_share_goes_first() {
        let mut a = Allocator::new(AllocatorConfig::default());
        let now = Instant::now();
        for i in 0..2 {
            a.add_agent(agent(i), res("cpus:4;mem:4096"), vec![]).unwrap();
        }
        a.add_framework(fw(1), &roles(&["a"]), true).unwrap();
        a.add_framework(fw(2), &roles(&["b"]), true).unwrap();
        // fw-1 already holds half the cluster's cpus.
        a.track_used(&agent(0), &fw(1), "a", &res("cpus:2"));
        let offers = a.allocate(now);
        let to_fw2: Vec<_> = offers.iter().filter(|o| o.framework_id == fw(2)).collect();
        assert!(!to_fw2.is_empty(), "the poorer framework is offered first");
        a.check_invariants();
    }

    /// Frameworks that take one unit per offer and give back the rest converge to their weighted DRF share.
    fn converge(weights: &[(&str, f64)], agents: usize, cpus_per_agent: u32) -> HashMap<String, u32> {
        let mut a = Allocator::new(AllocatorConfig::default());
        let now = Instant::now();
        for (role, w) in weights {
            a.set_weight(role, *w).unwrap();
        }
        for i in 0..agents {
            a.add_agent(agent(i), res(&format!("cpus:{cpus_per_agent};mem:{}", cpus_per_agent * 1024)), vec![])
                .unwrap();
        }
        for (i, (role, _)) in weights.iter().enumerate() {
            a.add_framework(fw(i), &roles(&[role]), true).unwrap();
        }
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..1000 {
            let offers = a.allocate(now);
            if offers.is_empty() {
                break;
            }
            for o in offers {
                let unit = res("cpus:1;mem:1024");
                if o.resources.contains(&unit) {
                    *counts.entry(o.role.clone()).or_default() += 1;
                    let rest = o.resources.minus(&unit);
                    a.recover(&o.agent_id, &o.framework_id, &o.role, &rest, None);
                } else {
                    a.recover(&o.agent_id, &o.framework_id, &o.role, &o.resources, Some((now, Duration::from_secs(60))));
                }
            }
            a.check_invariants();
        }
        counts
    }

    #[test]
    fn weights_one_and_three_share_one_to_three() {
        let counts = converge(&[("a", 1.0), ("b", 3.0)], 4, 4);
        assert_eq!(counts["a"] + counts["b"], 16);
        assert_eq!((counts["a"], counts["b"]), (4, 12));
    }

    #[test]
    fn equal_weights_share_equally() {
        let counts = converge(&[("a", 1.0), ("b", 1.0), ("c", 1.0)], 3, 4);
        assert_eq!((counts["a"], counts["b"], counts["c"]), (4, 4, 4));
    }

    #[test]
    fn decline_filter_holds_until_it_expires_or_revive() {
        let mut a = one_agent_one_framework("cpus:1;mem:128", "*");
        let t0 = Instant::now();
        let o = a.allocate(t0).pop().unwrap();
        a.recover(&o.agent_id, &o.framework_id, &o.role, &o.resources, Some((t0, Duration::from_secs(5))));
        assert!(a.allocate(t0 + Duration::from_secs(1)).is_empty());
        assert!(a.allocate(t0 + Duration::from_secs(4)).is_empty());
        assert_eq!(a.allocate(t0 + Duration::from_secs(5)).len(), 1, "filter expired");
        let o = a.allocate(t0).pop();
        assert!(o.is_none());
        // Decline again, then revive: offered at once.
        a.recover(&agent(1), &fw(1), "*", &res("cpus:1;mem:128"), Some((t0, Duration::from_secs(60))));
        assert!(a.allocate(t0).is_empty());
        a.revive(&fw(1), &[]);
        assert_eq!(a.allocate(t0).len(), 1);
        a.check_invariants();
    }

    #[test]
    fn filter_does_not_hide_more_resources_than_were_declined() {
        let mut a = one_agent_one_framework("cpus:2;mem:256", "*");
        let t0 = Instant::now();
        a.track_used(&agent(1), &fw(1), "*", &res("cpus:1;mem:128"));
        let o = a.allocate(t0).pop().unwrap();
        assert_eq!(o.resources, res("cpus:1;mem:128"));
        a.recover(&o.agent_id, &o.framework_id, &o.role, &o.resources, Some((t0, Duration::from_secs(60))));
        assert!(a.allocate(t0).is_empty());
        // The task ends: more is free than was declined, so the filter no longer applies.
        a.recover(&agent(1), &fw(1), "*", &res("cpus:1;mem:128"), None);
        assert_eq!(a.allocate(t0).pop().unwrap().resources, res("cpus:2;mem:256"));
    }

    #[test]
    fn suppressed_and_inactive_frameworks_get_nothing() {
        let mut a = one_agent_one_framework("cpus:1;mem:128", "*");
        let t0 = Instant::now();
        a.suppress(&fw(1), &[]);
        assert!(a.allocate(t0).is_empty());
        a.revive(&fw(1), &[]);
        a.set_framework_active(&fw(1), false);
        assert!(a.allocate(t0).is_empty());
        a.set_framework_active(&fw(1), true);
        assert_eq!(a.allocate(t0).len(), 1);
    }

    #[test]
    fn inactive_agents_are_not_offered_and_removal_frees_allocations() {
        let mut a = Allocator::new(AllocatorConfig::default());
        let t0 = Instant::now();
        a.add_agent(agent(1), res("cpus:1;mem:128"), vec![]).unwrap();
        a.set_agent_active(&agent(1), false);
        a.add_framework(fw(1), &roles(&["*"]), true).unwrap();
        assert!(a.allocate(t0).is_empty());
        a.set_agent_active(&agent(1), true);
        assert_eq!(a.allocate(t0).len(), 1);
        a.remove_agent(&agent(1));
        assert_eq!(a.role_share("*"), 0.0);
        assert!(a.free(&agent(1)).is_none());
        a.check_invariants();
    }

    #[test]
    fn reserved_resources_go_only_to_their_role() {
        let mut a = one_agent_one_framework("cpus:1;mem:128;cpus(store):2;mem(store):256", "web");
        let t0 = Instant::now();
        let offers = a.allocate(t0);
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].resources, res("cpus:1;mem:128"));
        a.add_framework(fw(2), &roles(&["store"]), true).unwrap();
        let offers = a.allocate(t0);
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].resources, res("cpus(store):2;mem(store):256"));
        a.check_invariants();
    }

    #[test]
    fn removing_a_framework_recovers_its_resources() {
        let mut a = one_agent_one_framework("cpus:1;mem:128", "*");
        let t0 = Instant::now();
        assert_eq!(a.allocate(t0).len(), 1);
        a.remove_framework(&fw(1));
        assert_eq!(a.free(&agent(1)).unwrap(), &res("cpus:1;mem:128"));
        a.add_framework(fw(2), &roles(&["*"]), true).unwrap();
        assert_eq!(a.allocate(t0)[0].framework_id, fw(2));
        a.check_invariants();
    }

    #[test]
    fn recovering_more_than_allocated_mints_nothing() {
        let mut a = one_agent_one_framework("cpus:1;mem:128", "*");
        a.track_used(&agent(1), &fw(1), "*", &res("cpus:0.5"));
        a.recover(&agent(1), &fw(1), "*", &res("cpus:5;mem:999"), None);
        assert_eq!(a.free(&agent(1)).unwrap(), &res("cpus:1;mem:128"));
        a.recover(&agent(9), &fw(9), "*", &res("cpus:5"), None);
        a.check_invariants();
    }

    #[test]
    fn unchanged_cluster_skips_the_cycle() {
        let mut a = one_agent_one_framework("cpus:1;mem:128", "*");
        let t0 = Instant::now();
        let o = a.allocate(t0).pop().unwrap();
        a.recover(&o.agent_id, &o.framework_id, &o.role, &o.resources, Some((t0, Duration::from_secs(5))));
        assert!(a.allocate(t0).is_empty());
        assert!(!a.dirty);
    }

    #[test]
    fn conversions_keep_the_books_balanced() {
        let mut a = one_agent_one_framework("cpus:2;mem:256;disk:100", "db");
        let t0 = Instant::now();
        let o = a.allocate(t0).pop().unwrap();
        let unreserved = res("cpus:1;disk:50");
        let reserved = unreserved.with_role(Some("db"));
        a.convert(&agent(1), &fw(1), "db", &unreserved, &reserved);
        let vol = Resources::volume("db", "v1", "data", 50.0);
        a.convert(&agent(1), &fw(1), "db", &res("disk(db):50"), &vol);
        a.check_invariants();
        let held = o.resources.minus(&unreserved).plus(&res("cpus(db):1")).plus(&vol);
        a.recover(&agent(1), &fw(1), "db", &held, None);
        assert_eq!(a.free(&agent(1)).unwrap(), &res("cpus:1;mem:256;disk:50;cpus(db):1").plus(&vol));
        // Reserved resources and the volume go only to the role.
        a.add_framework(fw(2), &roles(&["web"]), true).unwrap();
        a.suppress(&fw(1), &[]);
        let offers = a.allocate(t0);
        assert_eq!(offers.len(), 1);
        assert_eq!(offers[0].resources, res("cpus:1;mem:256;disk:50"));
        a.check_invariants();
    }

    #[test]
    fn bad_weights_are_refused() {
        let mut a = Allocator::new(AllocatorConfig::default());
        for w in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(a.set_weight("a", w).is_err());
        }
        assert_eq!(a.weight("a"), 1.0);
    }

    #[derive(Debug, Clone)]
    enum Op {
        AddAgent(usize, u32),
        RemoveAgent(usize),
        AddFramework(usize, usize),
        RemoveFramework(usize),
        Allocate,
        DeclineAll(u64),
        UseHalf,
        Revive(usize),
        ToggleAgent(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..6usize, 1..8u32).prop_map(|(a, c)| Op::AddAgent(a, c)),
            (0..6usize).prop_map(Op::RemoveAgent),
            (0..4usize, 0..3usize).prop_map(|(f, r)| Op::AddFramework(f, r)),
            (0..4usize).prop_map(Op::RemoveFramework),
            Just(Op::Allocate),
            (0..3u64).prop_map(Op::DeclineAll),
            Just(Op::UseHalf),
            (0..4usize).prop_map(Op::Revive),
            (0..6usize).prop_map(Op::ToggleAgent),
        ]
    }

    proptest! {
        /// Whatever happens, nothing is offered twice and free + allocations == total on every agent.
        #[test]
        fn never_offers_twice(ops in prop::collection::vec(op(), 1..80)) {
            let mut a = Allocator::new(AllocatorConfig::default());
            let t0 = Instant::now();
            let mut outstanding: Vec<Allocation> = Vec::new();
            for op in ops {
                match op {
                    Op::AddAgent(i, c) => {
                        let _ = a.add_agent(agent(i), res(&format!("cpus:{c};mem:{};cpus(r1):1", c * 256)), vec![]);
                    }
                    Op::RemoveAgent(i) => {
                        a.remove_agent(&agent(i));
                        outstanding.retain(|o| o.agent_id != agent(i));
                    }
                    Op::AddFramework(f, r) => {
                        let _ = a.add_framework(fw(f), &roles(&[["*", "r1", "r2"][r]]), true);
                    }
                    Op::RemoveFramework(f) => {
                        a.remove_framework(&fw(f));
                        outstanding.retain(|o| o.framework_id != fw(f));
                    }
                    Op::Allocate => {
                        let offers = a.allocate(t0);
                        for o in &offers {
                            for held in outstanding.iter().filter(|h| h.agent_id == o.agent_id) {
                                // Offered scalars on one agent never exceed its total.
                                prop_assert!(
                                    held.resources.get_scalar("cpus") + o.resources.get_scalar("cpus") <= 8.0 + 1.0
                                );
                            }
                        }
                        outstanding.extend(offers);
                    }
                    Op::DeclineAll(secs) => {
                        for o in outstanding.drain(..) {
                            a.recover(&o.agent_id, &o.framework_id, &o.role, &o.resources,
                                Some((t0, Duration::from_secs(secs))));
                        }
                    }
                    Op::UseHalf => {
                        for o in outstanding.iter_mut() {
                            let half = Resources::scalar("cpus", o.resources.unreserved().get_scalar("cpus") / 2.0);
                            let back = o.resources.minus(&half);
                            a.recover(&o.agent_id, &o.framework_id, &o.role, &back, None);
                            o.resources = o.resources.minus(&back);
                        }
                    }
                    Op::Revive(f) => a.revive(&fw(f), &[]),
                    Op::ToggleAgent(i) => {
                        let active = a.agents.get(&agent(i)).map(|x| x.active).unwrap_or(false);
                        a.set_agent_active(&agent(i), !active);
                    }
                }
                a.check_invariants();
            }
        }
    }
}
