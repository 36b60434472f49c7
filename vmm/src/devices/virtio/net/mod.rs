//! virtio-net (device type 1) over a tap device.
//!
//! One receive queue (0) and one transmit queue (1), 256 entries each; no
//! control queue, no multiqueue, no mergeable receive buffers. Config
//! space: the MAC address (VIRTIO_NET_F_MAC). Every frame in a guest buffer
//! is preceded by `struct virtio_net_hdr_v1` (12 bytes, VIRTIO_F_VERSION_1),
//! which is also the tap's header (`TUNSETVNETHDRSZ` 12): frames move
//! between guest memory and the tap with one `readv`/`writev` and no copy.
//!
//! Backends ([`NetBackend`]):
//! * `Tap(NAME)`: hull-vmm opens `/dev/net/tun` and attaches to (or
//!   creates) tap NAME in its own network namespace;
//! * `Fd(N)`: an inherited descriptor the parent already attached to a tap
//!   with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` (the shim opens the tap in
//!   the pod's network namespace and passes it); hull-vmm owns it from then
//!   on;
//! * `None`: the device exists, transmitted frames are dropped, nothing is
//!   received. A VM template is built this way; each VM restored from it
//!   gets its own tap ([`NetState::backend`] is replaced on restore).
//!
//! Offloads: offered are checksum offload both ways (VIRTIO_NET_F_CSUM,
//! VIRTIO_NET_F_GUEST_CSUM) and TCP segmentation offload both ways
//! (HOST_TSO4/6: the guest sends up to 64 KiB TCP segments, the host kernel
//! segments them if needed; GUEST_TSO4/6: the tap hands the guest up to
//! 64 KiB TCP segments). On activation the tap gets `TUNSETOFFLOAD` with
//! exactly what the driver accepted (`TUN_F_CSUM` for GUEST_CSUM, plus
//! `TUN_F_TSO4/6` for GUEST_TSO4/6 when GUEST_CSUM is there too), so the
//! kernel only ever hands the guest what it negotiated; frames that
//! disagree anyway (queued before the change) are dropped. Not offered:
//! UFO (Linux's tap ignores `TUN_F_UFO` since 4.14, so the guest would
//! never get such packets, and guests no longer produce them), ECN with
//! TSO (untested), USO, MRG_RXBUF (not needed: a guest that negotiates
//! GUEST_TSO posts 64 KiB+ receive buffers), and INDIRECT_DESC (with it a
//! Linux guest would fill all 256 receive slots with 64 KiB+ buffers, 16+
//! MiB of guest memory; without it 13 such buffers fit).
//!
//! The guest is hostile: every chain is checked ([`chain`]): direction
//! (TX chains only device-readable, RX chains only device-writable), at
//! most [`MAX_CHAIN_DESCS`] descriptors, all inside guest memory, a TX
//! chain between the header plus 14 bytes and the header plus
//! [`MAX_FRAME_LEN`]. A malformed TX chain is completed with length 0 and
//! not sent; a malformed RX chain is completed with length 0. A TX header
//! asking for an offload the driver did not negotiate is dropped. Nothing
//! panics, and the worker never blocks on the tap (it is non-blocking).
//!
//! Snapshots: [`NetState`] (MAC, backend, features); queue positions are
//! the transport's. While the VM is paused ([`VirtioDevice::pause`]) the
//! worker neither reads the tap nor touches guest memory, so a snapshot of
//! a paused VM is consistent. A restore sets the tap's offloads for the
//! features the guest had accepted.

mod chain;
pub mod tap;
mod worker;

#[cfg(test)]
mod tests;

use std::fmt;
use std::os::fd::RawFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use log::{debug, error, info};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateArgs, ActivateError, DeviceState, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};
pub use chain::ChainError;
use tap::Tap;
pub use tap::{TapError, VNET_HDR_LEN};
use worker::NetWorker;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE; 2];
pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
/// Longest descriptor chain accepted.
pub const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;
/// Largest frame (without the virtio-net header) sent from the guest: a
/// 64 KiB TSO segment plus an Ethernet header with a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65536 + 18;
/// Smallest frame: an Ethernet header.
pub const MIN_FRAME_LEN: usize = 14;

/// `TUN_F_*` bits for the features a driver accepted.
pub fn tap_offloads(acked: u64) -> u32 {
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut f = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        f |= libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            f |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            f |= libc::TUN_F_TSO6;
        }
    }
    f
}

/// The features every virtio-net device offers (the same whatever the
/// backend, so a template built without one restores onto a tap).
pub const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1
    | (1u64 << VIRTIO_NET_F_MAC)
    | (1u64 << VIRTIO_NET_F_CSUM)
    | (1u64 << VIRTIO_NET_F_GUEST_CSUM)
    | (1u64 << VIRTIO_NET_F_GUEST_TSO4)
    | (1u64 << VIRTIO_NET_F_GUEST_TSO6)
    | (1u64 << VIRTIO_NET_F_HOST_TSO4)
    | (1u64 << VIRTIO_NET_F_HOST_TSO6)
    | (1u64 << VIRTIO_RING_F_EVENT_IDX);

/// An Ethernet address, written `02:00:00:00:00:01`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address.
    pub fn random() -> MacAddr {
        let mut b = [0u8; 6];
        // SAFETY: getrandom into a local buffer of the given length.
        let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
        if n != b.len() as isize {
            // Never seen in practice; still unique enough per process.
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let x = t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 24);
            b.copy_from_slice(&x.to_le_bytes()[..6]);
        }
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

/// Why a MAC address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    #[error("expected six hex bytes separated by colons, like 02:00:00:00:00:01")]
    Syntax,
    #[error("a multicast address (lowest bit of the first byte set) cannot be a device address")]
    Multicast,
    #[error("the all-zero address cannot be a device address")]
    Zero,
}

impl FromStr for MacAddr {
    type Err = MacError;

    fn from_str(s: &str) -> Result<MacAddr, MacError> {
        let mut b = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut b {
            let p = parts.next().ok_or(MacError::Syntax)?;
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(MacError::Syntax);
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| MacError::Syntax)?;
        }
        if parts.next().is_some() {
            return Err(MacError::Syntax);
        }
        let mac = MacAddr(b);
        if !mac.is_unicast() {
            return Err(MacError::Multicast);
        }
        if b == [0; 6] {
            return Err(MacError::Zero);
        }
        Ok(mac)
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e| serde::de::Error::custom(format!("MAC address {s:?}: {e}")))
    }
}

/// Where a net device's frames go. JSON: `"none"`, `{"tap": "NAME"}` or
/// `{"fd": N}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetBackend {
    /// Attach to (or create) the tap interface NAME in hull-vmm's network
    /// namespace.
    Tap(String),
    /// An inherited descriptor attached to a tap with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`; hull-vmm takes it over.
    Fd(RawFd),
    /// No backend: frames sent are dropped, none are received.
    None,
}

impl fmt::Display for NetBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetBackend::Tap(n) => write!(f, "tap={n}"),
            NetBackend::Fd(n) => write!(f, "fd={n}"),
            NetBackend::None => f.write_str("none"),
        }
    }
}

/// Configuration of one net device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub backend: NetBackend,
    /// The guest's MAC address; random (locally administered) if None.
    pub mac: Option<MacAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("virtio-net: {0}")]
    Tap(#[from] TapError),
}

/// The device's serializable state (queue positions are the transport's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub mac: MacAddr,
    /// The backend the device had; a restore usually replaces it.
    pub backend: NetBackend,
    pub avail_features: u64,
    pub acked_features: u64,
}

/// Counters, for logs and tests.
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    /// Frames read from the tap but not given to the guest (too large for
    /// the buffer, an offload the driver did not negotiate).
    pub rx_dropped: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Guest frames not sent (malformed, not negotiated, no backend, tap
    /// write failed).
    pub tx_dropped: AtomicU64,
    /// Chains refused as malformed (both queues).
    pub bad_chains: AtomicU64,
    /// Worker loop iterations (each wake-up is one).
    pub rounds: AtomicU64,
}

/// Shared between the device and its worker: the pause flag, and the gate
/// the worker holds while it processes the queues (pausing takes it once,
/// so that when `pause` returns no round is running).
#[derive(Debug, Default)]
pub(crate) struct Control {
    pub(crate) paused: AtomicBool,
    pub(crate) gate: Mutex<()>,
}

struct WorkerHandle {
    kill_evt: EventFd,
    cmd_evt: EventFd,
    thread: JoinHandle<()>,
}

/// The virtio-net device.
pub struct Net {
    mac: MacAddr,
    backend: NetBackend,
    tap: Option<Arc<Tap>>,
    acked_features: u64,
    control: Arc<Control>,
    stats: Arc<NetStats>,
    worker: Option<WorkerHandle>,
}

impl Net {
    /// Opens the backend (`Tap` and `Fd` need the tap now; errors name it).
    pub fn new(cfg: NetConfig) -> Result<Net, NetError> {
        let tap = match &cfg.backend {
            NetBackend::Tap(name) => Some(Arc::new(Tap::open(name)?)),
            NetBackend::Fd(fd) => Some(Arc::new(Tap::from_fd(*fd)?)),
            NetBackend::None => None,
        };
        let mac = cfg.mac.unwrap_or_else(MacAddr::random);
        match &tap {
            Some(t) => info!("virtio-net: {mac} on tap {} ({})", t.name(), cfg.backend),
            None => info!("virtio-net: {mac} without a backend"),
        }
        Ok(Net {
            mac,
            backend: cfg.backend,
            tap,
            acked_features: 0,
            control: Arc::new(Control::default()),
            stats: Arc::new(NetStats::default()),
            worker: None,
        })
    }

    /// The device of a snapshot with this VM's backend (the MAC stays the
    /// snapshot's: the guest read it when it booted).
    pub fn from_state(state: &NetState, backend: NetBackend) -> Result<Net, NetError> {
        let mut n = Net::new(NetConfig { backend, mac: Some(state.mac) })?;
        n.acked_features = state.acked_features & AVAIL_FEATURES;
        Ok(n)
    }

    pub fn state(&self) -> NetState {
        NetState {
            mac: self.mac,
            backend: self.backend.clone(),
            avail_features: AVAIL_FEATURES,
            acked_features: self.acked_features,
        }
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The tap's interface name, if there is a tap.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap.as_deref().map(Tap::name)
    }

    pub fn stats(&self) -> &NetStats {
        &self.stats
    }

    /// Whether the worker thread runs.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    fn stop_worker(&mut self) {
        let Some(w) = self.worker.take() else { return };
        if let Err(e) = w.kill_evt.write(1) {
            error!("virtio-net: stopping worker: {e}");
            return;
        }
        if w.thread.join().is_err() {
            error!("virtio-net: worker thread panicked");
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & AVAIL_FEATURES;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6]; status and the rest are not
        // offered and read as zero.
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.mac.0.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only legacy drivers write the MAC here.
        debug!("virtio-net: config write of {} bytes at {offset:#x} ignored", data.len());
    }

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Other("virtio-net: already active".into()));
        }
        let ActivateArgs { mem, interrupt, queues, queue_evts } = args;
        let (Ok([rxq, txq]), Ok([rx_evt, tx_evt])) = (<[_; 2]>::try_from(queues), <[EventFd; 2]>::try_from(queue_evts))
        else {
            return Err(ActivateError::Other("virtio-net: expected 2 queues and 2 eventfds".into()));
        };
        // Unready queues are never touched; ready ones were validated by
        // the transport.
        for (i, q) in [&rxq, &txq].into_iter().enumerate() {
            if q.ready() && !q.is_valid(&mem) {
                return Err(ActivateError::Other(format!("virtio-net: queue {i} is not valid")));
            }
        }
        if let Some(tap) = &self.tap {
            let offloads = tap_offloads(self.acked_features);
            tap.set_offload(offloads).map_err(|e| {
                ActivateError::Other(format!("virtio-net: tap {}: TUNSETOFFLOAD {offloads:#x}: {e}", tap.name()))
            })?;
        }
        let kill_evt = EventFd::new(EFD_NONBLOCK)?;
        let cmd_evt = EventFd::new(EFD_NONBLOCK)?;
        let (worker_kill, worker_cmd) = (kill_evt.try_clone()?, cmd_evt.try_clone()?);
        let worker = NetWorker::new(
            mem,
            interrupt,
            rxq,
            txq,
            self.acked_features,
            self.tap.clone(),
            self.control.clone(),
            self.stats.clone(),
        );
        let thread = crate::seccomp::spawn(crate::seccomp::ThreadKind::Net, "virtio-net", move || {
            worker.run([rx_evt, tx_evt], worker_kill, worker_cmd)
        })?;
        self.worker = Some(WorkerHandle { kill_evt, cmd_evt, thread });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.acked_features = 0;
        true
    }

    fn shutdown(&mut self) {
        self.stop_worker();
        self.tap = None;
    }

    fn pause(&mut self) {
        self.control.paused.store(true, Ordering::SeqCst);
        // Wait for a round in progress to end.
        drop(self.control.gate.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn resume(&mut self) {
        self.control.paused.store(false, Ordering::SeqCst);
        if let Some(w) = &self.worker {
            if let Err(e) = w.cmd_evt.write(1) {
                error!("virtio-net: waking worker: {e}");
            }
        }
    }

    fn snapshot_state(&self) -> Option<DeviceState> {
        Some(DeviceState::Net(self.state()))
    }
}
