//! Everything that talks to libcontainer: the bundle (config.json), stdio
//! (pipes, console socket, exec ptys), the init and tenant (exec) builders,
//! start, poststop hooks, and the executor that puts exec'd processes in the
//! container's root and under its seccomp filter.

use super::error_chain;
use crate::backend::{BackendError, ProcessIo, Result, StdioConfig};
use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;
use libcontainer::workload::default::DefaultExecutor;
use libcontainer::workload::{Executor, ExecutorError, ExecutorValidationError};
use nix::fcntl::OFlag;
use oci_spec::runtime::{Capability, LinuxCapabilities, LinuxSeccomp, Process, Root, Spec};
use std::collections::HashSet;
use std::fs;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What goes into `<bundle>/config.json`: the request's spec with our rootfs
/// and pooled cgroup. `linux.resources` is taken out (the backend wrote the
/// limits to the cgroup itself, before libcontainer ran).
pub fn bundle_spec(spec: &Spec, rootfs: &Path, cgroups_path: &str, terminal: bool) -> Result<Spec> {
    let mut s = spec.clone();
    let mut root = Root::default();
    root.set_path(rootfs.to_path_buf());
    root.set_readonly(spec.root().as_ref().and_then(|r| r.readonly()));
    s.set_root(Some(root));
    let mut linux = s.linux().clone().unwrap_or_default();
    linux.set_cgroups_path(Some(PathBuf::from(cgroups_path)));
    linux.set_resources(None);
    s.set_linux(Some(linux));
    let Some(mut process) = s.process().clone() else {
        return Err(BackendError::InvalidArgument("the spec has no process".into()));
    };
    if process.args().as_ref().is_none_or(|a| a.is_empty()) {
        return Err(BackendError::InvalidArgument("the spec's process has no args".into()));
    }
    normalize_process(&mut process, terminal);
    s.set_process(Some(process));
    Ok(s)
}

/// libcontainer installs seccomp early only when noNewPrivileges is *absent*;
/// an explicit `false` would make it load the filter after dropping
/// CAP_SYS_ADMIN, which fails. false and absent mean the same in OCI.
pub fn normalize_process(p: &mut Process, terminal: bool) {
    if p.no_new_privileges() == Some(false) {
        p.set_no_new_privileges(None);
    }
    p.set_terminal(Some(terminal));
}

/// Writes `json` (`serde_json::to_vec_pretty(..)`) to `path`.
pub fn write_json(path: &Path, json: serde_json::Result<Vec<u8>>) -> Result<()> {
    let data = json.map_err(|e| internal(format!("serialize {}: {e}", path.display())))?;
    fs::write(path, data).map_err(|e| internal(format!("write {}: {e}", path.display())))
}

/// The child ends of a process's stdio, or the console socket for a terminal.
pub struct ChildStdio {
    stdin: OwnedFd,
    stdout: OwnedFd,
    stderr: OwnedFd,
    console: Option<ConsoleSocket>,
}

/// A listening console socket; the file goes away with it.
pub struct ConsoleSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl Drop for ConsoleSocket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

fn dev_null() -> Result<OwnedFd> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map(OwnedFd::from)
        .map_err(|e| internal(format!("open /dev/null: {e}")))
}

/// Pipes for the requested streams; the others get /dev/null.
pub fn make_pipes(cfg: StdioConfig) -> Result<(ChildStdio, ProcessIo)> {
    let pipe = || nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| internal(format!("pipe: {e}")));
    let mut io = ProcessIo::default();
    let stdin = match cfg.stdin {
        true => pipe().map(|(r, w)| {
            io.stdin = Some(w);
            r
        })?,
        false => dev_null()?,
    };
    let out = |want: bool, slot: &mut Option<OwnedFd>| -> Result<OwnedFd> {
        match want {
            true => pipe().map(|(r, w)| {
                *slot = Some(r);
                w
            }),
            false => dev_null(),
        }
    };
    let stdout = out(cfg.stdout, &mut io.stdout)?;
    let stderr = out(cfg.stderr, &mut io.stderr)?;
    Ok((ChildStdio { stdin, stdout, stderr, console: None }, io))
}

/// stdio for a container's init: pipes, or with a terminal a console socket
/// at `console_path` through which libcontainer's init sends the pty master
/// (allocated in the container's devpts after pivot_root).
pub fn make_init_stdio(cfg: StdioConfig, console_path: &Path) -> Result<(ChildStdio, ProcessIo)> {
    if !cfg.terminal {
        return make_pipes(cfg);
    }
    let _ = fs::remove_file(console_path);
    let l = UnixListener::bind(console_path)
        .map_err(|e| internal(format!("console socket {}: {e}", console_path.display())))?;
    let child = ChildStdio {
        stdin: dev_null()?,
        stdout: dev_null()?,
        stderr: dev_null()?,
        console: Some(ConsoleSocket { path: console_path.to_path_buf(), listener: l }),
    };
    Ok((child, ProcessIo::default()))
}

/// stdio for an exec'd process. A terminal is a pty of the container's own
/// devpts (`<root>/dev/pts/ptmx`, opened from the agent), so the name the
/// process sees (`/dev/pts/N`) is valid inside the container: libcontainer's
/// console socket for exec allocates it before the process has reached the
/// container's root (see [`HullExecutor`]), which only works when the
/// agent runs at its mount namespace's root.
pub fn make_exec_stdio(
    cfg: StdioConfig,
    root: &OwnedFd,
    winsize: Option<(u16, u16)>,
) -> Result<(ChildStdio, ProcessIo)> {
    if !cfg.terminal {
        return make_pipes(cfg);
    }
    let (master, slave) = container_pty(root)?;
    if let Some((rows, cols)) = winsize {
        set_winsize(&master, rows, cols).map_err(internal)?;
    }
    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| internal(format!("dup the pty: {e}")));
    let child = ChildStdio { stdin: dup(&slave)?, stdout: dup(&slave)?, stderr: slave, console: None };
    Ok((child, ProcessIo { pty: Some(master), ..Default::default() }))
}

/// Opens `dev/pts/ptmx` under `root` without following symlinks (the
/// container controls that tree), checks it is a real ptmx on devpts, and
/// returns the master and its slave.
fn container_pty(root: &OwnedFd) -> Result<(OwnedFd, OwnedFd)> {
    let path = std::ffi::CString::new("dev/pts/ptmx").map_err(|e| internal(e.to_string()))?;
    /// struct open_how (libc's is non-exhaustive).
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    let how = OpenHow {
        flags: (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS,
    };
    // SAFETY: openat2 with a valid dirfd, NUL-terminated path and open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(BackendError::FailedPrecondition(format!(
            "the container has no usable /dev/pts/ptmx for a terminal: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: a fresh descriptor we own.
    let master = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let st = nix::sys::stat::fstat(master.as_raw_fd()).map_err(|e| internal(format!("stat ptmx: {e}")))?;
    let fs = nix::sys::statfs::fstatfs(&master).map_err(|e| internal(format!("statfs ptmx: {e}")))?;
    let is_ptmx = fs.filesystem_type() == nix::sys::statfs::DEVPTS_SUPER_MAGIC
        && st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && st.st_rdev == libc::makedev(5, 2)
        && st.st_ino == 2;
    if !is_ptmx {
        return Err(BackendError::FailedPrecondition("the container's /dev/pts/ptmx is not a devpts ptmx".into()));
    }
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int; TIOCGPTPEER returns a new descriptor.
    let slave = unsafe {
        if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) < 0 {
            return Err(internal(format!("unlock the pty: {}", std::io::Error::last_os_error())));
        }
        libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC)
    };
    if slave < 0 {
        return Err(internal(format!("open the pty's peer: {}", std::io::Error::last_os_error())));
    }
    // SAFETY: a fresh descriptor we own.
    Ok((master, unsafe { OwnedFd::from_raw_fd(slave) }))
}

impl ChildStdio {
    fn apply(self, b: ContainerBuilder) -> (ContainerBuilder, Option<ConsoleSocket>) {
        match self.console {
            Some(c) => (b.with_console_socket(Some(c.path.clone())), Some(c)),
            None => (b.with_stdin(self.stdin).with_stdout(self.stdout).with_stderr(self.stderr), None),
        }
    }
}

/// Receives the pty master libcontainer's init sent over the console socket
/// (already queued when the build returns).
pub fn receive_pty(console: ConsoleSocket) -> Result<OwnedFd> {
    let l = &console.listener;
    let _ = l.set_nonblocking(true);
    let (stream, _) =
        l.accept().map_err(|e| internal(format!("console socket: no connection from the container: {e}")))?;
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = nix::sys::socket::recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(|e| internal(format!("console socket: receive the pty: {e}")))?;
    let cmsgs = msg.cmsgs().map_err(|e| internal(format!("console socket: {e}")))?;
    for c in cmsgs {
        if let nix::sys::socket::ControlMessageOwned::ScmRights(fds) = c {
            let mut owned: Vec<OwnedFd> =
                // SAFETY: SCM_RIGHTS just installed these descriptors in our table.
                fds.iter().map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) }).collect();
            if !owned.is_empty() {
                return Ok(owned.swap_remove(0));
            }
        }
    }
    Err(internal("console socket: the container sent no pty".into()))
}

/// Sets the window size of a pty master.
pub fn set_winsize(master: &OwnedFd, rows: u16, cols: u16) -> std::result::Result<(), String> {
    let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(format!("TIOCSWINSZ: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

pub struct Built {
    pub pid: u32,
    pub pty: Option<OwnedFd>,
}

/// Creates the container (its init waits for `start`). The caller holds
/// the reaper lock.
pub fn build_init(
    id: &str,
    lc_root: &Path,
    bundle: &Path,
    stdio: ChildStdio,
    ex: HullExecutor,
    no_pivot: bool,
) -> Result<Built> {
    let b = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(lc_root)
        .map_err(lc_err)?
        .with_executor(ex);
    let (b, console) = stdio.apply(b);
    let c = b.as_init(bundle).with_systemd(false).with_detach(true).with_no_pivot(no_pivot).build().map_err(lc_err)?;
    let pid = c.pid().map(|p| p.as_raw() as u32).ok_or_else(|| internal("libcontainer returned no init pid".into()))?;
    let pty = console.map(receive_pty).transpose()?;
    Ok(Built { pid, pty })
}

/// Lets the init exec the user's program. The caller holds the reaper lock
/// (poststart hooks are child processes libcontainer waits for).
pub fn start(id: &str, lc_root: &Path) -> Result<()> {
    let mut c = Container::load(lc_root.join(id)).map_err(lc_err)?;
    c.start().map_err(lc_err)
}

/// Runs the poststop hooks of the spec, if any (libcontainer's own delete
/// would also remove the cgroup, which belongs to the pool).
pub fn poststop_hooks(id: &str, lc_root: &Path, spec: &Spec) -> Result<()> {
    let Some(hooks) = spec.hooks().as_ref().and_then(|h| h.poststop().clone()) else { return Ok(()) };
    if hooks.is_empty() {
        return Ok(());
    }
    let c = Container::load(lc_root.join(id)).map_err(lc_err)?;
    libcontainer::hooks::run_hooks(Some(&hooks), Some(&c.state), None, None, None)
        .map_err(|e| internal(format!("poststop hooks: {}", error_chain(&e))))
}

/// Starts an extra process in the running container. `process_json` is the
/// (already prepared) OCI process written to a file. The caller holds the
/// reaper lock.
pub fn build_exec(id: &str, lc_root: &Path, process_json: &Path, stdio: ChildStdio, ex: HullExecutor) -> Result<Built> {
    let b = ContainerBuilder::new(id.to_string(), SyscallType::default())
        .with_root_path(lc_root)
        .map_err(lc_err)?
        .with_executor(ex);
    let (b, console) = stdio.apply(b);
    let pid = b.as_tenant().with_detach(true).with_process(Some(process_json)).build().map_err(lc_err)?;
    let pty = console.map(receive_pty).transpose()?;
    Ok(Built { pid: pid.as_raw() as u32, pty })
}

/// The executor of every process the backend starts. For exec'd processes
/// it fixes two things libcontainer's tenant path gets wrong:
///
/// - **root.** The tenant joins the container's mount namespace with
///   setns(2), which puts it at the *namespace's* root. That is the
///   container's rootfs only if the agent itself runs at its namespace's
///   root (true for PID 1 on the initramfs; false in a chroot such as the
///   lab, where the exec'd process would land in the agent's root). So the
///   agent opens `/proc/<init>/root` before the build and the executor
///   chroots there (and redoes the cwd) when its root differs.
/// - **seccomp.** The tenant rebuilds `linux` from the namespaces only, so
///   the container's seccomp filter would be missing; the executor loads it
///   right before exec.
///
/// Both need privileges the process may not keep (CAP_SYS_CHROOT; for
/// seccomp without no_new_privs, CAP_SYS_ADMIN): the process is given them
/// plus CAP_SETPCAP (see [`prepare_exec`]) and drops back to its own
/// capabilities once done, as runc does in the seccomp case.
///
/// For an init with a terminal it applies `process.consoleSize` (fd 0 is
/// the pty by then), so the program sees its size from the start; an exec'd
/// process gets its pty from [`make_exec_stdio`] and is given it as its
/// controlling terminal here.
#[derive(Clone, Default)]
pub struct HullExecutor {
    seccomp: Option<LinuxSeccomp>,
    final_caps: Option<LinuxCapabilities>,
    winsize: Option<(u16, u16)>,
    root_fd: Option<RawFd>,
    /// fd 0 is a pty to make the controlling terminal (exec with a terminal).
    ctty: bool,
}

impl HullExecutor {
    /// For a container's init: libcontainer sets up its root and seccomp.
    pub fn for_init(process: Option<&Process>) -> HullExecutor {
        HullExecutor { winsize: process.and_then(winsize_of), ..Default::default() }
    }

    #[cfg(test)]
    pub fn final_caps_for_test(&self) -> Option<LinuxCapabilities> {
        self.final_caps.clone()
    }
}

pub fn winsize_of(p: &Process) -> Option<(u16, u16)> {
    let b = p.console_size().filter(|_| p.terminal() == Some(true))?;
    Some((b.height().min(u16::MAX as u64) as u16, b.width().min(u16::MAX as u64) as u16))
}

/// chroot to `root_fd` unless it already is our root, then chdir to `cwd`.
fn enter_root(root_fd: RawFd, cwd: &Path) -> std::result::Result<(), String> {
    use nix::sys::stat::{fstat, stat};
    let want = fstat(root_fd).map_err(|e| format!("stat the container root: {e}"))?;
    let have = stat("/").map_err(|e| format!("stat /: {e}"))?;
    if (want.st_dev, want.st_ino) != (have.st_dev, have.st_ino) {
        nix::unistd::fchdir(root_fd).map_err(|e| format!("enter the container root: {e}"))?;
        nix::unistd::chroot(".").map_err(|e| format!("chroot to the container root: {e}"))?;
        let cwd = if cwd.as_os_str().is_empty() { Path::new("/") } else { cwd };
        nix::unistd::chdir(cwd).map_err(|e| format!("chdir to {}: {e}", cwd.display()))?;
    }
    let _ = nix::unistd::close(root_fd);
    Ok(())
}

impl Executor for HullExecutor {
    fn validate(&self, spec: &Spec) -> std::result::Result<(), ExecutorValidationError> {
        // First thing after libcontainer's setup: the executable is looked
        // up in the right root.
        if let Some(fd) = self.root_fd {
            let cwd = spec.process().as_ref().map(|p| p.cwd().clone()).unwrap_or_default();
            enter_root(fd, &cwd).map_err(ExecutorValidationError::ArgValidationError)?;
        }
        DefaultExecutor {}.validate(spec)
    }

    fn exec(&self, spec: &Spec) -> std::result::Result<(), ExecutorError> {
        if self.ctty {
            // SAFETY: ioctl on fd 0; libcontainer made us a session leader (setsid).
            unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) };
        }
        if let Some((rows, cols)) = self.winsize {
            let ws = libc::winsize { ws_row: rows, ws_col: cols, ws_xpixel: 0, ws_ypixel: 0 };
            // SAFETY: TIOCSWINSZ reads a winsize; fd 0 is the terminal here.
            unsafe { libc::ioctl(0, libc::TIOCSWINSZ, &ws) };
        }
        if let Some(seccomp) = &self.seccomp {
            let notify = libcontainer::seccomp::initialize_seccomp(seccomp)
                .map_err(|e| ExecutorError::Other(format!("load the container's seccomp filter: {e}")))?;
            if let Some(fd) = notify {
                // No seccomp agent for exec'd processes: notifying rules return ENOSYS.
                let _ = nix::unistd::close(fd);
            }
        }
        if let Some(caps) = &self.final_caps {
            libcontainer::capabilities::drop_privileges(caps, &libcontainer::syscall::linux::LinuxSyscall)
                .map_err(|e| ExecutorError::Other(format!("drop capabilities: {e}")))?;
        }
        DefaultExecutor {}.exec(spec)
    }
}

/// Prepares an exec'd process: terminal, noNewPrivileges as for the init,
/// and the root and seccomp arrangements described at [`HullExecutor`].
/// `root_fd`: the container init's root, open in the agent.
pub fn prepare_exec(
    mut process: Process,
    container: &Spec,
    terminal: bool,
    root_fd: Option<RawFd>,
) -> (Process, HullExecutor) {
    // libcontainer's console socket is not used for exec (see make_exec_stdio).
    normalize_process(&mut process, false);
    let seccomp = container.linux().as_ref().and_then(|l| l.seccomp().clone());
    let mut extra = Vec::new();
    if root_fd.is_some() {
        extra.push(Capability::SysChroot);
    }
    if seccomp.is_some() && process.no_new_privileges() != Some(true) {
        extra.push(Capability::SysAdmin);
    }
    let mut ex = HullExecutor { seccomp, final_caps: None, winsize: None, root_fd, ctty: terminal };
    let Some(caps) = process.capabilities().clone().filter(|_| !extra.is_empty()) else { return (process, ex) };
    extra.push(Capability::Setpcap);
    let add = |set: Option<&HashSet<Capability>>| {
        let mut s = set.cloned().unwrap_or_default();
        s.extend(extra.iter().copied());
        s
    };
    // libcontainer: a missing bounding set means empty; missing effective
    // or permitted sets are left alone (and then hold what root has).
    let mut widened = caps.clone();
    widened.set_bounding(Some(add(caps.bounding().as_ref())));
    if let Some(e) = caps.effective() {
        widened.set_effective(Some(add(Some(e))));
    }
    if let Some(p) = caps.permitted() {
        widened.set_permitted(Some(add(Some(p))));
    }
    let mut final_caps = caps.clone();
    final_caps.set_bounding(Some(caps.bounding().clone().unwrap_or_default()));
    process.set_capabilities(Some(widened));
    ex.final_caps = Some(final_caps);
    (process, ex)
}

pub fn lc_err(e: LibcontainerError) -> BackendError {
    let msg = format!("libcontainer: {}", error_chain(&e));
    match e {
        LibcontainerError::InvalidSpec(_)
        | LibcontainerError::InvalidInput(_)
        | LibcontainerError::InvalidID(_)
        | LibcontainerError::MissingSpec(_) => BackendError::InvalidArgument(msg),
        _ => BackendError::Internal(msg),
    }
}

fn internal(s: String) -> BackendError {
    BackendError::Internal(s)
}
