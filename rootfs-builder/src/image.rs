//! Test image content: a busybox root file system layer as a directory (what
//! containerd's overlay snapshotter would have unpacked), so tests and
//! benchmarks have an image without a registry.

use anyhow::{bail, Context, Result};
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

const DIRS: &[&str] =
    &["bin", "dev", "etc", "proc", "sys", "tmp", "root", "run", "var", "home", "usr/bin", "usr/sbin", "sbin"];

/// Writes a busybox layer into `out` (which must not exist): /bin/busybox,
/// a symlink per applet, /etc/passwd and /etc/group.
pub fn busybox_layer(busybox: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        bail!("{} already exists", out.display());
    }
    let list = Command::new(busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("running {} --list", busybox.display()))?;
    if !list.status.success() {
        bail!("{} --list failed", busybox.display());
    }
    for d in DIRS {
        std::fs::create_dir_all(out.join(d))?;
    }
    std::fs::copy(busybox, out.join("bin/busybox")).with_context(|| format!("copying {}", busybox.display()))?;
    for applet in
        String::from_utf8_lossy(&list.stdout).lines().map(str::trim).filter(|a| !a.is_empty() && *a != "busybox")
    {
        if applet.contains('/') || applet.starts_with('.') {
            continue;
        }
        symlink("busybox", out.join("bin").join(applet))?;
    }
    std::fs::write(
        out.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(out.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    std::fs::set_permissions(out.join("tmp"), std::os::unix::fs::PermissionsExt::from_mode(0o1777))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busybox_layer_has_a_shell() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("layer");
        busybox_layer(Path::new("/bin/busybox"), &out).unwrap();
        assert_eq!(std::fs::read_link(out.join("bin/sh")).unwrap(), Path::new("busybox"));
        let o = Command::new(out.join("bin/sh")).args(["-c", "echo ok"]).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&o.stdout), "ok\n");
        assert!(busybox_layer(Path::new("/bin/busybox"), &out).unwrap_err().to_string().contains("already exists"));
    }
}
