//! virtio-mmio transport (virtio spec 1.2, section 4.2.2).
