//! The tap backend of virtio-net: a `/dev/net/tun` file descriptor attached
//! to a tap interface with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
//!
//! Each `read`/`write` on the descriptor is one Ethernet frame preceded by a
//! virtio-net header. The header size is set to 12 bytes
//! (`TUNSETVNETHDRSZ`), the size of `struct virtio_net_hdr_v1` (the 10-byte
//! legacy header plus `num_buffers`), which is what a VIRTIO_F_VERSION_1
//! driver puts in front of every frame: the header passes between guest
//! buffers and the tap unchanged. The kernel writes only the first 10 bytes
//! on a read and skips the last 2 (`num_buffers`) on both reads and writes.
//!
//! Offloads (`TUNSETOFFLOAD`) say what the *reader* of the tap (the guest)
//! accepts: partially checksummed packets (`TUN_F_CSUM`) and TCP
//! segmentation offload packets (`TUN_F_TSO4/6`, only together with
//! `TUN_F_CSUM`). Frames written to the tap may carry any GSO type the
//! kernel knows regardless of these flags; the kernel checks the header
//! (`virtio_net_hdr_to_skb`), as it does for any tap user.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

/// Size of the virtio-net header on the tap: `struct virtio_net_hdr_v1`.
pub const VNET_HDR_LEN: usize = 12;
/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

const TUN_PATH: &str = "/dev/net/tun";

/// `struct ifreq` as the TUNSETIFF/TUNGETIFF ioctls use it: the name, then
/// the flags (a `short`) at the start of the 24-byte union.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn zeroed() -> Self {
        IfReq { name: [0; 16], flags: 0, _pad: [0; 22] }
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|&b| b == 0).unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// Why a tap could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error(
        "tap name {0:?}: must be 1 to {MAX_IFNAME_LEN} bytes without '/', ':', whitespace or NUL, and not . or .."
    )]
    BadName(String),
    #[error("opening {TUN_PATH}: {0} (is the tun module loaded?)")]
    OpenTun(io::Error),
    #[error("tap {name}: TUNSETIFF (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR): {source}")]
    SetIff { name: String, source: io::Error },
    #[error("net fd {fd}: not an open file descriptor (was it inherited without FD_CLOEXEC?)")]
    FdNotOpen { fd: RawFd },
    #[error("net fd {fd}: stdin, stdout and stderr cannot be a tap")]
    FdStdio { fd: RawFd },
    #[error("net fd {fd}: already used by another net device")]
    FdInUse { fd: RawFd },
    #[error("net fd {fd}: not a tap device ({source})")]
    NotTun { fd: RawFd, source: io::Error },
    #[error(
        "net fd {fd}: tap {name} was opened with flags {flags:#x}; open it with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (missing: {missing})"
    )]
    WrongFlags { fd: RawFd, name: String, flags: i32, missing: String },
    #[error("tap {name}: {op}: {source}")]
    Setup { name: String, op: &'static str, source: io::Error },
}

/// Descriptors owned by a [`Tap`] in this process: `Tap::from_fd` refuses
/// them (two owners would close one descriptor twice).
static OWNED_FDS: Mutex<Option<HashSet<RawFd>>> = Mutex::new(None);

fn claim_fd(fd: RawFd) -> bool {
    let mut g = OWNED_FDS.lock().unwrap_or_else(|p| p.into_inner());
    g.get_or_insert_with(HashSet::new).insert(fd)
}

fn release_fd(fd: RawFd) {
    let mut g = OWNED_FDS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(s) = g.as_mut() {
        s.remove(&fd);
    }
}

/// Whether `name` is a valid Linux interface name (`dev_valid_name`).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
}

/// An open tap queue, set up for virtio-net headers.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::Ioctl, arg: *mut T) -> io::Result<()> {
    // SAFETY: `arg` points to a live value of the type the request expects
    // (callers pass an IfReq for TUN[GS]ETIFF, a c_int for the others).
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_val(fd: RawFd, req: libc::Ioctl, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: requests taking an integer argument by value; no memory passed.
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Attaches to the tap interface `name` in the calling thread's network
    /// namespace, creating it if it does not exist (a tap made by
    /// `ip tuntap add NAME mode tap` is reused).
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_ifname(name) {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::zeroed();
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req.flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF, &mut req)
            .map_err(|source| TapError::SetIff { name: name.to_string(), source })?;
        let tap = Tap { name: req.name(), file };
        claim_fd(tap.file.as_raw_fd());
        tap.setup()?;
        Ok(tap)
    }

    /// Takes ownership of an inherited descriptor that is already attached to
    /// a tap (opened by the parent, e.g. inside the pod's network namespace,
    /// with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`). The descriptor is made
    /// non-blocking and close-on-exec; it is closed when the device goes.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        if (0..=2).contains(&fd) {
            return Err(TapError::FdStdio { fd });
        }
        // SAFETY: F_GETFD only queries the descriptor's flags.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::FdNotOpen { fd });
        }
        let mut req = IfReq::zeroed();
        ioctl_ptr(fd, libc::TUNGETIFF, &mut req).map_err(|source| TapError::NotTun { fd, source })?;
        let flags = i32::from(req.flags);
        let mut missing = Vec::new();
        for (bit, what) in
            [(libc::IFF_TAP, "IFF_TAP"), (libc::IFF_NO_PI, "IFF_NO_PI"), (libc::IFF_VNET_HDR, "IFF_VNET_HDR")]
        {
            if flags & bit == 0 {
                missing.push(what);
            }
        }
        if !missing.is_empty() {
            return Err(TapError::WrongFlags { fd, name: req.name(), flags, missing: missing.join(", ") });
        }
        if !claim_fd(fd) {
            return Err(TapError::FdInUse { fd });
        }
        // SAFETY: the descriptor is open, is a tap, and nothing else in this
        // process owns it (checked just above): the File becomes its owner.
        let file = unsafe { File::from_raw_fd(fd) };
        let tap = Tap { file, name: req.name() };
        let setup = |op, r: libc::c_int| {
            if r < 0 {
                Err(TapError::Setup { name: tap.name.clone(), op, source: io::Error::last_os_error() })
            } else {
                Ok(r)
            }
        };
        // SAFETY: fcntl flag queries and updates on our descriptor.
        unsafe {
            setup("F_SETFD", libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC))?;
            let fl = setup("F_GETFL", libc::fcntl(fd, libc::F_GETFL))?;
            setup("F_SETFL", libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK))?;
        }
        tap.setup()?;
        Ok(tap)
    }

    /// Header size 12, no offloads until a driver accepts some.
    fn setup(&self) -> Result<(), TapError> {
        let mut size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        ioctl_ptr(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &mut size).map_err(|source| TapError::Setup {
            name: self.name.clone(),
            op: "TUNSETVNETHDRSZ 12",
            source,
        })?;
        self.set_offload(0).map_err(|source| TapError::Setup { name: self.name.clone(), op: "TUNSETOFFLOAD 0", source })
    }

    /// `TUNSETOFFLOAD`: which offloaded packets the guest accepts
    /// (`TUN_F_*` bits).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        ioctl_val(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, libc::c_ulong::from(flags))
    }

    /// The open tap, for a process that hands it to hull-vmm (`--net fd=N`).
    /// (A duplicate of the same open tap; dropping `self` closes the original.)
    pub fn into_file(self) -> io::Result<File> {
        self.file.try_clone()
    }

    /// The interface name (as the kernel reports it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included) into `iovs`; returns the frame's
    /// full length, which is larger than the buffers when the frame did
    /// not fit (the rest is lost).
    pub fn readv(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: every iovec points into memory the caller keeps mapped
        // and writable for the duration of the call (checked guest memory).
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iovs.as_ptr(), iovs.len() as libc::c_int) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame (header included) gathered from `iovs`.
    pub fn writev(&self, iovs: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: every iovec points into memory the caller keeps mapped
        // for the duration of the call.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), iovs.len() as libc::c_int) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        release_fd(self.file.as_raw_fd());
    }
}
