//! vCPUs: configuration for boot, the run loop (port I/O and MMIO exits go to
//! the buses), pause/resume/stop from other threads, and serializable state.

use crate::arch::x86_64::boot::KernelEntry;
use crate::arch::x86_64::regs;
use crate::devices::bus::Bus;
use crate::devices::virtio::GuestMemory;
use kvm_bindings::{
    kvm_cpuid_entry2, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {id}: {what}: {source}")]
    Kvm { id: u8, what: &'static str, source: kvm_ioctls::Error },
    #[error("vCPU {id}: {0}", id = .1)]
    Boot(String, u8),
    #[error("spawning vCPU thread: {0}")]
    Spawn(std::io::Error),
}

/// Why a vCPU stopped running the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// The guest asked for a reset (triple fault, or KVM system event reset).
    Reset,
    /// The guest powered off.
    PowerOff,
    /// KVM failed to run the guest; the text says how.
    Error(String),
}

/// Everything KVM keeps about one vCPU, as plain data (for snapshots). The
/// x87/SSE state is inside `xsave`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub xcrs: kvm_xcrs,
    pub xsave: kvm_xsave,
    /// (index, value) of every MSR KVM lets us read: syscall entry points,
    /// kvmclock, TSC, APIC base and the rest.
    #[serde(default)]
    pub msrs: Vec<(u32, u64)>,
    /// The CPUID the guest saw (a restore sets exactly this: the guest
    /// kernel chose its code paths by it; and it skips the slow
    /// KVM_GET_SUPPORTED_CPUID).
    #[serde(default)]
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
}

impl Vcpu {
    pub fn new(vm: &VmFd, id: u8, pio: Bus, mmio: Bus) -> Result<Vcpu, VcpuError> {
        let fd =
            vm.create_vcpu(u64::from(id)).map_err(|source| VcpuError::Kvm { id, what: "KVM_CREATE_VCPU", source })?;
        Ok(Vcpu { id, fd, pio, mmio })
    }

    fn kvm_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Kvm { id, what, source }
    }

    /// CPUID, MSRs, FPU and LAPIC for every vCPU; entry registers for the
    /// boot vCPU (the others wait for INIT/SIPI from it).
    pub fn configure(
        &self,
        kvm: &Kvm,
        num_cpus: u8,
        mem: &GuestMemory,
        entry: Option<KernelEntry>,
    ) -> Result<(), VcpuError> {
        self.configure_cpuid(kvm, num_cpus)?;
        let msrs = regs::boot_msrs();
        let n = self.fd.set_msrs(&msrs).map_err(self.kvm_err("KVM_SET_MSRS"))?;
        if n != msrs.as_fam_struct_ref().nmsrs as usize {
            return Err(VcpuError::Boot(format!("KVM set only {n} boot MSRs"), self.id));
        }
        self.fd.set_fpu(&regs::boot_fpu()).map_err(self.kvm_err("KVM_SET_FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?;
        regs::set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        if let Some(e) = entry {
            let mut sregs = self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?;
            regs::boot_sregs(mem, e.mode, &mut sregs).map_err(|err| VcpuError::Boot(err.to_string(), self.id))?;
            self.fd.set_sregs(&sregs).map_err(self.kvm_err("KVM_SET_SREGS"))?;
            self.fd.set_regs(&regs::boot_regs(e.mode, e.entry)).map_err(self.kvm_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// CPUID only: what a restored vCPU needs before its state is set.
    pub fn configure_cpuid(&self, kvm: &Kvm, num_cpus: u8) -> Result<(), VcpuError> {
        let mut cpuid =
            kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(self.kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        patch_cpuid(&mut cpuid, self.id, num_cpus);
        self.fd.set_cpuid2(&cpuid).map_err(self.kvm_err("KVM_SET_CPUID2"))
    }

    /// Reads every MSR in `indices`; MSRs this KVM refuses to read are left
    /// out (KVM_GET_MSRS stops at the first one it cannot read).
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuError> {
        let mut out = Vec::with_capacity(indices.len());
        let mut rest = indices;
        while !rest.is_empty() {
            let entries: Vec<kvm_msr_entry> =
                rest.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let mut msrs =
                Msrs::from_entries(&entries).map_err(|e| VcpuError::Boot(format!("MSR list: {e:?}"), self.id))?;
            let n = self.fd.get_msrs(&mut msrs).map_err(self.kvm_err("KVM_GET_MSRS"))?;
            out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            // Skip the MSR that stopped the read.
            rest = rest.get(n + 1..).unwrap_or(&[]);
        }
        Ok(out)
    }

    /// Sets the CPUID of a snapshot's vCPU; none saved (an older snapshot):
    /// computed as for boot.
    pub fn restore_cpuid(&self, kvm: &Kvm, num_cpus: u8, entries: &[kvm_cpuid_entry2]) -> Result<(), VcpuError> {
        if entries.is_empty() {
            return self.configure_cpuid(kvm, num_cpus);
        }
        let cpuid = CpuId::from_entries(entries).map_err(|e| VcpuError::Boot(format!("CPUID: {e:?}"), self.id))?;
        self.fd.set_cpuid2(&cpuid).map_err(self.kvm_err("KVM_SET_CPUID2"))
    }

    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        Ok(VcpuState {
            cpuid: self
                .fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(self.kvm_err("KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec(),
            msrs: self.read_msrs(msr_indices)?,
            id: self.id,
            regs: self.fd.get_regs().map_err(self.kvm_err("KVM_GET_REGS"))?,
            sregs: self.fd.get_sregs().map_err(self.kvm_err("KVM_GET_SREGS"))?,
            lapic: self.fd.get_lapic().map_err(self.kvm_err("KVM_GET_LAPIC"))?,
            mp_state: self.fd.get_mp_state().map_err(self.kvm_err("KVM_GET_MP_STATE"))?,
            events: self.fd.get_vcpu_events().map_err(self.kvm_err("KVM_GET_VCPU_EVENTS"))?,
            xcrs: self.fd.get_xcrs().map_err(self.kvm_err("KVM_GET_XCRS"))?,
            xsave: self.fd.get_xsave().map_err(self.kvm_err("KVM_GET_XSAVE"))?,
        })
    }

    pub fn restore_state(&self, s: &VcpuState) -> Result<(), VcpuError> {
        self.fd.set_sregs(&s.sregs).map_err(self.kvm_err("KVM_SET_SREGS"))?;
        self.fd.set_regs(&s.regs).map_err(self.kvm_err("KVM_SET_REGS"))?;
        self.fd.set_xcrs(&s.xcrs).map_err(self.kvm_err("KVM_SET_XCRS"))?;
        // SAFETY: the kvm_xsave came from KVM_GET_XSAVE of the same layout.
        unsafe { self.fd.set_xsave(&s.xsave) }.map_err(self.kvm_err("KVM_SET_XSAVE"))?;
        self.fd.set_lapic(&s.lapic).map_err(self.kvm_err("KVM_SET_LAPIC"))?;
        // After the LAPIC: the TSC deadline lives in an MSR.
        if !s.msrs.is_empty() {
            let entries: Vec<kvm_msr_entry> =
                s.msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
            let msrs =
                Msrs::from_entries(&entries).map_err(|e| VcpuError::Boot(format!("MSR list: {e:?}"), self.id))?;
            let n = self.fd.set_msrs(&msrs).map_err(self.kvm_err("KVM_SET_MSRS"))?;
            if n != entries.len() {
                return Err(VcpuError::Boot(
                    format!("KVM_SET_MSRS took {n} of {} MSRs (stopped at {:#x})", entries.len(), entries[n].index),
                    self.id,
                ));
            }
        }
        self.fd.set_mp_state(s.mp_state).map_err(self.kvm_err("KVM_SET_MP_STATE"))?;
        self.fd.set_vcpu_events(&s.events).map_err(self.kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }

    /// Runs the guest until it stops or `control` says stop.
    fn run_loop(mut self, control: Arc<VcpuControl>, on_exit: Arc<dyn Fn(u8, VcpuExitReason) + Send + Sync>) {
        loop {
            if !control.wait_runnable(|indices| self.save_state(indices)) {
                return;
            }
            let reason = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    self.pio.read(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    self.pio.write(u64::from(port), data);
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.mmio.read(addr, data);
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.mmio.write(addr, data);
                    continue;
                }
                Ok(VcpuExit::Shutdown) => VcpuExitReason::Reset,
                Ok(VcpuExit::SystemEvent(t, _)) if t == KVM_SYSTEM_EVENT_RESET => VcpuExitReason::Reset,
                Ok(VcpuExit::SystemEvent(t, _)) if t == KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExitReason::PowerOff,
                // With the in-kernel LAPIC, HLT exits only if the guest halts for good.
                Ok(VcpuExit::Hlt) => VcpuExitReason::PowerOff,
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    VcpuExitReason::Error(format!("KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"))
                }
                Ok(VcpuExit::InternalError) => VcpuExitReason::Error(
                    "KVM internal error (on a PVM-only host a standard guest cannot run: see `hull check`)".into(),
                ),
                Ok(other) => VcpuExitReason::Error(format!("unexpected exit {other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);
                    continue;
                }
                Err(e) => VcpuExitReason::Error(format!("KVM_RUN: {e}")),
            };
            control.mark_stopped();
            on_exit(self.id, reason);
            return;
        }
    }

    /// Starts the vCPU thread (paused if `paused`).
    pub fn start(
        self,
        paused: bool,
        on_exit: Arc<dyn Fn(u8, VcpuExitReason) + Send + Sync>,
    ) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler();
        let control = Arc::new(VcpuControl::new(if paused { RunState::Paused } else { RunState::Running }));
        let c = control.clone();
        let id = self.id;
        let thread = crate::seccomp::spawn(crate::seccomp::ThreadKind::Vcpu, format!("vcpu{id}"), move || {
            self.run_loop(c, on_exit)
        })
        .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle { id, control, thread: Some(thread) })
    }
}

/// The MSRs KVM can save and restore on this host.
pub fn msr_index_list(kvm: &Kvm) -> Result<Vec<u32>, VcpuError> {
    let l =
        kvm.get_msr_index_list().map_err(|source| VcpuError::Kvm { id: 0, what: "KVM_GET_MSR_INDEX_LIST", source })?;
    Ok(l.as_slice().to_vec())
}

/// CPUID as the guest should see it: its APIC ID, the vCPU count, and the
/// hypervisor bit.
fn patch_cpuid(cpuid: &mut CpuId, id: u8, num_cpus: u8) {
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(num_cpus) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
                e.edx |= 1 << 28; // HTT: the logical count above is valid
            }
            0xb => e.edx = u32::from(id),
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Stopping,
    Stopped,
}

/// A paused vCPU's state, asked for by another thread and read by the vCPU
/// thread itself (the VcpuFd lives there).
#[derive(Default)]
struct SaveSlot {
    request: Option<Vec<u32>>,
    answer: Option<Result<VcpuState, VcpuError>>,
}

struct VcpuControl {
    state: Mutex<RunState>,
    cv: Condvar,
    /// True while the thread is inside (or about to enter) KVM_RUN.
    in_guest: Mutex<bool>,
    save: Mutex<SaveSlot>,
}

impl VcpuControl {
    fn new(s: RunState) -> Self {
        VcpuControl {
            state: Mutex::new(s),
            cv: Condvar::new(),
            in_guest: Mutex::new(false),
            save: Mutex::new(SaveSlot::default()),
        }
    }

    /// Blocks while paused (answering state requests with `save`); false
    /// when the vCPU must stop.
    fn wait_runnable(&self, save: impl Fn(&[u32]) -> Result<VcpuState, VcpuError>) -> bool {
        let mut st = self.state.lock().unwrap();
        loop {
            match *st {
                RunState::Running => {
                    *self.in_guest.lock().unwrap() = true;
                    return true;
                }
                RunState::Paused => {
                    *self.in_guest.lock().unwrap() = false;
                    {
                        let mut slot = self.save.lock().unwrap();
                        if let Some(indices) = slot.request.take() {
                            slot.answer = Some(save(&indices));
                        }
                    }
                    self.cv.notify_all();
                    st = self.cv.wait(st).unwrap();
                }
                RunState::Stopping | RunState::Stopped => {
                    *st = RunState::Stopped;
                    *self.in_guest.lock().unwrap() = false;
                    self.cv.notify_all();
                    return false;
                }
            }
        }
    }

    fn mark_stopped(&self) {
        *self.state.lock().unwrap() = RunState::Stopped;
        *self.in_guest.lock().unwrap() = false;
        self.cv.notify_all();
    }
}

/// The VMM's hold on a running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    control: Arc<VcpuControl>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Moves the vCPU to `target` and kicks it out of KVM_RUN until it is
    /// out of the guest (a signal can race with entering KVM_RUN, so kick
    /// again until it is seen).
    fn transition(&self, target: RunState) {
        {
            let mut st = self.control.state.lock().unwrap();
            if *st == RunState::Stopped {
                return;
            }
            *st = target;
            self.control.cv.notify_all();
        }
        for _ in 0..2000 {
            if !*self.control.in_guest.lock().unwrap() {
                return;
            }
            if let Some(t) = &self.thread {
                let _ = t.kill(SIGRTMIN());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        log::warn!("vCPU {} did not leave KVM_RUN within 2 s", self.id);
    }

    pub fn pause(&self) {
        self.transition(RunState::Paused);
    }

    /// The paused vCPU's state (read by its own thread).
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let not_paused = || VcpuError::Boot("not paused: pause the VM before saving its state".into(), self.id);
        let mut st = self.control.state.lock().unwrap();
        if *st != RunState::Paused {
            return Err(not_paused());
        }
        self.control.save.lock().unwrap().request = Some(msr_indices.to_vec());
        self.control.cv.notify_all();
        loop {
            if let Some(answer) = self.control.save.lock().unwrap().answer.take() {
                return answer;
            }
            if *st != RunState::Paused {
                self.control.save.lock().unwrap().request = None;
                return Err(not_paused());
            }
            st = self.control.cv.wait_timeout(st, Duration::from_millis(100)).unwrap().0;
        }
    }

    pub fn resume(&self) {
        let mut st = self.control.state.lock().unwrap();
        if *st == RunState::Paused {
            *st = RunState::Running;
            self.control.cv.notify_all();
        }
    }

    /// Stops and joins the thread.
    pub fn stop(&mut self) {
        self.transition(RunState::Stopping);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The handler does nothing: the signal's job is to make KVM_RUN return EINTR.
        register_signal_handler(SIGRTMIN(), kick_handler).expect("registering the vCPU kick signal handler");
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::{memory, vm::Vm};

    /// Host-side only: creating and configuring vCPUs works under any KVM,
    /// PVM included. (Running a guest is tested in the lab.)
    #[test]
    fn configure_and_state_round_trip() {
        let vm = Vm::new().expect("/dev/kvm");
        let (mem, _f) = memory::create_memfd(64).unwrap();
        vm.set_memory(&mem).unwrap();
        vm.setup_irqchip().unwrap();
        let vcpu = Vcpu::new(vm.fd(), 0, Bus::new(), Bus::new()).unwrap();
        let entry = KernelEntry { mode: regs::EntryMode::Pvh, entry: 0x1000000 };
        vcpu.configure(vm.kvm(), 2, &mem, Some(entry)).unwrap();
        let indices = msr_index_list(vm.kvm()).unwrap();
        let s = vcpu.save_state(&indices).unwrap();
        assert!(s.msrs.iter().any(|&(i, _)| i == 0xc000_0082), "MSR_LSTAR saved");
        assert_eq!(s.regs.rip, 0x1000000);
        assert_eq!(s.regs.rbx, crate::arch::x86_64::layout::PVH_INFO_START);
        let json = serde_json::to_vec(&s).unwrap();
        let back: VcpuState = serde_json::from_slice(&json).unwrap();
        let vcpu2 = Vcpu::new(vm.fd(), 1, Bus::new(), Bus::new()).unwrap();
        vcpu2.configure(vm.kvm(), 2, &mem, None).unwrap();
        vcpu2.restore_state(&back).unwrap();
        let s2 = vcpu2.save_state(&indices).unwrap();
        assert_eq!(s2.regs.rip, 0x1000000);
        assert!(s.cpuid.iter().any(|e| e.function == 1 && e.ebx >> 24 == 0), "vCPU 0's CPUID saved");
        // A restored vCPU gets the saved CPUID verbatim (here vCPU 0's APIC id).
        let vcpu3 = Vcpu::new(vm.fd(), 2, Bus::new(), Bus::new()).unwrap();
        vcpu3.restore_cpuid(vm.kvm(), 2, &s.cpuid).unwrap();
        let s3 = vcpu3.save_state(&indices).unwrap();
        assert_eq!(s3.cpuid.iter().find(|e| e.function == 1).unwrap().ebx >> 24, 0);
        assert_eq!(s2.msrs.len(), s.msrs.len());
    }

    #[test]
    fn cpuid_carries_apic_id_and_count() {
        let kvm = Kvm::new().unwrap();
        let mut c = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        patch_cpuid(&mut c, 3, 4);
        let leaf1 = c.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_ne!(leaf1.ecx & (1 << 31), 0);
    }
}
