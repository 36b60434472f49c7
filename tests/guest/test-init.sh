#!/bin/sh
# Test-only PID 1 (chosen with rdinit=/test/init.sh): runs guest-side checks
# named by `hulltest=` on the kernel command line, prints "TEST key=value"
# lines on the console, then either reboots (hulltest_end=reboot) or execs the
# agent, which stays PID 1.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
echo "TEST cpus=$(grep -c ^processor /proc/cpuinfo)"

for t in $(echo "$hulltest" | tr ',' ' '); do
    case "$t" in
    blk)
        # vda: the host wrote HOSTPATTERN at offset 0; read it, write ours at 4096.
        echo "TEST vda_serial=$(cat /sys/block/vda/serial 2>&1)"
        echo "TEST vda_head=$(dd if=/dev/vda bs=16 count=1 2>/dev/null)"
        printf 'GUESTPATTERN-%s' "$(cat /sys/block/vda/size)" | dd of=/dev/vda bs=512 seek=8 conv=notrunc 2>/dev/null
        sync
        echo "TEST vda_written=$?"
        # vdb: read-only; a write must fail.
        if printf 'x' | dd of=/dev/vdb bs=512 seek=0 conv=notrunc,fsync 2>/dev/null; then
            echo "TEST vdb_ro=writable"
        else
            echo "TEST vdb_ro=refused"
        fi
        echo "TEST vdb_head=$(dd if=/dev/vdb bs=8 count=1 2>/dev/null)"
        ;;
    fs)
        mkdir -p /mnt/fs
        if mount -t virtiofs hullfs /mnt/fs; then
            echo "TEST fs_read=$(cat /mnt/fs/hello.txt)"
            echo "from-guest" > /mnt/fs/guest.txt && sync
            echo "TEST fs_wrote=$?"
            umount /mnt/fs
        else
            echo "TEST fs_read=mount-failed"
        fi
        ;;
    net)
        # eth0 on a tap in a network namespace the host test made
        # (tests/src/net_e2e.rs): guest 10.200.0.2/24, host side 10.200.0.1.
        # The guest kernel has no POSIX timers (alarm), so busybox's own
        # timeouts do nothing: `watch PID SECS` kills a command that hangs.
        for a in ip ping nc wget httpd sha256sum cut; do
            [ -e /bin/$a ] || ln -s busybox /bin/$a
        done
        watch() {
            (sleep "$2"; kill "$1" 2>/dev/null) &
            w=$!
            wait "$1"
            r=$?
            kill "$w" 2>/dev/null
            return $r
        }
        echo "TEST net_mac=$(cat /sys/class/net/eth0/address)"
        ip link set eth0 up && ip addr add 10.200.0.2/24 dev eth0
        echo "TEST net_up=$?"
        ok=0
        for i in 1 2 3; do
            ping -c 1 10.200.0.1 >/dev/null 2>&1 &
            watch $! 20 && ok=$((ok + 1))
        done
        [ $ok = 3 ] && echo "TEST net_ping=ok" || echo "TEST net_ping=$ok-of-3"
        echo hello-from-guest >/tmp/hello
        nc 10.200.0.1 7777 </tmp/hello >/tmp/echo 2>&1 &
        watch $! 30
        echo "TEST net_echo=$(cat /tmp/echo)"
        wget -q -O /tmp/download http://10.200.0.1:7778/blob &
        watch $! 120
        echo "TEST net_download=$(sha256sum /tmp/download | cut -d' ' -f1)"
        rm -f /tmp/download
        mkdir -p /www && dd if=/dev/urandom of=/www/blob bs=64k count=32 2>/dev/null
        echo "TEST net_blob=$(sha256sum /www/blob | cut -d' ' -f1)"
        httpd -p 8080 -h /www
        echo "TEST net_httpd=$?"
        # Keep talking to the host (the snapshot/restore half watches this).
        (i=0; while true; do
            i=$((i + 1))
            wget -q -O /dev/null "http://10.200.0.1:7779/tick?$i" 2>/dev/null &
            watch $! 3
            sleep 0.3
        done) &
        ;;
    esac
done
echo "TEST done"
if [ "$hulltest_end" = reboot ]; then
    reboot -f
fi
if [ "$hulltest_end" = stay ]; then
    # Background jobs keep running; PID 1 waits.
    while true; do sleep 3600; done
fi
exec /init
