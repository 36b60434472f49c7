//! hull-cri: a CRI client scenario against a real containerd with the hull
//! runtime handler (what the kubelet does for a pod with
//! `runtimeClassName: hull`, minus networking).
//!
//! ```text
//! hull-cri --socket /path/containerd.sock [--image IMG] [--handler hull]
//!          [--step-timeout SECS] [--hostname NAME]
//! ```
//!
//! Steps: Version; the test image known to the CRI image service;
//! RunPodSandbox with the handler (host network, so no CNI); two containers
//! created and started in it, one hull-vmm for the pod; ExecSync in each
//! (output bytes, exit codes, the pod's hostname and DNS config, separate
//! writable layers); StopContainer (SIGTERM trapped → its exit code;
//! ignored → killed after the grace period, 137); RemoveContainer;
//! StopPodSandbox, RemovePodSandbox; the pod, its containers, its hull-vmm
//! and its shim gone. Every RPC is bounded by the step timeout. Prints
//! `PASS name` / `FAIL name: why` per check and `INFO` timings, a summary
//! line `hull-cri: N passed, M failed`, and exits 1 if any check failed
//! (2 on bad arguments).

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint, Uri};

const USAGE: &str =
    "usage: hull-cri --socket PATH [--image IMG] [--handler NAME] [--step-timeout SECS] [--hostname NAME]";

#[derive(Debug)]
struct Args {
    socket: PathBuf,
    image: String,
    handler: String,
    step_timeout: Duration,
    hostname: String,
}

fn parse_args(mut it: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut socket = None;
    let mut image = "docker.io/library/hull-test:latest".to_string();
    let mut handler = "hull".to_string();
    let mut step_timeout = Duration::from_secs(300);
    let mut hostname = "hull-cri-pod".to_string();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value\n{USAGE}"));
        match a.as_str() {
            "--socket" => socket = Some(PathBuf::from(val("--socket")?)),
            "--image" => image = val("--image")?,
            "--handler" => handler = val("--handler")?,
            "--hostname" => hostname = val("--hostname")?,
            "--step-timeout" => {
                let v = val("--step-timeout")?;
                let secs: u64 = v
                    .parse()
                    .ok()
                    .filter(|s| *s > 0)
                    .ok_or_else(|| format!("--step-timeout {v:?}: expected a positive number of seconds"))?;
                step_timeout = Duration::from_secs(secs);
            }
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let socket = socket.ok_or_else(|| format!("--socket is required\n{USAGE}"))?;
    if image.is_empty() || handler.is_empty() || hostname.is_empty() {
        return Err(format!("--image, --handler and --hostname must not be empty\n{USAGE}"));
    }
    Ok(Args { socket, image, handler, step_timeout, hostname })
}

/// PASS/FAIL bookkeeping.
#[derive(Default)]
struct Report {
    passes: u32,
    fails: u32,
}

impl Report {
    fn pass(&mut self, what: &str) {
        println!("PASS {what}");
        self.passes += 1;
    }
    fn fail(&mut self, what: &str, why: &str) {
        println!("FAIL {what}: {why}");
        self.fails += 1;
    }
    fn check<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, want: T, got: T) {
        if want == got {
            self.pass(what)
        } else {
            self.fail(what, &format!("want {want:?}, got {got:?}"))
        }
    }
    fn check_true(&mut self, what: &str, ok: bool, why: impl FnOnce() -> String) {
        if ok {
            self.pass(what)
        } else {
            self.fail(what, &why())
        }
    }
}

/// A step failed: which, and why (the RPC's status, or the timeout).
struct StepError(String);

type Step<T> = Result<T, StepError>;

/// Runs one RPC, bounded by `tmo`, with its name in any error.
async fn rpc<T>(
    name: &str,
    tmo: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Step<T> {
    let t0 = Instant::now();
    match tokio::time::timeout(tmo, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => {
            Err(StepError(format!("{name}: {:?} after {} ms: {}", s.code(), t0.elapsed().as_millis(), s.message())))
        }
        Err(_) => Err(StepError(format!("{name}: no answer within {} s", tmo.as_secs()))),
    }
}

async fn connect(socket: PathBuf) -> Result<Channel, String> {
    if !socket.exists() {
        return Err(format!("containerd socket {} does not exist", socket.display()));
    }
    let path = socket.clone();
    // The URI is required by tonic but unused: every connection is the unix socket.
    Endpoint::try_from("http://containerd.invalid")
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))
}

/// Processes whose command line (NUL-separated args joined by spaces) has
/// an argument ending in `prog` and contains `needle`.
fn processes(prog: &str, needle: &str) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            raw.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let Some(argv0) = args.first() else { continue };
        let line = args.join(" ");
        if argv0.ends_with(prog) && line.contains(needle) && !parent_is(pid, prog) {
            out.push((pid, line));
        }
    }
    out
}

/// Whether `pid`'s parent runs `prog` too: a jailed hull-vmm is the child
/// of the hull-vmm the shim started (its PID namespace's parent); one VM
/// counts once.
fn parent_is(pid: u32, prog: &str) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let Some(ppid) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)) else { return false };
    std::fs::read(format!("/proc/{ppid}/cmdline"))
        .map(|raw| raw.split(|b| *b == 0).next().is_some_and(|a| String::from_utf8_lossy(a).ends_with(prog)))
        .unwrap_or(false)
}

/// Polls `f` until it returns true or `tmo` passes.
async fn eventually(tmo: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + tmo;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Cri {
    rt: RuntimeServiceClient<Channel>,
    img: ImageServiceClient<Channel>,
    tmo: Duration,
}

impl Cri {
    /// ExecSync of `cmd` in container `cid`: (stdout, stderr, exit code).
    async fn exec(&mut self, name: &str, cid: &str, cmd: &[&str]) -> Step<(String, String, i32)> {
        let req = cri::ExecSyncRequest {
            container_id: cid.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: self.tmo.as_secs() as i64,
        };
        let r = rpc(&format!("ExecSync {name}"), self.tmo, self.rt.exec_sync(req)).await?;
        Ok((
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
            r.exit_code,
        ))
    }

    async fn container_status(&mut self, cid: &str) -> Step<cri::ContainerStatus> {
        let req = cri::ContainerStatusRequest { container_id: cid.to_string(), verbose: false };
        rpc(&format!("ContainerStatus {cid}"), self.tmo, self.rt.container_status(req))
            .await?
            .status
            .ok_or_else(|| StepError(format!("ContainerStatus {cid}: answer without a status")))
    }

    async fn containers_of(&mut self, sandbox: &str) -> Step<Vec<cri::Container>> {
        let req = cri::ListContainersRequest {
            filter: Some(cri::ContainerFilter { pod_sandbox_id: sandbox.to_string(), ..Default::default() }),
        };
        Ok(rpc("ListContainers", self.tmo, self.rt.list_containers(req)).await?.containers)
    }
}

fn sandbox_config(args: &Args, uid: &str) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: "hull-cri".into(),
            uid: uid.into(),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: args.hostname.clone(),
        dns_config: Some(cri::DnsConfig {
            servers: vec!["10.9.8.7".into()],
            searches: vec!["hull.test".into()],
            options: vec!["ndots:2".into()],
        }),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Host network (no CNI needed: the lab has none); the rest per pod/container.
fn namespaces() -> cri::NamespaceOption {
    cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn container_config(name: &str, image: &str, command: &[&str]) -> cri::ContainerConfig {
    cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
        image: Some(cri::ImageSpec { image: image.into(), ..Default::default() }),
        command: command.iter().map(|s| s.to_string()).collect(),
        linux: Some(cri::LinuxContainerConfig {
            security_context: Some(cri::LinuxContainerSecurityContext {
                namespace_options: Some(namespaces()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The scenario; `sandbox` receives the pod id as soon as it exists (for
/// the cleanup after a failed step).
async fn scenario(args: &Args, c: &mut Cri, r: &mut Report, sandbox: &mut Option<String>) -> Step<()> {
    let tmo = c.tmo;

    let v = rpc("Version", tmo, c.rt.version(cri::VersionRequest { version: "v1".into() })).await?;
    println!("INFO runtime {} {} (CRI {})", v.runtime_name, v.runtime_version, v.runtime_api_version);
    r.check("Version: runtime name", "containerd", v.runtime_name.as_str());
    r.check("Version: CRI API version", "v1", v.runtime_api_version.as_str());

    let req = cri::ImageStatusRequest {
        image: Some(cri::ImageSpec { image: args.image.clone(), ..Default::default() }),
        verbose: false,
    };
    let st = rpc("ImageStatus", tmo, c.img.image_status(req)).await?;
    match st.image {
        Some(img) => r.check_true("ImageStatus: test image known to CRI", img.repo_tags.contains(&args.image), || {
            format!("{} not in repo tags {:?}", args.image, img.repo_tags)
        }),
        None => {
            return Err(StepError(format!(
                "ImageStatus: image {} not found in containerd's k8s.io namespace (import it with `ctr -n k8s.io image import`)",
                args.image
            )))
        }
    }

    // --- the pod ---------------------------------------------------------
    let uid = format!("hull-cri-{}", std::process::id());
    let sb_cfg = sandbox_config(args, &uid);
    let t0 = Instant::now();
    let req = cri::RunPodSandboxRequest { config: Some(sb_cfg.clone()), runtime_handler: args.handler.clone() };
    let sb = rpc("RunPodSandbox", tmo, c.rt.run_pod_sandbox(req)).await?.pod_sandbox_id;
    println!("INFO RunPodSandbox (VM boot included): {} ms, pod {sb}", t0.elapsed().as_millis());
    *sandbox = Some(sb.clone());
    let req = cri::PodSandboxStatusRequest { pod_sandbox_id: sb.clone(), verbose: false };
    let st = rpc("PodSandboxStatus", tmo, c.rt.pod_sandbox_status(req)).await?.status.unwrap_or_default();
    r.check("pod: ready", cri::PodSandboxState::SandboxReady as i32, st.state);
    r.check("pod: runtime handler", args.handler.as_str(), st.runtime_handler.as_str());
    let vms = processes("hull-vmm", &format!("/{sb}/"));
    r.check("pod: one hull-vmm for the pod", 1, vms.len());
    r.check("pod: one shim for the pod", 1, processes("containerd-shim-hull-v2", &format!("-id {sb} ")).len());

    // --- two containers --------------------------------------------------
    let specs: [(&str, Vec<&str>); 2] = [
        ("c1", vec!["sleep", "100000"]),
        // Traps SIGTERM: StopContainer ends it with the trap's status.
        ("c2", vec!["sh", "-c", "trap 'exit 42' TERM; while :; do sleep 0.2; done"]),
    ];
    let mut ids = Vec::new();
    for (name, cmd) in &specs {
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: sb.clone(),
            config: Some(container_config(name, &args.image, cmd)),
            sandbox_config: Some(sb_cfg.clone()),
        };
        let t0 = Instant::now();
        let id = rpc(&format!("CreateContainer {name}"), tmo, c.rt.create_container(req)).await?.container_id;
        let req = cri::StartContainerRequest { container_id: id.clone() };
        rpc(&format!("StartContainer {name}"), tmo, c.rt.start_container(req)).await?;
        println!("INFO CreateContainer + StartContainer {name}: {} ms", t0.elapsed().as_millis());
        let st = c.container_status(&id).await?;
        r.check(&format!("{name}: running"), cri::ContainerState::ContainerRunning as i32, st.state);
        ids.push(id);
    }
    let listed = c.containers_of(&sb).await?;
    let mut listed_ids: Vec<String> = listed.iter().map(|x| x.id.clone()).collect();
    listed_ids.sort();
    let mut want = ids.clone();
    want.sort();
    r.check("ListContainers: both containers in the pod", want, listed_ids);
    r.check("pod: still one hull-vmm (the containers joined the pod VM)", 1, processes("hull-vmm", "").len());

    // --- ExecSync ----------------------------------------------------------
    for ((name, _), id) in specs.iter().zip(&ids) {
        let script = format!("echo from-{name}; hostname");
        let t0 = Instant::now();
        let (out, err, code) = c.exec(name, id, &["sh", "-c", &script]).await?;
        println!("INFO ExecSync {name}: {} ms", t0.elapsed().as_millis());
        r.check(&format!("{name}: ExecSync stdout"), format!("from-{name}\n{}\n", args.hostname), out);
        r.check(&format!("{name}: ExecSync stderr"), String::new(), err);
        r.check(&format!("{name}: ExecSync exit code"), 0, code);
    }
    let (out, err, code) =
        c.exec("c1 (failing)", &ids[0], &["sh", "-c", "echo partial; echo oops >&2; exit 7"]).await?;
    r.check("c1: failing ExecSync exit code", 7, code);
    r.check("c1: failing ExecSync stdout", "partial\n", out.as_str());
    r.check("c1: failing ExecSync stderr", "oops\n", err.as_str());
    // As with runc, a binary that cannot be started is an error of the call
    // (not an exit code), and the error names it.
    let t0 = Instant::now();
    match c.exec("c2 (missing binary)", &ids[1], &["/no/such/binary"]).await {
        Err(StepError(e)) => {
            r.check_true("c2: ExecSync of a missing binary fails, naming it", e.contains("/no/such/binary"), || {
                e.clone()
            })
        }
        Ok((out, err, code)) => r.fail(
            "c2: ExecSync of a missing binary fails, naming it",
            &format!("it succeeded: exit code {code}, stdout {out:?}, stderr {err:?}"),
        ),
    }
    // containerd's cleanup of a failed exec waits (up to a minute) for the
    // shim to report the process gone: it must not take that long.
    let took = t0.elapsed();
    r.check_true("c2: failed ExecSync answers promptly (< 30 s)", took < Duration::from_secs(30), || {
        format!("took {} ms", took.as_millis())
    });

    // CRI's files for the pod, through the shim's share: DNS config and hostname.
    let (out, _, code) = c.exec("c1 resolv.conf", &ids[0], &["cat", "/etc/resolv.conf"]).await?;
    r.check("c1: resolv.conf from the pod's DNS config", 0, code);
    r.check_true(
        "c1: resolv.conf has the pod's nameserver and search",
        out.contains("nameserver 10.9.8.7") && out.contains("search hull.test"),
        || format!("got {out:?}"),
    );
    let (out, _, _) = c.exec("c2 /etc/hostname", &ids[1], &["cat", "/etc/hostname"]).await?;
    r.check("c2: /etc/hostname is the pod's", format!("{}\n", args.hostname), out);
    let (_, _, code) = c.exec("c2 /etc/hosts", &ids[1], &["test", "-s", "/etc/hosts"]).await?;
    r.check("c2: /etc/hosts present", 0, code);

    // Each container has its own writable layer.
    let (_, _, code) = c.exec("c1 write", &ids[0], &["sh", "-c", "echo mine > /only-c1 && test -s /only-c1"]).await?;
    r.check("c1: writes its root file system", 0, code);
    let (_, _, code) = c.exec("c2 read", &ids[1], &["test", "-e", "/only-c1"]).await?;
    r.check("c2: does not see c1's file", 1, code);

    // --- stop and remove the containers ------------------------------------
    let t0 = Instant::now();
    let req = cri::StopContainerRequest { container_id: ids[1].clone(), timeout: 30 };
    rpc("StopContainer c2", tmo, c.rt.stop_container(req)).await?;
    let st = c.container_status(&ids[1]).await?;
    r.check("c2: exited after StopContainer", cri::ContainerState::ContainerExited as i32, st.state);
    r.check("c2: SIGTERM trapped, exit code 42", 42, st.exit_code);
    println!("INFO StopContainer c2 (trapped SIGTERM): {} ms", t0.elapsed().as_millis());
    // sleep is the container's pid 1 and ignores SIGTERM: killed after 2 s.
    let t0 = Instant::now();
    let req = cri::StopContainerRequest { container_id: ids[0].clone(), timeout: 2 };
    rpc("StopContainer c1", tmo, c.rt.stop_container(req)).await?;
    let st = c.container_status(&ids[0]).await?;
    r.check("c1: exited after StopContainer", cri::ContainerState::ContainerExited as i32, st.state);
    r.check("c1: SIGTERM ignored, killed (137)", 137, st.exit_code);
    println!("INFO StopContainer c1 (SIGKILL after 2 s): {} ms", t0.elapsed().as_millis());
    for ((name, _), id) in specs.iter().zip(&ids) {
        let req = cri::RemoveContainerRequest { container_id: id.clone() };
        rpc(&format!("RemoveContainer {name}"), tmo, c.rt.remove_container(req)).await?;
    }
    r.check("ListContainers: none left in the pod", 0, c.containers_of(&sb).await?.len());
    r.check("pod: VM stays while the sandbox lives", 1, processes("hull-vmm", &format!("/{sb}/")).len());

    // --- stop and remove the pod ---------------------------------------------
    let t0 = Instant::now();
    let req = cri::StopPodSandboxRequest { pod_sandbox_id: sb.clone() };
    rpc("StopPodSandbox", tmo, c.rt.stop_pod_sandbox(req)).await?;
    println!("INFO StopPodSandbox: {} ms", t0.elapsed().as_millis());
    let req = cri::PodSandboxStatusRequest { pod_sandbox_id: sb.clone(), verbose: false };
    let st = rpc("PodSandboxStatus", tmo, c.rt.pod_sandbox_status(req)).await?.status.unwrap_or_default();
    r.check("pod: not ready after StopPodSandbox", cri::PodSandboxState::SandboxNotready as i32, st.state);
    let req = cri::RemovePodSandboxRequest { pod_sandbox_id: sb.clone() };
    rpc("RemovePodSandbox", tmo, c.rt.remove_pod_sandbox(req)).await?;
    *sandbox = None;
    println!("INFO StopPodSandbox → RemovePodSandbox done: {} ms", t0.elapsed().as_millis());
    let pods = rpc("ListPodSandbox", tmo, c.rt.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None })).await?;
    r.check("ListPodSandbox: the pod is gone", 0, pods.items.iter().filter(|p| p.id == sb).count());
    let req = cri::PodSandboxStatusRequest { pod_sandbox_id: sb.clone(), verbose: false };
    match tokio::time::timeout(tmo, c.rt.pod_sandbox_status(req)).await {
        Ok(Err(s)) => r.check("PodSandboxStatus: NotFound after removal", tonic::Code::NotFound, s.code()),
        Ok(Ok(_)) => r.fail("PodSandboxStatus: NotFound after removal", "the removed pod still has a status"),
        Err(_) => r.fail("PodSandboxStatus: NotFound after removal", "no answer"),
    }
    r.check("ListContainers: none at all", 0, c.containers_of("").await?.len());
    let vm_gone = eventually(Duration::from_secs(30), || processes("hull-vmm", "").is_empty()).await;
    r.check_true("pod: hull-vmm gone", vm_gone, || format!("left: {:?}", processes("hull-vmm", "")));
    let shim_gone =
        eventually(Duration::from_secs(30), || processes("containerd-shim-hull-v2", &format!("-id {sb} ")).is_empty())
            .await;
    r.check_true("pod: its shim gone", shim_gone, || format!("left: {:?}", processes("containerd-shim-hull-v2", "")));
    Ok(())
}

async fn run(args: Args) -> Result<Report, String> {
    let ch = connect(args.socket.clone()).await?;
    let mut c =
        Cri { rt: RuntimeServiceClient::new(ch.clone()), img: ImageServiceClient::new(ch), tmo: args.step_timeout };
    let mut r = Report::default();
    let mut sandbox = None;
    if let Err(StepError(e)) = scenario(&args, &mut c, &mut r, &mut sandbox).await {
        r.fail("CRI scenario", &e);
        // Best effort: leave nothing behind for the checks that follow.
        if let Some(sb) = sandbox {
            let req = cri::StopPodSandboxRequest { pod_sandbox_id: sb.clone() };
            if let Err(StepError(e)) = rpc("cleanup StopPodSandbox", c.tmo, c.rt.stop_pod_sandbox(req)).await {
                println!("INFO {e}");
            }
            let req = cri::RemovePodSandboxRequest { pod_sandbox_id: sb };
            if let Err(StepError(e)) = rpc("cleanup RemovePodSandbox", c.tmo, c.rt.remove_pod_sandbox(req)).await {
                println!("INFO {e}");
            }
        }
    }
    Ok(r)
}

fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hull-cri: {e}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(run(args)) {
        Ok(r) => {
            println!("hull-cri: {} passed, {} failed", r.passes, r.fails);
            std::process::exit(if r.fails == 0 { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("hull-cri: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Result<Args, String> {
        parse_args(a.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        let a = args(&["--socket", "/s", "--step-timeout", "5", "--handler", "h"]).unwrap();
        assert_eq!(a.socket, PathBuf::from("/s"));
        assert_eq!(a.step_timeout, Duration::from_secs(5));
        assert_eq!(a.handler, "h");
        assert_eq!(a.image, "docker.io/library/hull-test:latest");
        assert!(args(&[]).unwrap_err().contains("--socket is required"));
        assert!(args(&["--socket"]).unwrap_err().contains("--socket needs a value"));
        assert!(args(&["--socket", "/s", "--bogus"]).unwrap_err().contains("\"--bogus\""));
        assert!(args(&["--socket", "/s", "--step-timeout", "0"]).unwrap_err().contains("positive"));
        assert!(args(&["--socket", "/s", "--image", ""]).unwrap_err().contains("must not be empty"));
    }

    #[test]
    fn missing_socket_is_a_clear_error() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = rt.block_on(connect(PathBuf::from("/nonexistent/containerd.sock"))).unwrap_err();
        assert!(e.contains("/nonexistent/containerd.sock") && e.contains("does not exist"), "{e}");
    }

    #[test]
    fn finds_processes_by_command_line() {
        let me = std::process::id();
        let argv0 = std::env::args().next().unwrap();
        let name = std::path::Path::new(&argv0).file_name().unwrap().to_string_lossy().into_owned();
        assert!(processes(&name, "").iter().any(|(p, _)| *p == me));
        assert!(processes(&name, "no such argument anywhere").is_empty());
    }
}
