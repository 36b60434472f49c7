//! seccomp filters for hull-vmm, one per kind of thread.
//!
//! [`init`] builds every filter once, at startup, before any thread exists
//! (and installs the SIGSYS handler); each thread then calls [`apply`] with
//! its [`ThreadKind`] first thing, which only installs the prebuilt BPF
//! program on the calling thread (no TSYNC: every thread has its own).
//! `hull-vmm --seccomp off` skips all of it.
//!
//! A filter is inherited by threads created afterwards, and a thread's
//! filters all apply (the strictest answer wins). The main thread installs
//! the controller filter before it starts any thread, so the controller list
//! is the ceiling for every kind. Device workers are started from vCPU
//! threads (the guest activates a device with an MMIO write): a worker
//! spawned there would also inherit the vCPU filter, so [`spawn`] hands every
//! thread creation to a spawner thread that carries only the controller
//! filter.
//!
//! A refused syscall raises SIGSYS (`SECCOMP_RET_TRAP`); the handler names
//! the syscall and the thread kind on stderr, then repeats the syscall with
//! SIGSYS blocked, which makes the kernel kill the whole process with SIGSYS
//! (so a supervisor sees "killed by signal 31"). docs/security.md lists
//! every allowed syscall and why.

mod names;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use std::cell::Cell;
use std::collections::BTreeMap;
use std::io;
use std::sync::mpsc::{channel, Sender};
use std::sync::OnceLock;
use std::thread::JoinHandle;

/// The kinds of hull-vmm threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The main thread: boot, restore, snapshot, the event loop, shutdown;
    /// also the thread spawner.
    Controller,
    /// The API socket's accept loop and its connection threads.
    Api,
    /// Waits for SIGTERM/SIGINT (signal-hook) and tells the main loop.
    Signals,
    /// Runs KVM_RUN and emulates port and MMIO accesses (device activation
    /// and reset by the guest happen here too).
    Vcpu,
    /// virtio-blk worker: requests against the disk file.
    Block,
    /// vsock worker: guest packets to and from unix sockets.
    Vsock,
    /// virtio-fs relay: copies requests between guest and shadow rings.
    Fs,
    /// virtio-net worker: frames between guest buffers and the tap.
    Net,
    /// Forwards the i8042 reset eventfd to the main loop.
    Reset,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 9] = [
        ThreadKind::Controller,
        ThreadKind::Api,
        ThreadKind::Signals,
        ThreadKind::Vcpu,
        ThreadKind::Block,
        ThreadKind::Vsock,
        ThreadKind::Fs,
        ThreadKind::Net,
        ThreadKind::Reset,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Controller => "controller",
            ThreadKind::Api => "api",
            ThreadKind::Signals => "signals",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "virtio-blk",
            ThreadKind::Vsock => "vsock",
            ThreadKind::Fs => "virtio-fs",
            ThreadKind::Net => "virtio-net",
            ThreadKind::Reset => "reset",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {kind} seccomp filter: {source}")]
    Build { kind: &'static str, source: seccompiler::BackendError },
    #[error("installing the {kind} seccomp filter: {source}")]
    Install { kind: &'static str, source: seccompiler::Error },
    #[error("installing the SIGSYS handler: {0}")]
    Handler(io::Error),
}

/// The BPF programs, indexed by `ThreadKind::index`; `None` when filtering
/// is off.
static FILTERS: OnceLock<Option<Vec<BpfProgram>>> = OnceLock::new();
/// Where [`spawn`] sends thread creations once the spawner runs.
static SPAWNER: OnceLock<Sender<Job>> = OnceLock::new();

type Job = Box<dyn FnOnce() + Send>;

thread_local! {
    /// The kind whose filter this thread installed (for the SIGSYS message).
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

// ---- the allowed syscalls ---------------------------------------------------

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// ioctl request numbers (`_IOC(dir, 0xAE, nr, size)`).
mod kvm_ioctl {
    use kvm_bindings::*;
    use std::mem::size_of;

    const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (0xAE << 8) | nr
    }
    pub const KVM_RUN: u64 = ioc(0, 0x80, 0);
    pub const KVM_GET_REGS: u64 = ioc(2, 0x81, size_of::<kvm_regs>());
    pub const KVM_GET_SREGS: u64 = ioc(2, 0x83, size_of::<kvm_sregs>());
    pub const KVM_GET_MSRS: u64 = ioc(3, 0x88, size_of::<kvm_msrs>());
    pub const KVM_GET_CPUID2: u64 = ioc(3, 0x91, size_of::<kvm_cpuid2>());
    pub const KVM_GET_LAPIC: u64 = ioc(2, 0x8e, size_of::<kvm_lapic_state>());
    pub const KVM_GET_MP_STATE: u64 = ioc(2, 0x98, size_of::<kvm_mp_state>());
    pub const KVM_GET_VCPU_EVENTS: u64 = ioc(2, 0x9f, size_of::<kvm_vcpu_events>());
    pub const KVM_GET_XSAVE: u64 = ioc(2, 0xa4, size_of::<kvm_xsave>());
    pub const KVM_GET_XCRS: u64 = ioc(2, 0xa6, size_of::<kvm_xcrs>());
}

/// tun ioctls (type 'T') the net device makes.
mod tun_ioctl {
    pub const TUNSETIFF: u64 = libc::TUNSETIFF;
    pub const TUNGETIFF: u64 = libc::TUNGETIFF;
    pub const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;
    pub const TUNSETVNETHDRSZ: u64 = libc::TUNSETVNETHDRSZ;
}

fn cond(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("valid seccomp condition")
}

fn allow(r: &mut Rules, syscalls: &[i64]) {
    for &nr in syscalls {
        r.insert(nr, Vec::new());
    }
}

/// Allows `nr` only when argument `arg` is one of `values` (32-bit compare).
fn allow_args(r: &mut Rules, nr: i64, arg: u8, values: &[u64]) {
    let rules = r.entry(nr).or_default();
    for &v in values {
        rules.push(SeccompRule::new(vec![cond(arg, SeccompCmpOp::Eq, v)]).expect("valid seccomp rule"));
    }
}

/// What every thread needs from Rust's std and glibc: memory, locks,
/// signal frames, clocks, its thread id (panic messages), logging to
/// stderr, closing its fds, exiting.
fn common(r: &mut Rules) {
    use libc::*;
    allow(
        r,
        &[
            SYS_futex,
            SYS_mmap,
            SYS_munmap,
            SYS_mremap,
            SYS_mprotect,
            SYS_madvise,
            SYS_brk,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_sigaltstack,
            SYS_sched_yield,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_getrandom,
            SYS_gettid,
            SYS_write,
            SYS_close,
            SYS_exit,
            SYS_exit_group,
        ],
    );
    // Debug builds of std check that an fd is open before closing it.
    allow_args(r, SYS_fcntl, 1, &[F_GETFD as u64]);
}

/// The syscall rules of one kind (on top of [`common`]).
pub fn rules(kind: ThreadKind) -> Rules {
    use libc::*;
    let mut r = Rules::new();
    common(&mut r);
    match kind {
        ThreadKind::Controller => {
            allow(
                &mut r,
                &[
                    // files: kernel, initrd, disks, memory file, snapshots
                    SYS_read,
                    SYS_write,
                    SYS_pread64,
                    SYS_pwrite64,
                    // tap frames (the net worker's; see there)
                    SYS_readv,
                    SYS_writev,
                    SYS_openat,
                    SYS_lseek,
                    SYS_fstat,
                    SYS_newfstatat,
                    SYS_statx,
                    SYS_fcntl,
                    SYS_ftruncate,
                    SYS_fsync,
                    SYS_fdatasync,
                    SYS_mkdir,
                    SYS_mkdirat,
                    SYS_rename,
                    SYS_renameat,
                    SYS_unlink,
                    SYS_unlinkat,
                    SYS_memfd_create,
                    // sockets: API, vsock, vhost-user (virtiofsd), signal-hook
                    SYS_socketpair,
                    SYS_connect,
                    SYS_bind,
                    SYS_listen,
                    SYS_accept4,
                    SYS_sendto,
                    SYS_recvfrom,
                    SYS_sendmsg,
                    SYS_recvmsg,
                    SYS_shutdown,
                    SYS_getsockopt,
                    SYS_setsockopt,
                    // events
                    SYS_eventfd2,
                    SYS_epoll_create1,
                    SYS_epoll_ctl,
                    SYS_epoll_wait,
                    SYS_poll,
                    // threads: creation (the new thread runs std's start-up
                    // under this filter), installing its own filter,
                    // kicking vCPUs out of KVM_RUN, signal handlers
                    SYS_clone3,
                    SYS_set_robust_list,
                    SYS_rseq,
                    SYS_sched_getaffinity,
                    SYS_seccomp,
                    SYS_getpid,
                    SYS_tgkill,
                    SYS_rt_sigaction,
                ],
            );
            allow_args(&mut r, SYS_socket, 0, &[AF_UNIX as u64]);
            allow_args(&mut r, SYS_prctl, 0, &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64]);
            // Every KVM ioctl (type 0xAE: system, VM and vCPU fds) and
            // FIONBIO (set_nonblocking on sockets).
            let ioctl = r.entry(SYS_ioctl).or_default();
            ioctl.push(SeccompRule::new(vec![cond(1, SeccompCmpOp::MaskedEq(0xff00), 0xAE00)]).expect("rule"));
            ioctl.push(SeccompRule::new(vec![cond(1, SeccompCmpOp::Eq, FIONBIO)]).expect("rule"));
            // Net devices: attach a tap by name or check an inherited one,
            // header size, offloads (also on restore).
            {
                use tun_ioctl::*;
                allow_args(&mut r, SYS_ioctl, 1, &[TUNSETIFF, TUNGETIFF, TUNSETVNETHDRSZ, TUNSETOFFLOAD]);
            }
        }
        ThreadKind::Api => {
            // accept, read requests, write answers (send), clone the
            // connection for writing; new connection threads come from the
            // spawner (a channel: futex)
            allow(&mut r, &[SYS_accept4, SYS_read, SYS_recvfrom]);
            allow_args(&mut r, SYS_sendto, 3, &[MSG_NOSIGNAL as u64]);
            allow_args(&mut r, SYS_fcntl, 1, &[F_DUPFD_CLOEXEC as u64]);
        }
        ThreadKind::Signals => {
            // signal-hook: the handler (which runs here: SIGTERM and SIGINT
            // are blocked in every other thread) wakes the iterator through
            // a socket pair
            allow(&mut r, &[SYS_read, SYS_recvfrom]);
            allow_args(&mut r, SYS_sendto, 3, &[MSG_DONTWAIT as u64]);
        }
        ThreadKind::Vcpu => {
            use kvm_ioctl::*;
            allow(
                &mut r,
                &[
                    // eventfds (and vhost-user replies)
                    SYS_read,
                    // device activation and reset by the guest: eventfds,
                    // virtio-fs bounce memfd and vhost-user messages to
                    // virtiofsd, the vsock muxer's epoll
                    SYS_eventfd2,
                    SYS_memfd_create,
                    SYS_ftruncate,
                    SYS_sendmsg,
                    SYS_recvmsg,
                    SYS_epoll_create1,
                    SYS_epoll_ctl,
                ],
            );
            allow_args(&mut r, SYS_fcntl, 1, &[F_DUPFD_CLOEXEC as u64, F_ADD_SEALS as u64]);
            allow_args(
                &mut r,
                SYS_ioctl,
                1,
                &[
                    KVM_RUN,
                    // the vCPU's state for a snapshot, read on its own thread
                    KVM_GET_REGS,
                    KVM_GET_SREGS,
                    KVM_GET_MSRS,
                    KVM_GET_CPUID2,
                    KVM_GET_LAPIC,
                    KVM_GET_MP_STATE,
                    KVM_GET_VCPU_EVENTS,
                    KVM_GET_XSAVE,
                    KVM_GET_XCRS,
                    // vsock activation: its listener made non-blocking
                    FIONBIO,
                    // net activation: the tap's offloads follow the
                    // features the driver accepted
                    tun_ioctl::TUNSETOFFLOAD,
                ],
            );
        }
        ThreadKind::Block => {
            allow(&mut r, &[SYS_read, SYS_lseek, SYS_fdatasync, SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_wait]);
        }
        ThreadKind::Vsock => {
            allow(
                &mut r,
                &[
                    SYS_read,
                    SYS_recvfrom,
                    SYS_sendto,
                    SYS_accept4,
                    SYS_connect,
                    SYS_shutdown,
                    SYS_epoll_ctl,
                    SYS_epoll_wait,
                    SYS_poll,
                ],
            );
            allow_args(&mut r, SYS_socket, 0, &[AF_UNIX as u64]);
            allow_args(&mut r, SYS_ioctl, 1, &[FIONBIO]);
        }
        ThreadKind::Fs => {
            allow(&mut r, &[SYS_read, SYS_epoll_create1, SYS_epoll_ctl, SYS_epoll_wait]);
        }
        ThreadKind::Net => {
            allow(
                &mut r,
                &[
                    // frames from and to the tap, straight into and out of
                    // guest buffers
                    SYS_readv,
                    SYS_writev,
                    // queue kick, kill and resume eventfds
                    SYS_read,
                    SYS_epoll_create1,
                    SYS_epoll_ctl,
                    SYS_epoll_wait,
                ],
            );
        }
        ThreadKind::Reset => {
            allow(&mut r, &[SYS_read]);
        }
    }
    r
}

fn build(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Build { kind: kind.name(), source };
    let filter =
        SeccompFilter::new(rules(kind), SeccompAction::Trap, SeccompAction::Allow, TargetArch::x86_64).map_err(err)?;
    filter.try_into().map_err(err)
}

// ---- installing ------------------------------------------------------------

/// Builds every filter (when `enabled`) and installs the SIGSYS handler.
/// Call once, on the main thread, before any other thread starts.
pub fn init(enabled: bool) -> Result<(), SeccompError> {
    let filters = if enabled {
        install_sigsys_handler()?;
        Some(ThreadKind::ALL.iter().map(|&k| build(k)).collect::<Result<Vec<_>, _>>()?)
    } else {
        None
    };
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Whether filters are on (after [`init`]).
pub fn enabled() -> bool {
    matches!(FILTERS.get(), Some(Some(_)))
}

/// Installs `kind`'s filter on the calling thread; a no-op when filtering
/// is off or [`init`] never ran (unit tests).
pub fn try_apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(Some(filters)) = FILTERS.get() else {
        return Ok(());
    };
    seccompiler::apply_filter(&filters[kind.index()])
        .map_err(|source| SeccompError::Install { kind: kind.name(), source })?;
    KIND.with(|k| k.set(Some(kind)));
    Ok(())
}

/// [`try_apply`], and if the filter cannot be installed the process exits
/// (status 1) rather than run unfiltered.
pub fn apply(kind: ThreadKind) {
    if let Err(e) = try_apply(kind) {
        eprintln!("hull-vmm: {e}; exiting rather than run without it (`--seccomp off` turns filtering off)");
        // SAFETY: ends the process at once; nothing to unwind.
        unsafe { libc::_exit(1) };
    }
}

/// Starts the spawner thread (call on the main thread right after applying
/// the controller filter): thread creations from other threads go through
/// it, so new threads inherit the controller filter only.
pub fn start_spawner() -> io::Result<()> {
    if !enabled() || SPAWNER.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = channel::<Job>();
    std::thread::Builder::new().name("spawner".into()).spawn(move || {
        for job in rx {
            job();
        }
    })?;
    let _ = SPAWNER.set(tx);
    Ok(())
}

/// Starts a thread named `name` that installs `kind`'s filter, then runs `f`.
pub fn spawn<F, T>(kind: ThreadKind, name: impl Into<String>, f: F) -> io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let builder = std::thread::Builder::new().name(name.into());
    let body = move || {
        apply(kind);
        f()
    };
    let Some(spawner) = SPAWNER.get() else {
        return builder.spawn(body);
    };
    let (tx, rx) = channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(builder.spawn(body));
    });
    spawner.send(job).map_err(|_| io::Error::other("the thread spawner is gone"))?;
    rx.recv().map_err(|_| io::Error::other("the thread spawner did not answer"))?
}

// ---- SIGSYS -------------------------------------------------------------------

fn install_sigsys_handler() -> Result<(), SeccompError> {
    // SAFETY: a plain sigaction with an extern "C" handler.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SeccompError::Handler(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// A fixed buffer for composing the message without allocating.
struct Msg {
    buf: [u8; 256],
    len: usize,
}

impl Msg {
    fn push(&mut self, s: &[u8]) {
        for &b in s {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
    }
    fn push_num(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The name of syscall `nr`, if known.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    usize::try_from(nr).ok().and_then(|i| names::NAMES.get(i)).copied().filter(|n| !n.is_empty())
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo and ucontext; for SIGSYS
    // from seccomp, the siginfo carries `_sigsys` (syscall number at offset
    // 24 in the union's layout: si_signo, si_errno, si_code, pad, then
    // call_addr (8), syscall (4), arch (4)).
    unsafe {
        let nr = *((info as *const u8).add(24) as *const i32);
        let mut m = Msg { buf: [0; 256], len: 0 };
        m.push(b"hull-vmm: seccomp: the ");
        let kind = KIND.try_with(|k| k.get()).ok().flatten();
        // (A thread that has not installed its own filter yet runs under
        // its creator's: the controller's.)
        m.push(kind.map_or("controller", ThreadKind::name).as_bytes());
        m.push(b" thread made a syscall its filter does not allow: ");
        m.push_num(nr as u64);
        if let Some(name) = syscall_name(i64::from(nr)) {
            m.push(b" (");
            m.push(name.as_bytes());
            m.push(b")");
        }
        m.push(b"; killing the process (`--seccomp off` turns filtering off; docs/security.md)\n");
        libc::write(2, m.buf.as_ptr() as *const libc::c_void, m.len);
        // Repeat the refused call with its own arguments while SIGSYS is
        // blocked (as it is inside this handler): the kernel then kills the
        // whole process with SIGSYS.
        let uc = &*(ctx as *const libc::ucontext_t);
        let g = &uc.uc_mcontext.gregs;
        libc::syscall(
            i64::from(nr),
            g[libc::REG_RDI as usize],
            g[libc::REG_RSI as usize],
            g[libc::REG_RDX as usize],
            g[libc::REG_R10 as usize],
            g[libc::REG_R8 as usize],
            g[libc::REG_R9 as usize],
        );
        // Not reached; if it were, do not carry on as if the call worked.
        libc::_exit(159);
    }
}

#[cfg(test)]
mod tests;
