//! Small, checked operations on cgroup files shared by the v1 and v2 backends. Every error names the file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::IsolationError;

/// Whether `path` is a cgroup2 file system.
pub fn is_cgroup2(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

pub fn write(path: &Path, value: &str) -> Result<(), IsolationError> {
    std::fs::write(path, value).map_err(|source| IsolationError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

pub fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// The value of `key` in a flat-keyed file (`key value` per line), e.g. `oom_kill 1` in `memory.events`.
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// Creates a directory and its parents.
pub fn create_dir(path: &Path) -> Result<(), IsolationError> {
    std::fs::create_dir_all(path).map_err(|source| IsolationError::Io { action: "create", path: path.to_path_buf(), source })
}

/// The processes in a cgroup.
pub fn procs(dir: &Path) -> Vec<i32> {
    read(&dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// SIGKILLs every process listed in the cgroup.
pub fn kill_procs(dir: &Path) {
    for pid in procs(dir) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Waits until no process is left in any of `dirs`.
pub fn wait_empty(dirs: &[PathBuf], timeout: Duration) -> Result<(), IsolationError> {
    let deadline = Instant::now() + timeout;
    loop {
        match dirs.iter().find(|d| !procs(d).is_empty()) {
            None => return Ok(()),
            Some(d) if Instant::now() >= deadline => return Err(IsolationError::NotEmpty(d.clone())),
            Some(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Removes an (empty) cgroup directory; a missing one is fine.
pub fn remove_dir(path: &Path) -> Result<(), IsolationError> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(IsolationError::Io { action: "remove", path: path.to_path_buf(), source }),
    }
}

/// Checks that the corral root below a hierarchy can be created and written.
pub fn check_writable(root: &Path) -> Result<(), IsolationError> {
    std::fs::create_dir_all(root).map_err(|source| IsolationError::NotWritable { path: root.to_path_buf(), source })?;
    let probe = root.join(".corral-probe");
    match std::fs::create_dir(&probe) {
        Ok(()) => {
            let _ = std::fs::remove_dir(&probe);
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(IsolationError::NotWritable { path: root.to_path_buf(), source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files() {
        let text = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n";
        assert_eq!(keyed(text, "oom_kill"), Some(2));
        assert_eq!(keyed(text, "oom"), Some(1));
        assert_eq!(keyed(text, "nope"), None);
    }

    #[test]
    fn errors_name_the_file() {
        let err = write(Path::new("/nonexistent/dir/memory.max"), "5").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/dir/memory.max") && err.contains("\"5\""), "{err}");
    }
}
