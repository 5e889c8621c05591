//! Task isolation behind one trait, with backends picked at run time (like youki's `libcgroups`):
//! `none`, cgroup v1 (`v1.rs`) and cgroup v2 (`v2.rs`).
//!
//! The launcher calls [`Isolator::prepare`] before a task starts; the shim then joins the task to the returned
//! `cgroup.procs` files between fork and exec, so the task and everything it forks are confined before the task's
//! own code runs. After the task ends the agent asks [`Isolator::oom_killed`], then [`Isolator::cleanup`] kills
//! whatever is left in the cgroup and removes it.
//!
//! An isolator only ever touches `<cgroup-root>/<agent-id>/…`, the directories it created itself.

mod cgroupfs;
pub mod v1;
pub mod v2;

use std::path::{Path, PathBuf};

use corral_proto::Resources;

/// Why isolation failed, naming the file or setting involved.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("unknown isolation {0:?}; use cgroups or none")]
    Unknown(String),
    #[error("no usable cgroup hierarchy under {0}: neither cgroup v2 nor the v1 memory controller is mounted there")]
    NoHierarchy(PathBuf),
    #[error("cgroup v2 at {path} lacks the controllers {missing:?} (available: {available:?})")]
    MissingControllers { path: PathBuf, missing: Vec<String>, available: Vec<String> },
    #[error("cgroup root {path} is not writable: {source}")]
    NotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("processes were still running in {0} after being killed")]
    NotEmpty(PathBuf),
}

/// Limits derived from a task's resources.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub cpus: f64,
    pub mem_mib: f64,
    /// Hard-cap cpu time at `cpus` (CFS quota), not just weight it.
    pub cfs_quota: bool,
    pub max_pids: Option<u64>,
}

impl Limits {
    pub fn from_resources(r: &Resources, cfs_quota: bool, max_pids: Option<u64>) -> Limits {
        Limits { cpus: r.get_scalar("cpus"), mem_mib: r.get_scalar("mem"), cfs_quota, max_pids }
    }

    /// cgroup v1 `cpu.shares`: 1024 per cpu, at least 2 (Mesos' rule).
    pub fn cpu_shares(&self) -> u64 {
        ((self.cpus * 1024.0) as u64).max(2)
    }

    /// CFS quota in µs per 100 ms period (at least 1 ms).
    pub fn cfs_quota_us(&self) -> u64 {
        ((self.cpus * CFS_PERIOD_US as f64) as u64).max(1000)
    }

    pub fn mem_bytes(&self) -> u64 {
        (self.mem_mib * 1024.0 * 1024.0) as u64
    }
}

pub const CFS_PERIOD_US: u64 = 100_000;

/// Resource usage of a task's cgroup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    pub cpu_seconds: f64,
    pub mem_bytes: u64,
}

/// Per-task isolation. `task` is the task's path below the cgroup root: `<agent-id>/<framework-id>+<task-id>`.
pub trait Isolator: Send + Sync {
    /// The name shown in `/state`.
    fn name(&self) -> &'static str;
    /// Creates the task's cgroup(s) with its limits; returns the `cgroup.procs` files the task must join.
    fn prepare(&self, task: &str, limits: &Limits) -> Result<Vec<PathBuf>, IsolationError>;
    /// Whether the kernel OOM-killed a process of the task (ask before `cleanup`).
    fn oom_killed(&self, task: &str) -> bool;
    /// CPU time and memory in use, while the cgroup exists.
    fn usage(&self, task: &str) -> Option<Usage>;
    /// Kills everything still in the task's cgroup and removes it. Idempotent; touches nothing else.
    fn cleanup(&self, task: &str) -> Result<(), IsolationError>;
    /// Removes the agent's own (empty) cgroup directory when the agent is decommissioned. The shared root stays:
    /// an operator or another agent may have made it.
    fn release(&self, _agent_id: &str) {}
    /// Removes the (empty) root itself; only for a caller that created it (`check-isolation`).
    fn remove_root(&self) {}
}

/// No isolation: tasks are ordinary processes in their own process group.
pub struct NoIsolation;

impl Isolator for NoIsolation {
    fn name(&self) -> &'static str {
        "none"
    }
    fn prepare(&self, _task: &str, _limits: &Limits) -> Result<Vec<PathBuf>, IsolationError> {
        Ok(Vec::new())
    }
    fn oom_killed(&self, _task: &str) -> bool {
        false
    }
    fn usage(&self, _task: &str) -> Option<Usage> {
        None
    }
    fn cleanup(&self, _task: &str) -> Result<(), IsolationError> {
        Ok(())
    }
}

/// `--isolation` settings.
#[derive(Debug, Clone)]
pub struct IsolationConfig {
    /// `cgroups` or `none`.
    pub kind: String,
    /// Where cgroup file systems are mounted (normally `/sys/fs/cgroup`).
    pub hierarchy: PathBuf,
    /// Name of corral's cgroup below each hierarchy.
    pub root: String,
}

/// Builds the isolator: for `cgroups`, cgroup v2 when `hierarchy` is a cgroup2 mount, else v1.
pub fn build(config: &IsolationConfig) -> Result<Box<dyn Isolator>, IsolationError> {
    match config.kind.as_str() {
        "none" => Ok(Box::new(NoIsolation)),
        "cgroups" => {
            if cgroupfs::is_cgroup2(&config.hierarchy) {
                Ok(Box::new(v2::CgroupV2::new(&config.hierarchy, &config.root, v2::REQUIRED)?))
            } else if config.hierarchy.join("memory").is_dir() {
                Ok(Box::new(v1::CgroupV1::new(&config.hierarchy, &config.root)?))
            } else {
                Err(IsolationError::NoHierarchy(config.hierarchy.clone()))
            }
        }
        other => Err(IsolationError::Unknown(other.to_string())),
    }
}

/// The cgroup path of a task below the root: `<agent-id>/<task-id>`, or, when `taken` says another framework's task
/// on this agent already holds that name, `<agent-id>/<task-id>+<framework-id>` ('+' never appears in ids).
pub fn task_path(agent_id: &str, framework_id: &str, task_id: &str, taken: impl Fn(&str) -> bool) -> String {
    let plain = format!("{agent_id}/{task_id}");
    if taken(&plain) { format!("{plain}+{framework_id}") } else { plain }
}

fn check_rel(task: &str) -> &Path {
    // Task paths are built from validated ids; refuse anything that could climb out of the root.
    debug_assert!(!task.split('/').any(|c| c == ".." || c.is_empty()), "bad cgroup path {task:?}");
    Path::new(task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_from_resources() {
        let l = Limits::from_resources(&Resources::parse("cpus:1.5;mem:64").unwrap(), true, Some(10));
        assert_eq!(l.cpu_shares(), 1536);
        assert_eq!(l.cfs_quota_us(), 150_000);
        assert_eq!(l.mem_bytes(), 64 * 1024 * 1024);
        let tiny = Limits::from_resources(&Resources::parse("cpus:0.001;mem:1").unwrap(), true, None);
        assert_eq!((tiny.cpu_shares(), tiny.cfs_quota_us()), (2, 1000));
    }

    #[test]
    fn task_paths_follow_the_documented_layout_and_never_collide() {
        assert_eq!(task_path("a1", "fw1", "web", |_| false), "a1/web");
        assert_eq!(task_path("a1", "fw2", "web", |p| p == "a1/web"), "a1/web+fw2");
    }

    #[test]
    fn unknown_isolation_and_missing_hierarchy_are_errors() {
        let cfg = |kind: &str, h: &str| IsolationConfig { kind: kind.into(), hierarchy: h.into(), root: "corral".into() };
        assert!(build(&cfg("vm", "/sys/fs/cgroup")).err().unwrap().to_string().contains("\"vm\""));
        let dir = tempfile::tempdir().unwrap();
        let err = build(&cfg("cgroups", dir.path().to_str().unwrap())).err().unwrap().to_string();
        assert!(err.contains("no usable cgroup hierarchy"), "{err}");
        assert_eq!(build(&cfg("none", "/nonexistent")).unwrap().name(), "none");
    }
}
