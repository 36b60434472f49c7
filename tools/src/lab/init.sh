#!/bin/busybox sh
# PID 1 of the lab, an emulated KVM host: load modules, put this machine's
# root (9p, read-only) under a tmpfs overlay, run one job, report its status.
/bin/busybox --install -s /bin
export PATH=/bin HOME=/
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
status() { [ -n "$port_status" ] && echo "$*" > "$port_status"; }

while read -r m; do
    insmod "/modules/$m" || echo "lab: insmod $m failed"
done < /modules/order

for p in /sys/class/virtio-ports/*; do
    n="$(cat "$p/name")"
    case "$n" in
        hull.stdout) port_stdout="/dev/${p##*/}" ;;
        hull.stderr) port_stderr="/dev/${p##*/}" ;;
        hull.status) port_status="/dev/${p##*/}" ;;
    esac
done

mkdir -p /host /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose host /host || {
    status "error mounting the host file system over 9p"; reboot -f; }
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
if ! mount -t overlay overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work /newroot; then
    status "error mounting the overlay"; reboot -f
fi
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs shm /newroot/dev/shm
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
# The first memory cgroup switches the kernel's memcg static keys on, which
# rewrites code on every CPU. Under QEMU TCG that has locked up both CPUs of
# the lab when one ran the code being rewritten (session 8: soft lockups at
# kmem_cache_alloc during a job's first cgroup mkdir). Do it now,
# while nothing else runs, and keep the cgroup: the socket key would switch
# off again with the last memory cgroup.
echo +memory > /newroot/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
mkdir -p /newroot/sys/fs/cgroup/lab-static-keys 2>/dev/null
mount -t tmpfs -o mode=0755 run /newroot/run
mkdir -p /newroot/run/hull-lab
cp /job.sh /newroot/run/hull-lab/job.sh
hostname hull-lab
ip link set lo up 2>/dev/null

status "ready $(cut -d' ' -f1 /proc/uptime)"
# A heartbeat on the console: when a job times out, the console tail says
# whether the lab froze (the heartbeats stop) or the job stalled, and in
# what (its processes and their states).
( while sleep 120; do
    echo "lab: alive, up $(cut -d' ' -f1 /proc/uptime) s, load $(cut -d' ' -f1-3 /proc/loadavg)"
    ps -o pid,ppid,stat,args | grep -v ' \[' | cut -c1-160 | tail -n 30
  done > /dev/console 2>&1 ) &
chroot /newroot /bin/sh /run/hull-lab/job.sh < /dev/null > "$port_stdout" 2> "$port_stderr"
status "exit $?"
sync
reboot -f
