#!/usr/bin/env bash
# Runs a command where microVMs can run: directly if this host's KVM can run a
# standard guest (`hull check`), else inside the lab. Forwards the artifact
# variables from target/hull-artifacts.env.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/target/hull-artifacts.env"
if "$root/target/debug/hull" check >/dev/null; then
    exec "$@"
fi
envs=()
for v in HULL_KERNEL HULL_INITRAMFS HULL_TEST_INITRAMFS HULL_AGENT HULL_BZIMAGE HULL_BIN_DIR HULL_BENCH_RUNS; do
    [[ -n "${!v:-}" ]] && envs+=(--env "$v=${!v}")
done
exec "$root/target/debug/hull-lab" run --timing --timeout "${HULL_LAB_TIMEOUT:-1800}" "${envs[@]}" -- "$@"
