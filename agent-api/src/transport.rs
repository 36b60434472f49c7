//! Host-side ways to reach the agent's vsock port.
//!
//! - `vsock`: a real AF_VSOCK connection (host kernel vsock, e.g. vhost-vsock).
//! - `hybrid`: hull-vmm's user-space vsock, whose host side is a unix socket:
//!   connect, write `CONNECT <port>\n`, and expect `OK <host port>\n`.

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

/// Where the agent is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    Vsock { cid: u32, port: u32 },
    Hybrid { socket: std::path::PathBuf, port: u32 },
}

impl FromStr for AgentAddr {
    type Err = String;
    /// `vsock:CID:PORT` or `hybrid:PATH:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected vsock:CID:PORT or hybrid:SOCKET_PATH:PORT");
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        let (head, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let port: u32 = port.parse().map_err(|_| format!("{s:?}: port {port:?} is not a number"))?;
        match kind {
            "vsock" => Ok(AgentAddr::Vsock {
                cid: head.parse().map_err(|_| format!("{s:?}: CID {head:?} is not a number"))?,
                port,
            }),
            "hybrid" if !head.is_empty() => Ok(AgentAddr::Hybrid { socket: head.into(), port }),
            _ => Err(bad()),
        }
    }
}

/// Connects to the agent, giving up after `timeout` for each step.
pub fn connect_agent(addr: &AgentAddr, timeout: Duration) -> io::Result<UnixStream> {
    match addr {
        AgentAddr::Vsock { cid, port } => connect_vsock(*cid, *port, timeout),
        AgentAddr::Hybrid { socket, port } => connect_hybrid(socket, *port, timeout),
    }
}

pub fn connect_vsock(cid: u32, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let fd: OwnedFd = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("vsock connect {cid}:{port}: {e}")))?;
    // A connected stream socket: Read/Write and timeouts work the same as for unix sockets.
    let s = UnixStream::from(fd);
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

pub fn connect_hybrid(path: &Path, port: u32, timeout: Duration) -> io::Result<UnixStream> {
    let mut s = UnixStream::connect(path)
        .map_err(|e| io::Error::new(e.kind(), format!("connect {}: {e}", path.display())))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: CONNECT {port}: {e}", path.display()));
    s.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(ctx)?;
    // Read the answer byte by byte: nothing past the newline may be consumed.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 {
        if s.read(&mut byte).map_err(ctx)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("{}: closed during CONNECT {port} (nothing listening on that guest port?)", path.display()),
            ));
        }
        if byte[0] == b'\n' {
            let answer = String::from_utf8_lossy(&line);
            return if answer.starts_with("OK ") {
                Ok(s)
            } else {
                Err(io::Error::new(io::ErrorKind::InvalidData, format!("CONNECT {port}: answer {answer:?}")))
            };
        }
        line.push(byte[0]);
    }
    Err(io::Error::new(io::ErrorKind::InvalidData, "CONNECT answer too long"))
}

/// Connects and pings, retrying until `deadline` passes (the guest may still be booting).
pub fn ping_until(addr: &AgentAddr, within: Duration) -> io::Result<String> {
    let start = std::time::Instant::now();
    loop {
        let step = Duration::from_secs(5).min(within);
        match connect_agent(addr, step).and_then(crate::ping) {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= within => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("agent at {addr:?} did not answer within {within:?}: {e}"),
                ))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    fn read_ok_line<R: Read>(r: &mut BufReader<R>) -> io::Result<String> {
        let mut s = String::new();
        r.read_line(&mut s)?;
        Ok(s)
    }

    #[test]
    fn parses_addresses() {
        assert_eq!("vsock:3:1024".parse(), Ok(AgentAddr::Vsock { cid: 3, port: 1024 }));
        assert_eq!(
            "hybrid:/run/a:b.sock:1024".parse(),
            Ok(AgentAddr::Hybrid { socket: "/run/a:b.sock".into(), port: 1024 })
        );
        assert!("vsock:x:1".parse::<AgentAddr>().unwrap_err().contains("CID"));
        assert!("tcp:1:2".parse::<AgentAddr>().is_err());
        assert!("hybrid::5".parse::<AgentAddr>().is_err());
        assert!("vsock:3:port".parse::<AgentAddr>().unwrap_err().contains("port"));
    }

    #[test]
    fn hybrid_handshake_and_ping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s);
            assert_eq!(read_ok_line(&mut r).unwrap(), "CONNECT 1024\n");
            r.get_mut().write_all(b"OK 1073741824\n").unwrap();
            assert_eq!(read_ok_line(&mut r).unwrap(), "PING\n");
            r.get_mut().write_all(crate::pong_line("1.2.3").as_bytes()).unwrap();
            // Second connection: refuse.
            let (s, _) = l.accept().unwrap();
            drop(s);
        });
        let addr = AgentAddr::Hybrid { socket: path.clone(), port: 1024 };
        let v = connect_agent(&addr, Duration::from_secs(5)).and_then(crate::ping).unwrap();
        assert!(v.starts_with("1.2.3"));
        let err = connect_hybrid(&path, 7, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("CONNECT 7"), "{err}");
        server.join().unwrap();
    }
}
