//! hull-vmm: a KVM microVM monitor on the rust-vmm crates.
//!
//! Layout (after Firecracker's `src/vmm`): `vstate` (KVM VM, memory, vCPUs),
//! `arch` (x86_64 boot setup), `devices` (legacy and virtio devices),
//! `device_manager` (placing devices on buses and the kernel command line),
//! `builder` (assembling a VM from a config), `api` (the control socket).
//! Every vCPU and device state is a plain serializable struct (`persist`).

pub mod devices;
