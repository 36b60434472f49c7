//! Builds and boots a VM from a [`VmConfig`]: KVM VM and memory, legacy and
//! virtio devices, kernel + initramfs + command line, MP table, vCPUs.

use crate::arch::x86_64::{boot, mptable};
use crate::config::{Console, VmConfig};
use crate::device_manager::DeviceManager;
use crate::devices::virtio::block::{Block, BlockConfig};
use crate::devices::virtio::fs::{Fs, FsConfig};
use crate::devices::virtio::net::{Net, NetConfig};
use crate::devices::virtio::vsock::{Vsock, VsockConfig};
use crate::devices::virtio::GuestMemory;
use crate::vmm::{spawn_reset_forwarder, Vmm, VmmEvent};
use crate::vstate::vcpu::{Vcpu, VcpuExitReason};
use crate::vstate::{memory, vm::Vm};
use anyhow::{Context, Result};
use std::io::Write;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// Builds the VM and starts its vCPUs; guest exits arrive on `events`.
pub fn build_and_boot(config: &VmConfig, events: Sender<VmmEvent>) -> Result<Vmm> {
    config.validate()?;
    let vm = Vm::new()?;
    let (mem, mem_file) = memory::create_memfd(config.mem_mib)?;
    vm.set_memory(&mem)?;
    vm.setup_irqchip()?;
    vm.drop_missed_pit_ticks()?;

    let mut devices = DeviceManager::new();
    let console = console_writer(&config.console)?;
    let reset_evt = EventFd::new(0).context("eventfd")?;
    devices.add_legacy(vm.fd(), console, reset_evt.try_clone()?, None)?;

    // Block devices first, so /dev/vda.. follow the order given.
    for d in &config.disks {
        let blk = Block::new(BlockConfig { path: d.path.clone(), read_only: d.read_only, id: d.id.clone() })?;
        devices.add_virtio(vm.fd(), &mem, Box::new(blk))?;
    }
    for f in &config.fs {
        let fs = Fs::new(FsConfig::new(f.socket.clone(), f.tag.clone()))?;
        devices.add_virtio(vm.fd(), &mem, Box::new(fs))?;
    }
    if let Some(v) = &config.vsock {
        let vsock = Vsock::new(VsockConfig { guest_cid: v.guest_cid, uds_path: v.uds_path.clone() })?;
        devices.add_virtio(vm.fd(), &mem, Box::new(vsock))?;
    }
    // Net devices last: the slots of the others do not depend on them.
    for n in &config.net {
        let net = Net::new(NetConfig { backend: n.backend.clone(), mac: n.mac_addr()? })?;
        devices.add_virtio(vm.fd(), &mem, Box::new(net))?;
    }

    let mut cmdline = boot::cmdline(&config.cmdline)?;
    for w in devices.cmdline_words() {
        cmdline.insert_str(&w).map_err(|e| anyhow::anyhow!("kernel command line: {e}"))?;
    }
    let entry = boot::load(&mem, &config.kernel, config.initrd.as_deref(), &cmdline)?;
    mptable::setup(&mem, config.vcpus)?;

    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        let v = Vcpu::new(vm.fd(), id, devices.pio.clone(), devices.mmio.clone())?;
        v.configure(vm.kvm(), config.vcpus, &mem, (id == 0).then_some(entry))?;
        vcpus.push(v);
    }

    start_vcpus(vm, mem, mem_file, config.clone(), devices, vcpus, reset_evt, events)
}

/// Where the serial console writes.
pub(crate) fn console_writer(c: &Console) -> Result<Box<dyn Write + Send>> {
    Ok(match c {
        Console::Stdout => Box::new(std::io::stdout()),
        Console::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("console file {}", p.display()))?,
        ),
        Console::Off => Box::new(std::io::sink()),
    })
}

/// Starts the configured (or restored) vCPUs and the reset forwarder.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start_vcpus(
    vm: Vm,
    mem: GuestMemory,
    mem_file: std::fs::File,
    config: VmConfig,
    devices: DeviceManager,
    vcpus: Vec<Vcpu>,
    reset_evt: EventFd,
    events: Sender<VmmEvent>,
) -> Result<Vmm> {
    let tx = Mutex::new(events.clone());
    let on_exit: Arc<dyn Fn(u8, VcpuExitReason) + Send + Sync> = Arc::new(move |id, reason| {
        let _ = tx.lock().unwrap().send(VmmEvent::Vcpu(id, reason));
    });
    let reset_stop = Arc::new(AtomicBool::new(false));
    let reset_thread = spawn_reset_forwarder(reset_evt.try_clone()?, reset_stop.clone(), events)?;
    let mut handles = Vec::new();
    for v in vcpus {
        handles.push(v.start(false, on_exit.clone())?);
    }
    Ok(Vmm {
        vm,
        mem,
        mem_file,
        config,
        devices,
        vcpus: handles,
        paused: false,
        reset_evt,
        reset_stop,
        reset_thread: Some(reset_thread),
    })
}
