//! Small unix-socket helpers the vsock backend needs beyond `std`:
//! non-blocking connects (a full listen backlog must not block the device
//! thread), SIGPIPE-free sends and a hang-up probe.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

/// Connects a non-blocking, close-on-exec unix stream socket to `path`.
/// Never blocks: a listener with a full backlog yields `WouldBlock`.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: a zeroed sockaddr_un is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unix socket path {} is empty or too long", path.display()),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created socket we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: addr is a valid sockaddr_un and len is within its size.
    let ret = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            len as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// `send(2)` with MSG_NOSIGNAL: a closed peer gives EPIPE, never SIGPIPE.
pub fn send_nosig(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for buf.len() bytes; the result is checked.
        let n = unsafe {
            libc::send(fd, buf.as_ptr() as *const libc::c_void, buf.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT)
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Whether the peer of a unix stream closed completely (POLLHUP), as
/// opposed to only shutting down its write side.
pub fn peer_hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd { fd, events: 0, revents: 0 };
    // SAFETY: p is a valid pollfd; zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLHUP | libc::POLLERR) != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::Shutdown;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connect_send_and_hangup() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        assert_eq!(connect_nonblocking(&p).unwrap_err().kind(), io::ErrorKind::NotFound);
        let l = UnixListener::bind(&p).unwrap();
        let c = connect_nonblocking(&p).unwrap();
        let (mut s, _) = l.accept().unwrap();
        assert_eq!(send_nosig(c.as_raw_fd(), b"hi").unwrap(), 2);
        let mut b = [0u8; 2];
        s.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"hi");
        s.shutdown(Shutdown::Write).unwrap();
        assert!(!peer_hung_up(c.as_raw_fd()));
        drop(s);
        assert!(peer_hung_up(c.as_raw_fd()));
        assert!(send_nosig(c.as_raw_fd(), b"x").is_err());
        let long = dir.path().join("x".repeat(200));
        assert_eq!(connect_nonblocking(&long).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
