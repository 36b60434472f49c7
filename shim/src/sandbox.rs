//! A pod's microVM: its state directory, virtiofsd, hull-vmm, the agent
//! connection and the writable-layer disk slots.
//!
//! Start order: host and file checks → state dir (`shared/` tmpfs, disks
//! from the pool, pid files) → virtiofsd on `shared/` → listen on
//! `vsock.sock_1023` → hull-vmm → the agent's ready line on that socket →
//! ttrpc connection → SetupSandbox. Any failure undoes everything (processes
//! stopped, mounts gone, directory removed) before the error is returned.

use crate::cgroups::{HostCgroups, PodCgroup};
use crate::config::Config;
use crate::diskpool::{DiskPool, Taken};
use crate::mounts;
use crate::pod::Resources;
use hull_agent_api::proto::agent::SetupSandboxRequest;
use hull_agent_api::{AgentAddr, AgentClient, DEFAULT_AGENT_PORT, DEFAULT_STDIO_PORT, READY_MARKER};
use log::{debug, error, info, warn};
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;
use tokio::sync::watch;

/// Host vsock port the agent announces readiness on (`hull.notify_port`).
pub const NOTIFY_PORT: u32 = 1023;
/// The guest kernel command line.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet hull.notify_port=1023";
/// virtio-fs tag the agent mounts.
pub const FS_TAG: &str = "hullfs";
/// Longest unix socket path (sun_path, NUL included).
const MAX_SOCKET_PATH: usize = 107;

/// The files of `<state_dir>/<sandbox id>/`. Everything hull-vmm uses or
/// makes is under `vm/`, the root of its jail (see [`crate::jail`]); the
/// shared directory, virtiofsd's socket, logs and pid files are not.
#[derive(Debug, Clone)]
pub struct SandboxPaths {
    pub dir: PathBuf,
}

impl SandboxPaths {
    pub fn new(dir: PathBuf) -> Self {
        SandboxPaths { dir }
    }
    pub fn shared(&self) -> PathBuf {
        self.dir.join("shared")
    }
    /// hull-vmm's jail root.
    pub fn vm(&self) -> PathBuf {
        self.dir.join("vm")
    }
    pub fn disks(&self) -> PathBuf {
        self.vm().join("disks")
    }
    pub fn vsock(&self) -> PathBuf {
        self.vm().join("vsock.sock")
    }
    pub fn notify_socket(&self) -> PathBuf {
        self.vm().join(format!("vsock.sock_{NOTIFY_PORT}"))
    }
    pub fn api(&self) -> PathBuf {
        self.vm().join("api.sock")
    }
    pub fn virtiofsd_socket(&self) -> PathBuf {
        self.dir.join("virtiofsd.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.vm().join("console.log")
    }
    pub fn log(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.log"))
    }
    pub fn pid_file(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.pid"))
    }
    pub fn disk_serial(slot: usize) -> String {
        format!("hullrw{slot}")
    }
    pub fn disk_image(&self, serial: &str) -> PathBuf {
        self.disks().join(format!("{serial}.img"))
    }
}

/// The last `lines` lines of a (log) file, for error reports.
/// Logs the last lines of the guest console and of hull-vmm's and
/// virtiofsd's output, headed `pod ID: WHAT; guest console (last lines)`:
/// what is left to tell why a pod failed once its files are gone.
pub fn log_tails(id: &str, paths: &SandboxPaths, what: &str) {
    let console = tail(&paths.console(), 30);
    let console = if console.is_empty() { "(nothing yet)".to_string() } else { console };
    error!("pod {id}: {what}; guest console (last lines):\n{console}");
    for process in ["hull-vmm", "virtiofsd"] {
        let t = tail(&paths.log(process), 10);
        if !t.is_empty() {
            error!("pod {id}: {process} output (last lines):\n{t}");
        }
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(16 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// The host check, as an error message for a host that cannot run hull microVMs.
pub fn host_check() -> Result<(), String> {
    host_error(&hull_tools::hostcheck::check()).map_or(Ok(()), Err)
}

/// Why a host with this report cannot run hull microVMs (None: it can).
pub fn host_error(r: &hull_tools::hostcheck::HostReport) -> Option<String> {
    use hull_tools::hostcheck::{CpuVirt, KvmDevice};
    if r.can_run_microvm() {
        return None;
    }
    Some(match &r.kvm {
        _ if r.pvm || (matches!(r.kvm, KvmDevice::Usable { .. }) && r.cpu == CpuVirt::None) => {
            "KVM here is PVM-only: hull microVMs need VMX/SVM (see `hull check`)".to_string()
        }
        KvmDevice::Missing => "no /dev/kvm: hull microVMs need KVM (see `hull check`)".to_string(),
        KvmDevice::Unusable(why) => format!("/dev/kvm is unusable ({why}): hull microVMs need KVM (see `hull check`)"),
        KvmDevice::Usable { .. } => format!("this host cannot run hull microVMs: {} (see `hull check`)", r.verdict()),
    })
}

/// A child process watched by a task: its exit status lands in a watch channel.
pub struct Watched {
    pub pid: u32,
    exited: watch::Receiver<Option<ExitStatus>>,
}

impl Watched {
    fn spawn(mut cmd: tokio::process::Command, what: &str) -> Result<Watched, String> {
        let mut child = cmd.spawn().map_err(|e| format!("starting {what}: {e}"))?;
        let pid = child.id().unwrap_or(0);
        let (tx, rx) = watch::channel(None);
        let what = what.to_string();
        tokio::spawn(async move {
            let st = child.wait().await;
            match st {
                Ok(s) => {
                    let _ = tx.send(Some(s));
                }
                Err(e) => error!("waiting for {what}: {e}"),
            }
        });
        Ok(Watched { pid, exited: rx })
    }

    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exited.borrow()
    }

    /// Waits up to `t` for the exit.
    pub async fn wait(&self, t: Duration) -> Option<ExitStatus> {
        let mut rx = self.exited.clone();
        tokio::time::timeout(t, rx.wait_for(|s| s.is_some())).await.ok().and_then(|r| r.ok().and_then(|s| *s))
    }

    /// Sends `sig` unless it exited (the pid cannot have been reused: the
    /// child is reaped only by our waiter, which records the exit first).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if self.exit_status().is_none() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid as i32), sig);
        }
    }

    /// SIGTERM, wait `grace`, then SIGKILL and wait.
    pub async fn stop(&self, grace: Duration) {
        if self.exit_status().is_some() {
            return;
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if self.wait(grace).await.is_none() {
            self.signal(nix::sys::signal::Signal::SIGKILL);
            self.wait(Duration::from_secs(5)).await;
        }
    }
}

/// What the shim knows about a pod VM when it starts it.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub id: String,
    pub hostname: Option<String>,
    pub resources: Resources,
    /// The sandbox's `linux.cgroupsPath` (Kubernetes' pod cgroup), if any.
    pub k8s_cgroup: Option<String>,
    /// The pod's network namespace (CNI's) and DNS settings.
    pub net: crate::network::NetSpec,
}

pub struct Sandbox {
    pub id: String,
    pub paths: SandboxPaths,
    pub agent: AgentClient,
    /// The agent's STDIO port.
    pub stdio_addr: AgentAddr,
    vmm: Watched,
    virtiofsd: Watched,
    cgroup: Mutex<Option<PodCgroup>>,
    disk_slots: usize,
    next_slot: AtomicUsize,
    shutting_down: AtomicBool,
    oom_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The pod network namespace and the CNI interfaces joined to taps.
    network: Option<(PathBuf, Vec<String>)>,
}

/// Processes and mounts of a pod being started, undone on failure.
struct Partial {
    paths: SandboxPaths,
    virtiofsd: Option<Watched>,
    vmm: Option<Watched>,
    cgroup: Option<PodCgroup>,
}

impl Partial {
    async fn undo(self) {
        if let Some(v) = &self.vmm {
            v.stop(Duration::from_secs(2)).await;
        }
        if let Some(v) = &self.virtiofsd {
            v.stop(Duration::from_secs(2)).await;
        }
        remove_cgroup(self.cgroup).await;
        remove_state_dir(&self.paths.dir);
    }
}

/// Removes a pod's host cgroup once its processes are gone.
async fn remove_cgroup(cg: Option<PodCgroup>) {
    if let Some(cg) = cg {
        match tokio::task::spawn_blocking(move || cg.remove()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => error!("{e}"),
            Err(e) => error!("removing the pod cgroup: {e}"),
        }
    }
}

/// The file in a pod's state dir naming its Kubernetes cgroup path, for
/// the `delete` command's cleanup.
pub const K8S_CGROUP_FILE: &str = "k8s-cgroup";

/// Releases a pod's jail uid, unmounts everything under its state
/// directory and removes it.
pub fn remove_state_dir(dir: &Path) {
    if let Some(done) = crate::jail::release(dir) {
        info!("{}: {done}", dir.display());
    }
    if let Err(e) = mounts::unmount_all_under(dir) {
        error!("{}: {e}", dir.display());
    }
    if let Err(e) = mounts::remove_dir_safely(dir) {
        error!("{e}");
    }
}

/// Is `pid` a live process whose executable is named like ours?
pub fn is_live_shim(pid: i32) -> bool {
    if pid <= 0 || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    fs::read_link(format!("/proc/{pid}/exe"))
        .map(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("containerd-shim-hull")))
        .unwrap_or(false)
}

pub fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn write_pid(path: &Path, pid: u32) -> Result<(), String> {
    fs::write(path, format!("{pid}\n")).map_err(|e| format!("write {}: {e}", path.display()))
}

/// virtiofsd's arguments for a pod (see docs/config.md for the flags).
/// `listen_fd`: an inherited listening socket bound at the socket path (pod
/// starts: ready at once, nothing to wait for); None: virtiofsd binds it.
pub fn virtiofsd_args(paths: &SandboxPaths, listen_fd: Option<RawFd>) -> Vec<String> {
    vec![
        match listen_fd {
            Some(fd) => format!("--fd={fd}"),
            None => format!("--socket-path={}", paths.virtiofsd_socket().display()),
        },
        format!("--shared-dir={}", paths.shared().display()),
        "--sandbox=chroot".into(),
        "--cache=always".into(),
        "--xattr".into(),
        "--thread-pool-size=0".into(),
        "--log-level=warn".into(),
    ]
}

/// How a pod VM starts.
#[derive(Debug, Clone, Copy)]
pub enum VmBoot<'a> {
    Cold { vcpus: u32, mem_mib: u64 },
    Restore(&'a Path),
}

/// hull-vmm's arguments for a pod VM with `slots` disk slots: the one
/// place that decides the device layout, which a template and the pods
/// restored from it must share.
pub fn vmm_args(
    cfg: &Config,
    paths: &SandboxPaths,
    boot: VmBoot,
    slots: usize,
    nics: &[Option<RawFd>],
) -> Vec<std::ffi::OsString> {
    let mut a: Vec<std::ffi::OsString> = Vec::new();
    match boot {
        VmBoot::Restore(snap) => a.extend(["--restore".into(), snap.into()]),
        VmBoot::Cold { vcpus, mem_mib } => a.extend([
            "--kernel".into(),
            cfg.paths.kernel.clone().into(),
            "--initrd".into(),
            cfg.paths.initramfs.clone().into(),
            "--cmdline".into(),
            CMDLINE.into(),
            "--mem".into(),
            mem_mib.to_string().into(),
            "--vcpus".into(),
            vcpus.to_string().into(),
        ]),
    }
    a.extend([
        "--vsock-socket".into(),
        paths.vsock().into(),
        "--fs-socket".into(),
        format!("{},tag={FS_TAG}", paths.virtiofsd_socket().display()).into(),
        "--console".into(),
        paths.console().into(),
        "--api-socket".into(),
        paths.api().into(),
    ]);
    for slot in 0..slots {
        let serial = SandboxPaths::disk_serial(slot);
        a.extend(["--disk".into(), format!("{},id={serial}", paths.disk_image(&serial).display()).into()]);
    }
    // Every VM has a NIC at least, so one template serves pods with and
    // without a network: its backend is the pod's tap (an inherited fd) or
    // none. A pod with N interfaces gets N NICs (and a template of its own).
    for nic in nics.iter().chain(nics.is_empty().then_some(&None)) {
        let nic = match nic {
            Some(fd) => format!("fd={fd}"),
            None => "none".to_string(),
        };
        a.extend(["--net".into(), nic.into()]);
    }
    a
}

/// Lets the child inherit `fds` (they are created close-on-exec).
fn inherit_fds(cmd: &mut tokio::process::Command, fds: Vec<RawFd>) {
    if fds.is_empty() {
        return;
    }
    // SAFETY: fcntl on fd numbers is async-signal-safe (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        })
    };
}

/// Makes the child join `cg` between fork and exec.
fn join_cgroup(cmd: &mut tokio::process::Command, cg: &PodCgroup) -> Result<(), String> {
    let join = cg.join_before_exec().map_err(|e| e.to_string())?;
    // SAFETY: the hook only writes to already-open cgroup.procs files (no
    // allocation, no locks), which is async-signal-safe.
    unsafe { cmd.pre_exec(join) };
    Ok(())
}

fn log_file(path: &Path) -> Result<fs::File, String> {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("create {}: {e}", path.display()))
}

impl Sandbox {
    /// Starts a pod VM as described in the module docs.
    pub async fn start(cfg: &Config, spec: SandboxSpec) -> Result<Sandbox, String> {
        hull_agent_api::validate::check_id("sandbox id", &spec.id)?;
        host_check()?;
        cfg.check_files()?;
        let paths = SandboxPaths::new(cfg.sandbox_dir(&spec.id));
        for p in [paths.notify_socket(), paths.virtiofsd_socket(), paths.api()] {
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes: use a shorter paths.state_dir",
                    p.display()
                ));
            }
        }
        if paths.dir.exists() {
            match read_pid(&paths.pid_file("shim")) {
                Some(pid) if pid as u32 != std::process::id() && is_live_shim(pid) => {
                    return Err(format!(
                        "pod {} already runs under another shim (pid {pid}, state {})",
                        spec.id,
                        paths.dir.display()
                    ))
                }
                _ => {
                    warn!("pod {}: removing the leftovers of an earlier run in {}", spec.id, paths.dir.display());
                    let (d, parent) = (paths.dir.clone(), cfg.paths.cgroup_parent.clone());
                    let done = tokio::task::spawn_blocking(move || crate::cleanup::cleanup_sandbox_dir(&d, &parent))
                        .await
                        .map_err(|e| e.to_string())?;
                    info!("pod {}: {}", spec.id, done.join(", "));
                }
            }
        }
        fs::create_dir_all(&cfg.paths.state_dir)
            .map_err(|e| format!("create {}: {e}", cfg.paths.state_dir.display()))?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&paths.dir)
            .map_err(|e| format!("create {}: {e}", paths.dir.display()))?;
        let mut partial = Partial { paths: paths.clone(), virtiofsd: None, vmm: None, cgroup: None };
        match Sandbox::start_in(cfg, &spec, &mut partial).await {
            Ok(s) => Ok(s),
            Err(e) => {
                log_tails(&spec.id, &paths, "start failed");
                partial.undo().await;
                Err(e)
            }
        }
    }

    async fn start_in(cfg: &Config, spec: &SandboxSpec, partial: &mut Partial) -> Result<Sandbox, String> {
        let paths = partial.paths.clone();
        let mut phases = hull_agent_api::phases::Phases::new();
        write_pid(&paths.pid_file("shim"), std::process::id())?;
        for d in [paths.shared(), paths.vm(), paths.disks()] {
            fs::create_dir(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        let jail = match cfg.jailer.enabled {
            true => {
                let ids = crate::jail::claim(cfg, &spec.id, &paths.dir)?;
                ids.give(&paths.vm())?;
                ids.give(&paths.disks())?;
                Some(ids)
            }
            false => None,
        };
        mounts::mount_shared_root(&paths.shared())?;
        phases.mark("dirs");

        // Writable-layer disks: renames out of the pool, formatting only if it is empty.
        let slots = cfg.defaults.disks_per_pod as usize;
        if slots > 0 {
            let pool =
                DiskPool::new(cfg.disk_pool_dir(), cfg.defaults.disk_size_mib, cfg.defaults.disk_pool_size as usize)?;
            let mut made = 0;
            for slot in 0..slots {
                let img = paths.disk_image(&SandboxPaths::disk_serial(slot));
                let p = pool.clone();
                let taken = tokio::task::spawn_blocking(move || p.take(&img)).await.map_err(|e| e.to_string())??;
                if taken == Taken::MadeNow {
                    made += 1;
                }
                if let Some(j) = &jail {
                    j.give(&paths.disk_image(&SandboxPaths::disk_serial(slot)))?;
                }
            }
            if made > 0 {
                warn!(
                    "pod {}: the disk pool {} was empty: formatted {made} disk(s) while starting the pod",
                    spec.id,
                    pool.dir().display()
                );
            }
            pool.refill_in_background();
        }
        phases.mark("disks");

        // The pod's host cgroup (from the pool): virtiofsd and hull-vmm join
        // it before they exec, so everything they use is charged to it.
        let r = spec.resources;
        if let Some(k) = &spec.k8s_cgroup {
            fs::write(paths.dir.join(K8S_CGROUP_FILE), k).map_err(|e| format!("write {K8S_CGROUP_FILE}: {e}"))?;
        }
        let (c, id, k8s) = (cfg.clone(), spec.id.clone(), spec.k8s_cgroup.clone());
        let cgroup = tokio::task::spawn_blocking(move || -> Result<PodCgroup, String> {
            let host = HostCgroups::detect(&c.paths.cgroup_parent, c.defaults.cgroup_pool_size as usize)
                .map_err(|e| e.to_string())?;
            let cg = host.take(&id, k8s.as_deref()).map_err(|e| e.to_string())?;
            host.refill_in_background();
            Ok(cg)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("host cgroup: {e}"))?;
        partial.cgroup = Some(cgroup.clone());
        cgroup.set_limits(r.vcpus, Some(r.mem_mib << 20)).map_err(|e| format!("host cgroup limits: {e}"))?;
        phases.mark("cgroup");

        // virtiofsd (see docs/config.md for the choice of flags). Its socket
        // is bound here and handed over: hull-vmm can connect at once (the
        // connection waits in the backlog until virtiofsd serves), so no
        // one polls for the socket to appear, which under a burst of starts
        // took the CPU from the very virtiofsds being waited for.
        let sock = paths.virtiofsd_socket();
        let listener =
            std::os::unix::net::UnixListener::bind(&sock).map_err(|e| format!("listen on {}: {e}", sock.display()))?;
        if let Some(j) = &jail {
            j.give(&sock)?;
        }
        let mut cmd = tokio::process::Command::new(&cfg.paths.virtiofsd);
        join_cgroup(&mut cmd, &cgroup)?;
        inherit_fds(&mut cmd, vec![listener.as_raw_fd()]);
        cmd.args(virtiofsd_args(&paths, Some(listener.as_raw_fd())))
            .stdin(Stdio::null())
            .stdout(log_file(&paths.log("virtiofsd"))?)
            .stderr(log_file(&paths.log("virtiofsd"))?);
        let vfs = Watched::spawn(cmd, "virtiofsd")?;
        drop(listener);
        write_pid(&paths.pid_file("virtiofsd"), vfs.pid)?;
        partial.virtiofsd = Some(vfs);
        phases.mark("virtiofsd");

        // The pod network (CNI's namespace): a tap joined to each interface.
        let net = match &spec.net.netns {
            Some(ns) => {
                let ns = ns.clone();
                let n = tokio::task::spawn_blocking(move || crate::network::attach(&ns))
                    .await
                    .map_err(|e| e.to_string())??;
                match &n {
                    Some(n) => {
                        for (i, l) in n.links.iter().enumerate() {
                            let tap = crate::network::tap_name(i);
                            info!("pod {}: network {} ({}) via tap {tap}", spec.id, l.iface, l.mac);
                        }
                    }
                    None => info!("pod {}: no IPv4 interface in its network namespace: loopback only", spec.id),
                }
                n
            }
            None => None,
        };
        phases.mark("network");
        let nics = net.as_ref().map_or(1, |n| n.links.len().max(1));

        // A template to restore (built on first use), or a cold boot.
        let snapshot = if cfg.defaults.template {
            let shape = crate::template::Shape { vcpus: r.vcpus, mem_mib: r.mem_mib, disk_slots: slots, nics };
            let c = cfg.clone();
            let t = std::time::Instant::now();
            let snap = tokio::task::spawn_blocking(move || crate::template::ensure(&c, shape))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("VM template: {e}"))?;
            if t.elapsed() > Duration::from_millis(100) {
                info!("pod {}: template {} ready after {} ms", spec.id, snap.display(), t.elapsed().as_millis());
            }
            Some(snap)
        } else {
            None
        };
        phases.mark("template");

        // A booting agent connects to host port 1023 once it serves: listen first.
        let mut notify = match snapshot {
            Some(_) => None,
            None => {
                let l = tokio::net::UnixListener::bind(paths.notify_socket())
                    .map_err(|e| format!("listen on {}: {e}", paths.notify_socket().display()))?;
                if let Some(j) = &jail {
                    j.give(&paths.notify_socket())?;
                }
                Some(l)
            }
        };

        let mut cmd = tokio::process::Command::new(&cfg.paths.hull_vmm);
        join_cgroup(&mut cmd, &cgroup)?;
        let tap_fds: Vec<RawFd> = net.iter().flat_map(|n| n.links.iter().map(|l| l.tap.as_raw_fd())).collect();
        // A restoring hull-vmm says "ready" on a pipe once its devices serve
        // (its vsock socket listens): waited for without polling.
        let ready_pipe = match snapshot {
            Some(_) => {
                let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("pipe: {e}"))?;
                Some((r, w))
            }
            None => None,
        };
        let mut inherited = tap_fds.clone();
        inherited.extend(ready_pipe.as_ref().map(|(_, w)| w.as_raw_fd()));
        inherit_fds(&mut cmd, inherited);
        let boot = match &snapshot {
            Some(snap) => VmBoot::Restore(snap),
            None => VmBoot::Cold { vcpus: r.vcpus, mem_mib: r.mem_mib },
        };
        let nic_fds: Vec<Option<RawFd>> = tap_fds.iter().copied().map(Some).collect();
        cmd.args(vmm_args(cfg, &paths, boot, slots, &nic_fds));
        if let Some(j) = &jail {
            cmd.arg("--jail").arg(j.arg(&paths.vm()));
        }
        if let Some((_, w)) = &ready_pipe {
            cmd.arg("--ready-fd").arg(w.as_raw_fd().to_string());
        }
        cmd.stdin(Stdio::null()).stdout(log_file(&paths.log("hull-vmm"))?).stderr(log_file(&paths.log("hull-vmm"))?);
        let vmm = Watched::spawn(cmd, "hull-vmm")?;
        // Only hull-vmm holds the write end now: end of file means it exited.
        let ready_rx = ready_pipe.map(|(r, _w)| r);
        // hull-vmm holds the tap now: it goes when hull-vmm does.
        let network = net
            .as_ref()
            .zip(spec.net.netns.clone())
            .map(|(n, ns)| (ns, n.links.iter().map(|l| l.iface.clone()).collect::<Vec<_>>()));
        let (interfaces, routes) = net.map(|n| (n.interfaces, n.routes)).unwrap_or_default();
        write_pid(&paths.pid_file("hull-vmm"), vmm.pid)?;
        partial.vmm = Some(vmm);
        let vmm = partial.vmm.as_ref().unwrap();

        let timeout = Duration::from_secs(cfg.defaults.agent_ready_timeout_secs);
        // hull-vmm's own start phases, from its readiness line.
        let mut vmm_phases = String::new();
        let ready = async {
            let Some(notify) = &notify else {
                // Restored: the agent already serves once hull-vmm says ready.
                let r = ready_rx.ok_or("no readiness pipe")?;
                let mut rx =
                    tokio::net::unix::pipe::Receiver::from_owned_fd(r).map_err(|e| format!("readiness pipe: {e}"))?;
                let mut line = String::new();
                tokio::io::BufReader::new(&mut rx)
                    .read_line(&mut line)
                    .await
                    .map_err(|e| format!("reading hull-vmm's readiness pipe: {e}"))?;
                let Some(rest) = line.trim().strip_prefix("ready") else {
                    // It exited without restoring: the select below reports how.
                    match std::future::pending::<std::convert::Infallible>().await {}
                };
                vmm_phases = rest.trim_start_matches("; phases ms: ").to_string();
                return Ok("restored from the template".to_string());
            };
            loop {
                let (conn, _) = notify.accept().await.map_err(|e| format!("accept on the notify socket: {e}"))?;
                let mut line = String::new();
                let mut r = tokio::io::BufReader::new(conn);
                match tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await {
                    Ok(Ok(_)) if line.starts_with(READY_MARKER) => {
                        return Ok::<String, String>(line.trim().to_string())
                    }
                    Ok(Ok(_)) => warn!("pod {}: unexpected announcement {:?}", spec.id, line.trim()),
                    _ => warn!("pod {}: a notify connection sent no line", spec.id),
                }
            }
        };
        let mut exited = vmm.exited.clone();
        let line = tokio::select! {
            r = tokio::time::timeout(timeout, ready) => match r {
                Ok(r) => r?,
                Err(_) => return Err(format!(
                    "agent did not answer within {}s (pod {}; hull-vmm pid {}; the guest console's tail is in the shim log)",
                    timeout.as_secs(), spec.id, vmm.pid
                )),
            },
            st = exited.wait_for(|s| s.is_some()) => {
                let st = st.ok().and_then(|s| *s).map(|s| s.to_string()).unwrap_or_default();
                return Err(format!(
                    "hull-vmm exited ({st}) before the agent was ready: {}",
                    tail(&paths.log("hull-vmm"), 3)
                ));
            }
        };
        if notify.take().is_some() {
            let _ = fs::remove_file(paths.notify_socket());
        }
        if let Err(e) = phases.extend_text("vmm-", &vmm_phases) {
            warn!("pod {}: hull-vmm's readiness line: {e}", spec.id);
        }
        phases.mark(if snapshot.is_some() { "restore" } else { "boot" });
        info!("pod {}: {line} ({} ms after start)", spec.id, phases.total_ms());

        let api = AgentAddr::Hybrid { socket: paths.vsock(), port: DEFAULT_AGENT_PORT };
        // Under a burst of starts a restored guest can take long to accept
        // its first connection (it gets the readiness budget, not a call's),
        // and right after a restore the vsock device may still refuse or drop a
        // connection (it holds host connections until the guest has taken
        // the transport reset, bounded): retry until the deadline.
        let call_timeout = Duration::from_secs(cfg.defaults.agent_call_timeout_secs);
        let deadline = tokio::time::Instant::now() + timeout.max(call_timeout);
        let vmm_gone = |what: &str| {
            vmm.exit_status().map(|st| format!("hull-vmm exited ({st}) {what}: {}", tail(&paths.log("hull-vmm"), 3)))
        };
        let agent = loop {
            match AgentClient::connect(&api, call_timeout).await {
                Ok(a) => break a,
                Err(e) => {
                    if let Some(gone) = vmm_gone("before the agent answered") {
                        return Err(gone);
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(e.to_string());
                    }
                    debug!("pod {}: connecting to the agent: {e}; retrying", spec.id);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        phases.mark("connect");
        let mut entropy = vec![0u8; 32];
        getrandom::getrandom(&mut entropy).map_err(|e| format!("getrandom: {e}"))?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        // No hostname in the spec (ctr): the pod's id, or its first 12
        // characters if that is not a valid hostname (as Docker does).
        let hostname = spec.hostname.clone().or_else(|| {
            [spec.id.clone(), spec.id.chars().take(12).collect()]
                .into_iter()
                .find(|h| hull_agent_api::validate::check_hostname(h).is_ok())
        });
        let hostname = hostname.filter(|h| match hull_agent_api::validate::check_hostname(h) {
            Ok(()) => true,
            Err(e) => {
                warn!("pod {}: not setting the hostname: {e}", spec.id);
                false
            }
        });
        let dns = spec.net.dns.clone().unwrap_or_default();
        if !dns.servers.is_empty() || !dns.search.is_empty() {
            info!("pod {}: guest DNS: nameservers {:?}, search {:?}", spec.id, dns.servers, dns.search);
        }
        let req = SetupSandboxRequest {
            sandbox_id: spec.id.clone(),
            hostname: hostname.unwrap_or_default(),
            entropy,
            wall_clock_unix_nanos: now.as_nanos() as i64,
            interfaces,
            routes,
            dns_servers: dns.servers,
            dns_search: dns.search,
            dns_options: dns.options,
            ..Default::default()
        };
        if let Err(e) = agent.setup_sandbox(&req).await {
            return Err(vmm_gone("during SetupSandbox").unwrap_or_else(|| format!("agent SetupSandbox: {e}")));
        }
        phases.mark("setup");
        info!(
            "pod {}: ready in {} ms ({} vCPU, {} MiB, {slots} disk slots; phases ms: {phases})",
            spec.id,
            phases.total_ms(),
            r.vcpus,
            r.mem_mib
        );

        Ok(Sandbox {
            id: spec.id.clone(),
            stdio_addr: api.with_port(DEFAULT_STDIO_PORT),
            agent,
            vmm: partial.vmm.take().unwrap(),
            virtiofsd: partial.virtiofsd.take().unwrap(),
            cgroup: Mutex::new(partial.cgroup.take()),
            disk_slots: slots,
            next_slot: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            oom_task: Mutex::new(None),
            network,
            paths,
        })
    }

    pub fn vmm_pid(&self) -> u32 {
        self.vmm.pid
    }

    pub fn shared(&self) -> PathBuf {
        self.paths.shared()
    }

    pub fn disk_slots(&self) -> usize {
        self.disk_slots
    }

    /// The serial of the next unused disk slot; None once all are used.
    pub fn take_disk_slot(&self) -> Option<String> {
        let n = self.next_slot.fetch_add(1, Ordering::SeqCst);
        (n < self.disk_slots).then(|| SandboxPaths::disk_serial(n))
    }

    pub fn set_oom_task(&self, t: tokio::task::JoinHandle<()>) {
        *self.oom_task.lock().unwrap() = Some(t);
    }

    pub fn vm_running(&self) -> bool {
        self.vmm.exit_status().is_none()
    }

    /// Shuts the VM down through the API (hull-vmm then exits and
    /// virtiofsd follows), waits for both (killing what does not exit),
    /// unmounts everything and removes the state directory.
    pub async fn shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        if let Some(t) = self.oom_task.lock().unwrap().take() {
            t.abort();
        }
        if self.vm_running() {
            let api = self.paths.api();
            let r = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::task::spawn_blocking(move || {
                    hull_vmm::api::ApiClient::connect(&api).and_then(|mut c| c.call(&hull_vmm::api::Request::Shutdown))
                }),
            )
            .await;
            match r {
                Ok(Ok(Ok(hull_vmm::api::Response::Ok(_)))) => {}
                other => warn!("pod {}: API shutdown: {other:?}", self.id),
            }
            if self.vmm.wait(Duration::from_secs(10)).await.is_none() {
                warn!("pod {}: hull-vmm did not exit after shutdown; killing it", self.id);
                self.vmm.stop(Duration::from_secs(1)).await;
            }
        }
        // hull-vmm closed the vhost-user connection: virtiofsd exits by itself.
        if self.virtiofsd.wait(Duration::from_secs(5)).await.is_none() {
            warn!("pod {}: virtiofsd still running after hull-vmm exited; stopping it", self.id);
            self.virtiofsd.stop(Duration::from_secs(2)).await;
        }
        // Before the state dir: should the shim die in between, the dir
        // still tells `delete` to clean up.
        let cg = self.cgroup.lock().unwrap().take();
        remove_cgroup(cg).await;
        if let Some((ns, ifaces)) = self.network.clone() {
            for iface in ifaces {
                let ns = ns.clone();
                match tokio::task::spawn_blocking(move || crate::network::detach(&ns, &iface)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!("pod {}: {e}", self.id),
                    Err(e) => warn!("pod {}: detaching the network: {e}", self.id),
                }
            }
        }
        let dir = self.paths.dir.clone();
        let _ = tokio::task::spawn_blocking(move || remove_state_dir(&dir)).await;
        info!("pod {}: shut down", self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hull_tools::hostcheck::{CpuVirt, HostReport, KvmDevice};

    #[test]
    fn host_errors() {
        let usable = KvmDevice::Usable { api_version: 12 };
        let ok = HostReport { kvm: usable.clone(), cpu: CpuVirt::Svm, pvm: false };
        assert_eq!(host_error(&ok), None);
        let pvm = HostReport { kvm: usable.clone(), cpu: CpuVirt::None, pvm: true };
        assert_eq!(host_error(&pvm).unwrap(), "KVM here is PVM-only: hull microVMs need VMX/SVM (see `hull check`)");
        let missing = HostReport { kvm: KvmDevice::Missing, cpu: CpuVirt::Vmx, pvm: false };
        assert!(host_error(&missing).unwrap().contains("no /dev/kvm"));
        let bad =
            HostReport { kvm: KvmDevice::Unusable("open /dev/kvm: EACCES".into()), cpu: CpuVirt::Vmx, pvm: false };
        assert!(host_error(&bad).unwrap().contains("EACCES"));
    }

    /// This host (PVM-only, per PLATFORM.md) must be refused with the PVM message.
    #[test]
    fn this_host() {
        let r = hull_tools::hostcheck::check();
        match host_check() {
            Ok(()) => assert!(r.can_run_microvm()),
            Err(e) if r.pvm => assert!(e.contains("PVM-only"), "{e}"),
            Err(_) => assert!(!r.can_run_microvm()),
        }
    }

    #[test]
    fn log_tail() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        fs::write(&p, (1..=100).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
        assert_eq!(tail(&p, 2), "line 99\nline 100");
        assert_eq!(tail(&dir.path().join("none"), 2), "");
    }

    #[test]
    fn template_and_restored_pods_get_the_same_devices() {
        let cfg = Config::default();
        let p = SandboxPaths::new("/run/hull/sb".into());
        let cold = vmm_args(&cfg, &p, VmBoot::Cold { vcpus: 2, mem_mib: 512 }, 3, &[None]);
        let snap = Path::new("/run/hull/templates/k");
        let restored = vmm_args(&cfg, &p, VmBoot::Restore(snap), 3, &[]);
        let s = |v: &[std::ffi::OsString]| v.iter().map(|a| a.to_string_lossy().into_owned()).collect::<Vec<_>>();
        let (cold, restored) = (s(&cold), s(&restored));
        assert_eq!(&restored[..2], ["--restore", "/run/hull/templates/k"]);
        assert_eq!(
            cold[..10].join(" "),
            format!(
                "--kernel {} --initrd {} --cmdline {CMDLINE} --mem 512 --vcpus 2",
                cfg.paths.kernel.display(),
                cfg.paths.initramfs.display()
            )
        );
        assert_eq!(cold[10..], restored[2..], "same devices in the same order");
        assert_eq!(cold.iter().filter(|a| *a == "--disk").count(), 3);
        assert!(cold.contains(&"/run/hull/sb/vm/disks/hullrw2.img,id=hullrw2".to_string()));
        assert_eq!(cold[cold.len() - 2..], ["--net", "none"]);
        let with_net = s(&vmm_args(&cfg, &p, VmBoot::Restore(snap), 3, &[Some(7)]));
        assert_eq!(with_net[with_net.len() - 2..], ["--net", "fd=7"]);
        // Two pod interfaces: two NICs, in order.
        let two = s(&vmm_args(&cfg, &p, VmBoot::Restore(snap), 3, &[Some(7), Some(9)]));
        assert_eq!(two[two.len() - 4..], ["--net", "fd=7", "--net", "fd=9"]);
    }

    #[test]
    fn paths() {
        let p = SandboxPaths::new("/run/hull/sb".into());
        assert_eq!(p.notify_socket(), Path::new("/run/hull/sb/vm/vsock.sock_1023"));
        assert_eq!(p.disk_image(&SandboxPaths::disk_serial(2)), Path::new("/run/hull/sb/vm/disks/hullrw2.img"));
        hull_agent_api::validate::check_disk_serial(&SandboxPaths::disk_serial(16)).unwrap();
        assert!(CMDLINE.contains("hull.notify_port=1023"));
    }
}
