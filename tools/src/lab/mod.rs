//! The lab: an emulated KVM host for machines whose KVM cannot run a standard
//! guest (see PLATFORM.md). QEMU's TCG emulates an AMD CPU with SVM; Debian's
//! generic kernel boots in it, loads kvm_amd, mounts this machine's root
//! read-only over 9p under a tmpfs overlay and runs one job in a chroot of it.
//! stdout, stderr and the exit status come back on virtio-serial ports.

mod hold;
mod kernel;
mod run;

pub use hold::{hold_kvm, HELD_MARKER};
pub use kernel::{cache_dir, LabKernel};
pub use run::{Lab, LabCommand, LabError, LabOutput};
