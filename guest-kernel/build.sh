#!/usr/bin/env bash
# Builds the hull guest kernel (vmlinux) from Debian's linux-source-6.1 with
# tinyconfig + guest.config, cached outside the clone by a hash of
# (kernel source package version, guest.config, this script).
# Prints the path of the cached vmlinux on its last line of stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${HULL_CACHE_DIR:-/var/cache/hull}/guest-kernel"
pkg=linux-source-6.1

log() { echo "guest-kernel: $*" >&2; }

need_pkgs=()
for p in "$pkg" bc flex bison libelf-dev libssl-dev make gcc xz-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need_pkgs+=("$p")
done
if ((${#need_pkgs[@]})); then
    log "installing ${need_pkgs[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need_pkgs[@]}" >&2
fi

src_version="$(dpkg-query -W -f='${Version}' "$pkg")"
key="$( { echo "$pkg $src_version"; cat "$here/guest.config" "$here/build.sh"; } | sha256sum | cut -c1-16)"
out="$cache_root/$key"

if [[ -f "$out/vmlinux" ]]; then
    log "cached ($pkg $src_version, key $key)"
    echo "$out/vmlinux"
    exit 0
fi

mkdir -p "$cache_root"
work="$(mktemp -d "$cache_root/.build-XXXXXX")"
trap 'rm -rf "$work"' EXIT
log "building in $work ($pkg $src_version, key $key)"
tar -C "$work" -xf /usr/src/linux-source-6.1.tar.xz
cd "$work"/linux-source-6.1
make -s tinyconfig >&2
./scripts/kconfig/merge_config.sh -m .config "$here/guest.config" >&2
make -s olddefconfig >&2

# Fail loudly if kconfig dropped an option we asked for (a missing dependency).
missing=0
while read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qx "$line" .config || { log "option not set after olddefconfig: $line"; missing=1; } ;;
    esac
done < "$here/guest.config"
((missing == 0)) || exit 1

make -s -j"$(nproc)" vmlinux >&2
mkdir -p "$out.tmp"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
rm -rf "$out" && mv "$out.tmp" "$out"
log "built $out/vmlinux"
echo "$out/vmlinux"
