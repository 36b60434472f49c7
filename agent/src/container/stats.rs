//! Container statistics from the cgroup v2 interface files, and the OOM
//! monitor (memory.events `oom_kill`, watched with inotify).

use crate::backend::Stats;
use std::collections::{HashMap, VecDeque};
use std::ffi::CString;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Reads the statistics of the cgroup at `p`. Missing files (a controller
/// not enabled) read as zero.
pub fn read_stats(p: &Path) -> Stats {
    let cpu = keyed(p, "cpu.stat");
    let mem = keyed(p, "memory.stat");
    let events = keyed(p, "memory.events");
    let (io_read_bytes, io_write_bytes) = io_bytes(&fs::read_to_string(p.join("io.stat")).unwrap_or_default());
    Stats {
        cpu_usage_usec: get(&cpu, "usage_usec"),
        cpu_user_usec: get(&cpu, "user_usec"),
        cpu_system_usec: get(&cpu, "system_usec"),
        cpu_nr_throttled: get(&cpu, "nr_throttled"),
        cpu_throttled_usec: get(&cpu, "throttled_usec"),
        memory_current: single(p, "memory.current"),
        memory_max: single(p, "memory.max"),
        memory_anon: get(&mem, "anon"),
        memory_file: get(&mem, "file"),
        memory_oom_kills: get(&events, "oom_kill"),
        pids_current: single(p, "pids.current"),
        pids_max: single(p, "pids.max"),
        io_read_bytes,
        io_write_bytes,
    }
}

/// `key value` lines (cpu.stat, memory.stat, memory.events).
pub fn parse_keyed(s: &str) -> HashMap<String, u64> {
    s.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            Some((it.next()?.to_string(), it.next()?.parse().ok()?))
        })
        .collect()
}

/// A one-value file; "max" (no limit) reads as 0.
pub fn parse_single(s: &str) -> u64 {
    match s.trim() {
        "max" => 0,
        v => v.parse().unwrap_or(0),
    }
}

/// Sums rbytes/wbytes over the devices of io.stat.
pub fn io_bytes(s: &str) -> (u64, u64) {
    let (mut r, mut w) = (0u64, 0u64);
    for l in s.lines() {
        for f in l.split_whitespace().skip(1) {
            if let Some(v) = f.strip_prefix("rbytes=") {
                r = r.saturating_add(v.parse().unwrap_or(0));
            } else if let Some(v) = f.strip_prefix("wbytes=") {
                w = w.saturating_add(v.parse().unwrap_or(0));
            }
        }
    }
    (r, w)
}

fn keyed(p: &Path, f: &str) -> HashMap<String, u64> {
    parse_keyed(&fs::read_to_string(p.join(f)).unwrap_or_default())
}

fn single(p: &Path, f: &str) -> u64 {
    parse_single(&fs::read_to_string(p.join(f)).unwrap_or_default())
}

fn get(m: &HashMap<String, u64>, k: &str) -> u64 {
    m.get(k).copied().unwrap_or(0)
}

pub fn oom_kills(cgroup: &Path) -> u64 {
    get(&keyed(cgroup, "memory.events"), "oom_kill")
}

/// Queues the id of a container each time its `oom_kill` count grows.
pub struct OomMonitor {
    inner: Arc<OomInner>,
}

struct OomInner {
    ifd: Option<OwnedFd>,
    state: Mutex<OomState>,
    cv: Condvar,
}

#[derive(Default)]
struct OomState {
    watched: HashMap<String, Watched>,
    queue: VecDeque<String>,
}

struct Watched {
    cgroup: PathBuf,
    last: u64,
    wd: i32,
}

/// Events nobody asked for are dropped beyond this many.
const MAX_QUEUED: usize = 1024;

impl OomMonitor {
    pub fn new() -> OomMonitor {
        // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        // SAFETY: see above.
        let ifd = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) });
        let inner = Arc::new(OomInner { ifd, state: Mutex::new(OomState::default()), cv: Condvar::new() });
        let weak = Arc::downgrade(&inner);
        let _ = std::thread::Builder::new().name("hull-oom".into()).spawn(move || loop {
            let Some(inner) = weak.upgrade() else { return };
            inner.wait_for_change();
            inner.scan();
        });
        OomMonitor { inner }
    }

    pub fn add(&self, id: &str, cgroup: &Path) {
        let events = cgroup.join("memory.events");
        let wd = match (&self.inner.ifd, CString::new(events.as_os_str().as_bytes())) {
            // SAFETY: valid descriptor and NUL-terminated path.
            (Some(fd), Ok(c)) => unsafe { libc::inotify_add_watch(fd.as_raw_fd(), c.as_ptr(), libc::IN_MODIFY) },
            _ => -1,
        };
        let last = oom_kills(cgroup);
        lock(&self.inner.state).watched.insert(id.to_string(), Watched { cgroup: cgroup.to_path_buf(), last, wd });
    }

    pub fn remove(&self, id: &str) {
        let w = lock(&self.inner.state).watched.remove(id);
        if let (Some(w), Some(fd)) = (w, &self.inner.ifd) {
            if w.wd >= 0 {
                // SAFETY: valid descriptor; a stale wd only yields EINVAL.
                unsafe { libc::inotify_rm_watch(fd.as_raw_fd(), w.wd) };
            }
        }
    }

    /// Blocks until a watched container is OOM-killed; returns its id.
    pub fn next(&self) -> String {
        let mut st = lock(&self.inner.state);
        loop {
            if let Some(id) = st.queue.pop_front() {
                return id;
            }
            st = self.inner.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Default for OomMonitor {
    fn default() -> Self {
        Self::new()
    }
}

impl OomInner {
    /// Returns when memory.events of some container may have changed (or
    /// after a second: a safety net should inotify be unavailable).
    fn wait_for_change(&self) {
        let fd = self.ifd.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
        let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd (fd -1 is ignored by poll).
        unsafe { libc::poll(&mut p, 1, 1000) };
        if fd >= 0 {
            let mut buf = [0u8; 4096];
            // SAFETY: reading into a local buffer from our nonblocking descriptor.
            while unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        }
    }

    fn scan(&self) {
        let mut st = lock(&self.state);
        let mut hits = Vec::new();
        for (id, w) in st.watched.iter_mut() {
            let n = oom_kills(&w.cgroup);
            if n > w.last {
                w.last = n;
                hits.push(id.clone());
            }
        }
        for id in hits {
            if st.queue.len() >= MAX_QUEUED {
                st.queue.pop_front();
            }
            st.queue.push_back(id);
        }
        if !st.queue.is_empty() {
            self.cv.notify_all();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
