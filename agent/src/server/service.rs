//! The ttrpc `Agent` service: validate, call the backend on a blocking
//! thread, map its errors to status codes.

use super::sandbox::{self, SandboxSettings};
use crate::backend::{Backend, BackendError, CreateSpec, StdioConfig};
use crate::stdio::{proc_name, ProcKey, StdioRegistry};
use async_trait::async_trait;
use hull_agent_api::proto::agent::*;
use hull_agent_api::proto::agent_ttrpc::Agent;
use hull_agent_api::validate::{check_disk_serial, check_id, check_layer, MAX_LAYERS};
use hull_agent_api::API_VERSION;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use std::sync::Arc;
use std::time::Duration;
use ttrpc::r#async::TtrpcContext;
use ttrpc::{Code, Error};

type Reply<T> = ttrpc::Result<T>;

/// The backend the service drives, or why there is none (the agent then
/// still answers Version, Health and SetupSandbox, and refuses the rest).
pub type BackendSlot = Result<Arc<dyn Backend>, String>;

pub struct AgentService {
    backend: BackendSlot,
    stdio: Arc<StdioRegistry>,
    sandbox: SandboxSettings,
    drain_timeout: Duration,
}

impl AgentService {
    pub fn new(
        backend: BackendSlot,
        stdio: Arc<StdioRegistry>,
        sandbox: SandboxSettings,
        drain_timeout: Duration,
    ) -> AgentService {
        AgentService { backend, stdio, sandbox, drain_timeout }
    }

    /// Runs `f` with the backend on a blocking thread. `what` names the
    /// container or process in error messages.
    async fn call<T, F>(&self, what: &str, f: F) -> Reply<T>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Backend) -> crate::backend::Result<T> + Send + 'static,
    {
        let backend = match &self.backend {
            Ok(b) => b.clone(),
            Err(why) => return Err(status(Code::FAILED_PRECONDITION, format!("{what}: no container backend: {why}"))),
        };
        match tokio::task::spawn_blocking(move || f(&*backend)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(backend_error(what, e)),
            Err(e) => Err(status(Code::INTERNAL, format!("{what}: the backend call failed: {e}"))),
        }
    }
}

pub fn status(code: Code, message: impl ToString) -> Error {
    Error::RpcStatus(ttrpc::get_status(code, message))
}

fn invalid(message: impl ToString) -> Error {
    status(Code::INVALID_ARGUMENT, message)
}

fn backend_error(what: &str, e: BackendError) -> Error {
    let (code, msg) = match e {
        BackendError::NotFound(m) => (Code::NOT_FOUND, m),
        BackendError::AlreadyExists(m) => (Code::ALREADY_EXISTS, m),
        BackendError::InvalidArgument(m) => (Code::INVALID_ARGUMENT, m),
        BackendError::FailedPrecondition(m) => (Code::FAILED_PRECONDITION, m),
        BackendError::Internal(m) => (Code::INTERNAL, m),
    };
    status(code, format!("{what}: {msg}"))
}

fn container(id: &str) -> Reply<String> {
    check_id("container_id", id).map_err(invalid)?;
    Ok(format!("container {id}"))
}

/// (key, name for messages); an empty exec id is the init process.
fn process(container_id: &str, exec_id: &str) -> Reply<(ProcKey, String)> {
    check_id("container_id", container_id).map_err(invalid)?;
    let exec = if exec_id.is_empty() {
        None
    } else {
        check_id("exec_id", exec_id).map_err(invalid)?;
        Some(exec_id.to_string())
    };
    let key = (container_id.to_string(), exec);
    let name = format!("process {}", proc_name(&key));
    Ok((key, name))
}

fn stdio_config(s: Option<&Stdio>) -> Reply<StdioConfig> {
    let s = s.cloned().unwrap_or_default();
    if s.terminal && s.stderr {
        return Err(invalid("stdio: a terminal has no separate stderr (terminal and stderr are both set)"));
    }
    Ok(StdioConfig { terminal: s.terminal, stdin: s.stdin, stdout: s.stdout, stderr: s.stderr })
}

fn parse_json<T: serde::de::DeserializeOwned>(field: &str, json: &[u8]) -> Reply<T> {
    if json.is_empty() {
        return Err(invalid(format!("{field} is empty")));
    }
    serde_json::from_slice(json).map_err(|e| invalid(format!("{field}: {e}")))
}

fn signal_number(n: u32) -> Reply<i32> {
    if (1..=64).contains(&n) {
        Ok(n as i32)
    } else {
        Err(invalid(format!("signal {n} is not a signal number (1 to 64)")))
    }
}

fn tty_dimension(what: &str, n: u32) -> Reply<u16> {
    u16::try_from(n).map_err(|_| invalid(format!("{what} {n} is larger than 65535")))
}

#[async_trait]
impl Agent for AgentService {
    async fn version(&self, _: &TtrpcContext, _: VersionRequest) -> Reply<VersionResponse> {
        Ok(VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            api_version: API_VERSION,
            ..Default::default()
        })
    }

    async fn health(&self, _: &TtrpcContext, _: HealthRequest) -> Reply<HealthResponse> {
        let (containers, cgroup_pool_free) = match &self.backend {
            Ok(_) => self.call("health", |b| Ok(b.counts())).await?,
            Err(_) => (0, 0),
        };
        Ok(HealthResponse { serving: self.backend.is_ok(), containers, cgroup_pool_free, ..Default::default() })
    }

    async fn setup_sandbox(&self, _: &TtrpcContext, req: SetupSandboxRequest) -> Reply<Empty> {
        let plan = sandbox::plan(&req).map_err(invalid)?;
        let settings = self.sandbox.clone();
        match tokio::task::spawn_blocking(move || sandbox::apply(&plan, &settings)).await {
            Ok(Ok(())) => Ok(Empty::new()),
            Ok(Err(e)) => Err(status(Code::INTERNAL, format!("SetupSandbox: {e}"))),
            Err(e) => Err(status(Code::INTERNAL, format!("SetupSandbox: {e}"))),
        }
    }

    async fn create_container(&self, _: &TtrpcContext, req: CreateContainerRequest) -> Reply<CreateContainerResponse> {
        let what = container(&req.container_id)?;
        if req.layers.len() > MAX_LAYERS {
            return Err(invalid(format!("{what}: {} layers: at most {MAX_LAYERS} are allowed", req.layers.len())));
        }
        for l in &req.layers {
            check_layer(l).map_err(|e| invalid(format!("{what}: {e}")))?;
        }
        check_disk_serial(&req.rw_disk_serial).map_err(|e| invalid(format!("{what}: {e}")))?;
        let spec: Spec = parse_json("oci_spec_json", &req.oci_spec_json).map_err(|e| prefix(&what, e))?;
        let stdio = stdio_config(req.stdio.as_ref()).map_err(|e| prefix(&what, e))?;
        let c = CreateSpec {
            id: req.container_id.clone(),
            spec,
            layers: req.layers.clone(),
            rw_disk_serial: (!req.rw_disk_serial.is_empty()).then(|| req.rw_disk_serial.clone()),
            stdio,
        };
        let handle = self.call(&what, move |b| b.create(c)).await?;
        self.stdio.register((req.container_id.clone(), None), handle.io);
        Ok(CreateContainerResponse { pid: handle.pid, phases: handle.phases.to_proto(), ..Default::default() })
    }

    async fn start_container(&self, _: &TtrpcContext, req: ContainerRequest) -> Reply<StartContainerResponse> {
        let what = container(&req.container_id)?;
        let id = req.container_id.clone();
        let pid = self.call(&what, move |b| b.start(&id)).await?;
        Ok(StartContainerResponse { pid, ..Default::default() })
    }

    async fn delete_container(&self, _: &TtrpcContext, req: DeleteContainerRequest) -> Reply<Empty> {
        let what = container(&req.container_id)?;
        let (id, force) = (req.container_id.clone(), req.force);
        self.call(&what, move |b| b.delete(&id, force)).await?;
        self.stdio.remove_container(&req.container_id);
        Ok(Empty::new())
    }

    async fn pause_container(&self, _: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        let what = container(&req.container_id)?;
        let id = req.container_id;
        self.call(&what, move |b| b.pause(&id)).await?;
        Ok(Empty::new())
    }

    async fn resume_container(&self, _: &TtrpcContext, req: ContainerRequest) -> Reply<Empty> {
        let what = container(&req.container_id)?;
        let id = req.container_id;
        self.call(&what, move |b| b.resume(&id)).await?;
        Ok(Empty::new())
    }

    async fn update_resources(&self, _: &TtrpcContext, req: UpdateResourcesRequest) -> Reply<Empty> {
        let what = container(&req.container_id)?;
        let resources: LinuxResources =
            parse_json("oci_resources_json", &req.oci_resources_json).map_err(|e| prefix(&what, e))?;
        let id = req.container_id;
        self.call(&what, move |b| b.update(&id, resources)).await?;
        Ok(Empty::new())
    }

    async fn stats(&self, _: &TtrpcContext, req: ContainerRequest) -> Reply<StatsResponse> {
        let what = container(&req.container_id)?;
        let id = req.container_id;
        let s = self.call(&what, move |b| b.stats(&id)).await?;
        Ok(StatsResponse {
            cpu_usage_usec: s.cpu_usage_usec,
            cpu_user_usec: s.cpu_user_usec,
            cpu_system_usec: s.cpu_system_usec,
            cpu_nr_throttled: s.cpu_nr_throttled,
            cpu_throttled_usec: s.cpu_throttled_usec,
            memory_current: s.memory_current,
            memory_max: s.memory_max,
            memory_anon: s.memory_anon,
            memory_file: s.memory_file,
            memory_oom_kills: s.memory_oom_kills,
            pids_current: s.pids_current,
            pids_max: s.pids_max,
            io_read_bytes: s.io_read_bytes,
            io_write_bytes: s.io_write_bytes,
            ..Default::default()
        })
    }

    async fn list_processes(&self, _: &TtrpcContext, req: ContainerRequest) -> Reply<ListProcessesResponse> {
        let what = container(&req.container_id)?;
        let id = req.container_id;
        let pids = self.call(&what, move |b| b.pids(&id)).await?;
        Ok(ListProcessesResponse { pids, ..Default::default() })
    }

    async fn exec_process(&self, _: &TtrpcContext, req: ExecProcessRequest) -> Reply<ExecProcessResponse> {
        if req.exec_id.is_empty() {
            check_id("container_id", &req.container_id).map_err(invalid)?;
            return Err(invalid(format!("container {}: exec_id is empty", req.container_id)));
        }
        let (key, what) = process(&req.container_id, &req.exec_id)?;
        let p: Process = parse_json("oci_process_json", &req.oci_process_json).map_err(|e| prefix(&what, e))?;
        let stdio = stdio_config(req.stdio.as_ref()).map_err(|e| prefix(&what, e))?;
        let (id, exec_id) = (req.container_id.clone(), req.exec_id.clone());
        let handle = self.call(&what, move |b| b.exec(&id, &exec_id, p, stdio)).await?;
        self.stdio.register(key, handle.io);
        Ok(ExecProcessResponse { pid: handle.pid, ..Default::default() })
    }

    async fn signal_process(&self, _: &TtrpcContext, req: SignalProcessRequest) -> Reply<Empty> {
        let (key, what) = process(&req.container_id, &req.exec_id)?;
        let sig = signal_number(req.signal).map_err(|e| prefix(&what, e))?;
        if req.all && key.1.is_some() {
            return Err(invalid(format!("{what}: `all` signals every process of the container: only without exec_id")));
        }
        let all = req.all;
        self.call(&what, move |b| b.signal(&key.0, key.1.as_deref(), sig, all)).await?;
        Ok(Empty::new())
    }

    async fn wait_process(&self, _: &TtrpcContext, req: ProcessRequest) -> Reply<WaitProcessResponse> {
        let (key, what) = process(&req.container_id, &req.exec_id)?;
        let k = key.clone();
        let exit = self.call(&what, move |b| b.wait(&k.0, k.1.as_deref())).await?;
        let late = self.stdio.wait_drained(&key, self.drain_timeout).await;
        if !late.is_empty() {
            let names: Vec<&str> = late.iter().map(|s| s.as_str()).collect();
            eprintln!(
                "hull-agent: {what} exited but {} not drained within {:?} (attached late, or still held open by \
                 another process); answering WaitProcess anyway",
                names.join(", "),
                self.drain_timeout
            );
        }
        Ok(WaitProcessResponse {
            exit_status: exit.status,
            exited_at_unix_nanos: exit.exited_at_unix_nanos,
            ..Default::default()
        })
    }

    async fn resize_tty(&self, _: &TtrpcContext, req: ResizeTtyRequest) -> Reply<Empty> {
        let (key, what) = process(&req.container_id, &req.exec_id)?;
        let rows = tty_dimension("rows", req.rows).map_err(|e| prefix(&what, e))?;
        let cols = tty_dimension("cols", req.cols).map_err(|e| prefix(&what, e))?;
        self.call(&what, move |b| b.resize_tty(&key.0, key.1.as_deref(), rows, cols)).await?;
        Ok(Empty::new())
    }

    async fn close_stdin(&self, _: &TtrpcContext, req: ProcessRequest) -> Reply<Empty> {
        let (key, _) = process(&req.container_id, &req.exec_id)?;
        self.stdio.close_stdin(&key).map_err(|e| status(Code::NOT_FOUND, e))?;
        Ok(Empty::new())
    }

    async fn get_oom_event(&self, _: &TtrpcContext, _: GetOomEventRequest) -> Reply<OomEvent> {
        let container_id = self.call("GetOomEvent", |b| b.next_oom()).await?;
        Ok(OomEvent { container_id, ..Default::default() })
    }
}

/// Puts "container c1: " (or "process c1/e1: ") before a status message.
fn prefix(what: &str, e: Error) -> Error {
    match e {
        Error::RpcStatus(s) => status(s.code(), format!("{what}: {}", s.message())),
        e => e,
    }
}
