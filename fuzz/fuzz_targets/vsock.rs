//! virtio-vsock: packets and descriptor chains from the guest (tx), rx and
//! event buffers, and the host side's unix sockets (CONNECT lines, data,
//! hang-ups), interleaved as the input says, against the device's worker
//! and muxer run step by step.
//!
//! Checked besides "no panic, no hang": the used rings (ids, indices), every
//! packet written to the guest (addressed to it from the host CID, a stream
//! packet with a known op, its `len` matching the used length, within the
//! rx chain), the bound on connections, the `OK <port>` answer to a CONNECT
//! line, and the data of host-initiated connections both ways: what the
//! host reads is a prefix of the RW payloads the guest sent on that
//! connection, what the guest receives a prefix of what the host wrote.

#![no_main]

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::OnceLock;

use hull_fuzz::guest::arbitrary::{Result, Unstructured};
use hull_fuzz::guest::*;
use hull_vmm::devices::virtio::vsock::fuzzing::{FuzzWorker, LOCAL_PORT_BASE};
use hull_vmm::devices::virtio::vsock::packet::*;
use hull_vmm::devices::virtio::vsock::MAX_CONNECTIONS;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const CID: u64 = 3;
const MEM_END: u64 = 0x40_0000;
const BOUNDARY: u64 = 0x20_0000;
// Rings: rx, tx, event.
const RINGS: [(u64, u64, u64); 3] = [(0x0, 0x1000, 0x2000), (0x4000, 0x5000, 0x6000), (0x8000, 0x9000, 0xA000)];
const INDIRECT: u64 = 0x1_0000; // .. 0x5_0000, one table per chain
const RINGS_END: u64 = 0x5_0000;
const TX_BUF: u64 = 0x10_0000; // .. 0x1F_0000
const RX_BUF: u64 = 0x20_0000; // .. 0x2F_C000: 14 slots, one per rx chain in flight
const RX_SLOT: u64 = 0x1_2000;
const EV_BUF: u64 = 0x3F_0000;
const JUNK: u64 = 0x3F_8000;
const HOST_PORTS: [u32; 2] = [1024, 5000];

// Where corrupted descriptors point (not into the buffers of good chains).
const PALETTE: &[u64] = &[TX_BUF, TX_BUF + 0x1000, JUNK, BOUNDARY - 20, MEM_END - 44, MEM_END, 0x4000];
const LENS: &[u32] = &[0, 1, 43, 44, 45, 44 + 4096, 44 + 65536, 65536, 0x10_0000];

/// The host side: the device's socket path and two services guests can
/// connect to (`<path>_1024`, `<path>_5000`).
struct Host {
    _dir: PathBuf,
    path: PathBuf,
    listener: UnixListener,
    services: Vec<UnixListener>,
}

fn host() -> &'static Host {
    static H: OnceLock<Host> = OnceLock::new();
    H.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("hull-fuzz-vsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        remove_at_exit(dir.clone());
        let path = dir.join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let services = HOST_PORTS
            .iter()
            .map(|p| {
                let l = UnixListener::bind(dir.join(format!("v.sock_{p}"))).unwrap();
                l.set_nonblocking(true).unwrap();
                l
            })
            .collect();
        Host { _dir: dir, path, listener, services }
    })
}

/// Drops whatever an earlier run left in the listeners' backlogs.
fn drain_backlogs(h: &Host) {
    h.listener.set_nonblocking(true).unwrap();
    while h.listener.accept().is_ok() {}
    for l in &h.services {
        while l.accept().is_ok() {}
    }
}

fn port(u: &mut Unstructured) -> Result<u32> {
    Ok(match u.int_in_range(0u8..=7)? {
        0 => u.arbitrary()?,
        1 => LOCAL_PORT_BASE + u32::from(u.int_in_range(0u8..=3)?),
        2 | 3 => HOST_PORTS[u.choose_index(2)?],
        _ => 40_000 + u32::from(u.int_in_range(0u8..=3)?),
    })
}

/// A header from the guest; `seen` are (host port, guest port) pairs of
/// packets the device sent, so that the guest answers real connections.
fn header(u: &mut Unstructured, seen: &[(u32, u32)]) -> Result<VsockHeader> {
    let op = if u.ratio(1, 10)? { u.arbitrary()? } else { u.int_in_range(OP_REQUEST..=OP_CREDIT_REQUEST)? };
    let (src_port, dst_port) = if !seen.is_empty() && u.ratio(1, 2)? {
        let (host, guest) = seen[u.choose_index(seen.len())?];
        (guest, host)
    } else {
        (port(u)?, port(u)?)
    };
    Ok(VsockHeader {
        src_cid: if u.ratio(1, 10)? { u.arbitrary()? } else { CID },
        dst_cid: if u.ratio(1, 10)? { u.arbitrary()? } else { VSOCK_HOST_CID },
        src_port,
        dst_port,
        len: 0,
        type_: if u.ratio(1, 10)? { u.arbitrary()? } else { TYPE_STREAM },
        op,
        flags: if u.ratio(1, 2)? { u.int_in_range(0..=3)? } else { u.arbitrary()? },
        buf_alloc: match u.int_in_range(0u8..=3)? {
            0 => u.arbitrary()?,
            1 => 0,
            _ => 64 * 1024,
        },
        fwd_cnt: if u.ratio(1, 2)? { 0 } else { u.arbitrary()? },
    })
}

/// The host end of a unix stream.
struct HostStream {
    s: UnixStream,
    /// The guest port of a CONNECT client whose line was well-formed.
    peer: Option<u32>,
    /// The answer line as read so far, then the host port it names.
    line: Vec<u8>,
    local: Option<u32>,
    /// Bytes read after the answer line, and bytes written after the
    /// CONNECT line.
    read: Vec<u8>,
    written: Vec<u8>,
}

impl HostStream {
    fn new(s: UnixStream, peer: Option<u32>) -> HostStream {
        s.set_nonblocking(true).unwrap();
        HostStream { s, peer, line: Vec::new(), local: None, read: Vec::new(), written: Vec::new() }
    }

    /// Reads what the device sent: the `OK <port>` line (a CONNECT
    /// client), then data.
    fn drain(&mut self) {
        let mut buf = [0u8; 8192];
        loop {
            let n = match self.s.read(&mut buf) {
                Ok(n) if n > 0 => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break,
            };
            let mut data = &buf[..n];
            if self.peer.is_some() && self.local.is_none() {
                while let Some((&b, rest)) = data.split_first() {
                    data = rest;
                    if b == b'\n' {
                        let line = std::str::from_utf8(&self.line).ok();
                        let port = line.and_then(|l| l.strip_prefix("OK ")).and_then(|p| p.parse::<u32>().ok());
                        assert!(port.is_some_and(|p| p >= LOCAL_PORT_BASE), "answer line {:?}", self.line);
                        self.local = port;
                        break;
                    }
                    self.line.push(b);
                    assert!(self.line.len() < 16, "answer line {:?}", self.line);
                }
            }
            self.read.extend_from_slice(data);
        }
    }
}

/// A connection as the guest saw it.
#[derive(Default)]
struct ConnLog {
    /// OP_RW payloads sent (exact packets only) and received.
    sent: Vec<u8>,
    recv: Vec<u8>,
    /// An RW packet whose payload the device may read otherwise was sent,
    /// or one before the guest knew of the connection.
    sent_inexact: bool,
    /// The guest got the host's OP_REQUEST.
    opened: bool,
}

struct Run {
    mem: Mem,
    q: Vec<DriverQueue>,
    dev: FuzzWorker,
    /// Host ends of unix streams (CONNECT clients, accepted service
    /// connections).
    streams: Vec<HostStream>,
    /// What went over each connection (host port, guest port) on the
    /// guest's side.
    logs: HashMap<(u32, u32), ConnLog>,
    /// A corrupted tx chain or hostile tx ring: the device may have taken
    /// payload from anywhere, guest-to-host data is not checked.
    tx_tainted: bool,
    chains: u64,
    tx_slot: u64,
    /// Free rx buffer slots; rx heads in flight and their slots.
    rx_free: Vec<u64>,
    rx_slots: HashMap<u32, u64>,
    ev_slot: u64,
    /// A corrupted rx chain or hostile rx ring: the device may have written
    /// anywhere, packets are not checked.
    rx_tainted: bool,
    /// (host port, guest port) of packets the device sent (at most 16).
    seen: Vec<(u32, u32)>,
}

impl Run {
    fn taint_if_reaching_rings(&mut self, descs: &[Desc]) {
        if reaches(descs, 0, RINGS_END) {
            self.q.iter_mut().for_each(|d| d.hostile = true);
            self.rx_tainted = true;
        }
    }

    fn indirect(&mut self, u: &mut Unstructured) -> Result<Option<u64>> {
        self.chains += 1;
        Ok((u.ratio(1, 8)? && self.chains < 64).then_some(INDIRECT + 0x1000 * self.chains))
    }

    /// A packet on the tx queue: header (+ payload) in one to three
    /// descriptors, maybe corrupted.
    fn tx(&mut self, u: &mut Unstructured) -> Result<()> {
        let mut h = header(u, &self.seen)?;
        let payload_len = if h.op == OP_RW || u.ratio(1, 10)? { u.int_in_range(0..=256usize)? } else { 0 };
        h.len = match u.int_in_range(0u8..=7)? {
            0 => u.arbitrary()?,
            1 => u32::from(u.arbitrary::<u16>()?),
            _ => payload_len as u32,
        };
        let payload = u.bytes(payload_len.min(u.len()))?;
        let base = TX_BUF + 0x1_1000 * (self.tx_slot % 14);
        self.tx_slot += 1;
        let raw = h.to_bytes();
        let mut descs = match u.int_in_range(0u8..=3)? {
            0 => {
                self.mem.write_slice(&raw, GuestAddress(base)).unwrap();
                self.mem.write_slice(payload, GuestAddress(base + HDR_SIZE as u64)).unwrap();
                vec![Desc::new(base, (HDR_SIZE + payload.len()) as u32, false)]
            }
            1 => {
                // Header split over two descriptors, across a region boundary.
                let at = BOUNDARY - 20;
                self.mem.write_slice(&raw[..20], GuestAddress(at)).unwrap();
                self.mem.write_slice(&raw[20..], GuestAddress(base)).unwrap();
                self.mem.write_slice(payload, GuestAddress(base + 24)).unwrap();
                vec![Desc::new(at, 20, false), Desc::new(base, (24 + payload.len()) as u32, false)]
            }
            _ => {
                self.mem.write_slice(&raw, GuestAddress(base)).unwrap();
                self.mem.write_slice(payload, GuestAddress(base + 0x1000)).unwrap();
                let mut d = vec![Desc::new(base, HDR_SIZE as u32, false)];
                if !payload.is_empty() || u.arbitrary()? {
                    d.push(Desc::new(base + 0x1000, payload.len() as u32, false));
                }
                d
            }
        };
        if corrupt(u, &mut descs, PALETTE, LENS, self.q[1].size)? {
            self.tx_tainted = true;
        }
        self.taint_if_reaching_rings(&descs);
        let ind = self.indirect(u)?;
        if self.q[1].add_chain(&self.mem, &descs, ind).is_some()
            && h.op == OP_RW
            && (h.src_cid, h.dst_cid, h.type_) == (CID, VSOCK_HOST_CID, TYPE_STREAM)
        {
            let log = self.logs.entry((h.dst_port, h.src_port)).or_default();
            if log.opened && h.len as usize == payload.len() {
                log.sent.extend_from_slice(payload);
            } else {
                log.sent_inexact = true;
            }
        }
        Ok(())
    }

    /// rx (or event) buffers: mostly one writable descriptor per chain.
    fn buffers(&mut self, u: &mut Unstructured, qi: usize) -> Result<()> {
        for _ in 0..u.int_in_range(1..=8)? {
            let (slot, len) = if qi == 2 {
                self.ev_slot += 1;
                (EV_BUF + 16 * (self.ev_slot % 256), [4u32, 8, 3][u.choose_index(3)?])
            } else {
                let Some(slot) = self.rx_free.pop() else { break };
                (slot, [44u32 + 4096, 44 + 16, 44, 44 + 65536, 0x1_1000][u.choose_index(5)?])
            };
            let mut descs = if u.ratio(1, 4)? {
                let first = u.int_in_range(1..=len.min(60))?;
                vec![Desc::new(slot, first, true), Desc::new(slot + 0x1000, len - first, true)]
            } else {
                vec![Desc::new(slot, len, true)]
            };
            if corrupt(u, &mut descs, PALETTE, LENS, self.q[qi].size)? && qi == 0 {
                self.rx_tainted = true;
            }
            self.taint_if_reaching_rings(&descs);
            let ind = self.indirect(u)?;
            match self.q[qi].add_chain(&self.mem, &descs, ind) {
                Some(head) if qi == 0 => {
                    self.rx_slots.insert(u32::from(head), slot);
                }
                Some(_) => {}
                None => {
                    if qi == 0 {
                        self.rx_free.push(slot);
                    }
                    break;
                }
            }
        }
        Ok(())
    }

    fn host_action(&mut self, u: &mut Unstructured) -> Result<()> {
        let h = host();
        match u.int_in_range(0u8..=5)? {
            0 if self.streams.len() < 40 => {
                let Ok(mut s) = UnixStream::connect(&h.path) else { return Ok(()) };
                let (line, peer) = if u.ratio(3, 4)? {
                    let p = port(u)?;
                    (format!("CONNECT {p}\n").into_bytes(), Some(p))
                } else {
                    let n = u.int_in_range(0..=40)?;
                    (u.bytes(n)?.to_vec(), None)
                };
                // (A line this short always fits the socket buffer.)
                let _ = s.write(&line);
                self.streams.push(HostStream::new(s, peer));
            }
            1 => {
                for l in &h.services {
                    while let Ok((s, _)) = l.accept() {
                        self.streams.push(HostStream::new(s, None));
                    }
                }
            }
            2 if !self.streams.is_empty() => {
                let i = u.choose_index(self.streams.len())?;
                let n = u.int_in_range(1..=4096)?;
                let first = u.arbitrary::<u8>()?;
                let data: Vec<u8> = (0..n).map(|k| first.wrapping_add(k as u8)).collect();
                let st = &mut self.streams[i];
                if let Ok(n) = st.s.write(&data) {
                    st.written.extend_from_slice(&data[..n]);
                }
            }
            3 if !self.streams.is_empty() => {
                let i = u.choose_index(self.streams.len())?;
                let how = [Shutdown::Write, Shutdown::Read, Shutdown::Both][u.choose_index(3)?];
                let _ = self.streams[i].s.shutdown(how);
            }
            4 if !self.streams.is_empty() => {
                let i = u.choose_index(self.streams.len())?;
                self.streams.swap_remove(i);
            }
            _ => self.check_streams(),
        }
        Ok(())
    }

    /// Reads every host stream and checks both directions of each
    /// connection against what the guest side sent and received.
    fn check_streams(&mut self) {
        for st in &mut self.streams {
            st.drain();
            let (Some(local), Some(peer)) = (st.local, st.peer) else { continue };
            let log = self.logs.get(&(local, peer));
            if debug() {
                let (sent, recv) = log.map_or((0, 0), |l| (l.sent.len(), l.recv.len()));
                eprintln!(
                    "connection {local}/{peer}: host read {} wrote {}, guest sent {sent} received {recv}",
                    st.read.len(),
                    st.written.len()
                );
            }
            if !self.tx_tainted && !self.q[1].hostile && !log.is_some_and(|l| l.sent_inexact) {
                let sent = log.map_or(&[][..], |l| &l.sent[..]);
                assert!(
                    sent.starts_with(&st.read),
                    "connection {local}/{peer}: the host read {} bytes that are not what the guest sent ({} bytes)",
                    st.read.len(),
                    sent.len()
                );
            }
            if !self.rx_tainted && !self.q[0].hostile {
                let recv = log.map_or(&[][..], |l| &l.recv[..]);
                assert!(
                    st.written.starts_with(recv),
                    "connection {local}/{peer}: the guest received {} bytes that are not what the host wrote ({} bytes)",
                    recv.len(),
                    st.written.len()
                );
            }
        }
    }

    /// Takes the used entries and checks them.
    fn check(&mut self) {
        for (id, len, chain) in self.q[0].take_used(&self.mem) {
            let Some(descs) = chain else { continue };
            if let Some(slot) = self.rx_slots.remove(&id) {
                self.rx_free.push(slot);
            }
            if len == 0 || self.rx_tainted || self.q[0].hostile {
                continue;
            }
            assert!(u64::from(len) <= writable_len(&descs), "rx chain {id}: used {len} > its room {descs:x?}");
            assert!(len as usize >= HDR_SIZE, "rx chain {id}: used {len} is shorter than a header");
            let mut raw = [0u8; HDR_SIZE];
            let mut done = 0;
            for d in &descs {
                let n = (HDR_SIZE - done).min(d.len as usize);
                self.mem.read_slice(&mut raw[done..done + n], GuestAddress(d.addr)).unwrap();
                done += n;
                if done == HDR_SIZE {
                    break;
                }
            }
            let h = VsockHeader::from_bytes(&raw);
            assert_eq!((h.src_cid, h.dst_cid, h.type_), (VSOCK_HOST_CID, CID, TYPE_STREAM), "rx packet {h:?}");
            assert!((OP_REQUEST..=OP_CREDIT_UPDATE).contains(&h.op), "rx packet {h:?}");
            assert_eq!(h.len as usize + HDR_SIZE, len as usize, "rx packet {h:?}");
            assert!(h.op == OP_RW || h.len == 0, "rx packet {h:?}");
            assert!(h.len as usize <= MAX_PKT_PAYLOAD, "rx packet {h:?}");
            if h.op == OP_REQUEST {
                self.logs.entry((h.src_port, h.dst_port)).or_default().opened = true;
            }
            if h.op == OP_RW {
                let mut all = vec![0u8; len as usize];
                let mut done = 0;
                for d in &descs {
                    let n = (all.len() - done).min(d.len as usize);
                    self.mem.read_slice(&mut all[done..done + n], GuestAddress(d.addr)).unwrap();
                    done += n;
                }
                self.logs.entry((h.src_port, h.dst_port)).or_default().recv.extend_from_slice(&all[HDR_SIZE..]);
            }
            if self.seen.len() < 16 && !self.seen.contains(&(h.src_port, h.dst_port)) {
                self.seen.push((h.src_port, h.dst_port));
            }
        }
        for qi in 1..3 {
            for (id, len, _) in self.q[qi].take_used(&self.mem) {
                assert!(qi == 2 || len == 0, "tx chain {id} used with length {len}");
            }
        }
        assert!(self.dev.num_connections() <= MAX_CONNECTIONS);
    }
}

fn run(u: &mut Unstructured) -> Result<()> {
    let h = host();
    drain_backlogs(h);
    let mem = memory(&[(0, BOUNDARY as usize), (BOUNDARY, (MEM_END - BOUNDARY) as usize)]);
    let mut q = Vec::new();
    for &(d, a, us) in &RINGS {
        let size = pick_queue_size(u, 256)?;
        q.push(DriverQueue::new(&mem, d, a, us, size));
    }
    // Event indices are not offered by this device.
    let queues = q.iter().map(|d| d.queue(false)).collect();
    let listener = h.listener.try_clone().unwrap();
    let Ok(dev) = FuzzWorker::new(mem.clone(), queues, CID, &h.path, listener) else { return Ok(()) };
    let mut r = Run {
        mem,
        q,
        dev,
        streams: Vec::new(),
        chains: 0,
        tx_slot: 0,
        rx_free: (0..14).map(|i| RX_BUF + RX_SLOT * i).collect(),
        rx_slots: Default::default(),
        ev_slot: 0,
        rx_tainted: false,
        seen: Vec::new(),
        logs: HashMap::new(),
        tx_tainted: false,
    };

    for _ in 0..u.int_in_range(1..=48)? {
        match u.int_in_range(0u8..=15)? {
            0..=4 => {
                r.tx(u)?;
                r.dev.process_tx();
            }
            5..=6 => {
                r.buffers(u, 0)?;
                r.dev.process_rx();
            }
            7 => r.buffers(u, 2)?,
            8..=10 => r.host_action(u)?,
            11 => r.dev.request_transport_reset(),
            12 => {
                let qi = u.choose_index(3)?;
                let head = u.arbitrary()?;
                r.q[qi].publish_bogus(&r.mem, head);
                r.rx_tainted |= qi == 0;
            }
            13 if u.ratio(1, 4)? => {
                let qi = u.choose_index(3)?;
                let delta = u.arbitrary()?;
                r.q[qi].jump_avail_idx(&r.mem, delta);
            }
            _ => {}
        }
        r.dev.poll().unwrap();
        r.check();
    }
    r.check_streams();
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
