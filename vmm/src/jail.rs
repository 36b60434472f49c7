//! The jail: hull-vmm confines itself before it touches anything of the
//! guest (`--jail DIR,uid=U,gid=G`).
//!
//! 1. New PID namespace: hull-vmm forks; the child (PID 1 of the new
//!    namespace) becomes the VMM, the parent stays outside only to forward
//!    SIGTERM/SIGINT/SIGHUP and to exit as the child did. The child dies
//!    with the parent (PDEATHSIG), so killing the pid the shim knows kills
//!    the VMM.
//! 2. New mount, IPC and network namespaces (the VMM needs no network: its
//!    vsock and virtio-fs backends are unix sockets, a tap comes as an fd).
//! 3. Every file the VMM opens is made visible under DIR: paths already
//!    under DIR are used as they are, others (kernel, initramfs, snapshot,
//!    virtiofsd sockets, disks kept elsewhere) are bind-mounted at fixed
//!    names, read-only where the VMM only reads. /dev/kvm is opened now and
//!    its fd kept for the VM. Files the VMM creates (API and vsock sockets,
//!    the console file) must be under DIR.
//! 4. pivot_root into DIR and detach the old root: nothing else of the
//!    host's file system is reachable.
//! 5. Drop to uid U, gid G (no supplementary groups), which also drops
//!    every capability; no_new_privs; rlimits.
//!
//! The caller (the shim) owns DIR: it makes it, chowns it and the files
//! the VMM writes to U, and removes it afterwards.

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, fork, pivot_root, setgroups, setresgid, setresuid, ForkResult, Gid, Pid, Uid};
use std::path::{Component, Path, PathBuf};

/// Upper bounds for the jailed VMM: it opens a few dozen fds and starts a
/// thread per vCPU and device; it never forks or dumps core.
const RLIMIT_NOFILE: u64 = 4096;
const RLIMIT_NPROC: u64 = 512;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
}

/// Parses `DIR,uid=U,gid=G`.
pub fn parse_jail(s: &str) -> Result<JailConfig, String> {
    let mut parts = s.split(',');
    let root = PathBuf::from(parts.next().unwrap_or_default());
    let (mut uid, mut gid) = (None, None);
    for p in parts {
        let (k, v) = p.split_once('=').ok_or_else(|| format!("--jail: expected key=value, got {p:?}"))?;
        let n: u32 = v.parse().map_err(|_| format!("--jail: {k}={v:?} is not a number"))?;
        match k {
            "uid" => uid = Some(n),
            "gid" => gid = Some(n),
            _ => return Err(format!("--jail: unknown key {k:?} (expected uid, gid)")),
        }
    }
    let cfg =
        JailConfig { root, uid: uid.ok_or("--jail: uid=U is required")?, gid: gid.ok_or("--jail: gid=G is required")? };
    cfg.validate()?;
    Ok(cfg)
}

impl JailConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.root.is_absolute() || self.root.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!("--jail: {} must be an absolute path without ..", self.root.display()));
        }
        if self.uid == 0 || self.gid == 0 {
            return Err("--jail: uid and gid must not be 0 (root)".into());
        }
        Ok(())
    }
}

/// A jail being set up: in its own namespaces, not yet entered.
pub struct Jail {
    cfg: JailConfig,
    binds: usize,
    /// Read end of a pipe whose write end only the parent holds.
    parent_alive: std::os::fd::OwnedFd,
}

/// SIGKILL when the parent dies. A credential change clears the setting, so
/// it is set again after the uid switch. The parent may have died before
/// it was set: its end of the pipe is then closed.
fn die_with_parent(parent_alive: &std::os::fd::OwnedFd) {
    // SAFETY: prctl with plain integer arguments.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(parent_alive), nix::poll::PollFlags::POLLIN)];
    if nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap_or(0) > 0 {
        std::process::exit(1);
    }
}

/// Where a file the VMM uses lives inside the jail, from its host path.
/// `Ok(None)`: it is outside the jail root and must be bind-mounted.
pub fn path_inside(root: &Path, p: &Path) -> Result<Option<PathBuf>, String> {
    if p.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(format!("{}: paths given with --jail must not contain ..", p.display()));
    }
    match p.strip_prefix(root) {
        Ok(rel) if p.is_absolute() => Ok(Some(Path::new("/").join(rel))),
        _ => Ok(None),
    }
}

impl Jail {
    /// Steps 1 and 2. Must run before any other thread exists (it forks).
    /// Returns only in the child; the parent exits with the child's status.
    pub fn begin(cfg: JailConfig) -> Result<Jail, String> {
        cfg.validate()?;
        let meta = std::fs::metadata(&cfg.root).map_err(|e| format!("--jail: {}: {e}", cfg.root.display()))?;
        if !meta.is_dir() {
            return Err(format!("--jail: {} is not a directory", cfg.root.display()));
        }
        unshare(CloneFlags::CLONE_NEWPID).map_err(|e| format!("jail: new PID namespace: {e}"))?;
        // Signals the parent forwards are blocked before the fork, so none
        // arrives between the fork and sigwait.
        let forwarded = forwarded_signals();
        forwarded.thread_block().map_err(|e| format!("jail: sigprocmask: {e}"))?;
        let (alive_r, alive_w) = nix::unistd::pipe().map_err(|e| format!("jail: pipe: {e}"))?;
        // SAFETY: no other thread exists yet (documented precondition), so
        // the child may do anything after fork.
        match unsafe { fork() }.map_err(|e| format!("jail: fork: {e}"))? {
            ForkResult::Parent { child } => {
                drop(alive_r);
                forward_until_exit(child, &forwarded, alive_w)
            }
            ForkResult::Child => {
                drop(alive_w);
                die_with_parent(&alive_r);
                forwarded.thread_unblock().map_err(|e| format!("jail: sigprocmask: {e}"))?;
                unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWNET)
                    .map_err(|e| format!("jail: new mount/IPC/network namespaces: {e}"))?;
                // Nothing mounted from here on propagates back to the host.
                mount(None::<&str>, "/", None::<&str>, MsFlags::MS_SLAVE | MsFlags::MS_REC, None::<&str>)
                    .map_err(|e| format!("jail: make / a slave mount: {e}"))?;
                // pivot_root needs the new root to be a mount point.
                bind(&cfg.root, &cfg.root, false)?;
                Ok(Jail { cfg, binds: 0, parent_alive: alive_r })
            }
        }
    }

    /// Step 3 for one file: returns the path the VMM uses for `p` once
    /// jailed. `name` is the bind target's name (unique per call);
    /// `read_only` binds it read-only.
    pub fn place(&mut self, p: &Path, name: &str, read_only: bool) -> Result<PathBuf, String> {
        if let Some(inside) = path_inside(&self.cfg.root, p)? {
            return Ok(inside);
        }
        let meta = std::fs::metadata(p).map_err(|e| format!("jail: {}: {e}", p.display()))?;
        self.binds += 1;
        let target = self.cfg.root.join(format!(".{}-{name}", self.binds));
        if meta.is_dir() { std::fs::create_dir(&target) } else { std::fs::File::create(&target).map(drop) }
            .map_err(|e| format!("jail: create {}: {e}", target.display()))?;
        bind(p, &target, read_only)?;
        Ok(Path::new("/").join(target.file_name().unwrap()))
    }

    /// A file the VMM creates: it must be under the jail root.
    pub fn inside(&self, p: &Path) -> Result<PathBuf, String> {
        path_inside(&self.cfg.root, p)?
            .ok_or_else(|| format!("{}: with --jail, this file must be under {}", p.display(), self.cfg.root.display()))
    }

    /// Steps 4 and 5.
    pub fn enter(self) -> Result<(), String> {
        let root = &self.cfg.root;
        // /dev/kvm is opened now and kept: the jail has no device nodes
        // (its file system may well be nodev) and the uid need not own it.
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| format!("jail: opening /dev/kvm: {e} (see `hull check`)"))?;
        crate::vstate::vm::preopen_kvm(kvm.into());

        chdir(root).map_err(|e| format!("jail: chdir {}: {e}", root.display()))?;
        // The old root is stacked under the new one, then detached.
        pivot_root(".", ".").map_err(|e| format!("jail: pivot_root {}: {e}", root.display()))?;
        umount2(".", MntFlags::MNT_DETACH).map_err(|e| format!("jail: detach the old root: {e}"))?;
        chdir("/").map_err(|e| format!("jail: chdir /: {e}"))?;

        for (res, v) in
            [(libc::RLIMIT_NOFILE, RLIMIT_NOFILE), (libc::RLIMIT_NPROC, RLIMIT_NPROC), (libc::RLIMIT_CORE, 0)]
        {
            let lim = libc::rlimit { rlim_cur: v, rlim_max: v };
            // SAFETY: setrlimit with a valid struct.
            if unsafe { libc::setrlimit(res, &lim) } != 0 {
                return Err(format!("jail: setrlimit({res}): {}", std::io::Error::last_os_error()));
            }
        }
        let (uid, gid) = (Uid::from_raw(self.cfg.uid), Gid::from_raw(self.cfg.gid));
        setgroups(&[]).map_err(|e| format!("jail: setgroups: {e}"))?;
        setresgid(gid, gid, gid).map_err(|e| format!("jail: setresgid {gid}: {e}"))?;
        // From root to a non-root uid without keepcaps: every capability goes.
        setresuid(uid, uid, uid).map_err(|e| format!("jail: setresuid {uid}: {e}"))?;
        // SAFETY: prctl with plain integer arguments.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(format!("jail: no_new_privs: {}", std::io::Error::last_os_error()));
        }
        die_with_parent(&self.parent_alive);
        Ok(())
    }
}

fn bind(src: &Path, target: &Path, read_only: bool) -> Result<(), String> {
    let what = || format!("jail: bind {} on {}", src.display(), target.display());
    mount(Some(src), target, None::<&str>, MsFlags::MS_BIND, None::<&str>).map_err(|e| format!("{}: {e}", what()))?;
    if read_only {
        let flags =
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            .map_err(|e| format!("{} read-only: {e}", what()))?;
    }
    Ok(())
}

fn forwarded_signals() -> SigSet {
    let mut s = SigSet::empty();
    for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGHUP, Signal::SIGCHLD] {
        s.add(sig);
    }
    s
}

/// The parent's life: forward termination signals to the VMM, and when it
/// exits, exit the same way (the same code, or the same signal).
fn forward_until_exit(child: Pid, signals: &SigSet, _alive: std::os::fd::OwnedFd) -> ! {
    loop {
        match waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
            Ok(WaitStatus::Signaled(_, sig, _)) => {
                // SAFETY: resetting a disposition and raising a signal.
                unsafe {
                    libc::signal(sig as libc::c_int, libc::SIG_DFL);
                }
                let _ = signals.thread_unblock();
                let _ = nix::sys::signal::raise(sig);
                std::process::exit(128 + sig as i32);
            }
            Ok(_) => {}
            Err(_) => std::process::exit(1),
        }
        match signals.wait() {
            Ok(Signal::SIGCHLD) => {}
            Ok(sig) => {
                let _ = kill(child, sig);
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let j = parse_jail("/run/hull/p/vm,uid=3000001,gid=3000000").unwrap();
        assert_eq!(j, JailConfig { root: "/run/hull/p/vm".into(), uid: 3000001, gid: 3000000 });
        for (bad, needle) in [
            ("/j,uid=0,gid=5", "must not be 0"),
            ("/j,uid=5", "gid=G is required"),
            ("/j,uid=x,gid=5", "\"x\" is not a number"),
            ("/j,uid=5,gid=5,mode=1", "unknown key \"mode\""),
            ("rel,uid=5,gid=5", "absolute"),
            ("/a/../b,uid=5,gid=5", "absolute"),
            ("/j,uid", "key=value"),
        ] {
            let e = parse_jail(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn maps_paths_under_the_root() {
        let root = Path::new("/run/hull/p/vm");
        assert_eq!(path_inside(root, Path::new("/run/hull/p/vm/api.sock")).unwrap(), Some("/api.sock".into()));
        assert_eq!(path_inside(root, Path::new("/run/hull/p/vm/disks/d0")).unwrap(), Some("/disks/d0".into()));
        assert_eq!(path_inside(root, Path::new("/run/hull/p/vmx/a")).unwrap(), None);
        assert_eq!(path_inside(root, Path::new("/boot/vmlinux")).unwrap(), None);
        assert!(path_inside(root, Path::new("/run/hull/p/vm/../x")).is_err());
    }
}
