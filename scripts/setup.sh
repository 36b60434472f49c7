#!/usr/bin/env bash
# Installs what hull needs to build and test on a bare Debian 12 machine.
# Idempotent: a second run only checks.
set -euo pipefail

pkgs=(qemu-system-x86 busybox-static cpio e2fsprogs kmod xz-utils
      linux-source-6.1 bc flex bison libelf-dev libssl-dev make gcc
      libseccomp-dev libcap-ng-dev pkg-config containerd runc
      protobuf-compiler fonts-dejavu-core iproute2)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
# apt-cache needs a package list to resolve the lab kernel.
if ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
    apt-get update -q
fi

# virtiofsd: the real external process hull shares image layers with.
if ! command -v virtiofsd >/dev/null 2>&1 && [[ ! -x "$HOME/.cargo/bin/virtiofsd" ]]; then
    echo "setup: cargo install virtiofsd (about 5 minutes)" >&2
    cargo install --locked virtiofsd
fi
