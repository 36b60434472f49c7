//! Host-side ways to reach one of the agent's vsock ports (the ttrpc API port
//! or the STDIO port).
//!
//! - `vsock`: a real AF_VSOCK connection (host kernel vsock, e.g. vhost-vsock).
//! - `hybrid`: hull-vmm's user-space vsock, whose host side is a unix socket:
//!   connect, write `CONNECT <port>\n`, and expect `OK <host port>\n`.
//! - `unix`: a plain unix socket, for an agent run outside a VM
//!   (`hull-agent --listen unix:///PATH`: tests, development).
//!
//! Every function here returns a connected, blocking [`UnixStream`] (a vsock
//! stream socket behaves the same for reads, writes and timeouts).

use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, VsockAddr};
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Where the agent (one of its ports) is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAddr {
    Vsock {
        cid: u32,
        port: u32,
    },
    Hybrid {
        socket: PathBuf,
        port: u32,
    },
    /// A unix socket the agent listens on directly (agent run outside a VM).
    Unix {
        path: PathBuf,
    },
}

impl AgentAddr {
    /// The same transport, another guest port (e.g. the STDIO port next to the
    /// API port). A unix address has no port and is returned unchanged.
    pub fn with_port(&self, port: u32) -> AgentAddr {
        match self {
            AgentAddr::Vsock { cid, .. } => AgentAddr::Vsock { cid: *cid, port },
            AgentAddr::Hybrid { socket, .. } => AgentAddr::Hybrid { socket: socket.clone(), port },
            AgentAddr::Unix { path } => AgentAddr::Unix { path: path.clone() },
        }
    }
}

impl fmt::Display for AgentAddr {
    /// The form [`FromStr`] accepts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentAddr::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            AgentAddr::Hybrid { socket, port } => write!(f, "hybrid:{}:{port}", socket.display()),
            AgentAddr::Unix { path } => write!(f, "unix:{}", path.display()),
        }
    }
}

impl FromStr for AgentAddr {
    type Err = String;
    /// `vsock:CID:PORT`, `hybrid:PATH:PORT` or `unix:PATH`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: expected vsock:CID:PORT, hybrid:SOCKET_PATH:PORT or unix:SOCKET_PATH");
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            return if path.is_empty() { Err(bad()) } else { Ok(AgentAddr::Unix { path: path.into() }) };
        }
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
        AgentAddr::Unix { path } => connect_unix(path, timeout),
    }
}

pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let s =
        UnixStream::connect(path).map_err(|e| io::Error::new(e.kind(), format!("connect {}: {e}", path.display())))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
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
    let mut s =
        UnixStream::connect(path).map_err(|e| io::Error::new(e.kind(), format!("connect {}: {e}", path.display())))?;
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
    fn displays_what_it_parses() {
        for s in ["vsock:3:1024", "hybrid:/run/a:b.sock:1025", "unix:/tmp/agent.sock"] {
            assert_eq!(s.parse::<AgentAddr>().unwrap().to_string(), s);
        }
        assert_eq!("unix:///tmp/a".parse(), Ok(AgentAddr::Unix { path: "/tmp/a".into() }));
        assert!("unix:".parse::<AgentAddr>().is_err());
        let a: AgentAddr = "hybrid:/v.sock:1024".parse().unwrap();
        assert_eq!(a.with_port(1025).to_string(), "hybrid:/v.sock:1025");
    }

    #[test]
    fn hybrid_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s);
            assert_eq!(read_ok_line(&mut r).unwrap(), "CONNECT 1024\n");
            // The answer and the first payload bytes arrive together: the
            // handshake must not swallow the payload.
            r.get_mut().write_all(b"OK 1073741824\npayload").unwrap();
            // Second connection: refuse.
            let (s, _) = l.accept().unwrap();
            drop(s);
        });
        let addr = AgentAddr::Hybrid { socket: path.clone(), port: 1024 };
        let mut s = connect_agent(&addr, Duration::from_secs(5)).unwrap();
        let mut payload = [0u8; 7];
        s.read_exact(&mut payload).unwrap();
        assert_eq!(&payload, b"payload");
        let err = connect_hybrid(&path, 7, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("CONNECT 7"), "{err}");
        server.join().unwrap();
    }
}
