//! virtio-fs (device type 26) as a vhost-user front end to an external
//! `virtiofsd`.
//!
//! The VMM only owns the transport side: config space (tag + number of
//! request queues), feature negotiation and handing the queues to the
//! backend. The backend gets the guest memory (every region must be file
//! backed, e.g. memfd), the ring addresses, the queue eventfds that KVM's
//! ioeventfds signal (kicks go straight to virtiofsd) and one "call" eventfd
//! per queue; a small forwarding thread turns calls into
//! [`Interrupt::signal_used_queue`].
//!
//! A backend that dies or hangs up is logged and the device stops; the VMM
//! carries on. Dropping the connection on [`VirtioDevice::shutdown`] makes
//! virtiofsd exit by itself.
//!
//! [`Interrupt::signal_used_queue`]: super::Interrupt::signal_used_queue

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error, info, warn};
use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateArgs, ActivateError, GuestMemory, Interrupt, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1};

/// Length of the tag field of the config space.
pub const TAG_LEN: usize = 36;
/// Size of `struct virtio_fs_config`: tag[36] + num_request_queues (u32 LE).
pub const CONFIG_SPACE_LEN: usize = TAG_LEN + 4;
/// Most request queues this front end sets up.
pub const MAX_REQUEST_QUEUES: usize = 64;
/// Default size of each queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

/// Feature bits passed through from the backend to the driver.
const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// vhost-user: the backend speaks protocol features (never offered to the
/// guest).
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
const PASSTHROUGH_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

/// How long a vhost-user request may take before the backend is considered
/// hung (the VMM must not block forever on it).
const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Configuration of a virtio-fs device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    /// Mount tag seen by the guest (1..=36 bytes).
    pub tag: String,
    /// Number of request queues (besides the hiprio queue); usually 1.
    pub num_request_queues: usize,
    /// Size of each queue; usually 1024.
    pub queue_size: u16,
}

impl FsConfig {
    /// A config with one request queue of [`DEFAULT_QUEUE_SIZE`].
    pub fn new(socket: impl Into<PathBuf>, tag: impl Into<String>) -> Self {
        FsConfig { socket: socket.into(), tag: tag.into(), num_request_queues: 1, queue_size: DEFAULT_QUEUE_SIZE }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag must not be empty")]
    EmptyTag,
    #[error("virtio-fs tag {0:?} is longer than {TAG_LEN} bytes")]
    TagTooLong(String),
    #[error("virtio-fs tag {0:?} contains a NUL byte")]
    TagNul(String),
    #[error("virtio-fs: {0} request queues requested; 1 to {MAX_REQUEST_QUEUES} are supported")]
    RequestQueues(usize),
    #[error("virtio-fs: queue size {0} is not a power of two between 2 and 32768")]
    QueueSize(u16),
    #[error("virtio-fs: vhost-user socket {} does not exist (is virtiofsd running?)", .0.display())]
    SocketMissing(PathBuf),
    #[error("virtio-fs: connecting to vhost-user socket {}: {source}", .path.display())]
    Connect { path: PathBuf, source: io::Error },
    #[error("virtio-fs: vhost-user backend at {}: {op}: {source}", .path.display())]
    Backend { path: PathBuf, op: &'static str, source: vhost::Error },
    #[error("virtio-fs: vhost-user backend at {}: {what}", .path.display())]
    Unsupported { path: PathBuf, what: String },
}

/// The device's serializable state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsState {
    pub socket: PathBuf,
    pub tag: String,
    pub num_request_queues: usize,
    pub queue_size: u16,
    pub avail_features: u64,
    pub acked_features: u64,
}

/// Validates the tag and builds `struct virtio_fs_config`.
pub fn config_space(tag: &str, num_request_queues: usize) -> Result<[u8; CONFIG_SPACE_LEN], FsError> {
    let b = tag.as_bytes();
    if b.is_empty() {
        return Err(FsError::EmptyTag);
    }
    if b.len() > TAG_LEN {
        return Err(FsError::TagTooLong(tag.to_string()));
    }
    if b.contains(&0) {
        return Err(FsError::TagNul(tag.to_string()));
    }
    if num_request_queues == 0 || num_request_queues > MAX_REQUEST_QUEUES {
        return Err(FsError::RequestQueues(num_request_queues));
    }
    let mut c = [0u8; CONFIG_SPACE_LEN];
    c[..b.len()].copy_from_slice(b);
    c[TAG_LEN..].copy_from_slice(&(num_request_queues as u32).to_le_bytes());
    Ok(c)
}

fn validate(cfg: &FsConfig) -> Result<[u8; CONFIG_SPACE_LEN], FsError> {
    let c = config_space(&cfg.tag, cfg.num_request_queues)?;
    if cfg.queue_size < 2 || cfg.queue_size > 32768 || !cfg.queue_size.is_power_of_two() {
        return Err(FsError::QueueSize(cfg.queue_size));
    }
    Ok(c)
}

struct Forwarder {
    kill_evt: EventFd,
    thread: JoinHandle<()>,
}

/// The virtio-fs device (vhost-user front end).
pub struct Fs {
    cfg: FsConfig,
    /// None after shutdown.
    frontend: Option<Frontend>,
    avail_features: u64,
    acked_features: u64,
    /// Whether the backend offered VHOST_USER_F_PROTOCOL_FEATURES.
    backend_protocol: bool,
    queue_sizes: Vec<u16>,
    config: [u8; CONFIG_SPACE_LEN],
    forwarder: Option<Forwarder>,
    /// Set when the backend hung up.
    broken: Arc<AtomicBool>,
    /// Vrings were handed to the backend.
    running: bool,
    /// Which vrings the backend runs.
    started_vrings: Vec<bool>,
}

impl Fs {
    /// Connects to virtiofsd and negotiates features; fails with an error
    /// naming the socket path.
    pub fn new(cfg: FsConfig) -> Result<Fs, FsError> {
        let config = validate(&cfg)?;
        let path = cfg.socket.clone();
        let num_queues = 1 + cfg.num_request_queues;

        match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(FsError::SocketMissing(path));
            }
            Err(e) => return Err(FsError::Connect { path, source: e }),
            Ok(_) => {}
        }
        let sock = UnixStream::connect(&path).map_err(|e| FsError::Connect { path: path.clone(), source: e })?;
        let timeouts =
            sock.set_read_timeout(Some(BACKEND_TIMEOUT)).and_then(|()| sock.set_write_timeout(Some(BACKEND_TIMEOUT)));
        if let Err(e) = timeouts {
            return Err(FsError::Connect { path, source: e });
        }
        let mut fe = Frontend::from_stream(sock, num_queues as u64);
        let be = |op: &'static str| {
            let path = path.clone();
            move |source| FsError::Backend { path, op, source }
        };

        fe.set_owner().map_err(be("SET_OWNER"))?;
        let features = fe.get_features().map_err(be("GET_FEATURES"))?;
        if features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::Unsupported { path, what: "backend does not offer VIRTIO_F_VERSION_1".into() });
        }
        let backend_protocol = features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if backend_protocol {
            let offered = fe.get_protocol_features().map_err(be("GET_PROTOCOL_FEATURES"))?;
            let wanted = VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK;
            let acked = offered & wanted;
            fe.set_protocol_features(acked).map_err(be("SET_PROTOCOL_FEATURES"))?;
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request is acknowledged, so backend errors (e.g. a
                // rejected memory table) surface as errors here.
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let max = fe.get_queue_num().map_err(be("GET_QUEUE_NUM"))?;
                if (max as usize) < num_queues {
                    return Err(FsError::Unsupported {
                        path,
                        what: format!("backend supports {max} queues, {num_queues} needed"),
                    });
                }
            }
        }
        info!("virtio-fs: connected to {} (tag {:?}, features {features:#x})", path.display(), cfg.tag);
        Ok(Fs {
            queue_sizes: vec![cfg.queue_size; num_queues],
            cfg,
            frontend: Some(fe),
            avail_features: features & PASSTHROUGH_FEATURES,
            acked_features: 0,
            backend_protocol,
            config,
            forwarder: None,
            broken: Arc::new(AtomicBool::new(false)),
            running: false,
            started_vrings: Vec::new(),
        })
    }

    /// Reconnects from a snapshot; the backend must still offer every
    /// feature the driver acked.
    pub fn from_state(state: &FsState) -> Result<Fs, FsError> {
        let mut fs = Fs::new(FsConfig {
            socket: state.socket.clone(),
            tag: state.tag.clone(),
            num_request_queues: state.num_request_queues,
            queue_size: state.queue_size,
        })?;
        let missing = state.acked_features & !fs.avail_features;
        if missing != 0 {
            return Err(FsError::Unsupported {
                path: state.socket.clone(),
                what: format!("backend lacks acked features {missing:#x}"),
            });
        }
        fs.acked_features = state.acked_features;
        Ok(fs)
    }

    pub fn state(&self) -> FsState {
        FsState {
            socket: self.cfg.socket.clone(),
            tag: self.cfg.tag.clone(),
            num_request_queues: self.cfg.num_request_queues,
            queue_size: self.cfg.queue_size,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
        }
    }

    pub fn tag(&self) -> &str {
        &self.cfg.tag
    }

    pub fn socket_path(&self) -> &Path {
        &self.cfg.socket
    }

    /// Whether the backend hung up or died.
    pub fn is_broken(&self) -> bool {
        self.broken.load(Ordering::SeqCst)
    }

    /// Whether the vrings are handed to the backend.
    pub fn is_running(&self) -> bool {
        self.running
    }

    fn err(&self, op: &str, e: impl std::fmt::Display) -> ActivateError {
        ActivateError::Other(format!("virtio-fs backend at {}: {op}: {e}", self.cfg.socket.display()))
    }

    fn mem_table(&self, mem: &GuestMemory) -> Result<Vec<VhostUserMemoryRegionInfo>, ActivateError> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            if r.file_offset().is_none() {
                return Err(ActivateError::Other(format!(
                    "virtio-fs: guest memory region at {:#x} ({} bytes) is not file backed; \
                     vhost-user needs memfd/file-backed guest memory",
                    r.start_addr().0,
                    r.len()
                )));
            }
            let info = VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|e| self.err("memory region", e))?;
            regions.push(info);
        }
        if regions.is_empty() {
            return Err(ActivateError::Other("virtio-fs: no guest memory".into()));
        }
        Ok(regions)
    }

    /// Host virtual address of a ring of `len` bytes at guest `addr`.
    fn ring_hva(mem: &GuestMemory, addr: u64, len: usize) -> Option<u64> {
        let a = GuestAddress(addr);
        // The ring must be contiguous in one region for the backend's
        // translation, which is what a single host pointer checks.
        let region = mem.find_region(a)?;
        let off = addr - region.start_addr().0;
        if off.checked_add(len as u64)? > region.len() {
            return None;
        }
        mem.get_host_address(a).ok().map(|p| p as u64)
    }

    fn setup_vrings(&mut self, args: &ActivateArgs, call_evts: &[EventFd]) -> Result<(), ActivateError> {
        // Everything derived from guest state is checked before talking to
        // the backend.
        let regions = self.mem_table(&args.mem)?;
        // Queues the driver did not set up are not handed to the backend.
        let mut rings = Vec::with_capacity(args.queues.len());
        for (i, q) in args.queues.iter().enumerate() {
            let size = q.size();
            if size == 0 || !q.ready() {
                rings.push(None);
                continue;
            }
            if size > self.queue_sizes[i] || !size.is_power_of_two() {
                return Err(ActivateError::Other(format!("virtio-fs: queue {i} has invalid size {size}")));
            }
            let n = usize::from(size);
            let bad = || ActivateError::Other(format!("virtio-fs: queue {i} rings are outside guest memory"));
            rings.push(Some(VringConfigData {
                queue_max_size: self.queue_sizes[i],
                queue_size: size,
                flags: 0,
                desc_table_addr: Self::ring_hva(&args.mem, q.desc_table(), 16 * n).ok_or_else(bad)?,
                used_ring_addr: Self::ring_hva(&args.mem, q.used_ring(), 6 + 8 * n).ok_or_else(bad)?,
                avail_ring_addr: Self::ring_hva(&args.mem, q.avail_ring(), 6 + 2 * n).ok_or_else(bad)?,
                log_addr: None,
            }));
        }
        if rings.iter().all(Option::is_none) {
            return Err(ActivateError::Other("virtio-fs: no queue is ready".into()));
        }

        let mut features = self.acked_features;
        if self.backend_protocol {
            features |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        let path = self.cfg.socket.clone();
        let err = |op: &str, e: vhost::Error| {
            ActivateError::Other(format!("virtio-fs backend at {}: {op}: {e}", path.display()))
        };
        let Some(fe) = self.frontend.as_mut() else {
            return Err(ActivateError::Other("virtio-fs device was shut down".into()));
        };
        fe.set_features(features).map_err(|e| err("SET_FEATURES", e))?;
        fe.set_mem_table(&regions).map_err(|e| err("SET_MEM_TABLE", e))?;
        for (i, (q, ring)) in args.queues.iter().zip(&rings).enumerate() {
            let Some(ring) = ring else {
                continue;
            };
            fe.set_vring_num(i, ring.queue_size).map_err(|e| err("SET_VRING_NUM", e))?;
            fe.set_vring_addr(i, ring).map_err(|e| err("SET_VRING_ADDR", e))?;
            fe.set_vring_base(i, q.next_avail()).map_err(|e| err("SET_VRING_BASE", e))?;
            fe.set_vring_call(i, &call_evts[i]).map_err(|e| err("SET_VRING_CALL", e))?;
            fe.set_vring_kick(i, &args.queue_evts[i]).map_err(|e| err("SET_VRING_KICK", e))?;
        }
        if self.backend_protocol {
            for (i, _) in rings.iter().enumerate().filter(|(_, r)| r.is_some()) {
                fe.set_vring_enable(i, true).map_err(|e| err("SET_VRING_ENABLE", e))?;
            }
        }
        self.started_vrings = rings.iter().map(Option::is_some).collect();
        Ok(())
    }

    fn stop_forwarder(&mut self) {
        if let Some(f) = self.forwarder.take() {
            let _ = f.kill_evt.write(1);
            if f.thread.join().is_err() {
                error!("virtio-fs: interrupt forwarder panicked");
            }
        }
    }

    /// Stops the backend's rings (GET_VRING_BASE stops a vring).
    fn stop_vrings(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        if self.is_broken() {
            return;
        }
        let started = std::mem::take(&mut self.started_vrings);
        if let Some(fe) = self.frontend.as_mut() {
            for (i, _) in started.iter().enumerate().filter(|(_, s)| **s) {
                if self.backend_protocol {
                    if let Err(e) = fe.set_vring_enable(i, false) {
                        warn!("virtio-fs: disabling vring {i}: {e}");
                        return;
                    }
                }
                if let Err(e) = fe.get_vring_base(i) {
                    warn!("virtio-fs: stopping vring {i}: {e}");
                    return;
                }
            }
        }
    }
}

/// Forwards the backend's call eventfds to the device interrupt and watches
/// the vhost-user socket for a hang-up.
fn forward_interrupts(
    epoll: Epoll,
    call_evts: Vec<EventFd>,
    sock_fd: RawFd,
    interrupt: Arc<Interrupt>,
    broken: Arc<AtomicBool>,
    socket: PathBuf,
) {
    let n = call_evts.len() as u64;
    let (kill_token, sock_token) = (n, n + 1);
    let mut events = [EpollEvent::default(); 16];
    loop {
        let count = match epoll.wait(-1, &mut events) {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("virtio-fs: interrupt forwarder: {e}");
                return;
            }
        };
        let mut signal = false;
        for ev in &events[..count] {
            match ev.data() {
                t if t < n => {
                    let _ = call_evts[t as usize].read();
                    signal = true;
                }
                t if t == kill_token => return,
                t if t == sock_token => {
                    error!("virtio-fs: vhost-user backend at {} disconnected; device stopped", socket.display());
                    broken.store(true, Ordering::SeqCst);
                    let _ = epoll.ctl(ControlOperation::Delete, sock_fd, EpollEvent::default());
                }
                t => debug!("virtio-fs: unexpected epoll token {t}"),
            }
        }
        if signal {
            if let Err(e) = interrupt.signal_used_queue() {
                error!("virtio-fs: interrupt: {e}");
            }
        }
    }
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!("virtio-fs: ignoring {}-byte config write at {offset}", data.len());
    }

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        if self.frontend.is_none() {
            return Err(ActivateError::Other("virtio-fs device was shut down".into()));
        }
        if self.is_broken() {
            return Err(self.err("activate", "backend disconnected"));
        }
        if self.running {
            return Err(ActivateError::Other("virtio-fs device is already active".into()));
        }
        let nq = self.queue_sizes.len();
        if args.queues.len() != nq || args.queue_evts.len() != nq {
            return Err(ActivateError::Other(format!(
                "virtio-fs needs {nq} queues and eventfds, got {} and {}",
                args.queues.len(),
                args.queue_evts.len()
            )));
        }
        let call_evts = (0..nq).map(|_| EventFd::new(EFD_NONBLOCK)).collect::<io::Result<Vec<_>>>()?;

        // The forwarder runs before the rings, so no call is missed. It owns
        // clones of the call eventfds; the originals go to the backend.
        let fwd_calls = call_evts.iter().map(|e| e.try_clone()).collect::<io::Result<Vec<_>>>()?;
        let epoll = Epoll::new()?;
        for (i, e) in fwd_calls.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, e.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        let kill_evt = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(ControlOperation::Add, kill_evt.as_raw_fd(), EpollEvent::new(EventSet::IN, nq as u64))?;
        // Hang-up detection only: replies on this socket are read by the
        // frontend, never here.
        let sock_fd = self.frontend.as_ref().map_or(-1, |f| f.as_raw_fd());
        epoll.ctl(ControlOperation::Add, sock_fd, EpollEvent::new(EventSet::READ_HANG_UP, nq as u64 + 1))?;
        let interrupt = args.interrupt.clone();
        let broken = self.broken.clone();
        let socket = self.cfg.socket.clone();
        let thread = std::thread::Builder::new()
            .name("virtio-fs-irq".into())
            .spawn(move || forward_interrupts(epoll, fwd_calls, sock_fd, interrupt, broken, socket))?;
        self.forwarder = Some(Forwarder { kill_evt, thread });

        if let Err(e) = self.setup_vrings(&args, &call_evts) {
            error!("{e}");
            self.stop_forwarder();
            return Err(e);
        }
        self.running = true;
        info!("virtio-fs: {} queues handed to {}", nq, self.cfg.socket.display());
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_vrings();
        self.stop_forwarder();
        self.frontend.is_some() && !self.is_broken()
    }

    fn shutdown(&mut self) {
        self.stop_forwarder();
        self.running = false;
        // Closing the connection makes virtiofsd exit.
        self.frontend = None;
    }
}

impl Drop for Fs {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixListener;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
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

    /// 16 MiB of memfd-backed guest memory.
    fn memfd_memory() -> GuestMemory {
        let size = 16usize << 20;
        // SAFETY: plain syscall with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"hull-test-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: fd is a fresh memfd we own.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(size as u64).unwrap();
        GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size, Some(FileOffset::new(file, 0)))]).unwrap()
    }

    /// Driver-side split queue at `base`.
    struct DrvQueue {
        desc: u64,
        avail: u64,
        used: u64,
    }

    impl DrvQueue {
        fn new(base: u64) -> Self {
            let n = u64::from(QSIZE);
            let avail = base + 16 * n;
            let used = (avail + 6 + 2 * n + 3) & !3;
            DrvQueue { desc: base, avail, used }
        }

        fn queue(&self) -> Queue {
            let mut q = Queue::new(QSIZE).unwrap();
            q.set_size(QSIZE);
            q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
            q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
            q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
            q.set_ready(true);
            q
        }

        /// Posts one chain: a readable buffer then a writable one.
        fn post(&self, mem: &GuestMemory, rd: (u64, u32), wr: (u64, u32)) {
            let d = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
                let a = self.desc + 16 * i;
                mem.write_obj(addr, GuestAddress(a)).unwrap();
                mem.write_obj(len, GuestAddress(a + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
                mem.write_obj(next, GuestAddress(a + 14)).unwrap();
            };
            d(0, rd.0, rd.1, VRING_DESC_F_NEXT as u16, 1);
            d(1, wr.0, wr.1, VRING_DESC_F_WRITE as u16, 0);
            mem.write_obj(0u16, GuestAddress(self.avail + 4)).unwrap();
            mem.write_obj(1u16, GuestAddress(self.avail + 2)).unwrap();
        }

        fn used(&self, mem: &GuestMemory) -> (u16, u32, u32) {
            let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            let id: u32 = mem.read_obj(GuestAddress(self.used + 4)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(self.used + 8)).unwrap();
            (idx, id, len)
        }
    }

    struct Setup {
        fs: Fs,
        mem: GuestMemory,
        queues: Vec<DrvQueue>,
        kicks: Vec<EventFd>,
        irq: EventFd,
    }

    fn activate_against(d: &Daemon) -> Setup {
        let mut cfg = FsConfig::new(&d.socket, "hullfs");
        cfg.queue_size = QSIZE;
        let mut fs = Fs::new(cfg).unwrap();
        assert_eq!(fs.device_type(), TYPE_FS);
        assert_eq!(fs.queue_max_sizes(), &[QSIZE, QSIZE]);
        assert_ne!(fs.avail_features() & VIRTIO_F_VERSION_1, 0);
        assert_eq!(fs.avail_features() & VHOST_USER_F_PROTOCOL_FEATURES, 0);
        let mut c = [0u8; CONFIG_SPACE_LEN];
        fs.read_config(0, &mut c);
        assert_eq!(&c[..6], b"hullfs");
        assert_eq!(&c[TAG_LEN..], &1u32.to_le_bytes());
        fs.set_acked_features(fs.avail_features());
        activate_fs(fs)
    }

    /// Activates `fs` with fresh memfd memory and queues.
    fn activate_fs(mut fs: Fs) -> Setup {
        let mem = memfd_memory();
        let queues = vec![DrvQueue::new(0x1_0000), DrvQueue::new(0x2_0000)];
        let evts: Vec<EventFd> = (0..2).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect();
        let kicks = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        fs.activate(ActivateArgs {
            mem: mem.clone(),
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            queues: queues.iter().map(DrvQueue::queue).collect(),
            queue_evts: evts,
        })
        .expect("virtiofsd accepts features, memory table and vrings");
        assert!(fs.is_running());
        Setup { fs, mem, queues, kicks, irq }
    }

    /// FUSE_INIT through the request queue, answered by virtiofsd.
    fn fuse_init(s: &Setup) {
        const FUSE_INIT: u32 = 26;
        let (inp, out) = (0x10_0000u64, 0x11_0000u64);
        let mut req = Vec::new();
        req.extend_from_slice(&56u32.to_le_bytes()); // len
        req.extend_from_slice(&FUSE_INIT.to_le_bytes());
        req.extend_from_slice(&0x77u64.to_le_bytes()); // unique
        req.extend_from_slice(&0u64.to_le_bytes()); // nodeid
        req.extend_from_slice(&[0u8; 16]); // uid gid pid extlen padding
        req.extend_from_slice(&7u32.to_le_bytes()); // major
        req.extend_from_slice(&31u32.to_le_bytes()); // minor
        req.extend_from_slice(&0u32.to_le_bytes()); // max_readahead
        req.extend_from_slice(&0u32.to_le_bytes()); // flags
        assert_eq!(req.len(), 56);
        s.mem.write_slice(&req, GuestAddress(inp)).unwrap();
        s.queues[1].post(&s.mem, (inp, 56), (out, 4096));
        s.kicks[1].write(1).unwrap();

        let end = Instant::now() + Duration::from_secs(10);
        loop {
            if s.irq.read().is_ok() {
                break;
            }
            assert!(Instant::now() < end, "no interrupt: virtiofsd did not answer");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (idx, id, len) = s.queues[1].used(&s.mem);
        assert_eq!((idx, id), (1, 0));
        assert!(len >= 16 + 8, "reply of {len} bytes");
        let olen: u32 = s.mem.read_obj(GuestAddress(out)).unwrap();
        let err: i32 = s.mem.read_obj(GuestAddress(out + 4)).unwrap();
        let unique: u64 = s.mem.read_obj(GuestAddress(out + 8)).unwrap();
        let major: u32 = s.mem.read_obj(GuestAddress(out + 16)).unwrap();
        assert_eq!((olen, err, unique, major), (len, 0, 0x77, 7));
    }

    #[test]
    fn virtiofsd_end_to_end() {
        let mut d = Daemon::start();
        let mut s = activate_against(&d);
        fuse_init(&s);
        assert!(!s.fs.is_broken());

        // Guest reset: rings stop, the device can be activated again (new
        // memory table, new rings).
        assert!(s.fs.reset());
        assert!(!s.fs.is_running());
        assert!(d.child.try_wait().unwrap().is_none(), "still connected");
        let mut s = activate_fs(s.fs);
        fuse_init(&s);

        s.fs.shutdown();
        assert!(d.exited_within(Duration::from_secs(10)), "virtiofsd must exit once the VMM drops the connection");
        // Shutdown twice / drop afterwards is harmless.
        s.fs.shutdown();
    }

    #[test]
    fn non_file_backed_memory_is_refused() {
        let mut d = Daemon::start();
        let mut cfg = FsConfig::new(&d.socket, "hullfs");
        cfg.queue_size = QSIZE;
        let mut fs = Fs::new(cfg).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let queues = [DrvQueue::new(0x1_0000), DrvQueue::new(0x2_0000)];
        let e = fs
            .activate(ActivateArgs {
                mem,
                interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                queues: queues.iter().map(DrvQueue::queue).collect(),
                queue_evts: (0..2).map(|_| EventFd::new(EFD_NONBLOCK).unwrap()).collect(),
            })
            .unwrap_err();
        assert!(e.to_string().contains("not file backed"), "{e}");
        drop(fs);
        assert!(d.exited_within(Duration::from_secs(10)));
    }

    #[test]
    fn virtiofsd_dying_stops_the_device() {
        let mut d = Daemon::start();
        let mut s = activate_against(&d);
        d.child.kill().unwrap();
        d.child.wait().unwrap();
        let end = Instant::now() + Duration::from_secs(10);
        while !s.fs.is_broken() {
            assert!(Instant::now() < end, "hang-up not noticed");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Kicks now go nowhere; nothing panics, reset and shutdown are clean.
        s.kicks[1].write(1).unwrap();
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
}
