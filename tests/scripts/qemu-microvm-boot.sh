#!/bin/sh
# Boots the hull guest (HULL_KERNEL + HULL_INITRAMFS) under QEMU's microvm
# machine with vhost-vsock, waits for the agent's ready line, pings the agent.
# Used by the smoke test and as the benchmark baseline. Needs a KVM host (the lab).
set -eu
: "${HULL_KERNEL:?}" "${HULL_INITRAMFS:?}" "${HULL_BIN_DIR:?}"
cid="${CID:-3}"
work="$(mktemp -d)"
trap 'kill "$qpid" 2>/dev/null || true; rm -rf "$work"' EXIT
t0="$(date +%s%N)"
qemu-system-x86_64 -M microvm,acpi=off -enable-kvm -cpu host -m "${MEM:-256}" -smp "${VCPUS:-1}" \
    -nodefaults -no-user-config -display none -no-reboot \
    -kernel "$HULL_KERNEL" -initrd "$HULL_INITRAMFS" \
    -append "console=ttyS0 reboot=t panic=-1 quiet" \
    -chardev "file,id=con,path=$work/console" -serial chardev:con \
    -device "vhost-vsock-device,guest-cid=$cid" &
qpid=$!
i=0
until grep -q 'hull-agent: ready' "$work/console" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 600 ] || ! kill -0 "$qpid" 2>/dev/null; then
        echo "guest did not print the ready line; console:" >&2
        cat "$work/console" >&2
        exit 1
    fi
    sleep 0.05
done
t1="$(date +%s%N)"
grep 'hull-agent: ready' "$work/console"
echo "boot_to_ready_ms $(( (t1 - t0) / 1000000 ))"
"$HULL_BIN_DIR/hull" ping "vsock:$cid:1024"
