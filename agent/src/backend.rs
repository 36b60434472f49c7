//! The seam between the API server (ttrpc handlers, validation, stdio
//! streams) and the container implementation (namespaces, cgroups, rootfs).
//! The server validates every request before calling in here; the backend
//! still refuses what it cannot do, with an error naming the problem.
//!
//! Calls are blocking; the server runs them on blocking threads.

use hull_agent_api::phases::Phases;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use std::os::fd::OwnedFd;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, BackendError>;

/// Which standard streams the process gets (see the proto's `Stdio`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StdioConfig {
    pub terminal: bool,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

/// The host-facing ends of a new process's streams: write to `stdin`, read
/// from `stdout`/`stderr`; with a terminal, `pty` (the master) is both.
/// Streams not asked for are None (the process gets /dev/null).
#[derive(Debug, Default)]
pub struct ProcessIo {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub pty: Option<OwnedFd>,
}

#[derive(Debug)]
pub struct ProcessHandle {
    pub pid: u32,
    pub io: ProcessIo,
    /// Where creating it took its time (empty where not measured).
    pub phases: Phases,
}

/// A container to create. `layers` are validated relative paths (no `..`,
/// not absolute) under the shared file system, lowest first.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub id: String,
    pub spec: Spec,
    pub layers: Vec<String>,
    pub rw_disk_serial: Option<String>,
    pub stdio: StdioConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal.
    pub status: i32,
    pub exited_at_unix_nanos: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub memory_current: u64,
    pub memory_max: u64,
    pub memory_anon: u64,
    pub memory_file: u64,
    pub memory_oom_kills: u64,
    pub pids_current: u64,
    pub pids_max: u64,
    pub io_read_bytes: u64,
    pub io_write_bytes: u64,
}

pub trait Backend: Send + Sync + 'static {
    /// Creates the container; its init process exists but has not exec'd the
    /// user's program yet (it does at `start`).
    fn create(&self, c: CreateSpec) -> Result<ProcessHandle>;
    fn start(&self, id: &str) -> Result<u32>;
    fn exec(&self, id: &str, exec_id: &str, process: Process, stdio: StdioConfig) -> Result<ProcessHandle>;
    /// `exec_id` None = the init process; `all` = every process in the container.
    fn signal(&self, id: &str, exec_id: Option<&str>, signal: i32, all: bool) -> Result<()>;
    /// Blocks until the process has exited (not until its output is drained:
    /// the server does that).
    fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitInfo>;
    /// Removes the container: its processes (if `force`), mounts, cgroup
    /// (back to the pool), state. Refuses a running container without `force`.
    fn delete(&self, id: &str, force: bool) -> Result<()>;
    fn pause(&self, id: &str) -> Result<()>;
    fn resume(&self, id: &str) -> Result<()>;
    fn update(&self, id: &str, resources: LinuxResources) -> Result<()>;
    fn stats(&self, id: &str) -> Result<Stats>;
    fn pids(&self, id: &str) -> Result<Vec<u32>>;
    fn resize_tty(&self, id: &str, exec_id: Option<&str>, rows: u16, cols: u16) -> Result<()>;
    /// Blocks until a container is OOM-killed; returns its id.
    fn next_oom(&self) -> Result<String>;
    /// (number of containers, free cgroups in the pool)
    fn counts(&self) -> (u32, u32);
}
