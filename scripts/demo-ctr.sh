#!/usr/bin/env bash
# hull's main job end to end, on a host whose KVM runs guests (scripts/run.sh
# puts it in the lab otherwise): a private containerd (its own root, state
# and socket in a temporary directory; the host's containerd is not used),
# containerd-shim-hull-v2 as runtime io.containerd.hull.v2, a busybox image
# built here (no registry needed), then `ctr run --rm` twice. The first pod
# builds the VM template (one boot, snapshotted); the second is restored from
# it. Prints what each container printed and how long each `ctr run` took;
# exits non-zero if either container did not print its line.
set -euo pipefail
: "${HULL_KERNEL:?}" "${HULL_INITRAMFS:?}" "${HULL_BIN_DIR:?}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d /tmp/hull-demo.XXXXXX)"
# Short: pod sockets live under it (unix socket paths are limited).
state="/run/hull-demo.$$"
IMG=docker.io/library/hull-demo:latest

# The shim on PATH, HULL_CONFIG, hull_paths.
. "$root/tests/scripts/hull-shim-env.sh"
{
    hull_paths
    cat <<EOT

[defaults]
vcpus = 1
mem_mib = 128
disks_per_pod = 1
disk_size_mib = 256
disk_pool_size = 2
EOT
} >"$HULL_CONFIG"

# A private containerd; `ctrd` talks to it. It inherits PATH and HULL_CONFIG
# and passes them to the shim.
. "$root/tests/scripts/containerd-env.sh"
set +u
cleanup() {
    local t
    for t in $(ctrd task ls -q 2>/dev/null); do
        ctrd task kill -s SIGKILL "$t" >/dev/null 2>&1 || true
        ctrd task delete -f "$t" >/dev/null 2>&1 || true
    done
    for t in $(ctrd container ls -q 2>/dev/null); do ctrd container rm "$t" >/dev/null 2>&1 || true; done
    kill "$HULL_CTRD_PID" 2>/dev/null || true
    wait "$HULL_CTRD_PID" 2>/dev/null || true
    umount "$HULL_CTRD_DIR" 2>/dev/null || true
    rm -rf "$work" "$state" "$HULL_CTRD_DIR"
}
trap cleanup EXIT

echo "demo: building the busybox image and importing it into containerd"
"$HULL_BIN_DIR/hull-rootfs-builder" busybox-layer --out "$work/layer" >/dev/null
"$HULL_BIN_DIR/hull-rootfs-builder" oci-image --layer "$work/layer" --name "$IMG" --out "$work/image.tar" >/dev/null
ctrd image import "$work/image.tar" >/dev/null
containerd-shim-hull-v2 fill-disk-pool

# run ID WHAT: one `ctr run --rm`; prints its output and wall time.
run() {
    local t0 out ms
    t0=$(date +%s%N)
    if ! out="$(timeout -s KILL 600 ctr --address "$HULL_CTRD_DIR/containerd.sock" run --rm \
        --runtime io.containerd.hull.v2 "$IMG" "$1" \
        sh -c 'echo "hello from container $(hostname) in a hull microVM (guest kernel $(uname -r))"' </dev/null 2>&1)"; then
        echo "demo: ctr run $1 failed: $out" >&2
        echo "--- containerd log (hull lines, last 30) ---" >&2
        grep -a "hull\|shim\|pod $1" "$HULL_CTRD_DIR/containerd.log" | tail -n 30 >&2
        # The shim logs a failed pod's guest console and hull-vmm tail.
        grep -a -n 'failed; guest console' "$HULL_CTRD_DIR/containerd.log" | tail -n 1 | cut -d: -f1 |
            while read -r l; do sed -n "${l},$((l + 45))p" "$HULL_CTRD_DIR/containerd.log" >&2; done
        return 1
    fi
    ms=$((($(date +%s%N) - t0) / 1000000))
    echo "  $out"
    case "$out" in *"hello from container $1 in a hull microVM"*) ;; *) echo "demo: unexpected output" >&2; return 1 ;; esac
    echo "demo: ctr run --rm $1 ($2): $ms ms"
}

echo "demo: ctr run --rm --runtime io.containerd.hull.v2 $IMG ..."
run demo1 "first pod: builds the VM template"
run demo2 "restored from the template"
# The shim's own account of the second pod: restored, and its start time.
grep -a -o 'pod demo2: \(restored from the template ([0-9]* ms after start)\|ready in [0-9]* ms\)' \
    "$HULL_CTRD_DIR/containerd.log" | sed 's/^/demo: shim: /' || true
echo "demo: ok"
