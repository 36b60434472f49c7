//! The wire protocol between the host (shim, tools) and `hull-agent` in the guest.
//!
//! Two vsock ports on the guest side:
//!
//! - the API port ([`DEFAULT_AGENT_PORT`] = 1024, `hull.agent_port=N` on the
//!   guest kernel command line): the ttrpc service `hull.agent.v1.Agent` of
//!   `proto/agent.proto`. Messages and the generated async (tokio) server
//!   trait and client are in [`proto`]; [`AgentClient`] is the host-side
//!   client with per-call deadlines and [`ping`] its blocking readiness probe.
//! - the STDIO port ([`DEFAULT_STDIO_PORT`] = 1025, `hull.stdio_port=N`):
//!   one connection per process stream, see [`stdio`] for the protocol and
//!   [`open_stdio`] for the host side.
//!
//! [`transport`] reaches either port over real vsock, hull-vmm's hybrid unix
//! socket, or (an agent run outside a VM) a plain unix socket. [`validate`]
//! holds the checks the agent applies to every request.

pub mod client;
pub mod phases;
pub mod stdio;
pub mod transport;
pub mod validate;

/// Generated from `proto/agent.proto` by ttrpc-codegen (see `build.rs`).
pub mod proto {
    /// The protobuf messages.
    #[allow(
        unknown_lints,
        clippy::all,
        dead_code,
        missing_docs,
        non_camel_case_types,
        non_snake_case,
        non_upper_case_globals,
        trivial_casts,
        unused_attributes,
        unused_mut,
        unused_results
    )]
    pub mod agent {
        include!(concat!(env!("OUT_DIR"), "/agent.rs"));
    }

    /// The async ttrpc service: the `Agent` server trait, `create_agent`
    /// (its registration for a `ttrpc::r#async::Server`) and `AgentClient`.
    #[allow(
        unknown_lints,
        clippy::all,
        dead_code,
        missing_docs,
        non_camel_case_types,
        non_snake_case,
        non_upper_case_globals,
        trivial_casts,
        unsafe_code,
        unused_imports,
        unused_results
    )]
    pub mod agent_ttrpc {
        include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
    }
}

pub use client::{ping, AgentClient, ClientError};
pub use stdio::{open_stdio, StdioHeader, StdioStream};
pub use transport::AgentAddr;
/// The ttrpc and protobuf crates the generated code is built on, for users
/// that need their types (status codes, contexts, servers).
pub use {protobuf, ttrpc};

/// Version of the `hull.agent.v1` API this crate speaks (returned by Version);
/// bumped on compatible additions.
pub const API_VERSION: u32 = 1;

/// Default vsock port of the agent's ttrpc API (overridable by
/// `hull.agent_port=` on the guest kernel command line).
pub const DEFAULT_AGENT_PORT: u32 = 1024;

/// Kernel command-line key that sets the agent's API vsock port.
pub const CMDLINE_AGENT_PORT: &str = "hull.agent_port";

/// Default vsock port of the agent's STDIO listener (see [`stdio`]).
pub const DEFAULT_STDIO_PORT: u32 = 1025;

/// Kernel command-line key that sets the agent's STDIO vsock port.
pub const CMDLINE_STDIO_PORT: &str = "hull.stdio_port";

/// Kernel command-line key: if set, once ready the agent connects to this
/// host vsock port (CID 2) and sends [`READY_MARKER`] plus its version, so
/// the host learns readiness without polling.
pub const CMDLINE_NOTIFY_PORT: &str = "hull.notify_port";

/// The host's vsock CID.
pub const HOST_CID: u32 = 2;

/// The line the agent prints on the console once it serves requests.
pub const READY_MARKER: &str = "hull-agent: ready";
