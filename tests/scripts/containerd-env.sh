#!/bin/sh
# Sourced by lab scripts: starts a private containerd (its own root, state,
# socket and config under $HULL_CTRD_DIR) and defines `ctrd` = ctr bound to it.
# Needs overlay and cgroup2 (the lab has both).
set -eu
HULL_CTRD_DIR="${HULL_CTRD_DIR:-$(mktemp -d /tmp/hull-containerd.XXXXXX)}"
# Snapshots need a file system overlayfs accepts as upper (not the lab's overlay root).
mountpoint -q "$HULL_CTRD_DIR" || mount -t tmpfs -o mode=0700 hull-containerd "$HULL_CTRD_DIR"
mkdir -p "$HULL_CTRD_DIR/root" "$HULL_CTRD_DIR/state" "$HULL_CTRD_DIR/cni/conf" "$HULL_CTRD_DIR/cni/bin" "$HULL_CTRD_DIR/tmp"
cat > "$HULL_CTRD_DIR/config.toml" <<EOT
version = 2
root = "$HULL_CTRD_DIR/root"
state = "$HULL_CTRD_DIR/state"
[grpc]
  address = "$HULL_CTRD_DIR/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "${HULL_PAUSE_IMAGE:-docker.io/library/hull-pause:latest}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "$HULL_CTRD_DIR/cni/conf"
    bin_dir = "$HULL_CTRD_DIR/cni/bin"
  # Naming any runtime replaces the built-in list: runc (the default
  # runtime) must be named too, or the CRI plugin does not load.
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.hull]
    runtime_type = "io.containerd.hull.v2"
EOT
export TMPDIR="$HULL_CTRD_DIR/tmp"
containerd --config "$HULL_CTRD_DIR/config.toml" > "$HULL_CTRD_DIR/containerd.log" 2>&1 &
HULL_CTRD_PID=$!
i=0
until [ -S "$HULL_CTRD_DIR/containerd.sock" ]; do
    i=$((i + 1))
    if [ "$i" -gt 300 ]; then echo "containerd did not start:" >&2; cat "$HULL_CTRD_DIR/containerd.log" >&2; exit 1; fi
    sleep 0.1
done
ctrd() { ctr --address "$HULL_CTRD_DIR/containerd.sock" "$@"; }
