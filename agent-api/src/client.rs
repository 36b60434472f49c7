//! The host-side client of the agent's ttrpc service.
//!
//! [`AgentClient`] is async (tokio): connect over an [`AgentAddr`], then call.
//! Every call has a deadline (the client's timeout, sent to the agent too)
//! except the ones that wait by design ([`AgentClient::wait_process`],
//! [`AgentClient::get_oom_event`]). One client can carry many concurrent
//! calls; it is cheap to clone (clones share the connection).
//!
//! [`ping`] is the blocking convenience used by `hull ping` and the tests.

use crate::proto::agent::*;
use crate::proto::agent_ttrpc;
use crate::transport::{connect_agent, AgentAddr};
use std::future::Future;
use std::io;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use ttrpc::context::Context;
use ttrpc::Code;

/// Per-call deadline of a new client.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to the agent at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: io::Error,
    },
    /// The agent answered with an error status.
    #[error("{method}: {code:?}: {message}")]
    Status { method: &'static str, code: Code, message: String },
    #[error("{method}: no answer within {timeout:?}")]
    Timeout { method: &'static str, timeout: Duration },
    /// The connection failed, or the request could not be sent (e.g. larger
    /// than ttrpc's 4 MiB message limit).
    #[error("{method}: {message}")]
    Transport { method: &'static str, message: String },
    #[error("the agent at {addr} did not answer within {within:?}: {last}")]
    NotReady { addr: String, within: Duration, last: Box<ClientError> },
}

impl ClientError {
    /// The status code, if the agent answered with an error status.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status { code, .. } => Some(*code),
            ClientError::NotReady { last, .. } => last.code(),
            _ => None,
        }
    }

    /// The agent's message, if it answered with an error status.
    pub fn message(&self) -> Option<&str> {
        match self {
            ClientError::Status { message, .. } => Some(message),
            ClientError::NotReady { last, .. } => last.message(),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// An async client of the agent's ttrpc `Agent` service.
#[derive(Clone)]
pub struct AgentClient {
    inner: agent_ttrpc::AgentClient,
    timeout: Duration,
}

impl AgentClient {
    /// Connects (vsock, hybrid handshake or unix socket); `timeout` bounds
    /// the connection and becomes the per-call deadline. Must be called
    /// inside a tokio runtime.
    pub async fn connect(addr: &AgentAddr, timeout: Duration) -> Result<AgentClient> {
        let a = addr.clone();
        let stream = tokio::task::spawn_blocking(move || connect_agent(&a, timeout))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .map_err(|source| ClientError::Connect { addr: addr.to_string(), source })?;
        AgentClient::from_stream(stream, timeout)
            .map_err(|source| ClientError::Connect { addr: addr.to_string(), source })
    }

    /// Wraps an already connected stream (e.g. after a custom handshake).
    /// Must be called inside a tokio runtime.
    pub fn from_stream(stream: UnixStream, timeout: Duration) -> io::Result<AgentClient> {
        stream.set_read_timeout(None)?;
        stream.set_write_timeout(None)?;
        let socket = ttrpc::r#async::transport::Socket::try_from(stream)?;
        let client = ttrpc::r#async::Client::new(socket);
        Ok(AgentClient { inner: agent_ttrpc::AgentClient::new(client), timeout })
    }

    /// A client on the same connection with another per-call deadline.
    pub fn with_timeout(&self, timeout: Duration) -> AgentClient {
        AgentClient { inner: self.inner.clone(), timeout }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The generated client, for calls with a custom [`Context`].
    pub fn raw(&self) -> &agent_ttrpc::AgentClient {
        &self.inner
    }

    async fn call<T, F, Fut>(&self, method: &'static str, deadline: bool, f: F) -> Result<T>
    where
        F: FnOnce(agent_ttrpc::AgentClient, Context) -> Fut,
        Fut: Future<Output = ttrpc::Result<T>>,
    {
        let ctx = if deadline { ttrpc::context::with_duration(self.timeout) } else { Context::default() };
        f(self.inner.clone(), ctx).await.map_err(|e| match e {
            ttrpc::Error::RpcStatus(s) => {
                ClientError::Status { method, code: s.code(), message: s.message().to_string() }
            }
            ttrpc::Error::Others(m) if m.contains("deadline elapsed") => {
                ClientError::Timeout { method, timeout: self.timeout }
            }
            e => ClientError::Transport { method, message: e.to_string() },
        })
    }

    pub async fn version(&self) -> Result<VersionResponse> {
        self.call("Version", true, |c, ctx| async move { c.version(ctx, &VersionRequest::new()).await }).await
    }

    pub async fn health(&self) -> Result<HealthResponse> {
        self.call("Health", true, |c, ctx| async move { c.health(ctx, &HealthRequest::new()).await }).await
    }

    pub async fn setup_sandbox(&self, req: &SetupSandboxRequest) -> Result<()> {
        self.call("SetupSandbox", true, |c, ctx| async move { c.setup_sandbox(ctx, req).await }).await.map(drop)
    }

    /// Returns the pid of the container's init process (not yet running the
    /// user's program: see [`AgentClient::start_container`]).
    pub async fn create_container(&self, req: &CreateContainerRequest) -> Result<u32> {
        self.create_container_timed(req).await.map(|r| r.pid)
    }

    /// [`AgentClient::create_container`] with the agent's phase marks.
    pub async fn create_container_timed(&self, req: &CreateContainerRequest) -> Result<CreateContainerResponse> {
        self.call("CreateContainer", true, |c, ctx| async move { c.create_container(ctx, req).await }).await
    }

    pub async fn start_container(&self, container_id: &str) -> Result<u32> {
        let req = container_request(container_id);
        self.call("StartContainer", true, |c, ctx| async move { c.start_container(ctx, &req).await })
            .await
            .map(|r| r.pid)
    }

    pub async fn delete_container(&self, container_id: &str, force: bool) -> Result<()> {
        let req = DeleteContainerRequest { container_id: container_id.to_string(), force, ..Default::default() };
        self.call("DeleteContainer", true, |c, ctx| async move { c.delete_container(ctx, &req).await }).await.map(drop)
    }

    pub async fn pause_container(&self, container_id: &str) -> Result<()> {
        let req = container_request(container_id);
        self.call("PauseContainer", true, |c, ctx| async move { c.pause_container(ctx, &req).await }).await.map(drop)
    }

    pub async fn resume_container(&self, container_id: &str) -> Result<()> {
        let req = container_request(container_id);
        self.call("ResumeContainer", true, |c, ctx| async move { c.resume_container(ctx, &req).await }).await.map(drop)
    }

    pub async fn update_resources(&self, container_id: &str, oci_resources_json: Vec<u8>) -> Result<()> {
        let req =
            UpdateResourcesRequest { container_id: container_id.to_string(), oci_resources_json, ..Default::default() };
        self.call("UpdateResources", true, |c, ctx| async move { c.update_resources(ctx, &req).await }).await.map(drop)
    }

    pub async fn stats(&self, container_id: &str) -> Result<StatsResponse> {
        let req = container_request(container_id);
        self.call("Stats", true, |c, ctx| async move { c.stats(ctx, &req).await }).await
    }

    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<u32>> {
        let req = container_request(container_id);
        self.call("ListProcesses", true, |c, ctx| async move { c.list_processes(ctx, &req).await })
            .await
            .map(|r| r.pids)
    }

    /// Returns the new process's pid.
    pub async fn exec_process(&self, req: &ExecProcessRequest) -> Result<u32> {
        self.call("ExecProcess", true, |c, ctx| async move { c.exec_process(ctx, req).await }).await.map(|r| r.pid)
    }

    /// `exec_id` None = the container's init process; `all` = every process
    /// in the container (init only).
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: Option<&str>,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let req = SignalProcessRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.unwrap_or_default().to_string(),
            signal,
            all,
            ..Default::default()
        };
        self.call("SignalProcess", true, |c, ctx| async move { c.signal_process(ctx, &req).await }).await.map(drop)
    }

    /// Waits, without a deadline, until the process has exited and its
    /// attached output streams are drained.
    pub async fn wait_process(&self, container_id: &str, exec_id: Option<&str>) -> Result<WaitProcessResponse> {
        let req = process_request(container_id, exec_id);
        self.call("WaitProcess", false, |c, ctx| async move { c.wait_process(ctx, &req).await }).await
    }

    pub async fn resize_tty(&self, container_id: &str, exec_id: Option<&str>, rows: u32, cols: u32) -> Result<()> {
        let req = ResizeTtyRequest {
            container_id: container_id.to_string(),
            exec_id: exec_id.unwrap_or_default().to_string(),
            rows,
            cols,
            ..Default::default()
        };
        self.call("ResizeTty", true, |c, ctx| async move { c.resize_tty(ctx, &req).await }).await.map(drop)
    }

    pub async fn close_stdin(&self, container_id: &str, exec_id: Option<&str>) -> Result<()> {
        let req = process_request(container_id, exec_id);
        self.call("CloseStdin", true, |c, ctx| async move { c.close_stdin(ctx, &req).await }).await.map(drop)
    }

    /// Long poll without a deadline: the id of the next OOM-killed container.
    pub async fn get_oom_event(&self) -> Result<String> {
        self.call("GetOomEvent", false, |c, ctx| async move { c.get_oom_event(ctx, &GetOomEventRequest::new()).await })
            .await
            .map(|r| r.container_id)
    }
}

fn container_request(container_id: &str) -> ContainerRequest {
    ContainerRequest { container_id: container_id.to_string(), ..Default::default() }
}

fn process_request(container_id: &str, exec_id: Option<&str>) -> ProcessRequest {
    ProcessRequest {
        container_id: container_id.to_string(),
        exec_id: exec_id.unwrap_or_default().to_string(),
        ..Default::default()
    }
}

/// Blocking: connects and calls Version, retrying until `within` has passed
/// (the guest may still be booting). Returns the agent's version. Runs its
/// own small runtime: do not call it from inside a tokio runtime.
pub fn ping(addr: &AgentAddr, within: Duration) -> Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| ClientError::Connect { addr: addr.to_string(), source })?;
    rt.block_on(async {
        let start = Instant::now();
        loop {
            let step = within.saturating_sub(start.elapsed()).clamp(Duration::from_millis(100), Duration::from_secs(5));
            let attempt = async { AgentClient::connect(addr, step).await?.version().await };
            match attempt.await {
                Ok(v) => return Ok(v.agent_version),
                Err(e) if start.elapsed() >= within => {
                    return Err(ClientError::NotReady { addr: addr.to_string(), within, last: Box::new(e) })
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
}
