//! Task isolation behind one trait. The launcher calls [`Isolator::prepare`] before a task starts and
//! [`Isolator::cleanup`] after it ended; backends (cgroups v1/v2) plug in here without touching the launcher.

use corral_proto::Resources;

/// Why isolation failed, with the task and what was being done.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error("unknown isolation {0:?}; available: none")]
    Unknown(String),
}

/// Per-task isolation.
pub trait Isolator: Send + Sync {
    /// The name used in `--isolation`.
    fn name(&self) -> &'static str;
    /// Sets up isolation for a task about to start, sized from its resources.
    fn prepare(&self, task_key: &str, resources: &Resources) -> Result<(), IsolationError>;
    /// Removes what `prepare` created. Must be idempotent.
    fn cleanup(&self, task_key: &str) -> Result<(), IsolationError>;
}

/// No isolation: tasks are ordinary processes in their own process group.
pub struct NoIsolation;

impl Isolator for NoIsolation {
    fn name(&self) -> &'static str {
        "none"
    }
    fn prepare(&self, _task_key: &str, _resources: &Resources) -> Result<(), IsolationError> {
        Ok(())
    }
    fn cleanup(&self, _task_key: &str) -> Result<(), IsolationError> {
        Ok(())
    }
}

/// Picks an isolator by its `--isolation` name.
pub fn by_name(name: &str) -> Result<Box<dyn Isolator>, IsolationError> {
    match name {
        "none" => Ok(Box::new(NoIsolation)),
        other => Err(IsolationError::Unknown(other.to_string())),
    }
}
