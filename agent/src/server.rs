//! The vsock listener: one thread per connection, each request answered in turn.

use hull_agent_api::{parse_request, pong_line, read_line, Request, READY_MARKER};
use nix::sys::socket::{
    accept, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, VsockAddr,
};
use std::io::{BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

const VMADDR_CID_ANY: u32 = u32::MAX;

pub fn serve(port: u32) -> Result<(), String> {
    let listener = socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("vsock socket: {e} (is virtio-vsock present?)"))?;
    bind(listener.as_raw_fd(), &VsockAddr::new(VMADDR_CID_ANY, port))
        .map_err(|e| format!("bind vsock port {port}: {e}"))?;
    listen(&listener, Backlog::new(64).expect("valid backlog"))
        .map_err(|e| format!("listen on vsock port {port}: {e}"))?;

    // The ready line is printed only once requests can be served.
    println!(
        "{READY_MARKER} version={} vsock_port={port}",
        env!("CARGO_PKG_VERSION")
    );
    let _ = std::io::stdout().flush();

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
