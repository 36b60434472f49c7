//! Emulated devices: legacy port-I/O devices and virtio devices on virtio-mmio.

pub mod bus;
pub mod legacy;
pub mod virtio;
