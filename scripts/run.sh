#!/usr/bin/env bash
# Sets up, builds, and runs hull's main job (scripts/demo-ctr.sh): two
# containers with `ctr run --rm --runtime io.containerd.hull.v2` through a
# private containerd, the first building the VM template, the second
# restored from it. Runs natively if this host's KVM can run guests, else
# inside the lab (an emulated KVM host).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PATH="$HOME/.cargo/bin:/usr/local/sbin:/usr/sbin:/sbin:$PATH"

scripts/setup.sh
scripts/build.sh
. target/hull-artifacts.env

exec scripts/on-kvm-host.sh scripts/demo-ctr.sh
