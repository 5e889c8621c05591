//! cgroup v1: one directory per controller hierarchy (`<hierarchy>/<controller>/<root>/<task>`).
//! cpu: `cpu.shares` (+ CFS quota); memory: `memory.limit_in_bytes` and the same `memory.memsw.limit_in_bytes`
//! (no swap beyond the limit); pids: `pids.max`; usage from `cpuacct`; kill: freeze, SIGKILL all, thaw.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cgroupfs::{self, keyed};
use super::{CFS_PERIOD_US, IsolationError, Isolator, Limits, Usage, check_rel};

const CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];

pub struct CgroupV1 {
    /// (controller, `<mount>/<root>`) for each mounted controller.
    roots: Vec<(&'static str, PathBuf)>,
}

impl CgroupV1 {
    /// Uses the controllers mounted under `hierarchy` (`/sys/fs/cgroup/memory`, …); memory and cpu are required.
    pub fn new(hierarchy: &Path, root: &str) -> Result<CgroupV1, IsolationError> {
        let mut roots = Vec::new();
        for c in CONTROLLERS {
            let mount = hierarchy.join(c);
            if mount.is_dir() {
                let base = mount.join(root);
                cgroupfs::check_writable(&base)?;
                roots.push((c, base));
            }
        }
        for required in ["cpu", "memory"] {
            if !roots.iter().any(|(c, _)| *c == required) {
                return Err(IsolationError::NoHierarchy(hierarchy.join(required)));
            }
        }
        Ok(CgroupV1 { roots })
    }

    fn dir(&self, controller: &str, task: &str) -> Option<PathBuf> {
        self.roots.iter().find(|(c, _)| *c == controller).map(|(_, base)| base.join(check_rel(task)))
    }

    /// Every controller directory of the task (co-mounted controllers share one).
    fn dirs(&self, task: &str) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (_, base) in &self.roots {
            let d = base.join(check_rel(task));
            let real = d.parent().and_then(|p| p.canonicalize().ok()).map(|p| p.join(d.file_name().unwrap_or_default()));
            if !dirs.iter().any(|x| Some(x) == real.as_ref() || *x == d) {
                dirs.push(real.unwrap_or(d));
            }
        }
        dirs
    }

    fn apply(&self, task: &str, limits: &Limits) -> Result<(), IsolationError> {
        if let Some(cpu) = self.dir("cpu", task) {
            cgroupfs::write(&cpu.join("cpu.shares"), &limits.cpu_shares().to_string())?;
            if limits.cfs_quota {
                cgroupfs::write(&cpu.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
                cgroupfs::write(&cpu.join("cpu.cfs_quota_us"), &limits.cfs_quota_us().to_string())?;
            }
        }
        if let Some(mem) = self.dir("memory", task) {
            let bytes = limits.mem_bytes().to_string();
            cgroupfs::write(&mem.join("memory.limit_in_bytes"), &bytes)?;
            let memsw = mem.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                cgroupfs::write(&memsw, &bytes)?;
            }
        }
        if let (Some(max), Some(pids)) = (limits.max_pids, self.dir("pids", task)) {
            cgroupfs::write(&pids.join("pids.max"), &max.to_string())?;
        }
        Ok(())
    }
}

impl Isolator for CgroupV1 {
    fn name(&self) -> &'static str {
        "cgroups-v1"
    }

    fn prepare(&self, task: &str, limits: &Limits) -> Result<Vec<PathBuf>, IsolationError> {
        for (_, base) in &self.roots {
            cgroupfs::create_dir(&base.join(check_rel(task)))?;
        }
        if let Err(e) = self.apply(task, limits) {
            let _ = self.cleanup(task);
            return Err(e);
        }
        Ok(self.dirs(task).into_iter().map(|d| d.join("cgroup.procs")).collect())
    }

    fn oom_killed(&self, task: &str) -> bool {
        self.dir("memory", task)
            .and_then(|d| cgroupfs::read(&d.join("memory.oom_control")))
            .and_then(|t| keyed(&t, "oom_kill"))
            .is_some_and(|n| n > 0)
    }

    fn usage(&self, task: &str) -> Option<Usage> {
        let ns: u64 = cgroupfs::read(&self.dir("cpuacct", task)?.join("cpuacct.usage"))?.trim().parse().ok()?;
        let mem: u64 = cgroupfs::read(&self.dir("memory", task)?.join("memory.usage_in_bytes"))?.trim().parse().ok()?;
        Some(Usage { cpu_seconds: ns as f64 / 1e9, mem_bytes: mem })
    }

    fn cleanup(&self, task: &str) -> Result<(), IsolationError> {
        let dirs: Vec<PathBuf> = self.dirs(task).into_iter().filter(|d| d.is_dir()).collect();
        if dirs.is_empty() {
            return Ok(());
        }
        // Freeze first so nothing can fork while it is being killed.
        let freezer = self.dir("freezer", task).filter(|d| d.is_dir());
        if let Some(f) = &freezer {
            cgroupfs::write(&f.join("freezer.state"), "FROZEN")?;
            let deadline = Instant::now() + Duration::from_secs(1);
            while cgroupfs::read(&f.join("freezer.state")).is_some_and(|s| s.trim() != "FROZEN") && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        for d in &dirs {
            cgroupfs::kill_procs(d);
        }
        if let Some(f) = &freezer {
            cgroupfs::write(&f.join("freezer.state"), "THAWED")?;
        }
        let waited = cgroupfs::wait_empty(&dirs, Duration::from_secs(5));
        for d in &dirs {
            cgroupfs::remove_dir(d)?;
        }
        waited
    }

    fn release(&self, agent_id: &str) {
        for (_, base) in &self.roots {
            let _ = std::fs::remove_dir(base.join(check_rel(agent_id)));
        }
    }

    fn remove_root(&self) {
        for (_, base) in &self.roots {
            let _ = std::fs::remove_dir(base);
        }
    }
}
