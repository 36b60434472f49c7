//! End-to-end tests of the vsock device: a fake guest driver owns split
//! virtqueues in real guest memory, the device side is the real worker (run
//! step by step, or as the device thread through `activate`), and the host
//! side is real unix sockets.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::Muxer;
use super::packet::*;
use super::worker::{Worker, EVQ, RXQ, TXQ};
use super::*;
use crate::devices::virtio::{ActivateArgs, GuestMemory, Interrupt, VirtioDevice};

const CID: u64 = 3;
const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 256;
const RX_BUF_BASE: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
const TX_BASE: u64 = 0x40_0000;
const TX_END: u64 = 0xC0_0000;

/// Driver side of one split virtqueue.
struct TestQueue {
    desc: u64,
    avail: u64,
    used: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl TestQueue {
    fn new(mem: &GuestMemory, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let end = used + 6 + 8 * u64::from(size);
        mem.write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base)).unwrap();
        TestQueue { desc, avail, used, size, next_desc: 0, avail_idx: 0, used_seen: 0 }
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    fn write_desc(&self, mem: &GuestMemory, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = self.desc + 16 * u64::from(idx);
        mem.write_obj(addr.to_le(), GuestAddress(a)).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(a + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(a + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(a + 14)).unwrap();
    }

    fn push_avail(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2)).unwrap();
    }

    /// Adds a chain of (addr, len, device-writable) buffers; returns its head.
    fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let idxs: Vec<u16> = (0..bufs.len()).map(|i| (self.next_desc + i as u16) % self.size).collect();
        self.next_desc = (self.next_desc + bufs.len() as u16) % self.size;
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let mut flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 };
            let mut next = 0;
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
                next = idxs[i + 1];
            }
            self.write_desc(mem, idxs[i], addr, len, flags, next);
        }
        self.push_avail(mem, idxs[0]);
        idxs[0]
    }

    /// New used-ring entries (id, len).
    fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let idx: u16 = u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).unwrap());
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = u32::from_le(mem.read_obj(GuestAddress(e)).unwrap());
            let len: u32 = u32::from_le(mem.read_obj(GuestAddress(e + 4)).unwrap());
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A fake guest vsock driver.
struct Guest {
    mem: GuestMemory,
    rxq: TestQueue,
    txq: TestQueue,
    evq: TestQueue,
    rx_slots: HashMap<u16, u64>,
    free_slots: Vec<u64>,
    rx_buf_size: u32,
    tx_next: u64,
    /// Packets received and not yet looked at.
    inbox: Vec<(VsockHeader, Vec<u8>)>,
    /// Bad rx chains the device returned (len 0).
    rx_rejected: usize,
}

impl Guest {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let rxq = TestQueue::new(&mem, 0x0, QSIZE);
        let txq = TestQueue::new(&mem, 0x1_0000, QSIZE);
        let evq = TestQueue::new(&mem, 0x2_0000, QSIZE);
        Guest {
            mem,
            rxq,
            txq,
            evq,
            rx_slots: HashMap::new(),
            free_slots: (0..QSIZE as u64).map(|i| RX_BUF_BASE + i * RX_SLOT).collect(),
            rx_buf_size: (HDR_SIZE + 4096) as u32,
            tx_next: TX_BASE,
            inbox: Vec::new(),
            rx_rejected: 0,
        }
    }

    fn queues(&self) -> Vec<Queue> {
        vec![self.rxq.queue(), self.txq.queue(), self.evq.queue()]
    }

    /// Posts rx buffers until `n` are outstanding.
    fn fill_rx(&mut self, n: usize) {
        while self.rx_slots.len() < n {
            let slot = self.free_slots.pop().expect("rx slots");
            let head = self.rxq.add_chain(&self.mem, &[(slot, self.rx_buf_size, true)]);
            self.rx_slots.insert(head, slot);
        }
    }

    fn tx_alloc(&mut self, len: usize) -> u64 {
        let len = (len as u64 + 63) & !63;
        if self.tx_next + len > TX_END {
            self.tx_next = TX_BASE;
        }
        let a = self.tx_next;
        self.tx_next += len;
        a
    }

    fn send(&mut self, hdr: VsockHeader, payload: &[u8]) {
        let mut hdr = hdr;
        hdr.len = payload.len() as u32;
        self.send_raw(hdr, payload);
    }

    /// Sends with the header's len field as given.
    fn send_raw(&mut self, hdr: VsockHeader, payload: &[u8]) {
        let h = self.tx_alloc(HDR_SIZE);
        self.mem.write_slice(&hdr.to_bytes(), GuestAddress(h)).unwrap();
        if payload.is_empty() {
            self.txq.add_chain(&self.mem, &[(h, HDR_SIZE as u32, false)]);
        } else {
            let p = self.tx_alloc(payload.len());
            self.mem.write_slice(payload, GuestAddress(p)).unwrap();
            self.txq.add_chain(&self.mem, &[(h, HDR_SIZE as u32, false), (p, payload.len() as u32, false)]);
        }
    }

    /// Collects used rx buffers into the inbox and reposts them.
    fn collect_rx(&mut self) {
        for (id, len) in self.rxq.take_used(&self.mem) {
            let slot = self.rx_slots.remove(&(id as u16)).expect("known rx head");
            self.free_slots.push(slot);
            if len == 0 {
                self.rx_rejected += 1;
                continue;
            }
            assert!(len as usize >= HDR_SIZE && len <= self.rx_buf_size);
            let mut raw = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(slot)).unwrap();
            let hdr = VsockHeader::from_bytes(&raw);
            assert_eq!(hdr.len as usize, len as usize - HDR_SIZE);
            let mut payload = vec![0u8; hdr.len as usize];
            self.mem.read_slice(&mut payload, GuestAddress(slot + HDR_SIZE as u64)).unwrap();
            self.inbox.push((hdr, payload));
        }
    }

    fn hdr(&self, src_port: u32, dst_port: u32, op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: CID,
            dst_cid: VSOCK_HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }
}

/// The harness's OP_REQUEST timeout (the real one is far longer).
const TEST_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Guest + worker run step by step in the test thread.
struct Harness {
    g: Guest,
    worker: Worker,
    irq: EventFd,
    _dir: tempfile::TempDir,
    uds: PathBuf,
    reset: Arc<AtomicBool>,
    cmd: EventFd,
    /// The guest's notification on the event queue.
    evq_kick: EventFd,
    // Keeps the socket file and listener; removes the file on drop.
    _dev: Vsock,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("vsock.sock");
        let dev = Vsock::new(VsockConfig { guest_cid: CID, uds_path: uds.clone() }).unwrap();
        let g = Guest::new();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));
        let listener = dev.listener.as_ref().unwrap().try_clone().unwrap();
        let mut muxer = Muxer::new(CID, &uds, listener).unwrap();
        muxer.set_connect_timeout(TEST_CONNECT_TIMEOUT);
        let evts: Vec<EventFd> = (0..3).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        let evq_kick = evts[2].try_clone().unwrap();
        let reset = Arc::new(AtomicBool::new(false));
        let cmd = EventFd::new(EFD_NONBLOCK).unwrap();
        let worker = Worker::new(
            g.mem.clone(),
            interrupt,
            g.queues(),
            evts,
            EventFd::new(EFD_NONBLOCK).unwrap(),
            cmd.try_clone().unwrap(),
            reset.clone(),
            muxer,
        )
        .unwrap();
        Harness { g, worker, irq, _dir: dir, uds, reset, cmd, evq_kick, _dev: dev }
    }

    fn step(&mut self) {
        assert!(self.worker.run_once(Some(Duration::from_millis(20))).unwrap());
        self.g.collect_rx();
    }

    /// Steps until `pred` holds on the inbox (removing and returning the
    /// matching packet).
    fn wait_pkt(&mut self, what: &str, mut pred: impl FnMut(&VsockHeader) -> bool) -> (VsockHeader, Vec<u8>) {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(i) = self.g.inbox.iter().position(|(h, _)| pred(h)) {
                return self.g.inbox.remove(i);
            }
            assert!(Instant::now() < end, "timed out waiting for {what}; inbox {:?}", self.g.inbox);
            self.g.fill_rx(32);
            self.step();
        }
    }

    /// Runs a few idle rounds.
    fn settle(&mut self) {
        for _ in 0..5 {
            self.step();
        }
    }

    fn connect_host(&self, line: &[u8]) -> UnixStream {
        let mut c = UnixStream::connect(&self.uds).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        c.write_all(line).unwrap();
        c
    }
}

/// Reads from a stream with a short timeout while stepping the device.
fn read_while_stepping(h: &mut Harness, s: &mut UnixStream, want: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let mut out = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 65536];
    while out.len() < want {
        assert!(Instant::now() < end, "timed out reading; got {:?}", String::from_utf8_lossy(&out));
        h.step();
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
    out
}

/// Whether the host side sees EOF/reset within a few steps.
fn sees_eof(h: &mut Harness, s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 256];
    while Instant::now() < end {
        h.step();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Host connects with CONNECT <port>; guest accepts with `buf_alloc`.
/// Returns the client stream and the host-side port.
fn establish_host_conn(h: &mut Harness, port: u32, buf_alloc: u32) -> (UnixStream, u32) {
    let mut c = h.connect_host(format!("CONNECT {port}\n").as_bytes());
    let (req, _) = h.wait_pkt("REQUEST", |x| x.op == OP_REQUEST);
    assert_eq!(req.src_cid, VSOCK_HOST_CID);
    assert_eq!(req.dst_cid, CID);
    assert_eq!(req.dst_port, port);
    assert_eq!(req.type_, TYPE_STREAM);
    assert_eq!(req.buf_alloc, CONN_BUF_ALLOC);
    assert!(req.src_port >= muxer::LOCAL_PORT_BASE);
    let local = req.src_port;
    let mut resp = h.g.hdr(port, local, OP_RESPONSE);
    resp.buf_alloc = buf_alloc;
    h.g.send(resp, b"");
    let ok = read_while_stepping(h, &mut c, format!("OK {local}\n").len());
    assert_eq!(String::from_utf8(ok).unwrap(), format!("OK {local}\n"));
    (c, local)
}

#[test]
fn host_initiated_connection_end_to_end() {
    let mut h = Harness::new();
    h.g.fill_rx(32);
    let (mut c, local) = establish_host_conn(&mut h, 1024, 64 * 1024);
    assert_eq!(h.worker.muxer().num_connections(), 1);

    // host -> guest
    c.write_all(b"hello from host").unwrap();
    let (p, data) = h.wait_pkt("RW", |x| x.op == OP_RW);
    assert_eq!((p.src_port, p.dst_port), (local, 1024));
    assert_eq!(data, b"hello from host");
    assert_eq!(p.buf_alloc, CONN_BUF_ALLOC);

    // guest -> host
    h.g.send(h.g.hdr(1024, local, OP_RW), b"hello from guest");
    let got = read_while_stepping(&mut h, &mut c, 16);
    assert_eq!(got, b"hello from guest");

    // Half close from the host: the guest gets SHUTDOWN(SEND) only and may
    // still send.
    c.shutdown(Shutdown::Write).unwrap();
    let (s, _) = h.wait_pkt("SHUTDOWN", |x| x.op == OP_SHUTDOWN);
    assert_eq!(s.flags, SHUTDOWN_F_SEND);
    h.g.send(h.g.hdr(1024, local, OP_RW), b"bye");
    assert_eq!(read_while_stepping(&mut h, &mut c, 3), b"bye");

    // Guest closes: SHUTDOWN(both) -> device resets and forgets it.
    let mut sd = h.g.hdr(1024, local, OP_SHUTDOWN);
    sd.flags = SHUTDOWN_F_BOTH;
    h.g.send(sd, b"");
    h.wait_pkt("RST", |x| x.op == OP_RST && x.src_port == local);
    assert_eq!(h.worker.muxer().num_connections(), 0);
    assert!(sees_eof(&mut h, &mut c));
    // Interrupts were raised.
    assert!(h.irq.read().unwrap() > 0);
}

#[test]
fn host_close_sends_full_shutdown() {
    let mut h = Harness::new();
    let (c, local) = establish_host_conn(&mut h, 7, 64 * 1024);
    drop(c);
    let (s, _) = h.wait_pkt("SHUTDOWN", |x| x.op == OP_SHUTDOWN);
    assert_eq!(s.flags, SHUTDOWN_F_BOTH);
    // The guest acknowledges with RST.
    h.g.send(h.g.hdr(7, local, OP_RST), b"");
    h.settle();
    assert_eq!(h.worker.muxer().num_connections(), 0);
    assert!(h.g.inbox.iter().all(|(x, _)| x.op != OP_RST));
}

#[test]
fn host_to_guest_respects_credit() {
    let mut h = Harness::new();
    let guest_buf = 10_000u32;
    let (mut c, local) = establish_host_conn(&mut h, 1024, guest_buf);
    let data: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    c.write_all(&data).unwrap();

    let mut received = Vec::new();
    let mut fwd_cnt = 0u32;
    let end = Instant::now() + Duration::from_secs(10);
    while received.len() < data.len() {
        assert!(Instant::now() < end, "stalled at {}", received.len());
        h.g.fill_rx(64);
        h.settle();
        for (p, d) in std::mem::take(&mut h.g.inbox) {
            assert_eq!(p.op, OP_RW);
            received.extend_from_slice(&d);
        }
        // Never more in flight than the guest's buffer.
        assert!(
            received.len() as u32 - fwd_cnt <= guest_buf,
            "{} bytes in flight with a {guest_buf}-byte buffer",
            received.len() as u32 - fwd_cnt
        );
        // The guest consumed everything: credit update.
        fwd_cnt = received.len() as u32;
        let mut cu = h.g.hdr(1024, local, OP_CREDIT_UPDATE);
        cu.buf_alloc = guest_buf;
        cu.fwd_cnt = fwd_cnt;
        h.g.send(cu, b"");
    }
    assert_eq!(received, data);
}

#[test]
fn credit_request_and_guest_to_host_updates() {
    let mut h = Harness::new();
    let (mut c, local) = establish_host_conn(&mut h, 1024, 64 * 1024);

    let mut cr = h.g.hdr(1024, local, OP_CREDIT_REQUEST);
    cr.buf_alloc = 64 * 1024;
    h.g.send(cr, b"");
    let (u, _) = h.wait_pkt("CREDIT_UPDATE", |x| x.op == OP_CREDIT_UPDATE);
    assert_eq!((u.buf_alloc, u.fwd_cnt), (CONN_BUF_ALLOC, 0));

    // Send more than the update threshold; the host reads it all; the device
    // reports the freed space.
    let chunk = vec![0x5au8; 32 * 1024];
    let total = CREDIT_UPDATE_THRESHOLD as usize * 2;
    let mut sent = 0;
    let mut read = 0;
    let mut buf = vec![0u8; 256 * 1024];
    c.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
    while sent < total {
        h.g.send(h.g.hdr(1024, local, OP_RW), &chunk);
        sent += chunk.len();
        h.step();
        while let Ok(n) = c.read(&mut buf) {
            read += n;
            if n == 0 {
                break;
            }
        }
    }
    while read < total {
        h.step();
        if let Ok(n) = c.read(&mut buf) {
            read += n;
        }
    }
    let (u, _) = h.wait_pkt("CREDIT_UPDATE", |x| x.op == OP_CREDIT_UPDATE);
    assert!(u.fwd_cnt >= CREDIT_UPDATE_THRESHOLD);
    assert!(u.fwd_cnt as usize <= total);
}

#[test]
fn guest_overrunning_credit_is_reset() {
    let mut h = Harness::new();
    // The host never reads.
    let (_c, local) = establish_host_conn(&mut h, 1024, 64 * 1024);
    let chunk = vec![1u8; MAX_PKT_PAYLOAD];
    let mut reset = false;
    for _ in 0..64 {
        h.g.fill_rx(8);
        h.g.send(h.g.hdr(1024, local, OP_RW), &chunk);
        h.step();
        if h.g.inbox.iter().any(|(x, _)| x.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest exceeding its credit must be reset");
    assert_eq!(h.worker.muxer().num_connections(), 0);
}

#[test]
fn host_connect_refused_by_guest_closes_stream() {
    let mut h = Harness::new();
    let mut c = h.connect_host(b"CONNECT 99\n");
    let (req, _) = h.wait_pkt("REQUEST", |x| x.op == OP_REQUEST);
    h.g.send(h.g.hdr(99, req.src_port, OP_RST), b"");
    assert!(sees_eof(&mut h, &mut c));
    assert_eq!(h.worker.muxer().num_connections(), 0);
}

#[test]
fn malformed_connect_lines_close_stream() {
    let mut h = Harness::new();
    h.g.fill_rx(16);
    for line in [&b"CONNECT abc\n"[..], b"CONNECT 99999999999\n", b"HELLO 5\n", b"CONNECT 5 6\n", &[b'A'; 40][..]] {
        let mut c = h.connect_host(line);
        assert!(sees_eof(&mut h, &mut c), "{:?}", String::from_utf8_lossy(line));
    }
    assert!(h.g.inbox.is_empty());
    assert_eq!(h.worker.muxer().num_connections(), 0);
}

#[test]
fn data_sent_right_after_connect_line_is_kept() {
    let mut h = Harness::new();
    let mut c = h.connect_host(b"CONNECT 5\nearly bytes");
    let (req, _) = h.wait_pkt("REQUEST", |x| x.op == OP_REQUEST);
    h.g.send(h.g.hdr(5, req.src_port, OP_RESPONSE), b"");
    let (_, d) = h.wait_pkt("RW", |x| x.op == OP_RW);
    assert_eq!(d, b"early bytes");
    let ok = read_while_stepping(&mut h, &mut c, 3);
    assert!(ok.starts_with(b"OK "));
}

#[test]
fn guest_never_answering_times_out() {
    let mut h = Harness::new();
    let mut c = h.connect_host(b"CONNECT 5\n");
    let (req, _) = h.wait_pkt("REQUEST", |x| x.op == OP_REQUEST);
    // No answer: after the connect timeout the stream is closed and the
    // guest gets an RST.
    let start = Instant::now();
    assert!(sees_eof(&mut h, &mut c));
    assert!(start.elapsed() >= TEST_CONNECT_TIMEOUT - Duration::from_millis(200));
    let (rst, _) = h.wait_pkt("RST", |x| x.op == OP_RST);
    assert_eq!(rst.src_port, req.src_port);
}

#[test]
fn guest_initiated_connect() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_1025", h.uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();

    let mut req = h.g.hdr(5000, 1025, OP_REQUEST);
    req.buf_alloc = 64 * 1024;
    h.g.send(req, b"");
    let (resp, _) = h.wait_pkt("RESPONSE", |x| x.op == OP_RESPONSE);
    assert_eq!((resp.src_port, resp.dst_port), (1025, 5000));
    assert_eq!(resp.dst_cid, CID);
    let (mut s, _) = listener.accept().unwrap();
    s.set_nonblocking(false).unwrap();

    h.g.send(h.g.hdr(5000, 1025, OP_RW), b"ping");
    assert_eq!(read_while_stepping(&mut h, &mut s, 4), b"ping");
    s.write_all(b"pong").unwrap();
    let (p, d) = h.wait_pkt("RW", |x| x.op == OP_RW);
    assert_eq!((p.src_port, p.dst_port, d.as_slice()), (1025, 5000, &b"pong"[..]));

    // Nothing listens on 1026: RST.
    h.g.send(h.g.hdr(5001, 1026, OP_REQUEST), b"");
    let (r, _) = h.wait_pkt("RST", |x| x.op == OP_RST);
    assert_eq!((r.src_port, r.dst_port), (1026, 5001));
    assert_eq!(h.worker.muxer().num_connections(), 1);

    // Guest RST closes the host stream.
    h.g.send(h.g.hdr(5000, 1025, OP_RST), b"");
    assert!(sees_eof(&mut h, &mut s));
    assert_eq!(h.worker.muxer().num_connections(), 0);
}

#[test]
fn connection_count_is_bounded() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(format!("{}_1025", h.uds.display())).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut accepted = Vec::new();
    for i in 0..MAX_CONNECTIONS as u32 {
        h.g.send(h.g.hdr(10_000 + i, 1025, OP_REQUEST), b"");
        if i % 64 == 63 {
            h.step();
            while let Ok((s, _)) = listener.accept() {
                accepted.push(s);
            }
        }
    }
    h.settle();
    while let Ok((s, _)) = listener.accept() {
        accepted.push(s);
    }
    assert_eq!(h.worker.muxer().num_connections(), MAX_CONNECTIONS);
    h.g.send(h.g.hdr(99_999, 1025, OP_REQUEST), b"");
    h.wait_pkt("RST", |x| x.op == OP_RST && x.dst_port == 99_999);
    assert_eq!(h.worker.muxer().num_connections(), MAX_CONNECTIONS);
}

#[test]
fn hostile_tx_packets_are_dropped_or_reset() {
    let mut h = Harness::new();
    h.g.fill_rx(64);
    let base = h.g.hdr(6000, 1025, OP_REQUEST);

    // Spoofed source CID, foreign destination CID, unknown op: dropped.
    let mut p = base;
    p.src_cid = 4;
    h.g.send(p, b"");
    let mut p = base;
    p.dst_cid = 7;
    h.g.send(p, b"");
    let mut p = base;
    p.op = 99;
    h.g.send(p, b"");
    let mut p = base;
    p.op = OP_INVALID;
    h.g.send(p, b"");
    // A control op carrying a payload: dropped.
    let mut p = base;
    p.op = OP_CREDIT_REQUEST;
    h.g.send(p, b"xx");
    // len larger than the buffers / than the maximum: dropped.
    let mut p = h.g.hdr(6000, 1025, OP_RW);
    p.len = 100;
    h.g.send_raw(p, b"short");
    p.len = (MAX_PKT_PAYLOAD + 1) as u32;
    h.g.send_raw(p, &vec![0u8; MAX_PKT_PAYLOAD + 1]);
    h.settle();
    assert!(h.g.inbox.is_empty(), "{:?}", h.g.inbox);

    // Non-stream type: RST.
    let mut p = base;
    p.type_ = 2;
    h.g.send(p, b"");
    h.wait_pkt("RST for dgram", |x| x.op == OP_RST && x.dst_port == 6000);
    // Data for a connection that does not exist: RST.
    h.g.send(h.g.hdr(6001, 1025, OP_RW), b"data");
    h.wait_pkt("RST for unknown conn", |x| x.op == OP_RST && x.dst_port == 6001);
    // An RST for an unknown connection is not answered.
    h.g.send(h.g.hdr(6002, 1025, OP_RST), b"");
    h.settle();
    assert!(h.g.inbox.is_empty());

    // Hostile descriptor chains.
    let mem = h.g.mem.clone();
    let hdr_addr = 0xD0_0000u64;
    mem.write_slice(&h.g.hdr(6003, 1025, OP_RW).to_bytes(), GuestAddress(hdr_addr)).unwrap();
    // Device-writable descriptor in tx.
    h.g.txq.add_chain(&mem, &[(hdr_addr, 44, true)]);
    // Header shorter than 44 bytes.
    h.g.txq.add_chain(&mem, &[(hdr_addr, 43, false)]);
    // Buffer outside guest memory.
    h.g.txq.add_chain(&mem, &[(hdr_addr, 44, false), (MEM_SIZE as u64 - 2, 100, false)]);
    h.g.txq.add_chain(&mem, &[(u64::MAX - 8, 44, false)]);
    // A descriptor looping onto itself.
    let idx = h.g.txq.next_desc;
    h.g.txq.write_desc(&mem, idx, hdr_addr, 44, VRING_DESC_F_NEXT as u16, idx);
    h.g.txq.next_desc += 1;
    h.g.txq.push_avail(&mem, idx);
    // next index out of the table.
    let idx = h.g.txq.next_desc;
    h.g.txq.write_desc(&mem, idx, hdr_addr, 44, VRING_DESC_F_NEXT as u16, 999);
    h.g.txq.next_desc += 1;
    h.g.txq.push_avail(&mem, idx);
    // Head index out of range in the avail ring.
    h.g.txq.push_avail(&mem, 300);
    h.settle();
    // Every valid head came back as used; the device still works.
    let used = h.g.txq.take_used(&mem);
    assert!(used.iter().all(|&(_, len)| len == 0));
    // 7 dropped + 3 answered + 6 hostile chains (head 300 cannot be used).
    assert_eq!(used.len(), 16);

    let (_c, _local) = establish_host_conn(&mut h, 77, 4096);
}

#[test]
fn hostile_rx_chains_are_skipped() {
    let mut h = Harness::new();
    let mem = h.g.mem.clone();
    // A readable descriptor in rx, and one too small for the header.
    let a = h.g.rxq.add_chain(&mem, &[(0xD0_0000, 4096, false)]);
    let b = h.g.rxq.add_chain(&mem, &[(0xD1_0000, 43, true)]);
    let c = h.g.rxq.add_chain(&mem, &[(MEM_SIZE as u64 - 10, 100, true)]);
    let d = h.g.rxq.add_chain(&mem, &[(0xD2_0000, 4096, true), (0xD3_0000, 4096, false)]);
    // Reuse regular slots as bookkeeping for the guest's free list.
    for head in [a, b, c, d] {
        let slot = h.g.free_slots.pop().unwrap();
        h.g.rx_slots.insert(head, slot);
    }
    // Something to deliver: an RST for an unknown connection.
    h.g.send(h.g.hdr(1, 2, OP_RW), b"x");
    h.wait_pkt("RST", |x| x.op == OP_RST);
    assert_eq!(h.g.rx_rejected, 4);
}

#[test]
fn rx_header_split_over_descriptors() {
    let mut h = Harness::new();
    let mem = h.g.mem.clone();
    let head = h.g.rxq.add_chain(&mem, &[(0xE0_0000, 10, true), (0xE1_0000, 34, true)]);
    h.g.send(h.g.hdr(1, 2, OP_CREDIT_UPDATE), b"");
    // Not h.step(): the guest helper does not know this chain.
    h.worker.run_once(Some(Duration::from_millis(20))).unwrap();
    let used = h.g.rxq.take_used(&mem);
    assert_eq!(used, vec![(u32::from(head), 44)]);
    let mut raw = [0u8; 44];
    mem.read_slice(&mut raw[..10], GuestAddress(0xE0_0000)).unwrap();
    mem.read_slice(&mut raw[10..], GuestAddress(0xE1_0000)).unwrap();
    let r = VsockHeader::from_bytes(&raw);
    assert_eq!((r.op, r.src_port, r.dst_port), (OP_RST, 2, 1));
}

#[test]
fn transport_reset_event() {
    let mut h = Harness::new();
    let (mut c, _) = establish_host_conn(&mut h, 1024, 4096);
    let mem = h.g.mem.clone();
    // A bad event buffer first (too small), then a good one.
    h.g.evq.add_chain(&mem, &[(0xC0_0000, 2, true)]);
    let good = h.g.evq.add_chain(&mem, &[(0xC1_0000, 8, true)]);
    mem.write_obj(0xffff_ffffu32, GuestAddress(0xC1_0000)).unwrap();
    h.reset.store(true, std::sync::atomic::Ordering::SeqCst);
    h.cmd.write(1).unwrap();
    h.step();
    let used = h.g.evq.take_used(&mem);
    assert_eq!(used.len(), 2);
    assert_eq!(used[1], (u32::from(good), 4));
    let id: u32 = mem.read_obj(GuestAddress(0xC1_0000)).unwrap();
    assert_eq!(id, EVENT_TRANSPORT_RESET);
    assert_eq!(h.worker.muxer().num_connections(), 0);
    assert!(sees_eof(&mut h, &mut c));
}

/// After a transport reset, new host connections wait until the guest has
/// handled the event (it kicks the event queue when it gives the buffer
/// back), however long that takes within RESET_ACK_TIMEOUT: a connection
/// made before would be reset by the guest's late event handling.
#[test]
fn host_connections_wait_for_the_guest_to_take_the_reset() {
    let mut h = Harness::new();
    let mem = h.g.mem.clone();
    h.g.evq.add_chain(&mem, &[(0xC1_0000, 8, true)]);
    h.reset.store(true, std::sync::atomic::Ordering::SeqCst);
    h.cmd.write(1).unwrap();
    h.step();
    assert_eq!(h.g.evq.take_used(&mem).len(), 1, "event delivered");
    let mut c = h.connect_host(b"CONNECT 1024\n");
    // Far longer than the guest's event work normally takes (ms).
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        h.g.fill_rx(32);
        h.step();
    }
    assert!(h.g.inbox.iter().all(|(p, _)| p.op != OP_REQUEST), "no REQUEST before the guest took the reset");
    let mut b = [0u8; 8];
    assert!(matches!(c.read(&mut b), Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)));
    // The guest handled the event and refilled its buffer.
    h.g.evq.add_chain(&mem, &[(0xC1_0000, 8, true)]);
    h.evq_kick.write(1).unwrap();
    let (req, _) = h.wait_pkt("REQUEST", |x| x.op == OP_REQUEST);
    assert_eq!(req.dst_port, 1024);
}

#[test]
fn config_space_and_features() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = Vsock::new(VsockConfig { guest_cid: 0x1122_3344, uds_path: dir.path().join("v.sock") }).unwrap();
    assert_eq!(v.device_type(), 19);
    assert_eq!(v.queue_max_sizes(), &[256, 256, 256]);
    assert_eq!(v.avail_features(), crate::devices::virtio::VIRTIO_F_VERSION_1);
    let mut b = [0xffu8; 8];
    v.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 0x1122_3344);
    let mut b = [0xffu8; 4];
    v.read_config(6, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    v.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0, 0, 0, 0]);
    v.write_config(0, &[1, 2, 3]);
    let mut b = [0u8; 4];
    v.read_config(0, &mut b);
    assert_eq!(b, [0x44, 0x33, 0x22, 0x11]);
    v.set_acked_features(u64::MAX);
    let st = v.state();
    assert_eq!(st.acked_features, crate::devices::virtio::VIRTIO_F_VERSION_1);
    let json = serde_json::to_string(&st).unwrap();
    let back: VsockState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, st);
    drop(v);
    let v2 = Vsock::from_state(&back).unwrap();
    assert_eq!(v2.state(), st);
}

#[test]
fn socket_path_checks() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("busy.sock");
    let _l = UnixListener::bind(&p).unwrap();
    let err = Vsock::new(VsockConfig { guest_cid: 3, uds_path: p.clone() }).err().expect("busy path must fail");
    assert!(matches!(err, VsockError::PathInUse(_)));
    assert_eq!(err.to_string(), format!("socket path {} is in use", p.display()));
    assert!(p.exists());

    // A stale socket file is replaced.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let v = Vsock::new(VsockConfig { guest_cid: 3, uds_path: stale.clone() }).unwrap();
    assert!(UnixStream::connect(&stale).is_ok());
    drop(v);
    assert!(!stale.exists(), "Drop removes the socket file");

    // Never deletes a regular file.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let err = Vsock::new(VsockConfig { guest_cid: 3, uds_path: file.clone() }).err().unwrap();
    assert!(matches!(err, VsockError::NotASocket(_)), "{err}");
    assert!(file.exists());

    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(
            Vsock::new(VsockConfig { guest_cid: cid, uds_path: dir.path().join("c.sock") }),
            Err(VsockError::InvalidCid(_))
        ));
    }
    // A missing directory is an I/O error naming the path.
    let err = Vsock::new(VsockConfig { guest_cid: 3, uds_path: dir.path().join("nodir/x.sock") }).err().unwrap();
    assert!(err.to_string().contains("nodir/x.sock"), "{err}");
}

fn wait_irq(irq: &EventFd) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(n) = irq.read() {
            assert!(n >= 1);
            return;
        }
        assert!(Instant::now() < end, "no interrupt from the device thread");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Activates the real device thread and drives it through its eventfds.
#[test]
fn activated_device_thread_and_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let mut v = Vsock::new(VsockConfig { guest_cid: CID, uds_path: uds.clone() }).unwrap();
    let mut g = Guest::new();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let evts: Vec<EventFd> = (0..3).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
    let kicks: Vec<EventFd> = evts.iter().map(|e| e.try_clone().unwrap()).collect();

    // Wrong queue count is refused.
    let bad = ActivateArgs {
        mem: g.mem.clone(),
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        queues: {
            let mut q = g.queues();
            q.truncate(2);
            q
        },
        queue_evts: vec![],
    };
    assert!(v.activate(bad).is_err());

    g.fill_rx(8);
    v.activate(ActivateArgs {
        mem: g.mem.clone(),
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        queues: g.queues(),
        queue_evts: evts,
    })
    .unwrap();
    assert!(v.is_active());

    let mut c = UnixStream::connect(&uds).unwrap();
    c.write_all(b"CONNECT 1024\n").unwrap();
    wait_irq(&irq);
    let end = Instant::now() + Duration::from_secs(5);
    while g.inbox.is_empty() {
        assert!(Instant::now() < end);
        g.collect_rx();
        std::thread::sleep(Duration::from_millis(5));
    }
    let (req, _) = g.inbox.remove(0);
    assert_eq!(req.op, OP_REQUEST);
    g.send(g.hdr(1024, req.src_port, OP_RESPONSE), b"");
    kicks[TXQ].write(1).unwrap();
    let mut ok = [0u8; 16];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = c.read(&mut ok).unwrap();
    assert_eq!(&ok[..n], format!("OK {}\n", req.src_port).as_bytes());

    // Transport reset through the public API.
    let ev = g.evq.add_chain(&g.mem, &[(0xC0_0000, 4, true)]);
    v.send_transport_reset();
    kicks[EVQ].write(1).unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let used = g.evq.take_used(&g.mem);
        if !used.is_empty() {
            assert_eq!(used, vec![(u32::from(ev), 4)]);
            break;
        }
        assert!(Instant::now() < end, "no transport reset event");
        std::thread::sleep(Duration::from_millis(5));
    }
    let n = c.read(&mut ok).unwrap();
    assert_eq!(n, 0, "transport reset closes host streams");
    let _ = kicks[RXQ].write(1);

    // reset() stops the worker and allows activating again.
    assert!(v.reset());
    assert!(!v.is_active());
    let g2 = Guest::new();
    v.activate(ActivateArgs {
        mem: g2.mem.clone(),
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        queues: g2.queues(),
        queue_evts: (0..3).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect(),
    })
    .unwrap();

    let mut c2 = UnixStream::connect(&uds).unwrap();
    c2.write_all(b"CONNECT 5\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    v.shutdown();
    assert!(!v.is_active());
    assert!(!uds.exists(), "shutdown removes the socket file");
    c2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 4];
    assert!(matches!(c2.read(&mut b), Ok(0) | Err(_)));
    assert!(UnixStream::connect(&uds).is_err());
    // Activation after shutdown fails cleanly.
    let g3 = Guest::new();
    assert!(v
        .activate(ActivateArgs {
            mem: g3.mem.clone(),
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            queues: g3.queues(),
            queue_evts: (0..3).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect(),
        })
        .is_err());
    drop(v);
}

#[test]
fn host_giving_up_before_request_is_sent_is_silent() {
    let mut h = Harness::new();
    // No rx buffers: the OP_REQUEST cannot be delivered yet.
    let c = h.connect_host(b"CONNECT 5\n");
    h.settle();
    assert_eq!(h.worker.muxer().num_connections(), 1);
    drop(c);
    h.settle();
    assert_eq!(h.worker.muxer().num_connections(), 0);
    // The guest never heard of the connection: neither REQUEST nor RST.
    h.g.fill_rx(8);
    h.settle();
    assert!(h.g.inbox.is_empty(), "{:?}", h.g.inbox);
}
