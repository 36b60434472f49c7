//! The vsock listener: one thread per connection, each request answered in turn.

use hull_agent_api::{parse_request, pong_line, read_line, Request, HOST_CID, READY_MARKER};
use nix::sys::socket::{accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr};
use std::io::{BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

const VMADDR_CID_ANY: u32 = u32::MAX;

pub fn serve(port: u32, notify_port: Option<u32>) -> Result<(), String> {
    let listener = socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| format!("vsock socket: {e} (is virtio-vsock present?)"))?;
    bind(listener.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))
        .map_err(|e| format!("bind vsock port {port}: {e}"))?;
    listen(&listener, Backlog::new(64).expect("valid backlog"))
        .map_err(|e| format!("listen on vsock port {port}: {e}"))?;

    // The ready line is printed only once requests can be served.
    println!("{READY_MARKER} version={} vsock_port={port}", env!("CARGO_PKG_VERSION"));
    let _ = std::io::stdout().flush();
    if let Some(p) = notify_port {
        std::thread::spawn(move || notify_host(p, port));
    }

    loop {
        let fd = match accept(listener.as_raw_fd()) {
            Ok(fd) => fd,
            Err(e) => {
                eprintln!("hull-agent: accept: {e}");
                continue;
            }
        };
        // SAFETY: accept returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        std::thread::spawn(move || handle(UnixStream::from(fd)));
    }
}

/// Tells the host we are ready: one line on a fresh connection to host port `p`.
fn notify_host(p: u32, agent_port: u32) {
    let result = (|| -> Result<(), String> {
        let fd =
            socket(AddressFamily::Vsock, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).map_err(|e| e.to_string())?;
        nix::sys::socket::connect(fd.as_raw_fd(), &VsockAddr::new(HOST_CID, p)).map_err(|e| e.to_string())?;
        let mut s = UnixStream::from(fd);
        let line = format!("{READY_MARKER} version={} vsock_port={agent_port}\n", env!("CARGO_PKG_VERSION"));
        s.write_all(line.as_bytes()).map_err(|e| e.to_string())
    })();
    if let Err(e) = result {
        eprintln!("hull-agent: notifying host port {p}: {e}");
    }
}

/// Serves one connection. The stream type is only used for Read/Write, which
/// work on any connected stream socket, vsock included.
fn handle(stream: UnixStream) {
    let mut reader = BufReader::new(stream);
    loop {
        let line = match read_line(&mut reader) {
            Ok(Some(line)) => line,
            Ok(None) => return,
            Err(e) => {
                let _ = writeln!(reader.get_mut(), "ERR {e}");
                return;
            }
        };
        let reply = match parse_request(&line) {
            Ok(Request::Ping) => pong_line(env!("CARGO_PKG_VERSION")),
            Err(e) => format!("ERR {e}\n"),
        };
        if reader.get_mut().write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}
