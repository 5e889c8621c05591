//! `corral-agent check-isolation`: proves on this node, with the real kernel, that task isolation works before
//! the node takes work: a task over its memory limit is OOM-killed and the kill is detected, and killing a task
//! removes every process it started (including one that detached with `setsid`) together with its cgroup.
//! Runs tasks through the real shim, in a temporary work dir and its own cgroup root. Needs root.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::isolation::{self, IsolationConfig, Isolator, Limits};
use crate::launcher::Launcher;
use crate::shim::ShimSpec;

/// Processes whose cgroup (any hierarchy) is `task` below `root`.
fn members(root: &str, task: &str) -> Vec<u32> {
    let needle = format!("/{root}/{task}");
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .is_ok_and(|text| text.lines().any(|l| l.trim_end().ends_with(&needle)))
        })
        .collect()
}

fn spec(work: &Path, name: &str, command: &str, cgroup_procs: Vec<PathBuf>) -> anyhow::Result<ShimSpec> {
    let sandbox = work.join("sandboxes").join(name);
    std::fs::create_dir_all(&sandbox)?;
    let mut env = BTreeMap::new();
    env.insert("PATH".to_string(), std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()));
    Ok(ShimSpec { shell: true, value: command.into(), arguments: Vec::new(), env, sandbox, grace_seconds: 0.0, cgroup_procs })
}

/// Runs the checks, printing one line per check; `Ok(false)` when one failed.
pub async fn run(config: &IsolationConfig) -> anyhow::Result<bool> {
    // The root is removed afterwards only if this check is what created it.
    let root_existed = ["memory", ""].iter().any(|c| config.hierarchy.join(c).join(&config.root).exists());
    let isolator = isolation::build(config).context("cannot set up isolation")?;
    println!("isolation backend: {}", isolator.name());
    let work = std::env::temp_dir().join(format!("corral-check-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let launcher = Launcher::new(work.clone(), std::env::current_exe()?);
    let result = checks(isolator.as_ref(), &launcher, &work, &config.root).await;
    isolator.release("check");
    if !root_existed {
        isolator.remove_root();
    }
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn checks(isolator: &dyn Isolator, launcher: &Launcher, work: &Path, root: &str) -> anyhow::Result<bool> {
    let mut all_ok = true;
    let mut report = |ok: bool, what: &str| {
        println!("{} {what}", if ok { "ok  " } else { "FAIL" });
        all_ok &= ok;
    };

    // 1. Memory: 128 MiB into a 32 MiB limit.
    let task = "check/fw+memory";
    let limits = Limits { cpus: 0.5, mem_mib: 32.0, cfs_quota: false, max_pids: Some(64) };
    let procs = isolator.prepare(task, &limits)?;
    let s = spec(work, "memory", "head -c 134217728 /dev/zero | tail > /dev/null", procs)?;
    let mut started = launcher.launch(&work.join("run-memory"), &s, &[]).await?;
    let inside = members(root, task).contains(&started.pid);
    let _ = tokio::time::timeout(Duration::from_secs(60), started.shim.wait()).await;
    let record = launcher.exit_record(&work.join("run-memory"));
    let oom = isolator.oom_killed(task);
    isolator.cleanup(task)?;
    report(inside, "the task runs inside its cgroup from its first instruction");
    report(oom && record.as_ref().is_some_and(|r| r.code != Some(0)), "a task over its 32 MiB memory limit is OOM-killed and the kill is detected");

    // 2. Kill: a task with a child and a detached (setsid) grandchild.
    let task = "check/fw+kill";
    let procs = isolator.prepare(task, &limits)?;
    let s = spec(work, "kill", "sleep 600 & setsid sleep 600 & wait", procs)?;
    let mut started = launcher.launch(&work.join("run-kill"), &s, &[]).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while members(root, task).len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = members(root, task).len();
    isolator.cleanup(task)?;
    let _ = tokio::time::timeout(Duration::from_secs(10), started.shim.wait()).await;
    let left = members(root, task).len();
    report(before >= 3 && left == 0, &format!("killing a task removes all {before} of its processes, detached ones too"));
    let gone = isolator.usage(task).is_none() && !isolator.oom_killed(task);
    report(gone, "the task's cgroup is removed");
    Ok(all_ok)
}
