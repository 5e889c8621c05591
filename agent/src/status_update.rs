//! The status update manager: reliable delivery of task status updates to the framework, via the master.
//!
//! Pure: no I/O and no clock (callers pass `now`). The agent checkpoints what goes in and out (see
//! [`crate::checkpoint`]) and sends what this returns.
//!
//! Rules (as in Mesos):
//! * updates of one task form a queue and are delivered in order; only the head is in flight;
//! * the head is resent with exponential backoff (`initial`, doubling, capped at `max`) until acknowledged;
//! * an acknowledgement must carry the head's uuid; anything else is stale and ignored;
//! * on (re-)registration every head is resent at once with the backoff reset.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use corral_proto::v1::{TaskState, TaskStatus};

/// Identifies a task's update stream: (framework id, task id).
pub type StreamKey = (String, String);

/// Retry timing.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_secs(2), max: Duration::from_secs(60) }
    }
}

#[derive(Debug, Default)]
struct UpdateStream {
    pending: VecDeque<TaskStatus>,
    next_retry: Option<Instant>,
    backoff: Duration,
    /// The terminal update was acknowledged: nothing more will come for this task.
    terminated: bool,
}

/// What an acknowledgement did.
#[derive(Debug, PartialEq)]
pub enum AckOutcome {
    /// The head was acknowledged; send this next, if anything.
    Next(Option<TaskStatus>),
    /// The head was acknowledged and it was terminal: the stream is finished.
    Finished,
    /// Not the head's uuid (a duplicate or stale ack): nothing changes.
    Ignored,
}

#[derive(Debug, Default)]
pub struct StatusUpdateManager {
    streams: BTreeMap<StreamKey, UpdateStream>,
    backoff: Backoff,
}

impl StatusUpdateManager {
    pub fn new(backoff: Backoff) -> Self {
        StatusUpdateManager { streams: BTreeMap::new(), backoff }
    }

    fn key(status: &TaskStatus) -> StreamKey {
        (status.framework_id.clone(), status.task_id.clone())
    }

    /// Queues an update. Returns it if it should be sent now (it is the head and the agent is `connected`).
    pub fn update(&mut self, status: TaskStatus, now: Instant, connected: bool) -> Option<TaskStatus> {
        let initial = self.backoff.initial;
        let stream = self.streams.entry(Self::key(&status)).or_default();
        stream.pending.push_back(status);
        if stream.pending.len() == 1 {
            stream.backoff = initial;
            if connected {
                stream.next_retry = Some(now + initial);
                return stream.pending.front().cloned();
            }
            stream.next_retry = Some(now);
        }
        None
    }

    /// Handles an acknowledgement relayed by the master.
    pub fn acknowledge(&mut self, key: &StreamKey, uuid: &[u8], now: Instant) -> AckOutcome {
        let initial = self.backoff.initial;
        let Some(stream) = self.streams.get_mut(key) else { return AckOutcome::Ignored };
        if stream.pending.front().is_none_or(|head| head.uuid != uuid) {
            return AckOutcome::Ignored;
        }
        let acked = stream.pending.pop_front().expect("head exists");
        let terminal = TaskState::try_from(acked.state).is_ok_and(|s| s.is_terminal());
        if terminal {
            stream.terminated = true;
        }
        stream.backoff = initial;
        stream.next_retry = stream.pending.front().map(|_| now + initial);
        match (stream.pending.front().cloned(), terminal) {
            (None, true) => AckOutcome::Finished,
            (next, _) => AckOutcome::Next(next),
        }
    }

    /// Heads whose retry time has come; their backoff doubles.
    pub fn due(&mut self, now: Instant) -> Vec<TaskStatus> {
        let max = self.backoff.max;
        let mut out = Vec::new();
        for stream in self.streams.values_mut() {
            if let (Some(head), Some(at)) = (stream.pending.front(), stream.next_retry)
                && at <= now
            {
                out.push(head.clone());
                stream.backoff = (stream.backoff * 2).min(max);
                stream.next_retry = Some(now + stream.backoff);
            }
        }
        out
    }

    /// Every head, for a fresh registration; backoff restarts.
    pub fn resend_all(&mut self, now: Instant) -> Vec<TaskStatus> {
        let initial = self.backoff.initial;
        self.streams
            .values_mut()
            .filter_map(|s| {
                let head = s.pending.front()?.clone();
                s.backoff = initial;
                s.next_retry = Some(now + initial);
                Some(head)
            })
            .collect()
    }

    /// Restores a task's stream after an agent restart: `pending` in order, resent on registration.
    pub fn restore(&mut self, key: StreamKey, pending: Vec<TaskStatus>, now: Instant) {
        if pending.is_empty() {
            return;
        }
        let stream = self.streams.entry(key).or_default();
        stream.pending = pending.into();
        stream.backoff = self.backoff.initial;
        stream.next_retry = Some(now);
    }

    /// Updates not yet acknowledged for a task.
    pub fn pending(&self, key: &StreamKey) -> usize {
        self.streams.get(key).map(|s| s.pending.len()).unwrap_or(0)
    }

    /// Whether the task's terminal update was acknowledged and nothing is pending.
    pub fn is_finished(&self, key: &StreamKey) -> bool {
        self.streams.get(key).is_some_and(|s| s.terminated && s.pending.is_empty())
    }

    /// Forgets a finished stream.
    pub fn remove(&mut self, key: &StreamKey) {
        self.streams.remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(task: &str, state: TaskState, uuid: u8) -> TaskStatus {
        TaskStatus {
            framework_id: "fw".into(),
            task_id: task.into(),
            state: state as i32,
            uuid: vec![uuid],
            ..Default::default()
        }
    }
    fn key(task: &str) -> StreamKey {
        ("fw".into(), task.into())
    }
    fn sum() -> StatusUpdateManager {
        StatusUpdateManager::new(Backoff { initial: Duration::from_secs(1), max: Duration::from_secs(4) })
    }

    #[test]
    fn only_the_head_is_in_flight_and_acks_advance_in_order() {
        let mut m = sum();
        let t0 = Instant::now();
        assert_eq!(m.update(st("t", TaskState::TaskStarting, 1), t0, true), Some(st("t", TaskState::TaskStarting, 1)));
        assert_eq!(m.update(st("t", TaskState::TaskRunning, 2), t0, true), None);
        assert_eq!(m.update(st("t", TaskState::TaskFinished, 3), t0, true), None);
        assert_eq!(m.pending(&key("t")), 3);
        assert_eq!(m.acknowledge(&key("t"), &[2], t0), AckOutcome::Ignored, "ack for a non-head uuid");
        assert_eq!(m.acknowledge(&key("t"), &[1], t0), AckOutcome::Next(Some(st("t", TaskState::TaskRunning, 2))));
        assert_eq!(m.acknowledge(&key("t"), &[1], t0), AckOutcome::Ignored, "duplicate ack");
        assert_eq!(m.acknowledge(&key("t"), &[2], t0), AckOutcome::Next(Some(st("t", TaskState::TaskFinished, 3))));
        assert!(!m.is_finished(&key("t")));
        assert_eq!(m.acknowledge(&key("t"), &[3], t0), AckOutcome::Finished);
        assert!(m.is_finished(&key("t")));
        m.remove(&key("t"));
        assert_eq!(m.pending(&key("t")), 0);
    }

    #[test]
    fn unacknowledged_heads_are_retried_with_capped_exponential_backoff() {
        let mut m = sum();
        let t0 = Instant::now();
        m.update(st("t", TaskState::TaskRunning, 1), t0, true);
        let s = Duration::from_secs;
        assert!(m.due(t0 + Duration::from_millis(999)).is_empty());
        let mut retries = Vec::new();
        let mut t = t0;
        for _ in 0..200 {
            t += Duration::from_millis(100);
            if !m.due(t).is_empty() {
                retries.push(t.duration_since(t0));
            }
        }
        // First retry after 1 s, then 2 s later, then 4 s (capped) each time.
        assert_eq!(retries[..4], [s(1), s(3), s(7), s(11)]);
        assert!(retries.windows(2).all(|w| w[1] - w[0] <= s(4)));
    }

    #[test]
    fn updates_queued_while_disconnected_go_out_on_registration() {
        let mut m = sum();
        let t0 = Instant::now();
        assert_eq!(m.update(st("a", TaskState::TaskRunning, 1), t0, false), None);
        assert_eq!(m.update(st("b", TaskState::TaskFailed, 2), t0, false), None);
        let mut heads = m.resend_all(t0);
        heads.sort_by(|x, y| x.task_id.cmp(&y.task_id));
        assert_eq!(heads, vec![st("a", TaskState::TaskRunning, 1), st("b", TaskState::TaskFailed, 2)]);
        assert!(m.due(t0).is_empty(), "backoff restarted");
    }

    #[test]
    fn restored_streams_resume_where_they_were() {
        let mut m = sum();
        let t0 = Instant::now();
        m.restore(key("t"), vec![st("t", TaskState::TaskRunning, 1), st("t", TaskState::TaskFinished, 2)], t0);
        assert_eq!(m.resend_all(t0), vec![st("t", TaskState::TaskRunning, 1)]);
        assert_eq!(m.acknowledge(&key("t"), &[1], t0), AckOutcome::Next(Some(st("t", TaskState::TaskFinished, 2))));
        assert_eq!(m.acknowledge(&key("t"), &[2], t0), AckOutcome::Finished);
        m.restore(key("u"), Vec::new(), t0);
        assert_eq!(m.pending(&key("u")), 0);
    }

    #[test]
    fn streams_are_independent() {
        let mut m = sum();
        let t0 = Instant::now();
        m.update(st("a", TaskState::TaskRunning, 1), t0, true);
        assert!(m.update(st("b", TaskState::TaskRunning, 2), t0, true).is_some());
        assert_eq!(m.acknowledge(&key("b"), &[1], t0), AckOutcome::Ignored);
        assert_eq!(m.acknowledge(&key("zzz"), &[1], t0), AckOutcome::Ignored);
    }
}
