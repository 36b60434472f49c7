//! What PID 1 does before serving: pseudo file systems, zombie reaping, config.

use hull_agent_api::{CMDLINE_AGENT_PORT, CMDLINE_NOTIFY_PORT, DEFAULT_AGENT_PORT};
use nix::mount::{mount, MsFlags};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;
use std::time::Duration;

/// Mounts /proc, /sys and /dev (devtmpfs is not auto-mounted on an initramfs root).
pub fn mount_pseudo_filesystems() -> Result<(), String> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let table: [(&str, &str, MsFlags); 3] =
        [("proc", "/proc", nodev), ("sysfs", "/sys", nodev), ("devtmpfs", "/dev", MsFlags::MS_NOSUID)];
    let mut errors = Vec::new();
    for (fstype, target, flags) in table {
        let _ = std::fs::create_dir_all(target);
        if let Err(e) = mount(Some(fstype), target, Some(fstype), flags, None::<&str>) {
            // EBUSY: already mounted (e.g. by the kernel), which is fine.
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

/// Orphans are re-parented to PID 1; reap them so they do not pile up as zombies.
pub fn spawn_reaper() {
    std::thread::spawn(|| loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::__WALL)) {
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    });
}

/// The vsock port from `hull.agent_port=N` on the kernel command line.
pub fn agent_port(cmdline: &str) -> Result<u32, String> {
    Ok(port_param(cmdline, CMDLINE_AGENT_PORT)?.unwrap_or(DEFAULT_AGENT_PORT))
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
        assert_eq!(notify_port("quiet"), Ok(None));
        assert_eq!(notify_port("hull.notify_port=1023"), Ok(Some(1023)));
        assert!(notify_port("hull.notify_port=-1").is_err());
    }
}
