//! The host side of the vsock device: multiplexes guest connections onto
//! unix streams, Firecracker "hybrid vsock" style.
//!
//! * Host-initiated: a process connects to the device's unix listener and
//!   writes `CONNECT <port>\n`; the guest gets OP_REQUEST from a freshly
//!   allocated host port, and on OP_RESPONSE the process reads
//!   `OK <host port>\n`, then bytes are relayed both ways.
//! * Guest-initiated: OP_REQUEST to host port P connects to the unix socket
//!   `<uds_path>_<P>`.
//!
//! The muxer never blocks (all unix sockets are non-blocking), keeps every
//! per-guest structure bounded, and answers protocol violations with RST.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::connection::{ConnKey, ConnState, Connection};
use super::packet::*;
use super::unix::{connect_nonblocking, peer_hung_up};

/// Most connections (host- and guest-initiated) at a time.
pub const MAX_CONNECTIONS: usize = 256;
/// Most accepted unix streams still sending their `CONNECT` line.
pub const MAX_HANDSHAKES: usize = 32;
/// Most queued connection-less control packets (RSTs) for the guest.
pub const MAX_CTRL_QUEUE: usize = 1024;
/// Longest accepted `CONNECT <port>\n` line.
pub const MAX_CONNECT_LINE: usize = 32;
/// The guest must answer a host-initiated OP_REQUEST within this time.
/// Generous: a guest starved of CPU (a burst of restores on a busy host)
/// answers late, and a connection given up too early is only retried into
/// the same queue. A guest that never answers holds one of its own slots.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// After a full shutdown the connection is reset if the peer does not.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// A host process must send its `CONNECT` line within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// First host port handed out for host-initiated connections.
pub const LOCAL_PORT_BASE: u32 = 1 << 30;

/// epoll token of the unix listener; tokens below FIRST_STREAM_TOKEN are
/// the worker's own.
pub const TOKEN_LISTENER: u64 = 8;
const FIRST_STREAM_TOKEN: u64 = 16;

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum TokenOwner {
    Handshake,
    Conn(ConnKey),
}

/// Parses `CONNECT <u32>` (the line without its newline).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let digits = line.strip_prefix(b"CONNECT ")?;
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: HashMap<ConnKey, Connection>,
    handshakes: HashMap<u64, Handshake>,
    tokens: HashMap<u64, TokenOwner>,
    /// Connection-less packets for the guest (RSTs).
    ctrl: VecDeque<VsockHeader>,
    /// Connections that may have a packet for the guest, round robin.
    ready: VecDeque<ConnKey>,
    next_token: u64,
    next_local_port: u32,
    connect_timeout: Duration,
}

impl Muxer {
    pub fn new(guest_cid: u64, uds_path: &Path, listener: UnixListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_LISTENER))?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            conns: HashMap::new(),
            handshakes: HashMap::new(),
            tokens: HashMap::new(),
            ctrl: VecDeque::new(),
            ready: VecDeque::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_local_port: LOCAL_PORT_BASE,
            connect_timeout: CONNECT_TIMEOUT,
        })
    }

    /// Tests use a short one.
    #[cfg(test)]
    pub fn set_connect_timeout(&mut self, d: Duration) {
        self.connect_timeout = d;
    }

    /// The epoll set the worker waits on (the worker adds its own fds with
    /// tokens below 16).
    pub fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Stops (false) or restarts (true) accepting host connections; while
    /// stopped they wait in the listener's backlog.
    pub fn set_accepting(&mut self, on: bool) -> io::Result<()> {
        let fd = self.listener.as_raw_fd();
        if on {
            self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, TOKEN_LISTENER))
        } else {
            self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
        }
    }

    pub fn into_listener(self) -> UnixListener {
        self.listener
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn num_connections(&self) -> usize {
        self.conns.len()
    }

    /// Drops every connection without telling the guest (transport reset:
    /// the guest drops its side too).
    pub fn reset_all(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
        self.ctrl.clear();
        self.ready.clear();
    }

    fn alloc_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    // ---- host side -------------------------------------------------------

    /// Handles an epoll event for a token >= TOKEN_LISTENER.
    pub fn handle_event(&mut self, token: u64, events: EventSet) {
        if token == TOKEN_LISTENER {
            self.accept_all();
            return;
        }
        match self.tokens.get(&token) {
            Some(TokenOwner::Handshake) => self.handle_handshake(token),
            Some(TokenOwner::Conn(key)) => {
                let key = *key;
                self.handle_conn_event(key, events);
            }
            None => debug!("vsock: event for stale token {token}"),
        }
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            };
            if self.handshakes.len() >= MAX_HANDSHAKES {
                warn!("vsock: too many pending host connections; closing a new one");
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let token = self.alloc_token();
            if let Err(e) =
                self.epoll.ctl(ControlOperation::Add, stream.as_raw_fd(), EpollEvent::new(EventSet::IN, token))
            {
                warn!("vsock: epoll add: {e}");
                continue;
            }
            self.tokens.insert(token, TokenOwner::Handshake);
            self.handshakes
                .insert(token, Handshake { stream, line: Vec::new(), deadline: Instant::now() + HANDSHAKE_TIMEOUT });
        }
    }

    fn drop_handshake(&mut self, token: u64) -> Option<UnixStream> {
        self.tokens.remove(&token);
        let hs = self.handshakes.remove(&token)?;
        let _ = self.epoll.ctl(ControlOperation::Delete, hs.stream.as_raw_fd(), EpollEvent::default());
        Some(hs.stream)
    }

    /// Reads the `CONNECT` line one byte at a time so that no byte after the
    /// newline (data for the guest) is consumed.
    fn handle_handshake(&mut self, token: u64) {
        let Some(hs) = self.handshakes.get_mut(&token) else {
            return;
        };
        loop {
            let mut b = [0u8; 1];
            match (&hs.stream).read(&mut b) {
                Ok(0) => {
                    self.drop_handshake(token);
                    return;
                }
                Ok(_) if b[0] == b'\n' => {
                    let line = std::mem::take(&mut hs.line);
                    if let Some(stream) = self.drop_handshake(token) {
                        self.host_connect(stream, &line);
                    }
                    return;
                }
                Ok(_) => {
                    hs.line.push(b[0]);
                    if hs.line.len() >= MAX_CONNECT_LINE {
                        debug!("vsock: CONNECT line too long");
                        self.drop_handshake(token);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.drop_handshake(token);
                    return;
                }
            }
        }
    }

    fn host_connect(&mut self, stream: UnixStream, line: &[u8]) {
        let Some(peer_port) = parse_connect_line(line) else {
            debug!("vsock: malformed connect line {:?}", String::from_utf8_lossy(line));
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!("vsock: connection limit reached; refusing host connection");
            return;
        }
        let Some(local_port) = self.alloc_local_port(peer_port) else {
            return;
        };
        let key = ConnKey { local_port, peer_port };
        let token = self.alloc_token();
        let mut conn = Connection::new(key, stream, token, ConnState::LocalInit);
        conn.pending_request = true;
        conn.deadline = Some(Instant::now() + self.connect_timeout);
        self.insert_conn(conn);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = if p == u32::MAX { LOCAL_PORT_BASE } else { p + 1 };
            let key = ConnKey { local_port: p, peer_port };
            if !self.conns.keys().any(|k| k.local_port == p) && !self.conns.contains_key(&key) {
                return Some(p);
            }
        }
        None
    }

    fn insert_conn(&mut self, conn: Connection) {
        let key = conn.key;
        self.tokens.insert(conn.token, TokenOwner::Conn(key));
        self.conns.insert(key, conn);
        self.refresh(key);
    }

    fn handle_conn_event(&mut self, key: ConnKey, events: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let hup = events.intersects(EventSet::HANG_UP | EventSet::ERROR);
        if hup {
            conn.hup = true;
            conn.stream_readable = true;
            if conn.state == ConnState::LocalInit {
                // The host process gave up before the guest answered.
                self.kill(key);
                return;
            }
            if conn.guest_shut_rcv && !conn.stream_eof {
                // Nothing will be read any more: tell the guest now.
                conn.stream_eof = true;
                conn.pending_shutdown = SHUTDOWN_F_BOTH;
            }
        }
        if events.contains(EventSet::IN) {
            conn.stream_readable = true;
        }
        if hup || events.contains(EventSet::OUT) {
            self.flush_conn(key);
        } else {
            self.refresh(key);
        }
    }

    /// Writes buffered guest data to the unix stream and finishes pending
    /// shutdowns once the buffer is empty.
    fn flush_conn(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if let Err(e) = conn.flush() {
            self.abort(key, &format!("writing to the host socket: {e}"));
            return;
        }
        if conn.host_buf_empty() && conn.guest_shut_send {
            if conn.guest_shut_rcv {
                // Guest closed both directions and everything was delivered.
                self.kill(key);
                return;
            }
            if !conn.host_write_shut {
                let _ = conn.stream.shutdown(Shutdown::Write);
                conn.host_write_shut = true;
            }
        }
        if conn.credit_update_due() {
            conn.pending_credit_update = true;
        }
        self.refresh(key);
    }

    /// Brings the epoll registration and the ready list in line with the
    /// connection's state.
    fn refresh(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let want = conn.desired_events();
        if want != conn.registered {
            let fd = conn.stream.as_raw_fd();
            let res = match (conn.registered, want) {
                (None, Some(ev)) => self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(ev, conn.token)),
                (Some(_), Some(ev)) => self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(ev, conn.token)),
                (Some(_), None) => self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
                (None, None) => Ok(()),
            };
            match res {
                Ok(()) => conn.registered = want,
                Err(e) => {
                    warn!("vsock: epoll update: {e}");
                    self.kill(key);
                    return;
                }
            }
        }
        if !conn.in_ready && conn.has_pending_rx() {
            conn.in_ready = true;
            self.ready.push_back(key);
        }
    }

    /// Removes a connection without telling the guest.
    fn remove(&mut self, key: ConnKey) -> Option<Connection> {
        let conn = self.conns.remove(&key)?;
        self.tokens.remove(&conn.token);
        if conn.registered.is_some() {
            let _ = self.epoll.ctl(ControlOperation::Delete, conn.stream.as_raw_fd(), EpollEvent::default());
        }
        Some(conn)
    }

    /// [`Muxer::kill`] for a connection ended by a fault, not by either side
    /// closing it: logged, so a host process that sees its connection end
    /// (`early eof`) can be told why.
    fn abort(&mut self, key: ConnKey, why: &str) {
        warn!("vsock: {}: reset: {why}", conn_name(key));
        self.kill(key);
    }

    /// Removes a connection and resets it in the guest (unless the guest
    /// never heard of it: OP_REQUEST still unsent).
    fn kill(&mut self, key: ConnKey) {
        if let Some(mut conn) = self.remove(key) {
            if !conn.pending_request {
                let hdr = conn.header(self.guest_cid, OP_RST);
                self.push_ctrl(hdr);
            }
        }
    }

    fn push_ctrl(&mut self, hdr: VsockHeader) {
        if self.ctrl.len() >= MAX_CTRL_QUEUE {
            debug!("vsock: control queue full; dropping {:?}", hdr.op);
            return;
        }
        self.ctrl.push_back(hdr);
    }

    /// An RST answering a guest packet that has no connection.
    fn rst_reply(&mut self, h: &VsockHeader) {
        self.push_ctrl(VsockHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: self.guest_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    // ---- guest -> host ---------------------------------------------------

    /// Handles a structurally valid packet from the tx queue.
    pub fn handle_tx_packet(&mut self, pkt: TxPacket) {
        let h = pkt.hdr;
        if h.src_cid != self.guest_cid {
            debug!("vsock: dropping packet with spoofed src_cid {}", h.src_cid);
            return;
        }
        if h.dst_cid != VSOCK_HOST_CID {
            debug!("vsock: dropping packet for cid {}", h.dst_cid);
            return;
        }
        if !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&h.op) {
            debug!("vsock: dropping packet with unknown op {}", h.op);
            return;
        }
        if h.type_ != TYPE_STREAM {
            if h.op != OP_RST {
                self.rst_reply(&h);
            }
            return;
        }
        if h.op != OP_RW && h.len != 0 {
            debug!("vsock: dropping op {} with a payload", h.op);
            return;
        }
        let key = ConnKey { local_port: h.dst_port, peer_port: h.src_port };
        let Some(conn) = self.conns.get_mut(&key) else {
            match h.op {
                OP_REQUEST => self.guest_connect(&h),
                OP_RST => {}
                _ => self.rst_reply(&h),
            }
            return;
        };
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        match h.op {
            OP_REQUEST => self.abort(key, "the guest sent OP_REQUEST on an open connection"),
            OP_RESPONSE => {
                // Only an answer to an OP_REQUEST the guest actually got.
                if conn.state != ConnState::LocalInit || conn.pending_request {
                    self.abort(key, "unexpected OP_RESPONSE from the guest");
                    return;
                }
                conn.state = ConnState::Established;
                conn.deadline = None;
                conn.stream_readable = true;
                conn.queue_ctrl_bytes(format!("OK {}\n", key.local_port).as_bytes());
                self.flush_conn(key);
            }
            OP_RST => {
                // After an orderly shutdown an RST is the guest's last word;
                // before it, the guest dropped a live connection.
                let orderly = conn.sent_shutdown == SHUTDOWN_F_BOTH || (conn.guest_shut_send && conn.guest_shut_rcv);
                if !orderly && conn.state == ConnState::Established {
                    warn!("vsock: {}: the guest reset the connection", conn_name(key));
                }
                self.remove(key);
            }
            OP_SHUTDOWN => {
                if conn.state != ConnState::Established {
                    self.abort(key, "OP_SHUTDOWN before the connection was set up");
                    return;
                }
                if h.flags & SHUTDOWN_F_RECEIVE != 0 && !conn.guest_shut_rcv {
                    conn.guest_shut_rcv = true;
                    let _ = conn.stream.shutdown(Shutdown::Read);
                }
                if h.flags & SHUTDOWN_F_SEND != 0 {
                    conn.guest_shut_send = true;
                }
                if conn.guest_shut_rcv && conn.guest_shut_send && conn.deadline.is_none() {
                    conn.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
                }
                self.flush_conn(key);
            }
            OP_RW => {
                if conn.state != ConnState::Established || conn.guest_shut_send {
                    self.abort(key, "data from the guest on a connection not open for it");
                    return;
                }
                if conn.push_guest_data(&pkt.payload).is_err() {
                    self.abort(key, "the guest overran its credit or the host socket failed");
                    return;
                }
                self.flush_conn(key);
            }
            OP_CREDIT_UPDATE => self.refresh(key),
            OP_CREDIT_REQUEST => {
                conn.pending_credit_update = true;
                self.refresh(key);
            }
            _ => {}
        }
    }

    fn guest_connect(&mut self, h: &VsockHeader) {
        if self.conns.len() >= MAX_CONNECTIONS {
            warn!("vsock: connection limit reached; refusing guest connection");
            self.rst_reply(h);
            return;
        }
        let mut path = OsString::from(self.uds_path.as_os_str());
        path.push(format!("_{}", h.dst_port));
        let stream = match connect_nonblocking(Path::new(&path)) {
            Ok(s) => s,
            Err(e) => {
                info!("vsock: guest connect to port {}: {}: {e}", h.dst_port, Path::new(&path).display());
                self.rst_reply(h);
                return;
            }
        };
        let key = ConnKey { local_port: h.dst_port, peer_port: h.src_port };
        let token = self.alloc_token();
        let mut conn = Connection::new(key, stream, token, ConnState::Established);
        conn.update_peer_credit(h.buf_alloc, h.fwd_cnt);
        conn.pending_response = true;
        self.insert_conn(conn);
    }

    // ---- host -> guest ---------------------------------------------------

    /// Whether a packet may be waiting for the guest.
    pub fn has_rx(&self) -> bool {
        !self.ctrl.is_empty() || !self.ready.is_empty()
    }

    /// Produces the next packet for the guest. Payload (at most
    /// `max_payload` bytes) is read into `scratch`; returns the header and
    /// the payload length.
    pub fn next_rx(&mut self, max_payload: usize, scratch: &mut [u8]) -> Option<(VsockHeader, usize)> {
        if let Some(h) = self.ctrl.pop_front() {
            return Some((h, 0));
        }
        // Each connection gets at most one turn per call: one that cannot
        // make progress (e.g. no payload room) must not spin here.
        let mut turns = self.ready.len();
        while turns > 0 {
            turns -= 1;
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_ready = false;
            let out = self.conn_rx(key, max_payload, scratch);
            // Back of the line if it has more (round robin).
            self.refresh(key);
            if out.is_some() {
                return out;
            }
            if let Some(h) = self.ctrl.pop_front() {
                // conn_rx killed the connection.
                return Some((h, 0));
            }
        }
        None
    }

    fn conn_rx(&mut self, key: ConnKey, max_payload: usize, scratch: &mut [u8]) -> Option<(VsockHeader, usize)> {
        let cid = self.guest_cid;
        let conn = self.conns.get_mut(&key)?;
        if conn.pending_request {
            conn.pending_request = false;
            return Some((conn.header(cid, OP_REQUEST), 0));
        }
        if conn.pending_response {
            conn.pending_response = false;
            return Some((conn.header(cid, OP_RESPONSE), 0));
        }
        if conn.can_send_data() {
            let n = (conn.peer_credit() as usize).min(max_payload).min(scratch.len());
            if n > 0 {
                match (&conn.stream).read(&mut scratch[..n]) {
                    Ok(0) => {
                        conn.stream_eof = true;
                        conn.pending_shutdown = SHUTDOWN_F_SEND;
                        if conn.hup || peer_hung_up(conn.stream.as_raw_fd()) {
                            conn.pending_shutdown |= SHUTDOWN_F_RECEIVE;
                        }
                    }
                    Ok(m) => {
                        conn.tx_cnt = conn.tx_cnt.wrapping_add(m as u32);
                        return Some((conn.header(cid, OP_RW), m));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        conn.stream_readable = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.abort(key, &format!("reading the host socket: {e}"));
                        return None;
                    }
                }
            }
        }
        if conn.pending_shutdown != 0 {
            let flags = conn.pending_shutdown;
            conn.pending_shutdown = 0;
            conn.sent_shutdown |= flags;
            if conn.sent_shutdown == SHUTDOWN_F_BOTH && conn.deadline.is_none() {
                conn.deadline = Some(Instant::now() + CLOSE_TIMEOUT);
            }
            let mut h = conn.header(cid, OP_SHUTDOWN);
            h.flags = flags;
            return Some((h, 0));
        }
        if conn.pending_credit_update {
            return Some((conn.header(cid, OP_CREDIT_UPDATE), 0));
        }
        None
    }

    // ---- timers ----------------------------------------------------------

    pub fn next_deadline(&self) -> Option<Instant> {
        let c = self.conns.values().filter_map(|c| c.deadline);
        let h = self.handshakes.values().map(|h| h.deadline);
        c.chain(h).min()
    }

    pub fn process_timeouts(&mut self, now: Instant) {
        let expired: Vec<(ConnKey, bool)> = self
            .conns
            .values()
            .filter(|c| c.deadline.is_some_and(|d| d <= now))
            .map(|c| (c.key, c.state == ConnState::LocalInit))
            .collect();
        for (key, connecting) in expired {
            if connecting {
                self.abort(key, "the guest did not answer the connection request in time");
            } else {
                debug!("vsock: connection {key:?}: close timed out");
                self.kill(key);
            }
        }
        let expired: Vec<u64> = self.handshakes.iter().filter(|(_, h)| h.deadline <= now).map(|(t, _)| *t).collect();
        for t in expired {
            self.drop_handshake(t);
        }
    }
}

fn conn_name(key: ConnKey) -> String {
    format!("connection host port {} <-> guest port {}", key.local_port, key.peer_port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect_line(b"CONNECT "), None);
        assert_eq!(parse_connect_line(b"CONNECT +5"), None);
        assert_eq!(parse_connect_line(b"CONNECT -5"), None);
        assert_eq!(parse_connect_line(b"CONNECT 5 "), None);
        assert_eq!(parse_connect_line(b"connect 5"), None);
        assert_eq!(parse_connect_line(b"CONNECT 5\r"), None);
        assert_eq!(parse_connect_line(b""), None);
    }
}
