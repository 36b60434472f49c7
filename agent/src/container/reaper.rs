//! The one reaper of the agent.
//!
//! The agent is PID 1, so every orphan of the guest ends up as its child and
//! must be reaped. A blanket `waitpid(-1)` loop would also steal the statuses
//! libcontainer waits for (its intermediate process, hook processes), so
//! reaping is tied to a lock: libcontainer calls run while holding it
//! ([`Reaper::hold`]), and the reaper takes it around its `waitpid(-1,
//! WNOHANG)` loops. Other agent code that spawns and waits for a child
//! (`std::process::Command`) must hold it too: [`hold_reaper`].
//!
//! Container processes (init and exec'd) are created by libcontainer with
//! `CLONE_PARENT` and exit signal 0: they are our children but their exit
//! raises no SIGCHLD. The reaper therefore polls a pidfd per known process
//! (readable once the process has exited), plus a self-pipe written by a
//! SIGCHLD handler (orphans re-parented to us do raise SIGCHLD), with a long
//! safety timeout. Statuses of known pids are recorded in their
//! [`ExitCell`]; unknown ones are dropped.

use crate::backend::ExitInfo;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where a process's exit status lands; `wait` blocks on it.
#[derive(Debug)]
pub struct ExitCell {
    pub pid: u32,
    pidfd: Option<OwnedFd>,
    exit: Mutex<Option<ExitInfo>>,
    cv: Condvar,
}

impl ExitCell {
    fn new(pid: u32) -> ExitCell {
        ExitCell { pid, pidfd: pidfd_open(pid), exit: Mutex::new(None), cv: Condvar::new() }
    }

    pub fn get(&self) -> Option<ExitInfo> {
        *lock(&self.exit)
    }

    pub fn wait(&self) -> ExitInfo {
        let mut g = lock(&self.exit);
        loop {
            if let Some(e) = *g {
                return e;
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitInfo> {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.exit);
        loop {
            if let Some(e) = *g {
                return Some(e);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            g = self.cv.wait_timeout(g, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Sends `sig` through the pidfd (no pid-reuse race); ESRCH once the
    /// process has exited.
    pub fn signal(&self, sig: i32) -> Result<(), Errno> {
        if self.get().is_some() {
            return Err(Errno::ESRCH);
        }
        match &self.pidfd {
            Some(fd) => {
                // SAFETY: plain syscall on a descriptor we own; null siginfo is allowed.
                let r = unsafe {
                    libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), sig, std::ptr::null::<u8>(), 0)
                };
                if r < 0 {
                    Err(Errno::last())
                } else {
                    Ok(())
                }
            }
            None => nix::sys::signal::kill(
                Pid::from_raw(self.pid as i32),
                nix::sys::signal::Signal::try_from(sig).map_err(|_| Errno::EINVAL)?,
            ),
        }
    }

    fn set(&self, e: ExitInfo) {
        let mut g = lock(&self.exit);
        if g.is_none() {
            *g = Some(e);
        }
        self.cv.notify_all();
    }
}

pub struct Reaper {
    lc: Mutex<()>,
    watched: Mutex<HashMap<i32, Arc<ExitCell>>>,
    wake_w: Option<OwnedFd>,
}

/// Proof that the reaper lock is held: no `waitpid(-1)` runs meanwhile.
pub struct ReapGuard<'a> {
    _g: MutexGuard<'a, ()>,
}

static REAPER: OnceLock<Reaper> = OnceLock::new();
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);

/// The process-wide reaper, started on first use.
pub fn reaper() -> &'static Reaper {
    REAPER.get_or_init(Reaper::start)
}

/// Holds off the reaper (for code that spawns a child and waits for it
/// itself, e.g. `std::process::Command::output`). Keep it short: orphans
/// and container exits are not reaped while it is held.
#[allow(dead_code)]
pub fn hold_reaper() -> ReapGuard<'static> {
    reaper().hold()
}

extern "C" fn on_sigchld(_: libc::c_int) {
    // Async-signal-safe: write(2) only, errno preserved.
    // SAFETY: __errno_location is the calling thread's errno; write on a nonblocking pipe.
    unsafe {
        let saved = *libc::__errno_location();
        let fd = WAKE_FD.load(Ordering::Relaxed);
        if fd >= 0 {
            libc::write(fd, b"c".as_ptr().cast(), 1);
        }
        *libc::__errno_location() = saved;
    }
}

impl Reaper {
    fn start() -> Reaper {
        let (r, w) = match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK) {
            Ok((r, w)) => (Some(r), Some(w)),
            Err(e) => {
                // Without the pipe the reaper still works, on its timeout.
                eprintln!("hull-agent: reaper pipe: {e}");
                (None, None)
            }
        };
        WAKE_FD.store(w.as_ref().map(|w| w.as_raw_fd()).unwrap_or(-1), Ordering::Relaxed);
        // SAFETY: installing a handler that only calls async-signal-safe functions.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigchld as *const () as usize;
            sa.sa_flags = libc::SA_RESTART | libc::SA_NOCLDSTOP;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGCHLD, &sa, std::ptr::null_mut());
        }
        if std::process::id() != 1 {
            // Not PID 1 (tests): become the subreaper so orphans of containers
            // without their own PID namespace come to us as they would in the guest.
            // SAFETY: prctl with integer arguments.
            unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        }
        let reaper = Reaper { lc: Mutex::new(()), watched: Mutex::new(HashMap::new()), wake_w: w };
        let spawned = std::thread::Builder::new().name("hull-reaper".into()).spawn(move || {
            // Runs forever: REAPER is a static, so this reference stays valid.
            let me = reaper_after_init();
            me.run(r)
        });
        if let Err(e) = spawned {
            eprintln!("hull-agent: cannot start the reaper thread: {e}");
        }
        reaper
    }

    /// Holds off reaping while libcontainer forks and waits for its helpers.
    pub fn hold(&self) -> ReapGuard<'_> {
        ReapGuard { _g: lock(&self.lc) }
    }

    /// Starts tracking `pid`; must be called before the guard that covered
    /// its creation is dropped, so its status cannot be reaped unrecorded.
    pub fn watch(&self, _held: &ReapGuard<'_>, pid: u32) -> Arc<ExitCell> {
        let cell = Arc::new(ExitCell::new(pid));
        lock(&self.watched).insert(pid as i32, cell.clone());
        self.wake();
        cell
    }

    fn wake(&self) {
        if let Some(w) = &self.wake_w {
            let _ = nix::unistd::write(w, b"w");
        }
    }

    fn run(&self, wake_r: Option<OwnedFd>) {
        let mut buf = [0u8; 64];
        loop {
            let (raw, any_without_fd): (Vec<(i32, RawFd)>, bool) = {
                let w = lock(&self.watched);
                let raw = w.iter().filter_map(|(p, c)| c.pidfd.as_ref().map(|fd| (*p, fd.as_raw_fd()))).collect();
                (raw, w.values().any(|c| c.pidfd.is_none()))
            };
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(raw.len() + 1);
            let wake_fd = wake_r.as_ref().map(|r| r.as_raw_fd()).unwrap_or(-1);
            fds.push(libc::pollfd { fd: wake_fd, events: libc::POLLIN, revents: 0 });
            fds.extend(raw.iter().map(|(_, fd)| libc::pollfd { fd: *fd, events: libc::POLLIN, revents: 0 }));
            let timeout = if any_without_fd || wake_r.is_none() { 50 } else { 5000 };
            // SAFETY: fds is a valid array of pollfd for the duration of the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            while wake_fd >= 0 && nix::unistd::read(wake_fd, &mut buf).map(|n| n > 0).unwrap_or(false) {}
            let exited: Vec<i32> = raw
                .iter()
                .zip(&fds[1..])
                .filter(|(_, p)| p.revents & libc::POLLIN != 0)
                .map(|((pid, _), _)| *pid)
                .collect();

            let _g = lock(&self.lc);
            self.reap_all();
            // A watched process that exited but was not our child cannot be
            // reaped by us: stop waiting for it (status unknown).
            for pid in exited {
                let still = lock(&self.watched).contains_key(&pid);
                if still
                    && waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL))
                        == Err(Errno::ECHILD)
                {
                    self.record(pid, 255);
                }
            }
        }
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::Exited(pid, code)) => self.record(pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => self.record(pid.as_raw(), 128 + sig as i32),
                Ok(WaitStatus::StillAlive) => break,
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
    }

    fn record(&self, pid: i32, status: i32) {
        if let Some(cell) = lock(&self.watched).remove(&pid) {
            cell.set(ExitInfo { status, exited_at_unix_nanos: now_nanos() });
        }
    }
}

fn reaper_after_init() -> &'static Reaper {
    // The thread is spawned from inside get_or_init; wait until the value is set.
    loop {
        if let Some(r) = REAPER.get() {
            return r;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

pub fn now_nanos() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: see above. pidfds are created close-on-exec.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
