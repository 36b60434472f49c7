//! Tests of the virtio-fs relay, most against a real virtiofsd.

use super::*;
use crate::devices::virtio::{GuestMemory, Interrupt};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Instant;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use vm_memory::{Bytes, FileOffset, GuestMemoryMmap};

#[test]
fn config_space_layout() {
    let c = config_space("myfs", 1).unwrap();
    assert_eq!(&c[..4], b"myfs");
    assert!(c[4..TAG_LEN].iter().all(|&b| b == 0));
    assert_eq!(&c[TAG_LEN..], &1u32.to_le_bytes());
    let c = config_space(&"t".repeat(36), 3).unwrap();
    assert!(c[..TAG_LEN].iter().all(|&b| b == b't'));
    assert_eq!(u32::from_le_bytes(c[TAG_LEN..].try_into().unwrap()), 3);

    assert!(matches!(config_space("", 1), Err(FsError::EmptyTag)));
    let e = config_space(&"t".repeat(37), 1).unwrap_err();
    assert!(matches!(e, FsError::TagTooLong(_)));
    assert!(e.to_string().contains("longer than 36 bytes"), "{e}");
    // 36 bytes but more than 36 characters' worth of UTF-8 is counted in bytes.
    assert!(config_space(&"é".repeat(19), 1).is_err());
    assert!(matches!(config_space("a\0b", 1), Err(FsError::TagNul(_))));
    assert!(matches!(config_space("a", 0), Err(FsError::RequestQueues(0))));
    assert!(config_space("a", MAX_REQUEST_QUEUES + 1).is_err());
}

#[test]
fn new_errors_name_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");

    // Config errors come first, without touching the socket.
    let mut cfg = FsConfig::new(&missing, "x".repeat(37));
    assert!(matches!(Fs::new(cfg.clone()), Err(FsError::TagTooLong(_))));
    cfg.tag = String::new();
    assert!(matches!(Fs::new(cfg.clone()), Err(FsError::EmptyTag)));
    cfg.tag = "share".into();
    cfg.queue_size = 1000;
    assert!(matches!(Fs::new(cfg.clone()), Err(FsError::QueueSize(1000))));
    cfg.queue_size = DEFAULT_QUEUE_SIZE;
    cfg.num_request_queues = 0;
    assert!(matches!(Fs::new(cfg.clone()), Err(FsError::RequestQueues(0))));
    cfg.num_request_queues = 1;

    let e = Fs::new(cfg).err().unwrap();
    assert!(matches!(e, FsError::SocketMissing(_)));
    assert!(e.to_string().contains(missing.to_str().unwrap()), "{e}");

    // A stale socket file: connection refused.
    let stale = dir.path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let e = Fs::new(FsConfig::new(&stale, "share")).err().unwrap();
    match &e {
        FsError::Connect { source, .. } => {
            assert_eq!(source.kind(), io::ErrorKind::ConnectionRefused)
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(e.to_string().contains(stale.to_str().unwrap()), "{e}");

    // A backend that hangs up during negotiation.
    let flaky = dir.path().join("flaky.sock");
    let l = UnixListener::bind(&flaky).unwrap();
    let t = std::thread::spawn(move || drop(l.accept().unwrap()));
    let e = Fs::new(FsConfig::new(&flaky, "share")).err().unwrap();
    t.join().unwrap();
    assert!(matches!(e, FsError::Backend { .. }), "{e:?}");
    assert!(e.to_string().contains(flaky.to_str().unwrap()), "{e}");
}

#[test]
fn state_serializes() {
    let st = FsState {
        socket: "/run/fs.sock".into(),
        tag: "share".into(),
        num_request_queues: 1,
        queue_size: 1024,
        avail_features: VIRTIO_F_VERSION_1,
        acked_features: VIRTIO_F_VERSION_1,
    };
    let back: FsState = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
    assert_eq!(back, st);
}

// ---- against a real virtiofsd ------------------------------------------

const VIRTIOFSD: &str = "/root/.cargo/bin/virtiofsd";
const QSIZE: u16 = 64;

fn virtiofsd_path() -> PathBuf {
    let p = std::env::var_os("HULL_VIRTIOFSD").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(VIRTIOFSD));
    assert!(
        p.exists(),
        "virtiofsd not found at {} (install it with `cargo install virtiofsd` \
         or set HULL_VIRTIOFSD)",
        p.display()
    );
    p
}

struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        let bin = virtiofsd_path();
        let dir = tempfile::tempdir().unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::write(shared.join("hello.txt"), b"hi").unwrap();
        std::fs::write(shared.join("big.bin"), pattern(BIG_LEN)).unwrap();
        let socket = dir.path().join("fs.sock");
        let child = Command::new(bin)
            .arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared.display()))
            .arg("--sandbox=none")
            .arg("--cache=never")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawning virtiofsd");
        let mut d = Daemon { child, socket, _dir: dir };
        let end = Instant::now() + Duration::from_secs(10);
        while !d.socket.exists() {
            if let Some(st) = d.child.try_wait().unwrap() {
                panic!("virtiofsd exited early: {st}");
            }
            assert!(Instant::now() < end, "virtiofsd did not create its socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    /// Waits for the daemon to exit; true if it did.
    fn exited_within(&mut self, t: Duration) -> bool {
        let end = Instant::now() + t;
        while Instant::now() < end {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const BIG_LEN: usize = (1 << 20) + 123;

/// Known, position-dependent file contents.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

const MEM_SIZE: usize = 16 << 20;

/// 16 MiB of memfd-backed guest memory (mapped shared).
fn memfd_memory() -> GuestMemory {
    // SAFETY: plain syscall with a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"hull-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: fd is a fresh memfd we own.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(MEM_SIZE as u64).unwrap();
    GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), MEM_SIZE, Some(FileOffset::new(file, 0)))]).unwrap()
}

// Guest-side buffers.
const INP: u64 = 0x10_0000;
const OUT: u64 = 0x20_0000;
const DATA: u64 = 0x40_0000;
const INDIRECT: u64 = 0x3_0000;

/// Driver side of a split queue at `base`.
struct DrvQueue {
    desc: u64,
    avail: u64,
    used: u64,
    /// Next avail index to publish.
    avail_idx: u16,
    /// Used entries consumed so far.
    used_seen: u16,
    next_desc: u16,
}

impl DrvQueue {
    fn new(base: u64) -> Self {
        Self::at(base, 0)
    }

    /// A queue whose rings already went `pos` entries around (a restored
    /// VM's).
    fn at(base: u64, pos: u16) -> Self {
        let n = u64::from(QSIZE);
        let avail = base + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        DrvQueue { desc: base, avail, used, avail_idx: pos, used_seen: pos, next_desc: 0 }
    }

    /// Writes the ring indices (as a restored guest's memory has them).
    fn init(&self, mem: &GuestMemory) {
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2)).unwrap();
        mem.write_obj(self.used_seen, GuestAddress(self.used + 2)).unwrap();
        // used_event (EVENT_IDX): interrupt me after the next used entry.
        mem.write_obj(self.used_seen, GuestAddress(self.avail + 4 + 2 * u64::from(QSIZE))).unwrap();
    }

    fn queue(&self) -> Queue {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_next_avail(self.avail_idx);
        q.set_next_used(self.used_seen);
        q.set_ready(true);
        q
    }

    fn write_desc(&self, mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = self.desc + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(a)).unwrap();
        mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }

    /// Publishes a head index (without writing descriptors).
    fn publish(&mut self, mem: &GuestMemory, head: u16) {
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * u64::from(self.avail_idx % QSIZE))).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.store(self.avail_idx, GuestAddress(self.avail + 2), AtomicOrdering::Release).unwrap();
    }

    /// Posts one chain of (addr, len, writable) buffers; returns its head.
    /// Long chains go in an indirect table (as Linux does).
    fn post(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        if bufs.len() > 16 {
            let table = INDIRECT;
            for (k, &(addr, len, w)) in bufs.iter().enumerate() {
                let last = k + 1 == bufs.len();
                let flags =
                    if w { VRING_DESC_F_WRITE as u16 } else { 0 } | if last { 0 } else { VRING_DESC_F_NEXT as u16 };
                let a = table + 16 * k as u64;
                mem.write_obj(addr, GuestAddress(a)).unwrap();
                mem.write_obj(len, GuestAddress(a + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
                mem.write_obj(k as u16 + 1, GuestAddress(a + 14)).unwrap();
            }
            let head = self.next_desc;
            self.write_desc(mem, head, table, 16 * bufs.len() as u32, VRING_DESC_F_INDIRECT as u16, 0);
            self.next_desc = (head + 1) % QSIZE;
            self.publish(mem, head);
            return head;
        }
        let head = self.next_desc;
        for (k, &(addr, len, w)) in bufs.iter().enumerate() {
            let i = (head + k as u16) % QSIZE;
            let last = k + 1 == bufs.len();
            let flags = if w { VRING_DESC_F_WRITE as u16 } else { 0 } | if last { 0 } else { VRING_DESC_F_NEXT as u16 };
            self.write_desc(mem, i, addr, len, flags, (i + 1) % QSIZE);
        }
        self.next_desc = (head + bufs.len() as u16) % QSIZE;
        self.publish(mem, head);
        head
    }

    fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.load(GuestAddress(self.used + 2), AtomicOrdering::Acquire).unwrap()
    }

    /// Waits for the next used entry: (id, len).
    fn wait_used(&mut self, mem: &GuestMemory) -> (u32, u32) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.used_idx(mem) == self.used_seen {
            assert!(Instant::now() < end, "no used entry: the request was not answered");
            std::thread::sleep(Duration::from_millis(2));
        }
        let e = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
        self.used_seen = self.used_seen.wrapping_add(1);
        (mem.read_obj(GuestAddress(e)).unwrap(), mem.read_obj(GuestAddress(e + 4)).unwrap())
    }
}

struct Setup {
    fs: Fs,
    mem: GuestMemory,
    queues: Vec<DrvQueue>,
    kicks: Vec<EventFd>,
    irq: EventFd,
}

impl Setup {
    /// Posts a chain on the request queue, kicks, waits for the answer:
    /// (used len, reply bytes read from the writable buffers).
    fn call(&mut self, bufs: &[(u64, u32, bool)]) -> (u32, Vec<u8>) {
        let head = self.queues[1].post(&self.mem, bufs);
        self.kicks[1].write(1).unwrap();
        let (id, len) = self.queues[1].wait_used(&self.mem);
        assert_eq!(id, u32::from(head));
        let mut out = Vec::new();
        let mut left = len as usize;
        for &(addr, blen, w) in bufs {
            if !w || left == 0 {
                continue;
            }
            let n = left.min(blen as usize);
            let mut b = vec![0u8; n];
            self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
            out.extend_from_slice(&b);
            left -= n;
        }
        (len, out)
    }

    /// A FUSE request with a reply buffer of `reply` bytes (one descriptor).
    fn fuse(&mut self, req: &[u8], reply: u32) -> (u32, Vec<u8>) {
        self.mem.write_slice(req, GuestAddress(INP)).unwrap();
        self.call(&[(INP, req.len() as u32, false), (OUT, reply, true)])
    }
}

fn activate_against(d: &Daemon, mem: GuestMemory) -> Setup {
    let mut cfg = FsConfig::new(&d.socket, "hullfs");
    cfg.queue_size = QSIZE;
    let mut fs = Fs::new(cfg).unwrap();
    assert_eq!(fs.device_type(), TYPE_FS);
    assert_eq!(fs.queue_max_sizes(), &[QSIZE, QSIZE]);
    assert_eq!(fs.avail_features(), GUEST_FEATURES);
    let mut c = [0u8; CONFIG_SPACE_LEN];
    fs.read_config(0, &mut c);
    assert_eq!(&c[..6], b"hullfs");
    assert_eq!(&c[TAG_LEN..], &1u32.to_le_bytes());
    fs.set_acked_features(fs.avail_features());
    activate_fs(fs, mem, 0)
}

/// Activates `fs` with queues whose rings are at position `pos`.
fn activate_fs(mut fs: Fs, mem: GuestMemory, pos: u16) -> Setup {
    let queues = vec![DrvQueue::at(0x1_0000, pos), DrvQueue::at(0x2_0000, pos)];
    for q in &queues {
        q.init(&mem);
    }
    let evts: Vec<EventFd> = (0..2).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
    let kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    fs.activate(ActivateArgs {
        mem: mem.clone(),
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        queues: queues.iter().map(DrvQueue::queue).collect(),
        queue_evts: evts,
    })
    .expect("virtiofsd accepts features, the bounce region and the shadow vrings");
    assert!(fs.is_running());
    Setup { fs, mem, queues, kicks, irq }
}

// ---- FUSE messages --------------------------------------------------------

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET_OP: u32 = 2;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_INIT: u32 = 26;

fn fuse_req(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&(40 + body.len() as u32).to_le_bytes());
    r.extend_from_slice(&opcode.to_le_bytes());
    r.extend_from_slice(&unique.to_le_bytes());
    r.extend_from_slice(&nodeid.to_le_bytes());
    r.extend_from_slice(&[0u8; 16]); // uid gid pid extlen padding
    r.extend_from_slice(body);
    r
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Checks a reply's out header; returns its error.
fn out_header(len: u32, reply: &[u8], unique: u64) -> i32 {
    assert!(len >= 16, "reply of {len} bytes");
    assert_eq!(u32_at(reply, 0), len, "out header length");
    assert_eq!(u64_at(reply, 8), unique);
    u32_at(reply, 4) as i32
}

/// FUSE_INIT through the request queue, answered by virtiofsd.
fn fuse_init(s: &mut Setup) {
    let mut body = Vec::new();
    body.extend_from_slice(&7u32.to_le_bytes()); // major
    body.extend_from_slice(&31u32.to_le_bytes()); // minor
    body.extend_from_slice(&0u32.to_le_bytes()); // max_readahead
    body.extend_from_slice(&0u32.to_le_bytes()); // flags
    let (len, reply) = s.fuse(&fuse_req(FUSE_INIT, 0x77, 0, &body), 4096);
    assert_eq!(out_header(len, &reply, 0x77), 0);
    assert_eq!(u32_at(&reply, 16), 7, "major");
    let _ = s.irq.read();
}

/// LOOKUP + OPEN of a root file; returns (nodeid, fh).
fn open_file(s: &mut Setup, name: &str) -> (u64, u64) {
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    let (len, reply) = s.fuse(&fuse_req(FUSE_LOOKUP, 2, 1, &n), 4096);
    assert_eq!(out_header(len, &reply, 2), 0, "lookup {name}");
    let nodeid = u64_at(&reply, 16);
    assert!(nodeid > 1);
    let (len, reply) = s.fuse(&fuse_req(FUSE_OPEN, 3, nodeid, &[0u8; 8]), 4096);
    assert_eq!(out_header(len, &reply, 3), 0, "open {name}");
    (nodeid, u64_at(&reply, 16))
}

fn read_body(fh: u64, off: u64, size: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&fh.to_le_bytes());
    b.extend_from_slice(&off.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&[0u8; 20]); // read_flags lock_owner flags padding
    b
}

/// READ of `size` bytes at `off` into page-sized buffers after a separate
/// out-header buffer, as the Linux driver lays it out.
fn fuse_read(s: &mut Setup, nodeid: u64, fh: u64, off: u64, size: u32) -> Vec<u8> {
    let req = fuse_req(FUSE_READ, 4, nodeid, &read_body(fh, off, size));
    s.mem.write_slice(&req, GuestAddress(INP)).unwrap();
    let mut bufs = vec![(INP, req.len() as u32, false), (OUT, 16, true)];
    let pages = size.div_ceil(4096);
    for p in 0..pages {
        bufs.push((DATA + u64::from(p) * 4096, 4096.min(size - p * 4096), true));
    }
    let (len, reply) = s.call(&bufs);
    assert_eq!(out_header(len, &reply, 4), 0);
    reply[16..].to_vec()
}

// ---- against a real virtiofsd -----------------------------------------------

#[test]
fn virtiofsd_end_to_end() {
    let mut d = Daemon::start();
    let mut s = activate_against(&d, memfd_memory());
    fuse_init(&mut s);
    assert!(!s.fs.is_broken());

    // Guest reset: the relay stops, the device can be activated again (new
    // bounce region, new rings).
    assert!(s.fs.reset());
    assert!(!s.fs.is_running());
    assert!(d.child.try_wait().unwrap().is_none(), "still connected");
    let mut s = activate_fs(s.fs, memfd_memory(), 0);
    fuse_init(&mut s);

    s.fs.shutdown();
    assert!(d.exited_within(Duration::from_secs(10)), "virtiofsd must exit once the VMM drops the connection");
    // Shutdown twice / drop afterwards is harmless.
    s.fs.shutdown();
}

#[test]
fn lookup_and_read_come_back_byte_for_byte() {
    let d = Daemon::start();
    let mut s = activate_against(&d, memfd_memory());
    fuse_init(&mut s);
    let (nodeid, fh) = open_file(&mut s, "hello.txt");
    assert_eq!(fuse_read(&mut s, nodeid, fh, 0, 4096), b"hi");

    // The largest request the driver sends: a 1 MiB READ into 256 pages.
    let want = pattern(BIG_LEN);
    let (nodeid, fh) = open_file(&mut s, "big.bin");
    let t = Instant::now();
    let first = fuse_read(&mut s, nodeid, fh, 0, 1 << 20);
    let took = t.elapsed();
    assert!(first == want[..1 << 20], "1 MiB read differs");
    let rest = fuse_read(&mut s, nodeid, fh, 1 << 20, 1 << 20);
    assert!(rest == want[1 << 20..], "tail differs");
    eprintln!("1 MiB READ through the relay: {took:?}");

    // Lookup of a missing file: virtiofsd's error comes through.
    let (len, reply) = s.fuse(&fuse_req(FUSE_LOOKUP, 9, 1, b"nope\0"), 4096);
    assert_eq!(out_header(len, &reply, 9), -libc::ENOENT);
    assert!(!s.fs.is_broken());
}

#[test]
fn anonymous_and_private_guest_memory_work() {
    // Anonymous memory: virtiofsd never maps guest memory.
    let d = Daemon::start();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut s = activate_against(&d, mem);
    fuse_init(&mut s);
    drop(s);

    // A template memory file mapped MAP_PRIVATE: the relay reads and
    // writes this VM's private pages, the file stays untouched.
    let d = Daemon::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mem");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(&vec![0xAAu8; MEM_SIZE]).unwrap();
    drop(f);
    let (mem, _file) =
        crate::vstate::memory::open_file(&path, (MEM_SIZE >> 20) as u64, crate::vstate::memory::Sharing::Private)
            .unwrap();
    let mut s = activate_against(&d, mem);
    fuse_init(&mut s);
    let (nodeid, fh) = open_file(&mut s, "big.bin");
    let got = fuse_read(&mut s, nodeid, fh, 0, 8192);
    assert!(got == pattern(BIG_LEN)[..8192]);
    let file = std::fs::read(&path).unwrap();
    assert!(file.iter().all(|&b| b == 0xAA), "the template file must not change");
}

#[test]
fn restored_queue_positions() {
    let d = Daemon::start();
    let mut cfg = FsConfig::new(&d.socket, "hullfs");
    cfg.queue_size = QSIZE;
    let mut fs = Fs::new(cfg).unwrap();
    fs.set_acked_features(GUEST_FEATURES);
    // A snapshot state round trip, with the socket replaced.
    let st = fs.state().with_socket(&d.socket);
    drop(fs);
    let d = Daemon::start();
    let mut fs = Fs::from_state(&st.with_socket(&d.socket)).unwrap();
    assert_eq!(fs.socket_path(), d.socket);
    assert_eq!(fs.acked_features, GUEST_FEATURES);
    fs.set_acked_features(GUEST_FEATURES);
    // Rings that went 7 entries around, then past the wrap of a 64-entry
    // ring.
    let mut s = activate_fs(fs, memfd_memory(), 7);
    fuse_init(&mut s);
    let (nodeid, fh) = open_file(&mut s, "hello.txt");
    for _ in 0..70 {
        assert_eq!(fuse_read(&mut s, nodeid, fh, 0, 100), b"hi");
    }
    assert_eq!(s.queues[1].used_idx(&s.mem), 7 + 3 + 70);
    drop(s);

    // Positions near the u16 wrap.
    let d = Daemon::start();
    let mut cfg = FsConfig::new(&d.socket, "hullfs");
    cfg.queue_size = QSIZE;
    let mut fs = Fs::new(cfg).unwrap();
    fs.set_acked_features(GUEST_FEATURES);
    let mut s = activate_fs(fs, memfd_memory(), u16::MAX - 1);
    fuse_init(&mut s);
    open_file(&mut s, "hello.txt");
    assert_eq!(s.queues[1].used_idx(&s.mem), 1);
}

#[test]
fn requests_queued_before_activation_are_served() {
    let d = Daemon::start();
    let mut cfg = FsConfig::new(&d.socket, "hullfs");
    cfg.queue_size = QSIZE;
    let mut fs = Fs::new(cfg).unwrap();
    fs.set_acked_features(GUEST_FEATURES);
    // A restored guest had a request in its avail ring past next_avail.
    let mem = memfd_memory();
    let mut q = DrvQueue::at(0x2_0000, 5);
    q.init(&mem);
    let req = fuse_req(FUSE_INIT, 0x55, 0, &[7, 0, 0, 0, 31, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    mem.write_slice(&req, GuestAddress(INP)).unwrap();
    q.post(&mem, &[(INP, req.len() as u32, false), (OUT, 4096, true)]);
    let hp = DrvQueue::at(0x1_0000, 5);
    hp.init(&mem);
    let mut restored = q.queue();
    restored.set_next_avail(5);
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    fs.activate(ActivateArgs {
        mem: mem.clone(),
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        queues: vec![hp.queue(), restored],
        queue_evts: (0..2).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect(),
    })
    .unwrap();
    let (id, len) = q.wait_used(&mem);
    assert_eq!(id, 0);
    let mut reply = vec![0u8; len as usize];
    mem.read_slice(&mut reply, GuestAddress(OUT)).unwrap();
    assert_eq!(out_header(len, &reply, 0x55), 0);
    let end = Instant::now() + Duration::from_secs(5);
    while irq.read().is_err() {
        assert!(Instant::now() < end, "the guest is not interrupted");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn hostile_chains() {
    let mut d = Daemon::start();
    let mut s = activate_against(&d, memfd_memory());
    fuse_init(&mut s);
    let hdr = fuse_req(FUSE_LOOKUP, 0x42, 1, b"hello.txt\0");
    s.mem.write_slice(&hdr, GuestAddress(INP)).unwrap();
    let hl = hdr.len() as u32;

    // A buffer outside guest memory (and one straddling its end).
    assert_eq!(s.call(&[(INP, hl, false), (0xFFFF_0000_0000, 4096, true)]).0, 0);
    assert_eq!(s.call(&[(MEM_SIZE as u64 - 8, 40, false), (OUT, 4096, true)]).0, 0);
    assert_eq!(s.call(&[(INP, hl, false), (u64::MAX - 10, 4096, true)]).0, 0);
    // Readable after writable.
    assert_eq!(s.call(&[(INP, hl, false), (OUT, 16, true), (INP, 8, false)]).0, 0);
    // No complete FUSE header.
    assert_eq!(s.call(&[(INP, 8, false), (OUT, 4096, true)]).0, 0);
    assert_eq!(s.call(&[(OUT, 4096, true)]).0, 0);
    // A request that needs a reply without room for it: virtiofsd (which
    // exits on a reply it cannot write) gets room, the guest nothing.
    assert_eq!(s.call(&[(INP, hl, false)]).0, 0);
    assert_eq!(s.call(&[(INP, hl, false), (OUT, 10, true)]).0, 10);
    // A header claiming more bytes than the chain has (virtiofsd would exit
    // reading them): EIO.
    let (len, reply) = s.call(&[(INP, 40, false), (OUT, 4096, true)]);
    assert_eq!(out_header(len, &reply, 0x42), -libc::EIO);
    // A forget has no writable part and is relayed; virtiofsd answers 0.
    let forget = fuse_req(FUSE_FORGET_OP, 0x43, 1, &1u64.to_le_bytes());
    s.mem.write_slice(&forget, GuestAddress(INP)).unwrap();
    assert_eq!(s.call(&[(INP, forget.len() as u32, false)]).0, 0);
    s.mem.write_slice(&hdr, GuestAddress(INP)).unwrap();
    // Oversize: answered EIO with the request's unique.
    let (len, reply) = s.call(&[(INP, hl, false), (OUT, 16, true), (DATA, (2 << 20) as u32, true)]);
    assert_eq!(out_header(len, &reply, 0x42), -libc::EIO);
    // A 4 GiB buffer: virtio-queue ends the chain before it (over 2^32
    // bytes), the rest is an ordinary request with a short reply buffer.
    let (len, _) = s.call(&[(INP, hl, false), (OUT, 16, true), (DATA, u32::MAX, true)]);
    assert!(len <= 16);
    // A chain that loops (next points back at its own descriptor): the walk
    // ends after the queue size; a loop of readable descriptors has no
    // writable part and is dropped.
    let q = &mut s.queues[1];
    q.write_desc(&s.mem, 40, INP, hl, VRING_DESC_F_NEXT as u16, 40);
    q.publish(&s.mem, 40);
    s.kicks[1].write(1).unwrap();
    assert_eq!(q.wait_used(&s.mem), (40, 0));
    // A head index beyond the table cannot be returned: skipped. A next
    // index beyond it ends the chain.
    q.publish(&s.mem, QSIZE + 3);
    q.write_desc(&s.mem, 41, INP, hl, VRING_DESC_F_NEXT as u16, 9999);
    q.publish(&s.mem, 41);
    s.kicks[1].write(1).unwrap();
    assert_eq!(q.wait_used(&s.mem), (41, 0));

    // The device still works, virtiofsd is alive.
    let (nodeid, fh) = open_file(&mut s, "hello.txt");
    assert_eq!(fuse_read(&mut s, nodeid, fh, 0, 10), b"hi");
    assert!(!s.fs.is_broken());
    assert!(d.child.try_wait().unwrap().is_none());

    // An avail index far ahead of the ring: logged, nothing panics, and
    // the worker does not spin.
    let q = &mut s.queues[1];
    s.mem.store(q.avail_idx.wrapping_add(1000), GuestAddress(q.avail + 2), AtomicOrdering::Release).unwrap();
    s.kicks[1].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(s.fs.reset());
}

#[test]
fn many_requests_wait_for_room() {
    // More 1 MiB reads than fit in the arena at once, posted together:
    // some wait in the avail ring until earlier ones are answered.
    let d = Daemon::start();
    let mut s = activate_against(&d, memfd_memory());
    fuse_init(&mut s);
    let (nodeid, fh) = open_file(&mut s, "big.bin");
    let want = pattern(BIG_LEN);
    let n = 6u64;
    let mut heads = Vec::new();
    for k in 0..n {
        let inp = INP + k * 256;
        let req = fuse_req(FUSE_READ, 100 + k, nodeid, &read_body(fh, k, 1 << 20));
        s.mem.write_slice(&req, GuestAddress(inp)).unwrap();
        let out = 0x30_0000 + k * 0x20_0000;
        heads.push(s.queues[1].post(&s.mem, &[(inp, req.len() as u32, false), (out, 16 + (1 << 20), true)]));
    }
    s.kicks[1].write(1).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..n {
        let (id, len) = s.queues[1].wait_used(&s.mem);
        let k = heads.iter().position(|&h| u32::from(h) == id).unwrap() as u64;
        assert!(seen.insert(k));
        let out = 0x30_0000 + k * 0x20_0000;
        let mut reply = vec![0u8; len as usize];
        s.mem.read_slice(&mut reply, GuestAddress(out)).unwrap();
        assert_eq!(out_header(len, &reply, 100 + k), 0);
        let k = k as usize;
        assert!(reply[16..] == want[k..k + (1 << 20)], "read {k} differs");
    }
}

#[test]
fn pause_waits_for_in_flight_and_resume_continues() {
    let d = Daemon::start();
    let mut s = activate_against(&d, memfd_memory());
    fuse_init(&mut s);
    assert!(s.fs.pause(Duration::from_secs(10)));
    assert_eq!(s.fs.in_flight(), 0);
    assert!(matches!(s.fs.snapshot_state(), Some(crate::devices::virtio::DeviceState::Fs(_))));
    // Paused: a new request stays in the avail ring.
    let req = fuse_req(FUSE_LOOKUP, 0x99, 1, b"hello.txt\0");
    s.mem.write_slice(&req, GuestAddress(INP)).unwrap();
    s.queues[1].post(&s.mem, &[(INP, req.len() as u32, false), (OUT, 4096, true)]);
    s.kicks[1].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(s.queues[1].used_idx(&s.mem), s.queues[1].used_seen);
    s.fs.resume();
    let (_, len) = s.queues[1].wait_used(&s.mem);
    assert!(len > 16);
}

#[test]
fn virtiofsd_dying_stops_the_device() {
    let mut d = Daemon::start();
    let mut s = activate_against(&d, memfd_memory());
    fuse_init(&mut s);
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    while !s.fs.is_broken() {
        assert!(Instant::now() < end, "hang-up not noticed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Requests now fail with EIO instead of hanging the guest.
    let (len, reply) = s.fuse(&fuse_req(FUSE_LOOKUP, 0x31, 1, b"hello.txt\0"), 4096);
    assert_eq!(out_header(len, &reply, 0x31), -libc::EIO);
    // Reset and shutdown are clean; activating again is refused.
    assert!(!s.fs.reset());
    let queues = [DrvQueue::new(0x1_0000), DrvQueue::new(0x2_0000)];
    assert!(s
        .fs
        .activate(ActivateArgs {
            mem: s.mem.clone(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            queues: queues.iter().map(DrvQueue::queue).collect(),
            queue_evts: (0..2).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect(),
        })
        .is_err());
    s.fs.shutdown();
}

/// virtiofsd hangs up while requests wait in the guest's ring for room in
/// the bounce region: those are answered with EIO too, like the ones in
/// flight. (Found by fuzz/fs_relay: they used to stay in the ring for
/// good; the guest, having kicked for them long ago, never kicks again.)
#[test]
fn backend_gone_answers_requests_waiting_for_room() {
    let mem = memfd_memory();
    let mut q = DrvQueue::new(0x1_0000);
    q.init(&mem);
    // The hiprio queue's 64 KiB arena holds 14 requests with their 4 KiB
    // of reply room each; the rest wait.
    let mut relay = relay::fuzzing::FuzzRelay::new(mem.clone(), vec![Some(q.queue()), None], QSIZE).unwrap();
    let n = 20u64;
    for unique in 1..=n {
        let req = fuse_req(FUSE_LOOKUP, unique, 1, b"");
        let at = INP + 0x100 * unique;
        mem.write_slice(&req, GuestAddress(at)).unwrap();
        q.post(&mem, &[(at, req.len() as u32, false), (OUT + 0x100 * unique, 16, true)]);
    }
    relay.turn(0);
    let relayed = relay.in_flight() as u64;
    assert!(relayed > 0 && relayed < n, "{relayed} of {n} relayed");
    assert_eq!(q.used_idx(&mem), 0);

    relay.backend_gone();
    assert_eq!(relay.in_flight(), 0);
    assert_eq!(q.used_idx(&mem), n as u16, "requests left waiting after virtiofsd hung up");
    for _ in 0..n {
        let (id, len) = q.wait_used(&mem);
        let unique = u64::from(id / 2) + 1;
        let mut reply = vec![0u8; 16];
        mem.read_slice(&mut reply, GuestAddress(OUT + 0x100 * unique)).unwrap();
        assert_eq!(out_header(len, &reply, unique), -libc::EIO);
    }
}

/// The relay's cost, measured natively: `cargo test -p hull-vmm --release
/// relay_cost -- --ignored --nocapture` (the same loop as the one that
/// measured the former passthrough front end: wait for the interrupt).
#[test]
#[ignore]
fn relay_cost() {
    let d = Daemon::start();
    let mut s = activate_against(&d, memfd_memory());
    fuse_init(&mut s);
    let (nodeid, fh) = open_file(&mut s, "big.bin");
    let (mem, kick, irq) = (s.mem.clone(), s.kicks[1].try_clone().unwrap(), s.irq.try_clone().unwrap());
    let q = &mut s.queues[1];
    let mut call = |req: &[u8], wlen: u32| -> Vec<u8> {
        mem.write_slice(req, GuestAddress(INP)).unwrap();
        q.post(&mem, &[(INP, req.len() as u32, false), (OUT, wlen, true)]);
        // EVENT_IDX: interrupt after the next used entry.
        mem.write_obj(q.used_seen, GuestAddress(q.avail + 4 + 2 * u64::from(QSIZE))).unwrap();
        kick.write(1).unwrap();
        while q.used_idx(&mem) == q.used_seen {
            let mut p = libc::pollfd { fd: irq.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut p, 1, 1000) };
            let _ = irq.read();
        }
        let e = q.used + 4 + 8 * u64::from(q.used_seen % QSIZE);
        q.used_seen = q.used_seen.wrapping_add(1);
        let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
        let mut b = vec![0u8; len.min(200) as usize];
        mem.read_slice(&mut b, GuestAddress(OUT)).unwrap();
        b
    };
    const FUSE_GETATTR: u32 = 3;
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(call(&fuse_req(FUSE_GETATTR, 9, nodeid, &[0u8; 16]), 4096)[4..8], [0, 0, 0, 0]);
    }
    let small = t.elapsed() / n;
    let n = 200;
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(
            call(&fuse_req(FUSE_READ, 9, nodeid, &read_body(fh, 0, 1 << 20)), 16 + (1 << 20))[4..8],
            [0, 0, 0, 0]
        );
    }
    let big = t.elapsed() / n;
    // The copies alone: 1 MiB guest → bounce and back.
    let bounce = shadow::create_bounce(2 << 20).unwrap();
    let segs: Vec<shadow::Seg> =
        (0..256).map(|p| shadow::Seg { addr: GuestAddress(DATA + p * 4096), len: 4096 }).collect();
    let t = Instant::now();
    for _ in 0..n {
        relay::copy_in(&mem, &segs, &bounce, 0).unwrap();
        relay::copy_out(&bounce, 0, 1 << 20, &mem, &segs).unwrap();
    }
    let copies = t.elapsed() / n / 2;
    eprintln!("relay cost: GETATTR round trip {small:?}; 1 MiB READ round trip {big:?}; copying 1 MiB once {copies:?}");
}
