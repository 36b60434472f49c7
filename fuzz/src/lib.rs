//! Shared code of hull's fuzz targets (see README.md): [`guest`] drives
//! virtqueues in guest memory for the device targets; [`agent`] drives the
//! agent's service and checks for the agent targets.
//!
//! hull-agent is a binary crate (scripts/build.sh relies on its single test
//! binary), so its modules are compiled into this crate from their sources,
//! at the crate root where their `crate::` paths expect them.

pub mod agent;
pub mod guest;

#[allow(dead_code, unused_imports)]
#[path = "../../agent/src/backend.rs"]
mod backend;
#[allow(dead_code, unused_imports)]
#[path = "../../agent/src/container/mod.rs"]
mod container;
#[allow(dead_code, unused_imports)]
#[path = "../../agent/src/server/mod.rs"]
mod server;
#[allow(dead_code, unused_imports)]
#[path = "../../agent/src/stdio.rs"]
mod stdio;
