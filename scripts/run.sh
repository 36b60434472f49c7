#!/usr/bin/env bash
# Sets up, builds, and boots the hull guest, printing the agent's ready line
# and its answer to a ping. Runs the microVM natively if this host's KVM can,
# else inside the lab (an emulated KVM host).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"

scripts/setup.sh
scripts/build.sh
. target/hull-artifacts.env

boot=(tests/scripts/qemu-microvm-boot.sh)
if target/debug/hull check; then
    exec "${boot[@]}"
fi
exec target/debug/hull-lab run --timing \
    --env "HULL_KERNEL=$HULL_KERNEL" --env "HULL_INITRAMFS=$HULL_INITRAMFS" \
    --env "HULL_BIN_DIR=$HULL_BIN_DIR" -- "${boot[@]}"
