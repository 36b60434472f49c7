//! The KVM VM: memory slots, in-kernel irqchip (PIC + IOAPIC) and PIT, clock.

use crate::arch::x86_64::layout::KVM_TSS_ADDR;
use crate::devices::virtio::GuestMemory;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_reinject_control, kvm_userspace_memory_region,
    KVMIO, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_io_nr;

// Not wrapped by kvm-ioctls. `_IO` although it takes a pointer, as in the kernel.
ioctl_io_nr!(KVM_REINJECT_CONTROL, KVMIO, 0x71);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0} (see `hull check`)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("{what}: {source}")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Serializable VM-wide state (for snapshots).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

/// /dev/kvm opened before the process gave up the right to open it (the
/// jail), taken by the first VM.
static PREOPENED_KVM: std::sync::Mutex<Option<std::os::fd::OwnedFd>> = std::sync::Mutex::new(None);

/// Hands an open /dev/kvm to the next [`Vm::new`].
pub fn preopen_kvm(fd: std::os::fd::OwnedFd) {
    *PREOPENED_KVM.lock().unwrap_or_else(|e| e.into_inner()) = Some(fd);
}

fn open_kvm() -> Result<Kvm, VmError> {
    match PREOPENED_KVM.lock().unwrap_or_else(|e| e.into_inner()).take() {
        // SAFETY: the fd is an open /dev/kvm that nothing else owns.
        Some(fd) => {
            Ok(unsafe { <Kvm as std::os::fd::FromRawFd>::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) })
        }
        None => Kvm::new().map_err(VmError::OpenKvm),
    }
}

impl Vm {
    pub fn new() -> Result<Vm, VmError> {
        let kvm = open_kvm()?;
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        Ok(Vm { kvm, fd })
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every guest memory region as a KVM memory slot.
    pub fn set_memory(&self, mem: &GuestMemory) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region stays mapped for the VM's life (the VMM keeps `mem`).
            unsafe { self.fd.set_user_memory_region(r) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        Ok(())
    }

    /// The TSS, the in-kernel PIC + IOAPIC + local APICs, and a PIT.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd.set_tss_address(KVM_TSS_ADDR as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        self.fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        self.fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(())
    }

    /// By default KVM re-delivers every PIT tick the guest missed, one
    /// period at a time: after the host stalls (an overloaded host, or the
    /// lab's emulated CPU) a periodic PIT then fires back to back and the
    /// catch-up can keep a host CPU busy for good (seen as a soft lockup
    /// of the kvm-pit thread during a bzImage boot in CI). Linux guests
    /// keep time from the TSC / kvm-clock, so a booting VM drops missed
    /// ticks instead. Only at boot, where a guest calibrates against the
    /// PIT: the ioctl waits for an SRCU grace period (14 ms p50 on this
    /// host, measured by `hull-bench native`), which a restore cannot
    /// afford, and a restored guest has long finished with the PIT.
    pub fn drop_missed_pit_ticks(&self) -> Result<(), VmError> {
        let ctl = kvm_reinject_control { pit_reinject: 0, ..Default::default() };
        // SAFETY: the ioctl reads a `kvm_reinject_control` that outlives the call.
        let r = unsafe { ioctl_with_ref(&self.fd, KVM_REINJECT_CONTROL(), &ctl) };
        if r < 0 {
            return Err(VmError::Kvm { what: "KVM_REINJECT_CONTROL", source: kvm_ioctls::Error::last() });
        }
        Ok(())
    }

    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| -> Result<kvm_irqchip, VmError> {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            self.fd.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        let mut clock = self.fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
        // Only the clock value is meaningful to restore.
        clock.flags = 0;
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock,
        })
    }

    pub fn restore_state(&self, s: &VmState) -> Result<(), VmError> {
        self.fd.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        self.fd.set_clock(&s.clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        for c in [&s.pic_master, &s.pic_slave, &s.ioapic] {
            self.fd.set_irqchip(c).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KVM's host-side ioctls work even where guests cannot run (PVM): this
    /// runs natively.
    #[test]
    fn vm_state_round_trips_through_json() {
        let vm = Vm::new().expect("/dev/kvm");
        let (mem, _f) = crate::vstate::memory::create_memfd(32).unwrap();
        vm.set_memory(&mem).unwrap();
        vm.setup_irqchip().unwrap();
        let s = vm.save_state().unwrap();
        let json = serde_json::to_string(&s).unwrap();
        let back: VmState = serde_json::from_str(&json).unwrap();
        let vm2 = Vm::new().unwrap();
        vm2.setup_irqchip().unwrap();
        vm2.restore_state(&back).unwrap();
        let s2 = vm2.save_state().unwrap();
        assert_eq!(serde_json::to_value(s2.ioapic).unwrap(), serde_json::to_value(s.ioapic).unwrap());
    }
}
