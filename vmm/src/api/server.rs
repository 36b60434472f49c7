//! Accepts control connections; each request line becomes a [`VmmEvent::Api`]
//! for the main loop, and its response is written back.

use super::{ErrorKind, Request, Response, MAX_REQUEST_BYTES};
use crate::vmm::VmmEvent;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{channel, Sender};

/// Binds the API socket. A live socket at `path` is an error ("in use"); a
/// stale one (nobody accepting) is replaced.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("API socket {} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    UnixListener::bind(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("binding API socket {}: {e}", path.display())))
}

/// Serves connections until the process exits.
pub fn serve(listener: UnixListener, events: Sender<VmmEvent>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let events = events.clone();
        let _ = crate::seccomp::spawn(crate::seccomp::ThreadKind::Api, "api-conn", move || handle(conn, events));
    }
}

fn handle(conn: UnixStream, events: Sender<VmmEvent>) {
    let Ok(write_half) = conn.try_clone() else { return };
    let mut out = write_half;
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = Vec::new();
        match reader.by_ref().take(MAX_REQUEST_BYTES as u64 + 1).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let resp = if line.len() > MAX_REQUEST_BYTES {
            let r = Response::error(ErrorKind::BadRequest, format!("request longer than {MAX_REQUEST_BYTES} bytes"));
            let _ = send(&mut out, &r);
            return;
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Err(e) => Response::error(ErrorKind::BadRequest, format!("not a valid request: {e}")),
                Ok(req) => {
                    let (tx, rx) = channel();
                    if events.send(VmmEvent::Api(Box::new(req), tx)).is_err() {
                        return;
                    }
                    match rx.recv() {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
            }
        };
        if send(&mut out, &resp).is_err() {
            return;
        }
    }
}

fn send(out: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut v = serde_json::to_vec(r)?;
    v.push(b'\n');
    out.write_all(&v)
}
