//! corral-agent: runs on every node; registers with the master, launches tasks through a per-task shim, and
//! delivers their status updates reliably.
//!
//! * [`agent`] — the event loop (tasks, master session, status updates);
//! * [`status_update`] — the pure retry state machine for status updates;
//! * [`launcher`] / [`shim`] — starting, killing and reaping tasks;
//! * [`isolation`] — the `Isolator` trait that cgroup backends implement;
//! * [`checkpoint`] — what is written to disk for recovery;
//! * [`detect`] — the node's resources and attributes;
//! * [`http`] — `/state` and sandbox file reads.

pub mod agent;
pub mod check;
pub mod checkpoint;
pub mod detect;
pub mod health;
pub mod http;
pub mod isolation;
pub mod launcher;
pub mod metrics;
pub mod shim;
pub mod status_update;
