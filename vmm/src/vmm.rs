//! A running VM: its KVM objects, memory, devices and vCPU threads, and the
//! events that drive the VMM's main loop.

use crate::api::{Request, Response, VmInfo, VmStatus};
use crate::config::VmConfig;
use crate::device_manager::DeviceManager;
use crate::devices::virtio::GuestMemory;
use crate::vstate::vcpu::{VcpuExitReason, VcpuHandle};
use crate::vstate::vm::Vm;
use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use vmm_sys_util::eventfd::EventFd;

/// What wakes the VMM's main loop.
pub enum VmmEvent {
    /// A vCPU stopped running the guest.
    Vcpu(u8, VcpuExitReason),
    /// The guest pulled the i8042 reset line.
    GuestReset,
    /// A control API request and where to send its response (boxed: a
    /// configuration is much larger than the other events).
    Api(Box<Request>, Sender<Response>),
    /// SIGTERM or SIGINT.
    Signal(i32),
}

pub struct Vmm {
    pub(crate) vm: Vm,
    pub(crate) mem: GuestMemory,
    pub(crate) mem_file: File,
    pub(crate) config: VmConfig,
    pub(crate) devices: DeviceManager,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) paused: bool,
    pub(crate) reset_evt: EventFd,
    pub(crate) reset_stop: Arc<AtomicBool>,
    pub(crate) reset_thread: Option<JoinHandle<()>>,
}

impl Vmm {
    /// Stops the vCPUs, then the devices' own changes to guest memory
    /// (e.g. frames arriving on a tap): a paused VM's memory holds still.
    pub fn pause(&mut self) {
        for v in &self.vcpus {
            v.pause();
        }
        self.devices.pause_virtio();
        self.paused = true;
    }

    pub fn resume(&mut self) {
        self.devices.resume_virtio();
        for v in &self.vcpus {
            v.resume();
        }
        self.paused = false;
    }

    pub fn info(&self) -> VmInfo {
        VmInfo {
            status: if self.paused { VmStatus::Paused } else { VmStatus::Running },
            vcpus: self.config.vcpus,
            mem_mib: self.config.mem_mib,
            devices: self.devices.cmdline_words(),
        }
    }

    pub fn guest_memory(&self) -> &GuestMemory {
        &self.mem
    }

    pub fn memory_file(&self) -> &File {
        &self.mem_file
    }

    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Stops the vCPUs, then the devices (closing virtiofsd connections and
    /// removing vsock sockets), then the reset forwarder.
    pub fn shutdown(mut self) {
        for v in &mut self.vcpus {
            v.stop();
        }
        self.devices.shutdown();
        self.reset_stop.store(true, Ordering::SeqCst);
        let _ = self.reset_evt.write(1);
        if let Some(t) = self.reset_thread.take() {
            let _ = t.join();
        }
    }
}

/// Forwards the i8042 reset eventfd into the main loop.
pub(crate) fn spawn_reset_forwarder(
    evt: EventFd,
    stop: Arc<AtomicBool>,
    events: Sender<VmmEvent>,
) -> std::io::Result<JoinHandle<()>> {
    crate::seccomp::spawn(crate::seccomp::ThreadKind::Reset, "reset", move || loop {
        if evt.read().is_err() {
            return;
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let _ = events.send(VmmEvent::GuestReset);
    })
}
