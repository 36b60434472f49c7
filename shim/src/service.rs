//! The containerd Task service: every RPC of `containerd.task.v2/v3.Task`,
//! carried out in the pod VM through the agent.
//!
//! One shim process serves one pod. The first container (the CRI sandbox
//! container, or a lone `ctr run` container) boots the VM; the others join
//! it. Deleting the last container shuts the VM down and removes the pod's
//! state; Shutdown then ends the shim.
//!
//! Pids: containerd gets hull-vmm's host pid for every process (as Kata
//! does: the guest's pids mean nothing on the host, and a host pid that is
//! really ours is safe for tools that look it up). `ctr task ps` (Pids)
//! shows the guest pids.

use crate::config::Config;
use crate::events::Publisher;
use crate::io::{self, IoTasks, Stdio};
use crate::pod;
use crate::rootfs::{self, RootfsMount};
use crate::sandbox::{Sandbox, SandboxSpec};
use crate::spec;
use async_trait::async_trait;
use containerd_shim::api;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused, TaskResumed,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::ttrpc::{self, Code};
use containerd_shim::protos::types::task::Status;
use containerd_shim::TtrpcResult;
use hull_agent_api::proto::agent as pb;
use hull_agent_api::ClientError;
use log::{debug, error, info, warn};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;
use tokio::sync::watch;

/// Exit status reported for a process that never ran or was lost with its VM.
const KILLED: u32 = 128 + 9;
/// Exit status of a process whose VM went away before it could be waited for.
const LOST: u32 = 255;
/// Exit status recorded for a process that failed to start (e.g. its
/// binary does not exist): its waiters are released at once, as runc's shim
/// does. Without this, containerd's delete-with-kill of a failed exec (CRI
/// ExecSync) waits a full minute for an exit that never comes.
const START_FAILED: u32 = 255;

fn err(code: Code, msg: impl ToString) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

/// An agent error as a ttrpc status: the agent's own code, or UNAVAILABLE
/// when the VM cannot be reached.
fn agent_err(e: ClientError) -> ttrpc::Error {
    match &e {
        ClientError::Status { code, message, .. } => err(*code, format!("hull agent: {message}")),
        ClientError::Timeout { .. } => err(Code::DEADLINE_EXCEEDED, format!("hull agent: {e}")),
        _ => err(Code::UNAVAILABLE, format!("hull agent: {e}")),
    }
}

fn now() -> Timestamp {
    from_nanos(SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0))
}

fn from_nanos(n: i64) -> Timestamp {
    Timestamp { seconds: n.div_euclid(1_000_000_000), nanos: n.rem_euclid(1_000_000_000) as i32, ..Default::default() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcStatus {
    Created,
    Running,
    Paused,
    Stopped,
}

#[derive(Clone)]
struct ExitInfo {
    status: u32,
    at: Timestamp,
}

/// A container's init process or an exec'd one.
struct Process {
    cid: String,
    exec_id: Option<String>,
    stdio: Stdio,
    /// Exec'd processes: the OCI process JSON.
    spec: Vec<u8>,
    io: Mutex<Option<IoTasks>>,
    status: Mutex<ProcStatus>,
    exit: watch::Sender<Option<ExitInfo>>,
}

impl Process {
    fn new(cid: &str, exec_id: Option<&str>, stdio: Stdio, spec: Vec<u8>) -> Arc<Process> {
        Arc::new(Process {
            cid: cid.to_string(),
            exec_id: exec_id.map(str::to_string),
            stdio,
            spec,
            io: Mutex::new(None),
            status: Mutex::new(ProcStatus::Created),
            exit: watch::Sender::new(None),
        })
    }

    fn status(&self) -> ProcStatus {
        *self.status.lock().unwrap()
    }

    fn set_status(&self, s: ProcStatus) {
        *self.status.lock().unwrap() = s;
    }

    fn exit_info(&self) -> Option<ExitInfo> {
        self.exit.borrow().clone()
    }

    fn id(&self) -> &str {
        self.exec_id.as_deref().unwrap_or(&self.cid)
    }

    /// Records the exit (once) and wakes waiters.
    fn set_exited(&self, status: u32, at: Timestamp) -> bool {
        self.set_status(ProcStatus::Stopped);
        self.exit.send_if_modified(|e| {
            if e.is_some() {
                return false;
            }
            *e = Some(ExitInfo { status, at });
            true
        })
    }

    /// Stops the copies: output copies may finish (bounded), input stops.
    async fn shutdown_io(&self) {
        let io = self.io.lock().unwrap().take();
        if let Some(io) = io {
            io.shutdown().await;
        }
    }
}

struct Container {
    id: String,
    bundle: String,
    init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    disk: Option<PathBuf>,
    sandbox: Arc<Sandbox>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap()
            .get(exec_id)
            .cloned()
            .ok_or_else(|| err(Code::NOT_FOUND, format!("exec {exec_id} of container {} not found", self.id)))
    }
}

/// The protobuf package of the cgroup v2 metrics `stats` answers with.
pub const METRICS_PACKAGE: &str = "io.containerd.cgroups.v2";

struct Inner {
    cfg: Result<Config, String>,
    namespace: String,
    publisher: Option<Publisher>,
    exit: Arc<ExitSignal>,
    /// The pod VM; also serializes create, delete and shutdown.
    sandbox: tokio::sync::Mutex<Option<Arc<Sandbox>>>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

/// The Task service of one shim process (one pod).
#[derive(Clone)]
pub struct HullTask {
    inner: Arc<Inner>,
}

impl HullTask {
    pub fn new(
        cfg: Result<Config, String>,
        namespace: &str,
        publisher: Option<Publisher>,
        exit: Arc<ExitSignal>,
    ) -> HullTask {
        HullTask {
            inner: Arc::new(Inner {
                cfg,
                namespace: namespace.to_string(),
                publisher,
                exit,
                sandbox: tokio::sync::Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }

    async fn publish<M: Message>(&self, topic: &str, ev: &M) {
        if let Some(p) = &self.inner.publisher {
            if let Err(e) = p.publish(topic, &self.inner.namespace, ev).await {
                error!("publishing {topic}: {e}");
            }
        }
    }

    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.inner
            .containers
            .lock()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| err(Code::NOT_FOUND, format!("container {id} not found")))
    }

    fn process(&self, id: &str, exec_id: &str) -> TtrpcResult<(Arc<Container>, Arc<Process>)> {
        let c = self.container(id)?;
        let p = c.process(exec_id)?;
        Ok((c, p))
    }

    /// Shuts the pod VM down (all of its state goes) and ends the shim if
    /// no container is left. Used on SIGTERM.
    pub async fn shutdown_now(&self) {
        let mut sb = self.inner.sandbox.lock().await;
        if let Some(s) = sb.take() {
            s.shutdown().await;
        }
        self.inner.exit.signal();
    }

    /// Boots the pod VM for the first container.
    async fn boot(
        &self,
        cfg: &Config,
        pod: &pod::PodInfo,
        annotations: &HashMap<String, String>,
        hostname: Option<String>,
        cgroups_path: Option<String>,
        net: crate::network::NetSpec,
    ) -> TtrpcResult<Arc<Sandbox>> {
        let resources = if pod.role.starts_pod() {
            pod::resources(annotations, &cfg.defaults).map_err(|e| err(Code::INVALID_ARGUMENT, e))?
        } else {
            warn!(
                "container of pod {} arrived before its sandbox: starting the pod VM with the defaults",
                pod.sandbox_id
            );
            pod::resources(&HashMap::new(), &cfg.defaults).map_err(|e| err(Code::INVALID_ARGUMENT, e))?
        };
        // Only a sandbox container's cgroup path is the pod's (a plain `ctr
        // run` container's is its own, which is as good).
        let k8s_cgroup = cgroups_path.filter(|_| pod.role.starts_pod());
        // Likewise the network namespace and DNS: the sandbox's are the pod's.
        let net = if pod.role.starts_pod() { net } else { Default::default() };
        let spec = SandboxSpec { id: pod.sandbox_id.clone(), hostname, resources, k8s_cgroup, net };
        let sandbox = Arc::new(Sandbox::start(cfg, spec).await.map_err(|e| err(Code::FAILED_PRECONDITION, e))?);
        // OOM events: the agent's long poll, for the VM's lifetime.
        let (task, agent) = (self.clone(), sandbox.agent.clone());
        sandbox.set_oom_task(tokio::spawn(async move {
            loop {
                match agent.get_oom_event().await {
                    Ok(cid) => {
                        info!("container {cid}: OOM kill");
                        task.publish(
                            topics::TASK_OOM_EVENT_TOPIC,
                            &TaskOOM { container_id: cid, ..Default::default() },
                        )
                        .await;
                    }
                    Err(e) if e.code().is_some() => {
                        warn!("GetOomEvent: {e}");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        debug!("GetOomEvent: {e}; stopping the OOM watch");
                        return;
                    }
                }
            }
        }));
        Ok(sandbox)
    }

    /// Waits for `p` to exit in the guest, lets its output drain, records
    /// the exit and publishes TaskExit.
    fn watch_exit(&self, c: &Arc<Container>, p: Arc<Process>) {
        let (task, c) = (self.clone(), c.clone());
        tokio::spawn(async move {
            let (status, at) = match c.sandbox.agent.wait_process(&p.cid, p.exec_id.as_deref()).await {
                Ok(w) => (w.exit_status as u32, from_nanos(w.exited_at_unix_nanos)),
                Err(e) => {
                    warn!("waiting for {}/{}: {e}; reporting exit status {LOST}", p.cid, p.id());
                    (LOST, now())
                }
            };
            // The agent answered after its side was drained: our copies see
            // end-of-file now. Let them finish before anyone learns of the exit.
            p.shutdown_io().await;
            if p.set_exited(status, at.clone()) {
                debug!("{}/{} exited with {status}", p.cid, p.id());
                let ev = TaskExit {
                    container_id: p.cid.clone(),
                    id: p.id().to_string(),
                    pid: c.sandbox.vmm_pid(),
                    exit_status: status,
                    exited_at: MessageField::some(at),
                    ..Default::default()
                };
                task.publish(topics::TASK_EXIT_EVENT_TOPIC, &ev).await;
            }
        });
    }

    async fn create_inner(&self, req: &api::CreateTaskRequest) -> TtrpcResult<u32> {
        let cfg = self.inner.cfg.as_ref().map_err(|e| err(Code::FAILED_PRECONDITION, e))?;
        let id = req.id.as_str();
        hull_agent_api::validate::check_id("container id", id).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        let stdio = Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        io::check_stdio(&stdio).map_err(|e| err(Code::UNIMPLEMENTED, e))?;
        let bundle = PathBuf::from(&req.bundle);
        let spec_json = spec::read_bundle_spec(&bundle).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        // Kubernetes' cgroup for the pod (the sandbox's); the host cgroup of its VM goes there.
        let cgroups_path = spec_json.pointer("/linux/cgroupsPath").and_then(|v| v.as_str()).map(str::to_string);
        let net = crate::network::NetSpec::of(&spec_json);
        let guest =
            spec::guest_spec(spec_json, id).map_err(|e| err(Code::INVALID_ARGUMENT, format!("OCI spec: {e}")))?;
        for w in &guest.warnings {
            warn!("container {id}: {w}");
        }
        let pod = pod::pod_info(id, &guest.annotations).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        let mounts: Vec<RootfsMount> = req
            .rootfs
            .iter()
            .map(|m| RootfsMount { kind: m.type_.clone(), source: m.source.clone(), options: m.options.clone() })
            .collect();
        let layer_dirs =
            rootfs::layer_dirs(&mounts, &bundle.join("rootfs")).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;

        let mut sb = self.inner.sandbox.lock().await;
        if self.inner.containers.lock().unwrap().contains_key(id) {
            return Err(err(Code::ALREADY_EXISTS, format!("container {id} already exists")));
        }
        let sandbox = match &*sb {
            Some(s) if s.id == pod.sandbox_id => s.clone(),
            Some(s) => {
                return Err(err(
                    Code::FAILED_PRECONDITION,
                    format!("this shim serves pod {}, not pod {} of container {id}", s.id, pod.sandbox_id),
                ))
            }
            None => {
                let s = self.boot(cfg, &pod, &guest.annotations, guest.hostname.clone(), cgroups_path, net).await?;
                *sb = Some(s.clone());
                s
            }
        };

        match self.create_in(&sandbox, req, id, &pod, &guest, &layer_dirs, stdio).await {
            Ok(pid) => Ok(pid),
            Err(e) => {
                if self.inner.containers.lock().unwrap().is_empty() {
                    crate::sandbox::log_tails(&sandbox.id, &sandbox.paths, "its first container failed");
                    info!("pod {}: shutting the VM down", sandbox.id);
                    sandbox.shutdown().await;
                    *sb = None;
                }
                Err(e)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn create_in(
        &self,
        sandbox: &Arc<Sandbox>,
        req: &api::CreateTaskRequest,
        id: &str,
        pod: &pod::PodInfo,
        guest: &spec::GuestSpec,
        layer_dirs: &[PathBuf],
        stdio: Stdio,
    ) -> TtrpcResult<u32> {
        let mut phases = hull_agent_api::phases::Phases::new();
        let shared = sandbox.shared();
        let release = |shared: &Path| {
            if let Err(e) = rootfs::release(shared, id) {
                error!("container {id}: {e}");
            }
        };
        let layers = rootfs::bind_layers(&shared, id, layer_dirs).map_err(|e| err(Code::INTERNAL, e))?;
        if let Err(e) = spec::bind_host_mounts(&shared, &guest.host_mounts) {
            release(&shared);
            return Err(err(Code::INTERNAL, e));
        }
        let serial = if pod.role.wants_disk() {
            let s = sandbox.take_disk_slot();
            if s.is_none() {
                warn!(
                    "pod {}: all {} writable-layer disks are used; container {id} gets a tmpfs writable layer (its writes use guest memory)",
                    sandbox.id,
                    sandbox.disk_slots()
                );
            }
            s
        } else {
            None
        };
        phases.mark("binds");
        let creq = pb::CreateContainerRequest {
            container_id: id.to_string(),
            oci_spec_json: guest.json.clone(),
            layers,
            rw_disk_serial: serial.clone().unwrap_or_default(),
            stdio: MessageField::some(io::agent_stdio(&stdio)),
            ..Default::default()
        };
        let guest_pid = match sandbox.agent.create_container_timed(&creq).await {
            Ok(r) => {
                phases.extend("guest-", &r.phases);
                r.pid
            }
            Err(e) => {
                // A guest that stops answering leaves no other trace: its
                // console and hull-vmm's output go away with the pod.
                crate::sandbox::log_tails(
                    &sandbox.id,
                    &sandbox.paths,
                    &format!("container {id}: CreateContainer ({e}) failed"),
                );
                release(&shared);
                return Err(agent_err(e));
            }
        };
        phases.mark("agent");
        let tasks = match io::attach(&sandbox.stdio_addr, id, None, &stdio).await {
            Ok(t) => t,
            Err(e) => {
                let _ = sandbox.agent.delete_container(id, true).await;
                release(&shared);
                return Err(err(Code::INTERNAL, format!("container {id} stdio: {e}")));
            }
        };
        let init = Process::new(id, None, stdio.clone(), Vec::new());
        *init.io.lock().unwrap() = Some(tasks);
        let c = Arc::new(Container {
            id: id.to_string(),
            bundle: req.bundle.clone(),
            init,
            execs: Mutex::new(HashMap::new()),
            disk: serial.map(|s| sandbox.paths.disk_image(&s)),
            sandbox: sandbox.clone(),
        });
        self.inner.containers.lock().unwrap().insert(id.to_string(), c.clone());
        phases.mark("stdio");
        info!(
            "container {id} created in pod {} ({:?}, guest pid {guest_pid}, {} layers, writable layer {}; phases ms: {phases})",
            sandbox.id,
            pod.role,
            layer_dirs.len(),
            c.disk.as_ref().map(|_| creq.rw_disk_serial.as_str()).unwrap_or("tmpfs")
        );
        let ev = TaskCreate {
            container_id: id.to_string(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: stdio.stdin.clone(),
                stdout: stdio.stdout.clone(),
                stderr: stdio.stderr.clone(),
                terminal: stdio.terminal,
                ..Default::default()
            }),
            pid: sandbox.vmm_pid(),
            ..Default::default()
        };
        self.publish(topics::TASK_CREATE_EVENT_TOPIC, &ev).await;
        Ok(sandbox.vmm_pid())
    }

    async fn delete_container(&self, c: &Arc<Container>) -> TtrpcResult<api::DeleteResponse> {
        let mut sb = self.inner.sandbox.lock().await;
        if matches!(c.init.status(), ProcStatus::Running | ProcStatus::Paused) {
            return Err(err(Code::FAILED_PRECONDITION, format!("container {} is still running: kill it first", c.id)));
        }
        if c.sandbox.vm_running() {
            match c.sandbox.agent.delete_container(&c.id, true).await {
                Ok(()) => {}
                Err(e) if e.code() == Some(Code::NOT_FOUND) => {}
                Err(e) => warn!("container {}: agent DeleteContainer: {e}; cleaning up anyway", c.id),
            }
        }
        let execs: Vec<Arc<Process>> = c.execs.lock().unwrap().drain().map(|(_, p)| p).collect();
        for p in execs.iter().chain([&c.init]) {
            p.shutdown_io().await;
            p.set_exited(KILLED, now());
        }
        if let Err(e) = rootfs::release(&c.sandbox.shared(), &c.id) {
            error!("container {}: {e}", c.id);
        }
        if let Some(d) = &c.disk {
            crate::diskpool::discard(d);
        }
        self.inner.containers.lock().unwrap().remove(&c.id);
        let exit = c.init.exit_info().unwrap_or(ExitInfo { status: KILLED, at: now() });
        let pid = c.sandbox.vmm_pid();
        info!("container {} deleted (exit status {})", c.id, exit.status);
        let ev = TaskDelete {
            container_id: c.id.clone(),
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at.clone()),
            id: c.id.clone(),
            ..Default::default()
        };
        self.publish(topics::TASK_DELETE_EVENT_TOPIC, &ev).await;
        if self.inner.containers.lock().unwrap().is_empty() {
            if let Some(s) = sb.take() {
                info!("pod {}: last container deleted; shutting the VM down", s.id);
                s.shutdown().await;
            }
        }
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }
}

impl HullTask {
    /// `p` did not start: it is stopped with [`START_FAILED`] (no exit
    /// event: it never ran), so Wait answers and Kill says it finished.
    async fn start_failed(p: &Process) {
        p.shutdown_io().await;
        p.set_exited(START_FAILED, now());
        debug!("{}/{} failed to start", p.cid, p.id());
    }
}

fn status_of(s: ProcStatus) -> Status {
    match s {
        ProcStatus::Created => Status::CREATED,
        ProcStatus::Running => Status::RUNNING,
        ProcStatus::Paused => Status::PAUSED,
        ProcStatus::Stopped => Status::STOPPED,
    }
}

#[async_trait]
impl Task for HullTask {
    async fn create(&self, _ctx: &TtrpcContext, req: api::CreateTaskRequest) -> TtrpcResult<api::CreateTaskResponse> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(err(Code::UNIMPLEMENTED, "checkpoint/restore is not supported by hull"));
        }
        match self.create_inner(&req).await {
            Ok(pid) => Ok(api::CreateTaskResponse { pid, ..Default::default() }),
            Err(e) => {
                match &e {
                    ttrpc::Error::RpcStatus(s) => error!("create {}: {:?}: {}", req.id, s.code(), s.message()),
                    e => error!("create {}: {e}", req.id),
                }
                Err(e)
            }
        }
    }

    async fn start(&self, _ctx: &TtrpcContext, req: api::StartRequest) -> TtrpcResult<api::StartResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        if p.status() != ProcStatus::Created {
            return Err(err(Code::FAILED_PRECONDITION, format!("{}/{} was already started", c.id, p.id())));
        }
        let agent = &c.sandbox.agent;
        let pid = c.sandbox.vmm_pid();
        match &p.exec_id {
            None => {
                let guest_pid = match agent.start_container(&c.id).await {
                    Ok(pid) => pid,
                    Err(e) => {
                        Self::start_failed(&p).await;
                        return Err(agent_err(e));
                    }
                };
                p.set_status(ProcStatus::Running);
                self.watch_exit(&c, p.clone());
                debug!("container {} started (guest pid {guest_pid})", c.id);
                trim_heap();
                self.publish(
                    topics::TASK_START_EVENT_TOPIC,
                    &containerd_shim::protos::events::task::TaskStart {
                        container_id: c.id.clone(),
                        pid,
                        ..Default::default()
                    },
                )
                .await;
            }
            Some(exec_id) => {
                let ereq = pb::ExecProcessRequest {
                    container_id: c.id.clone(),
                    exec_id: exec_id.clone(),
                    oci_process_json: p.spec.clone(),
                    stdio: MessageField::some(io::agent_stdio(&p.stdio)),
                    ..Default::default()
                };
                let guest_pid = match agent.exec_process(&ereq).await {
                    Ok(pid) => pid,
                    Err(e) => {
                        Self::start_failed(&p).await;
                        return Err(agent_err(e));
                    }
                };
                let tasks = match io::attach(&c.sandbox.stdio_addr, &c.id, Some(exec_id), &p.stdio).await {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = agent.signal_process(&c.id, Some(exec_id), 9, false).await;
                        Self::start_failed(&p).await;
                        return Err(err(Code::INTERNAL, format!("exec {exec_id} stdio: {e}")));
                    }
                };
                *p.io.lock().unwrap() = Some(tasks);
                p.set_status(ProcStatus::Running);
                self.watch_exit(&c, p.clone());
                debug!("exec {}/{exec_id} started (guest pid {guest_pid})", c.id);
                self.publish(
                    topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                    &TaskExecStarted {
                        container_id: c.id.clone(),
                        exec_id: exec_id.clone(),
                        pid,
                        ..Default::default()
                    },
                )
                .await;
            }
        }
        Ok(api::StartResponse { pid, ..Default::default() })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<api::DeleteResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        if p.exec_id.is_none() {
            return self.delete_container(&c).await;
        }
        if matches!(p.status(), ProcStatus::Running | ProcStatus::Paused) {
            return Err(err(Code::FAILED_PRECONDITION, format!("exec {} is still running", req.exec_id)));
        }
        p.shutdown_io().await;
        c.execs.lock().unwrap().remove(&req.exec_id);
        let exit = p.exit_info().unwrap_or(ExitInfo { status: KILLED, at: now() });
        Ok(api::DeleteResponse {
            pid: c.sandbox.vmm_pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(exit.at),
            ..Default::default()
        })
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        hull_agent_api::validate::check_id("exec id", &req.exec_id).map_err(|e| err(Code::INVALID_ARGUMENT, e))?;
        if c.init.status() == ProcStatus::Stopped {
            return Err(err(Code::FAILED_PRECONDITION, format!("container {} is not running", c.id)));
        }
        let stdio = Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        io::check_stdio(&stdio).map_err(|e| err(Code::UNIMPLEMENTED, e))?;
        let json = req.spec.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::Process>(&json)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("exec {}: bad OCI process spec: {e}", req.exec_id)))?;
        {
            let mut execs = c.execs.lock().unwrap();
            if execs.contains_key(&req.exec_id) {
                return Err(err(Code::ALREADY_EXISTS, format!("exec {} already exists", req.exec_id)));
            }
            execs.insert(req.exec_id.clone(), Process::new(&c.id, Some(&req.exec_id), stdio, json));
        }
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            &TaskExecAdded { container_id: c.id.clone(), exec_id: req.exec_id.clone(), ..Default::default() },
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<api::Empty> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        c.sandbox.agent.resize_tty(&c.id, p.exec_id.as_deref(), req.height, req.width).await.map_err(agent_err)?;
        Ok(api::Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let (_, p) = self.process(&req.id, &req.exec_id)?;
        if req.stdin {
            if let Some(io) = p.io.lock().unwrap().as_ref() {
                io.close_input();
            }
        }
        Ok(api::Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        if p.status() == ProcStatus::Stopped {
            return Err(err(Code::NOT_FOUND, format!("process {} already finished", p.id())));
        }
        let all = req.all && p.exec_id.is_none();
        c.sandbox.agent.signal_process(&c.id, p.exec_id.as_deref(), req.signal, all).await.map_err(agent_err)?;
        Ok(api::Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let (_, p) = self.process(&req.id, &req.exec_id)?;
        let mut rx = p.exit.subscribe();
        let e = rx.wait_for(|e| e.is_some()).await.map_err(|e| err(Code::INTERNAL, e))?.clone().unwrap();
        Ok(api::WaitResponse { exit_status: e.status, exited_at: MessageField::some(e.at), ..Default::default() })
    }

    async fn state(&self, _ctx: &TtrpcContext, req: api::StateRequest) -> TtrpcResult<api::StateResponse> {
        let (c, p) = self.process(&req.id, &req.exec_id)?;
        let exit = p.exit_info();
        Ok(api::StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: c.sandbox.vmm_pid(),
            status: status_of(p.status()).into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.as_ref().map(|e| e.status).unwrap_or(0),
            exited_at: exit.map(|e| MessageField::some(e.at)).unwrap_or_default(),
            exec_id: req.exec_id.clone(),
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        let c = self.container(&req.id)?;
        let pids = c.sandbox.agent.list_processes(&c.id).await.map_err(agent_err)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| containerd_shim::protos::types::task::ProcessInfo { pid, ..Default::default() })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        c.sandbox.agent.pause_container(&c.id).await.map_err(agent_err)?;
        if c.init.status() == ProcStatus::Running {
            c.init.set_status(ProcStatus::Paused);
        }
        self.publish(topics::TASK_PAUSED_EVENT_TOPIC, &TaskPaused { container_id: c.id.clone(), ..Default::default() })
            .await;
        Ok(api::Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        c.sandbox.agent.resume_container(&c.id).await.map_err(agent_err)?;
        if c.init.status() == ProcStatus::Paused {
            c.init.set_status(ProcStatus::Running);
        }
        self.publish(
            topics::TASK_RESUMED_EVENT_TOPIC,
            &TaskResumed { container_id: c.id.clone(), ..Default::default() },
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn checkpoint(&self, _ctx: &TtrpcContext, _req: api::CheckpointTaskRequest) -> TtrpcResult<api::Empty> {
        Err(err(Code::UNIMPLEMENTED, "checkpoint is not supported by hull"))
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<api::Empty> {
        let c = self.container(&req.id)?;
        let json = req.resources.as_ref().map(|a| a.value.clone()).unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&json)
            .map_err(|e| err(Code::INVALID_ARGUMENT, format!("update {}: bad OCI resources: {e}", c.id)))?;
        c.sandbox.agent.update_resources(&c.id, json).await.map_err(agent_err)?;
        Ok(api::Empty::new())
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: api::StatsRequest) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim::protos::cgroups_v2::metrics::{
            CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
        };
        let c = self.container(&req.id)?;
        let s = c.sandbox.agent.stats(&c.id).await.map_err(agent_err)?;
        let m = Metrics {
            pids: MessageField::some(PidsStat { current: s.pids_current, limit: s.pids_max, ..Default::default() }),
            cpu: MessageField::some(CPUStat {
                usage_usec: s.cpu_usage_usec,
                user_usec: s.cpu_user_usec,
                system_usec: s.cpu_system_usec,
                nr_throttled: s.cpu_nr_throttled,
                throttled_usec: s.cpu_throttled_usec,
                ..Default::default()
            }),
            memory: MessageField::some(MemoryStat {
                usage: s.memory_current,
                usage_limit: s.memory_max,
                anon: s.memory_anon,
                file: s.memory_file,
                ..Default::default()
            }),
            memory_events: MessageField::some(MemoryEvents { oom_kill: s.memory_oom_kills, ..Default::default() }),
            io: MessageField::some(IOStat {
                usage: vec![IOEntry { rbytes: s.io_read_bytes, wbytes: s.io_write_bytes, ..Default::default() }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let any = crate::events::any_of(METRICS_PACKAGE, &m).map_err(|e| err(Code::INTERNAL, e))?;
        Ok(api::StatsResponse { stats: MessageField::some(any), ..Default::default() })
    }

    async fn connect(&self, _ctx: &TtrpcContext, req: api::ConnectRequest) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.container(&req.id).map(|c| c.sandbox.vmm_pid()).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        let mut sb = self.inner.sandbox.lock().await;
        if !self.inner.containers.lock().unwrap().is_empty() {
            return Ok(api::Empty::new());
        }
        if let Some(s) = sb.take() {
            s.shutdown().await;
        }
        info!("no containers left: the shim exits");
        self.inner.exit.signal();
        Ok(api::Empty::new())
    }
}

/// Hands the heap's free pages back to the kernel. A shim lives as long as
/// its pod, and most of what it allocates is for starting it (spec JSON,
/// ttrpc buffers, the pod's setup): once a container runs, those pages are
/// free but still resident, host memory the pod pays for while idle.
fn trim_heap() {
    // SAFETY: malloc_trim only walks and shrinks the allocator's own heap.
    unsafe { libc::malloc_trim(0) };
}
