//! The wire protocol between the host (shim, tools) and `hull-agent` in the guest.
//!
//! Until the ttrpc service lands, the agent speaks one line-based request over a
//! vsock stream: `PING\n` is answered with `PONG <agent version>\n`.

pub mod transport;

use std::io::{self, BufRead, BufReader, Read, Write};

/// Version of this protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Default vsock port the agent listens on (overridable by `hull.agent_port=` on
/// the guest kernel command line).
pub const DEFAULT_AGENT_PORT: u32 = 1024;

/// Kernel command-line key that sets the agent's vsock port.
pub const CMDLINE_AGENT_PORT: &str = "hull.agent_port";

/// Kernel command-line key: if set, once ready the agent connects to this
/// host vsock port (CID 2) and sends [`READY_MARKER`] plus its version, so
/// the host learns readiness without polling.
pub const CMDLINE_NOTIFY_PORT: &str = "hull.notify_port";

/// The host's vsock CID.
pub const HOST_CID: u32 = 2;

/// The line the agent prints on the console once it serves requests.
pub const READY_MARKER: &str = "hull-agent: ready";

/// The longest request line the agent accepts; longer input is an error.
pub const MAX_LINE: usize = 4096;

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Ping,
}

/// Parses one request line (without the trailing newline).
pub fn parse_request(line: &str) -> Result<Request, String> {
    match line.trim_end_matches('\r') {
        "PING" => Ok(Request::Ping),
        "" => Err("empty request".to_string()),
        other => {
            let shown: String = other.chars().take(64).collect();
            Err(format!("unknown request {shown:?}"))
        }
    }
}

/// The agent's answer to `PING`.
pub fn pong_line(agent_version: &str) -> String {
    format!("PONG {agent_version} proto={PROTOCOL_VERSION}\n")
}

/// Reads one `\n`-terminated line of at most [`MAX_LINE`] bytes.
/// Returns `Ok(None)` on a clean end of stream before any byte.
pub fn read_line<R: Read>(r: &mut BufReader<R>) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = r.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            if buf.len() > MAX_LINE { "line too long" } else { "stream ended mid-line" },
        ));
    }
    buf.pop();
    String::from_utf8(buf).map(Some).map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "line is not UTF-8"))
}

/// Client side: sends `PING` on an already connected stream and returns the
/// agent's version string from the answer.
pub fn ping<S: Read + Write>(stream: S) -> io::Result<String> {
    let mut r = BufReader::new(stream);
    r.get_mut().write_all(b"PING\n")?;
    let line =
        read_line(&mut r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "agent closed the stream"))?;
    match line.strip_prefix("PONG ") {
        Some(rest) => Ok(rest.to_string()),
        None => Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected answer to PING: {line:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn parses_ping_and_rejects_garbage() {
        assert_eq!(parse_request("PING"), Ok(Request::Ping));
        assert_eq!(parse_request("PING\r"), Ok(Request::Ping));
        assert!(parse_request("").unwrap_err().contains("empty"));
        assert!(parse_request("DROP TABLE").unwrap_err().contains("DROP TABLE"));
    }

    #[test]
    fn read_line_limits_length() {
        let long = vec![b'a'; MAX_LINE + 10];
        let mut r = BufReader::new(Cursor::new(long));
        let err = read_line(&mut r).unwrap_err();
        assert_eq!(err.to_string(), "line too long");

        let mut r = BufReader::new(Cursor::new(b"PING\nrest".to_vec()));
        assert_eq!(read_line(&mut r).unwrap().as_deref(), Some("PING"));
        assert_eq!(read_line(&mut r).unwrap_err().to_string(), "stream ended mid-line");

        let mut r = BufReader::new(Cursor::new(Vec::new()));
        assert_eq!(read_line(&mut r).unwrap(), None);
    }

    /// A fake agent end: what `ping` writes is captured, the reply is canned input.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn ping_round_trip() {
        let mut d = Duplex { input: Cursor::new(pong_line("9.9").into_bytes()), output: vec![] };
        assert_eq!(ping(&mut d).unwrap(), "9.9 proto=1");
        assert_eq!(d.output, b"PING\n");

        let mut d = Duplex { input: Cursor::new(b"NOPE\n".to_vec()), output: vec![] };
        assert!(ping(&mut d).unwrap_err().to_string().contains("NOPE"));
    }
}
