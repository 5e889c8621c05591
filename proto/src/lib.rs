//! corral-proto: the wire protocol shared by master, agent, SDK and CLI, and the domain types every component
//! must agree on: resources (text form, arithmetic), ids, and task states.
//!
//! This crate does no I/O. Anything that is computed the same way in two components belongs here, once.

pub mod codec;
pub mod config;
pub mod health;
pub mod ids;
pub mod resources;
pub mod state;

/// Generated protobuf and gRPC code (package `corral.v1`).
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("corral.v1");
}

pub use ids::{AgentId, FrameworkId, IdError, OfferId, TaskId};
pub use resources::{ParseError, Resources, VolumeSpec};

/// Seconds since the Unix epoch as `f64`, the timestamp unit of `TaskStatus`.
pub fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Version string every binary reports.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
