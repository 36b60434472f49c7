//! One vsock stream connection between a guest port and a host unix stream:
//! its state, credit accounting (virtio spec 1.2, 5.10.6.3) and the bounded
//! buffer of guest data not yet written to the unix stream.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{VsockHeader, TYPE_STREAM, VSOCK_HOST_CID};
use super::unix::send_nosig;

/// Receive buffer we advertise to the guest per connection; also the bound on
/// guest data buffered for a slow unix peer.
pub const CONN_BUF_ALLOC: u32 = 256 * 1024;

/// Send an explicit CREDIT_UPDATE once this much newly freed buffer space has
/// not been reported to the guest.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// A connection, named by its host-side ("local") port and guest-side
/// ("peer") port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local_port: u32,
    pub peer_port: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: OP_REQUEST queued or sent, waiting for OP_RESPONSE.
    LocalInit,
    /// Data may flow.
    Established,
}

/// The guest violated the protocol on this connection; it gets an RST.
#[derive(Debug)]
pub struct ProtocolViolation;

pub struct Connection {
    pub key: ConnKey,
    pub stream: UnixStream,
    /// epoll token of `stream`.
    pub token: u64,
    pub state: ConnState,

    /// Guest receive buffer as last advertised by the guest.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    pub tx_cnt: u32,
    /// Guest payload bytes written to the unix stream.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last advertised to the guest.
    pub last_fwd_cnt_sent: u32,

    /// Bytes waiting to be written to the unix stream; the first
    /// `ctrl_prefix` of them are ours (the "OK <port>\n" line), the rest is
    /// guest payload.
    host_buf: VecDeque<u8>,
    ctrl_prefix: usize,

    // Packets owed to the guest.
    pub pending_request: bool,
    pub pending_response: bool,
    pub pending_credit_update: bool,
    /// OP_SHUTDOWN flags still to send.
    pub pending_shutdown: u32,
    /// OP_SHUTDOWN flags already sent.
    pub sent_shutdown: u32,

    /// The unix stream may have data (or EOF) to read.
    pub stream_readable: bool,
    /// Read returned EOF.
    pub stream_eof: bool,
    /// The unix peer closed completely (EPOLLHUP/ERR seen); the stream is out
    /// of the epoll set.
    pub hup: bool,
    /// The guest will receive no more (SHUTDOWN_F_RECEIVE).
    pub guest_shut_rcv: bool,
    /// The guest will send no more (SHUTDOWN_F_SEND).
    pub guest_shut_send: bool,
    /// We shut down the write side of the unix stream.
    pub host_write_shut: bool,

    /// When the connection is killed unless it progresses (connect timeout in
    /// LocalInit, close timeout after a full shutdown).
    pub deadline: Option<Instant>,
    /// Queued on the muxer's ready list.
    pub in_ready: bool,
    /// Current epoll registration (None: not registered).
    pub registered: Option<EventSet>,
}

impl Connection {
    pub fn new(key: ConnKey, stream: UnixStream, token: u64, state: ConnState) -> Self {
        Connection {
            key,
            stream,
            token,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            host_buf: VecDeque::new(),
            ctrl_prefix: 0,
            pending_request: false,
            pending_response: false,
            pending_credit_update: false,
            pending_shutdown: 0,
            sent_shutdown: 0,
            stream_readable: true,
            stream_eof: false,
            hup: false,
            guest_shut_rcv: false,
            guest_shut_send: false,
            host_write_shut: false,
            deadline: None,
            in_ready: false,
            registered: None,
        }
    }

    /// Records the guest's credit information carried by every packet.
    pub fn update_peer_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes we may still send the guest:
    /// `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`, zero if the guest's
    /// numbers are inconsistent.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest payload buffered for the unix stream.
    pub fn buffered_guest_bytes(&self) -> usize {
        self.host_buf.len() - self.ctrl_prefix
    }

    pub fn host_buf_empty(&self) -> bool {
        self.host_buf.is_empty()
    }

    /// A header for a packet on this connection, carrying our credit.
    pub fn header(&mut self, guest_cid: u64, op: u16) -> VsockHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending_credit_update = false;
        VsockHeader {
            src_cid: VSOCK_HOST_CID,
            dst_cid: guest_cid,
            src_port: self.key.local_port,
            dst_port: self.key.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Whether freed buffer space should be reported with CREDIT_UPDATE.
    pub fn credit_update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Whether host data may be read and sent to the guest now.
    pub fn can_send_data(&self) -> bool {
        self.state == ConnState::Established
            && !self.pending_response
            && self.stream_readable
            && !self.stream_eof
            && !self.guest_shut_rcv
            && self.peer_credit() > 0
    }

    /// Whether the connection has a packet for the guest.
    pub fn has_pending_rx(&self) -> bool {
        self.pending_request
            || self.pending_response
            || self.pending_shutdown != 0
            || self.pending_credit_update
            || self.can_send_data()
    }

    /// The epoll events wanted for the unix stream (None: stay out of epoll).
    pub fn desired_events(&self) -> Option<EventSet> {
        if self.hup {
            // EPOLLHUP is level-triggered and cannot be masked: the stream
            // is read/flushed from the rx and tx paths until it is done.
            return None;
        }
        let mut ev = EventSet::empty();
        if self.state == ConnState::Established && !self.stream_readable && !self.stream_eof && !self.guest_shut_rcv {
            ev |= EventSet::IN;
        }
        if !self.host_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        Some(ev)
    }

    /// Queues a line of ours (not guest payload) for the unix stream.
    pub fn queue_ctrl_bytes(&mut self, bytes: &[u8]) {
        // Only used before any guest payload can exist.
        debug_assert_eq!(self.buffered_guest_bytes(), 0);
        self.host_buf.extend(bytes);
        self.ctrl_prefix += bytes.len();
    }

    /// Takes guest payload for the unix stream: written directly when
    /// possible, buffered otherwise. A guest exceeding the credit we gave it
    /// is a protocol violation.
    pub fn push_guest_data(&mut self, data: &[u8]) -> Result<(), ProtocolViolation> {
        if self.buffered_guest_bytes() + data.len() > CONN_BUF_ALLOC as usize {
            return Err(ProtocolViolation);
        }
        let mut off = 0;
        if self.host_buf.is_empty() {
            match send_nosig(self.stream.as_raw_fd(), data) {
                Ok(n) => {
                    off = n;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // A broken unix peer: the connection gets reset.
                Err(_) => return Err(ProtocolViolation),
            }
        }
        self.host_buf.extend(&data[off..]);
        Ok(())
    }

    /// Writes as much of the buffer as the unix stream takes.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.host_buf.is_empty() {
            let (front, _) = self.host_buf.as_slices();
            match send_nosig(self.stream.as_raw_fd(), front) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    let ctrl = n.min(self.ctrl_prefix);
                    self.ctrl_prefix -= ctrl;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ctrl) as u32);
                    self.host_buf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.host_buf.is_empty() {
            // Give back the memory of a large burst.
            self.host_buf.shrink_to(4096);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let key = ConnKey { local_port: 1, peer_port: 2 };
        (Connection::new(key, a, 16, ConnState::Established), b)
    }

    #[test]
    fn peer_credit_math() {
        let (mut c, _b) = conn();
        assert_eq!(c.peer_credit(), 0);
        c.update_peer_credit(1000, 0);
        assert_eq!(c.peer_credit(), 1000);
        c.tx_cnt = 600;
        assert_eq!(c.peer_credit(), 400);
        c.update_peer_credit(1000, 500);
        assert_eq!(c.peer_credit(), 900);
        // A guest claiming to have forwarded more than we sent gets nothing.
        c.update_peer_credit(1000, 700);
        assert_eq!(c.peer_credit(), 0);
        // Counters wrap.
        c.tx_cnt = 10;
        c.update_peer_credit(1000, u32::MAX - 9);
        assert_eq!(c.peer_credit(), 980);
    }

    #[test]
    fn buffer_is_bounded_by_advertised_credit() {
        let (mut c, b) = conn();
        // Fill the socket buffer of the unix pair, then our buffer.
        let chunk = vec![0u8; 64 * 1024];
        let mut sent = 0usize;
        loop {
            c.push_guest_data(&chunk).expect("within credit");
            sent += chunk.len();
            if c.buffered_guest_bytes() + chunk.len() > CONN_BUF_ALLOC as usize {
                break;
            }
        }
        assert!(c.push_guest_data(&chunk).is_err());
        assert_eq!(c.fwd_cnt as usize + c.buffered_guest_bytes(), sent);
        drop(b);
        assert!(c.flush().is_err());
    }

    #[test]
    fn ctrl_bytes_do_not_count_as_forwarded() {
        let (mut c, _b) = conn();
        c.queue_ctrl_bytes(b"OK 5\n");
        c.flush().unwrap();
        assert_eq!(c.fwd_cnt, 0);
        c.push_guest_data(b"abc").unwrap();
        assert_eq!(c.fwd_cnt, 3);
        assert!(!c.credit_update_due());
    }
}
