//! The DRF allocator: decides which framework is offered which agent's free resources.
//!
//! Pure and deterministic: no I/O, no clock (callers pass `now`), no randomness beyond a seeded shuffle. The master
//! turns each [`Allocation`] into an offer and tells the allocator when resources come back ([`Allocator::recover`]).
//!
//! Policy (hierarchical weighted DRF with quota, as in Mesos): a cycle visits the agents with free resources in
//! shuffled order, twice.
//! 1. *Quota stage*: roles whose quota guarantee is not met yet, lowest weighted dominant share first, are offered
//!    what they still lack of each guaranteed kind (an agent may be split between roles).
//! 2. *Fair stage*: every role below its limits, lowest weighted dominant share first, is offered what the agent
//!    has, capped at the role's limits and at what the unmet guarantees of other roles leave over (headroom).
//!
//! Within a role, frameworks go in order of their own dominant share; the first one that wants resources (active,
//! not suppressed for the role, not filtered for this agent) gets the role's part of the agent: unreserved
//! resources plus those reserved for the role.
//!
//! Invariant (checked by property tests): for every agent, `free + Σ allocations == total`. A resource is therefore
//! never offered twice at once: once allocated it is not free until recovered.
//!
//! Built for 10,000s of agents and 1,000s of frameworks and roles: agents, frameworks and roles live in slabs
//! indexed by dense slots; shares are kept in ordered sets updated on each change; a decline filter is one bit in a
//! per-agent bit set of the frameworks that declined the same resources, so finding the first unfiltered framework
//! never costs a lookup per filtered framework; and a cycle visits only the agents something happened to, unless
//! something cluster-wide changed (a framework came, revived or changed roles; a weight or quota changed).

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use corral_proto::{AgentId, FrameworkId, Resources};
use fixedbitset::FixedBitSet;
use smallvec::SmallVec;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rustc_hash::{FxHashMap, FxHashSet};

/// The scalar resources DRF compares shares over and quota can be set for.
pub const DRF_RESOURCES: [&str; 4] = ["cpus", "mem", "disk", "gpus"];

/// Smallest amounts worth offering (Mesos' `--min_allocatable_resources` default): 0.01 cpus or 32 MiB.
const MIN_CPUS_MILLI: i64 = 10;
const MIN_MEM_MILLI: i64 = 32_000;

/// A role's frameworks are scanned in share order this far; beyond it the unfiltered ones are found by bit set.
const SCAN_LIMIT: usize = 32;

/// Resources handed to one framework in one role on one agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub framework_id: FrameworkId,
    pub agent_id: AgentId,
    pub role: String,
    pub resources: Resources,
}

/// Why the allocator refused a call. These are caller bugs, races or bad operator input, never panics.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AllocatorError {
    #[error("agent {0} is already known to the allocator")]
    DuplicateAgent(AgentId),
    #[error("framework {0} is already known to the allocator")]
    DuplicateFramework(FrameworkId),
    #[error("weight for role {role:?} must be a positive finite number, got {weight}")]
    BadWeight { role: String, weight: f64 },
    #[error("quota for role {role:?}: {reason}")]
    BadQuota { role: String, reason: String },
}

/// A role's quota: it is offered its `guarantee` before roles beyond their guarantees get anything, and never
/// more than its `limit`. Both name unreserved scalars among [`DRF_RESOURCES`]; a kind the limit does not name is
/// unlimited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Quota {
    pub guarantee: Resources,
    pub limit: Resources,
}

impl Quota {
    /// Checks the quota's shape, naming what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        for (what, r) in [("guarantee", &self.guarantee), ("limit", &self.limit)] {
            let known: Resources = DRF_RESOURCES.iter().fold(Resources::new(), |acc, n| {
                acc.plus(&Resources::scalar(n, r.unreserved().get_scalar(n)))
            });
            if &known != r {
                return Err(format!("{what} {r} may only name unreserved {}", DRF_RESOURCES.join(", ")));
            }
        }
        for name in DRF_RESOURCES {
            let (g, l) = (self.guarantee.scalar_milli(name), self.limit.scalar_milli(name));
            if l > 0 && g > l {
                return Err(format!("guarantee of {name} ({}) exceeds its limit ({})", g as f64 / 1000.0, l as f64 / 1000.0));
            }
        }
        Ok(())
    }

    fn guarantee_scalars(&self) -> Scalars {
        scalars_of(&self.guarantee)
    }

    fn limit_scalars(&self) -> Scalars {
        DRF_RESOURCES.map(|n| match self.limit.scalar_milli(n) {
            0 => i64::MAX,
            v => v,
        })
    }
}

/// A totally ordered non-negative share (f64 bits order like the values for non-negative numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
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

/// Worth offering: at least 0.01 cpus or 32 MiB of memory.
fn is_allocatable(r: &Resources) -> bool {
    r.scalar_milli("cpus") >= MIN_CPUS_MILLI || r.scalar_milli("mem") >= MIN_MEM_MILLI
}

/// Entries addressed by dense slots; freed slots are reused.
#[derive(Debug)]
struct Slab<T> {
    entries: Vec<Option<T>>,
    free: Vec<usize>,
}

impl<T> Slab<T> {
    fn new() -> Self {
        Slab { entries: Vec::new(), free: Vec::new() }
    }
    fn insert(&mut self, value: T) -> usize {
        match self.free.pop() {
            Some(slot) => {
                self.entries[slot] = Some(value);
                slot
            }
            None => {
                self.entries.push(Some(value));
                self.entries.len() - 1
            }
        }
    }
    fn remove(&mut self, slot: usize) -> Option<T> {
        let value = self.entries.get_mut(slot)?.take();
        if value.is_some() {
            self.free.push(slot);
        }
        value
    }
    fn get(&self, slot: usize) -> Option<&T> {
        self.entries.get(slot).and_then(Option::as_ref)
    }
    fn get_mut(&mut self, slot: usize) -> Option<&mut T> {
        self.entries.get_mut(slot).and_then(Option::as_mut)
    }
    fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.entries.iter().enumerate().filter_map(|(i, e)| e.as_ref().map(|e| (i, e)))
    }
}

impl<T> std::ops::Index<usize> for Slab<T> {
    type Output = T;
    fn index(&self, slot: usize) -> &T {
        self.get(slot).expect("allocator slot refers to a live entry")
    }
}

impl<T> std::ops::IndexMut<usize> for Slab<T> {
    fn index_mut(&mut self, slot: usize) -> &mut T {
        self.get_mut(slot).expect("allocator slot refers to a live entry")
    }
}

/// Resources one framework holds in one role on an agent (offered or in use).
#[derive(Debug)]
struct Held {
    framework: usize,
    role: usize,
    resources: Resources,
}

/// Resources declined on an agent, and every framework whose decline filter names exactly these.
#[derive(Debug)]
struct Declined {
    resources: Resources,
    frameworks: FixedBitSet,
}

#[derive(Debug)]
struct AgentEntry {
    id: AgentId,
    total: Resources,
    free: Resources,
    held: Vec<Held>,
    active: bool,
    /// Active with allocatable free resources: only such agents are visited.
    candidate: bool,
    /// Queued for the next cycle.
    queued: bool,
    declined: Vec<Declined>,
}

impl AgentEntry {
    fn held_mut(&mut self, framework: usize, role: usize) -> Option<&mut Held> {
        self.held.iter_mut().find(|h| h.framework == framework && h.role == role)
    }
}

/// A framework's allocation and share in one role.
#[derive(Debug)]
struct Account {
    role: usize,
    allocated: Scalars,
    share: Share,
    /// Agents holding resources of this framework in this role.
    holds: u32,
}

#[derive(Debug)]
struct FrameworkEntry {
    id: FrameworkId,
    /// False for a placeholder: a framework whose tasks were reported (by a re-registering agent) before it
    /// subscribed. It holds resources but is offered nothing.
    subscribed: bool,
    roles: Vec<usize>,
    active: bool,
    suppressed: FxHashSet<usize>,
    /// Decline filters: agent slot → when the filter ends (`None`: never).
    filters: FxHashMap<usize, Option<Instant>>,
    accounts: Vec<Account>,
    /// Agent slots this framework holds resources on, with the number of roles it holds them in.
    agents: FxHashMap<usize, u32>,
    /// Tells this framework's filter expiries apart from those of an earlier framework in the same slot.
    serial: u64,
}

impl FrameworkEntry {
    fn account(&self, role: usize) -> Option<&Account> {
        self.accounts.iter().find(|a| a.role == role)
    }
    fn share_in(&self, role: usize) -> Share {
        self.account(role).map(|a| a.share).unwrap_or_default()
    }
    fn wants(&self, role: usize) -> bool {
        self.subscribed && self.active && self.roles.contains(&role) && !self.suppressed.contains(&role)
    }
}

#[derive(Debug)]
struct RoleEntry {
    name: String,
    weight: f64,
    guarantee: Scalars,
    limit: Scalars,
    allocated: Scalars,
    /// Weighted dominant share: the key of this role in the stage orders.
    share: Share,
    in_quota_order: bool,
    in_fair_order: bool,
    /// What the guarantee still lacks (counted in the allocator's headroom).
    unmet: Scalars,
    /// Subscribed frameworks ordered by their share within the role.
    frameworks: BTreeSet<(Share, usize)>,
    /// Subscribed frameworks that want offers now (active, not suppressed for the role).
    wanting: FixedBitSet,
    /// Subscribed frameworks plus held entries naming the role: the entry goes when nothing refers to it.
    refs: usize,
}

impl RoleEntry {
    fn at_limit(&self) -> bool {
        self.limit.iter().zip(&self.allocated).any(|(l, a)| *l != i64::MAX && a >= l)
    }
    fn has_unmet(&self) -> bool {
        self.unmet.iter().any(|v| *v > 0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    Quota,
    Fair,
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
    agents: Slab<AgentEntry>,
    agent_slots: FxHashMap<AgentId, usize>,
    frameworks: Slab<FrameworkEntry>,
    framework_slots: FxHashMap<FrameworkId, usize>,
    roles: Slab<RoleEntry>,
    role_slots: FxHashMap<String, usize>,
    weights: HashMap<String, f64>,
    quotas: HashMap<String, Quota>,
    /// Roles with unmet guarantees, and roles below their limits, by weighted dominant share.
    quota_order: BTreeSet<(Share, usize)>,
    fair_order: BTreeSet<(Share, usize)>,
    /// Cluster total, what no one holds, and what unmet guarantees still need of it.
    total: Scalars,
    unallocated: Scalars,
    headroom: Scalars,
    /// Shares are relative to the cluster total; after it changes they are recomputed before the next cycle.
    shares_stale: bool,
    /// Every candidate agent is visited next cycle; otherwise only the queued ones.
    all_queued: bool,
    queue: Vec<usize>,
    /// Decline filter ends: (until, agent slot, framework slot, framework serial). Stale entries are skipped.
    expiries: BinaryHeap<Reverse<(Instant, usize, usize, u64)>>,
    serials: u64,
    rng: rand::rngs::SmallRng,
}

impl Allocator {
    pub fn new(config: AllocatorConfig) -> Self {
        Allocator {
            agents: Slab::new(),
            agent_slots: FxHashMap::default(),
            frameworks: Slab::new(),
            framework_slots: FxHashMap::default(),
            roles: Slab::new(),
            role_slots: FxHashMap::default(),
            weights: HashMap::new(),
            quotas: HashMap::new(),
            quota_order: BTreeSet::new(),
            fair_order: BTreeSet::new(),
            total: [0; 4],
            unallocated: [0; 4],
            headroom: [0; 4],
            shares_stale: false,
            all_queued: false,
            queue: Vec::new(),
            expiries: BinaryHeap::new(),
            serials: 0,
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
        if self.agent_slots.contains_key(&id) {
            return Err(AllocatorError::DuplicateAgent(id));
        }
        let scalars = scalars_of(&total);
        add_scalars(&mut self.total, &scalars, 1);
        add_scalars(&mut self.unallocated, &scalars, 1);
        let slot = self.agents.insert(AgentEntry {
            id: id.clone(),
            free: total.clone(),
            total,
            held: Vec::new(),
            active: true,
            candidate: false,
            queued: false,
            declined: Vec::new(),
        });
        self.agent_slots.insert(id, slot);
        for (framework_id, role, resources) in used {
            let f = self.framework_slot_or_placeholder(&framework_id);
            let r = self.ensure_role(&role);
            self.allocate_on(slot, f, r, &resources);
        }
        self.shares_stale = true;
        self.refresh_candidate(slot);
        self.queue_agent(slot);
        Ok(())
    }

    /// Removes an agent and every allocation on it. Unknown agents are ignored.
    pub fn remove_agent(&mut self, id: &AgentId) {
        let Some(a) = self.agent_slots.remove(id) else { return };
        let held: Vec<(usize, usize, Resources)> =
            self.agents[a].held.iter().map(|h| (h.framework, h.role, h.resources.clone())).collect();
        for (f, r, resources) in held {
            self.give_back(a, f, r, &resources);
        }
        let agent = self.agents.remove(a).expect("agent slot is live");
        for set in &agent.declined {
            for f in set.frameworks.ones() {
                if let Some(fw) = self.frameworks.get_mut(f) {
                    fw.filters.remove(&a);
                }
            }
        }
        let scalars = scalars_of(&agent.total);
        add_scalars(&mut self.total, &scalars, -1);
        add_scalars(&mut self.unallocated, &scalars, -1);
        self.shares_stale = true;
        self.accounts_changed();
    }

    /// An inactive agent keeps its allocations but gets no new offers (e.g. while disconnected).
    pub fn set_agent_active(&mut self, id: &AgentId, active: bool) {
        if let Some(&a) = self.agent_slots.get(id) {
            self.agents[a].active = active;
            self.refresh_candidate(a);
            self.queue_agent(a);
        }
    }

    pub fn has_agent(&self, id: &AgentId) -> bool {
        self.agent_slots.contains_key(id)
    }

    // ----------------------------------------------------------------------------------------------------------
    // Frameworks and roles

    /// Adds a framework subscribed to `roles`. What its tasks already hold may have been reported before (by
    /// [`Allocator::add_agent`] or [`Allocator::track_used`]): call order does not matter.
    pub fn add_framework(&mut self, id: FrameworkId, roles: &[String], active: bool) -> Result<(), AllocatorError> {
        let f = match self.framework_slots.get(&id) {
            Some(&f) if self.frameworks[f].subscribed => return Err(AllocatorError::DuplicateFramework(id)),
            Some(&f) => f,
            None => self.insert_framework(id),
        };
        let fw = &mut self.frameworks[f];
        fw.subscribed = true;
        fw.active = active;
        self.update_framework_roles_at(f, roles);
        Ok(())
    }

    pub fn has_framework(&self, id: &FrameworkId) -> bool {
        self.framework_slots.get(id).is_some_and(|&f| self.frameworks[f].subscribed)
    }

    /// Changes the roles a framework is subscribed to. Allocations in a dropped role stay accounted to it until
    /// recovered.
    pub fn update_framework_roles(&mut self, id: &FrameworkId, roles: &[String]) {
        if let Some(&f) = self.framework_slots.get(id) {
            self.update_framework_roles_at(f, roles);
        }
    }

    fn update_framework_roles_at(&mut self, f: usize, roles: &[String]) {
        let new: Vec<usize> = roles.iter().map(|r| self.ensure_role(r)).collect();
        let old = std::mem::take(&mut self.frameworks[f].roles);
        for &r in old.iter().filter(|r| !new.contains(r)) {
            let share = self.frameworks[f].share_in(r);
            let role = &mut self.roles[r];
            role.frameworks.remove(&(share, f));
            unset(&mut role.wanting, f);
            role.refs -= 1;
            self.drop_account_if_empty(f, r);
            self.drop_role_if_unused(r);
        }
        for &r in new.iter().filter(|r| !old.contains(r)) {
                let share = self.account_mut(f, r).share;
            let role = &mut self.roles[r];
            role.frameworks.insert((share, f));
            role.refs += 1;
        }
        self.frameworks[f].roles = new;
        self.refresh_wanting(f);
        self.all_queued = true;
    }

    /// Removes a framework and recovers everything allocated to it.
    pub fn remove_framework(&mut self, id: &FrameworkId) {
        let Some(&f) = self.framework_slots.get(id) else { return };
        self.clear_filters(f);
        let agents: Vec<usize> = self.frameworks[f].agents.keys().copied().collect();
        for a in agents {
            let held: Vec<(usize, Resources)> = self.agents[a]
                .held
                .iter()
                .filter(|h| h.framework == f)
                .map(|h| (h.role, h.resources.clone()))
                .collect();
            for (r, resources) in held {
                self.give_back(a, f, r, &resources);
            }
        }
        self.update_framework_roles_at(f, &[]);
        self.frameworks.remove(f);
        self.framework_slots.remove(id);
    }

    /// An inactive framework keeps its allocations but gets no offers (e.g. while disconnected).
    pub fn set_framework_active(&mut self, id: &FrameworkId, active: bool) {
        if let Some(&f) = self.framework_slots.get(id) {
            self.frameworks[f].active = active;
            self.refresh_wanting(f);
            if active {
                self.all_queued = true;
            }
        }
    }

    /// Stops offers to the framework in `roles` (all its roles when empty).
    pub fn suppress(&mut self, id: &FrameworkId, roles: &[String]) {
        let Some(&f) = self.framework_slots.get(id) else { return };
        let slots: Vec<usize> = if roles.is_empty() {
            self.frameworks[f].roles.clone()
        } else {
            roles.iter().filter_map(|r| self.role_slots.get(r).copied()).collect()
        };
        self.frameworks[f].suppressed.extend(slots);
        self.refresh_wanting(f);
    }

    /// Resumes offers in `roles` (all when empty) and clears the framework's decline filters.
    pub fn revive(&mut self, id: &FrameworkId, roles: &[String]) {
        let Some(&f) = self.framework_slots.get(id) else { return };
        if roles.is_empty() {
            self.frameworks[f].suppressed.clear();
        } else {
            for r in roles.iter().filter_map(|r| self.role_slots.get(r)) {
                self.frameworks[f].suppressed.remove(r);
            }
        }
        self.clear_filters(f);
        self.refresh_wanting(f);
        self.all_queued = true;
    }

    /// Sets a role's weight (default 1). A role with weight 3 is entitled to three times the share of weight 1.
    pub fn set_weight(&mut self, role: &str, weight: f64) -> Result<(), AllocatorError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AllocatorError::BadWeight { role: role.to_string(), weight });
        }
        self.weights.insert(role.to_string(), weight);
        if let Some(&r) = self.role_slots.get(role) {
            self.roles[r].weight = weight;
            self.refresh_role(r);
        }
        self.all_queued = true;
        Ok(())
    }

    pub fn weight(&self, role: &str) -> f64 {
        self.weights.get(role).copied().unwrap_or(1.0)
    }

    /// Sets a role's quota; an empty quota removes it. Nothing changes when the quota is refused.
    pub fn set_quota(&mut self, role: &str, quota: Quota) -> Result<(), AllocatorError> {
        quota.validate().map_err(|reason| AllocatorError::BadQuota { role: role.to_string(), reason })?;
        if quota == Quota::default() {
            self.quotas.remove(role);
        } else {
            self.quotas.insert(role.to_string(), quota.clone());
        }
        let r = self.ensure_role(role);
        let entry = &mut self.roles[r];
        entry.guarantee = quota.guarantee_scalars();
        entry.limit = quota.limit_scalars();
        self.refresh_role(r);
        self.drop_role_if_unused(r);
        self.all_queued = true;
        Ok(())
    }

    /// A role's quota (empty when none is set).
    pub fn quota(&self, role: &str) -> Quota {
        self.quotas.get(role).cloned().unwrap_or_default()
    }

    // ----------------------------------------------------------------------------------------------------------
    // Allocations

    /// Marks resources as used by a framework outside of an offer (tasks found on a re-registering agent after the
    /// agent was added).
    pub fn track_used(&mut self, agent_id: &AgentId, framework_id: &FrameworkId, role: &str, resources: &Resources) {
        if let Some(&a) = self.agent_slots.get(agent_id) {
            let f = self.framework_slot_or_placeholder(framework_id);
            let r = self.ensure_role(role);
            self.allocate_on(a, f, r, resources);
            self.refresh_candidate(a);
        }
    }

    /// Converts allocated resources in place (RESERVE, UNRESERVE, CREATE, DESTROY): the agent's total and the
    /// framework's allocation change from `from` to `to` (same amounts), free resources do not.
    pub fn convert(&mut self, agent_id: &AgentId, framework_id: &FrameworkId, role: &str, from: &Resources, to: &Resources) {
        let (Some(&a), Some(&f), Some(&r)) =
            (self.agent_slots.get(agent_id), self.framework_slots.get(framework_id), self.role_slots.get(role))
        else {
            return;
        };
        let agent = &mut self.agents[a];
        let Some(held) = agent.held_mut(f, r) else { return };
        if !held.resources.contains(from) {
            return;
        }
        held.resources.subtract(from);
        held.resources.add(to);
        agent.total.subtract(from);
        agent.total.add(to);
        self.queue_agent(a);
    }

    /// Converts an agent's free resources in place (an operator's RESERVE or UNRESERVE): `from` leaves the free
    /// pool and the total, `to` (the same amounts) enters both. Does nothing unless `from` is free.
    pub fn convert_free(&mut self, agent_id: &AgentId, from: &Resources, to: &Resources) {
        let Some(&a) = self.agent_slots.get(agent_id) else { return };
        let agent = &mut self.agents[a];
        if !agent.free.contains(from) {
            return;
        }
        agent.free.subtract(from);
        agent.free.add(to);
        agent.total.subtract(from);
        agent.total.add(to);
        self.refresh_candidate(a);
        self.queue_agent(a);
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
        let (Some(&a), Some(&f), Some(&r)) =
            (self.agent_slots.get(agent_id), self.framework_slots.get(framework_id), self.role_slots.get(role))
        else {
            return;
        };
        let back = self.give_back(a, f, r, resources);
        if let Some((now, duration)) = refuse
            && !duration.is_zero()
            && !back.is_empty()
        {
            self.add_filter(a, f, back, now.checked_add(duration));
        }
    }

    /// One allocation cycle over the agents with free resources that something happened to since the last cycle
    /// (all of them after a cluster-wide change or an expired filter).
    pub fn allocate(&mut self, now: Instant) -> Vec<Allocation> {
        self.expire_filters(now);
        let mut agents: Vec<usize> = if self.all_queued {
            self.agents.iter().filter(|(_, a)| a.candidate).map(|(slot, _)| slot).collect()
        } else {
            self.queue.iter().copied().filter(|&a| self.agents.get(a).is_some_and(|a| a.candidate)).collect()
        };
        for a in self.queue.drain(..) {
            if let Some(agent) = self.agents.get_mut(a) {
                agent.queued = false;
            }
        }
        self.all_queued = false;
        if agents.is_empty() {
            return Vec::new();
        }
        if self.shares_stale {
            self.refresh_all_shares();
        }
        agents.sort_unstable();
        agents.dedup();
        agents.shuffle(&mut self.rng);
        let mut out = Vec::new();
        if !self.quota_order.is_empty() {
            for &a in &agents {
                self.allocate_agent(a, Stage::Quota, &mut out);
            }
        }
        for &a in &agents {
            self.allocate_agent(a, Stage::Fair, &mut out);
        }
        out
    }

    fn allocate_agent(&mut self, a: usize, stage: Stage, out: &mut Vec<Allocation>) {
        // Each pass hands one role its part of the agent; later passes find what other roles may still use.
        let mut done: Vec<usize> = Vec::new();
        loop {
            let agent = &self.agents[a];
            if !agent.active || !is_allocatable(&agent.free) {
                return;
            }
            let mut unreserved = agent.free.unreserved();
            let reserved: SmallVec<[usize; 4]> =
                agent.free.reservation_roles().iter().filter_map(|r| self.role_slots.get(*r).copied()).collect();
            let order = match stage {
                Stage::Quota => &self.quota_order,
                Stage::Fair => &self.fair_order,
            };
            let mut chosen = None;
            for &(_, r) in order {
                let role = &self.roles[r];
                if done.contains(&r) || role.wanting.is_clear() {
                    continue;
                }
                let offerable = if reserved.contains(&r) {
                    Cow::Owned(agent.free.allocatable_to(&role.name))
                } else if is_allocatable(&unreserved) {
                    Cow::Borrowed(&unreserved)
                } else {
                    continue;
                };
                let offerable = self.capped(r, stage, offerable);
                if !is_allocatable(&offerable) {
                    continue;
                }
                if let Some(f) = self.pick_framework(a, r, &offerable) {
                    // All the unreserved part is moved, not copied.
                    chosen = Some((f, r, matches!(offerable, Cow::Owned(_)).then(|| offerable.into_owned())));
                    break;
                }
            }
            let Some((f, r, resources)) = chosen else { return };
            let resources = resources.unwrap_or_else(|| std::mem::take(&mut unreserved));
            self.allocate_on(a, f, r, &resources);
            self.refresh_candidate(a);
            done.push(r);
            out.push(Allocation {
                framework_id: self.frameworks[f].id.clone(),
                agent_id: self.agents[a].id.clone(),
                role: self.roles[r].name.clone(),
                resources,
            });
        }
    }

    /// `offerable` cut to what role `r` may be given in `stage`: its unmet guarantee in the quota stage, and
    /// never beyond its limits or into the headroom other roles' unmet guarantees need.
    fn capped<'a>(&self, r: usize, stage: Stage, offerable: Cow<'a, Resources>) -> Cow<'a, Resources> {
        if self.quotas.is_empty() {
            return offerable;
        }
        let role = &self.roles[r];
        let mut out = offerable;
        for (k, name) in DRF_RESOURCES.iter().enumerate() {
            let room = role.limit[k].saturating_sub(role.allocated[k]).max(0);
            let slack = (self.unallocated[k] - self.headroom[k]).max(0);
            let cap = match stage {
                Stage::Quota if role.guarantee[k] > 0 => role.unmet[k],
                _ => role.unmet[k].saturating_add(slack),
            }
            .min(room);
            if out.scalar_milli(name) > cap {
                out = Cow::Owned(out.capped(name, cap));
            }
        }
        out
    }

    /// The framework of role `r` that gets `offerable` on agent `a`: the one with the lowest share in the role
    /// that wants offers and has no decline filter covering `offerable` here.
    fn pick_framework(&self, a: usize, r: usize, offerable: &Resources) -> Option<usize> {
        let role = &self.roles[r];
        let blocking: SmallVec<[&FixedBitSet; 4]> = self.agents[a]
            .declined
            .iter()
            .filter(|d| d.resources.contains(offerable))
            .map(|d| &d.frameworks)
            .collect();
        let open = |f: usize| role.wanting.contains(f) && !blocking.iter().any(|b| b.contains(f));
        // Usually one of the first frameworks in share order will do.
        for &(_, f) in role.frameworks.iter().take(SCAN_LIMIT) {
            if open(f) {
                return Some(f);
            }
        }
        if role.frameworks.len() <= SCAN_LIMIT {
            return None;
        }
        // Many are filtered here: take the least share among the rest, found word by word.
        let mut best: Option<(Share, usize)> = None;
        for (w, word) in role.wanting.as_slice().iter().enumerate() {
            let mut bits = blocking.iter().fold(*word, |bits, b| bits & !b.as_slice().get(w).copied().unwrap_or(0));
            while bits != 0 {
                let f = w * usize::BITS as usize + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let key = (self.frameworks[f].share_in(r), f);
                if best.is_none_or(|b| key < b) {
                    best = Some(key);
                }
            }
        }
        let chosen = best.map(|(_, f)| f);
        #[cfg(test)]
        {
            let naive = role.frameworks.iter().map(|(_, f)| *f).find(|f| open(*f));
            assert_eq!(chosen, naive, "bit set scan agrees with the share order");
        }
        chosen
    }

    /// Moves `resources` from the agent's free pool to the framework's allocation in the role.
    fn allocate_on(&mut self, a: usize, f: usize, r: usize, resources: &Resources) {
        let agent = &mut self.agents[a];
        agent.free.subtract(resources);
        let new_hold = match agent.held_mut(f, r) {
            Some(held) => {
                held.resources.add(resources);
                false
            }
            None => {
                agent.held.push(Held { framework: f, role: r, resources: resources.clone() });
                *self.frameworks[f].agents.entry(a).or_default() += 1;
                self.roles[r].refs += 1;
                true
            }
        };
        let scalars = scalars_of(resources);
        add_scalars(&mut self.unallocated, &scalars, -1);
        self.account(f, r, &scalars, 1);
        if new_hold {
            self.account_mut(f, r).holds += 1;
        }
    }

    /// Moves what the framework holds of `resources` in the role back to the agent's free pool; returns it.
    fn give_back(&mut self, a: usize, f: usize, r: usize, resources: &Resources) -> Resources {
        let agent = &mut self.agents[a];
        let Some(i) = agent.held.iter().position(|h| h.framework == f && h.role == r) else {
            return Resources::new();
        };
        // Never recover more than was allocated: a confused caller must not mint resources.
        let back = resources.intersection(&agent.held[i].resources);
        agent.held[i].resources.subtract(&back);
        let emptied = agent.held[i].resources.is_empty();
        if emptied {
            agent.held.swap_remove(i);
        }
        agent.free.add(&back);
        if emptied {
            let fw = &mut self.frameworks[f];
            if let Some(n) = fw.agents.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    fw.agents.remove(&a);
                }
            }
            self.roles[r].refs -= 1;
        }
        let scalars = scalars_of(&back);
        add_scalars(&mut self.unallocated, &scalars, 1);
        self.account(f, r, &scalars, -1);
        if emptied {
            self.account_mut(f, r).holds -= 1;
            self.drop_account_if_empty(f, r);
            self.drop_role_if_unused(r);
        }
        self.refresh_candidate(a);
        self.queue_agent(a);
        self.accounts_changed();
        back
    }

    /// Adds (`sign` 1) or removes (-1) scalars from the role's and the framework's accounts and re-sorts both.
    fn account(&mut self, f: usize, r: usize, delta: &Scalars, sign: i64) {
        add_scalars(&mut self.roles[r].allocated, delta, sign);
        let total = self.total;
        let acc = self.account_mut(f, r);
        add_scalars(&mut acc.allocated, delta, sign);
        let old = acc.share;
        acc.share = Share::of(dominant_share(&acc.allocated, &total));
        let new = acc.share;
        if old != new && self.frameworks[f].roles.contains(&r) {
            let role = &mut self.roles[r];
            role.frameworks.remove(&(old, f));
            role.frameworks.insert((new, f));
        }
        self.refresh_role(r);
    }

    fn account_mut(&mut self, f: usize, r: usize) -> &mut Account {
        let fw = &mut self.frameworks[f];
        let i = match fw.accounts.iter().position(|acc| acc.role == r) {
            Some(i) => i,
            None => {
                fw.accounts.push(Account { role: r, allocated: [0; 4], share: Share::default(), holds: 0 });
                fw.accounts.len() - 1
            }
        };
        &mut fw.accounts[i]
    }

    /// A framework keeps an account in each role it is subscribed to or holds resources in.
    fn drop_account_if_empty(&mut self, f: usize, r: usize) {
        let fw = &mut self.frameworks[f];
        if !fw.roles.contains(&r) {
            fw.accounts.retain(|acc| acc.role != r || acc.holds > 0);
        }
    }

    /// Something that quota decisions depend on changed (an allocation was given back): with quota in force any
    /// agent may now be offered to someone.
    fn accounts_changed(&mut self) {
        if !self.quotas.is_empty() {
            self.all_queued = true;
        }
    }

    // ----------------------------------------------------------------------------------------------------------
    // Decline filters

    fn add_filter(&mut self, a: usize, f: usize, resources: Resources, until: Option<Instant>) {
        self.remove_filter(a, f);
        let agent = &mut self.agents[a];
        let i = match agent.declined.iter().position(|d| d.resources == resources) {
            Some(i) => i,
            None => {
                agent.declined.push(Declined { resources, frameworks: FixedBitSet::new() });
                agent.declined.len() - 1
            }
        };
        agent.declined[i].frameworks.grow_and_insert(f);
        let fw = &mut self.frameworks[f];
        fw.filters.insert(a, until);
        if let Some(until) = until {
            self.expiries.push(Reverse((until, a, f, fw.serial)));
        }
    }

    fn remove_filter(&mut self, a: usize, f: usize) {
        if self.frameworks[f].filters.remove(&a).is_none() {
            return;
        }
        let agent = &mut self.agents[a];
        if let Some(i) = agent.declined.iter().position(|d| d.frameworks.contains(f)) {
            agent.declined[i].frameworks.set(f, false);
            if agent.declined[i].frameworks.is_clear() {
                agent.declined.swap_remove(i);
            }
        }
        self.queue_agent(a);
    }

    fn clear_filters(&mut self, f: usize) {
        let agents: Vec<usize> = self.frameworks[f].filters.keys().copied().collect();
        for a in agents {
            self.remove_filter(a, f);
        }
    }

    fn expire_filters(&mut self, now: Instant) {
        while let Some(&Reverse((until, a, f, serial))) = self.expiries.peek() {
            if until > now {
                break;
            }
            self.expiries.pop();
            let current = self.frameworks.get(f).is_some_and(|fw| fw.serial == serial && fw.filters.get(&a) == Some(&Some(until)));
            if current {
                self.remove_filter(a, f);
            }
        }
    }

    // ----------------------------------------------------------------------------------------------------------
    // Bookkeeping

    fn insert_framework(&mut self, id: FrameworkId) -> usize {
        self.serials += 1;
        let f = self.frameworks.insert(FrameworkEntry {
            id: id.clone(),
            subscribed: false,
            roles: Vec::new(),
            active: false,
            suppressed: FxHashSet::default(),
            filters: FxHashMap::default(),
            accounts: Vec::new(),
            agents: FxHashMap::default(),
            serial: self.serials,
        });
        self.framework_slots.insert(id, f);
        f
    }

    fn framework_slot_or_placeholder(&mut self, id: &FrameworkId) -> usize {
        match self.framework_slots.get(id) {
            Some(&f) => f,
            None => self.insert_framework(id.clone()),
        }
    }

    fn refresh_wanting(&mut self, f: usize) {
        let fw = &self.frameworks[f];
        let roles: Vec<(usize, bool)> = fw.roles.iter().map(|&r| (r, fw.wants(r))).collect();
        for (r, wants) in roles {
            let wanting = &mut self.roles[r].wanting;
            if wants {
                wanting.grow_and_insert(f);
            } else {
                unset(wanting, f);
            }
        }
    }

    fn refresh_candidate(&mut self, a: usize) {
        let agent = &mut self.agents[a];
        agent.candidate = agent.active && is_allocatable(&agent.free);
    }

    fn queue_agent(&mut self, a: usize) {
        let agent = &mut self.agents[a];
        if !agent.queued && !self.all_queued {
            agent.queued = true;
            self.queue.push(a);
        }
    }

    fn ensure_role(&mut self, name: &str) -> usize {
        if let Some(&r) = self.role_slots.get(name) {
            return r;
        }
        let quota = self.quotas.get(name).cloned().unwrap_or_default();
        let r = self.roles.insert(RoleEntry {
            name: name.to_string(),
            weight: self.weight(name),
            guarantee: quota.guarantee_scalars(),
            limit: quota.limit_scalars(),
            allocated: [0; 4],
            share: Share::default(),
            in_quota_order: false,
            in_fair_order: false,
            unmet: [0; 4],
            frameworks: BTreeSet::new(),
            wanting: FixedBitSet::new(),
            refs: 0,
        });
        self.role_slots.insert(name.to_string(), r);
        self.refresh_role(r);
        r
    }

    fn drop_role_if_unused(&mut self, r: usize) {
        let role = &self.roles[r];
        if role.refs > 0 || self.quotas.contains_key(&role.name) {
            return;
        }
        if role.in_quota_order {
            self.quota_order.remove(&(role.share, r));
        }
        if role.in_fair_order {
            self.fair_order.remove(&(role.share, r));
        }
        add_scalars(&mut self.headroom, &role.unmet, -1);
        self.role_slots.remove(&role.name);
        self.roles.remove(r);
    }

    /// Recomputes the role's share, unmet guarantee and its place in the stage orders.
    fn refresh_role(&mut self, r: usize) {
        let role = &mut self.roles[r];
        let share = Share::of(dominant_share(&role.allocated, &self.total) / role.weight);
        let mut unmet = [0; 4];
        for (k, u) in unmet.iter_mut().enumerate() {
            *u = (role.guarantee[k] - role.allocated[k]).max(0);
        }
        add_scalars(&mut self.headroom, &role.unmet, -1);
        add_scalars(&mut self.headroom, &unmet, 1);
        role.unmet = unmet;
        let (in_quota, in_fair) = (role.has_unmet(), !role.at_limit());
        for (order, was, is) in
            [(&mut self.quota_order, role.in_quota_order, in_quota), (&mut self.fair_order, role.in_fair_order, in_fair)]
        {
            if was && (!is || share != role.share) {
                order.remove(&(role.share, r));
            }
            if is && (!was || share != role.share) {
                order.insert((share, r));
            }
        }
        role.share = share;
        role.in_quota_order = in_quota;
        role.in_fair_order = in_fair;
    }

    /// The cluster total changed: every share is relative to it.
    fn refresh_all_shares(&mut self) {
        self.shares_stale = false;
        let total = self.total;
        let slots: Vec<usize> = self.frameworks.iter().map(|(f, _)| f).collect();
        for f in slots {
            let fw = &mut self.frameworks[f];
            for acc in &mut fw.accounts {
                let share = Share::of(dominant_share(&acc.allocated, &total));
                if share != acc.share && fw.roles.contains(&acc.role) {
                    let role = &mut self.roles[acc.role];
                    role.frameworks.remove(&(acc.share, f));
                    role.frameworks.insert((share, f));
                }
                acc.share = share;
            }
        }
        let roles: Vec<usize> = self.roles.iter().map(|(r, _)| r).collect();
        for r in roles {
            self.refresh_role(r);
        }
    }

    // ----------------------------------------------------------------------------------------------------------
    // Read-only views (for /state and tests)

    /// Free (neither offered nor used) resources on an agent.
    pub fn free(&self, agent_id: &AgentId) -> Option<&Resources> {
        self.agent_slots.get(agent_id).map(|&a| &self.agents[a].free)
    }

    /// A role's weighted dominant share.
    pub fn role_share(&self, role: &str) -> f64 {
        self.role_slots
            .get(role)
            .map(|&r| dominant_share(&self.roles[r].allocated, &self.total) / self.roles[r].weight)
            .unwrap_or(0.0)
    }

    /// What a role holds (offered or in use) of each of [`DRF_RESOURCES`].
    pub fn role_allocated(&self, role: &str) -> Resources {
        let allocated = self.role_slots.get(role).map(|&r| self.roles[r].allocated).unwrap_or([0; 4]);
        DRF_RESOURCES
            .iter()
            .zip(allocated)
            .fold(Resources::new(), |acc, (n, v)| acc.plus(&Resources::scalar(n, v as f64 / 1000.0)))
    }

    /// Roles known to the allocator (subscribed, holding resources, or with a quota).
    pub fn roles(&self) -> Vec<String> {
        let mut roles: Vec<String> = self.role_slots.keys().cloned().collect();
        roles.sort();
        roles
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let mut unallocated = [0i64; 4];
        for (_, a) in self.agents.iter() {
            let mut sum = a.free.clone();
            for h in &a.held {
                sum.add(&h.resources);
            }
            assert_eq!(sum, a.total, "agent {}: free + allocations != total", a.id);
            add_scalars(&mut unallocated, &scalars_of(&a.free), 1);
        }
        assert_eq!(unallocated, self.unallocated, "unallocated");
        let mut headroom = [0i64; 4];
        for (r, entry) in self.roles.iter() {
            let mut sum = [0i64; 4];
            for (_, a) in self.agents.iter() {
                for h in a.held.iter().filter(|h| h.role == r) {
                    add_scalars(&mut sum, &scalars_of(&h.resources), 1);
                }
            }
            assert_eq!(sum, entry.allocated, "role {} accounting", entry.name);
            add_scalars(&mut headroom, &entry.unmet, 1);
            for (share, f) in &entry.frameworks {
                assert_eq!(*share, self.frameworks[*f].share_in(r), "framework order in role {}", entry.name);
            }
        }
        assert_eq!(headroom, self.headroom, "headroom");
    }
}

/// Clears bit `i`, which may lie past the set's end (bit sets grow only when a bit is set).
fn unset(bits: &mut FixedBitSet, i: usize) {
    if i < bits.len() {
        bits.set(i, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

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
    fn a_framework_recovered_inactive_after_its_tasks_were_reported_keeps_them_accounted() {
        // As after a master restart: the agent re-registers with a task before its framework is recovered, and the
        // framework comes back disconnected (inactive) until it re-subscribes.
        let mut a = Allocator::new(AllocatorConfig::default());
        let now = Instant::now();
        a.add_agent(agent(1), res("cpus:4;mem:1024"), vec![]).unwrap();
        for n in 2..80 {
            a.add_framework(fw(n), &roles(&["*"]), true).unwrap();
        }
        a.track_used(&agent(1), &fw(1), "*", &res("cpus:1;mem:64"));
        a.add_framework(fw(1), &roles(&["*"]), false).unwrap();
        a.check_invariants();
        assert_eq!(a.role_allocated("*"), res("cpus:1;mem:64"));
        assert_eq!(a.free(&agent(1)), Some(&res("cpus:3;mem:960")));
        assert!(a.allocate(now).iter().all(|o| o.framework_id != fw(1)), "an inactive framework gets no offers");
        a.set_framework_active(&fw(1), true);
        a.check_invariants();
    }

    #[test]
    fn operator_reservations_convert_only_free_resources() {
        let mut a = one_agent_one_framework("cpus:4;mem:1024", "analytics");
        let now = Instant::now();
        a.convert_free(&agent(1), &res("cpus:2"), &res("cpus(analytics):2"));
        assert_eq!(a.free(&agent(1)), Some(&res("cpus:2;cpus(analytics):2;mem:1024")));
        let offers = a.allocate(now);
        assert_eq!(offers[0].resources, res("cpus:2;cpus(analytics):2;mem:1024"), "reserved and unreserved offered to the role");
        // Offered resources are not free: nothing converts.
        a.convert_free(&agent(1), &res("cpus(analytics):2"), &res("cpus:2"));
        assert_eq!(a.free(&agent(1)), Some(&Resources::new()));
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
        assert!(!a.all_queued && a.queue.is_empty());
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

    fn quota(guarantee: &str, limit: &str) -> Quota {
        Quota { guarantee: res(guarantee), limit: res(limit) }
    }

    /// Allocates, then every offer is used whole (kept allocated); returns cpus per role.
    fn cpus_by_role(a: &mut Allocator, now: Instant) -> HashMap<String, f64> {
        let mut out: HashMap<String, f64> = HashMap::new();
        for o in a.allocate(now) {
            *out.entry(o.role).or_default() += o.resources.get_scalar("cpus");
        }
        a.check_invariants();
        out
    }

    #[test]
    fn guarantees_are_met_first_even_by_splitting_an_agent() {
        // Mesos' LargeAndSmallQuota in miniature: agents of 2 cpus, a small role needs 1, a large one 3.
        let mut a = Allocator::new(AllocatorConfig::default());
        for i in 0..3 {
            a.add_agent(agent(i), res("cpus:2;mem:2048"), vec![]).unwrap();
        }
        a.set_quota("small", quota("cpus:1;mem:1024", "cpus:1;mem:1024")).unwrap();
        a.set_quota("large", quota("cpus:3;mem:3072", "cpus:3;mem:3072")).unwrap();
        for (i, role) in ["small", "large", "free"].iter().enumerate() {
            a.add_framework(fw(i), &roles(&[role]), true).unwrap();
        }
        let got = cpus_by_role(&mut a, Instant::now());
        assert_eq!((got["small"], got["large"], got["free"]), (1.0, 3.0, 2.0));
        assert_eq!(a.role_allocated("large"), res("cpus:3;mem:3072"));
    }

    #[test]
    fn limits_cap_offers_until_resources_come_back() {
        let mut a = Allocator::new(AllocatorConfig::default());
        let t0 = Instant::now();
        for i in 0..2 {
            a.add_agent(agent(i), res("cpus:2;mem:2048"), vec![]).unwrap();
        }
        a.set_quota("capped", quota("", "cpus:3")).unwrap();
        a.add_framework(fw(1), &roles(&["capped"]), true).unwrap();
        assert_eq!(cpus_by_role(&mut a, t0)["capped"], 3.0);
        assert!(a.allocate(t0).is_empty(), "at its limit");
        a.recover(&agent(0), &fw(1), "capped", &res("cpus:1"), None);
        let again = a.allocate(t0);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].resources.get_scalar("cpus"), 1.0);
        a.check_invariants();
    }

    #[test]
    fn unmet_guarantees_keep_their_headroom() {
        let mut a = Allocator::new(AllocatorConfig::default());
        let t0 = Instant::now();
        for i in 0..4 {
            a.add_agent(agent(i), res("cpus:2;mem:2048"), vec![]).unwrap();
        }
        a.set_quota("reserved-for-later", quota("cpus:5", "")).unwrap();
        a.add_framework(fw(1), &roles(&["greedy"]), true).unwrap();
        assert_eq!(cpus_by_role(&mut a, t0)["greedy"], 3.0, "8 cpus less the 5 guaranteed to another role");
        // The guaranteed role's framework arrives and gets its 5.
        a.add_framework(fw(2), &roles(&["reserved-for-later"]), true).unwrap();
        assert_eq!(cpus_by_role(&mut a, t0)["reserved-for-later"], 5.0);
        // Removing the quota lets nothing more go: the rest is held.
        a.set_quota("reserved-for-later", Quota::default()).unwrap();
        assert!(a.allocate(t0).is_empty());
        assert_eq!(a.quota("reserved-for-later"), Quota::default());
    }

    #[test]
    fn bad_quotas_are_refused_and_change_nothing() {
        let mut a = Allocator::new(AllocatorConfig::default());
        a.set_quota("r", quota("cpus:1", "cpus:2")).unwrap();
        for bad in [quota("cpus:3", "cpus:2"), quota("ports:[1-2]", ""), quota("cpus(r):1", ""), quota("foo:1", "")] {
            let err = a.set_quota("r", bad).unwrap_err();
            assert!(matches!(err, AllocatorError::BadQuota { .. }), "{err}");
        }
        assert_eq!(a.quota("r"), quota("cpus:1", "cpus:2"));
        a.check_invariants();
    }

    #[test]
    fn a_cycle_after_one_recovery_visits_only_that_agent() {
        let mut a = Allocator::new(AllocatorConfig::default());
        let t0 = Instant::now();
        for i in 0..3 {
            a.add_agent(agent(i), res("cpus:1;mem:128"), vec![]).unwrap();
        }
        a.add_framework(fw(1), &roles(&["*"]), true).unwrap();
        let offers = a.allocate(t0);
        assert_eq!(offers.len(), 3);
        let o = offers.iter().find(|o| o.agent_id == agent(1)).unwrap();
        a.recover(&o.agent_id, &o.framework_id, &o.role, &o.resources, None);
        assert!(!a.all_queued);
        assert_eq!(a.queue, vec![a.agent_slots[&agent(1)]]);
        assert_eq!(a.allocate(t0).len(), 1);
    }

    #[test]
    fn many_declining_frameworks_each_see_every_agent_once() {
        // More frameworks than the share-order scan covers: the bit set scan takes over (and is checked against
        // the plain share order inside the allocator in test builds).
        let mut a = Allocator::new(AllocatorConfig::default());
        let t0 = Instant::now();
        for i in 0..5 {
            a.add_agent(agent(i), res("cpus:2;mem:256"), vec![]).unwrap();
        }
        for f in 0..100 {
            a.add_framework(fw(f), &roles(&["*"]), true).unwrap();
        }
        let mut seen: HashSet<(AgentId, FrameworkId)> = HashSet::new();
        loop {
            let offers = a.allocate(t0);
            if offers.is_empty() {
                break;
            }
            for o in offers {
                assert!(seen.insert((o.agent_id.clone(), o.framework_id.clone())), "offered twice after a decline");
                a.recover(&o.agent_id, &o.framework_id, &o.role, &o.resources, Some((t0, Duration::from_secs(60))));
            }
        }
        assert_eq!(seen.len(), 500);
        a.revive(&fw(42), &[]);
        let offers = a.allocate(t0);
        assert_eq!(offers.len(), 5);
        assert!(offers.iter().all(|o| o.framework_id == fw(42)));
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
        AddFramework(usize, usize, bool),
        RemoveFramework(usize),
        Allocate,
        DeclineAll(u64),
        UseHalf,
        Revive(usize),
        ToggleAgent(usize),
        ToggleFramework(usize),
        /// A re-registering agent reports a task of a framework that may not be subscribed yet.
        Recovered(usize, usize),
        Quota(usize, u32, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..6usize, 1..8u32).prop_map(|(a, c)| Op::AddAgent(a, c)),
            (0..6usize).prop_map(Op::RemoveAgent),
            (0..40usize, 0..3usize, any::<bool>()).prop_map(|(f, r, active)| Op::AddFramework(f, r, active)),
            (0..40usize).prop_map(Op::RemoveFramework),
            Just(Op::Allocate),
            (0..3u64).prop_map(Op::DeclineAll),
            Just(Op::UseHalf),
            (0..40usize).prop_map(Op::Revive),
            (0..6usize).prop_map(Op::ToggleAgent),
            (0..40usize).prop_map(Op::ToggleFramework),
            (0..6usize, 0..40usize).prop_map(|(a, f)| Op::Recovered(a, f)),
            (0..3usize, 0..6u32, 0..8u32).prop_map(|(r, g, l)| Op::Quota(r, g, l)),
        ]
    }

    proptest! {
        /// Whatever happens, nothing is offered twice and free + allocations == total on every agent.
        #[test]
        fn never_offers_twice(ops in prop::collection::vec(op(), 1..120)) {
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
                    Op::AddFramework(f, r, active) => {
                        let _ = a.add_framework(fw(f), &roles(&[["*", "r1", "r2"][r]]), active);
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
                    Op::Quota(r, g, l) => {
                        let limit = if l == 0 { String::new() } else { format!("cpus:{}", g.max(l)) };
                        let guarantee = if g == 0 { String::new() } else { format!("cpus:{g}") };
                        a.set_quota(["*", "r1", "r2"][r], quota(&guarantee, &limit)).unwrap();
                    }
                    Op::ToggleAgent(i) => {
                        let active = a.agent_slots.get(&agent(i)).map(|&s| a.agents[s].active).unwrap_or(false);
                        a.set_agent_active(&agent(i), !active);
                    }
                    Op::ToggleFramework(f) => {
                        let active = a.framework_slots.get(&fw(f)).is_some_and(|&s| a.frameworks[s].active);
                        a.set_framework_active(&fw(f), !active);
                    }
                    Op::Recovered(i, f) => {
                        // Only what is free can be running there (an agent never reports more than it has).
                        let unit = res("cpus:0.5;mem:64");
                        if a.free(&agent(i)).is_some_and(|free| free.contains(&unit)) {
                            a.track_used(&agent(i), &fw(f), "*", &unit);
                        }
                    }
                }
                a.check_invariants();
            }
        }
    }
}
