//! The replicated registry: one etcd key per record under `<prefix>/registry/`:
//!
//! ```text
//! <prefix>/registry/frameworks/<framework-id>   FrameworkRecord as JSON
//! <prefix>/registry/agents/<agent-id>           AgentRecord as JSON
//! <prefix>/registry/weights/<role>              weight as a JSON number
//! ```
//!
//! Every write is one transaction guarded on the writer's leader key still existing at the revision it was created
//! with (`create_revision(key) == rev`). A master whose lease expired — its key deleted by etcd — or that resigned can
//! therefore never write again in that term: the transaction fails and [`RegistryError::Fenced`] tells the master
//! to step down.

use std::collections::BTreeMap;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::de::DeserializeOwned;

use super::{Change, Registry, RegistryError, RegistryState};

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;

/// A registry in etcd, writable only while `fence` is this master's leader key.
pub struct EtcdRegistry {
    client: Client,
    prefix: String,
    fence: Fence,
}

/// The leader key a writer must still hold: etcd key and the revision that created it.
#[derive(Debug, Clone)]
pub struct Fence {
    pub key: Vec<u8>,
    pub rev: i64,
}

impl EtcdRegistry {
    /// `prefix` is the registry prefix (e.g. `/corral/registry/`, see `EtcdSpec::registry_prefix`).
    pub fn new(client: Client, prefix: String, fence: Fence) -> EtcdRegistry {
        EtcdRegistry { client, prefix, fence }
    }

}

/// The final value of each key touched by `changes` (None: deleted), by key: etcd refuses a transaction that
/// touches one key twice, and only the last change to a key matters.
fn keyed_writes(prefix: &str, changes: Vec<Change>) -> BTreeMap<String, Option<String>> {
    let json = |v: serde_json::Result<String>| v.expect("registry records always serialise");
    let key = |kind: &str, id: &str| format!("{prefix}{kind}/{id}");
    let mut writes = BTreeMap::new();
    for change in changes {
        let (key, value) = match change {
            Change::PutFramework(f) => (key("frameworks", &f.id), Some(json(serde_json::to_string(&f)))),
            Change::RemoveFramework(id) => (key("frameworks", &id), None),
            Change::PutAgent(a) => (key("agents", &a.id), Some(json(serde_json::to_string(&a)))),
            Change::RemoveAgent(id) => (key("agents", &id), None),
            Change::SetWeight(role, w) => (key("weights", &role), Some(json(serde_json::to_string(&w)))),
            Change::SetQuota(role, q) => (key("quotas", &role), Some(json(serde_json::to_string(&q)))),
            Change::RemoveQuota(role) => (key("quotas", &role), None),
            Change::SetDrain(agent, deadline) => (key("drains", &agent), Some(json(serde_json::to_string(&deadline)))),
            Change::RemoveDrain(agent) => (key("drains", &agent), None),
        };
        writes.insert(key, value);
    }
    writes
}

fn parse<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, RegistryError> {
    serde_json::from_slice(value).map_err(|source| RegistryError::CorruptKey { key: key.to_string(), source })
}

#[async_trait::async_trait]
impl Registry for EtcdRegistry {
    async fn load(&mut self) -> Result<RegistryState, RegistryError> {
        let response = self.client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())).await?;
        let mut state = RegistryState::default();
        for kv in response.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some((kind, id)) = key.strip_prefix(&self.prefix).and_then(|rest| rest.split_once('/')) else {
                tracing::warn!(key, "ignoring an unknown registry key");
                continue;
            };
            match kind {
                "frameworks" => {
                    state.frameworks.insert(id.to_string(), parse(&key, kv.value())?);
                }
                "agents" => {
                    state.agents.insert(id.to_string(), parse(&key, kv.value())?);
                }
                "weights" => {
                    state.weights.insert(id.to_string(), parse(&key, kv.value())?);
                }
                "quotas" => {
                    state.quotas.insert(id.to_string(), parse(&key, kv.value())?);
                }
                "drains" => {
                    state.drains.insert(id.to_string(), parse(&key, kv.value())?);
                }
                _ => tracing::warn!(key, "ignoring an unknown registry key"),
            }
        }
        Ok(state)
    }

    async fn apply(&mut self, changes: Vec<Change>) -> Result<(), RegistryError> {
        let writes = keyed_writes(&self.prefix, changes);
        if writes.len() > MAX_TXN_OPS {
            return Err(RegistryError::TooLarge(writes.len(), MAX_TXN_OPS));
        }
        if writes.is_empty() {
            return Ok(());
        }
        let ops: Vec<TxnOp> = writes
            .into_iter()
            .map(|(key, value)| match value {
                Some(value) => TxnOp::put(key, value, None),
                None => TxnOp::delete(key, None),
            })
            .collect();
        let txn = Txn::new()
            .when(vec![Compare::create_revision(self.fence.key.clone(), CompareOp::Equal, self.fence.rev)])
            .and_then(ops);
        let response = self.client.txn(txn).await?;
        if response.succeeded() { Ok(()) } else { Err(RegistryError::Fenced) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{AgentRecord, QuotaRecord};

    #[test]
    fn later_changes_to_a_key_win_within_one_write() {
        let agent = AgentRecord {
            id: "a1".into(),
            hostname: "h".into(),
            port: 1,
            resources: "cpus:1".into(),
            registered_time: 1.0,
        };
        let writes = keyed_writes("/c/registry/", vec![
            Change::PutAgent(agent),
            Change::SetWeight("web".into(), 2.0),
            Change::RemoveAgent("a1".into()),
            Change::SetQuota("web".into(), QuotaRecord { guarantee: "cpus:1".into(), limit: String::new() }),
            Change::RemoveQuota("batch".into()),
        ]);
        assert_eq!(writes.len(), 4);
        assert_eq!(writes["/c/registry/agents/a1"], None);
        assert_eq!(writes["/c/registry/weights/web"].as_deref(), Some("2.0"));
        assert_eq!(writes["/c/registry/quotas/web"].as_deref(), Some(r#"{"guarantee":"cpus:1","limit":""}"#));
        assert_eq!(writes["/c/registry/quotas/batch"], None);
    }
}
