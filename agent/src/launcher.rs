//! Starting and stopping tasks through the shim. Owns the on-disk layout of a task:
//! `<work-dir>/sandboxes/<framework>/<task>/` (the task's cwd with `stdout` and `stderr`) and
//! `<work-dir>/meta/tasks/<framework>/<task>/` (shim spec, pid, exit record, checkpointed updates).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::AsyncBufReadExt;

use crate::shim::{self, ExitRecord, KillRequest, ShimSpec};

/// A started task: its shim (our child) and the task's pid.
pub struct Started {
    pub shim: tokio::process::Child,
    pub pid: u32,
}

#[derive(Debug, Clone)]
pub struct Launcher {
    work_dir: PathBuf,
    agent_exe: PathBuf,
}

impl Launcher {
    pub fn new(work_dir: PathBuf, agent_exe: PathBuf) -> Self {
        Launcher { work_dir, agent_exe }
    }

    pub fn sandbox_dir(&self, framework_id: &str, task_id: &str) -> PathBuf {
        self.work_dir.join("sandboxes").join(framework_id).join(task_id)
    }

    pub fn run_dir(&self, framework_id: &str, task_id: &str) -> PathBuf {
        self.work_dir.join("meta").join("tasks").join(framework_id).join(task_id)
    }

    /// Where a persistent volume lives on this agent: `<work-dir>/volumes/<role>/<persistence-id>`.
    pub fn volume_dir(&self, role: &str, persistence_id: &str) -> PathBuf {
        self.work_dir.join("volumes").join(role).join(persistence_id)
    }

    /// Creates the sandbox (with each volume linked at its container path) and the run dir, starts the shim and
    /// waits for it to report the task's pid. Blocking file work runs off the async workers.
    pub async fn launch(&self, run_dir: &Path, spec: &ShimSpec, volumes: &[(PathBuf, String)]) -> anyhow::Result<Started> {
        let (dir, spec_, volumes_) = (run_dir.to_path_buf(), spec.clone(), volumes.to_vec());
        let log = tokio::task::spawn_blocking(move || Self::prepare(&dir, &spec_, &volumes_))
            .await
            .map_err(|e| anyhow!("preparing the sandbox panicked: {e}"))??;
        self.start_shim(run_dir, log).await
    }

    /// The sandbox, volume links, run dir and shim spec; returns the shim's log file.
    fn prepare(run_dir: &Path, spec: &ShimSpec, volumes: &[(PathBuf, String)]) -> anyhow::Result<std::fs::File> {
        std::fs::create_dir_all(&spec.sandbox)
            .with_context(|| format!("cannot create sandbox {}", spec.sandbox.display()))?;
        for (target, container_path) in volumes {
            // container_path was validated (relative, no ".."), so the link stays inside the sandbox.
            let link = spec.sandbox.join(container_path);
            if let Some(parent) = link.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
            }
            std::os::unix::fs::symlink(target, &link)
                .with_context(|| format!("cannot link volume {} at {}", target.display(), link.display()))?;
        }
        std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
        // Read once by the shim we start next; a machine crash before then leaves no task to describe.
        shim::write_json_visible(&run_dir.join(shim::SPEC), spec).context("cannot write the shim spec")?;
        std::fs::File::create(run_dir.join("shim.log")).context("cannot create shim.log")
    }

    async fn start_shim(&self, run_dir: &Path, log: std::fs::File) -> anyhow::Result<Started> {
        let mut child = tokio::process::Command::new(&self.agent_exe)
            .arg("shim")
            .arg("--run-dir")
            .arg(run_dir)
            // The shim needs nothing from the agent's environment, and the task gets its own from the spec.
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Its own process group: signals aimed at the agent's group (Ctrl-C, systemd) do not reach tasks.
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .with_context(|| format!("cannot start the shim {}", self.agent_exe.display()))?;
        let stdout = child.stdout.take().context("shim stdout")?;
        let mut line = String::new();
        let mut reader = tokio::io::BufReader::new(stdout);
        let read = reader.read_line(&mut line);
        match tokio::time::timeout(Duration::from_secs(30), read).await {
            Ok(Ok(n)) if n > 0 => {}
            Ok(_) => {
                let _ = child.wait().await;
                let log = std::fs::read_to_string(run_dir.join("shim.log")).unwrap_or_default();
                return Err(anyhow!("the shim exited before starting the task: {}", log.trim()));
            }
            Err(_) => return Err(anyhow!("the shim did not report within 30 s")),
        }
        let line = line.trim();
        if let Some(pid) = line.strip_prefix("RUNNING ") {
            let pid = pid.parse().with_context(|| format!("bad shim report {line:?}"))?;
            Ok(Started { shim: child, pid })
        } else {
            let _ = child.wait().await;
            Err(anyhow!("{}", line.strip_prefix("FAILED ").unwrap_or(line)))
        }
    }

    /// Asks the shim to kill the task: SIGTERM to its process group, SIGKILL after `grace`.
    pub fn kill(&self, run_dir: &Path, shim_pid: u32, grace: Duration) -> anyhow::Result<()> {
        shim::write_json_visible(&run_dir.join(shim::KILL), &KillRequest { grace_seconds: grace.as_secs_f64() })?;
        kill(Pid::from_raw(shim_pid as i32), Signal::SIGTERM).with_context(|| format!("cannot signal shim {shim_pid}"))
    }

    /// The shim's pid as it recorded it, if that process is still a live shim of this run dir (not a zombie, and
    /// not an unrelated process that reused the pid).
    pub fn live_shim(&self, run_dir: &Path) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(run_dir.join(shim::SHIM_PID)).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let zombie = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) == Some("Z");
        let ours = String::from_utf8_lossy(&cmdline).contains(&*run_dir.to_string_lossy());
        (ours && !zombie).then_some(pid)
    }

    /// The task's pid as the shim recorded it.
    pub fn task_pid(&self, run_dir: &Path) -> Option<u32> {
        std::fs::read_to_string(run_dir.join(shim::PID)).ok()?.trim().parse().ok()
    }

    /// The task's exit record, once the shim wrote it.
    pub fn exit_record(&self, run_dir: &Path) -> Option<ExitRecord> {
        shim::read_json(&run_dir.join(shim::EXIT))
    }
}
