//! The registry: what the master must remember across restarts and failovers — framework infos, admitted agents,
//! role weights. Tasks are deliberately absent: agents are their source of truth and report them on
//! re-registration, which keeps registry writes off the launch path.
//!
//! Backends sit behind [`Registry`]: `file:DIR`, the embedded default for a single master (one JSON document replaced
//! atomically), and [`etcd::EtcdRegistry`] for replicated masters (one key per record, every write fenced on the
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

/// Everything the registry holds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RegistryState {
    #[serde(default)]
    pub frameworks: BTreeMap<String, FrameworkRecord>,
    #[serde(default)]
    pub agents: BTreeMap<String, AgentRecord>,
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
}

/// A single change to the registry.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    PutFramework(FrameworkRecord),
    RemoveFramework(String),
    PutAgent(AgentRecord),
    RemoveAgent(String),
    SetWeight(String, f64),
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

/// The embedded registry: one JSON document, replaced atomically (write, fsync, rename, fsync dir).
pub struct FileRegistry {
    dir: PathBuf,
    state: Option<RegistryState>,
}

impl FileRegistry {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileRegistry { dir: dir.into(), state: None }
    }

    fn path(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    fn read(&self) -> Result<RegistryState, RegistryError> {
        let path = self.path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| RegistryError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RegistryState::default()),
            Err(source) => Err(RegistryError::Io { path, source }),
        }
    }

    fn write(&self, state: &RegistryState) -> Result<(), RegistryError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| RegistryError::Io { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        let tmp = self.dir.join("registry.json.tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("registry state always serialises");
        let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(&bytes).map_err(io(&tmp))?;
        file.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, self.path()).map_err(io(&self.path()))?;
        std::fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io(&self.dir))?;
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
        let mut next = match &self.state {
            Some(s) => s.clone(),
            None => self.read()?,
        };
        for change in changes {
            next.apply(change);
        }
        // Only a durable write updates the cached state, so a failed write changes nothing.
        self.write(&next)?;
        self.state = Some(next);
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
        let mut r = FileRegistry::new(dir.path().join("reg"));
        r.load().await.unwrap();
        r.apply(vec![Change::PutFramework(framework("f1"))]).await.unwrap();
        // Make the temp file path a directory so the next write fails.
        std::fs::create_dir(dir.path().join("reg/registry.json.tmp")).unwrap();
        assert!(r.apply(vec![Change::RemoveFramework("f1".into())]).await.is_err());
        assert!(r.load().await.unwrap().frameworks.contains_key("f1"));
    }

    #[test]
    fn specs() {
        assert!(open("file:/tmp/x").is_ok());
        for bad in ["", "file:", "etcd:/x", "/tmp/x"] {
            assert!(open(bad).is_err(), "{bad}");
        }
    }
}
