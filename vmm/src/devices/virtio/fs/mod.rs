//! virtio-fs (device type 26): a relay between the guest and an external
//! `virtiofsd`, over shadow virtqueues.
//!
//! ```text
//!  guest driver ──virtqueues in guest RAM──▶ hull-vmm relay ──shadow virtqueues──▶ virtiofsd
//!                  (hull-vmm reads/writes)     (copies)       in the bounce memfd
//! ```
//!
//! The guest sees a plain virtio-fs device: config space (tag +
//! num_request_queues), a hiprio queue and request queues, which hull-vmm
//! serves itself with `virtio-queue` ([`relay`]). virtiofsd is a vhost-user
//! backend that is given **only a bounce region** ([`shadow`]): a small
//! memfd owned by this device holding one shadow split virtqueue per guest
//! queue plus an arena for request bytes. For each guest request the relay
//! copies the chain's device-readable bytes into the arena, publishes a
//! shadow chain (readable part, writable part) and kicks virtiofsd; when
//! virtiofsd calls, it copies the written bytes back into the guest chain's
//! writable buffers, completes the guest chain with that length and
//! interrupts the guest (EVENT_IDX is honoured).
//!
//! Why: guest memory may be mapped MAP_PRIVATE from a template's memory
//! file (copy on write, shared by many VMs) — virtiofsd mapping that file
//! would see the template, not this VM's pages — and virtiofsd never gets
//! to read or write guest memory at all. The cost is one copy of every
//! request and answer (memcpy through the bounce region).
//!
//! Limits: a request (readable + writable bytes) may be up to
//! [`relay::MAX_REQUEST_BYTES`] (1 MiB + 64 KiB): Linux caps a request at
//! `min(256, queue size - 4)` pages and virtiofsd announces 1 MiB
//! `max_write`/256 `max_pages`, so the largest real request is a 1 MiB
//! READ or WRITE plus headers. A larger chain, or one of more than
//! [`relay::MAX_CHAIN_DESCS`] descriptors, is answered with a FUSE EIO
//! reply (logged at warn). Each request queue's arena is
//! [`shadow::REQUEST_ARENA_BYTES`] (4 MiB: three maximal requests, or
//! hundreds of small ones); the hiprio arena is 64 KiB. When the arena or
//! the shadow slots are full, the guest request stays in the guest's avail
//! ring until an answer frees room.
//!
//! The guest is hostile: chains are checked (addresses inside guest memory,
//! readable before writable, bounded size and length); a malformed chain is
//! completed with length 0 and logged at debug, never a panic. virtiofsd is
//! not trusted either: it only sees the bounce region (sealed against
//! resizing), used entries naming no request in flight are ignored and
//! lengths are clamped to the writable part.
//!
//! Restore: the guest queues may arrive with non-zero `next_avail`/
//! `next_used` (a snapshot); the shadow rings always start at 0 on a fresh
//! virtiofsd connection. [`FsState`] holds what a restore needs; the socket
//! can be replaced ([`FsState::with_socket`]). Before a snapshot, [`Fs::pause`]
//! stops taking guest requests and waits until nothing is in flight (the
//! transport then reads consistent queue positions from the used rings).
//!
//! A backend that dies or hangs up is logged and the device stops: requests
//! in flight and later ones are answered with EIO; the VMM carries on.
//! Dropping the connection on [`VirtioDevice::shutdown`] makes virtiofsd
//! exit by itself.

mod relay;
mod shadow;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use serde::{Deserialize, Serialize};
use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateArgs, ActivateError, VirtioDevice, TYPE_FS, VIRTIO_F_VERSION_1};
use relay::{Control, Relay, RelayQueue, Shared};
use shadow::ShadowRing;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use relay::fuzzing;
pub use relay::{MAX_CHAIN_DESCS, MAX_REQUEST_BYTES};
pub use shadow::{HIPRIO_ARENA_BYTES, REQUEST_ARENA_BYTES};

/// Length of the tag field of the config space.
pub const TAG_LEN: usize = 36;
/// Size of `struct virtio_fs_config`: tag[36] + num_request_queues (u32 LE).
pub const CONFIG_SPACE_LEN: usize = TAG_LEN + 4;
/// Most request queues this device sets up.
pub const MAX_REQUEST_QUEUES: usize = 64;
/// Default size of each queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 1024;

const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
/// vhost-user: the backend speaks protocol features.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// What the guest is offered: the relay serves the guest queues itself
/// (virtio-queue handles indirect tables and event indices), whatever
/// virtiofsd supports.
const GUEST_FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_INDIRECT_DESC | VIRTIO_RING_F_EVENT_IDX;

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

impl FsState {
    /// The same device served by another virtiofsd (a restored VM connects
    /// to its own pod's daemon).
    pub fn with_socket(mut self, socket: impl Into<PathBuf>) -> FsState {
        self.socket = socket.into();
        self
    }
}

struct Worker {
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

/// The virtio-fs device (relay to a vhost-user virtiofsd).
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
    worker: Option<Worker>,
    /// Set when the backend hung up.
    broken: Arc<AtomicBool>,
    /// Shadow vrings were handed to the backend.
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
        info!("virtio-fs: connected to {} (tag {:?}, backend features {features:#x})", path.display(), cfg.tag);
        Ok(Fs {
            queue_sizes: vec![cfg.queue_size; num_queues],
            cfg,
            frontend: Some(fe),
            avail_features: GUEST_FEATURES,
            acked_features: 0,
            backend_protocol,
            config,
            worker: None,
            broken: Arc::new(AtomicBool::new(false)),
            running: false,
            started_vrings: Vec::new(),
        })
    }

    /// Rebuilds the device from a snapshot, connected to `state.socket`
    /// (see [`FsState::with_socket`] to use another virtiofsd).
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
                what: format!("the snapshot's driver acked features {missing:#x} this device does not offer"),
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

    /// Whether the relay is running.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Stops taking guest requests and waits until virtiofsd answered every
    /// request in flight (for a snapshot: the guest's used rings then hold
    /// the queue positions). True once idle; false on timeout (still
    /// paused). A device that is not running is idle.
    pub fn pause(&mut self, timeout: Duration) -> bool {
        let Some(w) = &self.worker else {
            return true;
        };
        let mut c = w.shared.control.lock().unwrap_or_else(|p| p.into_inner());
        c.pause = true;
        c.idle = false;
        let _ = w.shared.evt.write(1);
        let end = Instant::now() + timeout;
        while !c.idle {
            let now = Instant::now();
            if now >= end || w.thread.is_finished() {
                return c.idle;
            }
            c = w.shared.changed.wait_timeout(c, end - now).unwrap_or_else(|p| p.into_inner()).0;
        }
        true
    }

    /// Requests relayed to virtiofsd and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.worker.as_ref().map_or(0, |w| w.shared.in_flight.load(Ordering::SeqCst))
    }

    /// Takes guest requests again after [`Fs::pause`].
    pub fn resume(&mut self) {
        if let Some(w) = &self.worker {
            let mut c = w.shared.control.lock().unwrap_or_else(|p| p.into_inner());
            c.pause = false;
            let _ = w.shared.evt.write(1);
        }
    }

    fn err(&self, op: &str, e: impl std::fmt::Display) -> ActivateError {
        ActivateError::Other(format!("virtio-fs backend at {}: {op}: {e}", self.cfg.socket.display()))
    }

    /// Hands the shadow rings in `bounce` to virtiofsd.
    fn setup_vrings(
        &mut self,
        bounce: &super::GuestMemory,
        rings: &[Option<shadow::RingLayout>],
        calls: &[EventFd],
        kicks: &[EventFd],
    ) -> Result<(), ActivateError> {
        let mut regions = Vec::new();
        for r in bounce.iter() {
            regions.push(VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|e| self.err("bounce region", e))?);
        }
        let hva = |off: u64| -> Result<u64, ActivateError> {
            bounce
                .get_host_address(GuestAddress(off))
                .map(|p| p as u64)
                .map_err(|e| ActivateError::Other(format!("virtio-fs: bounce region: {e}")))
        };
        let mut configs = Vec::with_capacity(rings.len());
        for (i, l) in rings.iter().enumerate() {
            configs.push(match l {
                None => None,
                Some(l) => Some(VringConfigData {
                    queue_max_size: self.queue_sizes[i],
                    queue_size: l.size,
                    flags: 0,
                    desc_table_addr: hva(l.desc)?,
                    used_ring_addr: hva(l.used)?,
                    avail_ring_addr: hva(l.avail)?,
                    log_addr: None,
                }),
            });
        }

        // The shadow rings use no optional ring feature.
        let mut features = VIRTIO_F_VERSION_1;
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
        for (i, ring) in configs.iter().enumerate() {
            let Some(ring) = ring else {
                continue;
            };
            fe.set_vring_num(i, ring.queue_size).map_err(|e| err("SET_VRING_NUM", e))?;
            fe.set_vring_addr(i, ring).map_err(|e| err("SET_VRING_ADDR", e))?;
            // Shadow rings always start fresh, whatever the guest's
            // positions (a restored VM's are not 0).
            fe.set_vring_base(i, 0).map_err(|e| err("SET_VRING_BASE", e))?;
            fe.set_vring_call(i, &calls[i]).map_err(|e| err("SET_VRING_CALL", e))?;
            fe.set_vring_kick(i, &kicks[i]).map_err(|e| err("SET_VRING_KICK", e))?;
        }
        if self.backend_protocol {
            for (i, _) in configs.iter().enumerate().filter(|(_, r)| r.is_some()) {
                fe.set_vring_enable(i, true).map_err(|e| err("SET_VRING_ENABLE", e))?;
            }
        }
        self.started_vrings = configs.iter().map(Option::is_some).collect();
        Ok(())
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            {
                let mut c = w.shared.control.lock().unwrap_or_else(|p| p.into_inner());
                c.stop = true;
            }
            let _ = w.shared.evt.write(1);
            if w.thread.join().is_err() {
                error!("virtio-fs: relay thread panicked");
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

impl VirtioDevice for Fs {
    fn snapshot_state(&self) -> Option<super::DeviceState> {
        let n = self.in_flight();
        if n > 0 {
            // The guest's used rings do not describe these: a restored VM
            // would never see their answers. Fs::pause first.
            warn!("virtio-fs: snapshot taken with {n} request(s) in flight (pause the device first)");
        }
        Some(super::DeviceState::Fs(self.state()))
    }

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
        let ActivateArgs { mem, interrupt, queues, queue_evts } = args;
        if queues.len() != nq || queue_evts.len() != nq {
            return Err(ActivateError::Other(format!(
                "virtio-fs needs {nq} queues and eventfds, got {} and {}",
                queues.len(),
                queue_evts.len()
            )));
        }
        let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
        // Queues the driver did not set up get no shadow ring.
        let mut guest = Vec::with_capacity(nq);
        for (i, mut q) in queues.into_iter().enumerate() {
            let size = q.size();
            if size == 0 || !q.ready() {
                guest.push(None);
                continue;
            }
            if size > self.queue_sizes[i] || !size.is_power_of_two() {
                return Err(ActivateError::Other(format!("virtio-fs: queue {i} has invalid size {size}")));
            }
            if !q.is_valid(&mem) {
                return Err(ActivateError::Other(format!("virtio-fs: queue {i} rings are outside guest memory")));
            }
            q.set_event_idx(event_idx);
            guest.push(Some(q));
        }
        if guest.iter().all(Option::is_none) {
            return Err(ActivateError::Other("virtio-fs: no queue is ready".into()));
        }

        // A fresh bounce region per activation: nothing virtiofsd still
        // does with an old one can reach the new rings.
        let (layouts, total) = shadow::layout(&self.queue_sizes);
        let bounce = shadow::create_bounce(total)?;
        let rings: Vec<Option<shadow::RingLayout>> =
            guest.iter().zip(&layouts).map(|(g, l)| g.as_ref().map(|_| *l)).collect();
        let calls = (0..nq).map(|_| EventFd::new(EFD_NONBLOCK)).collect::<io::Result<Vec<_>>>()?;
        let kicks = (0..nq).map(|_| EventFd::new(EFD_NONBLOCK)).collect::<io::Result<Vec<_>>>()?;
        let mut relay_queues = Vec::with_capacity(nq);
        for (i, (((g, evt), call), kick)) in guest.into_iter().zip(queue_evts).zip(&calls).zip(&kicks).enumerate() {
            relay_queues.push(RelayQueue {
                guest: g,
                guest_evt: evt,
                shadow: ShadowRing::new(layouts[i], &bounce)?,
                call: call.try_clone()?,
                kick: kick.try_clone()?,
            });
        }

        if let Err(e) = self.setup_vrings(&bounce, &rings, &calls, &kicks) {
            error!("{e}");
            return Err(e);
        }
        self.running = true;

        let shared = Arc::new(Shared {
            control: Mutex::new(Control::default()),
            changed: Condvar::new(),
            evt: EventFd::new(EFD_NONBLOCK)?,
            broken: self.broken.clone(),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        });
        let relay = Relay {
            mem,
            bounce,
            interrupt,
            queues: relay_queues,
            shared: shared.clone(),
            // Hang-up detection only: replies on this socket are read by
            // the frontend, never by the relay.
            sock_fd: self.frontend.as_ref().map_or(-1, |f| f.as_raw_fd()),
            socket: self.cfg.socket.clone(),
        };
        let thread = match crate::seccomp::spawn(crate::seccomp::ThreadKind::Fs, "virtio-fs", move || relay.run()) {
            Ok(t) => t,
            Err(e) => {
                self.stop_vrings();
                return Err(e.into());
            }
        };
        self.worker = Some(Worker { shared, thread });
        info!(
            "virtio-fs: relaying {nq} queues to {} through a {} KiB bounce region",
            self.cfg.socket.display(),
            total >> 10
        );
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.stop_vrings();
        self.frontend.is_some() && !self.is_broken()
    }

    fn shutdown(&mut self) {
        self.stop_worker();
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
mod tests;
