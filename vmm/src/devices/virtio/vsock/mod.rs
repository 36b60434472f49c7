//! virtio-vsock (device type 19) with a Firecracker-style "hybrid" unix
//! socket host side, entirely in user space.
//!
//! The device binds a unix listener at `uds_path`:
//! * a host process connects there and writes `CONNECT <port>\n` to reach
//!   guest port `<port>`; it reads `OK <host port>\n` once the guest accepted,
//!   then the stream carries the connection's bytes (the stream is closed if
//!   nothing listens in the guest);
//! * a guest connecting to host port `P` reaches the unix socket
//!   `<uds_path>_<P>` (connection reset if nothing listens there).
//!
//! Queues: rx (0), tx (1), event (2). Config space: `guest_cid` (u64 LE).
//!
//! The guest is untrusted: every chain is validated ([`packet`]), every
//! per-guest structure is bounded ([`muxer`]), and the worker thread never
//! blocks on a unix socket.

mod connection;
mod muxer;
pub mod packet;
mod unix;
mod worker;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateArgs, ActivateError, DeviceState, VirtioDevice, TYPE_VSOCK, VIRTIO_F_VERSION_1};
use muxer::Muxer;
use worker::Worker;

pub use connection::{CONN_BUF_ALLOC, CREDIT_UPDATE_THRESHOLD};
pub use muxer::{MAX_CONNECTIONS, MAX_CONNECT_LINE, MAX_CTRL_QUEUE, MAX_HANDSHAKES};

/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// Configuration of a vsock device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's context ID (>= 3).
    pub guest_cid: u64,
    /// Where the host-side unix listener is bound.
    pub uds_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock guest CID {0} is invalid (must be at least 3 and below 2^32-1)")]
    InvalidCid(u64),
    #[error("socket path {} is in use", .0.display())]
    PathInUse(PathBuf),
    #[error("vsock socket path {} exists and is not a unix socket", .0.display())]
    NotASocket(PathBuf),
    #[error("vsock socket path {}: {source}", .path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// The device's serializable state. Connections are not part of it: after
/// a restore, activate the device and call [`Vsock::send_transport_reset`]
/// so the guest drops its stale connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    pub guest_cid: u64,
    pub uds_path: PathBuf,
    pub acked_features: u64,
}

struct WorkerHandle {
    kill_evt: EventFd,
    cmd_evt: EventFd,
    thread: JoinHandle<()>,
}

/// The virtio-vsock device.
pub struct Vsock {
    cfg: VsockConfig,
    /// Bound listener (the worker gets a clone); None after shutdown.
    listener: Option<UnixListener>,
    /// (dev, ino) of the socket file we created, so that we only ever remove
    /// our own file.
    socket_id: Option<(u64, u64)>,
    acked_features: u64,
    reset_requested: Arc<AtomicBool>,
    worker: Option<WorkerHandle>,
}

fn io_err(path: &Path, source: io::Error) -> VsockError {
    VsockError::Io { path: path.to_path_buf(), source }
}

/// Binds the listener, refusing a path another process serves and cleaning
/// up a stale socket file.
fn bind_listener(path: &Path) -> Result<UnixListener, VsockError> {
    match std::fs::symlink_metadata(path) {
        Ok(md) => {
            if !md.file_type().is_socket() {
                return Err(VsockError::NotASocket(path.to_path_buf()));
            }
            match unix::connect_nonblocking(path) {
                // Accepting (or with a full backlog): someone serves it.
                Ok(_) => return Err(VsockError::PathInUse(path.to_path_buf())),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Err(VsockError::PathInUse(path.to_path_buf()))
                }
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    debug!("vsock: removing stale socket {}", path.display());
                    match std::fs::remove_file(path) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_err(path, e)),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(path, e)),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path, e)),
    }
    UnixListener::bind(path).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            VsockError::PathInUse(path.to_path_buf())
        } else {
            io_err(path, e)
        }
    })
}

impl Vsock {
    /// Creates the device and binds its unix listener at `cfg.uds_path`.
    pub fn new(cfg: VsockConfig) -> Result<Vsock, VsockError> {
        if cfg.guest_cid < 3 || cfg.guest_cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cfg.guest_cid));
        }
        let listener = bind_listener(&cfg.uds_path)?;
        let socket_id = std::fs::symlink_metadata(&cfg.uds_path).ok().map(|m| (m.dev(), m.ino()));
        Ok(Vsock {
            cfg,
            listener: Some(listener),
            socket_id,
            acked_features: 0,
            reset_requested: Arc::new(AtomicBool::new(false)),
            worker: None,
        })
    }

    /// Recreates a device from a snapshot (binding the listener again); a
    /// TRANSPORT_RESET event goes to the guest once it is activated.
    pub fn from_state(state: &VsockState) -> Result<Vsock, VsockError> {
        let mut v = Vsock::new(VsockConfig { guest_cid: state.guest_cid, uds_path: state.uds_path.clone() })?;
        v.acked_features = state.acked_features & v.avail_features();
        // The guest's connections ended with the snapshot's VMM: tell it as
        // soon as the device runs.
        v.reset_requested.store(true, Ordering::SeqCst);
        Ok(v)
    }

    pub fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.cfg.guest_cid,
            uds_path: self.cfg.uds_path.clone(),
            acked_features: self.acked_features,
        }
    }

    pub fn guest_cid(&self) -> u64 {
        self.cfg.guest_cid
    }

    pub fn uds_path(&self) -> &Path {
        &self.cfg.uds_path
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Posts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (as soon
    /// as the guest provides a buffer; if the device is not active yet, once
    /// it is) and drops all host-side connections.
    pub fn send_transport_reset(&self) {
        self.reset_requested.store(true, Ordering::SeqCst);
        if let Some(w) = &self.worker {
            if let Err(e) = w.cmd_evt.write(1) {
                error!("vsock: waking worker: {e}");
            }
        }
    }

    /// Whether the worker thread is running.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            if let Err(e) = w.kill_evt.write(1) {
                error!("vsock: stopping worker: {e}");
            }
            if w.thread.join().is_err() {
                error!("vsock: worker thread panicked");
            }
        }
    }

    fn remove_socket_file(&mut self) {
        let Some(id) = self.socket_id.take() else {
            return;
        };
        let path = &self.cfg.uds_path;
        match std::fs::symlink_metadata(path) {
            Ok(m) if (m.dev(), m.ino()) == id => {
                if let Err(e) = std::fs::remove_file(path) {
                    warn!("vsock: removing {}: {e}", path.display());
                }
            }
            Ok(_) => debug!("vsock: {} was replaced by someone else; not removing it", path.display()),
            Err(_) => {}
        }
    }

    fn start_worker(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        let listener = self
            .listener
            .as_ref()
            .ok_or_else(|| ActivateError::Other("vsock device was shut down".into()))?
            .try_clone()?;
        let muxer = Muxer::new(self.cfg.guest_cid, &self.cfg.uds_path, listener)?;
        let kill_evt = EventFd::new(EFD_NONBLOCK)?;
        let cmd_evt = EventFd::new(EFD_NONBLOCK)?;
        let worker = Worker::new(
            args.mem,
            args.interrupt,
            args.queues,
            args.queue_evts,
            kill_evt.try_clone()?,
            cmd_evt.try_clone()?,
            self.reset_requested.clone(),
            muxer,
        )?;
        let thread = crate::seccomp::spawn(crate::seccomp::ThreadKind::Vsock, "vsock", move || {
            worker.run();
        })?;
        self.worker = Some(WorkerHandle { kill_evt, cmd_evt, thread });
        Ok(())
    }
}

impl VirtioDevice for Vsock {
    fn snapshot_state(&self) -> Option<DeviceState> {
        Some(DeviceState::Vsock(self.state()))
    }

    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.cfg.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!("vsock: ignoring {}-byte config write at {offset}", data.len());
    }

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Other("vsock device is already active".into()));
        }
        if args.queues.len() != QUEUE_SIZES.len() || args.queue_evts.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::Other(format!(
                "vsock needs 3 queues and eventfds, got {} and {}",
                args.queues.len(),
                args.queue_evts.len()
            )));
        }
        // Unready queues are accepted and never touched (a driver that does
        // not set one up simply does not get its service).
        for (i, q) in args.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&args.mem) {
                return Err(ActivateError::Other(format!(
                    "vsock queue {i} is not valid (bad size or rings outside guest memory)"
                )));
            }
        }
        self.start_worker(args)
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        true
    }

    fn shutdown(&mut self) {
        self.stop_worker();
        self.listener = None;
        self.remove_socket_file();
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.shutdown();
    }
}
