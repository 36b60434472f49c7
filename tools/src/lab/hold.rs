//! Inside the lab: keep one idle KVM VM (with one vCPU that never runs) open
//! for as long as the job runs.
//!
//! Why: KVM turns the scheduler's preempt-notifier static branch on with the
//! first VM and off with the last, by live-patching the jump in
//! `finish_task_switch`, which every CPU runs on every context switch. Under
//! QEMU's multi-threaded TCG that patch can leave both emulated CPUs stuck at
//! the jump (soft lockups at `finish_task_switch`, RCU stalls): the whole lab
//! hangs. That happened when jobs started and stopped VMs one after another
//! (the first VM after the last one went away). Holding a VM keeps the count
//! above zero, so the branch is patched once, before the job starts. The idle
//! vCPU also keeps KVM's "APIC software-disabled" static key on.

use anyhow::{bail, Context, Result};
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::Path;

/// `_IO(KVMIO, 0x01)` and `_IO(KVMIO, 0x41)`.
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41;

/// Where the job script waits for the VM to exist.
pub const HELD_MARKER: &str = "/run/hull-lab/kvm-held";

/// Creates the VM and its vCPU, writes `marker`, then sleeps until killed.
pub fn hold_kvm(marker: &Path) -> Result<()> {
    let kvm = OpenOptions::new().read(true).write(true).open("/dev/kvm").context("opening /dev/kvm")?;
    // SAFETY: plain KVM ioctls on a descriptor we own; the results are fds.
    let vm = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    if vm < 0 {
        bail!("KVM_CREATE_VM: {}", std::io::Error::last_os_error());
    }
    // SAFETY: as above, on the VM fd just created.
    let vcpu = unsafe { libc::ioctl(vm, KVM_CREATE_VCPU as _, 0) };
    if vcpu < 0 {
        bail!("KVM_CREATE_VCPU: {}", std::io::Error::last_os_error());
    }
    std::fs::write(marker, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", marker.display()))?;
    loop {
        // SAFETY: pause has no memory effects; the fds stay open until exit.
        unsafe { libc::pause() };
    }
}
