//! Places devices on the buses: legacy devices on port I/O, virtio devices in
//! consecutive virtio-mmio windows with one IRQ each (irqfd), their queue
//! notifications as KVM ioeventfds, and their kernel command-line announcements.

use crate::arch::x86_64::layout::{FIRST_VIRTIO_IRQ, LAST_IRQ, SERIAL_IRQ, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::devices::bus::{Bus, BusError};
use crate::devices::legacy::{
    EventFdTrigger, Serial, SerialState, I8042, I8042_PORT_BASE, I8042_PORT_LEN, SERIAL_PORT_BASE, SERIAL_PORT_LEN,
};
use crate::devices::virtio::mmio::{MmioState, MmioTransport};
use crate::devices::virtio::{DeviceState, GuestMemory, VirtioDevice};
use kvm_ioctls::{IoEventAddress, VmFd};
use std::io::Write;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Offset of the QueueNotify register in a virtio-mmio window.
const QUEUE_NOTIFY_OFFSET: u64 = 0x50;

#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("{what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("no IRQ left for another virtio device (at most {} devices)", LAST_IRQ - FIRST_VIRTIO_IRQ + 1)]
    NoIrq,
    #[error("virtio-mmio transport: {0}")]
    Transport(std::io::Error),
}

/// One virtio device as placed: where, which IRQ, its transport.
pub struct VirtioSlot {
    pub base: u64,
    pub irq: u32,
    pub transport: Arc<Mutex<MmioTransport>>,
}

#[derive(Default)]
pub struct DeviceManager {
    pub pio: Bus,
    pub mmio: Bus,
    pub virtio: Vec<VirtioSlot>,
    serial: Option<Arc<Mutex<Serial>>>,
}

impl DeviceManager {
    pub fn new() -> Self {
        Self::default()
    }

    /// COM1 (IRQ 4) writing to `console` (with its registers from a
    /// snapshot, if given), and the i8042 whose reset command writes
    /// `reset_evt`.
    pub fn add_legacy(
        &mut self,
        vm: &VmFd,
        console: Box<dyn Write + Send>,
        reset_evt: EventFd,
        serial_state: Option<&SerialState>,
    ) -> Result<(), DeviceManagerError> {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        vm.register_irqfd(&irq, SERIAL_IRQ)
            .map_err(|source| DeviceManagerError::Kvm { what: "KVM_IRQFD (serial)", source })?;
        let serial = match serial_state {
            Some(s) => Serial::from_state(s, EventFdTrigger(irq), console),
            None => Serial::new(EventFdTrigger(irq), console),
        };
        let serial = Arc::new(Mutex::new(serial));
        self.serial = Some(serial.clone());
        self.pio.insert(serial, SERIAL_PORT_BASE, SERIAL_PORT_LEN)?;
        self.pio.insert(
            Arc::new(Mutex::new(I8042::new(EventFdTrigger(reset_evt)))),
            I8042_PORT_BASE,
            I8042_PORT_LEN,
        )?;
        Ok(())
    }

    /// Adds a virtio device in the next free window; returns its slot index.
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        dev: Box<dyn VirtioDevice>,
    ) -> Result<usize, DeviceManagerError> {
        self.place_virtio(vm, |irq_evt| MmioTransport::new(mem.clone(), dev, irq_evt))
    }

    /// Adds a virtio device in the next free window with its transport
    /// restored from `state` (if it was active, [`Self::finish_restore`]
    /// activates it). The window
    /// and IRQ follow from the position, as when the snapshot was taken.
    pub fn add_virtio_restored(
        &mut self,
        vm: &VmFd,
        mem: &GuestMemory,
        dev: Box<dyn VirtioDevice>,
        state: &MmioState,
    ) -> Result<usize, DeviceManagerError> {
        self.place_virtio(vm, |irq_evt| MmioTransport::restore(mem.clone(), dev, irq_evt, state))
    }

    fn place_virtio(
        &mut self,
        vm: &VmFd,
        make: impl FnOnce(EventFd) -> std::io::Result<MmioTransport>,
    ) -> Result<usize, DeviceManagerError> {
        let index = self.virtio.len();
        let irq = FIRST_VIRTIO_IRQ + index as u32;
        if irq > LAST_IRQ {
            return Err(DeviceManagerError::NoIrq);
        }
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        vm.register_irqfd(&irq_evt, irq)
            .map_err(|source| DeviceManagerError::Kvm { what: "KVM_IRQFD (virtio)", source })?;
        let transport = make(irq_evt).map_err(DeviceManagerError::Transport)?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET), q as u32)
                .map_err(|source| DeviceManagerError::Kvm { what: "KVM_IOEVENTFD", source })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        self.mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        self.virtio.push(VirtioSlot { base, irq, transport });
        Ok(index)
    }

    /// `virtio_mmio.device=` words announcing every virtio device.
    pub fn cmdline_words(&self) -> Vec<String> {
        self.virtio.iter().map(|s| format!("virtio_mmio.device=4K@{:#x}:{}", s.base, s.irq)).collect()
    }

    /// Activates the restored devices (after the vCPUs' state is restored).
    pub fn finish_restore(&self) -> Result<(), DeviceManagerError> {
        for s in &self.virtio {
            s.transport
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .finish_restore()
                .map_err(DeviceManagerError::Transport)?;
        }
        Ok(())
    }

    /// Each virtio device's transport and device state, in slot order.
    pub fn save_virtio_states(&self) -> Vec<(MmioState, Option<DeviceState>)> {
        self.virtio
            .iter()
            .map(|s| {
                let t = s.transport.lock().unwrap_or_else(|p| p.into_inner());
                (t.save_state(), t.device().snapshot_state())
            })
            .collect()
    }

    /// Tells every virtio device the VM is paused: none changes guest
    /// memory on its own until [`Self::resume_virtio`].
    pub fn pause_virtio(&self) {
        for s in &self.virtio {
            s.transport.lock().unwrap_or_else(|p| p.into_inner()).device_mut().pause();
        }
    }

    /// The VM runs again.
    pub fn resume_virtio(&self) {
        for s in &self.virtio {
            s.transport.lock().unwrap_or_else(|p| p.into_inner()).device_mut().resume();
        }
    }

    pub fn serial_state(&self) -> Option<SerialState> {
        self.serial.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).state())
    }

    /// Stops device workers, closes back-end connections, removes sockets.
    pub fn shutdown(&self) {
        for s in &self.virtio {
            s.transport.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
        }
    }
}
