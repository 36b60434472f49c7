//! Process stdio on the agent side (the protocol is described in
//! `hull_agent_api::stdio`).
//!
//! CreateContainer / ExecProcess register the host-facing fds the backend
//! returned ([`StdioRegistry::register`]); the STDIO listener
//! ([`serve_stdio`]) reads each connection's header, takes the matching fd
//! out of the registry and copies bytes between it and the connection
//! (tokio, non-blocking fds). An fd nobody attached stays in the registry:
//! output written meanwhile waits in the pipe. WaitProcess uses
//! [`StdioRegistry::wait_drained`] to answer only once the output copiers
//! have reached end-of-file and shut their connections down.

use crate::backend::ProcessIo;
use futures::StreamExt;
use hull_agent_api::stdio::{err_reply, StdioHeader, StdioStream, MAX_HEADER_LEN, OK_REPLY};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::{sleep, sleep_until, timeout, Instant};

/// A process: (container id, exec id; None = the container's init).
pub type ProcKey = (String, Option<String>);

/// `container/exec` or `container/-`.
pub fn proc_name(key: &ProcKey) -> String {
    format!("{}/{}", key.0, key.1.as_deref().unwrap_or("-"))
}

/// How long a new connection may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// After CloseStdin, bytes still arriving on the stdin connection are
/// forwarded for this long, then the pipe is closed.
const CLOSE_STDIN_GRACE: Duration = Duration::from_millis(100);
const COPY_BUF: usize = 64 * 1024;

/// Where an output stream (stdout, stderr, pty) stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// Requested, no host connection yet: output waits in the buffer.
    Pending,
    /// A copier is sending it to the host.
    Attached,
    /// Drained to end-of-file and the connection shut down (or not requested,
    /// or the container was deleted).
    Done,
}

enum Slot {
    NotRequested,
    /// The host-facing fd, waiting for the host to attach.
    Pending(OwnedFd),
    Attached,
    Closed,
}

fn index(s: StdioStream) -> usize {
    match s {
        StdioStream::Stdin => 0,
        StdioStream::Stdout => 1,
        StdioStream::Stderr => 2,
        StdioStream::Pty => 3,
    }
}

/// One process's streams.
struct ProcStdio {
    name: String,
    slots: Mutex<[Slot; 4]>,
    /// Set by CloseStdin (and on delete): stops forwarding host input.
    stdin_closed: watch::Sender<bool>,
    /// Per stream (by [`index`]); stdin's is unused.
    out: [watch::Sender<OutState>; 4],
}

impl ProcStdio {
    fn slots(&self) -> MutexGuard<'_, [Slot; 4]> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pending output fd with nothing to read and no writer left: waiting
    /// for the host to attach it would gain nothing.
    fn pending_is_idle(&self, i: usize) -> bool {
        match &self.slots()[i] {
            Slot::Pending(fd) => fd_hung_up_and_empty(fd),
            _ => false,
        }
    }
}

/// poll: POLLHUP (every writer / the terminal's slave side closed) and
/// FIONREAD: nothing buffered.
fn fd_hung_up_and_empty(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    if n != 1 || p.revents & libc::POLLHUP == 0 {
        return false;
    }
    let mut avail: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut avail) };
    r == 0 && avail == 0
}

/// The streams of every process the backend created and not yet deleted.
#[derive(Default)]
pub struct StdioRegistry {
    procs: Mutex<HashMap<ProcKey, Arc<ProcStdio>>>,
}

impl StdioRegistry {
    fn procs(&self) -> MutexGuard<'_, HashMap<ProcKey, Arc<ProcStdio>>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, key: &ProcKey) -> Option<Arc<ProcStdio>> {
        self.procs().get(key).cloned()
    }

    /// Records a new process's host-facing fds (replacing an earlier process
    /// with the same key).
    pub fn register(&self, key: ProcKey, io: ProcessIo) {
        let slot = |fd: Option<OwnedFd>| fd.map(Slot::Pending).unwrap_or(Slot::NotRequested);
        let slots = [slot(io.stdin), slot(io.stdout), slot(io.stderr), slot(io.pty)];
        let out = std::array::from_fn(|i| {
            let requested = i != 0 && matches!(slots[i], Slot::Pending(_));
            watch::Sender::new(if requested { OutState::Pending } else { OutState::Done })
        });
        let p =
            ProcStdio { name: proc_name(&key), slots: Mutex::new(slots), stdin_closed: watch::Sender::new(false), out };
        self.procs().insert(key, Arc::new(p));
    }

    /// Forgets a deleted container's processes: closes the fds nobody
    /// attached and stops forwarding input. Attached output copiers end by
    /// themselves at end-of-file (the processes are gone).
    pub fn remove_container(&self, id: &str) {
        let removed: Vec<Arc<ProcStdio>> = {
            let mut procs = self.procs();
            let keys: Vec<ProcKey> = procs.keys().filter(|k| k.0 == id).cloned().collect();
            keys.iter().filter_map(|k| procs.remove(k)).collect()
        };
        for p in removed {
            let mut slots = p.slots();
            for (i, slot) in slots.iter_mut().enumerate() {
                if let Slot::Pending(_) = slot {
                    *slot = Slot::Closed;
                    p.out[i].send_replace(OutState::Done);
                }
            }
            drop(slots);
            p.stdin_closed.send_replace(true);
        }
    }

    /// CloseStdin: the process reads end-of-file on stdin (for a terminal:
    /// host input stops being forwarded; the terminal stays open for output).
    /// Err if the process is unknown.
    pub fn close_stdin(&self, key: &ProcKey) -> Result<(), String> {
        let p = self.get(key).ok_or_else(|| format!("process {} not found", proc_name(key)))?;
        let mut slots = p.slots();
        if let Slot::Pending(_) = slots[0] {
            slots[0] = Slot::Closed;
        }
        drop(slots);
        p.stdin_closed.send_replace(true);
        Ok(())
    }

    /// Waits until the process's output streams are drained: each attached
    /// one has been copied to end-of-file and its connection shut down, each
    /// unattached one is empty with no writer left. Gives up at `limit`
    /// (e.g. a background process still holds the pipe) and returns the
    /// streams that were not drained; their copiers go on.
    pub async fn wait_drained(&self, key: &ProcKey, limit: Duration) -> Vec<StdioStream> {
        let Some(p) = self.get(key) else { return Vec::new() };
        let deadline = Instant::now() + limit;
        let mut late = Vec::new();
        for s in [StdioStream::Stdout, StdioStream::Stderr, StdioStream::Pty] {
            let i = index(s);
            let mut rx = p.out[i].subscribe();
            loop {
                let state = *rx.borrow_and_update();
                if state == OutState::Done || (state == OutState::Pending && p.pending_is_idle(i)) {
                    break;
                }
                tokio::select! {
                    _ = rx.changed() => {}
                    // An unattached stream: re-check whether it went idle.
                    _ = sleep(Duration::from_millis(50)), if state == OutState::Pending => {}
                    _ = sleep_until(deadline) => {
                        late.push(s);
                        break;
                    }
                }
            }
        }
        late
    }

    /// Takes the fd a header asks for; Err = the reason to send back.
    fn attach(&self, h: &StdioHeader) -> Result<Attachment, String> {
        let key = (h.container_id.clone(), h.exec_id.clone());
        let p = self.get(&key).ok_or_else(|| format!("no process {}", proc_name(&key)))?;
        let i = index(h.stream);
        let mut slots = p.slots();
        let fd = match std::mem::replace(&mut slots[i], Slot::Attached) {
            Slot::Pending(fd) => fd,
            other => {
                let why = match other {
                    Slot::NotRequested => "was not requested",
                    Slot::Closed => "is closed",
                    _ => "is already attached",
                };
                slots[i] = other;
                return Err(format!("{} of {} {why}", h.stream, p.name));
            }
        };
        drop(slots);
        if i != 0 {
            p.out[i].send_replace(OutState::Attached);
        }
        Ok(Attachment { proc: p.clone(), stream: h.stream, fd: Some(fd) })
    }
}

/// A stream taken out of the registry. Dropped without `take`, the fd goes
/// back (the host vanished before `OK` reached it: nothing is lost).
struct Attachment {
    proc: Arc<ProcStdio>,
    stream: StdioStream,
    fd: Option<OwnedFd>,
}

impl Attachment {
    fn take(mut self) -> (Arc<ProcStdio>, OwnedFd) {
        let fd = self.fd.take().expect("attachment taken once");
        (self.proc.clone(), fd)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        if let Some(fd) = self.fd.take() {
            let i = index(self.stream);
            self.proc.slots()[i] = Slot::Pending(fd);
            if i != 0 {
                self.proc.out[i].send_replace(OutState::Pending);
            }
        }
    }
}

/// Accepts STDIO connections until the listener ends.
pub async fn serve_stdio(mut listener: ttrpc::r#async::transport::Listener, registry: Arc<StdioRegistry>) {
    while let Some(conn) = listener.next().await {
        match conn {
            Ok(conn) => {
                tokio::spawn(serve_connection(conn, registry.clone()));
            }
            Err(e) => {
                eprintln!("hull-agent: stdio accept: {e}");
                sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One STDIO connection: header, answer, then the copy.
pub async fn serve_connection<S>(mut conn: S, registry: Arc<StdioRegistry>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let header = match timeout(HEADER_TIMEOUT, read_header(&mut conn)).await {
        Ok(Ok(line)) => StdioHeader::parse(&line),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no header within {HEADER_TIMEOUT:?}")),
    };
    let attached = header.and_then(|h| registry.attach(&h).map(|a| (h, a)));
    let (h, attachment) = match attached {
        Ok(x) => x,
        Err(reason) => {
            let _ = conn.write_all(err_reply(&reason).as_bytes()).await;
            let _ = conn.shutdown().await;
            return;
        }
    };
    if conn.write_all(OK_REPLY.as_bytes()).await.is_err() {
        return; // `attachment` puts the fd back
    }
    let (p, fd) = attachment.take();
    let what = format!("{} of {}", h.stream, p.name);
    let result = match h.stream {
        StdioStream::Stdin => copy_stdin(&p, fd, conn).await,
        StdioStream::Stdout | StdioStream::Stderr | StdioStream::Pty => {
            let r = copy_output(&p, h.stream, fd, conn).await;
            p.out[index(h.stream)].send_replace(OutState::Done);
            r
        }
    };
    if let Err(e) = result {
        eprintln!("hull-agent: {what}: {e}");
    }
}

/// Reads the header line byte by byte: raw bytes may follow it at once.
async fn read_header<S: AsyncRead + Unpin>(conn: &mut S) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    loop {
        let b = conn.read_u8().await.map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => "connection closed before the header's newline".to_string(),
            _ => format!("reading the header: {e}"),
        })?;
        if b == b'\n' {
            return Ok(line);
        }
        if line.len() + 1 >= MAX_HEADER_LEN {
            return Err(format!("header longer than {MAX_HEADER_LEN} bytes"));
        }
        line.push(b);
    }
}

/// Host → process stdin, until the host closes its side or CloseStdin.
/// Dropping the pipe then gives the process end-of-file.
async fn copy_stdin<S: AsyncRead + AsyncWrite + Unpin>(p: &ProcStdio, fd: OwnedFd, mut conn: S) -> io::Result<()> {
    let pipe = FdIo::new(fd, false)?;
    let closed = p.stdin_closed.subscribe();
    let copy = async {
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            pipe.write_all(&buf[..n]).await?;
        }
    };
    let close_requested = async {
        stdin_closed(closed).await;
        sleep(CLOSE_STDIN_GRACE).await;
    };
    let r: io::Result<()> = tokio::select! {
        r = copy => r,
        _ = close_requested => Ok(()),
    };
    // EPIPE: the process closed its stdin, nothing more to deliver.
    r.or_else(|e| if e.kind() == io::ErrorKind::BrokenPipe { Ok(()) } else { Err(e) })
}

/// Process → host (stdout, stderr), or both ways for a terminal. Returns
/// after end-of-file has been passed on and the connection shut down.
async fn copy_output<S>(p: &ProcStdio, stream: StdioStream, fd: OwnedFd, conn: S) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let pty = stream == StdioStream::Pty;
    let input_fd = if pty { Some(fd.try_clone()?) } else { None };
    let src = FdIo::new(fd, pty)?;
    let (mut rd, mut wr) = tokio::io::split(conn);

    let output = async {
        let mut buf = vec![0u8; COPY_BUF];
        let mut host_ok = true;
        loop {
            let n = src.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            // A host that went away gets nothing more, but the stream is still
            // drained so the process never blocks on a full pipe.
            if host_ok && wr.write_all(&buf[..n]).await.is_err() {
                host_ok = false;
            }
        }
        if host_ok {
            let _ = wr.shutdown().await;
        }
        Ok::<(), io::Error>(())
    };

    let input = async {
        let Some(fd) = input_fd else { return std::future::pending::<io::Result<()>>().await };
        let master = FdIo::new(fd, false)?;
        let closed = stdin_closed(p.stdin_closed.subscribe());
        tokio::pin!(closed);
        let mut buf = vec![0u8; COPY_BUF];
        loop {
            tokio::select! {
                r = rd.read(&mut buf) => {
                    let n = r?;
                    if n == 0 {
                        break;
                    }
                    master.write_all(&buf[..n]).await?;
                }
                _ = &mut closed => break,
            }
        }
        // Host input ended; the output keeps flowing.
        std::future::pending::<io::Result<()>>().await
    };

    tokio::pin!(output);
    tokio::select! {
        r = &mut output => return r,
        r = input => {
            // Input failed (e.g. terminal gone): the output side still decides.
            if let Err(e) = r {
                eprintln!("hull-agent: {} input: {e}", p.name);
            }
        }
    }
    output.await
}

/// Resolves once CloseStdin (or delete) has been requested.
async fn stdin_closed(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|c| *c).await.map(drop);
}

/// A pipe or terminal fd driven by tokio: non-blocking, readiness through
/// epoll.
pub struct FdIo {
    fd: AsyncFd<OwnedFd>,
    /// A terminal master reads EIO once the slave side is closed: end-of-file.
    eio_is_eof: bool,
}

impl FdIo {
    pub fn new(fd: OwnedFd, eio_is_eof: bool) -> io::Result<FdIo> {
        set_nonblocking(&fd)?;
        // SAFETY: the OwnedFd stays open, and the same fd, for the AsyncFd's lifetime (it owns it).
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(FdIo { fd, eio_is_eof })
    }

    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.fd.readable().await?;
            match ready.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from)) {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) if self.eio_is_eof && e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut ready = self.fd.writable().await?;
            match ready.try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from)) {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}
