//! What PID 1 does before serving: pseudo file systems, config from the
//! kernel command line, power-off. Zombies are reaped by the container
//! backend's reaper (`container::reaper`), which must be the only one: a
//! blanket `waitpid(-1)` would steal the exit statuses it waits for.

use hull_agent_api::{
    CMDLINE_AGENT_PORT, CMDLINE_NOTIFY_PORT, CMDLINE_STDIO_PORT, DEFAULT_AGENT_PORT, DEFAULT_STDIO_PORT,
};
use nix::mount::{mount, MsFlags};
use std::time::Duration;

/// Mounts the pseudo file systems: /proc, /sys, /dev (devtmpfs is not
/// auto-mounted on an initramfs root), then /dev/pts (a private devpts
/// instance for container terminals), /dev/shm, /sys/fs/cgroup (cgroup v2)
/// and /run. Mounts that fail are reported together; the rest still happen.
pub fn mount_pseudo_filesystems() -> Result<(), String> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&str, &str, MsFlags, Option<&str>); 7] = [
        ("proc", "/proc", nodev, None),
        ("sysfs", "/sys", nodev, None),
        ("devtmpfs", "/dev", MsFlags::MS_NOSUID, None),
        ("devpts", "/dev/pts", MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC, Some("newinstance,ptmxmode=0666,mode=0620")),
        ("tmpfs", "/dev/shm", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=1777")),
        ("cgroup2", "/sys/fs/cgroup", nodev, None),
        ("tmpfs", "/run", MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0755")),
    ];
    let mut errors = Vec::new();
    for (fstype, target, flags, data) in table {
        if let Err(e) = std::fs::create_dir_all(target) {
            errors.push(format!("mkdir {target}: {e}"));
            continue;
        }
        if is_mount_point(target) {
            continue; // e.g. mounted by the kernel or a test init before us
        }
        if let Err(e) = mount(Some(fstype), target, Some(fstype), flags, data) {
            // EBUSY: already mounted, which is fine.
            if e != nix::errno::Errno::EBUSY {
                errors.push(format!("mount {fstype} on {target}: {e}"));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Whether something is mounted at `target` (per /proc/self/mountinfo; false
/// while /proc itself is not mounted).
fn is_mount_point(target: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|m| m.lines().any(|l| l.split(' ').nth(4) == Some(target)))
        .unwrap_or(false)
}

/// The vsock port from `hull.agent_port=N` on the kernel command line.
pub fn agent_port(cmdline: &str) -> Result<u32, String> {
    Ok(port_param(cmdline, CMDLINE_AGENT_PORT)?.unwrap_or(DEFAULT_AGENT_PORT))
}

/// The STDIO vsock port from `hull.stdio_port=N` on the kernel command line.
pub fn stdio_port(cmdline: &str) -> Result<u32, String> {
    Ok(port_param(cmdline, CMDLINE_STDIO_PORT)?.unwrap_or(DEFAULT_STDIO_PORT))
}

/// The host port to announce readiness to (`hull.notify_port=N`), if any.
pub fn notify_port(cmdline: &str) -> Result<Option<u32>, String> {
    port_param(cmdline, CMDLINE_NOTIFY_PORT)
}

fn port_param(cmdline: &str, key: &str) -> Result<Option<u32>, String> {
    for word in cmdline.split_whitespace() {
        if let Some(v) = word.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            return v
                .parse::<u32>()
                .map(Some)
                .map_err(|_| format!("{key}={v:?} on the kernel command line is not a port number"));
        }
    }
    Ok(None)
}

pub fn power_off() {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    loop {
        std::thread::sleep(Duration::from_secs(60));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_from_cmdline() {
        assert_eq!(agent_port("console=ttyS0 quiet"), Ok(DEFAULT_AGENT_PORT));
        assert_eq!(agent_port("a hull.agent_port=5000 b"), Ok(5000));
        let err = agent_port("hull.agent_port=http").unwrap_err();
        assert!(err.contains("hull.agent_port=\"http\""), "{err}");
        assert_eq!(notify_port("quiet"), Ok(None));
        assert_eq!(notify_port("hull.notify_port=1023"), Ok(Some(1023)));
        assert!(notify_port("hull.notify_port=-1").is_err());
        assert_eq!(stdio_port("quiet"), Ok(DEFAULT_STDIO_PORT));
        assert_eq!(stdio_port("hull.stdio_port=2000 hull.agent_port=5"), Ok(2000));
        assert!(stdio_port("hull.stdio_port=x").unwrap_err().contains("hull.stdio_port"));
    }

    #[test]
    fn mountinfo_lookup() {
        assert!(is_mount_point("/proc"));
        assert!(!is_mount_point("/proc/self"));
    }
}
