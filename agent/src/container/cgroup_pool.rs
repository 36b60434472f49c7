//! Pre-made cgroups (cgroup v2), so creating a container does not pay for
//! mkdir + controller setup, and cleaning one up happens off the critical
//! path.
//!
//! cgroup v2 refuses rename(2) (EPERM: its kernfs ops have no rename), so a
//! pooled cgroup cannot be renamed to the container id as on v1: a container
//! uses its slot where it is, `<cgroup_root>/hull/pool/<n>`, and the backend
//! keeps the id → slot map. A released slot is emptied by the caller, then
//! removed and replaced by a fresh one in the background: a fresh cgroup has
//! no stale limits and its counters (cpu.stat, memory.events, io.stat)
//! start at zero.

use crate::backend::{BackendError, Result};
use nix::errno::Errno;
use oci_spec::runtime::LinuxResources;
use std::collections::VecDeque;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// Where libcontainer's cgroup manager expects the cgroup v2 hierarchy
/// (it is hard-coded there); `cgroupsPath` is relative to it.
pub const CGROUP_MOUNT: &str = "/sys/fs/cgroup";

/// Controllers enabled for the pool (those the kernel offers).
const CONTROLLERS: [&str; 6] = ["cpuset", "cpu", "io", "memory", "hugetlb", "pids"];

#[derive(Debug, Clone)]
pub struct Slot {
    /// Absolute path in the cgroup file system.
    pub path: PathBuf,
    /// The same, relative to [`CGROUP_MOUNT`] with a leading `/` (OCI `cgroupsPath`).
    pub rel: String,
}

pub struct CgroupPool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    dir: PathBuf,
    rel_dir: String,
    size: usize,
    next: AtomicU64,
    state: Mutex<PoolState>,
    cv: Condvar,
}

#[derive(Default)]
struct PoolState {
    free: VecDeque<PathBuf>,
    released: Vec<PathBuf>,
    refill: bool,
}

impl CgroupPool {
    /// Sets up `cgroup_root/hull/pool` with `size` free cgroups and starts
    /// the background worker.
    pub fn new(cgroup_root: &Path, size: usize) -> Result<CgroupPool> {
        ensure_cgroup2(cgroup_root)?;
        let mount = Path::new(CGROUP_MOUNT);
        let below = cgroup_root.strip_prefix(mount).map_err(|_| {
            BackendError::FailedPrecondition(format!(
                "cgroup root {} is not under {CGROUP_MOUNT}, where libcontainer manages cgroups",
                cgroup_root.display()
            ))
        })?;
        let dir = cgroup_root.join("hull").join("pool");
        fs::create_dir_all(&dir).map_err(|e| internal(format!("create {}: {e}", dir.display())))?;
        let available = fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
        let wanted: Vec<&str> =
            CONTROLLERS.iter().copied().filter(|c| available.split_whitespace().any(|a| a == *c)).collect();
        // Enable the controllers on every level from the mount down to the pool.
        let mut level = mount.to_path_buf();
        let mut levels = vec![level.clone()];
        for c in below.join("hull").join("pool").components() {
            level.push(c);
            levels.push(level.clone());
        }
        for l in &levels {
            for c in &wanted {
                // Best effort: a missing controller only matters to a limit that needs it,
                // which then fails with a message naming the file.
                let _ = fs::write(l.join("cgroup.subtree_control"), format!("+{c}"));
            }
        }
        let rel_dir = format!("/{}", below.join("hull").join("pool").display());
        let rel_dir = rel_dir.replace("//", "/");
        let inner = Arc::new(PoolInner {
            dir,
            rel_dir,
            size,
            next: AtomicU64::new(0),
            state: Mutex::new(PoolState::default()),
            cv: Condvar::new(),
        });
        inner.clean_leftovers();
        for _ in 0..size {
            let p = inner.create_slot()?;
            lock(&inner.state).free.push_back(p);
        }
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("hull-cgroup-pool".into())
            .spawn(move || worker(weak))
            .map_err(|e| internal(format!("start the cgroup pool thread: {e}")))?;
        Ok(CgroupPool { inner })
    }

    /// A cgroup for a new container: from the pool, or made now if it is empty.
    pub fn take(&self) -> Result<Slot> {
        let inner = &self.inner;
        let popped = {
            let mut st = lock(&inner.state);
            let p = st.free.pop_front();
            if st.free.len() <= inner.size / 2 && inner.size > 0 {
                st.refill = true;
                inner.cv.notify_all();
            }
            p
        };
        let path = match popped {
            Some(p) => p,
            None => inner.create_slot()?,
        };
        Ok(inner.slot(path))
    }

    /// Gives back a slot whose processes are gone: it is removed and
    /// replaced by a fresh one in the background.
    pub fn release(&self, slot: &Slot) {
        let mut st = lock(&self.inner.state);
        st.released.push(slot.path.clone());
        st.refill = true;
        self.inner.cv.notify_all();
    }

    pub fn free(&self) -> usize {
        lock(&self.inner.state).free.len()
    }

    /// The free cgroups' paths (tests, diagnostics).
    #[allow(dead_code)]
    pub fn free_paths(&self) -> Vec<PathBuf> {
        lock(&self.inner.state).free.iter().cloned().collect()
    }
}

impl Drop for CgroupPool {
    fn drop(&mut self) {
        // The worker holds only a Weak reference; wake it so it notices.
        self.inner.cv.notify_all();
    }
}

impl PoolInner {
    fn slot(&self, path: PathBuf) -> Slot {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Slot { rel: format!("{}/{name}", self.rel_dir), path }
    }

    fn create_slot(&self) -> Result<PathBuf> {
        for _ in 0..1000 {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let p = self.dir.join(n.to_string());
            match fs::create_dir(&p) {
                Ok(()) => return Ok(p),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(internal(format!("create cgroup {}: {e}", p.display()))),
            }
        }
        Err(internal(format!("cannot find a free cgroup name in {}", self.dir.display())))
    }

    /// Removes cgroups left by an earlier run (empty ones only) and moves
    /// the name counter past the ones that stay.
    fn clean_leftovers(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else { return };
        let mut max = 0u64;
        for e in rd.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let p = e.path();
            if populated(&p) || remove_cgroup(&p).is_err() {
                if let Some(n) = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok()) {
                    max = max.max(n + 1);
                }
            }
        }
        self.next.store(max, Ordering::Relaxed);
    }
}

fn worker(weak: Weak<PoolInner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let (released, refill) = {
            let mut st = lock(&inner.state);
            if st.released.is_empty() && !st.refill {
                st = inner.cv.wait_timeout(st, Duration::from_secs(5)).unwrap_or_else(|e| e.into_inner()).0;
            }
            let refill = std::mem::take(&mut st.refill);
            (std::mem::take(&mut st.released), refill)
        };
        for p in released {
            if let Err(e) = remove_cgroup(&p) {
                eprintln!("hull-agent: cgroup pool: {e}");
            }
        }
        if refill {
            while lock(&inner.state).free.len() < inner.size {
                match inner.create_slot() {
                    Ok(p) => lock(&inner.state).free.push_back(p),
                    Err(e) => {
                        eprintln!("hull-agent: cgroup pool: {e}");
                        break;
                    }
                }
            }
        }
    }
}

/// Makes sure `root` is in a cgroup v2 hierarchy: mounts cgroup2 on an empty
/// /sys/fs/cgroup (the guest: nothing mounts it before the agent), creates
/// `root` inside an existing cgroup2 mount.
pub fn ensure_cgroup2(root: &Path) -> Result<()> {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC, SYSFS_MAGIC};
    match statfs(root) {
        Ok(s) if s.filesystem_type() == CGROUP2_SUPER_MAGIC => return Ok(()),
        Ok(s) if s.filesystem_type() == SYSFS_MAGIC && root == Path::new(CGROUP_MOUNT) => {
            let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV | nix::mount::MsFlags::MS_NOEXEC;
            return nix::mount::mount(Some("cgroup2"), root, Some("cgroup2"), flags, None::<&str>)
                .map_err(|e| BackendError::FailedPrecondition(format!("mount cgroup2 on {}: {e}", root.display())));
        }
        Ok(_) => {}
        Err(Errno::ENOENT) => {
            if let Some(parent) = root.parent() {
                if statfs(parent).map(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC).unwrap_or(false) {
                    return fs::create_dir_all(root).map_err(|e| internal(format!("create {}: {e}", root.display())));
                }
            }
        }
        Err(_) => {}
    }
    Err(BackendError::FailedPrecondition(format!(
        "cgroup v2 is not available at {} (the container backend needs the unified hierarchy)",
        root.display()
    )))
}

/// Removes a cgroup and any cgroups below it (all must be empty).
pub fn remove_cgroup(p: &Path) -> std::result::Result<(), String> {
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup(&e.path())?;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(p) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(format!("remove cgroup {}: {e}", p.display())),
        }
    }
}

/// Pids in the cgroup and the cgroups below it.
pub fn procs(p: &Path) -> Vec<u32> {
    let mut out: Vec<u32> = fs::read_to_string(p.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(procs(&e.path()));
            }
        }
    }
    out
}

pub fn populated(p: &Path) -> bool {
    event(p, "populated") == Some(1)
}

fn event(p: &Path, key: &str) -> Option<u64> {
    let s = fs::read_to_string(p.join("cgroup.events")).ok()?;
    s.lines().find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
}

/// Sends `sig` to every process in the cgroup (SIGKILL through cgroup.kill
/// when the kernel has it).
pub fn signal_all(p: &Path, sig: i32) -> std::result::Result<(), String> {
    if sig == libc::SIGKILL && fs::write(p.join("cgroup.kill"), "1").is_ok() {
        return Ok(());
    }
    for pid in procs(p) {
        // SAFETY: kill(2) with plain integers.
        if unsafe { libc::kill(pid as libc::pid_t, sig) } < 0 {
            let e = Errno::last();
            if e != Errno::ESRCH {
                return Err(format!("signal {sig} to pid {pid}: {e}"));
            }
        }
    }
    Ok(())
}

/// Kills everything in the cgroup and waits until it is empty.
pub fn kill_and_drain(p: &Path, timeout: Duration) -> std::result::Result<(), String> {
    if !p.exists() {
        return Ok(());
    }
    let _ = fs::write(p.join("cgroup.freeze"), "0");
    let deadline = Instant::now() + timeout;
    loop {
        signal_all(p, libc::SIGKILL)?;
        if !populated(p) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("processes of cgroup {} did not exit: {:?}", p.display(), procs(p)));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Freezes (or thaws) the cgroup and waits until the kernel says it is done.
pub fn freeze(p: &Path, frozen: bool, timeout: Duration) -> std::result::Result<(), String> {
    let v = if frozen { "1" } else { "0" };
    fs::write(p.join("cgroup.freeze"), v).map_err(|e| format!("write {}: {e}", p.join("cgroup.freeze").display()))?;
    let deadline = Instant::now() + timeout;
    while event(p, "frozen") != Some(u64::from(frozen)) {
        if Instant::now() > deadline {
            return Err(format!("cgroup {} did not become {}", p.display(), if frozen { "frozen" } else { "thawed" }));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// Writes OCI `linux.resources` to the cgroup (`rel` is relative to
/// [`CGROUP_MOUNT`]), with libcgroups' translation (shares → weight, …).
pub fn apply_resources(rel: &str, resources: &LinuxResources) -> std::result::Result<(), String> {
    use libcgroups::common::{CgroupManager, ControllerOpt};
    let m = libcgroups::v2::manager::Manager::new(PathBuf::from(CGROUP_MOUNT), PathBuf::from(rel))
        .map_err(|e| e.to_string())?;
    let opt = ControllerOpt { resources, disable_oom_killer: false, oom_score_adj: None, freezer_state: None };
    m.apply(&opt).map_err(|e| super::error_chain(&e))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn internal(s: String) -> BackendError {
    BackendError::Internal(s)
}
