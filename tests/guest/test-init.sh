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
    esac
done
echo "TEST done"
if [ "$hulltest_end" = reboot ]; then
    reboot -f
fi
exec /init
