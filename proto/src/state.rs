//! Task states: which are terminal, and the one rule for applying a new state to a task.

use crate::v1::TaskState;

impl TaskState {
    /// A terminal state never changes again.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::TaskFinished
                | TaskState::TaskFailed
                | TaskState::TaskKilled
                | TaskState::TaskError
                | TaskState::TaskLost
                | TaskState::TaskDropped
                | TaskState::TaskGone
                | TaskState::TaskGoneByOperator
        )
    }

    /// Whether a task in `self` may move to `next`. Terminal states are final; anything else may move anywhere
    /// (an UNREACHABLE task may come back RUNNING when its agent re-registers).
    pub fn may_become(self, next: TaskState) -> bool {
        !self.is_terminal() && next != TaskState::Unspecified
    }

    /// The Mesos-style name, e.g. `TASK_RUNNING`.
    pub fn name(self) -> &'static str {
        self.as_str_name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [TaskState; 14] = [
        TaskState::TaskStaging,
        TaskState::TaskStarting,
        TaskState::TaskRunning,
        TaskState::TaskKilling,
        TaskState::TaskFinished,
        TaskState::TaskFailed,
        TaskState::TaskKilled,
        TaskState::TaskError,
        TaskState::TaskLost,
        TaskState::TaskDropped,
        TaskState::TaskUnreachable,
        TaskState::TaskGone,
        TaskState::TaskGoneByOperator,
        TaskState::TaskUnknown,
    ];

    #[test]
    fn terminal_states_are_final_and_others_move_freely() {
        for from in ALL {
            for to in ALL {
                assert_eq!(from.may_become(to), !from.is_terminal(), "{from:?} -> {to:?}");
            }
            assert!(!from.may_become(TaskState::Unspecified));
        }
        let terminal: Vec<_> = ALL.iter().filter(|s| s.is_terminal()).collect();
        assert_eq!(terminal.len(), 8);
        assert!(!TaskState::TaskUnreachable.is_terminal());
        assert_eq!(TaskState::TaskRunning.name(), "TASK_RUNNING");
    }
}
