//! The agent targets' drivers (they live in this crate, next to the agent
//! modules compiled in by `lib.rs`, because those are crate-private).
//!
//! [`api`]: a sequence of ttrpc requests (method chosen by the input, the
//! protobuf payload as the input has it) through the generated method
//! handlers into the real `AgentService`, whose container backend is
//! [`MockBackend`]; and STDIO connections (header line and bytes) to the
//! real STDIO registry. [`spec`]: the OCI spec, process and resources JSON
//! the host sends, the bundle built from them, the field checks of
//! `hull_agent_api::validate`, the STDIO header parser and the sandbox
//! plan.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hull_agent_api::proto::agent::*;
use hull_agent_api::proto::agent_ttrpc::create_agent;
use hull_agent_api::protobuf::{Message, MessageDyn};
use hull_agent_api::stdio::StdioHeader;
use hull_agent_api::validate::*;
use oci_spec::runtime::{Capability, LinuxResources, Process, Spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use ttrpc::r#async::TtrpcContext;

use crate::backend::*;
use crate::container::runtime;
use crate::guest::debug;
use crate::server::sandbox::{self, SandboxSettings};
use crate::server::service::AgentService;
use crate::stdio::{serve_connection, StdioRegistry};

pub const SERVICE: &str = "hull.agent.v1.Agent";
/// The methods, in the order the input's selector byte picks them.
pub const METHODS: [&str; 17] = [
    "Version",
    "Health",
    "SetupSandbox",
    "CreateContainer",
    "StartContainer",
    "DeleteContainer",
    "PauseContainer",
    "ResumeContainer",
    "UpdateResources",
    "Stats",
    "ListProcesses",
    "ExecProcess",
    "SignalProcess",
    "WaitProcess",
    "ResizeTty",
    "CloseStdin",
    "GetOomEvent",
];
/// Selector bytes from this value on open a STDIO connection instead.
pub const STDIO_SELECTOR: u8 = 0xF0;

// ---- the mock backend ----------------------------------------------------

/// A container backend whose answers come from the input, and which checks
/// that the service validated every request before calling it (what
/// `backend.rs` promises the real backend).
pub struct MockBackend {
    answers: Mutex<VecDeque<u8>>,
}

fn ok_id(id: &str) {
    assert!(check_id("id", id).is_ok(), "the backend got an unchecked id {id:?}");
}

fn ok_exec(exec_id: Option<&str>) {
    if let Some(e) = exec_id {
        ok_id(e);
    }
}

impl MockBackend {
    /// Ok(()) or one of the errors, as the next answer byte says.
    fn answer(&self) -> Result<()> {
        let b = self.answers.lock().unwrap().pop_front().unwrap_or(0);
        let m = format!("mock error {b}");
        match b % 8 {
            3 => Err(BackendError::NotFound(m)),
            4 => Err(BackendError::AlreadyExists(m)),
            5 => Err(BackendError::InvalidArgument(m)),
            6 => Err(BackendError::FailedPrecondition(m)),
            7 => Err(BackendError::Internal(m)),
            _ => Ok(()),
        }
    }

    fn process(&self, stdio: StdioConfig) -> Result<ProcessHandle> {
        assert!(!(stdio.terminal && stdio.stderr), "the backend got a terminal with stderr");
        self.answer()?;
        // The host-facing ends; the process's ends are closed at once (it
        // exited), so copies reach end-of-file.
        let pipe = |want: bool, read_end: bool| -> Option<OwnedFd> {
            if !want {
                return None;
            }
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).ok()?;
            Some(if read_end { r } else { w })
        };
        let pty = stdio.terminal.then(|| std::os::unix::net::UnixStream::pair().ok().map(|(a, _)| OwnedFd::from(a)));
        Ok(ProcessHandle {
            pid: 42,
            io: ProcessIo {
                stdin: pipe(stdio.stdin && !stdio.terminal, false),
                stdout: pipe(stdio.stdout && !stdio.terminal, true),
                stderr: pipe(stdio.stderr, true),
                pty: pty.flatten(),
            },
            phases: Default::default(),
        })
    }
}

impl Backend for MockBackend {
    fn create(&self, c: CreateSpec) -> Result<ProcessHandle> {
        ok_id(&c.id);
        assert!(c.layers.len() <= MAX_LAYERS);
        for l in &c.layers {
            assert!(check_layer(l).is_ok(), "the backend got an unchecked layer {l:?}");
        }
        if let Some(s) = &c.rw_disk_serial {
            assert!(!s.is_empty() && check_disk_serial(s).is_ok(), "unchecked disk serial {s:?}");
        }
        self.process(c.stdio)
    }
    fn start(&self, id: &str) -> Result<u32> {
        ok_id(id);
        self.answer().map(|()| 42)
    }
    fn exec(&self, id: &str, exec_id: &str, _p: Process, stdio: StdioConfig) -> Result<ProcessHandle> {
        ok_id(id);
        ok_id(exec_id);
        self.process(stdio)
    }
    fn signal(&self, id: &str, exec_id: Option<&str>, signal: i32, all: bool) -> Result<()> {
        ok_id(id);
        ok_exec(exec_id);
        assert!((1..=64).contains(&signal), "signal {signal}");
        assert!(!all || exec_id.is_none());
        self.answer()
    }
    fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitInfo> {
        ok_id(id);
        ok_exec(exec_id);
        self.answer().map(|()| ExitInfo { status: 0, exited_at_unix_nanos: 1 })
    }
    fn delete(&self, id: &str, _force: bool) -> Result<()> {
        ok_id(id);
        self.answer()
    }
    fn pause(&self, id: &str) -> Result<()> {
        ok_id(id);
        self.answer()
    }
    fn resume(&self, id: &str) -> Result<()> {
        ok_id(id);
        self.answer()
    }
    fn update(&self, id: &str, _r: LinuxResources) -> Result<()> {
        ok_id(id);
        self.answer()
    }
    fn stats(&self, id: &str) -> Result<Stats> {
        ok_id(id);
        self.answer().map(|()| Stats::default())
    }
    fn pids(&self, id: &str) -> Result<Vec<u32>> {
        ok_id(id);
        self.answer().map(|()| vec![1, 2])
    }
    fn resize_tty(&self, id: &str, exec_id: Option<&str>, _rows: u16, _cols: u16) -> Result<()> {
        ok_id(id);
        ok_exec(exec_id);
        self.answer()
    }
    fn next_oom(&self) -> Result<String> {
        self.answer().map(|()| "c1".into())
    }
    fn counts(&self) -> (u32, u32) {
        (1, 2)
    }
}

// ---- API target ------------------------------------------------------------

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime"))
}

/// Where SetupSandbox writes resolv.conf (tmpfs when there is one).
fn scratch_dir() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
        let d = base.join(format!("hull-fuzz-agent-{}", std::process::id()));
        crate::guest::remove_at_exit(d.clone());
        d
    })
}

fn context() -> TtrpcContext {
    TtrpcContext {
        mh: ttrpc::MessageHeader::default(),
        metadata: Default::default(),
        timeout_nano: 0,
        connection_data: Default::default(),
    }
}

/// What the agent's Rust `main` does before anything else (libFuzzer's C++
/// `main` does not): writing to a closed pipe is EPIPE, not death.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // SAFETY: setting a signal's disposition to SIG_IGN.
    ONCE.call_once(|| unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    });
}

/// Runs the requests and STDIO connections of `data`: 32 answer bytes for
/// the mock backend (0xFF first: no backend), then records of a selector
/// byte, a u16 (LE) length and that many bytes.
pub fn api(data: &[u8]) {
    ignore_sigpipe();
    let (answers, mut rest) = data.split_at(data.len().min(32));
    let no_backend = answers.first() == Some(&0xFF);
    let backend: crate::server::BackendSlot = if no_backend {
        Err("disabled by the input".into())
    } else {
        Ok(Arc::new(MockBackend { answers: Mutex::new(answers.iter().copied().collect()) }))
    };
    let registry = Arc::new(StdioRegistry::default());
    let settings = SandboxSettings { resolv_conf: Some(scratch_dir().join("resolv.conf")), apply_kernel: false };
    let service = AgentService::new(backend, registry.clone(), settings, Duration::from_millis(20));
    let services = create_agent(Arc::new(service));
    let methods = &services[SERVICE].methods;
    runtime().block_on(async {
        while let [sel, l0, l1, tail @ ..] = rest {
            let n = usize::from(u16::from_le_bytes([*l0, *l1])).min(tail.len());
            let (bytes, next) = tail.split_at(n);
            rest = next;
            if *sel >= STDIO_SELECTOR {
                stdio_connection(&registry, bytes, *sel).await;
                continue;
            }
            let method = METHODS[usize::from(*sel) % METHODS.len()];
            let req = ttrpc::Request {
                service: SERVICE.into(),
                method: method.into(),
                payload: bytes.to_vec(),
                ..Default::default()
            };
            let handler = &methods[method];
            let res = tokio::time::timeout(Duration::from_secs(20), handler.handler(context(), req)).await;
            let res = res.unwrap_or_else(|_| panic!("{method} did not answer within 20 s"));
            if debug() {
                eprintln!("{method}: {:?}", res.as_ref().map(|r| r.status.as_ref().map(|s| (s.code(), s.message()))));
            }
            if let Ok(r) = res {
                // An answer always carries a status.
                assert!(r.status.is_some(), "{method}: response without status");
            }
        }
    });
}

/// One STDIO connection: `bytes` as the header line (and what follows),
/// then end-of-file; the agent's answer is read to its end.
async fn stdio_connection(registry: &Arc<StdioRegistry>, bytes: &[u8], sel: u8) {
    let (mut host, agent) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(serve_connection(agent, registry.clone()));
    let _ = host.write_all(bytes).await;
    // Odd selectors keep the connection open after a complete header line
    // (hanging up once the answer is in); otherwise the agent gets
    // end-of-file at once, not after its 10 s header timeout.
    let hold = sel & 1 == 1 && bytes.contains(&b'\n');
    if !hold {
        let _ = host.shutdown().await;
    }
    let mut reply = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        loop {
            match host.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&buf[..n]),
            }
            if hold && (reply.ends_with(b"\n") || reply.len() > 4096) {
                // Hang up after the answer line.
                break;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read).await.expect("STDIO connection hung");
    drop(host);
    tokio::time::timeout(Duration::from_secs(20), task).await.expect("STDIO connection task hung").ok();
    if debug() {
        eprintln!("STDIO {:?}: {:?}", String::from_utf8_lossy(bytes), String::from_utf8_lossy(&reply));
    }
    assert!(
        reply.starts_with(b"OK\n") || reply.starts_with(b"ERR ") || reply.is_empty(),
        "STDIO answer {:?}",
        String::from_utf8_lossy(&reply)
    );
}

/// Seed inputs for [`api`]: one record per method with a valid request,
/// and STDIO headers.
pub fn api_seeds() -> Vec<(String, Vec<u8>)> {
    fn rec(out: &mut Vec<u8>, sel: u8, payload: &[u8]) {
        out.push(sel);
        out.extend_from_slice(&(payload.len() as u16).to_le_bytes());
        out.extend_from_slice(payload);
    }
    let sel = |m: &str| METHODS.iter().position(|x| *x == m).unwrap() as u8;
    let enc = |m: &dyn MessageDyn| m.write_to_bytes_dyn().unwrap();
    let stdio = |terminal| {
        let mut s = hull_agent_api::proto::agent::Stdio::new();
        s.terminal = terminal;
        s.stdin = true;
        s.stdout = true;
        s.stderr = !terminal;
        s
    };
    let create = |id: &str, terminal| {
        let mut c = CreateContainerRequest::new();
        c.container_id = id.into();
        c.oci_spec_json = SPEC_JSON.as_bytes().to_vec();
        c.layers = vec!["layers/sha256-aa".into(), "layers/sha256-bb".into()];
        c.rw_disk_serial = "rw-c1".into();
        c.stdio = Some(stdio(terminal)).into();
        c
    };
    let creq = |id: &str| {
        let mut c = ContainerRequest::new();
        c.container_id = id.into();
        c
    };
    let preq = |id: &str, e: &str| {
        let mut p = ProcessRequest::new();
        p.container_id = id.into();
        p.exec_id = e.into();
        p
    };
    let mut seeds = Vec::new();
    let answers = [0u8; 32];

    // A container's life.
    let mut s = answers.to_vec();
    rec(&mut s, sel("Version"), &[]);
    let mut sb = SetupSandboxRequest::new();
    sb.sandbox_id = "pod-1".into();
    sb.hostname = "pod-1.example".into();
    sb.dns_servers = vec!["10.0.0.10".into(), "fd00::a".into()];
    sb.dns_search = vec!["svc.cluster.local".into()];
    sb.dns_options = vec!["ndots:5".into()];
    sb.entropy = vec![7; 32];
    sb.wall_clock_unix_nanos = 1_700_000_000_000_000_000;
    rec(&mut s, sel("SetupSandbox"), &enc(&sb));
    rec(&mut s, sel("CreateContainer"), &enc(&create("c1", false)));
    rec(&mut s, STDIO_SELECTOR, b"STDIO c1 - stdout\n");
    rec(&mut s, STDIO_SELECTOR + 1, b"STDIO c1 - stdin\nhello");
    rec(&mut s, sel("StartContainer"), &enc(&creq("c1")));
    let mut ex = ExecProcessRequest::new();
    ex.container_id = "c1".into();
    ex.exec_id = "e1".into();
    ex.oci_process_json = PROCESS_JSON.as_bytes().to_vec();
    ex.stdio = Some(stdio(true)).into();
    rec(&mut s, sel("ExecProcess"), &enc(&ex));
    rec(&mut s, STDIO_SELECTOR, b"STDIO c1 e1 pty\n");
    let mut rs = ResizeTtyRequest::new();
    rs.container_id = "c1".into();
    rs.exec_id = "e1".into();
    rs.rows = 24;
    rs.cols = 80;
    rec(&mut s, sel("ResizeTty"), &enc(&rs));
    rec(&mut s, sel("CloseStdin"), &enc(&preq("c1", "e1")));
    let mut sig = SignalProcessRequest::new();
    sig.container_id = "c1".into();
    sig.signal = 15;
    sig.all = true;
    rec(&mut s, sel("SignalProcess"), &enc(&sig));
    rec(&mut s, sel("WaitProcess"), &enc(&preq("c1", "")));
    rec(&mut s, sel("Stats"), &enc(&creq("c1")));
    rec(&mut s, sel("ListProcesses"), &enc(&creq("c1")));
    let mut up = UpdateResourcesRequest::new();
    up.container_id = "c1".into();
    up.oci_resources_json = RESOURCES_JSON.as_bytes().to_vec();
    rec(&mut s, sel("UpdateResources"), &enc(&up));
    rec(&mut s, sel("PauseContainer"), &enc(&creq("c1")));
    rec(&mut s, sel("ResumeContainer"), &enc(&creq("c1")));
    rec(&mut s, sel("GetOomEvent"), &enc(&GetOomEventRequest::new()));
    rec(&mut s, sel("Health"), &[]);
    let mut del = DeleteContainerRequest::new();
    del.container_id = "c1".into();
    del.force = true;
    rec(&mut s, sel("DeleteContainer"), &enc(&del));
    seeds.push(("life".to_string(), s));

    // Every method once, one per file, with a failing backend.
    for (i, m) in METHODS.iter().enumerate() {
        let mut s = vec![7u8; 32];
        let payload = match *m {
            "CreateContainer" => enc(&create("c-2", true)),
            "ExecProcess" => enc(&ex),
            "SignalProcess" => enc(&sig),
            "ResizeTty" => enc(&rs),
            "UpdateResources" => enc(&up),
            "SetupSandbox" => enc(&sb),
            "DeleteContainer" => enc(&del),
            "WaitProcess" | "CloseStdin" => enc(&preq("c1", "e1")),
            "Version" | "Health" | "GetOomEvent" => Vec::new(),
            _ => enc(&creq("c1")),
        };
        rec(&mut s, i as u8, &payload);
        seeds.push((format!("method-{m}"), s));
    }
    seeds
}

// ---- spec target -------------------------------------------------------------

/// Input kinds of [`spec`] (first byte, modulo 6).
pub const SPEC_KINDS: [&str; 6] = ["spec", "process", "resources", "fields", "stdio-header", "sandbox"];

/// A real config.json (runc's default spec, terminal off, with a seccomp
/// profile and resources), the seed of the spec inputs.
pub const SPEC_JSON: &str = include_str!("spec.json");
pub const PROCESS_JSON: &str = r#"{"terminal":true,"user":{"uid":0,"gid":0,"additionalGids":[5]},"args":["/bin/sh","-c","echo hi"],"env":["PATH=/bin"],"cwd":"/","capabilities":{"bounding":["CAP_KILL","CAP_CHOWN"],"effective":["CAP_KILL"],"permitted":["CAP_KILL"]},"rlimits":[{"type":"RLIMIT_NOFILE","hard":1024,"soft":1024}],"noNewPrivileges":false,"consoleSize":{"height":24,"width":80}}"#;
pub const RESOURCES_JSON: &str = r#"{"memory":{"limit":268435456,"swap":268435456},"cpu":{"shares":512,"quota":50000,"period":100000,"cpus":"0-1"},"pids":{"limit":100},"blockIO":{"weight":100},"unified":{"memory.high":"200000000"}}"#;

/// What the agent does with the host's spec, process and resources JSON,
/// and with the fields it validates.
pub fn spec(data: &[u8]) {
    let Some((&kind, rest)) = data.split_first() else { return };
    let terminal = kind & 0x80 != 0;
    match kind as usize % SPEC_KINDS.len() {
        0 => spec_json(rest, terminal),
        1 => process_json(rest, terminal),
        2 => {
            if let Ok(r) = serde_json::from_slice::<LinuxResources>(rest) {
                let back = serde_json::to_vec(&r).expect("resources serialize");
                let again: LinuxResources = serde_json::from_slice(&back).expect("resources parse back");
                assert_eq!(again, r);
            }
        }
        3 => fields(rest),
        4 => stdio_header(rest),
        _ => sandbox_request(rest),
    }
}

fn spec_json(json: &[u8], terminal: bool) {
    let Ok(spec) = serde_json::from_slice::<Spec>(json) else { return };
    let rootfs = Path::new("/run/hull/c1/rootfs");
    let Ok(b) = runtime::bundle_spec(&spec, rootfs, "hull/pool/3", terminal) else {
        let args = spec.process().as_ref().and_then(|p| p.args().clone()).unwrap_or_default();
        assert!(args.is_empty(), "bundle refused a spec with a process and args");
        return;
    };
    assert_eq!(b.root().as_ref().map(|r| r.path().as_path()), Some(rootfs));
    let linux = b.linux().as_ref().expect("bundle has linux");
    assert!(linux.resources().is_none(), "resources left in the bundle");
    assert_eq!(linux.cgroups_path().as_deref(), Some(Path::new("hull/pool/3")));
    let p = b.process().as_ref().expect("bundle has a process");
    assert!(p.args().as_ref().is_some_and(|a| !a.is_empty()));
    assert_eq!(p.terminal(), Some(terminal));
    assert_ne!(p.no_new_privileges(), Some(false));
    // config.json is written and read back by libcontainer.
    let bytes = serde_json::to_vec_pretty(&b).expect("bundle serializes");
    let back: Spec = serde_json::from_slice(&bytes).expect("bundle parses back");
    assert_eq!(back, b, "bundle changes through config.json");
    // An exec in this container.
    if let Some(p) = spec.process() {
        check_exec(p.clone(), &b, terminal);
    }
}

fn process_json(json: &[u8], terminal: bool) {
    let Ok(p) = serde_json::from_slice::<Process>(json) else { return };
    let spec: Spec = serde_json::from_str(SPEC_JSON).expect("seed spec");
    check_exec(p.clone(), &spec, terminal);
    let mut no_seccomp = spec;
    if let Some(l) = no_seccomp.linux_mut() {
        l.set_seccomp(None);
    }
    check_exec(p, &no_seccomp, terminal);
}

fn check_exec(p: Process, container: &Spec, terminal: bool) {
    let caps = p.capabilities().clone();
    let (q, _ex) = runtime::prepare_exec(p, container, terminal, Some(3));
    assert_eq!(q.terminal(), Some(false));
    assert_ne!(q.no_new_privileges(), Some(false));
    if let (Some(before), Some(after)) = (caps, q.capabilities().as_ref()) {
        // Widened for the executor: chroot (and setpcap to drop it again).
        let b = after.bounding().as_ref().expect("bounding set");
        assert!(b.contains(&Capability::SysChroot) && b.contains(&Capability::Setpcap));
        for c in before.bounding().iter().flatten() {
            assert!(b.contains(c));
        }
    }
    let bytes = serde_json::to_vec_pretty(&q).expect("process serializes");
    let back: Process = serde_json::from_slice(&bytes).expect("process parses back");
    assert_eq!(back, q, "exec process changes through its JSON file");
}

/// The field checks, on any string: what passes is safe where the agent
/// uses it.
fn fields(bytes: &[u8]) {
    let s = String::from_utf8_lossy(bytes);
    let msg_ok = |r: std::result::Result<(), String>| {
        if let Err(m) = &r {
            assert!(m.len() < 2048, "message of {} bytes", m.len());
        }
        r.is_ok()
    };
    if msg_ok(check_id("container_id", &s)) {
        // A single, ordinary path component (state dirs, cgroup names).
        assert!(!s.is_empty() && s.len() <= MAX_ID_LEN);
        let comps: Vec<Component> = Path::new(&*s).components().collect();
        assert!(
            matches!(comps.as_slice(), [Component::Normal(c)] if *c == std::ffi::OsStr::new(&*s)),
            "id {s:?} is not one path component"
        );
    }
    if msg_ok(check_layer(&s)) {
        // Stays under the shared root.
        assert!(!s.contains('\0') && !s.starts_with('/'));
        assert!(Path::new(&*s).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir)));
        assert!(!s.contains([':', ',', '\\', '\n']));
    }
    if msg_ok(check_disk_serial(&s)) {
        assert!(s.len() <= MAX_DISK_SERIAL_LEN);
        assert!(!s.contains(['/', '\0', '\n', ' ']));
    }
    for (ok, what) in [
        (msg_ok(check_hostname(&s)), "hostname"),
        (msg_ok(check_search_domain(&s)), "search domain"),
        (msg_ok(check_dns_option(&s)), "dns option"),
    ] {
        if ok {
            // Goes into resolv.conf or sethostname: one word, one line.
            assert!(
                !s.is_empty() && !s.contains(|c: char| c.is_whitespace() || c.is_control() || c == '#'),
                "{what} {s:?}"
            );
        }
    }
    if msg_ok(check_hostname(&s)) {
        assert!(s.len() <= MAX_HOSTNAME_LEN);
    }
}

fn stdio_header(bytes: &[u8]) {
    let Ok(h) = StdioHeader::parse(bytes) else { return };
    ok_id(&h.container_id);
    ok_exec(h.exec_id.as_deref());
    // The line it came from, exactly.
    let line = format!("STDIO {} {} {}", h.container_id, h.exec_id.as_deref().unwrap_or("-"), h.stream);
    let got = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    assert_eq!(line.as_bytes(), got, "STDIO header {h:?}");
}

fn sandbox_request(bytes: &[u8]) {
    let Ok(req) = SetupSandboxRequest::parse_from_bytes(bytes) else { return };
    let Ok(plan) = sandbox::plan(&req) else { return };
    let mut nameservers = 0;
    for line in plan.resolv_conf.lines() {
        let (key, rest) = line.split_once(' ').expect("resolv.conf line without a value");
        assert!(matches!(key, "nameserver" | "search" | "options"), "resolv.conf line {line:?}");
        assert!(!rest.is_empty() && !rest.contains(['\n', '\r', '#', ';']), "resolv.conf line {line:?}");
        if key == "nameserver" {
            nameservers += 1;
            assert!(rest.parse::<std::net::IpAddr>().is_ok(), "nameserver {rest:?}");
        }
    }
    assert!(nameservers <= MAX_NAMESERVERS);
    assert!(plan.entropy.len() <= MAX_ENTROPY);
    if let Some(h) = &plan.hostname {
        assert!(check_hostname(h).is_ok());
    }
    assert!(plan.wall_clock_unix_nanos.is_none_or(|n| n > 0));
}

/// Seed inputs for [`spec`].
pub fn spec_seeds() -> Vec<(String, Vec<u8>)> {
    let with = |kind: u8, body: &[u8]| {
        let mut v = vec![kind];
        v.extend_from_slice(body);
        v
    };
    let mut sb = SetupSandboxRequest::new();
    sb.sandbox_id = "pod-1".into();
    sb.hostname = "pod-1.example".into();
    sb.dns_servers = vec!["10.0.0.10".into(), "fd00::a".into()];
    sb.dns_search = vec!["svc.cluster.local".into(), "cluster.local".into()];
    sb.dns_options = vec!["ndots:5".into(), "edns0".into()];
    sb.entropy = vec![1, 2, 3];
    sb.wall_clock_unix_nanos = 1;
    vec![
        ("spec".into(), with(0, SPEC_JSON.as_bytes())),
        ("spec-terminal".into(), with(0x80 + 2, SPEC_JSON.as_bytes())),
        ("process".into(), with(1, PROCESS_JSON.as_bytes())),
        ("resources".into(), with(2, RESOURCES_JSON.as_bytes())),
        ("field-id".into(), with(3, b"c1.a-b_c")),
        ("field-layer".into(), with(3, b"layers/sha256-abc/./x")),
        ("field-host".into(), with(3, b"pod-1.example")),
        ("stdio-header".into(), with(4, b"STDIO c1 e-1 stdout\n")),
        ("stdio-header-init".into(), with(4, b"STDIO c1 - pty")),
        ("sandbox".into(), with(5, &sb.write_to_bytes().unwrap())),
    ]
}

/// With `HULL_FUZZ_WRITE_SEEDS=DIR` set, a target writes its seeds to DIR
/// and exits (how `seeds/` was made).
pub fn write_seeds_if_asked(seeds: fn() -> Vec<(String, Vec<u8>)>) {
    let Some(dir) = std::env::var_os("HULL_FUZZ_WRITE_SEEDS") else { return };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).expect("seed dir");
    for (name, data) in seeds() {
        std::fs::write(dir.join(name), data).expect("writing a seed");
    }
    std::process::exit(0);
}
