//! cgroup v2: one directory in the unified hierarchy (`<mount>/<root>/<task>`), with the cpu, memory and pids
//! controllers enabled in every ancestor's `cgroup.subtree_control`.
//! cpu: `cpu.weight` (converted from shares as runc does) and `cpu.max`; memory: `memory.max` and
//! `memory.swap.max = 0`; pids: `pids.max`; kill: `cgroup.kill` (5.14+), else freeze, SIGKILL all, thaw.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cgroupfs::{self, keyed};
use super::{CFS_PERIOD_US, IsolationError, Isolator, Limits, Usage, check_rel};

/// Controllers a production agent needs.
pub const REQUIRED: &[&str] = &["cpu", "memory", "pids"];

pub struct CgroupV2 {
    /// `<mount>/<root>`.
    base: PathBuf,
    /// Controllers enabled for tasks.
    controllers: Vec<String>,
}

/// runc's conversion of v1 `cpu.shares` (2..=262144) to v2 `cpu.weight` (1..=10000).
pub fn shares_to_weight(shares: u64) -> u64 {
    let shares = shares.clamp(2, 262_144);
    1 + ((shares - 2) * 9999) / 262_142
}

impl CgroupV2 {
    /// Uses the cgroup2 file system mounted at `mount`; fails when one of `required` is not available there.
    pub fn new(mount: &Path, root: &str, required: &[&str]) -> Result<CgroupV2, IsolationError> {
        let available: Vec<String> = cgroupfs::read(&mount.join("cgroup.controllers"))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect();
        let missing: Vec<String> =
            required.iter().filter(|c| !available.iter().any(|a| a == *c)).map(|c| c.to_string()).collect();
        if !missing.is_empty() {
            return Err(IsolationError::MissingControllers { path: mount.to_path_buf(), missing, available });
        }
        let base = mount.join(root);
        cgroupfs::check_writable(&base)?;
        let controllers: Vec<String> = required.iter().map(|c| c.to_string()).collect();
        let isolator = CgroupV2 { base, controllers };
        isolator.enable(mount)?;
        isolator.enable(&isolator.base)?;
        Ok(isolator)
    }

    /// Lets the children of `dir` use our controllers.
    fn enable(&self, dir: &Path) -> Result<(), IsolationError> {
        if self.controllers.is_empty() {
            return Ok(());
        }
        let value: Vec<String> = self.controllers.iter().map(|c| format!("+{c}")).collect();
        cgroupfs::write(&dir.join("cgroup.subtree_control"), &value.join(" "))
    }

    fn dir(&self, task: &str) -> PathBuf {
        self.base.join(check_rel(task))
    }

    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }

    fn apply(&self, dir: &Path, limits: &Limits) -> Result<(), IsolationError> {
        if self.has("cpu") {
            cgroupfs::write(&dir.join("cpu.weight"), &shares_to_weight(limits.cpu_shares()).to_string())?;
            let max = if limits.cfs_quota { limits.cfs_quota_us().to_string() } else { "max".to_string() };
            cgroupfs::write(&dir.join("cpu.max"), &format!("{max} {CFS_PERIOD_US}"))?;
        }
        if self.has("memory") {
            cgroupfs::write(&dir.join("memory.max"), &limits.mem_bytes().to_string())?;
            let swap = dir.join("memory.swap.max");
            if swap.exists() {
                cgroupfs::write(&swap, "0")?;
            }
        }
        if self.has("pids") {
            let max = limits.max_pids.map(|m| m.to_string()).unwrap_or_else(|| "max".into());
            cgroupfs::write(&dir.join("pids.max"), &max)?;
        }
        Ok(())
    }
}

impl Isolator for CgroupV2 {
    fn name(&self) -> &'static str {
        "cgroups-v2"
    }

    fn prepare(&self, task: &str, limits: &Limits) -> Result<Vec<PathBuf>, IsolationError> {
        let dir = self.dir(task);
        // Every ancestor from the root to the task's parent must delegate the controllers to its children (the
        // root too: another agent may have removed and recreated it).
        cgroupfs::create_dir(&self.base)?;
        self.enable(&self.base)?;
        let mut ancestor = self.base.clone();
        for part in Path::new(task).parent().into_iter().flat_map(|p| p.components()) {
            ancestor.push(part);
            cgroupfs::create_dir(&ancestor)?;
            self.enable(&ancestor)?;
        }
        cgroupfs::create_dir(&dir)?;
        if let Err(e) = self.apply(&dir, limits) {
            let _ = self.cleanup(task);
            return Err(e);
        }
        Ok(vec![dir.join("cgroup.procs")])
    }

    fn oom_killed(&self, task: &str) -> bool {
        cgroupfs::read(&self.dir(task).join("memory.events"))
            .and_then(|t| keyed(&t, "oom_kill"))
            .is_some_and(|n| n > 0)
    }

    fn usage(&self, task: &str) -> Option<Usage> {
        let dir = self.dir(task);
        let usec = keyed(&cgroupfs::read(&dir.join("cpu.stat"))?, "usage_usec")?;
        let mem = cgroupfs::read(&dir.join("memory.current")).and_then(|t| t.trim().parse().ok()).unwrap_or(0);
        Some(Usage { cpu_seconds: usec as f64 / 1e6, mem_bytes: mem })
    }

    fn cleanup(&self, task: &str) -> Result<(), IsolationError> {
        let dir = self.dir(task);
        if !dir.is_dir() {
            return Ok(());
        }
        let kill = dir.join("cgroup.kill");
        if kill.exists() {
            cgroupfs::write(&kill, "1")?;
        } else {
            cgroupfs::write(&dir.join("cgroup.freeze"), "1")?;
            cgroupfs::kill_procs(&dir);
            cgroupfs::write(&dir.join("cgroup.freeze"), "0")?;
        }
        let waited = cgroupfs::wait_empty(std::slice::from_ref(&dir), Duration::from_secs(5));
        cgroupfs::remove_dir(&dir)?;
        waited
    }

    fn release(&self, agent_id: &str) {
        let _ = std::fs::remove_dir(self.dir(agent_id));
    }

    fn remove_root(&self) {
        let _ = std::fs::remove_dir(&self.base);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake cgroupfs: a plain directory with the files a v2 mount offers.
    fn fake_mount() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpuset cpu io memory hugetlb pids rdma misc\n").unwrap();
        dir
    }

    fn read(p: PathBuf) -> String {
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn weight_conversion_matches_runc() {
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(0), 1);
    }

    #[test]
    fn writes_exactly_the_limit_files() {
        let mount = fake_mount();
        let iso = CgroupV2::new(mount.path(), "corral", REQUIRED).unwrap();
        assert_eq!(read(mount.path().join("cgroup.subtree_control")), "+cpu +memory +pids");
        let limits = Limits { cpus: 1.5, mem_mib: 64.0, cfs_quota: true, max_pids: Some(20) };
        let procs = iso.prepare("agent-1/fw+task", &limits).unwrap();
        let task = mount.path().join("corral/agent-1/fw+task");
        assert_eq!(procs, vec![task.join("cgroup.procs")]);
        assert_eq!(read(mount.path().join("corral/cgroup.subtree_control")), "+cpu +memory +pids");
        assert_eq!(read(mount.path().join("corral/agent-1/cgroup.subtree_control")), "+cpu +memory +pids");
        assert_eq!(read(task.join("cpu.weight")), "59");
        assert_eq!(read(task.join("cpu.max")), "150000 100000");
        assert_eq!(read(task.join("memory.max")), (64 * 1024 * 1024).to_string());
        assert_eq!(read(task.join("pids.max")), "20");
        let mut files: Vec<String> =
            std::fs::read_dir(&task).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        files.sort();
        assert_eq!(files, ["cpu.max", "cpu.weight", "memory.max", "pids.max"], "nothing else is written");

        let unlimited = Limits { cpus: 1.0, mem_mib: 32.0, cfs_quota: false, max_pids: None };
        iso.prepare("agent-1/fw+other", &unlimited).unwrap();
        let other = mount.path().join("corral/agent-1/fw+other");
        assert_eq!(read(other.join("cpu.max")), "max 100000");
        assert_eq!(read(other.join("pids.max")), "max");
    }

    #[test]
    fn reads_oom_and_usage() {
        let mount = fake_mount();
        let iso = CgroupV2::new(mount.path(), "corral", REQUIRED).unwrap();
        let limits = Limits { cpus: 1.0, mem_mib: 32.0, cfs_quota: false, max_pids: None };
        iso.prepare("a/t", &limits).unwrap();
        let task = mount.path().join("corral/a/t");
        assert!(!iso.oom_killed("a/t"));
        std::fs::write(task.join("memory.events"), "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n").unwrap();
        assert!(iso.oom_killed("a/t"));
        std::fs::write(task.join("cpu.stat"), "usage_usec 2500000\nuser_usec 2000000\n").unwrap();
        std::fs::write(task.join("memory.current"), "1048576\n").unwrap();
        assert_eq!(iso.usage("a/t"), Some(Usage { cpu_seconds: 2.5, mem_bytes: 1_048_576 }));
    }

    #[test]
    fn missing_controllers_are_named() {
        let mount = tempfile::tempdir().unwrap();
        std::fs::write(mount.path().join("cgroup.controllers"), "cpu io\n").unwrap();
        let err = CgroupV2::new(mount.path(), "corral", REQUIRED).err().unwrap().to_string();
        assert!(err.contains("memory") && err.contains("pids"), "{err}");
    }

    #[test]
    fn unwritable_root_is_a_clear_error() {
        let mount = fake_mount();
        std::fs::write(mount.path().join("corral"), "a file, not a directory").unwrap();
        let err = CgroupV2::new(mount.path(), "corral", REQUIRED).err().unwrap().to_string();
        assert!(err.contains("not writable") && err.contains("corral"), "{err}");
    }
}
