//! Rootfs assembly: read-only layers from the shared file system (virtio-fs)
//! under an overlayfs whose upper/work directories live on the container's
//! own disk (ext4 on virtio-blk, found by serial) or on a tmpfs.

use crate::backend::{BackendError, Result};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// A layer directory, opened (O_PATH) after its location was checked, so
/// the overlay mount uses exactly the directory that was checked.
#[derive(Debug)]
#[allow(dead_code)] // rel and path: for diagnostics and tests
pub struct Layer {
    pub rel: String,
    pub path: PathBuf,
    fd: OwnedFd,
}

impl Layer {
    /// `/proc/self/fd/N`: short (many layers fit in one mount option page)
    /// and free of the characters overlayfs treats specially (`:` `,` `\`).
    pub fn fd_path(&self) -> String {
        format!("/proc/self/fd/{}", self.fd.as_raw_fd())
    }
}

/// Resolves `layers` (relative, lowest first) under `shared_root`: each must
/// exist, be a directory and stay inside `shared_root` once symlinks are
/// resolved.
pub fn resolve_layers(shared_root: &Path, layers: &[String]) -> Result<Vec<Layer>> {
    if layers.is_empty() {
        return Err(BackendError::InvalidArgument("no layers given: a container needs at least one".into()));
    }
    let root = fs::canonicalize(shared_root).map_err(|e| {
        BackendError::FailedPrecondition(format!("shared file system root {}: {e}", shared_root.display()))
    })?;
    let mut out = Vec::with_capacity(layers.len());
    for rel in layers {
        let p = Path::new(rel);
        if rel.is_empty()
            || p.is_absolute()
            || p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(BackendError::InvalidArgument(format!(
                "layer {rel:?}: must be a relative path without \"..\""
            )));
        }
        let joined = root.join(p);
        let path = match fs::canonicalize(&joined) {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(BackendError::InvalidArgument(format!(
                    "layer {rel:?} not found ({} does not exist)",
                    joined.display()
                )))
            }
            Err(e) => return Err(BackendError::InvalidArgument(format!("layer {rel:?} ({}): {e}", joined.display()))),
        };
        if !path.starts_with(&root) {
            return Err(BackendError::InvalidArgument(format!(
                "layer {rel:?} resolves to {}, outside the shared file system {}",
                path.display(),
                root.display()
            )));
        }
        let fd = nix::fcntl::open(
            &path,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::ENOTDIR => {
                BackendError::InvalidArgument(format!("layer {rel:?} ({}) is not a directory", path.display()))
            }
            // ELOOP: the last component became a symlink after canonicalize.
            e => BackendError::InvalidArgument(format!("layer {rel:?} ({}): {e}", path.display())),
        })?;
        // SAFETY: open returned a fresh descriptor nobody else owns.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // The directory we opened must still be the one we checked.
        let opened = fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default();
        if opened != path {
            return Err(BackendError::InvalidArgument(format!(
                "layer {rel:?} changed while being opened ({} became {})",
                path.display(),
                opened.display()
            )));
        }
        out.push(Layer { rel: rel.clone(), path, fd });
    }
    Ok(out)
}

/// overlayfs wants the topmost lower layer first; `layers` are lowest first.
pub fn lowerdir_option(layers: &[Layer]) -> String {
    layers.iter().rev().map(|l| l.fd_path()).collect::<Vec<_>>().join(":")
}

/// Escapes a path for an overlayfs option value.
fn escape_opt(p: &Path) -> String {
    let mut s = String::new();
    for c in p.to_string_lossy().chars() {
        if matches!(c, ':' | ',' | '\\') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

pub fn overlay_options(layers: &[Layer], upper: &Path, work: &Path) -> String {
    format!("lowerdir={},upperdir={},workdir={}", lowerdir_option(layers), escape_opt(upper), escape_opt(work))
}

/// The mounts made for one container, unmounted in reverse order.
#[derive(Debug, Default)]
pub struct Mounts {
    pub list: Vec<PathBuf>,
}

impl Mounts {
    pub fn unmount_all(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        while let Some(p) = self.list.pop() {
            if let Err(e) = unmount(&p) {
                errors.push(e);
            }
        }
        errors
    }
}

/// Where the container's writable layer lives.
pub enum Upper<'a> {
    Tmpfs,
    Disk { serial: &'a str, sys_block: &'a Path, dev_dir: &'a Path },
}

/// Assembles `dir/rootfs`: disk or tmpfs at `dir/disk` / `dir/tmp`, overlay
/// on top. On error everything mounted so far is undone.
pub fn assemble(dir: &Path, layers: &[Layer], upper: Upper<'_>) -> Result<(PathBuf, Mounts)> {
    let mut mounts = Mounts::default();
    match assemble_inner(dir, layers, upper, &mut mounts) {
        Ok(rootfs) => Ok((rootfs, mounts)),
        Err(e) => {
            mounts.unmount_all();
            Err(e)
        }
    }
}

/// Drops the device's cached blocks (BLKFLSBUF): in a VM restored from a
/// template, the page cache may still hold what the template's disk in this
/// slot contained (the kernel read its first blocks when probing it).
fn drop_cached_blocks(dev: &Path) {
    const BLKFLSBUF: libc::c_ulong = 0x1261; // _IO(0x12, 97)
    match fs::File::open(dev) {
        // SAFETY: BLKFLSBUF takes no argument.
        Ok(f) => {
            if unsafe { libc::ioctl(f.as_raw_fd(), BLKFLSBUF as _) } != 0 {
                eprintln!("hull-agent: BLKFLSBUF on {}: {}", dev.display(), std::io::Error::last_os_error());
            }
        }
        Err(e) => eprintln!("hull-agent: open {} to drop its cached blocks: {e}", dev.display()),
    }
}

fn assemble_inner(dir: &Path, layers: &[Layer], upper: Upper<'_>, mounts: &mut Mounts) -> Result<PathBuf> {
    let base = match upper {
        Upper::Tmpfs => {
            let t = dir.join("tmp");
            mkdir(&t)?;
            mount(Some("tmpfs"), &t, Some("tmpfs"), MsFlags::empty(), Some("mode=0755"))
                .map_err(|e| internal(format!("mount tmpfs on {}: {e}", t.display())))?;
            mounts.list.push(t.clone());
            t
        }
        Upper::Disk { serial, sys_block, dev_dir } => {
            let dev = find_disk(sys_block, dev_dir, serial)?;
            drop_cached_blocks(&dev);
            let d = dir.join("disk");
            mkdir(&d)?;
            mount(Some(&dev), &d, Some("ext4"), MsFlags::empty(), None::<&str>).map_err(|e| {
                BackendError::FailedPrecondition(format!(
                    "mount the writable disk {} (serial {serial:?}) as ext4 on {}: {e}",
                    dev.display(),
                    d.display()
                ))
            })?;
            mounts.list.push(d.clone());
            d
        }
    };
    let (up, work) = (base.join("upper"), base.join("work"));
    mkdir(&up)?;
    mkdir(&work)?;
    let rootfs = dir.join("rootfs");
    mkdir(&rootfs)?;
    let opts = overlay_options(layers, &up, &work);
    if opts.len() >= 4000 {
        return Err(BackendError::InvalidArgument(format!("too many layers ({}) for one overlay mount", layers.len())));
    }
    mount(Some("overlay"), &rootfs, Some("overlay"), MsFlags::empty(), Some(opts.as_str()))
        .map_err(|e| internal(format!("mount overlay on {} ({opts}): {e}", rootfs.display())))?;
    mounts.list.push(rootfs.clone());
    Ok(rootfs)
}

/// The block device whose virtio serial is `serial`: `sys_block/<name>/serial`
/// → `dev_dir/<name>`. virtio-blk serials are at most 20 bytes; a longer
/// requested serial matches its first 20 bytes.
pub fn find_disk(sys_block: &Path, dev_dir: &Path, serial: &str) -> Result<PathBuf> {
    let want = serial.trim();
    let want20 = if want.len() > 20 { want.get(..20).unwrap_or(want) } else { want };
    let entries = fs::read_dir(sys_block).map_err(|e| {
        BackendError::FailedPrecondition(format!(
            "no disk with serial {serial:?}: cannot list {}: {e}",
            sys_block.display()
        ))
    })?;
    let mut names: Vec<String> = entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    for name in names {
        let Ok(s) = fs::read(sys_block.join(&name).join("serial")) else { continue };
        let s = String::from_utf8_lossy(&s);
        let s = s.trim_matches(|c: char| c.is_whitespace() || c == '\0');
        if !s.is_empty() && (s == want || s == want20) {
            let dev = dev_dir.join(&name);
            if !dev.exists() {
                return Err(BackendError::FailedPrecondition(format!(
                    "disk with serial {serial:?} is {name} but {} does not exist",
                    dev.display()
                )));
            }
            return Ok(dev);
        }
    }
    Err(BackendError::FailedPrecondition(format!(
        "no disk with serial {serial:?} (looked in {}/*/serial)",
        sys_block.display()
    )))
}

/// Mounts the shared file system (virtio-fs `tag`) at `root` on first use.
pub struct SharedFs {
    root: PathBuf,
    tag: Option<String>,
    mounted: Mutex<bool>,
}

impl SharedFs {
    pub fn new(root: PathBuf, tag: Option<String>) -> SharedFs {
        SharedFs { root, tag, mounted: Mutex::new(false) }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn ensure(&self) -> Result<()> {
        let Some(tag) = &self.tag else { return Ok(()) };
        let mut done = self.mounted.lock().unwrap_or_else(|e| e.into_inner());
        if *done {
            return Ok(());
        }
        let canon = fs::canonicalize(&self.root).unwrap_or_else(|_| self.root.clone());
        if !mount_points().contains(&canon) {
            fs::create_dir_all(&self.root).map_err(|e| internal(format!("create {}: {e}", self.root.display())))?;
            mount(Some(tag.as_str()), &self.root, Some("virtiofs"), MsFlags::empty(), None::<&str>).map_err(|e| {
                BackendError::FailedPrecondition(format!(
                    "mount the shared file system (virtio-fs tag {tag:?}) on {}: {e}",
                    self.root.display()
                ))
            })?;
        }
        *done = true;
        Ok(())
    }
}

/// Mount points of this mount namespace (from /proc/self/mountinfo), in
/// mount order.
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(s) = fs::read_to_string("/proc/self/mountinfo") else { return Vec::new() };
    s.lines().filter_map(|l| l.split(' ').nth(4)).map(|m| PathBuf::from(unescape_mountinfo(m))).collect()
}

/// The root's file system type, e.g. "rootfs" when running from an initramfs.
pub fn root_fstype() -> Option<String> {
    let s = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut last = None;
    for l in s.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if f.get(4) == Some(&"/") {
            let dash = f.iter().position(|x| *x == "-")?;
            last = f.get(dash + 1).map(|s| s.to_string());
        }
    }
    last
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = u32::from(b[i + 1] - b'0') * 64 + u32::from(b[i + 2] - b'0') * 8 + u32::from(b[i + 3] - b'0');
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Unmounts `p`; waits a little on EBUSY, then detaches lazily.
pub fn unmount(p: &Path) -> std::result::Result<(), String> {
    for _ in 0..20 {
        match umount2(p, MntFlags::empty()) {
            Ok(()) => return Ok(()),
            Err(Errno::EINVAL) | Err(Errno::ENOENT) => return Ok(()), // not mounted
            Err(Errno::EBUSY) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("unmount {}: {e}", p.display())),
        }
    }
    umount2(p, MntFlags::MNT_DETACH).map_err(|e| format!("unmount {}: {e}", p.display()))
}

/// Unmounts everything at or below `dir` (deepest first) and removes it:
/// leftovers of a container that was not deleted cleanly.
pub fn remove_dir_with_mounts(dir: &Path) -> std::result::Result<(), String> {
    let mut under: Vec<PathBuf> = mount_points().into_iter().filter(|m| m.starts_with(dir)).collect();
    under.reverse();
    let mut errors = Vec::new();
    for m in under {
        if let Err(e) = unmount(&m) {
            errors.push(e);
        }
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn mkdir(p: &Path) -> Result<()> {
    fs::create_dir_all(p).map_err(|e| internal(format!("create {}: {e}", p.display())))
}

fn internal(s: String) -> BackendError {
    BackendError::Internal(s)
}
