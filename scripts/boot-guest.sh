#!/bin/sh
# Boots the hull guest with hull-vmm (console on stdout: the agent's ready
# line shows there), pings the agent over hybrid vsock, shuts the VM down.
set -eu
: "${HULL_KERNEL:?}" "${HULL_INITRAMFS:?}" "${HULL_BIN_DIR:?}"
d="$(mktemp -d)"
"$HULL_BIN_DIR/hull-vmm" --kernel "$HULL_KERNEL" --initrd "$HULL_INITRAMFS" --mem 128 \
    --vsock-socket "$d/vsock.sock" --api-socket "$d/api.sock" --console stdout &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$d"' EXIT
"$HULL_BIN_DIR/hull" ping "hybrid:$d/vsock.sock:1024" --wait 120
kill -TERM "$pid"
wait "$pid"
