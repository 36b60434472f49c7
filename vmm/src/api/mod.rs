//! The control API: newline-delimited JSON over a unix stream socket.
//!
//! Each request is one JSON value on one line; each gets exactly one response
//! line. Requests:
//!
//! | request | meaning |
//! |---|---|
//! | `{"configure": VmConfig}` | set the VM configuration (before boot) |
//! | `"boot"` | build the configured VM and start it |
//! | `"pause"` / `"resume"` | stop / restart the vCPUs |
//! | `"state"` | query status, vCPUs, memory, devices |
//! | `"shutdown"` | stop the VM and exit hull-vmm (status 0) |
//! | `{"snapshot": {"dir": D}}` | write the paused VM to directory D (see `persist`) |
//! | `{"restore": RestoreConfig}` | instead of configure + boot: build the VM from a snapshot and run it |
//!
//! Responses: `{"ok": VmInfo}` or `{"error": {"kind": K, "message": M}}`
//! where K is `bad_request` (not valid JSON or not a request), `invalid_state`
//! (e.g. `boot` twice, `pause` before boot), `config` (the configuration was
//! rejected; the message names the field), `boot` (building or restoring the
//! VM failed) or `snapshot` (writing the snapshot failed).

mod server;

pub use server::{bind, serve};

use crate::config::VmConfig;
use crate::persist::RestoreConfig;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// The longest request line accepted.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    Configure(VmConfig),
    Boot,
    Pause,
    Resume,
    State,
    Shutdown,
    Snapshot { dir: PathBuf },
    Restore(RestoreConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    NotConfigured,
    Configured,
    Running,
    Paused,
    ShuttingDown,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub status: VmStatus,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// The virtio-mmio announcements on the guest command line.
    pub devices: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    BadRequest,
    InvalidState,
    Config,
    Boot,
    Snapshot,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Ok(VmInfo),
    Error(ApiError),
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response::Error(ApiError { kind, message: message.into() })
    }
}

/// A client of the control socket.
pub struct ApiClient {
    reader: BufReader<UnixStream>,
}

impl ApiClient {
    pub fn connect(path: &Path) -> std::io::Result<ApiClient> {
        let s = UnixStream::connect(path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("connect {}: {e}", path.display())))?;
        Ok(ApiClient { reader: BufReader::new(s) })
    }

    /// Sends one request, returns its response (`Err` only for transport failures).
    pub fn call(&mut self, req: &Request) -> std::io::Result<Response> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.reader.get_mut().write_all(&line)?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "hull-vmm closed the API connection"));
        }
        serde_json::from_str(&answer).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        assert_eq!(serde_json::to_string(&Request::Boot).unwrap(), r#""boot""#);
        let r: Request = serde_json::from_str(r#"{"configure":{"kernel":"/k","mem_mib":256}}"#).unwrap();
        assert!(matches!(r, Request::Configure(c) if c.mem_mib == 256));
        let r: Request = serde_json::from_str(r#"{"snapshot":{"dir":"/t"}}"#).unwrap();
        assert_eq!(r, Request::Snapshot { dir: "/t".into() });
        let r: Request =
            serde_json::from_str(r#"{"restore":{"snapshot":"/t","disks":[{"path":"/d","id":"s0"}]}}"#).unwrap();
        assert!(matches!(r, Request::Restore(c) if c.disks.len() == 1 && c.vsock.is_none()));
        let e = Response::error(ErrorKind::InvalidState, "not booted");
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"error":{"kind":"invalid_state","message":"not booted"}}"#);
    }
}
