//! The real server on unix sockets in a temporary directory, driven by the
//! real client (`hull_agent_api::AgentClient`, `open_stdio`), with a mock
//! backend whose "processes" are threads behind real pipes and terminals.

use super::{start, RunningServer, SandboxSettings, ServerConfig};
use crate::backend::{
    Backend, BackendError, CreateSpec, ExitInfo, ProcessHandle, ProcessIo, Result as BResult, Stats, StdioConfig,
};
use crate::stdio::ProcKey;
use hull_agent_api::proto::agent::*;
use hull_agent_api::stdio::{open_stdio, StdioStream};
use hull_agent_api::ttrpc::Code;
use hull_agent_api::{AgentAddr, AgentClient, ClientError, API_VERSION};
use oci_spec::runtime::{LinuxResources, Process};
use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use ttrpc::r#async::transport::Listener;

// ---------------------------------------------------------------- the mock

/// What a mock process does, chosen by its args[0].
#[derive(Debug, Clone, Copy, PartialEq)]
enum Script {
    /// "hi" on stdout, "err" on stderr, exit 3.
    HiErr3,
    /// Reads stdin to end-of-file, writes "echo:" + it on stdout, exit 0.
    Echo,
    /// Runs until signalled: exit 128 + signal.
    Sleep,
    /// Terminal: "tty-out\n", reads a line, writes "got:<line>", exit 0.
    Tty,
    /// "late" on stdout, exit 0.
    Late,
    /// 1 MiB on stdout (more than a pipe holds), exit 0.
    Big,
    /// Exit 0 at once, writing nothing.
    Silent,
}

fn script(args: Option<&Vec<String>>) -> Script {
    match args.and_then(|a| a.first()).map(String::as_str) {
        Some("hi-err-3") => Script::HiErr3,
        Some("echo") => Script::Echo,
        Some("sleep") => Script::Sleep,
        Some("tty") => Script::Tty,
        Some("late") => Script::Late,
        Some("big") => Script::Big,
        _ => Script::Silent,
    }
}

/// The process-side ends of the streams.
#[derive(Default)]
struct Ends {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    tty: Option<OwnedFd>,
}

struct MockProc {
    script: Script,
    ends: Mutex<Option<Ends>>,
    exit: Mutex<Option<ExitInfo>>,
    signal: Mutex<Option<i32>>,
    cv: Condvar,
    started: std::sync::atomic::AtomicBool,
}

impl MockProc {
    fn running(&self) -> bool {
        self.started.load(std::sync::atomic::Ordering::SeqCst) && self.exit.lock().unwrap().is_none()
    }

    fn run(self: &Arc<Self>) {
        self.started.store(true, std::sync::atomic::Ordering::SeqCst);
        let p = self.clone();
        std::thread::spawn(move || {
            let ends = p.ends.lock().unwrap().take().unwrap_or_default();
            let status = p.behave(ends);
            *p.exit.lock().unwrap() = Some(ExitInfo { status, exited_at_unix_nanos: 1_700_000_000_000_000_000 });
            p.cv.notify_all();
        });
    }

    /// Runs the script; the ends are closed (dropped) before the exit is recorded.
    fn behave(&self, ends: Ends) -> i32 {
        let file = |fd: Option<OwnedFd>| fd.map(std::fs::File::from);
        match self.script {
            Script::HiErr3 => {
                if let Some(mut f) = file(ends.stdout) {
                    let _ = f.write_all(b"hi");
                }
                if let Some(mut f) = file(ends.stderr) {
                    let _ = f.write_all(b"err");
                }
                3
            }
            Script::Echo => {
                let mut input = Vec::new();
                if let Some(mut f) = file(ends.stdin) {
                    f.read_to_end(&mut input).unwrap();
                }
                let mut out = b"echo:".to_vec();
                out.extend(input);
                let _ = file(ends.stdout).unwrap().write_all(&out);
                0
            }
            Script::Sleep => {
                let mut sig = self.signal.lock().unwrap();
                while sig.is_none() {
                    sig = self.cv.wait(sig).unwrap();
                }
                128 + sig.unwrap()
            }
            Script::Tty => {
                let mut tty = file(ends.tty).unwrap();
                tty.write_all(b"tty-out\n").unwrap();
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while tty.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                tty.write_all(format!("got:{}", String::from_utf8_lossy(&line)).as_bytes()).unwrap();
                0
            }
            Script::Late => {
                let _ = file(ends.stdout).unwrap().write_all(b"late");
                0
            }
            Script::Big => {
                let _ = file(ends.stdout).unwrap().write_all(&big_output());
                0
            }
            Script::Silent => 0,
        }
    }
}

fn big_output() -> Vec<u8> {
    (0..(1 << 20)).map(|i: u32| (i % 251) as u8).collect()
}

#[derive(Default)]
struct MockBackend {
    calls: Mutex<Vec<String>>,
    containers: Mutex<HashSet<String>>,
    procs: Mutex<HashMap<ProcKey, Arc<MockProc>>>,
    oom: Mutex<VecDeque<String>>,
    oom_cv: Condvar,
    pid: std::sync::atomic::AtomicU32,
}

impl MockBackend {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn push_oom(&self, id: &str) {
        self.oom.lock().unwrap().push_back(id.to_string());
        self.oom_cv.notify_all();
    }

    fn proc(&self, id: &str, exec_id: Option<&str>) -> BResult<Arc<MockProc>> {
        let key = (id.to_string(), exec_id.map(str::to_string));
        self.procs.lock().unwrap().get(&key).cloned().ok_or_else(|| {
            BackendError::NotFound(match exec_id {
                Some(e) => format!("exec {e} not found in container {id}"),
                None => format!("container {id} not found"),
            })
        })
    }

    /// A process with real pipes (or a terminal) for the requested streams.
    fn spawn(&self, key: ProcKey, s: Script, stdio: StdioConfig) -> ProcessHandle {
        let mut io = ProcessIo::default();
        let mut ends = Ends::default();
        if stdio.terminal {
            let pty = nix::pty::openpty(None, None).unwrap();
            let mut t = nix::sys::termios::tcgetattr(&pty.slave).unwrap();
            nix::sys::termios::cfmakeraw(&mut t);
            nix::sys::termios::tcsetattr(&pty.slave, nix::sys::termios::SetArg::TCSANOW, &t).unwrap();
            io.pty = Some(pty.master);
            ends.tty = Some(pty.slave);
        } else {
            let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
            if stdio.stdin {
                let (r, w) = pipe();
                (ends.stdin, io.stdin) = (Some(r), Some(w));
            }
            if stdio.stdout {
                let (r, w) = pipe();
                (io.stdout, ends.stdout) = (Some(r), Some(w));
            }
            if stdio.stderr {
                let (r, w) = pipe();
                (io.stderr, ends.stderr) = (Some(r), Some(w));
            }
        }
        let p = Arc::new(MockProc {
            script: s,
            ends: Mutex::new(Some(ends)),
            exit: Mutex::new(None),
            signal: Mutex::new(None),
            cv: Condvar::new(),
            started: Default::default(),
        });
        self.procs.lock().unwrap().insert(key, p);
        let pid = 1000 + self.pid.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ProcessHandle { pid, io, phases: Default::default() }
    }
}

impl Backend for MockBackend {
    fn create(&self, c: CreateSpec) -> BResult<ProcessHandle> {
        self.record(format!("create {} layers={:?} disk={:?}", c.id, c.layers, c.rw_disk_serial));
        if !self.containers.lock().unwrap().insert(c.id.clone()) {
            return Err(BackendError::AlreadyExists(format!("container {} already exists", c.id)));
        }
        let s = script(c.spec.process().as_ref().and_then(|p| p.args().as_ref()));
        Ok(self.spawn((c.id, None), s, c.stdio))
    }

    fn start(&self, id: &str) -> BResult<u32> {
        self.record(format!("start {id}"));
        self.proc(id, None)?.run();
        Ok(42)
    }

    fn exec(&self, id: &str, exec_id: &str, process: Process, stdio: StdioConfig) -> BResult<ProcessHandle> {
        self.record(format!("exec {id}/{exec_id}"));
        self.proc(id, None)?;
        let key = (id.to_string(), Some(exec_id.to_string()));
        let h = self.spawn(key, script(process.args().as_ref()), stdio);
        self.proc(id, Some(exec_id))?.run();
        Ok(h)
    }

    fn signal(&self, id: &str, exec_id: Option<&str>, signal: i32, all: bool) -> BResult<()> {
        self.record(format!("signal {id}/{} {signal} all={all}", exec_id.unwrap_or("-")));
        let p = self.proc(id, exec_id)?;
        *p.signal.lock().unwrap() = Some(signal);
        p.cv.notify_all();
        Ok(())
    }

    fn wait(&self, id: &str, exec_id: Option<&str>) -> BResult<ExitInfo> {
        let p = self.proc(id, exec_id)?;
        let mut exit = p.exit.lock().unwrap();
        while exit.is_none() {
            exit = p.cv.wait(exit).unwrap();
        }
        Ok(exit.unwrap())
    }

    fn delete(&self, id: &str, force: bool) -> BResult<()> {
        self.record(format!("delete {id} force={force}"));
        let init = self.proc(id, None)?;
        if init.running() && !force {
            return Err(BackendError::FailedPrecondition(format!("container {id} is running")));
        }
        *init.signal.lock().unwrap() = Some(9);
        init.cv.notify_all();
        self.containers.lock().unwrap().remove(id);
        self.procs.lock().unwrap().retain(|k, _| k.0 != id);
        Ok(())
    }

    fn pause(&self, id: &str) -> BResult<()> {
        self.record(format!("pause {id}"));
        if id == "slow" {
            std::thread::sleep(Duration::from_secs(2));
        }
        self.proc(id, None).map(drop)
    }

    fn resume(&self, id: &str) -> BResult<()> {
        self.record(format!("resume {id}"));
        self.proc(id, None).map(drop)
    }

    fn update(&self, id: &str, resources: LinuxResources) -> BResult<()> {
        let mem = resources.memory().as_ref().and_then(|m| m.limit());
        self.record(format!("update {id} memory.limit={mem:?}"));
        self.proc(id, None).map(drop)
    }

    fn stats(&self, id: &str) -> BResult<Stats> {
        if id == "boom" {
            return Err(BackendError::Internal("cgroup stats unreadable".into()));
        }
        self.proc(id, None)?;
        Ok(Stats { cpu_usage_usec: 11, memory_current: 22, pids_current: 3, io_write_bytes: 44, ..Default::default() })
    }

    fn pids(&self, id: &str) -> BResult<Vec<u32>> {
        self.proc(id, None)?;
        Ok(vec![42, 43])
    }

    fn resize_tty(&self, id: &str, exec_id: Option<&str>, rows: u16, cols: u16) -> BResult<()> {
        self.record(format!("resize {id}/{} {rows}x{cols}", exec_id.unwrap_or("-")));
        self.proc(id, exec_id).map(drop)
    }

    fn next_oom(&self) -> BResult<String> {
        let mut q = self.oom.lock().unwrap();
        loop {
            if let Some(id) = q.pop_front() {
                return Ok(id);
            }
            q = self.oom_cv.wait(q).unwrap();
        }
    }

    fn counts(&self) -> (u32, u32) {
        (self.containers.lock().unwrap().len() as u32, 7)
    }
}

// ---------------------------------------------------------------- the harness

struct Harness {
    dir: tempfile::TempDir,
    api: AgentAddr,
    stdio: AgentAddr,
    backend: Arc<MockBackend>,
    _server: RunningServer,
}

const DRAIN: Duration = Duration::from_secs(5);

async fn harness() -> Harness {
    harness_with(None).await
}

/// `no_backend`: serve without one, for this reason.
async fn harness_with(no_backend: Option<&str>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let api_path = dir.path().join("api.sock");
    let stdio_path = dir.path().join("stdio.sock");
    let backend = Arc::new(MockBackend::default());
    let cfg = ServerConfig {
        backend: match no_backend {
            None => Ok(backend.clone() as Arc<dyn Backend>),
            Some(why) => Err(why.to_string()),
        },
        sandbox: SandboxSettings { resolv_conf: Some(dir.path().join("etc/resolv.conf")), apply_kernel: false },
        drain_timeout: DRAIN,
    };
    let api_l = Listener::from(tokio::net::UnixListener::bind(&api_path).unwrap());
    let stdio_l = Listener::from(tokio::net::UnixListener::bind(&stdio_path).unwrap());
    let server = start(api_l, stdio_l, cfg).await.unwrap();
    Harness {
        dir,
        api: AgentAddr::Unix { path: api_path },
        stdio: AgentAddr::Unix { path: stdio_path },
        backend,
        _server: server,
    }
}

impl Harness {
    async fn client(&self) -> AgentClient {
        AgentClient::connect(&self.api, Duration::from_secs(10)).await.unwrap()
    }

    async fn attach(&self, c: &str, e: Option<&str>, s: StdioStream) -> std::io::Result<UnixStream> {
        let (addr, c, e) = (self.stdio.clone(), c.to_string(), e.map(str::to_string));
        tokio::task::spawn_blocking(move || open_stdio(&addr, &c, e.as_deref(), s)).await.unwrap()
    }

    /// A raw STDIO connection: sends `header` (as is) and ends its side,
    /// returns the answer.
    async fn raw_stdio(&self, header: Vec<u8>) -> String {
        let AgentAddr::Unix { path } = self.stdio.clone() else { unreachable!() };
        tokio::task::spawn_blocking(move || {
            let mut s = UnixStream::connect(path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let _ = s.write_all(&header);
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut answer = String::new();
            let _ = s.read_to_string(&mut answer);
            answer
        })
        .await
        .unwrap()
    }

    async fn create(&self, id: &str, args: &[&str], stdio: Stdio) -> Result<u32, ClientError> {
        let req = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec_json(args, stdio.terminal),
            layers: vec!["layers/base".into(), "layers/app".into()],
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.client().await.create_container(&req).await
    }

    async fn exec(&self, id: &str, exec_id: &str, args: &[&str], stdio: Stdio) -> Result<u32, ClientError> {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            oci_process_json: serde_json::to_vec(
                &serde_json::json!({"args": args, "cwd": "/", "user": {"uid": 0, "gid": 0}}),
            )
            .unwrap(),
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        self.client().await.exec_process(&req).await
    }
}

fn spec_json(args: &[&str], terminal: bool) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ociVersion": "1.0.2",
        "process": {"terminal": terminal, "args": args, "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
    }))
    .unwrap()
}

fn streams(stdin: bool, stdout: bool, stderr: bool) -> Stdio {
    Stdio { stdin, stdout, stderr, ..Default::default() }
}

/// Reads everything, blocking, on a blocking thread.
async fn read_all(mut s: UnixStream) -> Vec<u8> {
    tokio::task::spawn_blocking(move || {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut v = Vec::new();
        s.read_to_end(&mut v).unwrap();
        v
    })
    .await
    .unwrap()
}

/// What is already there, without waiting: the bytes, and whether
/// end-of-file follows them.
fn read_available(s: &mut UnixStream) -> (Vec<u8>, bool) {
    s.set_nonblocking(true).unwrap();
    let mut v = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (v, true),
            Ok(n) => v.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (v, false),
            Err(e) => panic!("{e}"),
        }
    }
}

#[track_caller]
fn assert_status(r: Result<impl std::fmt::Debug, ClientError>, code: Code, want: &str) {
    let e = r.expect_err("expected an error status");
    assert_eq!(e.code(), Some(code), "{e}");
    assert!(e.message().unwrap_or_default().contains(want), "want {want:?} in: {e}");
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_and_health() {
    let h = harness().await;
    let c = h.client().await;
    let v = c.version().await.unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.api_version, API_VERSION);
    let hl = c.health().await.unwrap();
    assert!(hl.serving);
    assert_eq!((hl.containers, hl.cgroup_pool_free), (0, 7));
    h.create("c1", &["sleep"], Stdio::default()).await.unwrap();
    assert_eq!(c.health().await.unwrap().containers, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_ping_answers_with_the_version() {
    let h = harness().await;
    let addr = h.api.clone();
    let v = tokio::task::spawn_blocking(move || hull_agent_api::ping(&addr, Duration::from_secs(5))).await.unwrap();
    assert_eq!(v.unwrap(), env!("CARGO_PKG_VERSION"));
    let nowhere = AgentAddr::Unix { path: h.dir.path().join("nothing.sock") };
    let t = Instant::now();
    let e = tokio::task::spawn_blocking(move || hull_agent_api::ping(&nowhere, Duration::from_millis(300)))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, ClientError::NotReady { .. }), "{e}");
    assert!(e.to_string().contains("nothing.sock"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

/// The central guarantee: WaitProcess answers only once the host has all
/// output and end-of-file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_answers_after_output_is_delivered() {
    let h = harness().await;
    let c = h.client().await;
    let pid = h.create("c1", &["hi-err-3"], streams(false, true, true)).await.unwrap();
    assert!(pid >= 1000);
    let mut out = h.attach("c1", None, StdioStream::Stdout).await.unwrap();
    let mut err = h.attach("c1", None, StdioStream::Stderr).await.unwrap();
    assert_eq!(c.start_container("c1").await.unwrap(), 42);
    let w = c.wait_process("c1", None).await.unwrap();
    assert_eq!(w.exit_status, 3);
    assert_eq!(w.exited_at_unix_nanos, 1_700_000_000_000_000_000);
    // Already delivered, end-of-file included: nothing to wait for.
    assert_eq!(read_available(&mut out), (b"hi".to_vec(), true));
    assert_eq!(read_available(&mut err), (b"err".to_vec(), true));
    // Waiting again gives the same answer.
    assert_eq!(c.wait_process("c1", None).await.unwrap().exit_status, 3);
    let calls = h.backend.calls();
    assert_eq!(calls[0], "create c1 layers=[\"layers/base\", \"layers/app\"] disk=None");
    assert_eq!(calls[1], "start c1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_written_before_attach_is_kept() {
    let h = harness().await;
    let c = h.client().await;
    h.create("c2", &["late"], streams(false, true, false)).await.unwrap();
    c.start_container("c2").await.unwrap();
    let c2 = c.clone();
    let wait = tokio::spawn(async move { c2.wait_process("c2", None).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!wait.is_finished(), "WaitProcess answered while stdout still held unread output");
    let out = h.attach("c2", None, StdioStream::Stdout).await.unwrap();
    assert_eq!(read_all(out).await, b"late");
    assert_eq!(wait.await.unwrap().unwrap().exit_status, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_unattached_stream_does_not_delay_wait() {
    let h = harness().await;
    let c = h.client().await;
    h.create("c3", &["silent"], streams(true, true, true)).await.unwrap();
    c.start_container("c3").await.unwrap();
    let t = Instant::now();
    assert_eq!(c.wait_process("c3", None).await.unwrap().exit_status, 0);
    assert!(t.elapsed() < DRAIN / 2, "took {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_output_than_a_pipe_holds_arrives_complete() {
    let h = harness().await;
    let c = h.client().await;
    h.create("big", &["big"], streams(false, true, false)).await.unwrap();
    c.start_container("big").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // the "process" blocks on the full pipe
    let out = h.attach("big", None, StdioStream::Stdout).await.unwrap();
    let reader = tokio::spawn(read_all(out));
    assert_eq!(c.wait_process("big", None).await.unwrap().exit_status, 0);
    let got = reader.await.unwrap();
    assert_eq!(got.len(), 1 << 20);
    assert!(got == big_output(), "output corrupted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_stdin_close_stdin_and_signal() {
    let h = harness().await;
    let c = h.client().await;
    h.create("c4", &["sleep"], Stdio::default()).await.unwrap();
    c.start_container("c4").await.unwrap();

    // Exec with stdin + stdout; CloseStdin delivers end-of-file to the process.
    h.exec("c4", "e1", &["echo"], streams(true, true, false)).await.unwrap();
    let mut stdin = h.attach("c4", Some("e1"), StdioStream::Stdin).await.unwrap();
    let out = h.attach("c4", Some("e1"), StdioStream::Stdout).await.unwrap();
    stdin.write_all(b"abc").unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    c.close_stdin("c4", Some("e1")).await.unwrap();
    assert_eq!(c.wait_process("c4", Some("e1")).await.unwrap().exit_status, 0);
    assert_eq!(read_all(out).await, b"echo:abc");
    drop(stdin);

    // Closing the host side of the stdin connection does the same.
    h.exec("c4", "e2", &["echo"], streams(true, true, false)).await.unwrap();
    let stdin = h.attach("c4", Some("e2"), StdioStream::Stdin).await.unwrap();
    let out = h.attach("c4", Some("e2"), StdioStream::Stdout).await.unwrap();
    (&stdin).write_all(b"xyz").unwrap();
    stdin.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(c.wait_process("c4", Some("e2")).await.unwrap().exit_status, 0);
    assert_eq!(read_all(out).await, b"echo:xyz");

    // CloseStdin before attaching: end-of-file at once, and stdin can no longer be attached.
    h.exec("c4", "e3", &["echo"], streams(true, true, false)).await.unwrap();
    c.close_stdin("c4", Some("e3")).await.unwrap();
    let out = h.attach("c4", Some("e3"), StdioStream::Stdout).await.unwrap();
    assert_eq!(read_all(out).await, b"echo:");
    let e = h.attach("c4", Some("e3"), StdioStream::Stdin).await.unwrap_err();
    assert!(e.to_string().contains("stdin of c4/e3 is closed"), "{e}");

    // The init runs until signalled: 128 + 9.
    c.signal_process("c4", None, 9, false).await.unwrap();
    assert_eq!(c.wait_process("c4", None).await.unwrap().exit_status, 137);
    assert!(h.backend.calls().contains(&"signal c4/- 9 all=false".to_string()));
    assert!(h.backend.calls().contains(&"exec c4/e1".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_both_ways_and_resize() {
    let h = harness().await;
    let c = h.client().await;
    let tty = Stdio { terminal: true, stdin: true, stdout: true, ..Default::default() };
    h.create("t1", &["tty"], tty).await.unwrap();
    let mut pty = h.attach("t1", None, StdioStream::Pty).await.unwrap();
    c.start_container("t1").await.unwrap();
    let mut first = [0u8; 8];
    pty.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    pty.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"tty-out\n");
    pty.write_all(b"ping\n").unwrap();
    assert_eq!(c.wait_process("t1", None).await.unwrap().exit_status, 0);
    assert_eq!(read_available(&mut pty), (b"got:ping".to_vec(), true));

    c.resize_tty("t1", None, 40, 120).await.unwrap();
    assert!(h.backend.calls().contains(&"resize t1/- 40x120".to_string()));
    assert_status(c.resize_tty("t1", None, 70000, 80).await, Code::INVALID_ARGUMENT, "rows 70000 is larger than 65535");
    assert_status(c.resize_tty("t1", None, 24, 65536).await, Code::INVALID_ARGUMENT, "cols 65536");
    // A terminal has one stream: no stdout, no separate stderr.
    let e = h.attach("t1", None, StdioStream::Stdout).await.unwrap_err();
    assert!(e.to_string().contains("stdout of t1/- was not requested"), "{e}");
    let tty_err = Stdio { terminal: true, stderr: true, ..Default::default() };
    assert_status(h.create("t2", &["tty"], tty_err).await, Code::INVALID_ARGUMENT, "terminal has no separate stderr");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_naming_the_problem() {
    let h = harness().await;
    let c = h.client().await;
    let create = |f: &dyn Fn(&mut CreateContainerRequest)| {
        let mut r = CreateContainerRequest {
            container_id: "ok".into(),
            oci_spec_json: spec_json(&["sleep"], false),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let cases: Vec<(CreateContainerRequest, &str)> = vec![
        (
            create(&|r| r.oci_spec_json = b"{not json".to_vec()),
            "container ok: oci_spec_json: key must be a string at line 1",
        ),
        (create(&|r| r.oci_spec_json = b"{\"process\": 5}".to_vec()), "oci_spec_json: invalid type"),
        (create(&|r| r.oci_spec_json.clear()), "oci_spec_json is empty"),
        (create(&|r| r.layers = vec!["../x".into()]), "layer path \"../x\" contains a '..' component"),
        (create(&|r| r.layers = vec!["a/../../x".into()]), "'..' component"),
        (create(&|r| r.layers = vec!["/abs".into()]), "layer path \"/abs\" is absolute"),
        (create(&|r| r.layers = vec!["".into()]), "layer path is empty"),
        (create(&|r| r.layers = vec!["l".into(); 257]), "257 layers"),
        (create(&|r| r.rw_disk_serial = "s".repeat(21)), "rw_disk_serial"),
        (create(&|r| r.rw_disk_serial = "a b".into()), "rw_disk_serial \"a b\" contains ' '"),
        (create(&|r| r.container_id = "../x".into()), "container_id \"../x\" contains '/'"),
        (create(&|r| r.container_id = "".into()), "container_id is empty"),
        (create(&|r| r.container_id = ".hidden".into()), "must not start with '.' or '-'"),
        (create(&|r| r.container_id = "x".repeat(129)), "longer than 128"),
    ];
    for (req, want) in cases {
        assert_status(c.create_container(&req).await, Code::INVALID_ARGUMENT, want);
    }

    h.create("c5", &["sleep"], Stdio::default()).await.unwrap();
    let exec = |exec_id: &str, json: &[u8]| ExecProcessRequest {
        container_id: "c5".into(),
        exec_id: exec_id.into(),
        oci_process_json: json.to_vec(),
        ..Default::default()
    };
    let good = br#"{"args": ["echo"], "cwd": "/", "user": {"uid": 0, "gid": 0}}"#;
    assert_status(c.exec_process(&exec("", good)).await, Code::INVALID_ARGUMENT, "exec_id is empty");
    assert_status(c.exec_process(&exec("e/1", good)).await, Code::INVALID_ARGUMENT, "exec_id \"e/1\" contains '/'");
    assert_status(
        c.exec_process(&exec("e1", b"[1,")).await,
        Code::INVALID_ARGUMENT,
        "process c5/e1: oci_process_json:",
    );
    assert_status(c.exec_process(&exec("e1", b"")).await, Code::INVALID_ARGUMENT, "oci_process_json is empty");
    assert_status(c.signal_process("c5", None, 0, false).await, Code::INVALID_ARGUMENT, "signal 0 is not a signal");
    assert_status(c.signal_process("c5", None, 65, false).await, Code::INVALID_ARGUMENT, "signal 65");
    assert_status(c.signal_process("c5", Some("e1"), 9, true).await, Code::INVALID_ARGUMENT, "only without exec_id");
    assert_status(
        c.update_resources("c5", b"{\"memory\": {\"limit\": \"lots\"}}".to_vec()).await,
        Code::INVALID_ARGUMENT,
        "container c5: oci_resources_json: invalid type",
    );
    assert_status(c.wait_process("c5", Some("-x")).await, Code::INVALID_ARGUMENT, "exec_id");
    assert_status(c.close_stdin("bad id", None).await, Code::INVALID_ARGUMENT, "container_id");
    assert_status(c.stats("").await, Code::INVALID_ARGUMENT, "container_id is empty");

    // None of them reached the backend; the agent still serves.
    let calls = h.backend.calls();
    assert!(calls.len() == 1 && calls[0].starts_with("create c5 "), "{calls:?}");
    assert_eq!(c.version().await.unwrap().api_version, API_VERSION);
    c.update_resources("c5", br#"{"memory": {"limit": 1048576}}"#.to_vec()).await.unwrap();
    assert!(h.backend.calls().contains(&"update c5 memory.limit=Some(1048576)".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_errors_map_to_status_codes() {
    let h = harness().await;
    let c = h.client().await;
    assert_status(c.start_container("nope").await, Code::NOT_FOUND, "container nope: container nope not found");
    assert_status(c.wait_process("nope", None).await, Code::NOT_FOUND, "process nope/-");
    assert_status(c.wait_process("nope", Some("e9")).await, Code::NOT_FOUND, "process nope/e9");
    assert_status(c.delete_container("nope", false).await, Code::NOT_FOUND, "container nope");
    assert_status(c.close_stdin("nope", None).await, Code::NOT_FOUND, "process nope/- not found");
    assert_status(c.signal_process("nope", Some("e1"), 15, false).await, Code::NOT_FOUND, "exec e1 not found");
    h.create("c6", &["sleep"], Stdio::default()).await.unwrap();
    assert_status(
        h.create("c6", &["sleep"], Stdio::default()).await,
        Code::ALREADY_EXISTS,
        "container c6 already exists",
    );
    c.start_container("c6").await.unwrap();
    assert_status(c.delete_container("c6", false).await, Code::FAILED_PRECONDITION, "container c6 is running");
    h.create("boom", &["sleep"], Stdio::default()).await.unwrap();
    assert_status(c.stats("boom").await, Code::INTERNAL, "container boom: cgroup stats unreadable");

    let s = c.stats("c6").await.unwrap();
    assert_eq!((s.cpu_usage_usec, s.memory_current, s.pids_current, s.io_write_bytes), (11, 22, 3, 44));
    assert_eq!(c.list_processes("c6").await.unwrap(), vec![42, 43]);
    c.pause_container("c6").await.unwrap();
    c.resume_container("c6").await.unwrap();
    c.delete_container("c6", true).await.unwrap();
    assert_eq!(c.wait_process("c6", None).await.map(|w| w.exit_status).unwrap_or(-1), -1);
    let e = h.attach("c6", None, StdioStream::Stdout).await.unwrap_err();
    assert!(e.to_string().contains("no process c6/-"), "{e}");
    let calls = h.backend.calls();
    for want in ["pause c6", "resume c6", "delete c6 force=false", "delete c6 force=true"] {
        assert!(calls.contains(&want.to_string()), "{want} missing from {calls:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_stdio_headers_are_refused() {
    let h = harness().await;
    h.create("c7", &["hi-err-3"], streams(false, true, false)).await.unwrap();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"HELLO\n".to_vec(), "ERR expected \"STDIO <container_id> <exec_id|-> <stream>\""),
        (b"STDIO c7 - bogus\n".to_vec(), "ERR unknown stream \"bogus\""),
        (b"STDIO c7 - stdout extra\n".to_vec(), "ERR expected 4 space-separated fields"),
        (b"STDIO ../x - stdout\n".to_vec(), "ERR container_id \"../x\" contains '/'"),
        (b"STDIO c7 .e stdout\n".to_vec(), "ERR exec_id \".e\" must not start"),
        (b"STDIO c7 - stdout\r\n".to_vec(), "ERR header contains byte 0x0d"),
        (vec![b'S'; 600], "ERR header longer than 512 bytes"),
        (b"STDIO nope - stdout\n".to_vec(), "ERR no process nope/-"),
        (b"STDIO c7 e1 stdout\n".to_vec(), "ERR no process c7/e1"),
        (b"STDIO c7 - stdin\n".to_vec(), "ERR stdin of c7/- was not requested"),
        (b"STDIO c7 - stderr\n".to_vec(), "ERR stderr of c7/- was not requested"),
        (b"STDIO c7 - pty\n".to_vec(), "ERR pty of c7/- was not requested"),
    ];
    for (header, want) in cases {
        let answer = h.raw_stdio(header.clone()).await;
        assert!(answer.starts_with(want), "{:?}: want {want:?}, got {answer:?}", String::from_utf8_lossy(&header));
        assert!(answer.ends_with('\n') && answer.lines().count() == 1, "{answer:?}");
    }
    // A connection closed mid-header; the listener goes on.
    assert_eq!(h.raw_stdio(b"STDIO c7 - std".to_vec()).await, "ERR connection closed before the header's newline\n");

    // Still serving: a valid attach works, a second one is refused.
    let c = h.client().await;
    assert!(c.version().await.is_ok());
    let out = h.attach("c7", None, StdioStream::Stdout).await.unwrap();
    assert_eq!(h.raw_stdio(b"STDIO c7 - stdout\n".to_vec()).await, "ERR stdout of c7/- is already attached\n");
    c.start_container("c7").await.unwrap();
    assert_eq!(c.wait_process("c7", None).await.unwrap().exit_status, 3);
    assert_eq!(read_all(out).await, b"hi");
}

/// ttrpc's 4 MiB limit: the client refuses to send more; a peer that sends
/// it anyway gets INVALID_ARGUMENT and the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbage_messages() {
    use hull_agent_api::protobuf::Message;
    let h = harness().await;
    let c = h.client().await;
    let mut req = CreateContainerRequest { container_id: "huge".into(), ..Default::default() };
    req.oci_spec_json = vec![b' '; 5 << 20];
    let e = c.create_container(&req).await.unwrap_err();
    assert!(matches!(e, ClientError::Transport { .. }) && e.to_string().contains("exceed"), "{e}");

    let AgentAddr::Unix { path } = h.api.clone() else { unreachable!() };
    let codes = tokio::task::spawn_blocking(move || {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let frame = |stream_id: u32, payload: &[u8], declared: u32| {
            let mut f = Vec::new();
            f.extend_from_slice(&declared.to_be_bytes());
            f.extend_from_slice(&stream_id.to_be_bytes());
            f.push(1); // request
            f.push(0);
            f.extend_from_slice(payload);
            f
        };
        let read_status = |s: &mut UnixStream| {
            let mut hdr = [0u8; 10];
            s.read_exact(&mut hdr).unwrap();
            let len = u32::from_be_bytes(hdr[0..4].try_into().unwrap()) as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).unwrap();
            let r = ttrpc::Response::parse_from_bytes(&body).unwrap();
            (u32::from_be_bytes(hdr[4..8].try_into().unwrap()), r.status.code(), r.status.message.clone())
        };
        let mut out = Vec::new();
        // 1: declared and sent: 4 MiB + 1 byte.
        let big = (4 << 20) + 1;
        s.write_all(&frame(1, &vec![0u8; big], big as u32)).unwrap();
        out.push(read_status(&mut s));
        // 3: a payload that is not a ttrpc Request.
        s.write_all(&frame(3, b"\xff\xff\xff\xff", 4)).unwrap();
        out.push(read_status(&mut s));
        // 5: a Request whose payload is not a VersionRequest... but an unknown method.
        let mut r = ttrpc::Request::new();
        r.service = "hull.agent.v1.Agent".into();
        r.method = "Frobnicate".into();
        let b = r.write_to_bytes().unwrap();
        s.write_all(&frame(5, &b, b.len() as u32)).unwrap();
        out.push(read_status(&mut s));
        // 7: a valid Version request on the same connection.
        let mut r = ttrpc::Request::new();
        r.service = "hull.agent.v1.Agent".into();
        r.method = "Version".into();
        let b = r.write_to_bytes().unwrap();
        s.write_all(&frame(7, &b, b.len() as u32)).unwrap();
        out.push(read_status(&mut s));
        out
    })
    .await
    .unwrap();
    assert_eq!(codes[0].0, 1);
    assert_eq!(codes[0].1, Code::INVALID_ARGUMENT);
    assert!(codes[0].2.contains("exceed maximum message size"), "{:?}", codes[0]);
    assert_eq!((codes[1].0, codes[1].1), (3, Code::INVALID_ARGUMENT), "{:?}", codes[1]);
    assert_eq!((codes[2].0, codes[2].1), (5, Code::UNIMPLEMENTED), "{:?}", codes[2]);
    assert_eq!((codes[3].0, codes[3].1), (7, Code::OK), "{:?}", codes[3]);
    assert_eq!(c.version().await.unwrap().agent_version, env!("CARGO_PKG_VERSION"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_sandbox_validates_and_writes_resolv_conf() {
    let h = harness().await;
    let c = h.client().await;
    let ok = SetupSandboxRequest {
        sandbox_id: "pod-1".into(),
        hostname: "pod-1".into(),
        dns_servers: vec!["10.96.0.10".into()],
        dns_search: vec!["svc.cluster.local".into()],
        dns_options: vec!["ndots:5".into()],
        entropy: vec![1; 32],
        ..Default::default()
    };
    c.setup_sandbox(&ok).await.unwrap();
    let resolv: PathBuf = h.dir.path().join("etc/resolv.conf");
    assert_eq!(
        std::fs::read_to_string(resolv).unwrap(),
        "nameserver 10.96.0.10\nsearch svc.cluster.local\noptions ndots:5\n"
    );
    let bad: Vec<(SetupSandboxRequest, &str)> = vec![
        (SetupSandboxRequest { hostname: "h".repeat(65), ..ok.clone() }, "hostname"),
        (SetupSandboxRequest { hostname: "a_b".into(), ..ok.clone() }, "hostname \"a_b\" contains '_'"),
        (SetupSandboxRequest { dns_servers: vec!["1.1.1.1".into(); 4], ..ok.clone() }, "at most 3"),
        (SetupSandboxRequest { dns_servers: vec!["ns1".into()], ..ok.clone() }, "\"ns1\" is not an IP address"),
        (SetupSandboxRequest { entropy: vec![0; 4097], ..ok.clone() }, "entropy is 4097 bytes"),
        (SetupSandboxRequest { dns_search: vec!["a\nb".into()], ..ok.clone() }, "dns search domain"),
    ];
    for (req, want) in bad {
        assert_status(c.setup_sandbox(&req).await, Code::INVALID_ARGUMENT, want);
    }
    assert!(c.health().await.unwrap().serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_served_concurrently() {
    let h = harness().await;
    let c = h.client().await;
    h.create("c8", &["sleep"], Stdio::default()).await.unwrap();
    c.start_container("c8").await.unwrap();
    let c2 = c.clone();
    let wait = tokio::spawn(async move { c2.wait_process("c8", None).await });
    let oom_c = c.clone();
    let oom = tokio::spawn(async move { oom_c.get_oom_event().await });
    // Two calls block in the backend; others on the same connection still answer.
    for _ in 0..5 {
        let t = Instant::now();
        c.version().await.unwrap();
        c.health().await.unwrap();
        assert!(t.elapsed() < Duration::from_secs(2));
    }
    assert!(!wait.is_finished() && !oom.is_finished());
    h.backend.push_oom("c8");
    assert_eq!(oom.await.unwrap().unwrap(), "c8");
    c.signal_process("c8", None, 15, false).await.unwrap();
    assert_eq!(wait.await.unwrap().unwrap().exit_status, 143);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_its_deadline_times_out_and_the_agent_goes_on() {
    let h = harness().await;
    let c = h.client().await.with_timeout(Duration::from_millis(300));
    h.create("slow", &["sleep"], Stdio::default()).await.unwrap();
    let e = c.pause_container("slow").await.unwrap_err();
    assert!(
        matches!(e, ClientError::Timeout { .. }) || e.code() == Some(Code::DEADLINE_EXCEEDED),
        "expected a timeout: {e}"
    );
    assert!(c.with_timeout(Duration::from_secs(10)).version().await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_backend_container_calls_fail_loudly() {
    let h = harness_with(Some("cgroup2 is not mounted")).await;
    let c = h.client().await;
    assert!(c.version().await.is_ok());
    let hl = c.health().await.unwrap();
    assert!(!hl.serving);
    assert_status(
        h.create("c9", &["sleep"], Stdio::default()).await,
        Code::FAILED_PRECONDITION,
        "container c9: no container backend: cgroup2 is not mounted",
    );
    assert_status(c.get_oom_event().await, Code::FAILED_PRECONDITION, "no container backend");
}
