#!/usr/bin/env bash
# Builds hull: the workspace, the static guest agent, the guest kernel (cached
# by content hash outside the clone) and the guest initramfs. Writes the
# artifact paths to target/hull-artifacts.env (sourced by run.sh and test.sh).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

cargo build --workspace --all-targets
# The agent is PID 1 of a guest with no libraries: a static glibc binary.
# (--target keeps the static flag away from build scripts and proc macros.)
# libseccomp (the container backend's seccomp) is linked statically from Debian's libseccomp-dev.
LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
    CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release -p hull-agent --target x86_64-unknown-linux-gnu
agent="$root/target/x86_64-unknown-linux-gnu/release/hull-agent"

kernel="$(guest-kernel/build.sh | tail -n1)"
initramfs="$root/target/hull-initramfs.cpio.gz"
target/debug/hull-rootfs-builder initramfs --agent "$agent" --busybox /bin/busybox --out "$initramfs" >/dev/null
# The test initramfs adds a test-only init script (selected with rdinit=/test/init.sh).
test_initramfs="$root/target/hull-test-initramfs.cpio.gz"
target/debug/hull-rootfs-builder initramfs --agent "$agent" --busybox /bin/busybox \
    --add "$root/tests/guest/test-init.sh:/test/init.sh" --out "$test_initramfs" >/dev/null

# The agent's container tests need cgroup v2 and root: they are #[ignore]d
# natively and run in the lab by tests/tests/agent.rs, from this binary.
agent_test_bin="$(cargo test -p hull-agent --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*hull_agent-[^"]*\)".*/\1/p' | tail -n1)"

# The shim's host-cgroup tests for cgroup v2 run in the lab the same way
# (tests/tests/host_cgroups.rs), from the shim library's test binary.
shim_test_bin="$(cargo test -p containerd-shim-hull-v2 --lib --no-run --message-format=json 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*hull_shim-[^"]*\)".*/\1/p' | tail -n1)"

# Debian's generic kernel (the lab's) doubles as a bzImage to test that boot path.
bzimage="$(target/debug/hull-lab setup | sed -n 's/^kernel: *//p')"

cat > target/hull-artifacts.env <<EOT
export HULL_KERNEL=$kernel
export HULL_INITRAMFS=$initramfs
export HULL_TEST_INITRAMFS=$test_initramfs
export HULL_AGENT=$agent
export HULL_BZIMAGE=$bzimage
export HULL_BIN_DIR=$root/target/debug
export HULL_AGENT_TEST_BIN=$agent_test_bin
export HULL_SHIM_TEST_BIN=$shim_test_bin
EOT
echo "build: kernel $kernel" >&2
echo "build: initramfs $initramfs ($(sha256sum "$initramfs" | cut -c1-16))" >&2
