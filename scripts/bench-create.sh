#!/usr/bin/env bash
# Container create→running inside the guest's container library: pooled
# cgroups vs cgroups made on the spot, for 1, 8 and 32 concurrent creates, in
# one run. Needs root and cgroup v2, so it runs in the lab (an emulated
# machine; compare the two columns, not with hardware numbers). Prints the
# BENCH lines and writes target/bench/create.txt. HULL_BENCH_ROUNDS: rounds per N (2).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"
scripts/setup.sh
scripts/build.sh
. target/hull-artifacts.env
mkdir -p target/bench
target/debug/hull-lab run --timeout 1800 --env "HULL_BENCH_ROUNDS=${HULL_BENCH_ROUNDS:-2}" -- \
    "$HULL_AGENT_TEST_BIN" --ignored --test-threads=1 --exact container::tests::lab_bench_create_concurrent \
    | tee target/bench/create.txt | grep '^BENCH'
