#!/usr/bin/env bash
# The benchmark harness of issue 6 (hull-bench): builds what it needs, then
#  - natively here: the host-side restore path (no guest runs);
#  - in one lab run (or natively on a host whose KVM runs guests): pod cold
#    start through containerd (template restore, cold boot, QEMU microvm
#    baseline), N pods at once, K idle sandboxes' host memory.
# Prints a table with PASS/MISS per target; writes target/bench/bench.json
# and target/bench/*.png. Arguments go to `hull-bench run` (see --help), e.g.
#   scripts/bench.sh --runs 5 --concurrency 1,10 --density 4
#   scripts/bench.sh --skip-pods          # native restore path only (seconds)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"
scripts/setup.sh
scripts/build.sh
# Measured binaries are release builds (the monitor, the shim, the harness).
cargo build --release -p hull-vmm -p containerd-shim-hull-v2 -p hull-bench
. target/hull-artifacts.env
exec target/release/hull-bench run --bin-dir "$root/target/release" \
    --rootfs-builder "$root/target/debug/hull-rootfs-builder" --out "$root/target/bench" "$@"
