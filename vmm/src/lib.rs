//! hull-vmm: a KVM microVM monitor on the rust-vmm crates.
//!
//! Layout (after Firecracker's `src/vmm`): `vstate` (KVM VM, memory, vCPUs),
//! `arch` (x86_64 boot setup), `devices` (legacy and virtio devices),
//! `device_manager` (placing devices on buses and the kernel command line),
//! `builder` (assembling a VM from a config), `vmm` (a running VM),
//! `controller` (the main loop), `api` (the control socket), `persist`
//! (snapshots, and VMs restored from them), `seccomp` (a syscall filter per
//! thread kind), `jail` (namespaces, chroot and an unprivileged uid). Every vCPU and device state is a
//! plain serializable struct.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod controller;
pub mod device_manager;
pub mod devices;
pub mod jail;
pub mod persist;
pub mod seccomp;
pub mod vmm;
pub mod vstate;
