//! A container's root file system: the mounts containerd passes in
//! CreateTaskRequest.rootfs become read-only layer directories in the pod's
//! virtio-fs shared directory (`shared/<container id>/layers/<n>`, lowest
//! layer first), which the agent stacks under an overlayfs whose upper layer
//! is the container's own disk.
//!
//! containerd's overlay snapshotter gives one `overlay` mount whose
//! `lowerdir=` lists the layers topmost first (its `upperdir`/`workdir` are
//! ignored: writes go to the container's virtio-blk disk); the native
//! snapshotter or a single-layer view gives a `bind` mount.

use crate::mounts;
use std::fs;
use std::path::{Path, PathBuf};

/// One mount of CreateTaskRequest.rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootfsMount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Splits an overlayfs `lowerdir=` value on `:`, honoring `\:` and `\\`.
fn split_lowerdir(v: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    out.last_mut().unwrap().push(n);
                }
            }
            ':' => out.push(String::new()),
            c => out.last_mut().unwrap().push(c),
        }
    }
    out
}

/// The layer directories of a container, lowest first. `bundle_rootfs` is
/// used when containerd passed no mount (the bundle carries its own rootfs).
pub fn layer_dirs(mounts: &[RootfsMount], bundle_rootfs: &Path) -> Result<Vec<PathBuf>, String> {
    let dirs: Vec<PathBuf> = match mounts {
        [] => {
            if !bundle_rootfs.is_dir() {
                return Err(format!(
                    "no rootfs mounts were given and the bundle has no rootfs directory ({})",
                    bundle_rootfs.display()
                ));
            }
            vec![bundle_rootfs.to_path_buf()]
        }
        [m] if m.kind == "overlay" => {
            let lower: Vec<&str> = m.options.iter().filter_map(|o| o.strip_prefix("lowerdir=")).collect();
            let [lower] = lower[..] else {
                return Err(format!("overlay rootfs mount needs exactly one lowerdir= option, got {:?}", m.options));
            };
            let mut dirs: Vec<PathBuf> = split_lowerdir(lower).into_iter().map(PathBuf::from).collect();
            if dirs.iter().any(|d| d.as_os_str().is_empty()) {
                return Err(format!("overlay rootfs mount: empty directory in lowerdir={lower}"));
            }
            // overlayfs lists the topmost layer first; the agent wants the lowest first.
            dirs.reverse();
            dirs
        }
        [m] if m.kind == "bind" || m.kind == "rbind" || m.options.iter().any(|o| o == "bind" || o == "rbind") => {
            if m.source.is_empty() {
                return Err("bind rootfs mount without a source".into());
            }
            vec![PathBuf::from(&m.source)]
        }
        [m] => {
            return Err(format!(
                "rootfs mount of type {:?} is not supported (hull needs containerd's overlayfs or native snapshotter)",
                m.kind
            ))
        }
        _ => return Err(format!("{} rootfs mounts given: hull supports exactly one", mounts.len())),
    };
    if dirs.len() > hull_agent_api::validate::MAX_LAYERS {
        return Err(format!("{} layers: at most {} are supported", dirs.len(), hull_agent_api::validate::MAX_LAYERS));
    }
    for d in &dirs {
        if !d.is_absolute() {
            return Err(format!("layer directory {} is not an absolute path", d.display()));
        }
        match fs::metadata(d) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(format!("layer directory {} is not a directory", d.display())),
            Err(e) => return Err(format!("layer directory {} is missing: {e}", d.display())),
        }
    }
    Ok(dirs)
}

/// `shared/<cid>`: everything of one container in the shared directory.
pub fn container_dir(shared: &Path, cid: &str) -> PathBuf {
    shared.join(cid)
}

/// Bind-mounts each layer read-only at `shared/<cid>/layers/<n>` and returns
/// the paths relative to `shared` (what CreateContainerRequest.layers
/// wants). On error, whatever was mounted is undone.
pub fn bind_layers(shared: &Path, cid: &str, dirs: &[PathBuf]) -> Result<Vec<String>, String> {
    let base = container_dir(shared, cid).join("layers");
    fs::create_dir_all(&base).map_err(|e| format!("create {}: {e}", base.display()))?;
    let mut rel = Vec::with_capacity(dirs.len());
    for (n, d) in dirs.iter().enumerate() {
        let dst = base.join(n.to_string());
        let r = fs::create_dir(&dst)
            .map_err(|e| format!("create {}: {e}", dst.display()))
            .and_then(|_| mounts::bind(d, &dst, false, false));
        if let Err(e) = r {
            let _ = release(shared, cid);
            return Err(e);
        }
        rel.push(format!("{cid}/layers/{n}"));
    }
    Ok(rel)
}

/// Unmounts and removes `shared/<cid>`.
pub fn release(shared: &Path, cid: &str) -> Result<(), String> {
    let dir = container_dir(shared, cid);
    mounts::unmount_all_under(&dir)?;
    mounts::remove_dir_safely(&dir)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn m(kind: &str, source: &str, options: &[&str]) -> RootfsMount {
        RootfsMount {
            kind: kind.into(),
            source: source.into(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn layers(root: &Path, n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| {
                let d = root.join(format!("snapshots/{}/fs", i + 1));
                fs::create_dir_all(&d).unwrap();
                d
            })
            .collect()
    }

    #[test]
    fn overlay_lowerdir_is_reversed() {
        let dir = tempfile::tempdir().unwrap();
        let l = layers(dir.path(), 3);
        // containerd: topmost first (3:2:1).
        let lower = format!("lowerdir={}:{}:{}", l[2].display(), l[1].display(), l[0].display());
        let mounts = [m("overlay", "overlay", &["index=off", "workdir=/w", "upperdir=/u", &lower])];
        assert_eq!(layer_dirs(&mounts, Path::new("/nonexistent")).unwrap(), l);
    }

    #[test]
    fn lowerdir_escapes() {
        assert_eq!(split_lowerdir("/a\\:b:/c\\\\d"), vec!["/a:b".to_string(), "/c\\d".to_string()]);
        assert_eq!(split_lowerdir("/one"), vec!["/one".to_string()]);
    }

    #[test]
    fn bind_and_bundle_rootfs() {
        let dir = tempfile::tempdir().unwrap();
        let l = layers(dir.path(), 1);
        let src = l[0].display().to_string();
        assert_eq!(layer_dirs(&[m("bind", &src, &["rbind", "ro"])], Path::new("/x")).unwrap(), l);
        assert_eq!(layer_dirs(&[m("none", &src, &["rbind", "rw"])], Path::new("/x")).unwrap(), l);
        let rootfs = dir.path().join("rootfs");
        fs::create_dir(&rootfs).unwrap();
        assert_eq!(layer_dirs(&[], &rootfs).unwrap(), vec![rootfs.clone()]);
    }

    #[test]
    fn bad_rootfs_mounts() {
        let dir = tempfile::tempdir().unwrap();
        let l = layers(dir.path(), 1);
        let lower = format!("lowerdir={}", l[0].display());
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        let cases: Vec<(Vec<RootfsMount>, &str)> = vec![
            (vec![], "no rootfs mounts"),
            (vec![m("overlay", "overlay", &["upperdir=/u"])], "exactly one lowerdir"),
            (vec![m("overlay", "overlay", &["lowerdir=/a::/b"])], "empty directory"),
            (vec![m("overlay", "overlay", &["lowerdir=relative/dir"])], "not an absolute path"),
            (vec![m("overlay", "overlay", &["lowerdir=/nonexistent/layer"])], "/nonexistent/layer is missing"),
            (vec![m("overlay", "overlay", &[&format!("lowerdir={}", file.display())])], "not a directory"),
            (vec![m("bind", "", &["rbind"])], "without a source"),
            (vec![m("ext4", "/dev/sda", &[])], "\"ext4\" is not supported"),
            (vec![m("overlay", "overlay", &[&lower]), m("bind", "/x", &["bind"])], "2 rootfs mounts"),
        ];
        for (mounts, want) in cases {
            let e = layer_dirs(&mounts, &dir.path().join("no-rootfs")).unwrap_err();
            assert!(e.contains(want), "{mounts:?}: {e}");
        }
    }

    /// Runs `f` in a private mount namespace (this test thread only).
    pub(crate) fn in_private_mount_ns(f: impl FnOnce() + Send) {
        std::thread::scope(|s| {
            s.spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                    .expect("unshare(CLONE_NEWNS): mount tests need root");
                nix::mount::mount(
                    None::<&str>,
                    "/",
                    None::<&str>,
                    nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
                    None::<&str>,
                )
                .unwrap();
                f();
            })
            .join()
            .unwrap();
        });
    }

    #[test]
    fn binds_layers_read_only_and_releases_them() {
        in_private_mount_ns(|| {
            let dir = tempfile::tempdir().unwrap();
            let l = layers(dir.path(), 2);
            fs::write(l[0].join("base.txt"), "base").unwrap();
            fs::write(l[1].join("top.txt"), "top").unwrap();
            let shared = dir.path().join("shared");
            fs::create_dir(&shared).unwrap();
            mounts::mount_shared_root(&shared).unwrap();
            let rel = bind_layers(&shared, "c1", &l).unwrap();
            assert_eq!(rel, vec!["c1/layers/0".to_string(), "c1/layers/1".to_string()]);
            for r in &rel {
                hull_agent_api::validate::check_layer(r).unwrap();
            }
            assert_eq!(fs::read_to_string(shared.join("c1/layers/0/base.txt")).unwrap(), "base");
            assert_eq!(fs::read_to_string(shared.join("c1/layers/1/top.txt")).unwrap(), "top");
            let e = fs::write(shared.join("c1/layers/1/new.txt"), "x").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
            assert_eq!(mounts::mounts_under(&shared).len(), 3);
            // Removing the shared dir while layers are mounted is refused.
            assert!(mounts::remove_dir_safely(&shared).unwrap_err().contains("still mounted"));

            release(&shared, "c1").unwrap();
            assert!(!shared.join("c1").exists());
            assert_eq!(mounts::mounts_under(&shared), vec![shared.clone()]);
            // The layers themselves are untouched.
            assert_eq!(fs::read_to_string(l[0].join("base.txt")).unwrap(), "base");
            mounts::unmount_all_under(&shared).unwrap();
            mounts::remove_dir_safely(&shared).unwrap();
        });
    }

    #[test]
    fn failed_bind_undoes_earlier_layers() {
        in_private_mount_ns(|| {
            let dir = tempfile::tempdir().unwrap();
            let mut l = layers(dir.path(), 1);
            l.push(dir.path().join("vanished"));
            let shared = dir.path().join("shared");
            fs::create_dir(&shared).unwrap();
            let e = bind_layers(&shared, "c1", &l).unwrap_err();
            assert!(e.contains("vanished"), "{e}");
            assert!(mounts::mounts_under(&shared).is_empty());
            assert!(!shared.join("c1").exists());
        });
    }
}
