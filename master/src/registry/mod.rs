//! The registry: what the master must remember across restarts and failovers — framework infos, admitted agents,
//! role weights and quotas, agents under maintenance. Tasks are deliberately absent: agents are their source of truth and report them on
//! re-registration, which keeps registry writes off the launch path.
//!
//! Backends sit behind [`Registry`]: `file:DIR`, the embedded default for a single master (a JSON snapshot plus an
//! append-only log of changes, compacted into the snapshot now and then), and [`etcd::EtcdRegistry`] for replicated masters (one key per record, every write fenced on the
//! writer still leading).

pub mod etcd;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A framework as the registry stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameworkRecord {
    pub id: String,
    pub name: String,
    pub roles: Vec<String>,
    pub failover_timeout_seconds: f64,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub registered_time: f64,
}

/// An admitted agent as the registry stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: String,
    pub hostname: String,
    pub port: u32,
    /// Operator text form.
    pub resources: String,
    pub registered_time: f64,
}

/// A role's quota as the registry stores it: operator text forms (`cpus:2;mem:1024`), empty for none.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QuotaRecord {
    #[serde(default)]
    pub guarantee: String,
    #[serde(default)]
    pub limit: String,
}

/// Everything the registry holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegistryState {
    #[serde(default)]
    pub frameworks: BTreeMap<String, FrameworkRecord>,
    #[serde(default)]
    pub agents: BTreeMap<String, AgentRecord>,
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
    #[serde(default)]
    pub quotas: BTreeMap<String, QuotaRecord>,
    /// Agents being drained: the wall-clock time (seconds since the epoch) after which their tasks are killed.
    #[serde(default)]
    pub drains: BTreeMap<String, f64>,
}

/// A single change to the registry. Every change sets or removes one record, so replaying changes that a snapshot
/// already holds leaves it as it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Change {
    PutFramework(FrameworkRecord),
    RemoveFramework(String),
    PutAgent(AgentRecord),
    RemoveAgent(String),
    SetWeight(String, f64),
    SetQuota(String, QuotaRecord),
    RemoveQuota(String),
    SetDrain(String, f64),
    RemoveDrain(String),
}

impl RegistryState {
    fn apply(&mut self, change: Change) {
        match change {
            Change::PutFramework(f) => {
                self.frameworks.insert(f.id.clone(), f);
            }
            Change::RemoveFramework(id) => {
                self.frameworks.remove(&id);
            }
            Change::PutAgent(a) => {
                self.agents.insert(a.id.clone(), a);
            }
            Change::RemoveAgent(id) => {
                self.agents.remove(&id);
            }
            Change::SetWeight(role, w) => {
                self.weights.insert(role, w);
            }
            Change::SetQuota(role, q) => {
                self.quotas.insert(role, q);
            }
            Change::RemoveQuota(role) => {
                self.quotas.remove(&role);
            }
            Change::SetDrain(agent, deadline) => {
                self.drains.insert(agent, deadline);
            }
            Change::RemoveDrain(agent) => {
                self.drains.remove(&agent);
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry spec {0:?} is not understood; use file:DIR or etcd://host:port[,host:port…]")]
    BadSpec(String),
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("registry key {key} is corrupt: {source}")]
    CorruptKey {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("registry write refused: this master no longer holds the leader key (deposed)")]
    Fenced,
    #[error("registry write too large: {0} keys in one change (etcd allows {1})")]
    TooLarge(usize, usize),
    #[error("registry i/o on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("registry file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Durable storage for the master's state. A write returns only once it is durable.
#[async_trait::async_trait]
pub trait Registry: Send {
    /// Reads everything stored.
    async fn load(&mut self) -> Result<RegistryState, RegistryError>;
    /// Applies changes atomically (all or none).
    async fn apply(&mut self, changes: Vec<Change>) -> Result<(), RegistryError>;
}

/// Opens the single-master registry from its spec (`file:DIR`); `etcd://` registries are opened per leadership term
/// by `crate::ha`, since their writes are fenced on the term's leader key.
pub fn open(spec: &str) -> Result<Box<dyn Registry>, RegistryError> {
    match spec.strip_prefix("file:") {
        Some(dir) if !dir.is_empty() => Ok(Box::new(FileRegistry::new(dir))),
        _ => Err(RegistryError::BadSpec(spec.to_string())),
    }
}

/// Log entries after which the log is folded into a new snapshot.
const COMPACT_AFTER: usize = 1000;

/// The embedded registry: `registry.json`, a snapshot replaced atomically (write, fsync, rename, fsync dir), and
/// `registry.log`, one JSON line per applied batch of changes, appended and fsynced. A write costs one appended
/// line, whatever the registry's size; every [`COMPACT_AFTER`] entries the state is written as a new snapshot and
/// the log removed. Loading replays the log over the snapshot; a torn last line (a crash mid-append) is dropped, any
/// other unreadable line is corruption.
pub struct FileRegistry {
    dir: PathBuf,
    state: Option<RegistryState>,
    /// Entries in the log, and its length in bytes (a failed append is cut back to it).
    log_entries: usize,
    log_len: u64,
}

impl FileRegistry {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileRegistry { dir: dir.into(), state: None, log_entries: 0, log_len: 0 }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("registry.log")
    }

    fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RegistryError + use<> {
        let path = path.to_path_buf();
        move |source| RegistryError::Io { path, source }
    }

    /// The snapshot with the log replayed over it.
    fn read(&mut self) -> Result<RegistryState, RegistryError> {
        let path = self.path();
        let mut state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| RegistryError::Corrupt { path, source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => RegistryState::default(),
            Err(source) => return Err(RegistryError::Io { path, source }),
        };
        let log_path = self.log_path();
        let log = match std::fs::read(&log_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(source) => return Err(RegistryError::Io { path: log_path, source }),
        };
        let (mut entries, mut good) = (0, 0);
        let mut lines = log.split_inclusive(|b| *b == b'\n').peekable();
        while let Some(line) = lines.next() {
            match serde_json::from_slice::<Vec<Change>>(line) {
                Ok(changes) if line.ends_with(b"\n") => {
                    changes.into_iter().for_each(|c| state.apply(c));
                    entries += 1;
                    good += line.len();
                }
                Err(source) if lines.peek().is_some() => {
                    return Err(RegistryError::Corrupt { path: log_path, source });
                }
                _ => tracing::warn!(path = %log_path.display(), "dropping a torn last line of the registry log"),
            }
        }
        self.log_entries = entries;
        self.log_len = good as u64;
        Ok(state)
    }

    /// Writes one batch after the log's last good line (cutting off a torn tail) and syncs it; on failure the log
    /// is cut back to what it held.
    fn append(&mut self, changes: &[Change]) -> Result<(), RegistryError> {
        use std::io::{Seek, SeekFrom};
        let log_path = self.log_path();
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let mut line = serde_json::to_vec(changes).expect("registry changes always serialise");
        line.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&log_path)
            .map_err(Self::io(&log_path))?;
        let written = file
            .set_len(self.log_len)
            .and_then(|_| file.seek(SeekFrom::Start(self.log_len)))
            .and_then(|_| file.write_all(&line))
            .and_then(|_| file.sync_data());
        if let Err(e) = written {
            let _ = file.set_len(self.log_len);
            return Err(Self::io(&log_path)(e));
        }
        if self.log_len == 0 {
            // A new log file: make its directory entry durable too.
            std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(Self::io(&self.dir))?;
        }
        self.log_len += line.len() as u64;
        self.log_entries += 1;
        Ok(())
    }

    /// Writes `state` as the new snapshot, then removes the log it contains.
    fn compact(&mut self, state: &RegistryState) -> Result<(), RegistryError> {
        std::fs::create_dir_all(&self.dir).map_err(Self::io(&self.dir))?;
        let tmp = self.dir.join("registry.json.tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("registry state always serialises");
        let mut file = std::fs::File::create(&tmp).map_err(Self::io(&tmp))?;
        file.write_all(&bytes).map_err(Self::io(&tmp))?;
        file.sync_all().map_err(Self::io(&tmp))?;
        std::fs::rename(&tmp, self.path()).map_err(Self::io(&self.path()))?;
        // Replaying the log over the new snapshot would change nothing, so a crash here is harmless.
        match std::fs::remove_file(self.log_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Self::io(&self.log_path())(e)),
        }
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(Self::io(&self.dir))?;
        self.log_entries = 0;
        self.log_len = 0;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Registry for FileRegistry {
    async fn load(&mut self) -> Result<RegistryState, RegistryError> {
        let state = self.read()?;
        self.state = Some(state.clone());
        Ok(state)
    }

    async fn apply(&mut self, changes: Vec<Change>) -> Result<(), RegistryError> {
        if self.state.is_none() {
            self.state = Some(self.read()?);
        }
        // Only a durable write updates the cached state, so a failed write changes nothing.
        self.append(&changes)?;
        let state = self.state.as_mut().expect("loaded above");
        for change in changes {
            state.apply(change);
        }
        if self.log_entries >= COMPACT_AFTER {
            let state = state.clone();
            if let Err(e) = self.compact(&state) {
                // The log still holds everything; compaction is retried after the next write.
                tracing::warn!("could not compact the registry log: {e}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framework(id: &str) -> FrameworkRecord {
        FrameworkRecord {
            id: id.into(),
            name: "test".into(),
            roles: vec!["*".into()],
            failover_timeout_seconds: 10.0,
            user: String::new(),
            hostname: String::new(),
            labels: BTreeMap::new(),
            registered_time: 1.0,
        }
    }

    #[tokio::test]
    async fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = FileRegistry::new(dir.path());
        assert_eq!(r.load().await.unwrap(), RegistryState::default());
        r.apply(vec![Change::PutFramework(framework("f1")), Change::SetWeight("a".into(), 3.0)]).await.unwrap();
        r.apply(vec![Change::PutFramework(framework("f2")), Change::RemoveFramework("f1".into())]).await.unwrap();
        let mut again = FileRegistry::new(dir.path());
        let state = again.load().await.unwrap();
        assert_eq!(state.frameworks.keys().collect::<Vec<_>>(), vec!["f2"]);
        assert_eq!(state.weights["a"], 3.0);
    }

    #[tokio::test]
    async fn corrupt_file_is_an_error_not_an_empty_registry() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("registry.json"), b"{not json").unwrap();
        let err = FileRegistry::new(dir.path()).load().await.unwrap_err();
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[tokio::test]
    async fn failed_write_keeps_what_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let reg = dir.path().join("reg");
        let mut r = FileRegistry::new(&reg);
        r.load().await.unwrap();
        r.apply(vec![Change::PutFramework(framework("f1"))]).await.unwrap();
        let state = r.state.clone().unwrap();
        r.compact(&state).unwrap();
        // Make the log path a directory so the next write fails.
        std::fs::create_dir(reg.join("registry.log")).unwrap();
        assert!(r.apply(vec![Change::RemoveFramework("f1".into())]).await.is_err());
        assert!(r.state.as_ref().unwrap().frameworks.contains_key("f1"), "the cached state is unchanged");
        std::fs::remove_dir(reg.join("registry.log")).unwrap();
        assert!(FileRegistry::new(&reg).load().await.unwrap().frameworks.contains_key("f1"));
    }

    #[tokio::test]
    async fn a_torn_last_log_line_is_dropped_but_a_corrupt_middle_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = FileRegistry::new(dir.path());
        r.apply(vec![Change::PutFramework(framework("f1"))]).await.unwrap();
        let log = dir.path().join("registry.log");
        let mut text = std::fs::read(&log).unwrap();
        text.extend_from_slice(br#"[{"PutFramework":{"id":"f2""#);
        std::fs::write(&log, &text).unwrap();
        let mut again = FileRegistry::new(dir.path());
        assert_eq!(again.load().await.unwrap().frameworks.keys().collect::<Vec<_>>(), vec!["f1"]);
        // The next write replaces the torn tail.
        again.apply(vec![Change::PutFramework(framework("f3"))]).await.unwrap();
        let state = FileRegistry::new(dir.path()).load().await.unwrap();
        assert_eq!(state.frameworks.keys().collect::<Vec<_>>(), vec!["f1", "f3"]);
        std::fs::write(&log, [&text[..], b"\n", br#"[{"RemoveFramework":"f1"}]"#, b"\n"].concat()).unwrap();
        let err = FileRegistry::new(dir.path()).load().await.unwrap_err();
        assert!(err.to_string().contains("registry.log"), "{err}");
    }

    #[tokio::test]
    async fn the_log_is_compacted_into_the_snapshot_and_replaying_it_twice_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = FileRegistry::new(dir.path());
        for i in 0..COMPACT_AFTER + 5 {
            r.apply(vec![Change::PutFramework(framework(&format!("f{i}"))), Change::SetWeight("w".into(), i as f64)])
                .await
                .unwrap();
        }
        let log = std::fs::read_to_string(dir.path().join("registry.log")).unwrap();
        assert_eq!(log.lines().count(), 5, "compacted after {COMPACT_AFTER} entries");
        let expected = r.state.clone().unwrap();
        assert_eq!(FileRegistry::new(dir.path()).load().await.unwrap(), expected);
        // A crash after the snapshot was written but before the log was removed: the log is replayed again.
        let state = expected.clone();
        r.compact(&state).unwrap();
        std::fs::write(dir.path().join("registry.log"), log).unwrap();
        assert_eq!(FileRegistry::new(dir.path()).load().await.unwrap(), expected);
    }

    #[test]
    fn specs() {
        assert!(open("file:/tmp/x").is_ok());
        for bad in ["", "file:", "etcd:/x", "/tmp/x"] {
            assert!(open(bad).is_err(), "{bad}");
        }
    }
}
