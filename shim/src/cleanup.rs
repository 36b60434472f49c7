//! Cleaning up after a shim that is gone: the `delete` shim command, and a
//! pod directory found left over when a pod starts.
//!
//! containerd runs `containerd-shim-hull-v2 -id <container> -bundle <dir> delete`
//! whenever its connection to a shim closes — after a crash, but also after
//! every normal task delete (one shim serves a whole pod, so the pod may
//! still be running). So: if the pod's shim is alive, nothing is touched;
//! otherwise hull-vmm and virtiofsd are killed by their pid files (only if
//! that pid still runs a command line naming this pod's directory),
//! everything under the directory is unmounted and the directory removed.

use crate::config::Config;
use crate::sandbox::{is_live_shim, read_pid, remove_state_dir, SandboxPaths};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::path::Path;
use std::time::{Duration, Instant};

/// Is `pid` running (not a zombie)?
fn running(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name.
        Ok(s) => s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"),
        Err(_) => false,
    }
}

/// Whether `pid`'s command line mentions `dir` (so it is the pod's process,
/// not an unrelated one that reused the pid).
fn belongs_to(pid: i32, dir: &Path) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
    cmdline.contains(&*dir.to_string_lossy())
}

/// Stops the process named by `<dir>/<what>.pid` (SIGTERM, then SIGKILL).
/// Returns what was done, for the log.
fn stop_by_pid_file(paths: &SandboxPaths, what: &str) -> Option<String> {
    let pid = read_pid(&paths.pid_file(what))?;
    if pid <= 0 || !running(pid) || !belongs_to(pid, &paths.dir) {
        return None;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let t = Instant::now();
    while running(pid) && t.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(20));
    }
    if running(pid) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let t = Instant::now();
        while running(pid) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        return Some(format!("killed {what} (pid {pid})"));
    }
    Some(format!("stopped {what} (pid {pid})"))
}

/// Cleans up a pod directory whose shim is gone (and the pod's host cgroup
/// under `cgroup_parent`). Returns what was done.
pub fn cleanup_sandbox_dir(dir: &Path, cgroup_parent: &str) -> Vec<String> {
    let paths = SandboxPaths::new(dir.to_path_buf());
    let mut done = Vec::new();
    // hull-vmm first: its exit ends virtiofsd's vhost-user connection.
    for what in ["hull-vmm", "virtiofsd"] {
        if let Some(d) = stop_by_pid_file(&paths, what) {
            done.push(d);
        }
    }
    if let Some(pod_id) = dir.file_name().and_then(|n| n.to_str()) {
        let k8s = std::fs::read_to_string(dir.join(crate::sandbox::K8S_CGROUP_FILE)).ok();
        match crate::cgroups::cleanup_pod_cgroup(cgroup_parent, pod_id, k8s.as_deref().map(str::trim)) {
            Ok(d) => done.extend(d),
            Err(e) => done.push(format!("pod cgroup: {e}")),
        }
    }
    if dir.exists() {
        remove_state_dir(dir);
        done.push(format!("removed {}", dir.display()));
    }
    done
}

/// What the `delete` command does for container `id` of bundle `bundle`.
/// Returns what was done, for the log.
pub fn delete_command(cfg: &Config, id: &str, bundle: &Path) -> Vec<String> {
    let annotations = crate::spec::bundle_annotations(bundle);
    let sandbox_id = crate::pod::grouping(id, &annotations);
    if let Err(e) = hull_agent_api::validate::check_id("sandbox id", &sandbox_id) {
        return vec![format!("not cleaning up: {e}")];
    }
    let dir = cfg.sandbox_dir(&sandbox_id);
    if !dir.exists() {
        return Vec::new();
    }
    if let Some(pid) = read_pid(&SandboxPaths::new(dir.clone()).pid_file("shim")) {
        if is_live_shim(pid) && pid as u32 != std::process::id() {
            return vec![format!("pod {sandbox_id}: its shim (pid {pid}) is running; nothing to clean up")];
        }
    }
    cleanup_sandbox_dir(&dir, &cfg.paths.cgroup_parent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::process::{Command, Stdio};

    /// A stand-in for hull-vmm or virtiofsd: its command line names the pod
    /// directory; `stubborn` ignores SIGTERM.
    fn fake(dir: &Path, stubborn: bool) -> std::process::Child {
        use std::io::Read;
        // It says "ready" once its TERM disposition is in place: a SIGTERM
        // sent before `trap` ran would kill even the stubborn one.
        let script = if stubborn {
            "trap '' TERM; echo ready; while :; do sleep 0.05; done"
        } else {
            "echo ready; while :; do sleep 0.05; done"
        };
        let mut c = Command::new("sh")
            .args(["-c", script, "fake"])
            .arg(dir.join("api.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = [0u8; 6];
        c.stdout.take().unwrap().read_exact(&mut ready).unwrap();
        assert_eq!(&ready, b"ready\n");
        assert!(belongs_to(c.id() as i32, dir), "stand-in's command line does not name the pod");
        c
    }

    fn gone(c: &mut std::process::Child) -> bool {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if c.try_wait().unwrap().is_some() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn cleans_a_dead_shims_pod() {
        crate::rootfs::tests::in_private_mount_ns(|| {
            let root = tempfile::tempdir().unwrap();
            let cfg = Config {
                paths: crate::config::Paths { state_dir: root.path().to_path_buf(), ..Default::default() },
                ..Default::default()
            };
            let dir = cfg.sandbox_dir("sb1");
            let paths = SandboxPaths::new(dir.clone());
            fs::create_dir_all(paths.shared().join("c1/layers/0")).unwrap();
            fs::create_dir_all(paths.disks()).unwrap();
            fs::write(paths.disk_image("hullrw0"), "disk").unwrap();
            fs::write(paths.console(), "console").unwrap();
            // A layer bind mount, as a live shim would have made.
            let layer = root.path().join("layer");
            fs::create_dir(&layer).unwrap();
            fs::write(layer.join("keep.txt"), "image data").unwrap();
            crate::mounts::mount_shared_root(&paths.shared()).unwrap();
            fs::create_dir_all(paths.shared().join("c1/layers/0")).unwrap();
            crate::mounts::bind(&layer, &paths.shared().join("c1/layers/0"), false, false).unwrap();

            let mut vmm = fake(&dir, false);
            let mut vfs = fake(&dir, true);
            // An unrelated process whose pid is in a pid file must survive.
            let mut other = Command::new("sleep").arg("30").spawn().unwrap();
            fs::write(paths.pid_file("hull-vmm"), vmm.id().to_string()).unwrap();
            fs::write(paths.pid_file("virtiofsd"), vfs.id().to_string()).unwrap();
            // The shim is dead: its pid file names a process that is not a shim.
            fs::write(paths.pid_file("shim"), other.id().to_string()).unwrap();

            // A bundle whose annotations put container c2 in pod sb1.
            let bundle = root.path().join("bundle");
            fs::create_dir(&bundle).unwrap();
            fs::write(
                bundle.join("config.json"),
                r#"{"annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb1"}}"#,
            )
            .unwrap();

            let done = delete_command(&cfg, "c2", &bundle);
            assert!(gone(&mut vmm), "hull-vmm stand-in still running");
            assert!(gone(&mut vfs), "virtiofsd stand-in still running");
            assert!(done.iter().any(|d| d.starts_with("stopped hull-vmm")), "{done:?}");
            assert!(done.iter().any(|d| d.starts_with("killed virtiofsd")), "{done:?}");
            assert!(!dir.exists(), "{done:?}");
            assert!(crate::mounts::mounts_under(root.path()).is_empty());
            assert_eq!(fs::read_to_string(layer.join("keep.txt")).unwrap(), "image data");
            assert!(other.try_wait().unwrap().is_none(), "an unrelated process was killed");
            other.kill().unwrap();
            other.wait().unwrap();

            // Nothing left: a second delete is a no-op.
            assert!(delete_command(&cfg, "c2", &bundle).is_empty());
        });
    }

    #[test]
    fn leaves_a_live_shims_pod_alone() {
        let root = tempfile::tempdir().unwrap();
        let cfg = Config {
            paths: crate::config::Paths { state_dir: root.path().to_path_buf(), ..Default::default() },
            ..Default::default()
        };
        let dir = cfg.sandbox_dir("c1");
        fs::create_dir_all(&dir).unwrap();
        // A live process named like the shim.
        let exe = root.path().join("containerd-shim-hull-v2");
        fs::copy("/bin/sleep", &exe).unwrap();
        let mut shim = Command::new(&exe).arg("30").spawn().unwrap();
        fs::write(SandboxPaths::new(dir.clone()).pid_file("shim"), shim.id().to_string()).unwrap();
        let done = delete_command(&cfg, "c1", root.path());
        assert!(done[0].contains("is running"), "{done:?}");
        assert!(dir.exists());
        shim.kill().unwrap();
        shim.wait().unwrap();
        // Now it is dead: the directory goes.
        delete_command(&cfg, "c1", root.path());
        assert!(!dir.exists());
    }

    #[test]
    fn refuses_path_tricks_in_annotations() {
        let root = tempfile::tempdir().unwrap();
        let cfg = Config {
            paths: crate::config::Paths { state_dir: root.path().join("state"), ..Default::default() },
            ..Default::default()
        };
        let victim = root.path().join("victim");
        fs::create_dir(&victim).unwrap();
        let bundle = root.path().join("bundle");
        fs::create_dir(&bundle).unwrap();
        fs::write(
            bundle.join("config.json"),
            r#"{"annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "../victim"}}"#,
        )
        .unwrap();
        let done = delete_command(&cfg, "c1", &bundle);
        assert!(done[0].contains("not cleaning up"), "{done:?}");
        assert!(victim.exists());
    }
}
