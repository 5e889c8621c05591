//! Helpers to carve tasks out of offers and to build `TaskInfo`s.

use std::collections::HashMap;

use corral_proto::{ParseError, Resources, v1};

/// What is left of one offer while tasks are being placed on it.
#[derive(Debug, Clone)]
pub struct OfferPool {
    remaining: Resources,
    role: String,
}

impl OfferPool {
    /// Starts with everything the offer holds.
    pub fn new(offer: &v1::Offer) -> Result<OfferPool, ParseError> {
        Ok(OfferPool { remaining: Resources::from_proto(&offer.resources)?, role: offer.allocation_role.clone() })
    }

    /// Takes the persistent volume with this id out of the offer, if the offer holds it.
    pub fn take_volume(&mut self, persistence_id: &str) -> Option<Resources> {
        let (role, v, size) = self.remaining.volumes().into_iter().find(|(_, v, _)| v.persistence_id == persistence_id)?;
        let volume = Resources::volume(&role, &v.persistence_id, &v.container_path, size);
        self.remaining.subtract(&volume);
        Some(volume)
    }

    /// The role the offer's resources are allocated to.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// What is still free in the offer.
    pub fn remaining(&self) -> &Resources {
        &self.remaining
    }

    /// Takes `need` (written unreserved, e.g. `cpus:1;mem:128`) plus `ports` ports out of the offer. Resources
    /// reserved for the offer's role are used first, then unreserved ones. Returns the exact resources to put in
    /// the task, or `None` (and takes nothing) when the offer cannot hold it.
    pub fn take(&mut self, need: &Resources, ports: usize) -> Option<Resources> {
        let reserved = self.remaining.reserved_for(&self.role);
        let unreserved = self.remaining.unreserved();
        let mut out = Resources::new();
        for name in ["cpus", "mem", "disk", "gpus"] {
            let want = need.scalar_milli(name);
            if want == 0 {
                continue;
            }
            let from_reserved = want.min(reserved.scalar_milli(name));
            let from_unreserved = want - from_reserved;
            if from_unreserved > unreserved.scalar_milli(name) {
                return None;
            }
            if from_reserved > 0 {
                out.add(&Resources::scalar(name, from_reserved as f64 / 1000.0).with_role(Some(&self.role)));
            }
            if from_unreserved > 0 {
                out.add(&Resources::scalar(name, from_unreserved as f64 / 1000.0));
            }
        }
        if ports > 0 {
            let mut chosen = Vec::new();
            let mut role = None;
            for (candidate_role, pool) in [(Some(self.role.as_str()), &reserved), (None, &unreserved)] {
                let free: Vec<u64> = pool.ranges("ports").into_iter().flat_map(|(b, e)| b..=e).take(ports).collect();
                if free.len() == ports {
                    chosen = free;
                    role = candidate_role;
                    break;
                }
            }
            if chosen.len() != ports {
                return None;
            }
            let ranges: Vec<(u64, u64)> = chosen.iter().map(|p| (*p, *p)).collect();
            out.add(&Resources::ranges_of("ports", &ranges).with_role(role));
        }
        if !self.remaining.contains(&out) {
            return None;
        }
        self.remaining.subtract(&out);
        Some(out)
    }
}

/// Builders for the operations of an ACCEPT, applied in order.
pub mod ops {
    use corral_proto::{Resources, v1, v1::operation};

    fn op(o: operation::Operation) -> v1::Operation {
        v1::Operation { operation: Some(o) }
    }
    pub fn launch(tasks: Vec<v1::TaskInfo>) -> v1::Operation {
        op(operation::Operation::Launch(operation::Launch { task_infos: tasks }))
    }
    /// All tasks start, or none does.
    pub fn launch_group(tasks: Vec<v1::TaskInfo>) -> v1::Operation {
        op(operation::Operation::LaunchGroup(operation::LaunchGroup { task_infos: tasks }))
    }
    /// Reserves offered unreserved resources for the offer's role (`resources` written with that role).
    pub fn reserve(resources: &Resources) -> v1::Operation {
        op(operation::Operation::Reserve(operation::Reserve { resources: resources.to_proto() }))
    }
    pub fn unreserve(resources: &Resources) -> v1::Operation {
        op(operation::Operation::Unreserve(operation::Unreserve { resources: resources.to_proto() }))
    }
    /// Turns reserved disk into persistent volumes (see `Resources::volume`).
    pub fn create(volumes: &Resources) -> v1::Operation {
        op(operation::Operation::Create(operation::Create { volumes: volumes.to_proto() }))
    }
    /// Deletes persistent volumes and their data; the disk stays reserved.
    pub fn destroy(volumes: &Resources) -> v1::Operation {
        op(operation::Operation::Destroy(operation::Destroy { volumes: volumes.to_proto() }))
    }
}

/// Builds a `TaskInfo`.
#[derive(Debug, Clone)]
pub struct TaskBuilder {
    info: v1::TaskInfo,
}

impl TaskBuilder {
    /// A task with this id (unique within the framework); the name defaults to the id.
    pub fn new(task_id: impl Into<String>) -> Self {
        let task_id = task_id.into();
        TaskBuilder { info: v1::TaskInfo { name: task_id.clone(), task_id, ..Default::default() } }
    }

    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.info.name = name.into();
        self
    }

    /// Runs `command` under `/bin/sh -c`.
    pub fn shell(mut self, command: impl Into<String>) -> Self {
        let c = self.info.command.get_or_insert_with(Default::default);
        c.shell = true;
        c.value = command.into();
        self
    }

    /// Runs `program` with `args` directly, without a shell.
    pub fn exec(mut self, program: impl Into<String>, args: Vec<String>) -> Self {
        let c = self.info.command.get_or_insert_with(Default::default);
        c.shell = false;
        c.value = program.into();
        c.arguments = args;
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.info.command.get_or_insert_with(Default::default).environment.insert(key.into(), value.into());
        self
    }

    pub fn resources(mut self, resources: &Resources) -> Self {
        self.info.resources = resources.to_proto();
        self
    }

    /// Seconds between SIGTERM and SIGKILL when the task is killed.
    pub fn kill_grace_period(mut self, seconds: f64) -> Self {
        self.info.kill_grace_period_seconds = seconds;
        self
    }

    /// Has the agent check the task's health (see `v1::HealthCheck` for the rules and defaults).
    pub fn health_check(mut self, check: v1::HealthCheck) -> Self {
        self.info.health_check = Some(check);
        self
    }

    pub fn labels(mut self, labels: HashMap<String, String>) -> Self {
        self.info.labels = labels;
        self
    }

    pub fn build(self) -> v1::TaskInfo {
        self.info
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(res: &str, role: &str) -> v1::Offer {
        v1::Offer {
            id: "o1".into(),
            resources: Resources::parse(res).unwrap().to_proto(),
            allocation_role: role.into(),
            ..Default::default()
        }
    }

    #[test]
    fn takes_until_the_offer_is_used_up() {
        let mut pool = OfferPool::new(&offer("cpus:1;mem:256;ports:[31000-31002]", "*")).unwrap();
        let need = Resources::parse("cpus:0.4;mem:100").unwrap();
        let a = pool.take(&need, 2).unwrap();
        assert_eq!(a.ranges("ports"), vec![(31000, 31001)]);
        assert!(pool.take(&need, 2).is_none(), "only one port left");
        let b = pool.take(&need, 1).unwrap();
        assert_eq!(b.ranges("ports"), vec![(31002, 31002)]);
        assert!(pool.take(&need, 0).is_none(), "0.2 cpus left");
        assert_eq!(pool.remaining().get_scalar("cpus"), 0.2);
    }

    #[test]
    fn prefers_the_roles_reservation() {
        let mut pool = OfferPool::new(&offer("cpus:1;cpus(db):1;mem:256", "db")).unwrap();
        let got = pool.take(&Resources::parse("cpus:1.5;mem:64").unwrap(), 0).unwrap();
        assert_eq!(got, Resources::parse("cpus(db):1;cpus:0.5;mem:64").unwrap());
    }

    #[test]
    fn builder_sets_command_and_defaults() {
        let t = TaskBuilder::new("t1").shell("echo hi").env("A", "1").kill_grace_period(2.0).build();
        assert_eq!(t.name, "t1");
        let c = t.command.unwrap();
        assert!(c.shell);
        assert_eq!(c.environment["A"], "1");
        assert_eq!(t.kill_grace_period_seconds, 2.0);
    }
}
