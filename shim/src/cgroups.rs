//! Host cgroups for pod VMs, taken from a pool of pre-made ones.
//!
//! Every pod's hull-vmm and virtiofsd run in one host cgroup that limits the
//! whole VM (CPU, memory, tasks). Making a cgroup is slow-ish and serializes
//! on kernel locks (worse with many pods starting at once), so cgroups are
//! made ahead of time by a background thread and a starting pod only
//! *claims* one. The claim is the only point where concurrent pod starts
//! meet, and it is one atomic syscall, so any number of shims (one process
//! per pod) can take from the same pool at once.
//!
//! Layout, under hull's parent cgroup (`paths.cgroup_parent`, e.g. `hull`),
//! in every hierarchy used (cgroup v2: the one unified hierarchy; cgroup v1:
//! the `memory`, `cpu`, `cpuacct` and `pids` hierarchies, wherever they are
//! mounted, co-mounted or not):
//!
//! - `<parent>/pool-<random>`: a free pool entry.
//! - cgroup v1: `<parent>/pod-<pod id>`: a pod's cgroup. A pool entry is
//!   claimed by renaming it (rename(2) of a v1 cgroup directory works within
//!   its parent directory only, hence one flat directory). `memory` is the
//!   primary hierarchy: the rename there is the claim (it fails with ENOENT
//!   for every shim but one); the same-named entry in the other hierarchies
//!   is renamed after it. A pool entry is made in the primary hierarchy last,
//!   so an entry found there exists everywhere.
//! - cgroup v2: the kernel refuses to rename cgroup directories (EPERM,
//!   checked in the lab on Linux 6.1), so a pool entry keeps its name and is
//!   claimed by setting the extended attribute `trusted.hull.pod = <pod id>`
//!   on it with `XATTR_CREATE` (atomic: exactly one setter succeeds). Free
//!   entries are those without the attribute.
//! - Should a kernel refuse the claim (rename or attribute) for another
//!   reason than a lost race, the pod's cgroup `pod-<id>` is made with mkdir
//!   instead, and a debug log says why.
//! - With a Kubernetes cgroup path (the sandbox's `linux.cgroupsPath`), the
//!   pod's cgroup is exactly that path (it already names the sandbox:
//!   `/kubepods/besteffort/pod<uid>/<sandbox id>`, or systemd-style
//!   `kubepods-besteffort-pod<uid>.slice:cri-containerd:<sandbox id>`, which
//!   is `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<sandbox id>.scope`).
//!   It is made with mkdir when the pod starts (a pool under every pod's
//!   parent would never be used twice). systemd-style paths are made in
//!   cgroupfs directly, not through systemd's D-Bus API.
//!
//! What a leftover of a crashed shim looks like: `pod-<id>` (v1) or a
//! `pool-*` entry with `trusted.hull.pod` set (v2); [`cleanup_pod_cgroup`]
//! removes it given the pod id. Free `pool-*` entries are never stale.

use log::{debug, warn};
use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Name prefix of a pool entry.
pub const POOL_PREFIX: &str = "pool-";
/// Name prefix of a pod's cgroup (cgroup v1, renamed from a pool entry or made).
pub const POD_PREFIX: &str = "pod-";
/// The extended attribute that marks a claimed pool entry (its value: the pod id).
pub const CLAIM_XATTR: &str = "trusted.hull.pod";
/// CFS period written for every pod (100 ms, the kernel's default).
pub const CPU_PERIOD_US: u64 = 100_000;
/// CPU time per period on top of the vCPUs: hull-vmm's device and API
/// threads and virtiofsd (a quarter of a CPU).
pub const CPU_OVERHEAD_US: u64 = 25_000;
/// Memory on top of guest memory: hull-vmm's and virtiofsd's own memory
/// (binaries, heaps, thread stacks) and page cache of the pod's disk images
/// and image layers (reclaimable).
pub const MEM_OVERHEAD_BYTES: u64 = 64 << 20;
/// ... plus guest memory / this: KVM's kernel memory that grows with guest
/// memory (nested page tables, memory slot metadata), about 1.6%.
pub const MEM_OVERHEAD_DIVISOR: u64 = 64;
/// Tasks (threads count) allowed per pod on top of one per vCPU.
pub const PIDS_BASE: u64 = 256;
/// How long [`PodCgroup::remove`] waits for a cgroup to become empty.
pub const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Controllers used on cgroup v1, in hierarchy order (the first: the primary).
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "cpuacct", "pids"];
/// Controllers used on cgroup v2.
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// Controllers without which there is no point.
const REQUIRED: [&str; 2] = ["cpu", "memory"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

/// A cgroup error; the message names the path and the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CgroupError(pub String);

fn io_err(what: &str, path: &Path, e: io::Error) -> CgroupError {
    CgroupError(format!("{what} {}: {e}", path.display()))
}

/// One mounted hierarchy and the controllers of [`V1_CONTROLLERS`] /
/// [`V2_CONTROLLERS`] it has.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Hierarchy {
    mount: PathBuf,
    controllers: Vec<String>,
}

impl Hierarchy {
    fn has(&self, c: &str) -> bool {
        self.controllers.iter().any(|x| x == c)
    }
}

/// Unescapes a mountinfo field (`\040` for a space and so on).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup v1 hierarchies holding the controllers hull uses, from
/// /proc/self/mountinfo text. The `memory` hierarchy comes first.
fn parse_v1_mounts(mountinfo: &str) -> Result<Vec<Hierarchy>, CgroupError> {
    let mut found: Vec<Hierarchy> = Vec::new();
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let right: Vec<&str> = right.split_whitespace().collect();
        let left: Vec<&str> = left.split_whitespace().collect();
        if right.len() < 3 || right[0] != "cgroup" || left.len() < 5 {
            continue;
        }
        let opts: Vec<&str> = right[2].split(',').collect();
        let controllers: Vec<String> = V1_CONTROLLERS
            .iter()
            .filter(|c| opts.contains(c) && !found.iter().any(|h| h.has(c)))
            .map(|c| c.to_string())
            .collect();
        if !controllers.is_empty() {
            found.push(Hierarchy { mount: PathBuf::from(unescape(left[4])), controllers });
        }
    }
    for c in REQUIRED {
        if !found.iter().any(|h| h.has(c)) {
            return Err(CgroupError(format!(
                "cgroup v1: no hierarchy with the {c} controller is mounted (see /proc/self/mountinfo)"
            )));
        }
    }
    let rank = |h: &Hierarchy| V1_CONTROLLERS.iter().position(|c| h.has(c)).unwrap_or(usize::MAX);
    found.sort_by_key(rank);
    Ok(found)
}

/// Finds the cgroup version and the hierarchies to use.
fn find_hierarchies() -> Result<(CgroupVersion, Vec<Hierarchy>), CgroupError> {
    let root = Path::new(CGROUP_ROOT);
    let controllers = root.join("cgroup.controllers");
    if controllers.exists() {
        let avail = fs::read_to_string(&controllers).map_err(|e| io_err("read", &controllers, e))?;
        let have: Vec<String> = V2_CONTROLLERS
            .iter()
            .filter(|c| avail.split_whitespace().any(|a| a == **c))
            .map(|c| c.to_string())
            .collect();
        for c in REQUIRED {
            if !have.iter().any(|h| h == c) {
                return Err(CgroupError(format!(
                    "cgroup v2 at {CGROUP_ROOT}: the {c} controller is not available (cgroup.controllers: {})",
                    avail.trim()
                )));
            }
        }
        return Ok((CgroupVersion::V2, vec![Hierarchy { mount: root.to_path_buf(), controllers: have }]));
    }
    let info =
        fs::read_to_string("/proc/self/mountinfo").map_err(|e| io_err("read", Path::new("/proc/self/mountinfo"), e))?;
    Ok((CgroupVersion::V1, parse_v1_mounts(&info)?))
}

/// A relative cgroup path made of plain names only.
fn check_relative(what: &str, p: &str) -> Result<PathBuf, CgroupError> {
    let bad = |why: &str| CgroupError(format!("{what} {p:?}: {why}"));
    if p.contains(['\0', '\n']) {
        return Err(bad("contains a NUL or newline"));
    }
    let mut out = PathBuf::new();
    for c in p.split('/').filter(|c| !c.is_empty()) {
        if c == "." || c == ".." {
            return Err(bad("must not contain '.' or '..' components"));
        }
        out.push(c);
    }
    if out.as_os_str().is_empty() {
        return Err(bad("names no cgroup"));
    }
    debug_assert!(out.components().all(|c| matches!(c, Component::Normal(_))));
    Ok(out)
}

/// Expands a systemd slice name: `a-b-c.slice` is `a.slice/a-b.slice/a-b-c.slice`.
fn expand_slice(k8s: &str, slice: &str) -> Result<PathBuf, CgroupError> {
    let bad = |why: String| CgroupError(format!("Kubernetes cgroup path {k8s:?}: {why}"));
    let Some(base) = slice.strip_suffix(".slice") else {
        return Err(bad(format!("{slice:?} is not a systemd slice (no .slice suffix)")));
    };
    if base == "-" {
        return Ok(PathBuf::new());
    }
    if base.is_empty() || base.contains('/') || base.starts_with('-') || base.ends_with('-') || base.contains("--") {
        return Err(bad(format!("{slice:?} is not a valid slice name")));
    }
    let mut out = PathBuf::new();
    let parts: Vec<&str> = base.split('-').collect();
    for i in 1..=parts.len() {
        out.push(format!("{}.slice", parts[..i].join("-")));
    }
    Ok(out)
}

/// The pod cgroup's path below the hierarchy root for Kubernetes' cgroup path
/// of the sandbox (`linux.cgroupsPath` of its OCI spec), either cgroupfs
/// style (`/kubepods/besteffort/pod<uid>/<id>`) or systemd style
/// (`<slice>:<prefix>:<name>`, e.g. `kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`,
/// giving `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/cri-containerd-<id>.scope`).
/// `..` components and other tricks are refused.
pub fn parse_k8s_cgroups_path(p: &str) -> Result<PathBuf, CgroupError> {
    let what = "Kubernetes cgroup path";
    if p.is_empty() {
        return Err(CgroupError(format!("{what} is empty")));
    }
    if p.starts_with('/') || !p.contains(':') {
        return check_relative(what, p);
    }
    let parts: Vec<&str> = p.split(':').collect();
    if parts.len() != 3 {
        return Err(CgroupError(format!("{what} {p:?}: systemd style is <slice>:<prefix>:<name>")));
    }
    let (slice, prefix, name) = (parts[0], parts[1], parts[2]);
    let slice = if slice.is_empty() { "system.slice" } else { slice };
    let mut out = expand_slice(p, slice)?;
    if name.is_empty() || name.contains('/') || prefix.contains('/') {
        return Err(CgroupError(format!("{what} {p:?}: bad unit name")));
    }
    let unit = if name.ends_with(".slice") {
        name.to_string()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    out.push(check_relative(what, &unit)?);
    check_relative(what, &out.to_string_lossy())
}

fn mkdir_ok_if_exists(dir: &Path) -> Result<bool, CgroupError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err("create cgroup", dir, e)),
    }
}

/// cgroup v2: lets the children of `dir` use `controllers`.
fn enable_controllers(dir: &Path, controllers: &[String]) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let cur = fs::read_to_string(&file).map_err(|e| io_err("read", &file, e))?;
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| !cur.split_whitespace().any(|x| x == c.as_str()))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    fs::write(&file, missing.join(" ")).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::EBUSY) {
            " (a cgroup v2 cgroup that holds processes cannot give controllers to its children)"
        } else {
            ""
        };
        CgroupError(format!("write {:?} to {}: {e}{hint}", missing.join(" "), file.display()))
    })
}

/// Makes `rel` below the hierarchy's root (each missing level); on cgroup v2
/// every level above the last gets the controllers delegated (so does the
/// last if `delegate_last`). Returns the full path.
fn ensure_path(version: CgroupVersion, h: &Hierarchy, rel: &Path, delegate_last: bool) -> Result<PathBuf, CgroupError> {
    let mut dir = h.mount.clone();
    let n = rel.components().count();
    if version == CgroupVersion::V2 {
        enable_controllers(&dir, &h.controllers)?;
    }
    for (i, c) in rel.components().enumerate() {
        dir.push(c);
        mkdir_ok_if_exists(&dir)?;
        if version == CgroupVersion::V2 && (i + 1 < n || delegate_last) {
            enable_controllers(&dir, &h.controllers)?;
        }
    }
    Ok(dir)
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

/// setxattr with XATTR_CREATE: fails with EEXIST if it is set already.
fn set_xattr_create(path: &Path, name: &str, value: &str) -> io::Result<()> {
    let (p, n) = (cstr(path), CString::new(name).unwrap_or_default());
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe { libc::setxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), libc::XATTR_CREATE) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The value of an extended attribute; None if it is not set.
fn get_xattr(path: &Path, name: &str) -> io::Result<Option<String>> {
    let (p, n) = (cstr(path), CString::new(name).unwrap_or_default());
    let mut buf = [0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let r = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if errno(&e) == libc::ENODATA { Ok(None) } else { Err(e) };
    }
    Ok(Some(String::from_utf8_lossy(&buf[..r as usize]).into_owned()))
}

fn random_suffix() -> String {
    let mut b = [0u8; 6];
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b[..4].copy_from_slice(&t.subsec_nanos().to_le_bytes());
        b[4..].copy_from_slice(&(std::process::id() as u16).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The pids in a cgroup (its `cgroup.procs`).
fn procs(dir: &Path) -> Result<Vec<u32>, CgroupError> {
    let f = dir.join("cgroup.procs");
    let text = fs::read_to_string(&f).map_err(|e| io_err("read", &f, e))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// rmdir of a cgroup, retried while it is busy (processes still leaving)
/// until `timeout`. A cgroup that is already gone is fine.
fn remove_cgroup_dir(dir: &Path, timeout: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + timeout;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if errno(&e) == libc::EBUSY || errno(&e) == libc::ENOTEMPTY => {
                if Instant::now() >= deadline {
                    let pids = procs(dir).unwrap_or_default();
                    return Err(CgroupError(format!(
                        "remove cgroup {}: still in use after {:.1}s ({e}; processes: {pids:?})",
                        dir.display(),
                        timeout.as_secs_f64()
                    )));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io_err("remove cgroup", dir, e)),
        }
    }
}

fn write_file(dir: &Path, file: &str, value: &str) -> Result<(), CgroupError> {
    let p = dir.join(file);
    fs::write(&p, value).map_err(|e| CgroupError(format!("write {value:?} to {}: {e}", p.display())))
}

fn read_file(dir: &Path, file: &str) -> Result<String, CgroupError> {
    let p = dir.join(file);
    fs::read_to_string(&p).map(|s| s.trim().to_string()).map_err(|e| io_err("read", &p, e))
}

/// The host cgroups of hull's pods: the hierarchies in use and the pool.
/// Cheap to clone (shared state).
#[derive(Clone)]
pub struct HostCgroups {
    inner: Arc<Inner>,
}

struct Inner {
    version: CgroupVersion,
    /// `[0]` is the primary hierarchy (v1: `memory`).
    hierarchies: Vec<Hierarchy>,
    /// hull's parent cgroup, relative to each hierarchy's root.
    parent: PathBuf,
    pool_size: usize,
    /// Pool entries believed free (another shim may have taken one since).
    free: Mutex<Vec<String>>,
    refilling: AtomicBool,
}

/// How a pod's cgroup came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Taken from the pool.
    Pool,
    /// Made with mkdir when the pod started (pool empty, or a Kubernetes parent).
    Made,
    /// It existed already (a leftover of an earlier run of this pod) and is reused.
    Existing,
}

/// The outcome of claiming one pool entry.
enum Claim {
    Got(PodCgroup),
    /// Another taker was first.
    Lost,
    /// This kernel does not let us claim entries (why).
    Impossible(String),
}

/// What [`PodCgroup::set_limits`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub cpu_quota_us: u64,
    pub cpu_period_us: u64,
    /// None: no memory limit.
    pub memory_bytes: Option<u64>,
    pub pids_max: u64,
}

impl Limits {
    /// The limits of a VM with `vcpus` vCPUs and `guest_mem_bytes` of guest
    /// memory (None: no memory limit):
    /// CPU `vcpus` + 1/4 CPU, memory guest + 64 MiB + guest/64, tasks 256 + vcpus.
    pub fn for_vm(vcpus: u32, guest_mem_bytes: Option<u64>) -> Limits {
        let vcpus = vcpus.max(1) as u64;
        Limits {
            cpu_quota_us: vcpus * CPU_PERIOD_US + CPU_OVERHEAD_US,
            cpu_period_us: CPU_PERIOD_US,
            memory_bytes: guest_mem_bytes.map(|m| {
                let total = m.saturating_add(MEM_OVERHEAD_BYTES).saturating_add(m / MEM_OVERHEAD_DIVISOR);
                total.div_ceil(4096).saturating_mul(4096)
            }),
            pids_max: PIDS_BASE + vcpus,
        }
    }
}

/// One pod's cgroup (one directory per hierarchy).
#[derive(Debug, Clone)]
pub struct PodCgroup {
    version: CgroupVersion,
    pod_id: String,
    /// One directory per hierarchy, with that hierarchy's controllers.
    dirs: Vec<(PathBuf, Vec<String>)>,
    origin: Origin,
}

impl HostCgroups {
    /// Finds the cgroup hierarchies (cgroup v2 if `/sys/fs/cgroup` is the
    /// unified hierarchy, else the v1 controller hierarchies in
    /// /proc/self/mountinfo) and makes `parent` (e.g. `hull`, relative to
    /// each hierarchy's root) in each; on cgroup v2 the `cpu`, `memory` and
    /// `pids` controllers are delegated down to it. Nothing is pre-made yet:
    /// see [`HostCgroups::refill`] and [`HostCgroups::refill_in_background`].
    pub fn detect(parent: &str, pool_size: usize) -> Result<HostCgroups, CgroupError> {
        let parent = check_relative("cgroup parent", parent)?;
        let (version, hierarchies) = find_hierarchies()?;
        for h in &hierarchies {
            ensure_path(version, h, &parent, true)?;
        }
        debug!(
            "host cgroups: {version:?}, parent {} in {}",
            parent.display(),
            hierarchies.iter().map(|h| h.mount.display().to_string()).collect::<Vec<_>>().join(", ")
        );
        Ok(HostCgroups {
            inner: Arc::new(Inner {
                version,
                hierarchies,
                parent,
                pool_size,
                free: Mutex::new(Vec::new()),
                refilling: AtomicBool::new(false),
            }),
        })
    }

    pub fn version(&self) -> CgroupVersion {
        self.inner.version
    }

    /// hull's parent cgroup in every hierarchy (the primary one first).
    pub fn parent_dirs(&self) -> Vec<PathBuf> {
        self.inner.hierarchies.iter().map(|h| h.mount.join(&self.inner.parent)).collect()
    }

    fn dir(&self, i: usize, name: &str) -> PathBuf {
        self.inner.hierarchies[i].mount.join(&self.inner.parent).join(name)
    }

    fn pod_cgroup(&self, pod_id: &str, name: &str, origin: Origin) -> PodCgroup {
        PodCgroup {
            version: self.inner.version,
            pod_id: pod_id.to_string(),
            dirs: (0..self.inner.hierarchies.len())
                .map(|i| (self.dir(i, name), self.inner.hierarchies[i].controllers.clone()))
                .collect(),
            origin,
        }
    }

    /// The free pool entries now (read from the primary hierarchy).
    pub fn free_entries(&self) -> Result<Vec<String>, CgroupError> {
        let parent = self.inner.hierarchies[0].mount.join(&self.inner.parent);
        let rd = fs::read_dir(&parent).map_err(|e| io_err("list", &parent, e))?;
        let mut out = Vec::new();
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if !name.starts_with(POOL_PREFIX) || !ent.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if self.inner.version == CgroupVersion::V2 && !matches!(get_xattr(&ent.path(), CLAIM_XATTR), Ok(None)) {
                continue;
            }
            out.push(name);
        }
        Ok(out)
    }

    /// Makes cgroup `name` in every hierarchy, the primary one last; on
    /// failure removes what it made.
    fn make(&self, name: &str) -> Result<(), CgroupError> {
        let mut made = Vec::new();
        for i in (0..self.inner.hierarchies.len()).rev() {
            let d = self.dir(i, name);
            match mkdir_ok_if_exists(&d) {
                Ok(true) => made.push(d),
                Ok(false) => {}
                Err(e) => {
                    for d in made {
                        let _ = fs::remove_dir(d);
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Takes a cgroup for pod `pod_id`: with `k8s_path` (the sandbox's
    /// `linux.cgroupsPath`), that cgroup, made now; otherwise a pool entry,
    /// claimed (v1: renamed to `pod-<id>`; v2: marked with `trusted.hull.pod`),
    /// or `pod-<id>` made now if the pool is empty (logged at debug level).
    /// Only the claim itself is shared with concurrent takes.
    pub fn take(&self, pod_id: &str, k8s_path: Option<&str>) -> Result<PodCgroup, CgroupError> {
        hull_agent_api::validate::check_id("pod id", pod_id).map_err(CgroupError)?;
        let v = self.inner.version;
        if let Some(k8s) = k8s_path {
            let rel = parse_k8s_cgroups_path(k8s)?;
            let mut dirs = Vec::new();
            for h in &self.inner.hierarchies {
                dirs.push((ensure_path(v, h, &rel, false)?, h.controllers.clone()));
            }
            debug!("pod {pod_id}: cgroup {} (Kubernetes' parent; made now, no pool there)", rel.display());
            return Ok(PodCgroup { version: v, pod_id: pod_id.to_string(), dirs, origin: Origin::Made });
        }
        let pod_name = format!("{POD_PREFIX}{pod_id}");
        if self.dir(0, &pod_name).exists() {
            warn!("pod {pod_id}: reusing the existing cgroup {}", self.dir(0, &pod_name).display());
            self.make(&pod_name)?;
            return Ok(self.pod_cgroup(pod_id, &pod_name, Origin::Existing));
        }
        let mut refreshed = false;
        loop {
            let next = self.inner.free.lock().unwrap().pop();
            let entry = match next {
                Some(e) => e,
                None if !refreshed => {
                    refreshed = true;
                    let mut list = self.free_entries().unwrap_or_default();
                    // Concurrent shims list the same entries: start at different ones.
                    if !list.is_empty() {
                        let k = std::process::id() as usize % list.len();
                        list.rotate_left(k);
                    }
                    let mut free = self.inner.free.lock().unwrap();
                    for e in list {
                        if !free.contains(&e) {
                            free.push(e);
                        }
                    }
                    continue;
                }
                None => break,
            };
            match self.claim(&entry, pod_id, &pod_name)? {
                Claim::Got(cg) => return Ok(cg),
                Claim::Lost => {}
                Claim::Impossible(why) => {
                    debug!("pod {pod_id}: cannot take a pooled cgroup ({why}): making {pod_name} now");
                    self.make(&pod_name)?;
                    return Ok(self.pod_cgroup(pod_id, &pod_name, Origin::Made));
                }
            }
        }
        debug!(
            "pod {pod_id}: the cgroup pool in {} is empty: making {pod_name} now",
            self.inner.hierarchies[0].mount.join(&self.inner.parent).display()
        );
        self.make(&pod_name)?;
        Ok(self.pod_cgroup(pod_id, &pod_name, Origin::Made))
    }

    /// Claims pool entry `entry`.
    fn claim(&self, entry: &str, pod_id: &str, pod_name: &str) -> Result<Claim, CgroupError> {
        let from = self.dir(0, entry);
        if self.inner.version == CgroupVersion::V2 {
            return match set_xattr_create(&from, CLAIM_XATTR, pod_id) {
                Ok(()) => Ok(Claim::Got(self.pod_cgroup(pod_id, entry, Origin::Pool))),
                Err(e) if matches!(errno(&e), libc::ENOENT | libc::EEXIST) => Ok(Claim::Lost),
                Err(e) => Ok(Claim::Impossible(format!("set {CLAIM_XATTR} on {}: {e}", from.display()))),
            };
        }
        let to = self.dir(0, pod_name);
        match fs::rename(&from, &to) {
            Ok(()) => {}
            Err(e) if errno(&e) == libc::ENOENT => return Ok(Claim::Lost),
            Err(e) if errno(&e) == libc::EEXIST || errno(&e) == libc::ENOTEMPTY => {
                return Err(CgroupError(format!("rename cgroup {} to {}: {e}", from.display(), to.display())))
            }
            Err(e) => {
                return Ok(Claim::Impossible(format!("rename cgroup {} to {}: {e}", from.display(), to.display())))
            }
        }
        let cg = self.pod_cgroup(pod_id, pod_name, Origin::Pool);
        for i in 1..self.inner.hierarchies.len() {
            let (from, to) = (self.dir(i, entry), self.dir(i, pod_name));
            let r = match fs::rename(&from, &to) {
                Err(e) if errno(&e) == libc::ENOENT => mkdir_ok_if_exists(&to).map(|_| ()),
                r => r.map_err(|e| CgroupError(format!("rename cgroup {} to {}: {e}", from.display(), to.display()))),
            };
            if let Err(e) = r {
                let _ = cg.remove();
                let _ = fs::remove_dir(&from);
                return Err(e);
            }
        }
        Ok(Claim::Got(cg))
    }

    /// Makes pool entries until `pool_size` are free; returns how many it
    /// made. At most one process refills a parent at a time (a lock on the
    /// parent's directory); the others return 0 at once.
    pub fn refill(&self) -> Result<usize, CgroupError> {
        if self.inner.pool_size == 0 {
            return Ok(0);
        }
        let parent = self.inner.hierarchies[0].mount.join(&self.inner.parent);
        let dir = fs::File::open(&parent).map_err(|e| io_err("open", &parent, e))?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if errno(&e) == libc::EWOULDBLOCK {
                return Ok(0);
            }
            return Err(io_err("lock", &parent, e));
        }
        let mut have = self.free_entries()?.len();
        let mut made = 0;
        while have < self.inner.pool_size {
            let name = format!("{POOL_PREFIX}{}", random_suffix());
            self.make(&name)?;
            self.inner.free.lock().unwrap().insert(0, name);
            have += 1;
            made += 1;
        }
        Ok(made)
    }

    /// Refills the pool on a background thread (one at a time per process);
    /// returns at once. Errors are logged.
    pub fn refill_in_background(&self) {
        if self.inner.pool_size == 0 || self.inner.refilling.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        let started = crate::background::spawn("cgroup-pool", move || {
            match me.refill() {
                Ok(0) => {}
                Ok(n) => debug!("cgroup pool: made {n} entries"),
                Err(e) => warn!("cgroup pool: refill failed: {e}"),
            }
            me.inner.refilling.store(false, Ordering::SeqCst);
        });
        if started.is_none() {
            self.inner.refilling.store(false, Ordering::SeqCst);
        }
    }

    /// Whether a background refill is running.
    pub fn refilling(&self) -> bool {
        self.inner.refilling.load(Ordering::SeqCst)
    }
}

impl PodCgroup {
    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    pub fn pod_id(&self) -> &str {
        &self.pod_id
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The cgroup's directory in every hierarchy (the primary one first).
    pub fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|(d, _)| d.clone()).collect()
    }

    /// Moves process `pid` (all its threads) into the cgroup.
    pub fn add_pid(&self, pid: u32) -> Result<(), CgroupError> {
        for (d, _) in &self.dirs {
            write_file(d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// A `pre_exec` hook that moves the child into the cgroup before it
    /// execs (so everything it allocates is charged here from the start):
    /// `unsafe { cmd.pre_exec(cg.join_before_exec()?) }`. The hook only
    /// calls write(2) on file descriptors opened here.
    pub fn join_before_exec(&self) -> Result<impl FnMut() -> io::Result<()> + Send + Sync + 'static, CgroupError> {
        let mut fds: Vec<OwnedFd> = Vec::new();
        for (d, _) in &self.dirs {
            let p = d.join("cgroup.procs");
            let f = fs::OpenOptions::new().write(true).open(&p).map_err(|e| io_err("open", &p, e))?;
            fds.push(f.into());
        }
        Ok(move || {
            for fd in &fds {
                // SAFETY: write(2) of a 1-byte static buffer (async-signal-safe).
                if unsafe { libc::write(fd.as_raw_fd(), b"0".as_ptr().cast(), 1) } != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        })
    }

    /// The processes in the cgroup.
    pub fn pids(&self) -> Result<Vec<u32>, CgroupError> {
        procs(&self.dirs[0].0)
    }

    /// Writes the limits for a VM of `vcpus` vCPUs and `guest_mem_bytes` of
    /// guest memory ([`Limits::for_vm`]). cgroup v2: `cpu.max`,
    /// `memory.max`, `pids.max`; v1: `cpu.cfs_period_us`,
    /// `cpu.cfs_quota_us`, `memory.limit_in_bytes`, `pids.max`. On v1 the CPU
    /// quota is lowered to the parent's if that is smaller (v1 refuses a
    /// child above its parent). Returns what was written.
    pub fn set_limits(&self, vcpus: u32, guest_mem_bytes: Option<u64>) -> Result<Limits, CgroupError> {
        let mut l = Limits::for_vm(vcpus, guest_mem_bytes);
        let mem = l.memory_bytes.map(|m| m.to_string());
        for (d, ctrls) in &self.dirs {
            let has = |c: &str| ctrls.iter().any(|x| x == c);
            match self.version {
                CgroupVersion::V2 => {
                    if has("cpu") {
                        write_file(d, "cpu.max", &format!("{} {}", l.cpu_quota_us, l.cpu_period_us))?;
                    }
                    if has("memory") {
                        write_file(d, "memory.max", mem.as_deref().unwrap_or("max"))?;
                    }
                    if has("pids") {
                        write_file(d, "pids.max", &l.pids_max.to_string())?;
                    }
                }
                CgroupVersion::V1 => {
                    if has("cpu") {
                        if let Some(parent) = d.parent() {
                            let q: i64 = read_file(parent, "cpu.cfs_quota_us")?.parse().unwrap_or(-1);
                            let p: u64 = read_file(parent, "cpu.cfs_period_us")?.parse().unwrap_or(CPU_PERIOD_US);
                            if q > 0 && p > 0 {
                                let max = q as u64 * l.cpu_period_us / p;
                                if max < l.cpu_quota_us {
                                    debug!(
                                        "pod {}: CPU quota {} µs lowered to the parent's {max} µs",
                                        self.pod_id, l.cpu_quota_us
                                    );
                                    l.cpu_quota_us = max;
                                }
                            }
                        }
                        write_file(d, "cpu.cfs_period_us", &l.cpu_period_us.to_string())?;
                        write_file(d, "cpu.cfs_quota_us", &l.cpu_quota_us.to_string())?;
                    }
                    if has("memory") {
                        write_file(d, "memory.limit_in_bytes", mem.as_deref().unwrap_or("-1"))?;
                    }
                    if has("pids") {
                        write_file(d, "pids.max", &l.pids_max.to_string())?;
                    }
                }
            }
        }
        Ok(l)
    }

    /// Removes the cgroup once its processes have left (waits up to
    /// [`REMOVE_TIMEOUT`]; kills nothing). Tries every hierarchy; the first
    /// error (naming the path) is returned. A cgroup already gone is fine.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut first = None;
        for (d, _) in &self.dirs {
            if let Err(e) = remove_cgroup_dir(d, REMOVE_TIMEOUT) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Kills every process in the cgroup directories (`cgroup.kill` on v2 when
/// there is one, else SIGKILL to each pid listed).
fn kill_members(dirs: &[PathBuf]) {
    for d in dirs {
        let kill_file = d.join("cgroup.kill");
        if kill_file.exists() && fs::write(&kill_file, "1").is_ok() {
            continue;
        }
        for pid in procs(d).unwrap_or_default() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// For the shim's `delete` command, once the pod's shim is known to be dead
/// (never while it runs: this kills): removes pod `pod_id`'s host cgroup,
/// wherever it is (`<parent>/pod-<id>`, a pool entry claimed for it, or
/// `k8s_path`, the sandbox's `linux.cgroupsPath`, if given), killing any
/// process still in it first. Returns what was done, for the log; nothing
/// found is not an error.
pub fn cleanup_pod_cgroup(parent: &str, pod_id: &str, k8s_path: Option<&str>) -> Result<Vec<String>, CgroupError> {
    hull_agent_api::validate::check_id("pod id", pod_id).map_err(CgroupError)?;
    let parent = check_relative("cgroup parent", parent)?;
    let (_, hierarchies) = find_hierarchies()?;
    let mut names: Vec<PathBuf> = vec![parent.join(format!("{POD_PREFIX}{pod_id}"))];
    if let Some(k8s) = k8s_path {
        names.push(parse_k8s_cgroups_path(k8s)?);
    }
    // Pool entries claimed for this pod (cgroup v2).
    if let Ok(rd) = fs::read_dir(hierarchies[0].mount.join(&parent)) {
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if name.starts_with(POOL_PREFIX)
                && get_xattr(&ent.path(), CLAIM_XATTR).ok().flatten().as_deref() == Some(pod_id)
            {
                names.push(parent.join(name));
            }
        }
    }
    let mut done = Vec::new();
    let mut first = None;
    for rel in names {
        let dirs: Vec<PathBuf> = hierarchies.iter().map(|h| h.mount.join(&rel)).filter(|d| d.is_dir()).collect();
        if dirs.is_empty() {
            continue;
        }
        if dirs.iter().any(|d| !procs(d).unwrap_or_default().is_empty()) {
            kill_members(&dirs);
            done.push(format!("killed the processes left in cgroup {}", rel.display()));
        }
        for d in &dirs {
            match remove_cgroup_dir(d, REMOVE_TIMEOUT) {
                Ok(()) => done.push(format!("removed cgroup {}", d.display())),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(done),
    }
}

#[cfg(test)]
mod tests {
    //! The scenarios need root and a writable cgroup file system. Natively
    //! (this project's hosts: cgroup v1) each runs as its own test; in the
    //! lab (cgroup v2) `lab_cgroup_v2` runs them all, started by
    //! tests/tests/host_cgroups.rs.
    use super::*;
    use std::collections::HashSet;
    use std::os::unix::process::CommandExt;
    use std::process::{Child, Command, Stdio};
    use std::sync::Barrier;

    /// A test's cgroup tree (relative to every hierarchy's root), removed
    /// from every hierarchy on drop, processes in it killed first.
    struct Tree(PathBuf);

    impl Drop for Tree {
        fn drop(&mut self) {
            if let Ok((_, hs)) = find_hierarchies() {
                for h in hs {
                    remove_tree(&h.mount.join(&self.0));
                }
            }
        }
    }

    fn remove_tree(dir: &Path) {
        if !dir.is_dir() {
            return;
        }
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path());
                }
            }
        }
        kill_members(&[dir.to_path_buf()]);
        let _ = remove_cgroup_dir(dir, Duration::from_secs(3));
    }

    /// A unique test parent name and its guard.
    fn test_parent(tag: &str) -> (String, Tree) {
        let name = format!("hull-test-{}-{tag}", std::process::id());
        let tree = Tree(PathBuf::from(&name));
        (name, tree)
    }

    /// A child process killed and reaped on drop.
    struct Proc(Child);

    impl Drop for Proc {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sleeper() -> Proc {
        Proc(Command::new("sleep").arg("60").stdin(Stdio::null()).spawn().expect("spawn sleep"))
    }

    /// The cgroup of `pid` in the hierarchy mounted at `mount`, as a path
    /// below the hierarchy's root (from /proc/<pid>/cgroup).
    fn cgroup_of(pid: u32, cg: &PodCgroup, i: usize) -> PathBuf {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let ctrl = &cg.dirs[i].1[0];
        for line in text.lines() {
            let mut f = line.splitn(3, ':');
            let (_, ctrls, path) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
            let hit = match cg.version {
                CgroupVersion::V2 => ctrls.is_empty(),
                CgroupVersion::V1 => ctrls.split(',').any(|c| c == ctrl),
            };
            if hit {
                return PathBuf::from(path.trim_start_matches('/'));
            }
        }
        panic!("no {ctrl} cgroup for {pid} in {text}");
    }

    fn below_root(cg: &PodCgroup, i: usize) -> PathBuf {
        let (_, hs) = find_hierarchies().unwrap();
        let h = hs.iter().find(|h| cg.dirs[i].0.starts_with(&h.mount)).unwrap();
        cg.dirs[i].0.strip_prefix(&h.mount).unwrap().to_path_buf()
    }

    fn wait_refilled(hc: &HostCgroups) {
        let t = Instant::now();
        while hc.refilling() {
            assert!(t.elapsed() < Duration::from_secs(20), "refill did not finish");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn pool_take_refill_remove() {
        let (parent, _tree) = test_parent("pool");
        let hc = HostCgroups::detect(&parent, 3).unwrap();
        for d in hc.parent_dirs() {
            assert!(d.is_dir(), "{}", d.display());
        }
        assert!(hc.free_entries().unwrap().is_empty());
        assert_eq!(hc.refill().unwrap(), 3);
        let before = hc.free_entries().unwrap();
        assert_eq!(before.len(), 3);
        for name in &before {
            for d in hc.parent_dirs() {
                assert!(d.join(name).is_dir(), "pool entry {name} missing in {}", d.display());
            }
        }

        let cg = hc.take("sb1", None).unwrap();
        assert_eq!(cg.origin(), Origin::Pool);
        let after = hc.free_entries().unwrap();
        assert_eq!(after.len(), 2);
        let taken: Vec<&String> = before.iter().filter(|n| !after.contains(n)).collect();
        assert_eq!(taken.len(), 1);
        match cg.version() {
            CgroupVersion::V1 => {
                // Renamed: the pool entry is gone, the pod's cgroup is there, in every hierarchy.
                for (i, d) in hc.parent_dirs().iter().enumerate() {
                    assert!(!d.join(taken[0]).exists(), "{} still in {}", taken[0], d.display());
                    assert_eq!(cg.paths()[i], d.join("pod-sb1"));
                    assert!(cg.paths()[i].is_dir());
                }
            }
            CgroupVersion::V2 => {
                // Claimed in place: marked with the pod id.
                assert_eq!(cg.paths()[0], hc.parent_dirs()[0].join(taken[0]));
                assert_eq!(get_xattr(&cg.paths()[0], CLAIM_XATTR).unwrap().as_deref(), Some("sb1"));
                for c in ["cpu.max", "memory.max", "pids.max"] {
                    assert!(cg.paths()[0].join(c).exists(), "{c} missing: controllers not delegated");
                }
            }
        }

        hc.refill_in_background();
        wait_refilled(&hc);
        assert_eq!(hc.free_entries().unwrap().len(), 3, "refill did not bring the pool back");

        cg.remove().unwrap();
        for p in cg.paths() {
            assert!(!p.exists(), "{} left behind", p.display());
        }
        cg.remove().unwrap(); // gone already: fine

        // An empty pool: made on the spot.
        let (parent2, _tree2) = test_parent("nopool");
        let hc2 = HostCgroups::detect(&parent2, 0).unwrap();
        let cg2 = hc2.take("sb2", None).unwrap();
        assert_eq!(cg2.origin(), Origin::Made);
        assert_eq!(cg2.paths()[0], hc2.parent_dirs()[0].join("pod-sb2"));
        assert!(cg2.paths().iter().all(|p| p.is_dir()));
        // A second take for the same pod reuses it.
        assert_eq!(hc2.take("sb2", None).unwrap().origin(), Origin::Existing);
        cg2.remove().unwrap();
        assert!(hc2.take("../x", None).unwrap_err().to_string().contains("pod id"));
    }

    fn processes_join_and_leave() {
        let (parent, _tree) = test_parent("procs");
        let hc = HostCgroups::detect(&parent, 1).unwrap();
        hc.refill().unwrap();
        let cg = hc.take("sb1", None).unwrap();

        let a = sleeper();
        cg.add_pid(a.0.id()).unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("60").stdin(Stdio::null());
        // SAFETY: the hook only calls write(2).
        unsafe { cmd.pre_exec(cg.join_before_exec().unwrap()) };
        let b = Proc(cmd.spawn().unwrap());
        for p in [&a, &b] {
            for i in 0..cg.paths().len() {
                assert_eq!(cgroup_of(p.0.id(), &cg, i), below_root(&cg, i), "pid {} hierarchy {i}", p.0.id());
            }
        }
        let mut pids = cg.pids().unwrap();
        pids.sort();
        let mut want = vec![a.0.id(), b.0.id()];
        want.sort();
        assert_eq!(pids, want);

        // Busy: not removed, and the error names the path.
        let e = remove_cgroup_dir(&cg.paths()[0], Duration::from_millis(200)).unwrap_err();
        assert!(e.to_string().contains(&*cg.paths()[0].to_string_lossy()), "{e}");
        assert!(cg.paths()[0].is_dir());
        drop(a);
        drop(b);
        cg.remove().unwrap();
        assert!(cg.paths().iter().all(|p| !p.exists()));
    }

    fn limits_written() {
        let (parent, _tree) = test_parent("limits");
        let hc = HostCgroups::detect(&parent, 1).unwrap();
        hc.refill().unwrap();
        let cg = hc.take("sb1", None).unwrap();
        let guest = 512u64 << 20;
        let l = cg.set_limits(2, Some(guest)).unwrap();
        let mem = guest + (64 << 20) + guest / 64;
        assert_eq!(l, Limits { cpu_quota_us: 225_000, cpu_period_us: 100_000, memory_bytes: Some(mem), pids_max: 258 });
        let file = |c: &str, f: &str| {
            let (d, _) = cg.dirs.iter().find(|(_, cs)| cs.iter().any(|x| x == c)).unwrap();
            read_file(d, f).unwrap()
        };
        match cg.version() {
            CgroupVersion::V2 => {
                assert_eq!(file("cpu", "cpu.max"), "225000 100000");
                assert_eq!(file("memory", "memory.max"), mem.to_string());
                assert_eq!(file("pids", "pids.max"), "258");
            }
            CgroupVersion::V1 => {
                assert_eq!(file("cpu", "cpu.cfs_quota_us"), "225000");
                assert_eq!(file("cpu", "cpu.cfs_period_us"), "100000");
                assert_eq!(file("memory", "memory.limit_in_bytes"), mem.to_string());
                assert_eq!(file("pids", "pids.max"), "258");
            }
        }
        // No memory limit.
        let l = cg.set_limits(1, None).unwrap();
        assert_eq!(l.memory_bytes, None);
        match cg.version() {
            CgroupVersion::V2 => assert_eq!(file("memory", "memory.max"), "max"),
            CgroupVersion::V1 => assert!(file("memory", "memory.limit_in_bytes").parse::<u64>().unwrap() > 1 << 60),
        }
        assert_eq!(file("pids", "pids.max"), "257");
        cg.remove().unwrap();
    }

    /// 8 takers at once: 8 distinct cgroups, each pool entry to exactly one.
    /// Once as 8 separate shims (each its own HostCgroups: the claims race
    /// in the kernel), once as 8 threads sharing one.
    fn concurrent_takes() {
        for shared in [false, true] {
            let (parent, _tree) = test_parent(if shared { "conc-shared" } else { "conc" });
            let hc = HostCgroups::detect(&parent, 4).unwrap();
            assert_eq!(hc.refill().unwrap(), 4);
            let barrier = Arc::new(Barrier::new(8));
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    let (barrier, parent, hc) = (barrier.clone(), parent.clone(), hc.clone());
                    std::thread::spawn(move || {
                        let hc = if shared { hc } else { HostCgroups::detect(&parent, 4).unwrap() };
                        barrier.wait();
                        hc.take(&format!("c{i}"), None).unwrap()
                    })
                })
                .collect();
            let cgs: Vec<PodCgroup> = threads.into_iter().map(|t| t.join().unwrap()).collect();
            let paths: HashSet<PathBuf> = cgs.iter().flat_map(|c| c.paths()).collect();
            assert_eq!(paths.len(), 8 * hc.parent_dirs().len(), "shared={shared}");
            assert!(paths.iter().all(|p| p.is_dir()));
            assert_eq!(cgs.iter().filter(|c| c.origin() == Origin::Pool).count(), 4, "shared={shared}");
            assert!(hc.free_entries().unwrap().is_empty());
            if cgs[0].version() == CgroupVersion::V2 {
                for c in &cgs {
                    if c.origin() == Origin::Pool {
                        assert_eq!(get_xattr(&c.paths()[0], CLAIM_XATTR).unwrap().as_deref(), Some(c.pod_id()));
                    }
                }
            }
            for c in &cgs {
                c.remove().unwrap();
            }
            assert!(paths.iter().all(|p| !p.exists()));
        }
    }

    /// 50 pods start at once, as 50 shims would: each finds the hierarchy,
    /// takes a cgroup, starts a refill, writes limits and adds a process.
    fn fifty_pods_at_once() {
        let (parent, _tree) = test_parent("fifty");
        HostCgroups::detect(&parent, 8).unwrap().refill().unwrap();
        let barrier = Arc::new(Barrier::new(50));
        let threads: Vec<_> = (0..50)
            .map(|i| {
                let (barrier, parent) = (barrier.clone(), parent.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let hc = HostCgroups::detect(&parent, 8).unwrap();
                    let cg = hc.take(&format!("pod{i}"), None).unwrap();
                    hc.refill_in_background();
                    cg.set_limits(1, Some(128 << 20)).unwrap();
                    let p = sleeper();
                    cg.add_pid(p.0.id()).unwrap();
                    assert_eq!(cg.pids().unwrap(), vec![p.0.id()]);
                    wait_refilled(&hc);
                    (cg, p)
                })
            })
            .collect();
        let pods: Vec<(PodCgroup, Proc)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let paths: HashSet<PathBuf> = pods.iter().flat_map(|(c, _)| c.paths()).collect();
        assert_eq!(paths.len(), 50 * pods[0].0.paths().len());
        assert!(pods.iter().filter(|(c, _)| c.origin() == Origin::Pool).count() >= 8);
        for (cg, p) in pods {
            drop(p);
            cg.remove().unwrap();
        }
        assert!(paths.iter().all(|p| !p.exists()));
    }

    fn k8s_parent_honoured() {
        let pid = std::process::id();
        // cgroupfs style.
        let root = format!("hull-test-{pid}-k8s");
        let _tree = Tree(PathBuf::from(&root));
        let (parent, _ptree) = test_parent("k8s-hull");
        let hc = HostCgroups::detect(&parent, 2).unwrap();
        hc.refill().unwrap();
        let cg = hc.take("sb1", Some(&format!("/{root}/kubepods/besteffort/pod123/sb1"))).unwrap();
        assert_eq!(cg.origin(), Origin::Made);
        assert_eq!(hc.free_entries().unwrap().len(), 2, "a pool entry was used for a Kubernetes pod");
        for (i, p) in cg.paths().iter().enumerate() {
            assert!(p.ends_with(format!("{root}/kubepods/besteffort/pod123/sb1")), "{}", p.display());
            assert!(p.is_dir());
            assert_eq!(below_root(&cg, i), PathBuf::from(format!("{root}/kubepods/besteffort/pod123/sb1")));
        }
        let p = sleeper();
        cg.add_pid(p.0.id()).unwrap();
        cg.set_limits(1, Some(256 << 20)).unwrap();
        drop(p);
        cg.remove().unwrap();
        for p in cg.paths() {
            assert!(!p.exists());
            assert!(p.parent().unwrap().is_dir(), "Kubernetes' pod cgroup must stay");
        }

        // systemd style.
        let slice = format!("hulltest{pid}k8s");
        let _stree = Tree(PathBuf::from(format!("{slice}.slice")));
        let cg = hc.take("sb2", Some(&format!("{slice}-besteffort-pod123.slice:cri-containerd:sb2"))).unwrap();
        let want =
            format!("{slice}.slice/{slice}-besteffort.slice/{slice}-besteffort-pod123.slice/cri-containerd-sb2.scope");
        for i in 0..cg.paths().len() {
            assert_eq!(below_root(&cg, i), PathBuf::from(&want));
            assert!(cg.paths()[i].is_dir());
        }
        cg.remove().unwrap();
        assert!(cg.paths().iter().all(|p| !p.exists()));

        // Tricks are refused, and nothing is made.
        let e = hc.take("sb3", Some(&format!("/{root}/../../etc"))).unwrap_err().to_string();
        assert!(e.contains("'..'") && e.contains("Kubernetes cgroup path"), "{e}");
        let e = hc.take("sb3", Some("../x.slice:cri-containerd:sb3")).unwrap_err().to_string();
        assert!(e.contains("Kubernetes cgroup path"), "{e}");
    }

    fn cleanup_after_a_dead_shim() {
        let (parent, _tree) = test_parent("cleanup");
        let hc = HostCgroups::detect(&parent, 2).unwrap();
        hc.refill().unwrap();
        let cg = hc.take("sb1", None).unwrap();
        assert_eq!(cg.origin(), Origin::Pool);
        let mut p = sleeper();
        cg.add_pid(p.0.id()).unwrap();
        // The shim is gone; its delete command cleans up.
        let done = cleanup_pod_cgroup(&parent, "sb1", None).unwrap();
        assert!(done.iter().any(|d| d.starts_with("killed")), "{done:?}");
        assert!(p.0.wait().unwrap().code().is_none(), "sleep was not killed");
        assert!(cg.paths().iter().all(|p| !p.exists()), "{done:?}");
        assert_eq!(hc.free_entries().unwrap().len(), 1, "a free pool entry was removed");
        assert!(cleanup_pod_cgroup(&parent, "sb1", None).unwrap().is_empty());

        // With a Kubernetes path.
        let root = format!("hull-test-{}-k8s-cleanup", std::process::id());
        let _ktree = Tree(PathBuf::from(&root));
        let k8s = format!("/{root}/kubepods/pod1/sb2");
        let cg = hc.take("sb2", Some(&k8s)).unwrap();
        let done = cleanup_pod_cgroup(&parent, "sb2", Some(&k8s)).unwrap();
        assert_eq!(done.len(), cg.paths().len(), "{done:?}");
        assert!(cg.paths().iter().all(|p| !p.exists()));
        assert!(cleanup_pod_cgroup(&parent, "../sb2", None).unwrap_err().to_string().contains("pod id"));
    }

    #[test]
    fn pool_take_rename_refill_and_remove() {
        pool_take_refill_remove();
    }

    #[test]
    fn add_pid_and_join_before_exec() {
        processes_join_and_leave();
    }

    #[test]
    fn limits_are_written() {
        limits_written();
    }

    #[test]
    fn eight_concurrent_takes() {
        concurrent_takes();
    }

    #[test]
    fn fifty_concurrent_pods() {
        fifty_pods_at_once();
    }

    #[test]
    fn kubernetes_parent() {
        k8s_parent_honoured();
    }

    #[test]
    fn cleanup_pod() {
        cleanup_after_a_dead_shim();
    }

    /// cgroup v2, run in the lab by tests/tests/host_cgroups.rs (this kind of
    /// host is cgroup v1): every scenario above.
    #[test]
    #[ignore]
    fn lab_cgroup_v2() {
        let (v, _) = find_hierarchies().unwrap();
        assert_eq!(v, CgroupVersion::V2, "needs cgroup v2 at {CGROUP_ROOT} (the lab)");
        pool_take_refill_remove();
        processes_join_and_leave();
        limits_written();
        concurrent_takes();
        fifty_pods_at_once();
        k8s_parent_honoured();
        cleanup_after_a_dead_shim();
        // Nothing of ours left at the root.
        let left: Vec<String> = fs::read_dir(CGROUP_ROOT)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("hull-test-") || n.starts_with("hulltest"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn k8s_paths() {
        let p = |s: &str| parse_k8s_cgroups_path(s).map(|p| p.to_string_lossy().into_owned());
        assert_eq!(p("/kubepods/besteffort/pod12-34/abc").unwrap(), "kubepods/besteffort/pod12-34/abc");
        assert_eq!(p("kubepods//burstable/podX/sb").unwrap(), "kubepods/burstable/podX/sb");
        assert_eq!(
            p("kubepods-besteffort-pod12_34.slice:cri-containerd:abc").unwrap(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12_34.slice/cri-containerd-abc.scope"
        );
        assert_eq!(p("kubepods.slice:cri-containerd:abc").unwrap(), "kubepods.slice/cri-containerd-abc.scope");
        assert_eq!(p("-.slice:docker:abc").unwrap(), "docker-abc.scope");
        assert_eq!(p(":cri-containerd:abc").unwrap(), "system.slice/cri-containerd-abc.scope");
        for bad in [
            "",
            "/",
            "/kubepods/../../etc",
            "/kubepods/./x",
            "..",
            "a\nb",
            "../x.slice:cri-containerd:abc",
            "kubepods.slice:cri-containerd:../abc",
            "kubepods.slice:cri/containerd:abc",
            "kubepods:cri-containerd:abc",
            "kubepods--x.slice:cri-containerd:abc",
            "kubepods.slice:abc",
            "a.slice:b:c:d",
        ] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.starts_with("Kubernetes cgroup path"), "{bad:?}: {e}");
        }
        assert!(p("/kubepods/../x").unwrap_err().to_string().contains("'..'"));
    }

    #[test]
    fn v1_mounts() {
        let info = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
33 31 0:30 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids
34 31 0:31 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
35 31 0:32 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset
36 31 0:33 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
37 31 0:34 / /mnt/my\\040cg rw - cgroup cgroup rw,memory
";
        let hs = parse_v1_mounts(info).unwrap();
        let got: Vec<(String, Vec<String>)> =
            hs.iter().map(|h| (h.mount.to_string_lossy().into_owned(), h.controllers.clone())).collect();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            got,
            vec![
                ("/sys/fs/cgroup/memory".to_string(), s(&["memory"])),
                ("/sys/fs/cgroup/cpu,cpuacct".to_string(), s(&["cpu", "cpuacct"])),
                ("/sys/fs/cgroup/pids".to_string(), s(&["pids"])),
            ]
        );
        assert_eq!(unescape("/mnt/my\\040cg"), "/mnt/my cg");
        let e = parse_v1_mounts("33 31 0:30 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n").unwrap_err();
        assert!(e.to_string().contains("no hierarchy with the cpu controller"), "{e}");
    }

    #[test]
    fn vm_limits() {
        let l = Limits::for_vm(0, Some(100));
        assert_eq!(l.cpu_quota_us, 125_000);
        assert_eq!(l.memory_bytes.unwrap() % 4096, 0);
        assert!(l.memory_bytes.unwrap() >= 100 + MEM_OVERHEAD_BYTES);
        assert_eq!(Limits::for_vm(4, None).pids_max, 260);
    }
}
