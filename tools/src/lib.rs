//! Host-side tooling shared by the `hull` CLI, `hull-lab`, the tests and the
//! benchmark harness.

pub mod hostcheck;
pub mod lab;
pub mod lock;
pub mod runner;
