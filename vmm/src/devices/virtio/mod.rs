//! Virtio devices and the virtio-mmio transport.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] wraps it and is
//! what sits on the MMIO bus. On activation a device gets the guest memory, its
//! queues, one eventfd per queue (signalled by KVM ioeventfd when the guest
//! writes QueueNotify) and an [`Interrupt`] to raise its IRQ line.
//!
//! Everything a device reads from a queue comes from the guest and is hostile:
//! descriptor addresses, lengths, flags and chain shapes are checked, and a bad
//! request gets an error status in the device protocol, never a panic.

pub mod block;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_FS: u32 = 26;

/// Feature bit every modern (non-legacy) device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bits of the virtio-mmio InterruptStatus register.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt line: the InterruptStatus bits plus the irqfd KVM
/// injects from.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Interrupt { status: AtomicU32::new(0), evt }
    }

    pub fn signal_used_queue(&self) -> io::Result<()> {
        self.raise(INT_USED_RING)
    }

    pub fn signal_config_change(&self) -> io::Result<()> {
        self.raise(INT_CONFIG)
    }

    fn raise(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The guest's InterruptACK write.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Restores the status bits (snapshot restore).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// A device's own serializable state, for snapshots (the transport's is
/// [`mmio::MmioState`]; connections and worker threads are not state).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum DeviceState {
    Block(block::BlockState),
    Fs(fs::FsState),
    Net(net::NetState),
    Vsock(vsock::VsockState),
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateArgs {
    pub mem: GuestMemory,
    pub interrupt: std::sync::Arc<Interrupt>,
    pub queues: Vec<virtio_queue::Queue>,
    /// One per queue, same order as `queues`.
    pub queue_evts: Vec<EventFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("device activation: {0}")]
    Io(#[from] io::Error),
    #[error("device activation: {0}")]
    Other(String),
}

/// A virtio device model behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (TYPE_*).
    fn device_type(&self) -> u32;
    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (must include VIRTIO_F_VERSION_1).
    fn avail_features(&self) -> u64;
    /// The features the driver accepted (a subset of `avail_features`).
    fn set_acked_features(&mut self, acked: u64);
    /// Reads device config space; out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space; out-of-range writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues.
    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError>;
    /// The driver reset the device: stop serving queues. Returns true if the
    /// device can be activated again.
    fn reset(&mut self) -> bool {
        false
    }
    /// The VMM is exiting: stop worker threads, close backend connections and
    /// remove any socket files the device created.
    fn shutdown(&mut self) {}
    /// The VM is paused (its vCPUs stopped, e.g. for a snapshot): stop
    /// changing guest memory on the device's own initiative (frames
    /// arriving from a backend) until [`Self::resume`]. When this returns,
    /// no such change is in progress.
    fn pause(&mut self) {}
    /// The VM runs again after [`Self::pause`].
    fn resume(&mut self) {}
    /// The device's state for a snapshot; None if it cannot be snapshotted.
    fn snapshot_state(&self) -> Option<DeviceState> {
        None
    }
}
