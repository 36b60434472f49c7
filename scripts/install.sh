#!/usr/bin/env bash
# Installs hull on this machine (as root):
#
#   - containerd-shim-hull-v2, hull-vmm, hull        → $PREFIX/bin (/usr/local/bin)
#   - virtiofsd, if the configured one is missing    → $PREFIX/libexec/virtiofsd
#   - the guest kernel and initramfs                 → /usr/share/hull/ (or where
#                                                      an existing config points)
#   - /etc/hull/config.toml (kept if it exists)
#   - the containerd runtime entry "hull" in /etc/containerd/config.toml (if absent)
#   - a pre-formatted writable-layer disk pool
#
# The artifacts come from target/hull-artifacts.env (scripts/build.sh; run if
# missing, or with HULL_BUILD=1). Environment: PREFIX (/usr/local), DESTDIR
# (stage into a directory instead of /: nothing outside it is touched, the
# disk pool is not filled), HULL_RESTART_CONTAINERD=1 (restart containerd
# with systemctl afterwards). See docs/containerd.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PREFIX="${PREFIX:-/usr/local}"
DESTDIR="${DESTDIR:-}"
say() { echo "install: $*"; }

if [[ "${HULL_BUILD:-0}" == 1 || ! -f "$root/target/hull-artifacts.env" ]]; then
    say "building (scripts/build.sh)"
    "$root/scripts/build.sh"
fi
# shellcheck disable=SC1091
. "$root/target/hull-artifacts.env"
for f in "$HULL_KERNEL" "$HULL_INITRAMFS" "$HULL_BIN_DIR/containerd-shim-hull-v2" "$HULL_BIN_DIR/hull-vmm" "$HULL_BIN_DIR/hull"; do
    [[ -f "$f" ]] || { echo "install: $f is missing (run scripts/build.sh)" >&2; exit 1; }
done

config="$DESTDIR/etc/hull/config.toml"
# A value of the [paths] table of an existing config (or empty).
config_path() {
    [[ -f "$config" ]] || return 0
    awk -v key="$1" '
        /^\[/ { section = $0 }
        section == "[paths]" && $1 == key && $2 == "=" { v = $3; gsub(/"/, "", v); print v; exit }
    ' "$config"
}
kernel="$(config_path kernel)"; kernel="${kernel:-/usr/share/hull/vmlinux}"
initramfs="$(config_path initramfs)"; initramfs="${initramfs:-/usr/share/hull/initramfs.cpio.gz}"
virtiofsd="$(config_path virtiofsd)"; virtiofsd="${virtiofsd:-/usr/libexec/virtiofsd}"

# --- binaries ---------------------------------------------------------------
install -d "$DESTDIR$PREFIX/bin"
for b in containerd-shim-hull-v2 hull-vmm hull; do
    install -m 0755 "$HULL_BIN_DIR/$b" "$DESTDIR$PREFIX/bin/$b"
    say "$PREFIX/bin/$b"
done
hull_vmm="$PREFIX/bin/hull-vmm"

# --- virtiofsd, if the configured one is missing ---------------------------------
if [[ ! -x "$DESTDIR$virtiofsd" && ! -x "$virtiofsd" ]]; then
    src="$(command -v virtiofsd || true)"
    [[ -z "$src" && -x "$HOME/.cargo/bin/virtiofsd" ]] && src="$HOME/.cargo/bin/virtiofsd"
    if [[ -z "$src" && -z "$DESTDIR" ]] && command -v apt-get >/dev/null && apt-get install -y virtiofsd >/dev/null 2>&1; then
        src=/usr/libexec/virtiofsd
    fi
    if [[ -z "$src" ]]; then
        say "building virtiofsd (cargo install virtiofsd)"
        cargo install --locked virtiofsd >/dev/null
        src="$HOME/.cargo/bin/virtiofsd"
    fi
    if [[ "$src" != /usr/libexec/virtiofsd ]]; then
        virtiofsd="$PREFIX/libexec/virtiofsd"
        install -D -m 0755 "$src" "$DESTDIR$virtiofsd"
    else
        virtiofsd="$src"
    fi
fi
say "virtiofsd: $virtiofsd"

# --- guest kernel and initramfs ---------------------------------------------
install -D -m 0644 "$HULL_KERNEL" "$DESTDIR$kernel"
install -D -m 0644 "$HULL_INITRAMFS" "$DESTDIR$initramfs"
say "guest kernel $kernel, initramfs $initramfs"

# --- /etc/hull/config.toml ---------------------------------------------------
if [[ -f "$config" ]]; then
    say "keeping the existing $config"
    # A config written before virtiofsd was installed here may point elsewhere.
    if [[ "$(config_path virtiofsd)" != "$virtiofsd" && -n "$(config_path virtiofsd)" && ! -x "$DESTDIR$(config_path virtiofsd)" ]]; then
        echo "install: warning: $config names virtiofsd $(config_path virtiofsd), which does not exist; $virtiofsd does" >&2
    fi
else
    install -d "$(dirname "$config")"
    cat > "$config" <<EOT
# hull configuration: every key and its default is in docs/config.md.
[paths]
kernel = "$kernel"
initramfs = "$initramfs"
hull_vmm = "$hull_vmm"
virtiofsd = "$virtiofsd"
state_dir = "/run/hull"

[defaults]
vcpus = 1
mem_mib = 256
disks_per_pod = 4
disk_size_mib = 10240
disk_pool_size = 8
agent_ready_timeout_secs = 30
log_level = "info"
EOT
    say "wrote $config"
fi

# --- containerd runtime entry -------------------------------------------------
ctrd_config="$DESTDIR/etc/containerd/config.toml"
install -d "$(dirname "$ctrd_config")"
[[ -f "$ctrd_config" ]] || printf 'version = 2\n' > "$ctrd_config"
if grep -Eq '^[[:space:]]*version[[:space:]]*=[[:space:]]*3' "$ctrd_config"; then
    cri='plugins."io.containerd.cri.v1.runtime".containerd.runtimes.hull'   # containerd 2.x
else
    cri='plugins."io.containerd.grpc.v1.cri".containerd.runtimes.hull'
fi
if grep -Fq "runtimes.hull]" "$ctrd_config"; then
    say "containerd already has a hull runtime in $ctrd_config"
else
    cp -p "$ctrd_config" "$ctrd_config.hull-backup"
    # Naming any runtime replaces containerd's built-in list, which holds the
    # default runtime runc: without it the CRI plugin does not load (Debian's
    # config.toml names none). Name runc too unless the config already does.
    if ! grep -Fq "runtimes.runc]" "$ctrd_config"; then
        printf '\n[%s]\n  runtime_type = "io.containerd.runc.v2"\n' "${cri%.hull}.runc" >> "$ctrd_config"
        say "added [${cri%.hull}.runc] (the default runtime) to $ctrd_config"
    fi
    printf '\n[%s]\n  runtime_type = "io.containerd.hull.v2"\n' "$cri" >> "$ctrd_config"
    say "added [$cri] to $ctrd_config (backup: $ctrd_config.hull-backup)"
    if [[ -z "$DESTDIR" && "${HULL_RESTART_CONTAINERD:-0}" == 1 ]] && command -v systemctl >/dev/null; then
        systemctl restart containerd && say "restarted containerd"
    else
        say "restart containerd to load it (systemctl restart containerd)"
    fi
fi

# --- disk pool and VM template ----------------------------------------------
if [[ -z "$DESTDIR" ]]; then
    HULL_CONFIG="$config" "$PREFIX/bin/containerd-shim-hull-v2" fill-disk-pool || say "warning: could not fill the disk pool"
    # The VM template for the default pod shape (needs a host that runs microVMs;
    # otherwise the first pod builds it).
    if "$PREFIX/bin/hull" check >/dev/null 2>&1; then
        HULL_CONFIG="$config" "$PREFIX/bin/containerd-shim-hull-v2" build-template || say "warning: could not build the VM template"
    else
        say "this host cannot run microVMs (hull check): the VM template is built by the first pod elsewhere"
    fi
fi

say "done. Check this host with: $PREFIX/bin/hull check"
say "then: ctr run --rm --runtime io.containerd.hull.v2 docker.io/library/busybox:latest t1 echo hi"
