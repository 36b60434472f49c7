#!/usr/bin/env bash
# Boot benchmark: hull-vmm vs QEMU microvm, same kernel + initramfs, same run
# (in the lab unless this host runs microVMs). Prints a table; writes
# target/bench/boot.json. HULL_BENCH_RUNS sets the runs per monitor (5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"
scripts/setup.sh
scripts/build.sh
mkdir -p target/bench
export HULL_BENCH_RUNS="${HULL_BENCH_RUNS:-5}"
scripts/on-kvm-host.sh target/debug/hull-e2e bench-boot | tee target/bench/boot.txt
grep '^BENCH_JSON ' target/bench/boot.txt | sed 's/^BENCH_JSON //' > target/bench/boot.json
echo "wrote target/bench/boot.json"
