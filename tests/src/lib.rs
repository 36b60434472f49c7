//! Helpers for hull's end-to-end tests: where the built artifacts are.
//!
//! `scripts/test.sh` builds the guest kernel, the static agent and the
//! initramfs and exports their paths; a test run without them fails with a
//! message saying so (never a silent skip).

use std::path::PathBuf;

/// A path exported by scripts/test.sh, which must exist.
pub fn artifact(var: &str) -> PathBuf {
    let v = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: run the tests with scripts/test.sh, which builds the guest artifacts")
    });
    let p = PathBuf::from(v);
    assert!(
        p.exists(),
        "{var}={} does not exist: rerun scripts/test.sh",
        p.display()
    );
    p
}

/// The guest kernel (vmlinux).
pub fn guest_kernel() -> PathBuf {
    artifact("HULL_KERNEL")
}

/// The guest initramfs (agent as /init, plus busybox for tests).
pub fn guest_initramfs() -> PathBuf {
    artifact("HULL_INITRAMFS")
}

/// A binary of this workspace (built by scripts/test.sh before the tests).
pub fn workspace_bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("HULL_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} does not exist: build the workspace first (scripts/test.sh does)",
        p.display()
    );
    p
}
