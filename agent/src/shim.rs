//! The per-task shim (`corral-agent shim --run-dir DIR`), like containerd-shim or conmon.
//!
//! The shim is the task's parent. It starts the task in its own process group inside the sandbox, tells the
//! agent the task's pid on stdout (`RUNNING <pid>` or `FAILED <why>`, one line), then waits. On SIGTERM it sends
//! SIGTERM to the task's process group and, after the grace period, SIGKILL. When the task exits it kills what is
//! left of the group and writes `exit.json`. It never depends on the agent being alive: the agent may restart and
//! re-attach by reading the files in the run dir.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// What the agent asks the shim to run (`spec.json` in the run dir).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShimSpec {
    /// `/bin/sh -c value` when true; otherwise `value` is the program and `arguments` its arguments.
    pub shell: bool,
    pub value: String,
    #[serde(default)]
    pub arguments: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub sandbox: PathBuf,
    /// Default seconds between SIGTERM and SIGKILL.
    pub grace_seconds: f64,
    /// `cgroup.procs` files the task joins between fork and exec.
    #[serde(default)]
    pub cgroup_procs: Vec<PathBuf>,
}

/// How the task ended (`exit.json` in the run dir).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExitRecord {
    pub pid: Option<u32>,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    /// The shim was asked to kill the task.
    pub killed: bool,
    /// The task could not be started.
    pub error: Option<String>,
}

/// A kill request's grace override (`kill.json`), written by the agent before it signals the shim.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KillRequest {
    pub grace_seconds: f64,
}

pub const SPEC: &str = "spec.json";
pub const EXIT: &str = "exit.json";
pub const KILL: &str = "kill.json";
pub const PID: &str = "pid";
pub const SHIM_PID: &str = "shim.pid";

/// Writes `value` as JSON to `path` atomically (temp file, fsync, rename): it survives a machine crash.
pub fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    write_json(path, value, true)
}

/// Writes `value` as JSON to `path` so that readers see all of it or nothing (temp file, rename), without waiting
/// for the disk: for hand-offs between live processes (the shim's spec, a kill request) that mean nothing after
/// a machine crash.
pub fn write_json_visible<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    write_json(path, value, false)
}

fn write_json<T: Serialize>(path: &Path, value: &T, durable: bool) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    if durable {
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Reads a JSON file; `None` when missing or unreadable.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Entry point of `corral-agent shim`.
pub fn run(run_dir: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(supervise(run_dir))
}

async fn supervise(run_dir: &Path) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let spec: ShimSpec = read_json(&run_dir.join(SPEC)).context("cannot read the shim spec")?;
    // A restarted agent finds (and verifies) its shims through this file.
    std::fs::write(run_dir.join(SHIM_PID), std::process::id().to_string())?;
    let mut term = signal(SignalKind::terminate())?;
    // Terminal signals must not take the task's parent down: the shim lives in its own process group, but an
    // operator's stray `kill -INT` or a hang-up should still be survivable.
    let _hup = signal(SignalKind::hangup())?;
    let _int = signal(SignalKind::interrupt())?;

    let mut child = match spawn(&spec) {
        Ok(child) => child,
        Err(e) => {
            let why = format!("{e:#}");
            let record = ExitRecord { pid: None, code: None, signal: None, killed: false, error: Some(why.clone()) };
            write_json_atomic(&run_dir.join(EXIT), &record)?;
            announce(&format!("FAILED {}", why.replace('\n', " ")));
            return Ok(());
        }
    };
    let pid = child.id().context("the task has no pid")?;
    std::fs::write(run_dir.join(PID), pid.to_string())?;
    announce(&format!("RUNNING {pid}"));

    let group = Pid::from_raw(pid as i32);
    let mut killed = false;
    let mut deadline: Option<tokio::time::Instant> = None;
    let status = loop {
        let sleep = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            status = child.wait() => break status?,
            _ = term.recv() => {
                if !killed {
                    killed = true;
                    let grace = read_json::<KillRequest>(&run_dir.join(KILL))
                        .map(|k| k.grace_seconds)
                        .unwrap_or(spec.grace_seconds);
                    if grace > 0.0 {
                        let _ = killpg(group, Signal::SIGTERM);
                        deadline = Some(tokio::time::Instant::now() + Duration::from_secs_f64(grace));
                    } else {
                        let _ = killpg(group, Signal::SIGKILL);
                    }
                }
            }
            _ = sleep => {
                let _ = killpg(group, Signal::SIGKILL);
                deadline = None;
            }
        }
    };
    // Whatever the task left behind in its process group goes with it.
    let _ = killpg(group, Signal::SIGKILL);
    use std::os::unix::process::ExitStatusExt;
    let record = ExitRecord { pid: Some(pid), code: status.code(), signal: status.signal(), killed, error: None };
    write_json_atomic(&run_dir.join(EXIT), &record)?;
    Ok(())
}

fn spawn(spec: &ShimSpec) -> anyhow::Result<tokio::process::Child> {
    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.sandbox.join(name))
            .with_context(|| format!("cannot open {name} in the sandbox {}", spec.sandbox.display()))
    };
    let mut cmd = if spec.shell {
        let mut c = tokio::process::Command::new("/bin/sh");
        c.arg("-c").arg(&spec.value);
        c
    } else {
        let mut c = tokio::process::Command::new(&spec.value);
        c.args(&spec.arguments);
        c
    };
    cmd.current_dir(&spec.sandbox)
        .env_clear()
        .envs(&spec.env)
        .stdin(Stdio::null())
        .stdout(open("stdout")?)
        .stderr(open("stderr")?)
        .process_group(0)
        .kill_on_drop(false);
    let cgroups = open_cgroups(&spec.cgroup_procs)?;
    join_cgroups_before_exec(&mut cmd, cgroups);
    cmd.spawn().with_context(|| format!("cannot start {:?}", spec.value))
}

/// Opens the `cgroup.procs` files before forking: after fork only async-signal-safe calls are allowed.
fn open_cgroups(paths: &[PathBuf]) -> anyhow::Result<Vec<std::fs::File>> {
    paths
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new().write(true).open(p).with_context(|| format!("cannot open {}", p.display()))
        })
        .collect()
}

/// Makes the child write "0" (itself) into each cgroup before it executes the task, so the task and everything
/// it will fork are confined before any of its own code runs.
#[allow(unsafe_code)]
fn join_cgroups_before_exec(cmd: &mut tokio::process::Command, cgroups: Vec<std::fs::File>) {
    use std::os::fd::AsRawFd;
    if cgroups.is_empty() {
        return;
    }
    let fds: Vec<i32> = cgroups.iter().map(|f| f.as_raw_fd()).collect();
    // The files stay open in the parent until spawn returns: `cmd` owns them through this closure.
    let keep_open = cgroups;
    // SAFETY: the closure runs in the child between fork and exec, where only async-signal-safe functions may be
    // called. It calls only write(2) on descriptors opened before the fork, and allocates nothing (`fds` was
    // built before the fork and is only read).
    unsafe {
        cmd.pre_exec(move || {
            let _ = &keep_open;
            for fd in &fds {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Tells the agent (our stdout is its pipe) one line about the start; ignored if the agent is gone.
fn announce(line: &str) {
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Describes an exit for a status message, e.g. "Command exited with status 3".
pub fn describe(record: &ExitRecord) -> String {
    if let Some(e) = &record.error {
        return format!("Failed to start the command: {e}");
    }
    match (record.code, record.signal) {
        (Some(code), _) => format!("Command exited with status {code}"),
        (None, Some(sig)) => {
            let name = Signal::try_from(sig).map(|s| s.as_str().to_string()).unwrap_or_else(|_| sig.to_string());
            format!("Command terminated with signal {name}")
        }
        (None, None) => "Command ended without an exit status".to_string(),
    }
}
