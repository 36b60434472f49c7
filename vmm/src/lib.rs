//! hull-vmm: the KVM microVM monitor (filled by the hull-vmm issue).
