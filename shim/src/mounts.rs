//! Host mounts: read-only bind mounts of image layers (and volumes) into the
//! pod's virtio-fs shared directory, the mount table, unmounting everything
//! below a directory, and removing a directory without ever crossing into a
//! mount (a layer bind mount left behind must never lose containerd's files).

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Decodes the octal escapes of /proc/self/mountinfo (`\040` for a space...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Mount points listed in mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<PathBuf> {
    text.lines().filter_map(|l| l.split(' ').nth(4)).map(|p| PathBuf::from(unescape(p))).collect()
}

/// This thread's mount points at or below `dir`, deepest first (the
/// calling thread's mount namespace: tests run in private ones).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
    let mut v: Vec<PathBuf> = parse_mountinfo(&text).into_iter().filter(|m| m.starts_with(dir)).collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Unmounts everything at or below `dir`, deepest first (a busy mount is
/// detached). Err if something is still mounted afterwards.
pub fn unmount_all_under(dir: &Path) -> Result<(), String> {
    // Stacked mounts show up once per layer: repeat until the table is clean.
    for _ in 0..8 {
        let mounts = mounts_under(dir);
        if mounts.is_empty() {
            return Ok(());
        }
        for m in mounts {
            match umount2(&m, MntFlags::UMOUNT_NOFOLLOW) {
                Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
                Err(_) => {
                    let _ = umount2(&m, MntFlags::MNT_DETACH | MntFlags::UMOUNT_NOFOLLOW);
                }
            }
        }
    }
    let left = mounts_under(dir);
    if left.is_empty() {
        Ok(())
    } else {
        Err(format!("still mounted: {}", left.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")))
    }
}

/// Bind-mounts `src` on `dst` (which must exist: a directory for a directory,
/// a file for a file), then makes it read-only, nosuid, nodev unless
/// `writable`. `recursive` takes submounts along (rbind).
pub fn bind(src: &Path, dst: &Path, writable: bool, recursive: bool) -> Result<(), String> {
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(src), dst, None::<&str>, flags, None::<&str>)
        .map_err(|e| format!("bind mount {} on {}: {e}", src.display(), dst.display()))?;
    let mut re = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !writable {
        re |= MsFlags::MS_RDONLY;
    }
    if let Err(e) = mount(None::<&str>, dst, None::<&str>, re, None::<&str>) {
        let _ = umount2(dst, MntFlags::MNT_DETACH);
        return Err(format!("remount {} {}: {e}", dst.display(), if writable { "nosuid,nodev" } else { "read-only" }));
    }
    Ok(())
}

/// Mounts a small private tmpfs on `dir`: the root of a pod's shared
/// directory. Private, so the layer and volume mounts below it do not
/// propagate to other mount namespaces; small, so a guest writing to the
/// share's root cannot fill the host's memory.
pub fn mount_shared_root(dir: &Path) -> Result<(), String> {
    mount(
        Some("hull-shared"),
        dir,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=4m,nr_inodes=65536"),
    )
    .map_err(|e| format!("mount tmpfs on {}: {e}", dir.display()))?;
    mount(None::<&str>, dir, None::<&str>, MsFlags::MS_PRIVATE, None::<&str>).map_err(|e| {
        let _ = umount2(dir, MntFlags::MNT_DETACH);
        format!("make {} private: {e}", dir.display())
    })
}

/// Removes `dir` recursively after checking that nothing is mounted at or
/// below it, and without ever descending into another file system. A
/// missing `dir` is fine.
pub fn remove_dir_safely(dir: &Path) -> Result<(), String> {
    let meta = match fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    };
    let left = mounts_under(dir);
    if !left.is_empty() {
        return Err(format!(
            "not removing {}: still mounted: {}",
            dir.display(),
            left.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
        ));
    }
    if !meta.is_dir() {
        return fs::remove_file(dir).map_err(|e| format!("remove {}: {e}", dir.display()));
    }
    remove_tree(dir, meta.dev()).map_err(|e| format!("remove {}: {e}", dir.display()))
}

fn remove_tree(dir: &Path, dev: u64) -> io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        let m = fs::symlink_metadata(&p)?;
        if m.is_dir() {
            if m.dev() != dev {
                return Err(io::Error::other(format!("{} is on another file system", p.display())));
            }
            remove_tree(&p, dev)?;
        } else {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
            }
        }
    }
    match fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths() {
        let text = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    40 22 0:45 / /run/hull/a\\040b/shared rw - tmpfs hull-shared rw\n\
                    41 40 8:1 /snap /run/hull/a\\040b/shared/c/layers/0 ro - ext4 /dev/sda1 rw\n";
        assert_eq!(
            parse_mountinfo(text),
            vec![
                PathBuf::from("/"),
                PathBuf::from("/run/hull/a b/shared"),
                PathBuf::from("/run/hull/a b/shared/c/layers/0")
            ]
        );
        assert_eq!(unescape("a\\134b\\011"), "a\\b\t");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn removes_plain_trees() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("sb");
        fs::create_dir_all(t.join("shared/c1/layers/0")).unwrap();
        fs::write(t.join("console.log"), "x").unwrap();
        std::os::unix::fs::symlink("/etc", t.join("link")).unwrap();
        remove_dir_safely(&t).unwrap();
        assert!(!t.exists());
        assert!(Path::new("/etc").exists());
        remove_dir_safely(&t).unwrap();
    }

    #[test]
    fn nothing_mounted_under_a_fresh_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(mounts_under(dir.path()).is_empty());
        unmount_all_under(dir.path()).unwrap();
        // "/" itself is mounted: the check must see it.
        assert!(!mounts_under(Path::new("/")).is_empty());
    }
}
