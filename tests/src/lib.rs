//! Helpers for hull's end-to-end tests: where the built artifacts are, and
//! driving hull-vmm processes.
//!
//! `scripts/build.sh` builds the guest kernel, the static agent and the
//! initramfs images and writes their paths to target/hull-artifacts.env;
//! `scripts/test.sh` exports them. A test run without them fails with a
//! message saying so (never a silent skip).

pub mod agent_e2e;
pub mod net_e2e;
pub mod pod;
pub mod snapshot_e2e;
pub mod vm;

use std::path::PathBuf;

/// A path exported by scripts/test.sh, which must exist.
pub fn artifact(var: &str) -> PathBuf {
    let v = std::env::var_os(var).unwrap_or_else(|| {
        panic!("{var} is not set: run the tests with scripts/test.sh, which builds the guest artifacts")
    });
    let p = PathBuf::from(v);
    assert!(p.exists(), "{var}={} does not exist: rerun scripts/test.sh", p.display());
    p
}

/// The guest kernel (vmlinux).
pub fn guest_kernel() -> PathBuf {
    artifact("HULL_KERNEL")
}

/// The guest initramfs (agent as /init, plus busybox).
pub fn guest_initramfs() -> PathBuf {
    artifact("HULL_INITRAMFS")
}

/// The guest initramfs plus the test init script (/test/init.sh).
pub fn test_initramfs() -> PathBuf {
    artifact("HULL_TEST_INITRAMFS")
}

/// The directory holding this workspace's binaries.
pub fn bin_dir() -> PathBuf {
    std::env::var_os("HULL_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug"))
}

/// A binary of this workspace (built by scripts/build.sh before the tests).
pub fn workspace_bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} does not exist: build the workspace first (scripts/build.sh does)", p.display());
    p
}

/// virtiofsd: on PATH or in ~/.cargo/bin (scripts/setup.sh installs it).
pub fn virtiofsd() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/root".into());
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("virtiofsd")).collect::<Vec<_>>())
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([home.join(".cargo/bin/virtiofsd")])
        .find(|p| p.is_file())
        .expect("virtiofsd not found: scripts/setup.sh installs it with cargo install")
}
