//! The STDIO protocol: how a process's standard streams travel between the
//! host and the guest.
//!
//! The ttrpc API carries no process I/O. The agent listens on a second vsock
//! port, the STDIO port ([`DEFAULT_STDIO_PORT`](crate::DEFAULT_STDIO_PORT) =
//! 1025, or `hull.stdio_port=N` on the guest kernel command line), and every
//! stream of every process is one connection to it:
//!
//! 1. The host connects (vsock, or hull-vmm's hybrid socket with its
//!    `CONNECT <port>\n` handshake) and writes one header line:
//!
//!    ```text
//!    STDIO <container_id> <exec_id or -> <stdin|stdout|stderr|pty>\n
//!    ```
//!
//!    `-` names the container's init process. Ids follow
//!    [`check_id`](crate::validate::check_id); fields are separated by
//!    single spaces; the line is ASCII and at most [`MAX_HEADER_LEN`] bytes
//!    including the newline. Anything else is refused.
//! 2. The agent answers `OK\n`, or `ERR <reason>\n` and closes the
//!    connection. Reasons include: malformed header, no such process, the
//!    stream was not requested in the `Stdio` message of CreateContainer /
//!    ExecProcess, the stream is already attached.
//! 3. After `OK`, raw bytes flow:
//!    - `stdin`: host → process. When the host closes (or shuts down the
//!      write half of) the connection, or calls CloseStdin, the process
//!      reads end-of-file.
//!    - `stdout`, `stderr`: process → host. When the process (and every
//!      process that inherited the stream) has exited and all output has
//!      been sent, the agent shuts the connection down: the host reads
//!      end-of-file.
//!    - `pty` (processes with `terminal = true`): both ways over the one
//!      connection; end-of-file from the agent when the terminal closes.
//!
//! Each stream can be attached once. Output written before the host attaches
//! is not lost: it waits in the pipe (or terminal) buffer, and the process
//! blocks when that is full. WaitProcess answers only after the process has
//! exited and its attached output streams have been sent to end-of-file, so a
//! host that attaches before StartContainer (or right after ExecProcess) and
//! reads to end-of-file gets all output before the exit status. A requested
//! stream that is not attached yet but holds output is waited for too; the
//! agent stops waiting 10 s after the exit (a background process may keep a
//! pipe open forever) and answers anyway, the copy going on.
//!
//! CloseStdin gives the process end-of-file after forwarding what already
//! arrived on the stdin connection (within 100 ms); shutting down the write
//! half of the stdin connection does the same with no such window.

use crate::transport::{connect_agent, AgentAddr};
use crate::validate::{check_id, shown};
use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::str::FromStr;
use std::time::Duration;

/// Longest header line, newline included.
pub const MAX_HEADER_LEN: usize = 512;

/// The agent's answer when the stream is attached.
pub const OK_REPLY: &str = "OK\n";

/// How long [`open_stdio`] waits for the connection and the answer.
pub const DEFAULT_OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// One of a process's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StdioStream {
    Stdin,
    Stdout,
    Stderr,
    /// The terminal (master side), both directions.
    Pty,
}

impl StdioStream {
    pub const ALL: [StdioStream; 4] = [StdioStream::Stdin, StdioStream::Stdout, StdioStream::Stderr, StdioStream::Pty];

    pub fn as_str(self) -> &'static str {
        match self {
            StdioStream::Stdin => "stdin",
            StdioStream::Stdout => "stdout",
            StdioStream::Stderr => "stderr",
            StdioStream::Pty => "pty",
        }
    }
}

impl fmt::Display for StdioStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StdioStream {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        StdioStream::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown stream {} (expected stdin, stdout, stderr or pty)", shown(s)))
    }
}

/// A parsed `STDIO` header line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StdioHeader {
    pub container_id: String,
    /// None for the container's init process (`-` on the wire).
    pub exec_id: Option<String>,
    pub stream: StdioStream,
}

impl StdioHeader {
    /// Parses a header line, with or without its trailing newline. Strict:
    /// exactly four fields separated by single spaces, valid ids, a known
    /// stream, ASCII only, at most [`MAX_HEADER_LEN`] bytes.
    pub fn parse(line: &[u8]) -> Result<StdioHeader, String> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if line.len() >= MAX_HEADER_LEN {
            return Err(format!("header longer than {MAX_HEADER_LEN} bytes"));
        }
        if let Some(b) = line.iter().find(|b| !(b.is_ascii_graphic() || **b == b' ')) {
            return Err(format!("header contains byte 0x{b:02x} (printable ASCII only)"));
        }
        let line = std::str::from_utf8(line).map_err(|_| "header is not ASCII".to_string())?;
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.first() != Some(&"STDIO") {
            return Err(format!("expected \"STDIO <container_id> <exec_id|-> <stream>\", got {}", shown(line)));
        }
        let [_, container, exec, stream] = fields[..] else {
            return Err(format!(
                "expected 4 space-separated fields \"STDIO <container_id> <exec_id|-> <stream>\", got {}",
                shown(line)
            ));
        };
        check_id("container_id", container)?;
        let exec_id = match exec {
            "-" => None,
            e => {
                check_id("exec_id", e)?;
                Some(e.to_string())
            }
        };
        Ok(StdioHeader { container_id: container.to_string(), exec_id, stream: stream.parse()? })
    }

    /// The header line, newline included.
    pub fn to_line(&self) -> String {
        format!("STDIO {} {} {}\n", self.container_id, self.exec_id.as_deref().unwrap_or("-"), self.stream)
    }

    /// `container/exec` (or `container/-`), for messages.
    pub fn process_name(&self) -> String {
        format!("{}/{}", self.container_id, self.exec_id.as_deref().unwrap_or("-"))
    }
}

/// The agent's refusal line: `ERR <reason>\n`, the reason on one line.
pub fn err_reply(reason: &str) -> String {
    let one_line: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).take(400).collect();
    format!("ERR {one_line}\n")
}

/// Reads one `\n`-terminated line of at most `max` bytes, one byte at a
/// time so that nothing after the newline is consumed. The newline is not
/// returned.
pub fn read_line_exact<R: Read>(r: &mut R, max: usize) -> io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if r.read(&mut byte)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-line"));
        }
        if byte[0] == b'\n' {
            return Ok(line);
        }
        if line.len() + 1 >= max {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("line longer than {max} bytes")));
        }
        line.push(byte[0]);
    }
}

/// Host side: attaches one stream of a process. `addr` is the agent's STDIO
/// port (e.g. `api_addr.with_port(DEFAULT_STDIO_PORT)`), `exec` None for the
/// container's init process. Returns the connection, blocking and without
/// timeouts, positioned at the first raw byte.
pub fn open_stdio(
    addr: &AgentAddr,
    container: &str,
    exec: Option<&str>,
    stream: StdioStream,
) -> io::Result<UnixStream> {
    open_stdio_timeout(addr, container, exec, stream, DEFAULT_OPEN_TIMEOUT)
}

/// [`open_stdio`] with a timeout for connecting and for the agent's answer.
pub fn open_stdio_timeout(
    addr: &AgentAddr,
    container: &str,
    exec: Option<&str>,
    stream: StdioStream,
    timeout: Duration,
) -> io::Result<UnixStream> {
    let header = StdioHeader { container_id: container.to_string(), exec_id: exec.map(str::to_string), stream };
    let line = header.to_line();
    // Refuse locally what the agent would refuse.
    StdioHeader::parse(line.as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let what = format!("{stream} of {} at {addr}", header.process_name());
    let ctx = |e: io::Error| io::Error::new(e.kind(), format!("attaching {what}: {e}"));
    let mut s = connect_agent(addr, timeout).map_err(ctx)?;
    s.write_all(line.as_bytes()).map_err(ctx)?;
    let answer = read_line_exact(&mut s, MAX_HEADER_LEN).map_err(ctx)?;
    if answer != OK_REPLY.trim_end().as_bytes() {
        let answer = String::from_utf8_lossy(&answer);
        let reason = answer.strip_prefix("ERR ").unwrap_or(&answer);
        return Err(io::Error::other(format!("attaching {what}: agent refused: {reason}")));
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_headers() {
        let h = StdioHeader::parse(b"STDIO c1 - stdout\n").unwrap();
        assert_eq!(h, StdioHeader { container_id: "c1".into(), exec_id: None, stream: StdioStream::Stdout });
        assert_eq!(h.to_line(), "STDIO c1 - stdout\n");
        let h = StdioHeader::parse(b"STDIO c1 e.2 pty").unwrap();
        assert_eq!(h.exec_id.as_deref(), Some("e.2"));
        assert_eq!(h.stream, StdioStream::Pty);
        assert_eq!(StdioHeader::parse(h.to_line().as_bytes()).unwrap(), h);
    }

    #[test]
    fn rejects_bad_headers() {
        let cases: [(&[u8], &str); 11] = [
            (b"", "expected"),
            (b"HELLO c1 - stdout", "expected"),
            (b"STDIO c1 - stdout extra", "4 space-separated"),
            (b"STDIO c1  stdout", "exec_id is empty"),
            (b"STDIO c1 - ", "unknown stream"),
            (b"STDIO c1 - bogus", "unknown stream \"bogus\""),
            (b"STDIO ../x - stdout", "container_id"),
            (b"STDIO c1 .e stdout", "exec_id"),
            (b"STDIO c1 - stdout\r", "0x0d"),
            (b"STDIO c1\t- stdout", "0x09"),
            (b"STDIO \xff - stdout", "0xff"),
        ];
        for (line, want) in cases {
            let err = StdioHeader::parse(line).unwrap_err();
            assert!(err.contains(want), "{:?}: {err}", String::from_utf8_lossy(line));
        }
        let long = format!("STDIO {} - stdout", "c".repeat(600));
        assert!(StdioHeader::parse(long.as_bytes()).unwrap_err().contains("longer"));
    }

    #[test]
    fn err_reply_is_one_line() {
        assert_eq!(err_reply("a\nb"), "ERR a b\n");
    }

    #[test]
    fn reads_exactly_one_line() {
        let mut input: &[u8] = b"OK\nraw";
        assert_eq!(read_line_exact(&mut input, 16).unwrap(), b"OK");
        assert_eq!(input, b"raw");
        let mut input: &[u8] = b"0123456789";
        assert_eq!(read_line_exact(&mut input, 4).unwrap_err().kind(), io::ErrorKind::InvalidData);
        let mut input: &[u8] = b"OK";
        assert_eq!(read_line_exact(&mut input, 16).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn open_stdio_handshake() {
        use std::os::unix::net::UnixListener;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdio.sock");
        let l = UnixListener::bind(&path).unwrap();
        let agent = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            assert_eq!(read_line_exact(&mut s, MAX_HEADER_LEN).unwrap(), b"STDIO c1 e1 stdout");
            s.write_all(b"OK\nhello").unwrap();
            drop(s);
            let (mut s, _) = l.accept().unwrap();
            read_line_exact(&mut s, MAX_HEADER_LEN).unwrap();
            s.write_all(b"ERR no process c1/-\n").unwrap();
        });
        let addr = AgentAddr::Unix { path };
        let mut s = open_stdio(&addr, "c1", Some("e1"), StdioStream::Stdout).unwrap();
        let mut got = String::new();
        s.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hello");
        let err = open_stdio(&addr, "c1", None, StdioStream::Stdin).unwrap_err();
        assert!(err.to_string().contains("agent refused: no process c1/-"), "{err}");
        let err = open_stdio(&addr, "../c", None, StdioStream::Stdin).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        agent.join().unwrap();
    }
}
