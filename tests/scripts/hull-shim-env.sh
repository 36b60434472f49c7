#!/bin/sh
# Sourced by scripts that run the hull shim under containerd, after they set
# $work (a scratch directory) and $state (hull's state directory): puts
# containerd-shim-hull-v2 from $HULL_BIN_DIR on PATH (containerd finds
# runtimes there and passes PATH and HULL_CONFIG on to the shim), points
# HULL_CONFIG at $work/config.toml, and defines `hull_paths [KERNEL]`, which
# prints that config's [paths] table for the built artifacts.
mkdir -p "$work/bin"
ln -sf "$HULL_BIN_DIR/containerd-shim-hull-v2" "$work/bin/containerd-shim-hull-v2"
export PATH="$work/bin:$PATH"
export HULL_CONFIG="$work/config.toml"
hull_virtiofsd="$(command -v virtiofsd || echo "$HOME/.cargo/bin/virtiofsd")"
hull_paths() {
    cat <<EOT
[paths]
kernel = "${1:-$HULL_KERNEL}"
initramfs = "$HULL_INITRAMFS"
hull_vmm = "$HULL_BIN_DIR/hull-vmm"
virtiofsd = "$hull_virtiofsd"
state_dir = "$state"
EOT
}
