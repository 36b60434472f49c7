#!/usr/bin/env bash
# End to end: containerd + containerd-shim-hull-v2 + hull-vmm + virtiofsd +
# hull-agent, driven with ctr. Needs a KVM host (the lab), HULL_KERNEL,
# HULL_INITRAMFS and HULL_BIN_DIR (target/hull-artifacts.env), containerd,
# ctr, virtiofsd, mkfs.ext4 and script(1). Prints PASS/FAIL per check and
# exits non-zero if any check failed.
#
#   . target/hull-artifacts.env && target/debug/hull-lab run --timeout 900 \
#       --env HULL_KERNEL=$HULL_KERNEL --env HULL_INITRAMFS=$HULL_INITRAMFS \
#       --env HULL_BIN_DIR=$HULL_BIN_DIR -- tests/scripts/shim-ctr.sh
#
# Set HULL_SHIM_CASES to a space-separated subset of: basic stdio exec tty
# signal oom pod cri crash faults net leaks failures (default: all; HULL_LEAK_CYCLES
# sets the leak case's cycles, default 100); HULL_SHIM_TIMEOUT bounds each ctr
# command and each CRI call (seconds, default 300). The cri case drives
# containerd's CRI plugin with hull-cri (tests/src/bin/hull-cri.rs) and a
# locally built pause image (HULL_PAUSE_IMAGE, see containerd-env.sh).
set -u
: "${HULL_KERNEL:?}" "${HULL_INITRAMFS:?}" "${HULL_BIN_DIR:?}"
root="$(cd "$(dirname "$0")/../.." && pwd)"
cases="${HULL_SHIM_CASES:-basic stdio exec tty signal oom pod cri crash faults net leaks failures}"
tmo="${HULL_SHIM_TIMEOUT:-300}"
work="$(mktemp -d /tmp/hull-shim-ctr.XXXXXX)"
state=/run/hull-shim-test
IMG=docker.io/library/hull-test:latest
export HULL_PAUSE_IMAGE="${HULL_PAUSE_IMAGE:-docker.io/library/hull-pause:latest}"
RT=(--runtime io.containerd.hull.v2)
fails=0
passes=0

pass() { echo "PASS $*"; passes=$((passes + 1)); }
fail() { echo "FAIL $*" >&2; fails=$((fails + 1)); }
# check NAME WANT GOT
check() {
    if [ "$2" = "$3" ]; then pass "$1"; else fail "$1: want $(printf %q "$2"), got $(printf %q "$3")"; fi
}
# check_contains NAME NEEDLE HAYSTACK
check_contains() {
    case "$3" in
        *"$2"*) pass "$1" ;;
        *) fail "$1: $(printf %q "$2") not in: $3" ;;
    esac
}

# --- the shim, its config, containerd ------------------------------------
. "$root/tests/scripts/hull-shim-env.sh"
# write_config [KERNEL [READY_TIMEOUT [EXTRA_DEFAULTS_LINE]]]; DISKS = disks_per_pod.
write_config() {
    {
        hull_paths "${1:-}"
        cat <<EOT

[defaults]
vcpus = 1
mem_mib = 256
disks_per_pod = ${DISKS:-4}
disk_size_mib = ${DISK_MIB:-1024}
disk_pool_size = 4
agent_ready_timeout_secs = ${2:-240}
# Calls slow down a lot when 10 emulated VMs start at once.
agent_call_timeout_secs = 120
log_level = "debug"
${3:-}
EOT
    } >"$HULL_CONFIG"
}
write_config
# containerd inherits PATH and HULL_CONFIG and passes them to the shims.
. "$root/tests/scripts/containerd-env.sh"
set +e
# Every ctr command is bounded (SIGKILL: ctr run forwards SIGTERM to the task).
CTR=(timeout -s KILL "$tmo" ctr --address "$HULL_CTRD_DIR/containerd.sock")
# For script(1): ctr -t must stay in the terminal's foreground process group.
TTY_CTR="timeout --foreground -s KILL $tmo ctr --address $HULL_CTRD_DIR/containerd.sock"

dump_logs() {
    echo "--- containerd log (shim lines, last 80) ---" >&2
    grep -a -i 'hull\|shim' "$HULL_CTRD_DIR/containerd.log" | tail -n 80 >&2
    # A failed pod start logs its console and hull-vmm tails on lines of their own.
    echo "--- failed pods (last 3, with the guest console and hull-vmm output) ---" >&2
    grep -a -n 'failed; guest console' "$HULL_CTRD_DIR/containerd.log" | tail -n 3 | cut -d: -f1 |
        while read -r l; do sed -n "${l},$((l + 45))p" "$HULL_CTRD_DIR/containerd.log" >&2; done
    pod_logs
}
# pod_logs: the last lines of every live pod's logs (hull-vmm, virtiofsd, guest console).
pod_logs() {
    local f
    for f in "$state"/*/*.log "$state"/*/vm/*.log; do
        [ -f "$f" ] || continue
        echo "--- $f (last 40) ---" >&2
        tail -n 40 "$f" >&2
    done
}
finish() {
    [ "$fails" -gt 0 ] && dump_logs
    for ns in default k8s.io; do
        "${CTR[@]}" -n "$ns" task ls 2>/dev/null | awk 'NR>1 {print $1}' | while read -r t; do
            "${CTR[@]}" -n "$ns" task kill -s SIGKILL "$t" >/dev/null 2>&1
            sleep 1
            "${CTR[@]}" -n "$ns" task delete -f "$t" >/dev/null 2>&1
        done
    done
    kill "$events_pid" 2>/dev/null
    kill "$HULL_CTRD_PID" 2>/dev/null
    wait "$HULL_CTRD_PID" 2>/dev/null
    echo "shim-ctr: $passes passed, $fails failed"
}
trap finish EXIT

# Every event containerd sees, checked at the end.
ctr --address "$HULL_CTRD_DIR/containerd.sock" events >"$work/events.log" 2>&1 &
events_pid=$!

# Pre-format the disk pool so pod starts only rename images.
containerd-shim-hull-v2 fill-disk-pool || fail "fill-disk-pool"

# --- the test image --------------------------------------------------------
"$HULL_BIN_DIR/hull-rootfs-builder" busybox-layer --out "$work/layer" >/dev/null || { fail "busybox layer"; exit 1; }
"$HULL_BIN_DIR/hull-rootfs-builder" oci-image --layer "$work/layer" --name "$IMG" --out "$work/image.tar" >/dev/null \
    || { fail "oci image"; exit 1; }
"${CTR[@]}" image import "$work/image.tar" >/dev/null || { fail "ctr image import"; exit 1; }

# run_rm ID ARGS...: ctr run --rm with stdin from /dev/null; sets OUT ERR RC.
run_rm() {
    local id=$1
    shift
    "${CTR[@]}" run --rm "${RT[@]}" "$IMG" "$id" "$@" </dev/null >"$work/$id.out" 2>"$work/$id.err"
    RC=$?
    # Killed by the timeout: show what the pod was doing while it is still there.
    [ "$RC" = 137 ] && { echo "--- $id: ctr run timed out ---" >&2; pod_logs; }
    OUT="$(cat "$work/$id.out")"
    ERR="$(cat "$work/$id.err")"
}

# wait_stopped ID: until ctr task ls shows it STOPPED (60 s).
wait_stopped() {
    local i=0
    until "${CTR[@]}" task ls 2>/dev/null | awk -v t="$1" '$1 == t {print $3}' | grep -q STOPPED; do
        i=$((i + 1))
        [ "$i" -gt 600 ] && return 1
        sleep 0.1
    done
}

# vmm_count [PATTERN]: hull-vmm processes (whose command line matches
# PATTERN), a jailed one counted once (its PID namespace's parent, not the
# VMM inside).
vmm_count() {
    local n=0 p
    for p in $(pgrep -f "hull-vmm.*${1:-}"); do
        [ "$(ps -o comm= -p "$(ps -o ppid= -p "$p" | tr -d ' ')" 2>/dev/null)" = hull-vmm ] || n=$((n + 1))
    done
    echo "$n"
}

# nothing_left WHAT: no hull-vmm, virtiofsd or pod directories, no mounts under the state dir.
nothing_left() {
    local i=0
    while [ "$(vmm_count)" -gt 0 ] || pgrep -x virtiofsd >/dev/null; do
        i=$((i + 1))
        [ "$i" -gt 100 ] && break
        sleep 0.1
    done
    check "$1: no hull-vmm left" 0 "$(vmm_count)"
    check "$1: no virtiofsd left" 0 "$(pgrep -x virtiofsd | wc -l)"
    check "$1: only the disk pool, templates and jail uid claims in the state dir" "diskpool templates" \
        "$(ls "$state" 2>/dev/null | grep -v '^templates$\|^jail-uids$' | tr '\n' ' ' | sed 's/ $//') templates"
    check "$1: no jail uid claimed" 0 "$(ls "$state/jail-uids" 2>/dev/null | wc -l)"
    check "$1: no template build left behind" 0 "$(ls "$state/templates" 2>/dev/null | grep -c '\.build-')"
    check "$1: no mounts under the state dir" 0 "$(grep -c " $state/" /proc/self/mountinfo)"
    check "$1: no process left in hull's host cgroups" 0 "$(find /sys/fs/cgroup/hull -name cgroup.procs -exec cat {} + 2>/dev/null | wc -l)"
    check "$1: no pod cgroup left" 0 "$(ls /sys/fs/cgroup/hull 2>/dev/null | grep -c '^pod-')"
    check "$1: no cgroup left where containerd named them" 0 "$(find /sys/fs/cgroup/default -mindepth 1 -type d 2>/dev/null | wc -l)"
}

has() { case " $cases " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# --- basic: echo hi; exit 3 -----------------------------------------------
if has basic; then
    t0=$(date +%s%N)
    run_rm basic1 sh -c 'echo hi; exit 3'
    echo "INFO ctr run --rm (template build, restore, run, shutdown): $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    check "basic: output" "hi" "$OUT"
    check "basic: exit status" 3 "$RC"
    [ "$RC" = 3 ] || echo "$ERR" >&2
    check "basic: one VM template built" 1 "$(find "$state/templates" -name state.json | wc -l)"
    t0=$(date +%s%N)
    run_rm basic1b sh -c 'echo again'
    echo "INFO ctr run --rm (restore, run, shutdown): $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    check "basic: second run from the template" "again" "$OUT"
    check "basic: the template was restored, not booted" 1 "$(grep -ac 'restored from the template' "$HULL_CTRD_DIR/containerd.log" | awk '{print ($1 >= 1)}')"
    # hull-vmm's own start phases reach the pod's "ready in" line, in order.
    check "basic: hull-vmm's start phases on the ready line" 1 "$(grep -a 'pod basic1b: ready in' "$HULL_CTRD_DIR/containerd.log" | grep -ac 'vmm-fork [0-9]*, vmm-jail [0-9]*, vmm-seccomp [0-9]*, vmm-threads [0-9]*, vmm-restore [0-9]*, restore [0-9]*')"
    # The pod's hull-vmm is jailed: PID 1 of its own PID namespace, an
    # unprivileged uid with no capabilities, its root the pod's vm/ directory.
    "${CTR[@]}" run -d "${RT[@]}" "$IMG" jail1 sleep 100000 </dev/null >/dev/null 2>&1
    vmm=""
    for p in $(pgrep -f "hull-vmm.*$state/jail1/"); do
        [ "$(ps -o comm= -p "$(ps -o ppid= -p "$p" | tr -d ' ')")" = hull-vmm ] && vmm=$p
    done
    check "jail: the VMM runs inside the jail's PID namespace" 1 "$(awk '/^NSpid:/ {print $NF}' "/proc/$vmm/status" 2>/dev/null)"
    uid="$(awk '/^Uid:/ {print $2}' "/proc/$vmm/status" 2>/dev/null)"
    check "jail: the VMM's uid is the pod's claim" "$uid" "$(cat "$state/jail1/jail-uid" 2>/dev/null)"
    check "jail: the VMM is not root" 1 "$([ -n "$uid" ] && [ "$uid" -ne 0 ] && echo 1)"
    check "jail: no capabilities" 0000000000000000 "$(awk '/^CapEff:/ {print $2}' "/proc/$vmm/status" 2>/dev/null)"
    check "jail: its root holds only its own files" "$(ls -A "$state/jail1/vm" | sort | tr '\n' ' ')" \
        "$(ls -A "/proc/$vmm/root" 2>/dev/null | sort | tr '\n' ' ')"
    check "jail: the host's files are out of reach" 0 "$(ls "/proc/$vmm/root/etc" 2>/dev/null | wc -l)"
    check "jail: its own network namespace" 1 "$([ "$(readlink "/proc/$vmm/ns/net")" != "$(readlink /proc/self/ns/net)" ] && echo 1)"
    out="$("${CTR[@]}" task exec --exec-id e jail1 echo jailed-ok </dev/null 2>&1)"
    check "jail: exec in a jailed pod" "jailed-ok" "$out"
    "${CTR[@]}" task kill -s SIGKILL jail1
    wait_stopped jail1
    "${CTR[@]}" task delete jail1 >/dev/null 2>&1
    "${CTR[@]}" container delete jail1
    nothing_left "jail"
    write_config "$HULL_KERNEL" 240 "template = false"
    t0=$(date +%s%N)
    run_rm basic1c sh -c 'echo cold; exit 4'
    echo "INFO ctr run --rm (cold boot, run, shutdown): $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    check "basic: cold boot (template = false) output" "cold" "$OUT"
    check "basic: cold boot exit status" 4 "$RC"
    write_config
    run_rm basic2 sh -c 'echo data > /newfile && cat /newfile && rm /bin/ls && ! test -e /bin/ls && echo removed'
    check "basic: writable layer" "$(printf 'data\nremoved')" "$OUT"
    check "basic: writable layer exit" 0 "$RC"
    nothing_left basic
fi

# --- stdio: stderr apart, big output from a fast exit, stdin ---------------
if has stdio; then
    run_rm stdio1 sh -c 'echo out; echo err >&2'
    check "stdio: stdout" out "$OUT"
    check "stdio: stderr" err "$ERR"
    run_rm stdio2 seq 1 100000
    check "stdio: 100000 lines from a process that exits at once" 100000 "$(wc -l < "$work/stdio2.out")"
    check "stdio: last line" 100000 "$(tail -n 1 "$work/stdio2.out")"
    # ctr 1.6's run never sends CloseIO (its exec does, see the exec case):
    # read a known number of lines instead of waiting for end-of-file.
    printf 'line one\nline two\n' | "${CTR[@]}" run --rm "${RT[@]}" "$IMG" stdio3 head -n 2 >"$work/stdio3.out" 2>&1
    check "stdio: stdin reaches the process" "$(printf 'line one\nline two')" "$(cat "$work/stdio3.out")"
    nothing_left stdio
fi

# --- exec, ps, kill on a detached task ---------------------------------------
if has exec; then
    "${CTR[@]}" run -d "${RT[@]}" "$IMG" exec1 sleep 1000 </dev/null >/dev/null 2>"$work/exec1.err"
    check "exec: detached run" 0 $?
    out="$("${CTR[@]}" task exec --exec-id e1 exec1 sh -c 'echo exec-ok; exit 5' </dev/null 2>&1)"
    rc=$?
    check "exec: output" exec-ok "$out"
    check "exec: exit status" 5 "$rc"
    out="$("${CTR[@]}" task exec --exec-id e2 exec1 sh -c 'cat; echo done' <<<"from-stdin" 2>&1)"
    check "exec: stdin" "$(printf 'from-stdin\ndone')" "$out"
    check "exec: ps lists processes" 1 "$("${CTR[@]}" task ps exec1 2>/dev/null | awk 'NR>1' | wc -l | awk '{print ($1 >= 1)}')"
    "${CTR[@]}" task pause exec1 && "${CTR[@]}" task ls | grep -q 'exec1.*PAUSED'
    check "exec: pause" 0 $?
    "${CTR[@]}" task resume exec1 && "${CTR[@]}" task ls | grep -q 'exec1.*RUNNING'
    check "exec: resume" 0 $?
    "${CTR[@]}" task kill -s SIGKILL exec1
    wait_stopped exec1
    check "exec: killed task stops" 0 $?
    "${CTR[@]}" task delete exec1 >/dev/null 2>&1
    check "exec: task delete" 0 $?
    "${CTR[@]}" container delete exec1
    nothing_left exec
fi

# --- tty: ctr run -t and exec -t (script(1) gives ctr a terminal) ----------
if has tty; then
    out="$(script -qec "$TTY_CTR run --rm -t ${RT[*]} $IMG tty1 sh -c 'tty; echo tty-ok; exit 4'" /dev/null </dev/null)"
    rc=$?
    check_contains "tty: run -t has a pty" "/dev/pts/" "$out"
    check_contains "tty: run -t output" "tty-ok" "$out"
    check "tty: run -t exit status" 4 "$rc"
    "${CTR[@]}" run -d "${RT[@]}" "$IMG" tty2 sleep 1000 </dev/null >/dev/null 2>&1
    out="$(script -qec "$TTY_CTR task exec -t --exec-id t1 tty2 sh -c 'stty size; echo exec-tty-ok'" /dev/null </dev/null)"
    check_contains "tty: exec -t output" "exec-tty-ok" "$out"
    "${CTR[@]}" task kill -s SIGKILL tty2
    wait_stopped tty2
    "${CTR[@]}" task delete tty2 >/dev/null 2>&1
    "${CTR[@]}" container delete tty2
    nothing_left tty
fi

# --- signal: exit statuses of signalled tasks, as `ctr run` reports them ----
# wait_running ID: until ctr task ls shows it RUNNING.
wait_running() {
    local i=0
    until "${CTR[@]}" task ls 2>/dev/null | awk -v t="$1" '$1 == t {print $3}' | grep -q RUNNING; do
        i=$((i + 1))
        [ "$i" -gt 3000 ] && return 1
        sleep 0.1
    done
}
if has signal; then
    "${CTR[@]}" run --rm "${RT[@]}" "$IMG" sig1 sh -c 'trap "exit 42" TERM; while :; do sleep 0.1; done' </dev/null >/dev/null 2>&1 &
    run_pid=$!
    wait_running sig1 && sleep 1
    "${CTR[@]}" task kill -s SIGTERM sig1
    wait "$run_pid"
    check "signal: SIGTERM trapped, exit status 42" 42 $?
    "${CTR[@]}" run --rm "${RT[@]}" "$IMG" sig2 sleep 100000 </dev/null >/dev/null 2>&1 &
    run_pid=$!
    wait_running sig2 && sleep 1
    "${CTR[@]}" task kill -s SIGKILL sig2
    wait "$run_pid"
    check "signal: SIGKILL, exit status 137" 137 $?
    nothing_left signal
fi

# --- oom: a container over its memory limit ------------------------------------
if has oom; then
    # The shell keeps the command substitution's 64 MB in memory: over 32 MiB.
    "${CTR[@]}" run --rm "${RT[@]}" --memory-limit 33554432 "$IMG" oom1 sh -c 'x=$(yes | head -c 64000000); echo survived' \
        </dev/null >"$work/oom1.out" 2>&1
    check "oom: killed (exit status 137)" 137 $?
    i=0
    until grep -q '/tasks/oom' "$work/events.log" || [ "$i" -gt 50 ]; do i=$((i + 1)); sleep 0.1; done
    check "oom: TaskOOM event" 1 "$(grep -c '/tasks/oom' "$work/events.log")"
    nothing_left oom
fi

# --- pod: a CRI-style sandbox and two containers in one VM -----------------
if has pod; then
    # One disk slot: the sandbox takes none, c1 takes it, c2 gets a tmpfs upper.
    DISKS=1 write_config
    pod=(--annotation io.kubernetes.cri.sandbox-id=pod1)
    "${CTR[@]}" run -d "${RT[@]}" --annotation io.kubernetes.cri.container-type=sandbox "${pod[@]}" \
        --annotation io.kubernetes.cri.sandbox-memory=134217728 "$IMG" pod1 sleep 100000 </dev/null >/dev/null 2>"$work/pod1.err"
    check "pod: sandbox starts" 0 $?
    for c in pod1-c1 pod1-c2; do
        "${CTR[@]}" run -d "${RT[@]}" --annotation io.kubernetes.cri.container-type=container "${pod[@]}" \
            "$IMG" "$c" sleep 100000 </dev/null >/dev/null 2>"$work/$c.err"
        check "pod: $c starts" 0 $?
    done
    check "pod: one VM for the pod" 1 "$(vmm_count "$state/pod1/")"
    check "pod: one VM in all" 1 "$(vmm_count)"
    vmm_pid="$(pgrep -f "hull-vmm.*$state/pod1/" | head -n 1)"
    vmm_cg="$(cut -d: -f3 "/proc/$vmm_pid/cgroup" | head -n 1)"
    # containerd names the task's cgroup (linux.cgroupsPath = /<namespace>/<id>); the VM goes there.
    check "pod: hull-vmm runs in the sandbox's cgroup" "/default/pod1" "$vmm_cg"
    check "pod: virtiofsd in the same cgroup" "$vmm_cg" \
        "$(cut -d: -f3 "/proc/$(pgrep -f "virtiofsd.*$state/pod1/" | head -n 1)/cgroup" | head -n 1)"
    mem_max="$(cat "/sys/fs/cgroup$vmm_cg/memory.max" 2>/dev/null)"
    echo "INFO pod cgroup $vmm_cg memory.max=$mem_max cpu.max=$(cat "/sys/fs/cgroup$vmm_cg/cpu.max" 2>/dev/null)"
    check "pod: memory limit written (384 MiB guest + overhead)" 1 "$(awk -v m="${mem_max:-0}" 'BEGIN {print (m > 402653184 && m < 536870912)}')"
    check "pod: one shim for the pod" 1 "$(pgrep -f 'containerd-shim-hull-v2 .*-id pod1 ' | wc -l)"
    "${CTR[@]}" task exec --exec-id w pod1-c1 sh -c 'echo mine > /only-c1' </dev/null
    "${CTR[@]}" task exec --exec-id r pod1-c2 test -e /only-c1 </dev/null
    check "pod: containers have their own writable layers" 1 $?
    h1="$("${CTR[@]}" task exec --exec-id h pod1-c1 hostname </dev/null)"
    h2="$("${CTR[@]}" task exec --exec-id h pod1-c2 hostname </dev/null)"
    check "pod: containers share the pod's hostname" "$h1" "$h2"
    [ -n "$h1" ] && pass "pod: hostname is set ($h1)" || fail "pod: empty hostname"
    m1="$("${CTR[@]}" task exec --exec-id u pod1-c1 grep ' / ' /proc/mounts </dev/null)"
    m2="$("${CTR[@]}" task exec --exec-id u pod1-c2 grep ' / ' /proc/mounts </dev/null)"
    echo "INFO c1 root: $m1"
    echo "INFO c2 root: $m2"
    check_contains "pod: c1's writable layer is its disk" "disk/upper" "$m1"
    check_contains "pod: c2 (past the disk slots) has a tmpfs writable layer" "tmp/upper" "$m2"
    "${CTR[@]}" task exec --exec-id t pod1-c2 sh -c 'echo x > /written && cat /written' </dev/null >/dev/null
    check "pod: tmpfs writable layer works" 0 $?
    check "pod: the shim warned about the tmpfs layer" 1 "$(grep -c 'container pod1-c2 gets a tmpfs writable layer' "$HULL_CTRD_DIR/containerd.log")"
    mem="$("${CTR[@]}" task exec --exec-id m pod1-c1 awk '/MemTotal/ {print $2}' /proc/meminfo </dev/null)"
    check "pod: VM memory = 256 MiB base + 128 MiB pod limit" 1 "$(awk -v m="${mem:-0}" 'BEGIN {print (m > 330000 && m < 400000)}')"
    for c in pod1-c1 pod1-c2; do
        "${CTR[@]}" task kill -s SIGKILL "$c"
        wait_stopped "$c"
        "${CTR[@]}" task delete "$c" >/dev/null 2>&1
        "${CTR[@]}" container delete "$c"
    done
    check "pod: VM stays while the sandbox lives" 1 "$(vmm_count "$state/pod1/")"
    "${CTR[@]}" task kill -s SIGKILL pod1
    wait_stopped pod1
    "${CTR[@]}" task delete pod1 >/dev/null 2>&1
    "${CTR[@]}" container delete pod1
    nothing_left pod
    write_config
fi

# --- cri: a CRI client (RunPodSandbox with handler hull, two containers, ExecSync, stop, remove) ---
if has cri; then
    # CRI images live in the k8s.io namespace; the sandbox ("pause") image is
    # the busybox layer running a shell that sleeps until SIGTERM.
    "$HULL_BIN_DIR/hull-rootfs-builder" oci-image --layer "$work/layer" --name "$HULL_PAUSE_IMAGE" \
        --entrypoint /bin/sh --entrypoint -c --entrypoint 'trap "exit 0" TERM INT; while :; do sleep 3600 & wait $!; done' \
        --out "$work/pause.tar" >/dev/null
    check "cri: pause image built" 0 $?
    "${CTR[@]}" -n k8s.io image import "$work/pause.tar" >/dev/null
    check "cri: pause image imported" 0 $?
    "${CTR[@]}" -n k8s.io image import "$work/image.tar" >/dev/null
    check "cri: test image imported" 0 $?
    find /sys/fs/cgroup -mindepth 1 -type d 2>/dev/null | sort >"$work/cgroups.before"
    log_from=$(($(wc -l <"$HULL_CTRD_DIR/containerd.log") + 1))
    t0=$(date +%s%N)
    timeout -s KILL $((tmo * 4)) "$HULL_BIN_DIR/hull-cri" --socket "$HULL_CTRD_DIR/containerd.sock" --image "$IMG" \
        --handler hull --step-timeout "$tmo" >"$work/cri.out" 2>"$work/cri.err"
    rc=$?
    echo "INFO hull-cri scenario: $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    # Its PASS/FAIL lines count as this script's.
    while IFS= read -r line; do
        case "$line" in
            "PASS "*) pass "cri: ${line#PASS }" ;;
            "FAIL "*) fail "cri: ${line#FAIL }" ;;
            *) echo "$line" ;;
        esac
    done <"$work/cri.out"
    [ -s "$work/cri.err" ] && cat "$work/cri.err" >&2
    check "cri: hull-cri exit status" 0 "$rc"
    # The guest's own resolv.conf: the shim passed the pod's DNS config
    # (from the sandbox spec's resolv.conf mount) to SetupSandbox.
    check "cri: the guest got the pod's DNS config" 1 \
        "$(tail -n "+$log_from" "$HULL_CTRD_DIR/containerd.log" | grep -a 'guest DNS: nameservers' | grep -ac '10.9.8.7' | awk '{print ($1 >= 1)}')"
    i=0
    while pgrep -f containerd-shim-hull-v2 >/dev/null && [ "$i" -lt 100 ]; do i=$((i + 1)); sleep 0.1; done
    check "cri: no shim processes left" 0 "$(pgrep -f containerd-shim-hull-v2 | wc -l)"
    # containerd 1.6 runs `containerd-shim-hull-v2 delete` whenever it closes
    # a task's shim connection; the running shim had already cleaned up, so
    # those commands must have found nothing to do (a real cleanup is logged
    # as a "cleanup warning" naming what it stopped, see the crash case).
    check "cri: containerd's shim delete commands found nothing left" "" \
        "$(tail -n "+$log_from" "$HULL_CTRD_DIR/containerd.log" | grep -a 'cleanup warnings' | grep -av 'nothing to clean up')"
    check "cri: no CRI containers or sandboxes left" 0 "$("${CTR[@]}" -n k8s.io container ls -q 2>/dev/null | wc -l)"
    check "cri: no tasks left" 0 "$("${CTR[@]}" -n k8s.io task ls 2>/dev/null | awk 'NR>1' | wc -l)"
    find /sys/fs/cgroup -mindepth 1 -type d 2>/dev/null | sort >"$work/cgroups.after"
    # The namespace-level parent (/sys/fs/cgroup/k8s.io, made for the pod's
    # cgroupsPath /k8s.io/<id>) stays, as runc leaves it, and so does hull's
    # cgroup pool if this was the first pod; nothing else may.
    check "cri: no cgroups left" "" \
        "$(comm -13 "$work/cgroups.before" "$work/cgroups.after" | grep -vx '/sys/fs/cgroup/k8s.io' \
            | grep -vx '/sys/fs/cgroup/hull\(/pool-[0-9a-f]*\)\?' | tr '\n' ' ')"
    check "cri: no mounts left under containerd's root and state" 0 \
        "$(grep -c -e " $HULL_CTRD_DIR/root/" -e " $HULL_CTRD_DIR/state/" /proc/self/mountinfo)"
    nothing_left cri
fi

# --- crash: the shim is SIGKILLed; containerd's `delete` cleans up ----------
if has crash; then
    "${CTR[@]}" run -d "${RT[@]}" "$IMG" crash1 sleep 100000 </dev/null >/dev/null 2>&1
    check "crash: detached run" 0 $?
    shim_pid="$(pgrep -f 'containerd-shim-hull-v2 .*-id crash1 ' | head -n 1)"
    check "crash: one VM running" 1 "$(vmm_count "$state/crash1/")"
    kill -9 "$shim_pid"
    # containerd notices the dead shim, runs `containerd-shim-hull-v2 delete`
    # and drops the task.
    i=0
    while "${CTR[@]}" task ls 2>/dev/null | awk '{print $1 " " $3}' | grep -q '^crash1 RUNNING'; do
        i=$((i + 1))
        [ "$i" -gt 600 ] && break
        sleep 0.1
    done
    check "crash: containerd sees the task end" 0 "$("${CTR[@]}" task ls 2>/dev/null | awk '{print $1 " " $3}' | grep -c '^crash1 RUNNING')"
    # containerd logs the delete command's stderr as "cleanup warnings".
    check "crash: the delete command stopped hull-vmm" 1 \
        "$(grep -a 'cleanup warnings' "$HULL_CTRD_DIR/containerd.log" | grep -a 'crash1' | grep -ac 'hull-vmm (pid')"
    nothing_left crash
    "${CTR[@]}" task delete crash1 >/dev/null 2>&1
    "${CTR[@]}" container delete crash1
    check "crash: container deleted" 0 $?
fi

# --- faults: hull-vmm killed, a full writable layer, containerd restarted ---
# task_died ID WHAT STATUS: after a fault killed task ID's VM, the task
# stops, containerd gets its exit event, `task delete` reports STATUS, and
# nothing is left.
task_died() {
    wait_stopped "$1"
    check "faults ($2): the task stops" 0 $?
    # The init's exit event (an exec'd process of the task gets its own).
    local i=0 init="/tasks/exit.*\"id\":\"$1\""
    until grep -q "$init" "$work/events.log" || [ "$i" -gt 100 ]; do i=$((i + 1)); sleep 0.1; done
    check "faults ($2): containerd got the init's exit event" 1 "$(grep -c "$init" "$work/events.log")"
    check_contains "faults ($2): an error exit status" "$3" "$("${CTR[@]}" task delete "$1" 2>&1)"
    "${CTR[@]}" container delete "$1"
    nothing_left "faults ($2)"
}

if has faults; then
    # hull-vmm SIGKILLed under a running container: the task ends with an
    # error status, containerd sees the exit, everything is cleaned up.
    "${CTR[@]}" run -d "${RT[@]}" "$IMG" fault1 sleep 100000 </dev/null >/dev/null 2>&1
    check "faults: detached run" 0 $?
    kill -9 "$(pgrep -f "hull-vmm.*$state/fault1/" | head -n 1)"
    task_died fault1 "hull-vmm killed" "exit with non-zero exit code 255"

    # The guest agent dies. It is the guest's PID 1, which nothing in the
    # guest can kill alone; a privileged container crashes the guest kernel
    # through /proc/sysrq-trigger, so the agent goes with it (the guest
    # panics and resets). Same outcome as above: an error exit, containerd
    # sees it, nothing left.
    "${CTR[@]}" run -d --privileged "${RT[@]}" "$IMG" fault4 sleep 100000 </dev/null >/dev/null 2>&1
    check "faults: detached privileged run" 0 $?
    timeout 60 "${CTR[@]}" task exec --exec-id crash fault4 sh -c 'echo c > /proc/sysrq-trigger' </dev/null >/dev/null 2>&1
    task_died fault4 "guest agent died" "exit with non-zero exit code"

    # A full writable layer: the container gets ENOSPC, the VM and host carry on.
    DISK_MIB=64 write_config
    "${CTR[@]}" run -d "${RT[@]}" "$IMG" fault2 sleep 100000 </dev/null >/dev/null 2>&1
    out="$("${CTR[@]}" task exec --exec-id fill fault2 sh -c 'dd if=/dev/zero of=/big bs=1M count=100 2>&1; echo "rc=$?"' </dev/null 2>&1)"
    check_contains "faults: ENOSPC inside the container" "No space left on device" "$out"
    check_contains "faults: dd failed" "rc=1" "$out"
    out="$("${CTR[@]}" task exec --exec-id after fault2 sh -c 'rm /big; echo ok > /small && cat /small' </dev/null 2>&1)"
    check "faults: the container works after freeing space" "ok" "$out"
    "${CTR[@]}" task kill -s SIGKILL fault2
    wait_stopped fault2
    "${CTR[@]}" task delete fault2 >/dev/null 2>&1
    "${CTR[@]}" container delete fault2
    write_config
    nothing_left "faults (full disk)"

    # containerd restarted while a pod runs: the shim keeps it, containerd reconnects.
    "${CTR[@]}" run -d "${RT[@]}" "$IMG" fault3 sleep 100000 </dev/null >/dev/null 2>&1
    kill "$HULL_CTRD_PID"
    wait "$HULL_CTRD_PID" 2>/dev/null
    check "faults: the VM outlives containerd" 1 "$(vmm_count "$state/fault3/")"
    containerd --config "$HULL_CTRD_DIR/config.toml" >> "$HULL_CTRD_DIR/containerd.log" 2>&1 &
    HULL_CTRD_PID=$!
    i=0
    until "${CTR[@]}" version >/dev/null 2>&1 || [ "$i" -gt 300 ]; do i=$((i + 1)); sleep 0.1; done
    check "faults: containerd reconnects to the running task" RUNNING \
        "$("${CTR[@]}" task ls 2>/dev/null | awk '$1 == "fault3" {print $3}')"
    out="$("${CTR[@]}" task exec --exec-id e fault3 echo still-here </dev/null 2>&1)"
    check "faults: exec after the restart" "still-here" "$out"
    "${CTR[@]}" task kill -s SIGKILL fault3
    wait_stopped fault3
    "${CTR[@]}" task delete fault3 >/dev/null 2>&1
    "${CTR[@]}" container delete fault3
    nothing_left "faults (containerd restarted)"
fi

# --- net: a pod in a network namespace with a veth, as CNI leaves it -------
# The test makes the namespace and the veth itself; addresses are private
# to the lab (10.200.1.0/24 between the lab's root namespace and the pod's).
if has net; then
    ns=hullnet-pod
    ip netns del "$ns" 2>/dev/null
    ip link del hullpeer0 2>/dev/null
    ip link del hullpeer1 2>/dev/null
    ip netns add "$ns" &&
        ip link add hullpeer0 type veth peer name eth0 netns "$ns" &&
        ip addr add 10.200.1.1/24 dev hullpeer0 && ip link set hullpeer0 up &&
        ip -n "$ns" addr add 10.200.1.2/24 dev eth0 && ip -n "$ns" link set eth0 up &&
        ip -n "$ns" link set lo up && ip -n "$ns" route add default via 10.200.1.1 &&
        ip link add hullpeer1 type veth peer name net1 netns "$ns" &&
        ip addr add 10.201.1.1/24 dev hullpeer1 && ip link set hullpeer1 up &&
        ip -n "$ns" addr add 10.201.1.2/24 dev net1 && ip -n "$ns" link set net1 up
    check "net: namespace and two veths made" 0 $?
    veth_mac="$(ip -n "$ns" -o link show eth0 | sed -n 's/.*link\/ether \([0-9a-f:]*\).*/\1/p')"
    mkdir -p "$work/www" && echo from-peer > "$work/www/peer.txt"
    head -c 20971520 /dev/zero > "$work/www/big"
    busybox httpd -f -p 10.200.1.1:8081 -h "$work/www" &
    httpd_pid=$!
    busybox httpd -f -p 10.201.1.1:8082 -h "$work/www" &
    httpd2_pid=$!
    "${CTR[@]}" run -d --with-ns "network:/var/run/netns/$ns" "${RT[@]}" "$IMG" net1 \
        sh -c 'mkdir /www && echo from-pod > /www/pod.txt && exec httpd -f -p 8080 -h /www' </dev/null >/dev/null 2>&1
    check "net: pod started in the namespace" 0 $?
    # in_net1 EXEC_ID CMD...: runs CMD in the pod, output and errors together.
    in_net1() { local id=$1; shift; timeout 60 "${CTR[@]}" task exec --exec-id "$id" net1 "$@" </dev/null 2>&1; }
    out="$(in_net1 a ip -o addr show eth0)"
    check_contains "net: the guest's eth0 has the pod's address" "10.200.1.2/24" "$out"
    out="$(in_net1 m cat /sys/class/net/eth0/address)"
    check "net: the guest's eth0 has the veth's MAC" "$veth_mac" "$out"
    out="$(in_net1 a1 ip -o addr show eth1)"
    check_contains "net: the second interface is the guest's eth1" "10.201.1.2/24" "$out"
    out="$(in_net1 w1 wget -q -O - http://10.201.1.1:8082/peer.txt)"
    check "net: the pod reaches the peer on the second interface" "from-peer" "$out"
    out="$(in_net1 r ip route)"
    check_contains "net: the default route" "default via 10.200.1.1" "$out"
    out="$(in_net1 p ping -c 1 -W 10 10.200.1.1)"
    check_contains "net: the pod pings the peer" "1 packets received" "$out"
    out="$(in_net1 w wget -q -O - http://10.200.1.1:8081/peer.txt)"
    check "net: the pod fetches from the peer (TCP)" "from-peer" "$out"
    # The peer connects to a server in the pod. (bash's /dev/tcp: busybox
    # wget dies of SIGSEGV in the lab's root namespace before it connects.)
    out="$(timeout 60 bash -c 'exec 3<>/dev/tcp/10.200.1.2/8080 && printf "GET /pod.txt HTTP/1.0\r\n\r\n" >&3 && sed "1,/^\r$/d" <&3' 2>&1)"
    check "net: the peer fetches from a server in the pod (TCP)" "from-pod" "$out"
    check "net: a tap per interface in the pod's namespace" 2 "$(ip -n "$ns" -o link show | grep -c 'hulltap[01]')"
    check "net: no tap in the host's namespace" 0 "$(ip -o link show | grep -c hulltap0)"
    # Round trip and throughput (20 MiB over HTTP from the peer), pod vs a
    # plain namespace on the same veth (runc's model), same lab run:
    # figures for README, not checks.
    # Round trip: 20 small HTTP GETs in a row (a TCP connection each).
    get20='for i in $(seq 20); do wget -q -O /dev/null http://10.200.1.1:8081/peer.txt; done'
    rtt_pod="$(timeout 120 "${CTR[@]}" task exec --exec-id rtt net1 time -p sh -c "$get20" </dev/null 2>&1 | awk '$1 == "real" {print $2 * 50}')"
    t0=$(date +%s%N)
    out="$(timeout 120 "${CTR[@]}" task exec --exec-id tput net1 sh -c 'wget -q -O - http://10.200.1.1:8081/big | wc -c' </dev/null 2>&1)"
    tput_pod_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    check "net: 20 MiB from the peer over TCP" 20971520 "$out"
    "${CTR[@]}" task kill -s SIGKILL net1
    wait_stopped net1
    "${CTR[@]}" task delete net1 >/dev/null 2>&1
    "${CTR[@]}" container delete net1
    check "net: the taps are gone with the pod" 0 "$(ip -n "$ns" -o link show | grep -c hulltap)"
    check "net: no redirect left on the pod's interfaces" 0 "$(tc -n "$ns" qdisc show | grep -c ingress)"
    nothing_left "net"
    # The same peer from the namespace itself (no VM).
    rtt_ns="$(ip netns exec "$ns" busybox time -p busybox sh -c "${get20//wget/busybox wget}" 2>&1 | awk '$1 == "real" {print $2 * 50}')"
    t0=$(date +%s%N)
    ip netns exec "$ns" timeout 60 busybox wget -q -O /dev/null http://10.200.1.1:8081/big
    tput_ns_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    echo "INFO net: HTTP GET (new TCP connection each, wget process included) avg: pod ${rtt_pod} ms, plain netns ${rtt_ns} ms ($(awk -v a="$rtt_pod" -v b="$rtt_ns" 'BEGIN { if (b > 0) printf "%.1f", a / b }')x); 20 MiB over TCP (HTTP GET) incl. exec: pod ${tput_pod_ms} ms, plain netns ${tput_ns_ms} ms ($(awk -v a="$tput_pod_ms" -v b="$tput_ns_ms" 'BEGIN { if (b > 0) printf "%.1f", a / b }')x); throughput pod $(awk -v t="$tput_pod_ms" 'BEGIN { if (t > 0) printf "%.1f", 20 * 8 * 1.048576 / (t / 1000) }') Mbit/s, plain netns $(awk -v t="$tput_ns_ms" 'BEGIN { if (t > 0) printf "%.1f", 20 * 8 * 1.048576 / (t / 1000) }') Mbit/s"
    kill "$httpd_pid" "$httpd2_pid" 2>/dev/null
    ip netns del "$ns"
    ip link del hullpeer0 2>/dev/null
    ip link del hullpeer1 2>/dev/null
fi

# --- leaks: 100 create/start/delete cycles, 10 at a time ---------------------
# snapshot_counts: what a leak would grow, one "name value" per line.
snapshot_counts() {
    # User processes (kernel threads, children of kthreadd, come and go),
    # without this script's own short-lived helpers.
    echo "processes $(ps -e -o ppid=,comm= | awk '$1 > 2 && $2 !~ /^(ps|awk|grep|wc|sleep|ctr|timeout|bash|sh|find|ls)$/' | wc -l)"
    echo "containerd-fds $(ls "/proc/$HULL_CTRD_PID/fd" | wc -l)"
    echo "mounts $(wc -l < /proc/self/mountinfo)"
    echo "cgroups $(find /sys/fs/cgroup -type d | wc -l)"
    echo "hull-state-files $(find "$state" | wc -l)"
    echo "containerd-state-files $(find "$HULL_CTRD_DIR/state" "$HULL_CTRD_DIR/root/io.containerd.runtime.v2.task" 2>/dev/null | wc -l)"
    echo "snapshots $("${CTR[@]}" snapshot ls 2>/dev/null | wc -l)"
    echo "containers $("${CTR[@]}" container ls -q 2>/dev/null | wc -l)"
    echo "taps $(ip -o link show type tun 2>/dev/null | wc -l)"
    echo "tmp-files $(find "$HULL_CTRD_DIR/tmp" /tmp -maxdepth 1 -name '*hull*' 2>/dev/null | wc -l)"
}
if has leaks; then
    cycles="${HULL_LEAK_CYCLES:-100}"
    batch="${HULL_LEAK_BATCH:-10}"
    # One run first: the template and pools exist before the baseline is taken.
    run_rm leak0 true
    check "leaks: warm-up run" 0 "$RC"
    nothing_left "leaks (warm-up)"
    sleep 2
    # The disk pool refills in the background and a burst may leave it
    # short (CI, 2026-11-22: 13 state files before, 10 after): fill it
    # (this waits for a refill in progress) so both counts see it full. A
    # pool grown past its size would still show.
    containerd-shim-hull-v2 fill-disk-pool >/dev/null
    snapshot_counts > "$work/leak-before"
    t0=$(date +%s%N)
    n=0
    failed=0
    retried=0
    while [ "$n" -lt "$cycles" ]; do
        pids=()
        for j in $(seq 1 "$batch"); do
            id="leak$((n + j))"
            "${CTR[@]}" run --rm "${RT[@]}" "$IMG" "$id" sh -c "echo $id" </dev/null >"$work/$id.out" 2>&1 &
            pids+=($!)
        done
        for j in $(seq 1 "$batch"); do
            id="leak$((n + j))"
            wait "${pids[$((j - 1))]}" && [ "$(head -n 1 "$work/$id.out")" = "$id" ] && continue
            echo "$id: $(tail -n 3 "$work/$id.out")" >&2
            echo "--- $id: its lines in containerd's log (last 40, retries left out) ---" >&2
            grep -a "$id[^0-9]" "$HULL_CTRD_DIR/containerd.log" | grep -av retrying | tail -n 40 >&2
            # Its guest console and hull-vmm output, if the shim logged them.
            l="$(grep -a -n "pod $id: .*failed; guest console" "$HULL_CTRD_DIR/containerd.log" | tail -n 1 | cut -d: -f1)"
            [ -n "$l" ] && sed -n "${l},$((l + 45))p" "$HULL_CTRD_DIR/containerd.log" >&2
            # A restored guest is sometimes lost under a burst in the lab
            # (README "Leaks"): the cycle runs once more, alone, and must
            # work then; what the failed one left behind is counted below.
            # Cleaned up the way a user would (ctr was killed if it hung).
            "${CTR[@]}" task kill -s SIGKILL "$id" >/dev/null 2>&1
            "${CTR[@]}" task delete -f "$id" >/dev/null 2>&1
            "${CTR[@]}" container delete "$id" >/dev/null 2>&1
            retried=$((retried + 1))
            run_rm "${id}r" sh -c "echo ${id}r"
            [ "$RC" = 0 ] && [ "$OUT" = "${id}r" ] || failed=$((failed + 1))
        done
        n=$((n + batch))
    done
    echo "INFO leaks: $cycles ctr run --rm, $batch at a time: $(( ($(date +%s%N) - t0) / 1000000 )) ms; $retried failed and ran again alone"
    check "leaks: every cycle ran and printed its id" 0 "$failed"
    nothing_left "leaks"
    sleep 2
    containerd-shim-hull-v2 fill-disk-pool >/dev/null
    snapshot_counts > "$work/leak-after"
    while read -r name before; do
        check "leaks: $name unchanged after $cycles cycles" "$before" "$(awk -v n="$name" '$1 == n {print $2}' "$work/leak-after")"
    done < "$work/leak-before"
fi

# --- failures: clear errors, nothing left behind --------------------------
if has failures; then
    write_config /nonexistent/vmlinux
    run_rm fail1 true
    check "failures: missing kernel fails" 1 "$([ "$RC" -ne 0 ] && echo 1 || echo 0)"
    check_contains "failures: missing kernel names path and key" \
        "guest kernel /nonexistent/vmlinux not found (set paths.kernel" "$ERR"
    echo "INFO ctr said: $ERR"
    "${CTR[@]}" container delete fail1 >/dev/null 2>&1
    nothing_left "failures (kernel)"

    write_config "$HULL_KERNEL" 240 "bogus_key = 1"
    run_rm fail2 true
    check_contains "failures: unknown config key" "unknown field \`bogus_key\`" "$ERR"
    echo "INFO ctr said: $ERR"
    "${CTR[@]}" container delete fail2 >/dev/null 2>&1

    # Cold boot: a restore from an existing template can beat 1 s.
    write_config "$HULL_KERNEL" 1 "template = false"
    run_rm fail3 true
    check_contains "failures: agent timeout" "agent did not answer within 1s" "$ERR"
    check "failures: the guest console's tail is in the log" 1 \
        "$(grep -ac 'pod fail3: start failed; guest console (last lines)' "$HULL_CTRD_DIR/containerd.log")"
    echo "INFO ctr said: $ERR"
    "${CTR[@]}" container delete fail3 >/dev/null 2>&1
    nothing_left "failures (timeout)"
    write_config
fi

# --- events ----------------------------------------------------------------------
sleep 1
if has exec; then
    for topic in /tasks/create /tasks/start /tasks/exit /tasks/delete /tasks/exec-added /tasks/exec-started /tasks/paused /tasks/resumed; do
        check "events: $topic published" 1 "$(grep -q " $topic " "$work/events.log" && echo 1 || echo 0)"
    done
fi

# --- the end: nothing left at all -------------------------------------------
sleep 1
check "end: no shim processes left" 0 "$(pgrep -f containerd-shim-hull-v2 | wc -l)"
check "end: no tasks left" 0 "$("${CTR[@]}" task ls 2>/dev/null | awk 'NR>1' | wc -l)"
nothing_left end
[ "$fails" -eq 0 ]
