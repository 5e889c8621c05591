//! System scenarios, one test binary: real master and agent processes, real task processes in real cgroups,
//! frameworks on the real SDK.

mod api;
mod cli;
mod dashboard;
mod foundation;
mod ha;
mod isolation;
mod health;
mod recovery;
mod volumes;
