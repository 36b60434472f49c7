//! containerd-shim-hull-v2: the containerd shim v2 of hull. One shim process
//! and one KVM microVM (hull-vmm) serve a whole pod; containers run inside
//! it, driven through hull-agent's ttrpc API.

pub mod background;
pub mod cgroups;
pub mod cleanup;
pub mod config;
pub mod diskpool;
pub mod events;
pub mod io;
pub mod jail;
pub mod mounts;
pub mod network;
pub mod pod;
pub mod rootfs;
pub mod sandbox;
pub mod service;
pub mod shim;
pub mod spec;
pub mod template;
