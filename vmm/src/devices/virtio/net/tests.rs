//! virtio-net tests with real taps. Each test runs in a thread of its own
//! that first moves into a fresh network namespace (`unshare(CLONE_NEWNET)`
//! affects only that thread, and `ip` commands it starts inherit it), so no
//! tap or address ever appears in the host's namespace; the namespace goes
//! away with the thread and the descriptors. The "wire" is an AF_PACKET
//! socket on the tap interface: frames it sends reach the device as RX,
//! frames the device transmits arrive on it.

use super::tap::Tap;
use super::worker::NetWorker;
use super::*;
use crate::devices::bus::BusDevice;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{GuestMemory, Interrupt, INT_USED_RING};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use virtio_bindings::virtio_net::{VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;
const Q_SIZE: u16 = 16;
/// Guest memory: two regions, [0, 2 MiB) and [2 MiB, 4 MiB).
const MEM_END: u64 = 0x40_0000;
const REGION_EDGE: u64 = 0x20_0000;
const RX_BASE: u64 = 0x1000;
const TX_BASE: u64 = 0x4000;
const BUF: u64 = 0x10_0000;
const BUF2: u64 = 0x12_0000;
const BIG: u64 = 0x14_0000;
/// A buffer that crosses from the first region into the second.
const SPLIT: u64 = REGION_EDGE - 0x100;
const TAP: &str = "hulltest0";
/// IEEE 802 local experimental ethertype: test frames carry it.
const TEST_ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const GUEST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const HOST_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const F_CSUM: u64 = 1 << VIRTIO_NET_F_CSUM;
const F_GUEST_CSUM: u64 = 1 << VIRTIO_NET_F_GUEST_CSUM;
const F_HOST_TSO4: u64 = 1 << VIRTIO_NET_F_HOST_TSO4;
const F_MAC: u64 = 1 << VIRTIO_NET_F_MAC;

// ---- network namespace, taps, the wire ----------------------------------

/// Runs `f` in a new thread inside a new network namespace (root needed).
fn in_netns<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            // SAFETY: plain syscall; affects only this thread.
            let r = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(r, 0, "unshare(CLONE_NEWNET): {} (the net tests run as root)", io::Error::last_os_error());
            // No IPv6 autoconfiguration traffic on the test taps.
            let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
            f()
        });
        h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn ip(args: &str) {
    let out = Command::new("ip").args(args.split_whitespace()).output().expect("running ip (iproute2)");
    assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Opens /dev/net/tun attached to `name` with `flags`, as a parent
/// process would before passing the descriptor on.
fn open_tap_fd(name: &str, flags: i32) -> RawFd {
    let path = CString::new("/dev/net/tun").unwrap();
    // SAFETY: plain open of a NUL-terminated path.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(fd >= 0, "open /dev/net/tun: {}", io::Error::last_os_error());
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    req[16..18].copy_from_slice(&(flags as i16).to_ne_bytes());
    // SAFETY: TUNSETIFF with a 40-byte struct ifreq.
    let r = unsafe { libc::ioctl(fd, libc::TUNSETIFF, req.as_mut_ptr()) };
    assert_eq!(r, 0, "TUNSETIFF {name}: {}", io::Error::last_os_error());
    fd
}

fn up(name: &str) {
    ip(&format!("link set {name} address {} up", MacAddr(HOST_MAC)));
}

/// An AF_PACKET socket on an interface.
struct Wire {
    fd: OwnedFd,
}

impl Wire {
    fn open(ifname: &str) -> Wire {
        let c = CString::new(ifname).unwrap();
        // SAFETY: NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) } as i32;
        assert!(ifindex > 0, "no interface {ifname}");
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET socket: {}", io::Error::last_os_error());
        // SAFETY: a descriptor we just made.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: zeroed sockaddr_ll is valid; filled below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        // SAFETY: bind with a sockaddr_ll of the right size.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
        Wire { fd }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: send from a live buffer.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(n, frame.len() as isize, "AF_PACKET send: {}", io::Error::last_os_error());
    }

    /// The next frame the interface receives (not one it sends) that
    /// `want` accepts, within `timeout`.
    fn recv_where(&self, timeout: Duration, want: impl Fn(&[u8]) -> bool) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 128 << 10];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if !readable(self.fd.as_raw_fd(), left) {
                return None;
            }
            // SAFETY: zeroed sockaddr_ll; recvfrom fills it and `buf`.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: buffers are live and sized as passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                continue;
            }
            let f = &buf[..n as usize];
            if sll.sll_pkttype != libc::PACKET_OUTGOING && want(f) {
                return Some(f.to_vec());
            }
        }
    }

    /// The next test frame (TEST_ETHERTYPE) the interface receives.
    fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.recv_where(timeout, |f| f.len() >= 14 && f[12..14] == TEST_ETHERTYPE)
    }
}

fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    r == 1
}

/// A test frame of `len` bytes with a recognizable payload.
fn frame(dst: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    assert!(len >= 14);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&HOST_MAC);
    f.extend_from_slice(&TEST_ETHERTYPE);
    f.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

/// A test frame from the guest (broadcast, so the host stack looks at it).
fn guest_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = frame([0xff; 6], len, seed);
    f[6..12].copy_from_slice(&GUEST_MAC);
    f
}

// ---- guest memory and queues --------------------------------------------

fn guest_mem() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), REGION_EDGE as usize), (GuestAddress(REGION_EDGE), 0x20_0000)])
        .unwrap()
}

fn write_desc(mem: &GuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let a = GuestAddress(table + 16 * u64::from(i));
    mem.write_obj(addr.to_le(), a).unwrap();
    mem.write_obj(len.to_le(), GuestAddress(a.0 + 8)).unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(a.0 + 12)).unwrap();
    mem.write_obj(next.to_le(), GuestAddress(a.0 + 14)).unwrap();
}

/// The driver side of one queue: descriptor table at `base`, avail ring at
/// `base + 0x1000`, used ring at `base + 0x2000`.
struct GuestQueue {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl GuestQueue {
    fn new(mem: &GuestMemory, base: u64) -> Self {
        let q = GuestQueue {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        mem.write_obj(0u16, GuestAddress(q.avail + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(q.used + 2)).unwrap();
        q
    }

    fn queue(&self, mem: &GuestMemory) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(Q_SIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some(0));
        q.set_avail_ring_address(Some(self.avail as u32), Some(0));
        q.set_used_ring_address(Some(self.used as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    /// One chain of (addr, len, flags) made available; returns its head.
    fn push(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, u16)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % Q_SIZE;
            let last = i == bufs.len() - 1;
            let flags = if last { flags } else { flags | VRING_DESC_F_NEXT as u16 };
            write_desc(mem, self.desc, idx, addr, len, flags, (idx + 1) % Q_SIZE);
        }
        self.next_desc = (head + bufs.len() as u16) % Q_SIZE;
        self.publish(mem, head);
        head
    }

    fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % Q_SIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
    }

    fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// (head, len) of used entries not seen yet.
    fn take_used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let idx = self.used_idx(mem);
        let mut v = Vec::new();
        while self.used_seen != idx {
            let a = self.used + 4 + 8 * u64::from(self.used_seen % Q_SIZE);
            v.push((mem.read_obj(GuestAddress(a)).unwrap(), mem.read_obj(GuestAddress(a + 4)).unwrap()));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        v
    }

    /// Waits up to `timeout` for `n` new used entries.
    fn wait_used(&mut self, mem: &GuestMemory, n: usize, timeout: Duration) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + timeout;
        let mut v = Vec::new();
        while v.len() < n && Instant::now() < deadline {
            v.extend(self.take_used(mem));
            std::thread::sleep(Duration::from_millis(2));
        }
        v
    }
}

fn read_mem(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A TX chain's bytes: a virtio_net_hdr_v1 then the frame.
fn with_hdr(flags: u8, gso: u8, frame: &[u8]) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v[0] = flags;
    v[1] = gso;
    v.extend_from_slice(frame);
    v
}

/// The worker's queue processing driven by hand, on a tap (or none).
struct Rig {
    mem: GuestMemory,
    rx: GuestQueue,
    tx: GuestQueue,
    worker: NetWorker,
    stats: Arc<NetStats>,
}

impl Rig {
    fn new(acked: u64, tap: Option<Tap>) -> Rig {
        let mem = guest_mem();
        let rx = GuestQueue::new(&mem, RX_BASE);
        let tx = GuestQueue::new(&mem, TX_BASE);
        if let Some(t) = &tap {
            t.set_offload(tap_offloads(acked)).unwrap();
        }
        let stats = Arc::new(NetStats::default());
        let worker = NetWorker::new(
            mem.clone(),
            Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            rx.queue(&mem),
            tx.queue(&mem),
            acked | VIRTIO_F_VERSION_1,
            tap.map(Arc::new),
            Arc::new(Control::default()),
            stats.clone(),
        );
        Rig { mem, rx, tx, worker, stats }
    }

    /// Puts `bytes` at `addr` and pushes one TX chain of the given pieces
    /// (lengths summing to `bytes.len()`, laid out from `addr` on).
    fn send(&mut self, addr: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        self.tx.push(&self.mem, &[(addr, bytes.len() as u32, R)]);
        self.worker.process_tx();
    }

    fn stat(&self, c: fn(&NetStats) -> &AtomicU64) -> u64 {
        c(&self.stats).load(Ordering::Relaxed)
    }
}

fn tap_rig(acked: u64) -> (Rig, Wire) {
    let tap = Tap::open(TAP).unwrap();
    up(TAP);
    let wire = Wire::open(TAP);
    (Rig::new(acked, Some(tap)), wire)
}

// ---- tests ----------------------------------------------------------------

#[test]
fn config_space_features_and_mac() {
    let mut n = Net::new(NetConfig { backend: NetBackend::None, mac: Some(MacAddr(GUEST_MAC)) }).unwrap();
    assert_eq!(n.device_type(), TYPE_NET);
    assert_eq!(n.queue_max_sizes(), &[256, 256]);
    let f = n.avail_features();
    assert_eq!(f, AVAIL_FEATURES);
    assert!(f & VIRTIO_F_VERSION_1 != 0 && f & F_MAC != 0);
    for not_offered in [
        virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF,
        virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ,
        virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_UFO,
        virtio_bindings::virtio_net::VIRTIO_NET_F_MQ,
        virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC,
    ] {
        assert_eq!(f & (1 << not_offered), 0, "feature bit {not_offered} offered");
    }
    let mut cfg = [0u8; 8];
    n.read_config(0, &mut cfg);
    assert_eq!(cfg, [2, 0, 0, 0, 0, 2, 0, 0]);
    let mut b = [0xffu8; 4];
    n.read_config(4, &mut b);
    assert_eq!(b, [0, 2, 0, 0]);
    n.read_config(u64::MAX - 1, &mut b);
    assert_eq!(b, [0; 4]);
    n.write_config(0, &[9; 6]);
    n.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &GUEST_MAC, "config writes are ignored");
    n.set_acked_features(u64::MAX);
    assert_eq!(n.state().acked_features, AVAIL_FEATURES);
    // Offload mapping: TSO only with checksums; host-side features never
    // change the tap.
    assert_eq!(tap_offloads(0), 0);
    assert_eq!(tap_offloads(F_CSUM | F_HOST_TSO4), 0);
    assert_eq!(tap_offloads(1 << VIRTIO_NET_F_GUEST_TSO4), 0);
    assert_eq!(tap_offloads(F_GUEST_CSUM), libc::TUN_F_CSUM);
    assert_eq!(tap_offloads(AVAIL_FEATURES), libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6);
    // Without a MAC, a random locally administered unicast one.
    let r = Net::new(NetConfig { backend: NetBackend::None, mac: None }).unwrap().mac();
    assert!(r.is_unicast() && r.0[0] & 2 == 2, "{r}");
    assert_eq!("02:00:00:00:00:02".parse::<MacAddr>().unwrap(), MacAddr(GUEST_MAC));
    assert_eq!(MacAddr([0xa, 0xbc, 0, 1, 2, 0xff]).to_string(), "0a:bc:00:01:02:ff");
}

#[test]
fn tap_backends_are_checked() {
    in_netns(|| {
        assert!(matches!(Tap::open("a/b"), Err(TapError::BadName(_))));
        assert!(matches!(Tap::open(""), Err(TapError::BadName(_))));
        let t = Tap::open(TAP).unwrap();
        assert_eq!(t.name(), TAP);
        // A second queue on a single-queue tap is refused, naming it.
        let e = Tap::open(TAP).unwrap_err().to_string();
        assert!(e.contains("tap hulltest0: TUNSETIFF"), "{e}");
        drop(t);

        assert!(matches!(Tap::from_fd(1), Err(TapError::FdStdio { fd: 1 })));
        assert!(matches!(Tap::from_fd(987_654), Err(TapError::FdNotOpen { .. })));
        let null = std::fs::File::open("/dev/null").unwrap();
        let e = Tap::from_fd(null.as_raw_fd()).unwrap_err();
        assert!(matches!(e, TapError::NotTun { .. }), "{e}");
        // A tap opened without the vnet header is refused, saying what is missing.
        let fd = open_tap_fd("hullpi0", libc::IFF_TAP);
        let e = Tap::from_fd(fd).unwrap_err().to_string();
        assert!(e.contains("hullpi0") && e.contains("IFF_VNET_HDR)"), "{e}");
        // SAFETY: our descriptor, refused above and so still ours.
        unsafe { libc::close(fd) };
        // A well-opened one is taken over (non-blocking, close-on-exec),
        // once.
        let fd = open_tap_fd("hullfd0", libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        let t = Tap::from_fd(fd).unwrap();
        assert_eq!(t.name(), "hullfd0");
        // SAFETY: flag queries.
        let (fl, fdfl) = unsafe { (libc::fcntl(fd, libc::F_GETFL), libc::fcntl(fd, libc::F_GETFD)) };
        assert!(fl & libc::O_NONBLOCK != 0 && fdfl & libc::FD_CLOEXEC != 0);
        assert!(matches!(Tap::from_fd(fd), Err(TapError::FdInUse { .. })));
        // Through the device config too.
        let e = Net::new(NetConfig { backend: NetBackend::Fd(fd), mac: None }).err().unwrap().to_string();
        assert!(e.contains(&format!("net fd {fd}: already used")), "{e}");
        drop(t);
        // The descriptor was the tap's last: the interface is gone.
        let st = Command::new("ip").args(["link", "show", "hullfd0"]).output().unwrap().status;
        assert!(!st.success(), "the device did not close its descriptor");
    });
}

#[test]
fn tx_chains_are_checked_and_good_frames_reach_the_tap() {
    in_netns(|| {
        let (mut rig, wire) = tap_rig(F_CSUM);
        let mem = rig.mem.clone();
        let good = guest_frame(60, 1);
        let quiet = Duration::from_millis(100);

        // Device-writable descriptor in a TX chain.
        mem.write_slice(&with_hdr(0, 0, &good), GuestAddress(BUF)).unwrap();
        rig.tx.push(&mem, &[(BUF, 72, W)]);
        // Outside guest memory, and overflowing the address space.
        rig.tx.push(&mem, &[(MEM_END - 10, 72, R)]);
        rig.tx.push(&mem, &[(BUF, 12, R), (u64::MAX - 8, 60, R)]);
        // Shorter than a header; a header and less than an Ethernet header.
        rig.tx.push(&mem, &[(BUF, 11, R)]);
        rig.tx.push(&mem, &[(BUF, 25, R)]);
        rig.worker.process_tx();
        // Longer than a 64 KiB frame.
        rig.tx.push(&mem, &[(BIG, (VNET_HDR_LEN + MAX_FRAME_LEN) as u32, R), (BUF, 1, R)]);
        // More descriptors than a chain may have (an indirect table of 300).
        let table = 0x30_0000;
        for i in 0..300u16 {
            let next = if i < 299 { VRING_DESC_F_NEXT as u16 } else { 0 };
            write_desc(&mem, table, i, BUF, 1, next, i + 1);
        }
        let head = rig.tx.next_desc;
        write_desc(&mem, rig.tx.desc, head, table, 300 * 16, VRING_DESC_F_INDIRECT as u16, 0);
        rig.tx.next_desc += 1;
        rig.tx.publish(&mem, head);
        rig.worker.process_tx();
        let used = rig.tx.take_used(&mem);
        assert_eq!(used.len(), 7, "{used:?}");
        assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
        assert_eq!(rig.stat(|s| &s.bad_chains), 7);
        assert_eq!(rig.stat(|s| &s.tx_frames), 0);
        assert_eq!(wire.recv(quiet), None, "a malformed chain reached the tap");

        // An offload the driver did not negotiate: a TSO header without
        // HOST_TSO4.
        rig.send(BUF, &with_hdr(0, VIRTIO_NET_HDR_GSO_TCPV4 as u8, &good));
        assert_eq!(rig.stat(|s| &s.tx_dropped), 8);
        assert_eq!(wire.recv(quiet), None);

        // A good frame whose header is split over two descriptors and
        // whose data crosses from one memory region into the next.
        let bytes = with_hdr(0, 0, &good);
        mem.write_slice(&bytes[..5], GuestAddress(BUF2)).unwrap();
        mem.write_slice(&bytes[5..], GuestAddress(REGION_EDGE - 25)).unwrap();
        rig.tx.push(&mem, &[(BUF2, 5, R), (REGION_EDGE - 25, (bytes.len() - 5) as u32, R)]);
        rig.worker.process_tx();
        assert_eq!(rig.tx.take_used(&mem).last().map(|u| u.1), Some(0));
        assert_eq!(wire.recv(Duration::from_secs(5)).as_deref(), Some(&good[..]));
        // Header flags meaning nothing on transmit are cleared, not refused.
        let big = guest_frame(9000, 3);
        rig.send(BIG, &with_hdr(0x02 | 0x04, 0, &big));
        assert_eq!(wire.recv(Duration::from_secs(5)), Some(big));
        assert_eq!(rig.stat(|s| &s.tx_frames), 2);
        assert_eq!(rig.stat(|s| &s.tx_bytes), 60 + 9000);
    });
}

#[test]
fn tso_frames_pass_when_negotiated() {
    in_netns(|| {
        let (mut rig, wire) = tap_rig(F_CSUM | F_HOST_TSO4);
        // One 4000-byte TCP segment over IPv4 for the kernel to cut into
        // 1000-byte pieces: Ethernet, IPv4 (20), TCP (20), payload.
        let payload = 4000usize;
        let mut f = Vec::new();
        f.extend_from_slice(&HOST_MAC);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        let tot = (20 + 20 + payload) as u16;
        f.extend_from_slice(&[0x45, 0, (tot >> 8) as u8, tot as u8, 0, 1, 0x40, 0, 64, 6, 0, 0]);
        f.extend_from_slice(&[10, 200, 9, 2, 10, 200, 9, 1]);
        f.extend_from_slice(&[0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
        f.extend((0..payload).map(|i| i as u8));
        let mut bytes = with_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, VIRTIO_NET_HDR_GSO_TCPV4 as u8, &f);
        bytes[2..4].copy_from_slice(&54u16.to_le_bytes()); // hdr_len
        bytes[4..6].copy_from_slice(&1000u16.to_le_bytes()); // gso_size
        bytes[6..8].copy_from_slice(&34u16.to_le_bytes()); // csum_start
        bytes[8..10].copy_from_slice(&16u16.to_le_bytes()); // csum_offset
        rig.send(BIG, &bytes);
        assert_eq!(rig.stat(|s| &s.tx_frames), 1, "dropped: {}", rig.stat(|s| &s.tx_dropped));
        // The tap took it as one GSO packet: the capture sees it whole.
        let got = wire
            .recv_where(Duration::from_secs(5), |g| g.len() > 14 && g[12..14] == [0x08, 0x00] && g[23] == 6)
            .expect("the TSO frame on the tap");
        assert_eq!(got.len(), f.len());
        assert_eq!(&got[54..], &f[54..]);
    });
}

#[test]
fn rx_chains_are_checked_and_frames_land_in_guest_buffers() {
    in_netns(|| {
        let (mut rig, wire) = tap_rig(0);
        let mem = rig.mem.clone();
        let tapfd = rig.worker.tap.as_ref().unwrap().as_raw_fd();
        let f100 = frame(GUEST_MAC, 100, 5);
        wire.send(&f100);
        assert!(readable(tapfd, Duration::from_secs(5)));

        // Refused chains are completed with length 0; the frame waits.
        rig.rx.push(&mem, &[(BUF, 2048, R)]);
        rig.rx.push(&mem, &[(BUF, 12, W), (BUF2, 100, R)]);
        rig.rx.push(&mem, &[(MEM_END - 8, 64, W)]);
        rig.rx.push(&mem, &[(BUF, 8, W)]);
        assert!(rig.worker.process_rx(None));
        let used = rig.rx.take_used(&mem);
        assert_eq!(used.iter().map(|u| u.1).collect::<Vec<_>>(), [0, 0, 0, 0]);
        assert_eq!(rig.stat(|s| &s.bad_chains), 4);
        assert!(readable(tapfd, Duration::ZERO), "the frame was consumed by a refused chain");

        // A buffer too small for the frame: the frame is dropped, the
        // buffer kept for the next one.
        mem.write_slice(&[0xee; 64], GuestAddress(BUF)).unwrap();
        let small = rig.rx.push(&mem, &[(BUF, 40, W)]);
        assert!(!rig.worker.process_rx(None));
        assert_eq!(rig.rx.take_used(&mem), []);
        assert_eq!(rig.stat(|s| &s.rx_dropped), 1);
        let f20 = frame(GUEST_MAC, 20, 6);
        wire.send(&f20);
        assert!(readable(tapfd, Duration::from_secs(5)));
        assert!(rig.worker.process_rx(None));
        assert_eq!(rig.rx.take_used(&mem), [(u32::from(small), 32)]);
        let got = read_mem(&mem, BUF, 32);
        assert_eq!(&got[..2], &[0, 0], "flags and GSO type");
        assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
        assert_eq!(&got[12..], &f20[..]);

        // The header in a descriptor of its own, the data crossing a
        // memory region edge.
        let f300 = frame(GUEST_MAC, 300, 7);
        let head = rig.rx.push(&mem, &[(BUF2, 12, W), (SPLIT, 0x200, W)]);
        wire.send(&f300);
        assert!(readable(tapfd, Duration::from_secs(5)));
        assert!(rig.worker.process_rx(None));
        assert_eq!(rig.rx.take_used(&mem), [(u32::from(head), 312)]);
        assert_eq!(&read_mem(&mem, BUF2 + 10, 2), &[1, 0]);
        assert_eq!(read_mem(&mem, SPLIT, 300), f300);
        assert_eq!(rig.stat(|s| &s.rx_frames), 2);
        assert_eq!(rig.stat(|s| &s.rx_bytes), 320);

        // This driver did not negotiate CSUM: a checksum request is dropped.
        let good = guest_frame(60, 1);
        rig.send(BUF, &with_hdr(VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 0, &good));
        assert_eq!(rig.stat(|s| &s.tx_dropped), 1);
        assert_eq!(wire.recv(Duration::from_millis(100)), None);
        rig.send(BUF, &with_hdr(0, 0, &good));
        assert_eq!(wire.recv(Duration::from_secs(5)), Some(good));
    });
}

#[test]
fn backend_less_device_drops_tx_and_receives_nothing() {
    let mut rig = Rig::new(0, None);
    let mem = rig.mem.clone();
    rig.rx.push(&mem, &[(BUF2, 2048, W)]);
    rig.send(BUF, &with_hdr(0, 0, &guest_frame(60, 1)));
    assert_eq!(rig.tx.take_used(&mem), [(0, 0)]);
    assert_eq!(rig.stat(|s| &s.tx_dropped), 1);
    assert!(!rig.worker.process_rx(None));
    assert_eq!(rig.rx.take_used(&mem), []);
}

/// A device activated with a tap: worker thread, interrupts, offloads,
/// RX flow control.
struct Live {
    mem: GuestMemory,
    net: Net,
    rx: GuestQueue,
    tx: GuestQueue,
    irq: EventFd,
    rx_kick: EventFd,
    tx_kick: EventFd,
}

impl Live {
    fn start(backend: NetBackend, acked: u64) -> Live {
        let mem = guest_mem();
        let mut net = Net::new(NetConfig { backend, mac: Some(MacAddr(GUEST_MAC)) }).unwrap();
        net.set_acked_features(acked | VIRTIO_F_VERSION_1);
        let rx = GuestQueue::new(&mem, RX_BASE);
        let tx = GuestQueue::new(&mem, TX_BASE);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let (rx_kick, tx_kick) = (EventFd::new(EFD_NONBLOCK).unwrap(), EventFd::new(EFD_NONBLOCK).unwrap());
        net.activate(ActivateArgs {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            queues: vec![rx.queue(&mem), tx.queue(&mem)],
            queue_evts: vec![rx_kick.try_clone().unwrap(), tx_kick.try_clone().unwrap()],
        })
        .unwrap();
        Live { mem, net, rx, tx, irq, rx_kick, tx_kick }
    }

    fn stat(&self, c: fn(&NetStats) -> &AtomicU64) -> u64 {
        c(self.net.stats()).load(Ordering::Relaxed)
    }
}

/// Sends a UDP datagram from the namespace to `dst` (a static neighbour on
/// the tap).
fn udp_to(dst: &str, payload: &[u8]) {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    s.send_to(payload, dst).unwrap();
}

/// The guest's view of a UDP packet it received: (header flags, frame).
fn udp_received(live: &mut Live, buf: u64) -> (u8, Vec<u8>) {
    let used = live.rx.wait_used(&live.mem, 1, Duration::from_secs(5));
    assert_eq!(used.len(), 1, "no frame received");
    let bytes = read_mem(&live.mem, buf, used[0].1 as usize);
    let f = bytes[VNET_HDR_LEN..].to_vec();
    assert_eq!(&f[12..14], &[0x08, 0x00], "IPv4");
    assert_eq!(f[23], 17, "UDP");
    (bytes[0], f)
}

#[test]
fn worker_round_trips_and_tap_offloads_follow_acked_features() {
    in_netns(|| {
        for (acked, want_flags) in [(F_GUEST_CSUM | F_CSUM, VIRTIO_NET_HDR_F_NEEDS_CSUM as u8), (0, 0)] {
            let mut live = Live::start(NetBackend::Tap(TAP.into()), acked);
            assert!(live.net.is_active());
            up(TAP);
            ip(&format!("addr replace 10.200.0.1/24 dev {TAP}"));
            ip(&format!("neigh replace 10.200.0.2 lladdr {} dev {TAP} nud permanent", MacAddr(GUEST_MAC)));
            let wire = Wire::open(TAP);
            let mem = live.mem.clone();

            // TX: a kick sends the frame and interrupts.
            let f = guest_frame(1000, 9);
            mem.write_slice(&with_hdr(0, 0, &f), GuestAddress(BUF)).unwrap();
            live.tx.push(&mem, &[(BUF, 1012, R)]);
            live.tx_kick.write(1).unwrap();
            assert_eq!(wire.recv(Duration::from_secs(5)), Some(f));
            assert_eq!(live.tx.wait_used(&mem, 1, Duration::from_secs(5)), [(0, 0)]);

            // RX: a UDP packet from the host stack; with GUEST_CSUM the tap
            // hands over a partial checksum (TUNSETOFFLOAD took effect),
            // without it a complete one.
            live.rx.push(&mem, &[(BUF2, 2048, W)]);
            live.rx_kick.write(1).unwrap();
            udp_to("10.200.0.2:9", b"hello guest");
            let (flags, frame) = udp_received(&mut live, BUF2);
            assert_eq!(flags, want_flags, "acked {acked:#x}");
            assert_eq!(&frame[frame.len() - 11..], b"hello guest");
            assert!(live.irq.read().unwrap() >= 1);
            assert_eq!(live.stat(|s| &s.rx_frames), 1);
            live.net.shutdown();
            assert!(!live.net.is_active());
        }
    });
}

#[test]
fn rx_without_buffers_stops_polling_until_the_guest_kicks() {
    in_netns(|| {
        let mut live = Live::start(NetBackend::Tap(TAP.into()), 0);
        up(TAP);
        let wire = Wire::open(TAP);
        let mem = live.mem.clone();
        // Frames arrive while the guest has no receive buffer: they wait in
        // the tap, and the worker does not spin on the readable tap.
        let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(GUEST_MAC, 64 + i, i as u8)).collect();
        for f in &frames {
            wire.send(f);
        }
        let before = live.stat(|s| &s.rounds);
        std::thread::sleep(Duration::from_millis(300));
        let woke = live.stat(|s| &s.rounds) - before;
        assert!(woke <= 3, "the worker woke {woke} times in 300 ms without buffers");
        assert_eq!(live.stat(|s| &s.rx_frames), 0);
        // Buffers and a kick: all three arrive, in order, with an interrupt.
        let bufs = [BUF, BUF2, BIG];
        for b in bufs {
            live.rx.push(&mem, &[(b, 2048, W)]);
        }
        live.rx_kick.write(1).unwrap();
        let used = live.rx.wait_used(&mem, 3, Duration::from_secs(5));
        assert_eq!(used.len(), 3, "{used:?}");
        for ((u, f), b) in used.iter().zip(&frames).zip(bufs) {
            assert_eq!(u.1 as usize, VNET_HDR_LEN + f.len());
            assert_eq!(&read_mem(&mem, b + VNET_HDR_LEN as u64, f.len()), f);
        }
        assert!(live.irq.read().unwrap() >= 1);
        // Out of buffers again: a new frame waits for the next ones.
        wire.send(&frames[0]);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(live.stat(|s| &s.rx_frames), 3);
        live.rx.push(&mem, &[(BUF, 2048, W)]);
        live.rx_kick.write(1).unwrap();
        assert_eq!(live.rx.wait_used(&mem, 1, Duration::from_secs(5)).len(), 1);
    });
}

#[test]
fn paused_device_leaves_guest_memory_alone() {
    in_netns(|| {
        let mut live = Live::start(NetBackend::Tap(TAP.into()), 0);
        up(TAP);
        let wire = Wire::open(TAP);
        let mem = live.mem.clone();
        live.rx.push(&mem, &[(BUF, 2048, W)]);
        live.rx_kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        live.net.pause();
        let f = frame(GUEST_MAC, 80, 1);
        wire.send(&f);
        live.tx.push(&mem, &[(BUF2, 72, R)]);
        live.tx_kick.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(live.rx.used_idx(&mem), 0, "RX while paused");
        assert_eq!(live.tx.used_idx(&mem), 0, "TX while paused");
        live.net.resume();
        assert_eq!(live.rx.wait_used(&mem, 1, Duration::from_secs(5)), [(0, 92)]);
        assert_eq!(live.tx.wait_used(&mem, 1, Duration::from_secs(5)).len(), 1);
    });
}

// ---- through the transport: snapshot and restore ---------------------------

fn wr(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn rd(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// The guest driver's initialization: features, both queues, DRIVER_OK.
fn drive(t: &mut MmioTransport, features: u64, rx: &GuestQueue, tx: &GuestQueue) {
    assert_eq!(rd(t, 0x08), TYPE_NET);
    for s in [1, 3] {
        wr(t, 0x70, s);
    }
    wr(t, 0x24, 0);
    wr(t, 0x20, features as u32);
    wr(t, 0x24, 1);
    wr(t, 0x20, (features >> 32) as u32);
    wr(t, 0x70, 11);
    assert_eq!(rd(t, 0x70), 11, "FEATURES_OK");
    for (sel, q) in [(0, rx), (1, tx)] {
        wr(t, 0x30, sel);
        assert_eq!(rd(t, 0x34), 256);
        wr(t, 0x38, u32::from(Q_SIZE));
        wr(t, 0x80, q.desc as u32);
        wr(t, 0x90, q.avail as u32);
        wr(t, 0xa0, q.used as u32);
        wr(t, 0x44, 1);
    }
    wr(t, 0x70, 15);
    assert_eq!(rd(t, 0x70), 15, "DRIVER_OK");
    assert!(t.is_activated());
}

#[test]
fn snapshot_state_round_trip_and_restore_onto_another_tap() {
    in_netns(|| {
        let mem = guest_mem();
        let mut rx = GuestQueue::new(&mem, RX_BASE);
        let tx = GuestQueue::new(&mem, TX_BASE);
        let net = Net::new(NetConfig { backend: NetBackend::Tap("hullsnap0".into()), mac: Some(MacAddr(GUEST_MAC)) })
            .unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(mem.clone(), Box::new(net), irq.try_clone().unwrap()).unwrap();
        let features = VIRTIO_F_VERSION_1 | F_MAC | F_CSUM | F_GUEST_CSUM;
        drive(&mut t, features, &rx, &tx);
        up("hullsnap0");
        ip("addr add 10.200.0.1/24 dev hullsnap0");
        ip(&format!("neigh add 10.200.0.2 lladdr {} dev hullsnap0 nud permanent", MacAddr(GUEST_MAC)));
        for b in [BUF, BUF2] {
            rx.push(&mem, &[(b, 2048, W)]);
        }
        wr(&mut t, 0x50, 0);
        udp_to("10.200.0.2:9", b"before");
        assert_eq!(rx.wait_used(&mem, 1, Duration::from_secs(5)).len(), 1);
        assert_eq!(read_mem(&mem, BUF, 1)[0], VIRTIO_NET_HDR_F_NEEDS_CSUM as u8);
        assert_eq!(rd(&mut t, 0x60) & INT_USED_RING, INT_USED_RING);

        // Pause (the VM is about to be snapshotted): frames now wait.
        t.device_mut().pause();
        udp_to("10.200.0.2:9", b"while paused");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(rx.used_idx(&mem), 1);
        let mmio_state = t.save_state();
        let Some(DeviceState::Net(state)) = t.device().snapshot_state() else { panic!("no net state") };
        assert_eq!(
            state,
            NetState {
                mac: MacAddr(GUEST_MAC),
                backend: NetBackend::Tap("hullsnap0".into()),
                avail_features: AVAIL_FEATURES,
                acked_features: features,
            }
        );
        let json = serde_json::to_string(&DeviceState::Net(state.clone())).unwrap();
        assert!(
            json.contains(r#""mac":"02:00:00:00:00:02""#) && json.contains(r#""backend":{"tap":"hullsnap0"}"#),
            "{json}"
        );
        let DeviceState::Net(back) = serde_json::from_str(&json).unwrap() else { panic!() };
        assert_eq!(back, state);
        assert_eq!(mmio_state.queues[0].next_avail, 1, "the second RX buffer is still the guest's");
        t.shutdown();
        drop(t);

        // Restore onto a tap the "parent" opened and passed as a descriptor.
        let fd = open_tap_fd("hullsnap1", libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
        let dev = Net::from_state(&back, NetBackend::Fd(fd)).unwrap();
        assert_eq!(dev.tap_name(), Some("hullsnap1"));
        let irq2 = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t2 =
            MmioTransport::restore(mem.clone(), Box::new(dev), irq2.try_clone().unwrap(), &mmio_state).unwrap();
        t2.finish_restore().unwrap();
        assert!(t2.is_activated());
        up("hullsnap1");
        ip("addr add 10.200.1.1/24 dev hullsnap1");
        ip(&format!("neigh add 10.200.1.2 lladdr {} dev hullsnap1 nud permanent", MacAddr(GUEST_MAC)));
        udp_to("10.200.1.2:9", b"after restore");
        // It lands in the guest's remaining buffer, with the offload the
        // guest negotiated set on the new tap.
        let used = rx.wait_used(&mem, 1, Duration::from_secs(5));
        assert_eq!(used.len(), 1, "nothing received after the restore");
        assert_eq!(used[0].0, 1);
        let got = read_mem(&mem, BUF2, used[0].1 as usize);
        assert_eq!(got[0], VIRTIO_NET_HDR_F_NEEDS_CSUM as u8);
        assert!(got.ends_with(b"after restore"));
        assert!(irq2.read().unwrap() >= 1);
        // TX from the restored device goes out on the new tap.
        let wire = Wire::open("hullsnap1");
        let mut tx = tx;
        let f = guest_frame(200, 4);
        mem.write_slice(&with_hdr(0, 0, &f), GuestAddress(BIG)).unwrap();
        tx.push(&mem, &[(BIG, 212, R)]);
        wr(&mut t2, 0x50, 1);
        assert_eq!(wire.recv(Duration::from_secs(5)), Some(f));
        t2.shutdown();
    });
}

/// Random descriptor tables and rings on both queues while frames arrive:
/// no panic, no hang, and good traffic still flows afterwards.
#[test]
fn hostile_queue_fuzz() {
    in_netns(|| {
        let (mut rig, wire) = tap_rig(F_CSUM | F_GUEST_CSUM);
        let mem = rig.mem.clone();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let addrs = [BUF, BUF2, BIG, SPLIT, MEM_END - 1, MEM_END, REGION_EDGE - 1, u64::MAX - 3, 0];
        let frames: Vec<Vec<u8>> = (0..8).map(|i| frame(GUEST_MAC, 14 + 97 * i, i as u8)).collect();
        mem.write_slice(&with_hdr(0, 0, &guest_frame(300, 2)), GuestAddress(BUF)).unwrap();
        for round in 0..300 {
            for (q, gq) in [(&mut rig.worker.rxq, &rig.rx), (&mut rig.worker.txq, &rig.tx)] {
                *q = gq.queue(&mem);
                if next() & 1 == 0 {
                    q.set_event_idx(true);
                }
                for i in 0..Q_SIZE {
                    let r = next();
                    let addr = if r % 3 == 0 { next() % (MEM_END + 0x1000) } else { addrs[(next() % 9) as usize] };
                    let len = match (r >> 8) % 5 {
                        0 => 0,
                        1 => 12,
                        2 => 2048,
                        3 => (next() % 70_000) as u32,
                        _ => next() as u32,
                    };
                    let flags = ((r >> 16) & 0x7) as u16;
                    let nxt = ((r >> 24) % u64::from(Q_SIZE + 2)) as u16;
                    write_desc(&mem, gq.desc, i, addr, len, flags, nxt);
                    let slot = GuestAddress(gq.avail + 4 + 2 * u64::from(i));
                    mem.write_obj((next() % u64::from(Q_SIZE + 2)) as u16, slot).unwrap();
                }
                mem.write_obj((next() % (2 * u64::from(Q_SIZE) + 2)) as u16, GuestAddress(gq.avail + 2)).unwrap();
                mem.write_obj(0u16, GuestAddress(gq.used + 2)).unwrap();
            }
            if round % 3 == 0 {
                wire.send(&frames[round % frames.len()]);
            }
            rig.worker.process_tx();
            rig.worker.process_rx(None);
            assert!(!rig.worker.tap_broken, "the tap was given up on in round {round}");
        }
        let served = rig.stat(|s| &s.rx_frames) + rig.stat(|s| &s.tx_frames);
        let refused = rig.stat(|s| &s.bad_chains);
        assert!(served > 0 && refused > 100, "served {served}, refused {refused}");
        // Afterwards, well-formed queues work.
        rig.rx = GuestQueue::new(&mem, RX_BASE);
        rig.tx = GuestQueue::new(&mem, TX_BASE);
        rig.worker.rxq = rig.rx.queue(&mem);
        rig.worker.txq = rig.tx.queue(&mem);
        while readable(rig.worker.tap.as_ref().unwrap().as_raw_fd(), Duration::ZERO) {
            rig.rx.push(&mem, &[(BIG, 0x1_0000, W)]);
            rig.worker.process_rx(None);
        }
        let _ = rig.rx.take_used(&mem);
        // (A new capture: the old one's buffer is full of fuzzed frames.)
        let wire = Wire::open(TAP);
        let f = guest_frame(500, 8);
        rig.send(BUF2, &with_hdr(0, 0, &f));
        assert!(wire.recv_where(Duration::from_secs(5), |g| g == f).is_some(), "good frame after the fuzzing");
        let g = frame(GUEST_MAC, 70, 9);
        rig.rx.push(&mem, &[(BUF, 2048, W)]);
        wire.send(&g);
        assert!(readable(rig.worker.tap.as_ref().unwrap().as_raw_fd(), Duration::from_secs(5)));
        rig.worker.process_rx(None);
        let used = rig.rx.take_used(&mem);
        assert_eq!(used.last().map(|u| u.1), Some(82));
        assert_eq!(read_mem(&mem, BUF + 12, 70), g);
    });
}
