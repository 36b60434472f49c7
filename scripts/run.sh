#!/usr/bin/env bash
# Sets up, builds, and boots the hull guest with hull-vmm, printing the
# agent's ready line and its answer to a ping. Runs the microVM natively if this host's KVM can,
# else inside the lab (an emulated KVM host).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"

scripts/setup.sh
scripts/build.sh
. target/hull-artifacts.env

exec scripts/on-kvm-host.sh scripts/boot-guest.sh
