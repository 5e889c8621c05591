//! What the agent writes to disk so that it can recover: its agent id, and per task the task and framework info
//! and a journal of status updates and acknowledgements (`updates.jsonl`, fsynced before an update is sent).

use std::io::Write;
use std::path::{Path, PathBuf};

use corral_proto::v1;
use serde::{Deserialize, Serialize};

/// One journal line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalEntry {
    /// A status update, protobuf-encoded then hex.
    Update(String),
    /// An acknowledged update's uuid, hex.
    Ack(String),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// What a task's journal says, replayed.
#[derive(Debug, Default, PartialEq)]
pub struct Replayed {
    /// Updates not acknowledged yet, in order.
    pub pending: Vec<v1::TaskStatus>,
    /// The newest update, acknowledged or not.
    pub latest: Option<v1::TaskStatus>,
}

/// Replays a journal: acks remove the head they name. Pure; a torn last line (crash mid-write) is ignored.
pub fn replay(text: &str) -> Replayed {
    use prost::Message;
    let mut out = Replayed::default();
    for line in text.lines() {
        match serde_json::from_str::<JournalEntry>(line) {
            Ok(JournalEntry::Update(h)) => {
                if let Some(s) = unhex(&h).and_then(|b| v1::TaskStatus::decode(b.as_slice()).ok()) {
                    out.latest = Some(s.clone());
                    out.pending.push(s);
                }
            }
            Ok(JournalEntry::Ack(h)) => {
                if let Some(uuid) = unhex(&h)
                    && out.pending.first().is_some_and(|s| s.uuid == uuid)
                {
                    out.pending.remove(0);
                }
            }
            Err(_) => {}
        }
    }
    out
}

/// Files under `<work-dir>/meta`.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    meta: PathBuf,
}

impl Checkpoint {
    pub fn new(work_dir: &Path) -> Self {
        Checkpoint { meta: work_dir.join("meta") }
    }

    fn agent_id_path(&self) -> PathBuf {
        self.meta.join("agent_id")
    }

    /// The agent id assigned by the master, if this work dir had one.
    pub fn agent_id(&self) -> Option<String> {
        let id = std::fs::read_to_string(self.agent_id_path()).ok()?;
        let id = id.trim().to_string();
        corral_proto::AgentId::new(id.clone()).ok().map(|_| id)
    }

    pub fn save_agent_id(&self, id: &str) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.meta)?;
        let tmp = self.agent_id_path().with_extension("tmp");
        std::fs::write(&tmp, id)?;
        std::fs::rename(tmp, self.agent_id_path())
    }

    /// Saves what is needed to describe the task after a restart.
    /// The resources last set by the master (reservations and volumes included), if any.
    pub fn resources(&self) -> Option<corral_proto::Resources> {
        corral_proto::Resources::parse(std::fs::read_to_string(self.meta.join("resources")).ok()?.trim()).ok()
    }

    pub fn save_resources(&self, resources: &corral_proto::Resources) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.meta)?;
        let tmp = self.meta.join("resources.tmp");
        std::fs::write(&tmp, resources.to_string())?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(tmp, self.meta.join("resources"))
    }

    /// The run dirs of every task this agent checkpointed (`meta/tasks/<framework>/<task>`).
    pub fn task_dirs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let Ok(frameworks) = std::fs::read_dir(self.meta.join("tasks")) else { return out };
        for f in frameworks.flatten() {
            if let Ok(tasks) = std::fs::read_dir(f.path()) {
                out.extend(tasks.flatten().map(|t| t.path()).filter(|p| p.is_dir()));
            }
        }
        out.sort();
        out
    }

    /// The framework and task info saved at launch, and the replayed journal.
    pub fn load_task(&self, run_dir: &Path) -> Option<(v1::FrameworkInfo, v1::TaskInfo, Replayed)> {
        use prost::Message;
        let framework = v1::FrameworkInfo::decode(std::fs::read(run_dir.join("framework.pb")).ok()?.as_slice()).ok()?;
        let task = v1::TaskInfo::decode(std::fs::read(run_dir.join("task.pb")).ok()?.as_slice()).ok()?;
        let journal = std::fs::read_to_string(run_dir.join("updates.jsonl")).unwrap_or_default();
        Some((framework, task, replay(&journal)))
    }

    pub fn save_task(&self, run_dir: &Path, framework: &v1::FrameworkInfo, task: &v1::TaskInfo, cgroup: &str) -> std::io::Result<()> {
        use prost::Message;
        std::fs::create_dir_all(run_dir)?;
        std::fs::write(run_dir.join("framework.pb"), framework.encode_to_vec())?;
        std::fs::write(run_dir.join("cgroup"), cgroup)?;
        std::fs::write(run_dir.join("task.pb"), task.encode_to_vec())
    }

    /// The cgroup path chosen for the task at launch.
    pub fn task_cgroup(&self, run_dir: &Path) -> Option<String> {
        let path = std::fs::read_to_string(run_dir.join("cgroup")).ok()?;
        // Written by us from validated ids; refuse anything else rather than follow it.
        (!path.is_empty() && !path.split('/').any(|c| c.is_empty() || c == "." || c == "..")).then_some(path)
    }

    /// Appends an update to the task's journal and syncs it before the update may be sent.
    pub fn journal_update(&self, run_dir: &Path, status: &v1::TaskStatus) -> std::io::Result<()> {
        use prost::Message;
        self.append(run_dir, &JournalEntry::Update(hex(&status.encode_to_vec())), true)
    }

    /// Records an acknowledgement (not synced: losing it only causes one harmless resend).
    pub fn journal_ack(&self, run_dir: &Path, uuid: &[u8]) -> std::io::Result<()> {
        self.append(run_dir, &JournalEntry::Ack(hex(uuid)), false)
    }

    fn append(&self, run_dir: &Path, entry: &JournalEntry, sync: bool) -> std::io::Result<()> {
        std::fs::create_dir_all(run_dir)?;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(run_dir.join("updates.jsonl"))?;
        let mut line = serde_json::to_vec(entry).map_err(std::io::Error::other)?;
        line.push(b'\n');
        f.write_all(&line)?;
        if sync {
            f.sync_data()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_id_round_trips_and_bad_ids_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoint::new(dir.path());
        assert_eq!(c.agent_id(), None);
        c.save_agent_id("agent-1").unwrap();
        assert_eq!(c.agent_id().as_deref(), Some("agent-1"));
        std::fs::write(dir.path().join("meta/agent_id"), "../evil").unwrap();
        assert_eq!(c.agent_id(), None);
    }

    #[test]
    fn replay_keeps_what_was_not_acknowledged_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoint::new(dir.path());
        let run = dir.path().join("run");
        let st = |state: v1::TaskState, u: u8| v1::TaskStatus { task_id: "t".into(), state: state as i32, uuid: vec![u], ..Default::default() };
        c.journal_update(&run, &st(v1::TaskState::TaskStarting, 1)).unwrap();
        c.journal_update(&run, &st(v1::TaskState::TaskRunning, 2)).unwrap();
        c.journal_ack(&run, &[2]).unwrap(); // not the head: ignored
        c.journal_ack(&run, &[1]).unwrap();
        c.journal_update(&run, &st(v1::TaskState::TaskFinished, 3)).unwrap();
        let mut text = std::fs::read_to_string(run.join("updates.jsonl")).unwrap();
        text.push_str("{\"update\":\"0a"); // torn write
        let r = replay(&text);
        assert_eq!(r.pending, vec![st(v1::TaskState::TaskRunning, 2), st(v1::TaskState::TaskFinished, 3)]);
        assert_eq!(r.latest, Some(st(v1::TaskState::TaskFinished, 3)));
        assert_eq!(replay(""), Replayed::default());
        assert_eq!(unhex("0a1"), None);
        assert_eq!(unhex("zz"), None);
    }

    #[test]
    fn journal_appends_lines() {
        let dir = tempfile::tempdir().unwrap();
        let c = Checkpoint::new(dir.path());
        let run = dir.path().join("run");
        let s = v1::TaskStatus { task_id: "t".into(), uuid: vec![1, 2], ..Default::default() };
        c.journal_update(&run, &s).unwrap();
        c.journal_ack(&run, &[1, 2]).unwrap();
        let text = std::fs::read_to_string(run.join("updates.jsonl")).unwrap();
        let lines: Vec<JournalEntry> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(matches!(&lines[1], JournalEntry::Ack(u) if u == "0102"));
        assert!(matches!(&lines[0], JournalEntry::Update(_)));
    }
}
