//! The agent's servers: the ttrpc `Agent` service (see `service`) and the
//! STDIO listener (see `crate::stdio`), on vsock in the guest or on unix
//! sockets (tests, development).
//!
//! [`start`] runs both on already bound listeners and returns a handle;
//! [`serve`] is the agent's main loop: bind, start, announce readiness,
//! serve forever.

// pub(crate): the fuzz targets (fuzz/, which compiles the agent's modules
// in) drive the service and the sandbox plan directly.
pub(crate) mod network;
pub(crate) mod sandbox;
pub(crate) mod service;
#[cfg(test)]
mod tests;

pub use sandbox::SandboxSettings;
pub use service::BackendSlot;

use crate::stdio::{serve_stdio, StdioRegistry};
use hull_agent_api::proto::agent_ttrpc::create_agent;
use hull_agent_api::{HOST_CID, READY_MARKER};
use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType, VsockAddr};
use std::fmt;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use ttrpc::r#async::transport::Listener;

/// How long WaitProcess waits, after the exit, for output streams to drain.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// vsock, any CID (the guest's), this port.
    Vsock(u32),
    Unix(PathBuf),
}

impl ListenAddr {
    /// `unix:///PATH` (or `unix:PATH`) or `vsock://PORT` (or `vsock:PORT`).
    pub fn parse(s: &str) -> Result<ListenAddr, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            if p.is_empty() {
                return Err(format!("{s:?}: empty unix socket path"));
            }
            return Ok(ListenAddr::Unix(p.into()));
        }
        if let Some(p) = s.strip_prefix("vsock:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            return p.parse().map(ListenAddr::Vsock).map_err(|_| format!("{s:?}: {p:?} is not a port number"));
        }
        Err(format!("{s:?}: expected unix:///PATH or vsock://PORT"))
    }

    /// Binds (inside the tokio runtime).
    pub fn bind(&self) -> io::Result<Listener> {
        let r = match self {
            ListenAddr::Vsock(port) => Listener::bind(format!("vsock://-1:{port}")),
            ListenAddr::Unix(path) => {
                // A socket file left by an earlier run is removed; one that
                // someone is still serving is not.
                if path.exists() && UnixStream::connect(path).is_err() {
                    let _ = std::fs::remove_file(path);
                }
                Listener::bind(format!("unix://{}", path.display()))
            }
        };
        r.map_err(|e| io::Error::new(e.kind(), format!("listening on {self}: {e}")))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Vsock(port) => write!(f, "vsock://{port}"),
            ListenAddr::Unix(path) => write!(f, "unix://{}", path.display()),
        }
    }
}

/// What the service is given.
pub struct ServerConfig {
    pub backend: BackendSlot,
    pub sandbox: SandboxSettings,
    /// See [`DEFAULT_DRAIN_TIMEOUT`].
    pub drain_timeout: Duration,
}

/// Both servers, running; dropping it stops both from accepting.
pub struct RunningServer {
    // Dropping the ttrpc server ends its accept loop.
    _ttrpc: ttrpc::r#async::Server,
    stdio: tokio::task::JoinHandle<()>,
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stdio.abort();
    }
}

/// Serves the ttrpc API on `api` and STDIO on `stdio`. Requests are handled
/// concurrently (each on its own task; backend calls on blocking threads).
/// Returns once both listeners accept.
pub async fn start(api: Listener, stdio: Listener, cfg: ServerConfig) -> io::Result<RunningServer> {
    let registry = Arc::new(StdioRegistry::default());
    let service = service::AgentService::new(cfg.backend, registry.clone(), cfg.sandbox, cfg.drain_timeout);
    let mut server = ttrpc::r#async::Server::new().add_listener(api).register_service(create_agent(Arc::new(service)));
    server.start().await.map_err(|e| io::Error::other(format!("starting the ttrpc server: {e}")))?;
    let stdio = tokio::spawn(serve_stdio(stdio, registry));
    Ok(RunningServer { _ttrpc: server, stdio })
}

/// The agent's main loop: binds both addresses, starts serving, prints the
/// ready line (and sends it to host port `notify_port` over vsock), then
/// serves until the process ends.
pub async fn serve(
    api: ListenAddr,
    stdio: ListenAddr,
    notify_port: Option<u32>,
    cfg: ServerConfig,
) -> Result<(), String> {
    let api_l = api.bind().map_err(|e| format!("{e} (is virtio-vsock present?)"))?;
    let stdio_l = stdio.bind().map_err(|e| e.to_string())?;
    let _running = start(api_l, stdio_l, cfg).await.map_err(|e| e.to_string())?;

    // Only now: requests can be served.
    let line = ready_line(&api, &stdio);
    println!("{line}");
    let _ = io::stdout().flush();
    if let Some(p) = notify_port {
        tokio::task::spawn_blocking(move || notify_host(p, &line));
    }
    std::future::pending::<()>().await;
    Ok(())
}

fn ready_line(api: &ListenAddr, stdio: &ListenAddr) -> String {
    let v = env!("CARGO_PKG_VERSION");
    match (api, stdio) {
        (ListenAddr::Vsock(a), ListenAddr::Vsock(s)) => {
            format!("{READY_MARKER} version={v} vsock_port={a} stdio_port={s}")
        }
        _ => format!("{READY_MARKER} version={v} listen={api} stdio_listen={stdio}"),
    }
}

/// Tells the host we are ready: the ready line on a fresh vsock connection
/// to host port `p`.
fn notify_host(p: u32, line: &str) {
    let result = (|| -> Result<(), String> {
        let fd =
            socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(|e| e.to_string())?;
        nix::sys::socket::connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, p)).map_err(|e| e.to_string())?;
        let mut s = UnixStream::from(fd);
        s.write_all(format!("{line}\n").as_bytes()).map_err(|e| e.to_string())
    })();
    if let Err(e) = result {
        eprintln!("hull-agent: notifying host port {p}: {e}");
    }
}
