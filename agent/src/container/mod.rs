//! The container backend: youki's libcontainer for what runc does from the
//! spec (namespaces, mounts, masked/read-only paths, capabilities, seccomp,
//! rlimits, user/groups, cwd, env, hooks), plus the parts that make hull a
//! VM-per-pod runtime: rootfs assembly from shared layers, pooled cgroups,
//! and the process reaper of PID 1.
//!
//! Layout: `rootfs` (layers → overlayfs, disk by serial, virtio-fs mount),
//! `cgroup_pool` (pool, freezer, kill, limits), `runtime` (bundle and
//! libcontainer calls), `reaper` (exit statuses, orphans), `stats` (cgroup
//! statistics, OOM monitor).
//!
//! Per container, under `state_dir/<id>/`: `config.json` (the bundle; the
//! bundle directory is the state directory), `rootfs/` (the overlay),
//! `disk/` (the ext4 writable disk) or `tmp/` (tmpfs) holding `upper/` and
//! `work/`. libcontainer's own state is in `state_dir/.lc/<id>/`, console
//! sockets in `state_dir/.tty/`. Layers are handed to overlayfs as
//! `/proc/self/fd/N` of directories opened after the escape check, so the
//! checked directory is the one mounted.
//!
//! Where libcontainer 0.7 does not fit, and what is done instead:
//!
//! - **cgroups.** libcontainer creates the cgroup named by
//!   `linux.cgroupsPath` unless it exists, and its `delete` removes it. The
//!   backend hands it a pooled cgroup that already exists (so it only moves
//!   the process in) and does delete itself: kill everything
//!   (`cgroup.kill`), wait for `populated 0`, poststop hooks
//!   (`libcontainer::hooks`), unmount, and give the cgroup back to the pool.
//!   cgroup v2 refuses rename(2), so a container keeps its slot's path
//!   (`<cgroup_root>/hull/pool/<n>`) instead of being renamed to its id; see
//!   `cgroup_pool`. Limits are written by the backend (libcgroups' writer)
//!   before libcontainer runs, and `linux.resources` is taken out of the
//!   bundle so they are not written twice. libcontainer's cgroup manager
//!   is hard-wired to `/sys/fs/cgroup`, so `cgroup_root` must be at or below it.
//! - **signals.** `Container::kill` signals by pid (racy once the pid is
//!   reaped) and marks the container stopped; the backend signals through
//!   pidfds, and "all" through the cgroup.
//! - **pause/resume.** Done on `cgroup.freeze` directly (waiting for
//!   `frozen`), without libcontainer's state bookkeeping.
//! - **reaping.** libcontainer `waitpid`s its intermediate process and hook
//!   processes; PID 1 must also reap orphans. One reaper (see `reaper`)
//!   reaps only while no libcontainer call runs; every libcontainer call is
//!   made with the reaper lock held, which also serializes libcontainer's
//!   process-wide side effects (it `chdir`s to bind its sockets and writes
//!   the container's oom_score_adj to `/proc/self`; the backend restores the
//!   agent's value afterwards).
//! - **exec.** The tenant (exec) builder (1) rebuilds `linux` from the
//!   namespaces only, dropping the container's seccomp filter; (2) enters
//!   the container's mount namespace with setns(2), which lands at the
//!   namespace's root: the container's rootfs only if the agent itself runs
//!   at its namespace's root (PID 1 on the initramfs does; a chrooted agent,
//!   as in the lab, does not); (3) allocates the console before reaching the
//!   container's root. `runtime::HullExecutor` loads the seccomp filter and
//!   chroots to the init's root when needed (with temporarily raised
//!   capabilities, dropped before exec), and an exec'd terminal is a pty
//!   the agent opens in the container's devpts (`runtime::make_exec_stdio`)
//!   instead of libcontainer's console socket. The init's console does use
//!   the console socket (allocated after pivot_root, so always right).
//! - **initramfs root.** pivot_root(2) fails when the caller's root is the
//!   initramfs (`rootfs`, which has no parent mount); the backend then uses
//!   libcontainer's no-pivot mode (MS_MOVE + chroot). From a real root
//!   mount, pivot_root is used.
//! - **not done.** cgroup v2 device rules (libcontainer's eBPF device
//!   filter is the `cgroupsv2_devices` feature, not enabled: device nodes
//!   come only from the spec, but a container with CAP_MKNOD could create
//!   others); seccomp notify listeners for exec'd processes.
//!
//! Fork safety: libcontainer forks with a raw clone3 from this
//! multithreaded process and the child runs Rust code (allocations) before
//! exec, without glibc's fork handlers. A lock another thread holds at that
//! instant (an allocator arena) would hang the child. runwasi's shims run
//! libcontainer the same way; glibc's per-thread arenas make it unlikely;
//! libcontainer calls are at least serialized among themselves.

mod cgroup_pool;
mod reaper;
mod rootfs;
// pub(crate): the fuzz targets (fuzz/) check the bundle spec built from a host spec.
pub(crate) mod runtime;
mod stats;
#[cfg(test)]
mod tests;

// For agent code that waits for its own children (see `reaper`).
#[allow(unused_imports)]
pub use reaper::{hold_reaper, ReapGuard};

use crate::backend::{
    Backend, BackendError, CreateSpec, ExitInfo, ProcessHandle, ProcessIo, Result, Stats, StdioConfig,
};
use cgroup_pool::{CgroupPool, Slot};
use hull_agent_api::phases::Phases;
use oci_spec::runtime::{LinuxResources, Process, Spec};
use reaper::{ExitCell, Reaper};
use std::collections::HashMap;
use std::fs;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Kernel command line keys read by [`BackendConfig::from_cmdline`].
pub const CMDLINE_FS_TAG: &str = "hull.fs_tag";
pub const CMDLINE_CGROUP_POOL: &str = "hull.cgroup_pool";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Where the layer directories live (the shared file system's mount point).
    pub shared_root: PathBuf,
    /// virtio-fs tag mounted at `shared_root` on first use (None: already there).
    pub fs_tag: Option<String>,
    /// Per-container state, bundles and mount points.
    pub state_dir: PathBuf,
    /// The cgroup v2 directory the pool lives in (`<cgroup_root>/hull/pool`).
    pub cgroup_root: PathBuf,
    /// Free cgroups kept ready.
    pub pool_size: usize,
    /// Where disks are looked up by serial (`<sys_block>/<name>/serial`).
    pub sys_block: PathBuf,
    /// Where the block device nodes are (`<dev_dir>/<name>`).
    pub dev_dir: PathBuf,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            shared_root: PathBuf::from("/run/hull/shared"),
            fs_tag: Some("hullfs".into()),
            state_dir: PathBuf::from("/run/hull/containers"),
            cgroup_root: PathBuf::from(cgroup_pool::CGROUP_MOUNT),
            pool_size: 16,
            sys_block: PathBuf::from("/sys/block"),
            dev_dir: PathBuf::from("/dev"),
        }
    }
}

impl BackendConfig {
    /// The defaults, with `hull.fs_tag=TAG` (empty: none) and
    /// `hull.cgroup_pool=N` from the kernel command line.
    pub fn from_cmdline(cmdline: &str) -> Result<BackendConfig> {
        let mut cfg = BackendConfig::default();
        for word in cmdline.split_whitespace() {
            let Some((k, v)) = word.split_once('=') else { continue };
            match k {
                CMDLINE_FS_TAG => cfg.fs_tag = (!v.is_empty()).then(|| v.to_string()),
                CMDLINE_CGROUP_POOL => {
                    cfg.pool_size = v.parse::<usize>().ok().filter(|n| *n <= 4096).ok_or_else(|| {
                        BackendError::InvalidArgument(format!(
                            "{k}={v:?} on the kernel command line is not a pool size (0 to 4096)"
                        ))
                    })?
                }
                _ => {}
            }
        }
        Ok(cfg)
    }
}

pub struct LibcontainerBackend {
    cfg: BackendConfig,
    lc_root: PathBuf,
    tty_dir: PathBuf,
    shared: rootfs::SharedFs,
    pool: CgroupPool,
    oom: stats::OomMonitor,
    reaper: &'static Reaper,
    containers: Mutex<HashMap<String, Option<Arc<Ctr>>>>,
    no_pivot: bool,
    oom_score_adj: Option<String>,
    counter: AtomicU64,
}

/// One container. `None` in the map: being created.
struct Ctr {
    id: String,
    dir: PathBuf,
    /// The bundle spec (what libcontainer got).
    spec: Spec,
    slot: Slot,
    init: Arc<Proc>,
    st: Mutex<CtrState>,
}

struct CtrState {
    status: Status,
    /// `None`: being created.
    execs: HashMap<String, Option<Arc<Proc>>>,
    mounts: rootfs::Mounts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Created,
    Running,
    Paused,
    Deleting,
}

struct Proc {
    exit: Arc<ExitCell>,
    /// A copy of the pty master, for resize.
    pty: Option<OwnedFd>,
}

impl LibcontainerBackend {
    /// Checks cgroup v2, fills the cgroup pool, starts the reaper and the
    /// OOM monitor.
    pub fn new(cfg: BackendConfig) -> Result<LibcontainerBackend> {
        let pool = CgroupPool::new(&cfg.cgroup_root, cfg.pool_size)?;
        let lc_root = cfg.state_dir.join(".lc");
        let tty_dir = cfg.state_dir.join(".tty");
        for d in [&cfg.state_dir, &lc_root, &tty_dir] {
            fs::create_dir_all(d).map_err(|e| internal(format!("create {}: {e}", d.display())))?;
        }
        let no_pivot = rootfs::root_fstype().as_deref() == Some("rootfs");
        Ok(LibcontainerBackend {
            shared: rootfs::SharedFs::new(cfg.shared_root.clone(), cfg.fs_tag.clone()),
            lc_root,
            tty_dir,
            pool,
            oom: stats::OomMonitor::new(),
            reaper: reaper::reaper(),
            containers: Mutex::new(HashMap::new()),
            no_pivot,
            oom_score_adj: fs::read_to_string("/proc/self/oom_score_adj").ok(),
            counter: AtomicU64::new(0),
            cfg,
        })
    }

    #[allow(dead_code)]
    pub fn config(&self) -> &BackendConfig {
        &self.cfg
    }

    /// The container's cgroup directory.
    #[allow(dead_code)]
    pub fn cgroup_path(&self, id: &str) -> Option<PathBuf> {
        self.get(id).ok().map(|c| c.slot.path.clone())
    }

    /// The free pooled cgroups' directories.
    #[allow(dead_code)]
    pub fn free_cgroups(&self) -> Vec<PathBuf> {
        self.pool.free_paths()
    }

    /// The container's state (and bundle) directory.
    #[allow(dead_code)]
    pub fn container_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join(id)
    }

    fn get(&self, id: &str) -> Result<Arc<Ctr>> {
        match lock(&self.containers).get(id) {
            Some(Some(c)) => Ok(c.clone()),
            Some(None) => Err(BackendError::FailedPrecondition(format!("container {id} is being created"))),
            None => Err(BackendError::NotFound(format!("container {id} not found"))),
        }
    }

    fn proc(&self, ctr: &Ctr, exec_id: Option<&str>) -> Result<Arc<Proc>> {
        let Some(e) = exec_id.filter(|e| !e.is_empty()) else { return Ok(ctr.init.clone()) };
        match lock(&ctr.st).execs.get(e) {
            Some(Some(p)) => Ok(p.clone()),
            Some(None) => {
                Err(BackendError::FailedPrecondition(format!("exec {e} in container {} is being created", ctr.id)))
            }
            None => Err(BackendError::NotFound(format!("exec {e} not found in container {}", ctr.id))),
        }
    }

    fn console_path(&self) -> PathBuf {
        self.tty_dir.join(format!("{}.sock", self.counter.fetch_add(1, Ordering::Relaxed)))
    }

    /// libcontainer wrote the process's oom_score_adj to /proc/self (the
    /// agent); put the agent's back.
    fn restore_oom_score_adj(&self, p: Option<&Process>) {
        if p.and_then(|p| p.oom_score_adj()).is_some() {
            if let Some(v) = &self.oom_score_adj {
                let _ = fs::write("/proc/self/oom_score_adj", v.trim());
            }
        }
    }

    fn create_inner(&self, c: &CreateSpec, undo: &mut Undo) -> Result<(Arc<Ctr>, ProcessHandle)> {
        let id = c.id.as_str();
        let mut phases = Phases::new();
        let dir = self.cfg.state_dir.join(id);
        rootfs::remove_dir_with_mounts(&dir).map_err(internal)?;
        let _ = fs::remove_dir_all(self.lc_root.join(id));
        fs::create_dir_all(&dir).map_err(|e| internal(format!("create {}: {e}", dir.display())))?;
        undo.dir = Some(dir.clone());
        phases.mark("dirs");

        self.shared.ensure()?;
        let layers = rootfs::resolve_layers(self.shared.root(), &c.layers)?;
        phases.mark("layers");
        let upper = match c.rw_disk_serial.as_deref().filter(|s| !s.is_empty()) {
            Some(serial) => rootfs::Upper::Disk { serial, sys_block: &self.cfg.sys_block, dev_dir: &self.cfg.dev_dir },
            None => rootfs::Upper::Tmpfs,
        };
        let (rootfs_path, mounts) = rootfs::assemble(&dir, &layers, upper)?;
        drop(layers);
        undo.mounts = Some(mounts);
        phases.mark("rootfs");

        let slot = self.pool.take()?;
        undo.slot = Some(slot.clone());
        if let Some(res) = c.spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
            cgroup_pool::apply_resources(&slot.rel, res)
                .map_err(|e| BackendError::InvalidArgument(format!("linux.resources of container {id}: {e}")))?;
        }
        phases.mark("cgroup");
        let spec = runtime::bundle_spec(&c.spec, &rootfs_path, &slot.rel, c.stdio.terminal)?;
        runtime::write_json(&dir.join("config.json"), serde_json::to_vec_pretty(&spec))?;
        phases.mark("spec");

        let (child, mut io) = runtime::make_init_stdio(c.stdio, &self.console_path())?;
        phases.mark("stdio");
        // libcontainer removes its state when the build fails, but not when
        // receiving the console fails after it.
        undo.lc_dir = Some(self.lc_root.join(id));
        let (built, exit) = {
            let held = self.reaper.hold();
            let ex = runtime::HullExecutor::for_init(spec.process().as_ref());
            let r = runtime::build_init(id, &self.lc_root, &dir, child, ex, self.no_pivot);
            self.restore_oom_score_adj(spec.process().as_ref());
            let built = r?;
            let exit = self.reaper.watch(&held, built.pid);
            (built, exit)
        };
        phases.mark("build");
        let pty = take_pty(built.pty, &mut io);
        self.oom.add(id, &slot.path);
        let ctr = Arc::new(Ctr {
            id: id.to_string(),
            dir,
            spec,
            slot,
            init: Arc::new(Proc { exit, pty }),
            st: Mutex::new(CtrState {
                status: Status::Created,
                execs: HashMap::new(),
                mounts: undo.mounts.take().unwrap_or_default(),
            }),
        });
        undo.disarm();
        Ok((ctr.clone(), ProcessHandle { pid: built.pid, io, phases }))
    }

    fn exec_inner(&self, ctr: &Ctr, process: Process, stdio: StdioConfig) -> Result<(Arc<Proc>, ProcessHandle)> {
        if process.args().as_ref().is_none_or(|a| a.is_empty()) {
            return Err(BackendError::InvalidArgument("the exec process has no args".into()));
        }
        // The init's root, for the executor to chroot to (see runtime::HullExecutor).
        let root = nix::fcntl::open(
            format!("/proc/{}/root", ctr.init.exit.pid).as_str(),
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| BackendError::FailedPrecondition(format!("container {} is not running: its root: {e}", ctr.id)))?;
        // SAFETY: open returned a fresh descriptor nobody else owns.
        let root = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(root) };
        let winsize = stdio.terminal.then(|| process.console_size()).flatten().map(|b| (b.height(), b.width()));
        let winsize = winsize.map(|(h, w)| (h.min(u16::MAX as u64) as u16, w.min(u16::MAX as u64) as u16));
        let (child, io) = runtime::make_exec_stdio(stdio, &root, winsize)?;
        let (process, ex) =
            runtime::prepare_exec(process, &ctr.spec, stdio.terminal, Some(std::os::fd::AsRawFd::as_raw_fd(&root)));
        let pj = ctr.dir.join(format!("exec-{}.json", self.counter.fetch_add(1, Ordering::Relaxed)));
        runtime::write_json(&pj, serde_json::to_vec_pretty(&process))?;
        let r = {
            let held = self.reaper.hold();
            let r = runtime::build_exec(&ctr.id, &self.lc_root, &pj, child, ex);
            self.restore_oom_score_adj(Some(&process));
            r.map(|b| {
                let exit = self.reaper.watch(&held, b.pid);
                (b, exit)
            })
        };
        drop(root);
        let _ = fs::remove_file(&pj);
        let (built, exit) = r?;
        let pty = io.pty.as_ref().and_then(|p| p.try_clone().ok());
        Ok((Arc::new(Proc { exit, pty }), ProcessHandle { pid: built.pid, io, phases: Phases::new() }))
    }
}

/// Hands the pty master to the caller, keeping a copy for resize.
fn take_pty(pty: Option<OwnedFd>, io: &mut ProcessIo) -> Option<OwnedFd> {
    let pty = pty?;
    let copy = pty.try_clone().ok();
    io.pty = Some(pty);
    copy
}

/// What a failed create must undo.
struct Undo<'a> {
    backend: &'a LibcontainerBackend,
    dir: Option<PathBuf>,
    lc_dir: Option<PathBuf>,
    mounts: Option<rootfs::Mounts>,
    slot: Option<Slot>,
}

impl Undo<'_> {
    fn disarm(&mut self) {
        self.dir = None;
        self.lc_dir = None;
        self.mounts = None;
        self.slot = None;
    }
}

impl Drop for Undo<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            // libcontainer may already have removed it; kill what may be left.
            let _ = cgroup_pool::kill_and_drain(&slot.path, Duration::from_secs(5));
            self.backend.pool.release(&slot);
        }
        if let Some(mut m) = self.mounts.take() {
            m.unmount_all();
        }
        if let Some(d) = self.lc_dir.take() {
            let _ = fs::remove_dir_all(d);
        }
        if let Some(d) = self.dir.take() {
            let _ = rootfs::remove_dir_with_mounts(&d);
        }
    }
}

impl Backend for LibcontainerBackend {
    fn create(&self, c: CreateSpec) -> Result<ProcessHandle> {
        validate_id(&c.id)?;
        {
            let mut m = lock(&self.containers);
            if m.contains_key(&c.id) {
                return Err(BackendError::AlreadyExists(format!("container {} already exists", c.id)));
            }
            m.insert(c.id.clone(), None);
        }
        let mut undo = Undo { backend: self, dir: None, lc_dir: None, mounts: None, slot: None };
        let r = self.create_inner(&c, &mut undo);
        drop(undo);
        let mut m = lock(&self.containers);
        match r {
            Ok((ctr, handle)) => {
                m.insert(c.id.clone(), Some(ctr));
                Ok(handle)
            }
            Err(e) => {
                m.remove(&c.id);
                Err(e)
            }
        }
    }

    fn start(&self, id: &str) -> Result<u32> {
        let ctr = self.get(id)?;
        let mut st = lock(&ctr.st);
        match st.status {
            Status::Created => {}
            Status::Deleting => {
                return Err(BackendError::FailedPrecondition(format!("container {id} is being deleted")))
            }
            _ => return Err(BackendError::FailedPrecondition(format!("container {id} is already started"))),
        }
        if ctr.init.exit.get().is_some() {
            return Err(BackendError::FailedPrecondition(format!("the init process of container {id} has exited")));
        }
        {
            let _held = self.reaper.hold();
            runtime::start(id, &self.lc_root)?;
        }
        st.status = Status::Running;
        Ok(ctr.init.exit.pid)
    }

    fn exec(&self, id: &str, exec_id: &str, process: Process, stdio: StdioConfig) -> Result<ProcessHandle> {
        let ctr = self.get(id)?;
        if exec_id.is_empty() {
            return Err(BackendError::InvalidArgument("empty exec id".into()));
        }
        {
            let mut st = lock(&ctr.st);
            match st.status {
                Status::Running => {}
                Status::Created => {
                    return Err(BackendError::FailedPrecondition(format!("container {id} is not started")))
                }
                Status::Paused => return Err(BackendError::FailedPrecondition(format!("container {id} is paused"))),
                Status::Deleting => {
                    return Err(BackendError::FailedPrecondition(format!("container {id} is being deleted")))
                }
            }
            if ctr.init.exit.get().is_some() {
                return Err(BackendError::FailedPrecondition(format!(
                    "container {id} is not running (its init exited)"
                )));
            }
            if st.execs.contains_key(exec_id) {
                return Err(BackendError::AlreadyExists(format!("exec {exec_id} already exists in container {id}")));
            }
            st.execs.insert(exec_id.to_string(), None);
        }
        let r = self.exec_inner(&ctr, process, stdio);
        let mut st = lock(&ctr.st);
        match r {
            Ok((p, handle)) => {
                st.execs.insert(exec_id.to_string(), Some(p));
                Ok(handle)
            }
            Err(e) => {
                st.execs.remove(exec_id);
                Err(e)
            }
        }
    }

    fn signal(&self, id: &str, exec_id: Option<&str>, signal: i32, all: bool) -> Result<()> {
        let ctr = self.get(id)?;
        if !(1..=64).contains(&signal) {
            return Err(BackendError::InvalidArgument(format!("invalid signal {signal}")));
        }
        if all {
            return cgroup_pool::signal_all(&ctr.slot.path, signal).map_err(internal);
        }
        let p = self.proc(&ctr, exec_id)?;
        match p.exit.signal(signal) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::ESRCH) => {
                Err(BackendError::NotFound(format!("process {} of container {id} has already exited", p.exit.pid)))
            }
            Err(e) => Err(internal(format!("signal {signal} to process {} of container {id}: {e}", p.exit.pid))),
        }
    }

    fn wait(&self, id: &str, exec_id: Option<&str>) -> Result<ExitInfo> {
        let ctr = self.get(id)?;
        let p = self.proc(&ctr, exec_id)?;
        drop(ctr);
        Ok(p.exit.wait())
    }

    fn delete(&self, id: &str, force: bool) -> Result<()> {
        let ctr = self.get(id)?;
        let execs: Vec<Arc<Proc>> = {
            let mut st = lock(&ctr.st);
            if st.status == Status::Deleting {
                return Err(BackendError::FailedPrecondition(format!("container {id} is being deleted")));
            }
            let alive = ctr.init.exit.get().is_none();
            if alive && st.status != Status::Created && !force {
                return Err(BackendError::FailedPrecondition(format!(
                    "container {id} is running: stop it first or delete with force"
                )));
            }
            st.status = Status::Deleting;
            st.execs.values().flatten().cloned().collect()
        };
        let mut errors = Vec::new();
        if let Err(e) = cgroup_pool::kill_and_drain(&ctr.slot.path, Duration::from_secs(10)) {
            errors.push(e);
        }
        // Let the reaper record the statuses before the container goes away.
        for p in std::iter::once(&ctr.init).chain(execs.iter()) {
            if p.exit.wait_timeout(Duration::from_secs(5)).is_none() {
                errors.push(format!("process {} did not exit", p.exit.pid));
            }
        }
        {
            let _held = self.reaper.hold();
            if let Err(e) = runtime::poststop_hooks(id, &self.lc_root, &ctr.spec) {
                errors.push(e.to_string());
            }
        }
        self.oom.remove(id);
        errors.extend(lock(&ctr.st).mounts.unmount_all());
        if let Err(e) = fs::remove_dir_all(self.lc_root.join(id)) {
            if e.kind() != std::io::ErrorKind::NotFound {
                errors.push(format!("remove libcontainer state of {id}: {e}"));
            }
        }
        if let Err(e) = rootfs::remove_dir_with_mounts(&ctr.dir) {
            errors.push(e);
        }
        self.pool.release(&ctr.slot);
        lock(&self.containers).remove(id);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(internal(format!("delete container {id}: {}", errors.join("; "))))
        }
    }

    fn pause(&self, id: &str) -> Result<()> {
        let ctr = self.get(id)?;
        let mut st = lock(&ctr.st);
        if st.status != Status::Running || ctr.init.exit.get().is_some() {
            return Err(BackendError::FailedPrecondition(format!("container {id} is not running")));
        }
        cgroup_pool::freeze(&ctr.slot.path, true, Duration::from_secs(10)).map_err(internal)?;
        st.status = Status::Paused;
        Ok(())
    }

    fn resume(&self, id: &str) -> Result<()> {
        let ctr = self.get(id)?;
        let mut st = lock(&ctr.st);
        if st.status != Status::Paused {
            return Err(BackendError::FailedPrecondition(format!("container {id} is not paused")));
        }
        cgroup_pool::freeze(&ctr.slot.path, false, Duration::from_secs(10)).map_err(internal)?;
        st.status = Status::Running;
        Ok(())
    }

    fn update(&self, id: &str, resources: LinuxResources) -> Result<()> {
        let ctr = self.get(id)?;
        cgroup_pool::apply_resources(&ctr.slot.rel, &resources)
            .map_err(|e| BackendError::InvalidArgument(format!("update resources of container {id}: {e}")))
    }

    fn stats(&self, id: &str) -> Result<Stats> {
        let ctr = self.get(id)?;
        Ok(stats::read_stats(&ctr.slot.path))
    }

    fn pids(&self, id: &str) -> Result<Vec<u32>> {
        let ctr = self.get(id)?;
        let mut p = cgroup_pool::procs(&ctr.slot.path);
        p.sort_unstable();
        Ok(p)
    }

    fn resize_tty(&self, id: &str, exec_id: Option<&str>, rows: u16, cols: u16) -> Result<()> {
        let ctr = self.get(id)?;
        let p = self.proc(&ctr, exec_id)?;
        let Some(pty) = &p.pty else {
            return Err(BackendError::FailedPrecondition(format!(
                "process {} of container {id} has no terminal",
                p.exit.pid
            )));
        };
        runtime::set_winsize(pty, rows, cols).map_err(internal)
    }

    fn next_oom(&self) -> Result<String> {
        Ok(self.oom.next())
    }

    fn counts(&self) -> (u32, u32) {
        (lock(&self.containers).len() as u32, self.pool.free() as u32)
    }
}

/// Container ids become directory and socket names: `[A-Za-z0-9]` then
/// `[A-Za-z0-9_.+-]`, at most 128 characters.
fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.starts_with(|c: char| c.is_ascii_alphanumeric())
        && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-'));
    if ok {
        Ok(())
    } else {
        Err(BackendError::InvalidArgument(format!(
            "invalid container id {id:?}: use letters, digits and _.+- (starting with a letter or digit), at most 128"
        )))
    }
}

/// An error and its sources, `a: b: c`.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let t = x.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = x.source();
    }
    s
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn internal(s: String) -> BackendError {
    BackendError::Internal(s)
}
