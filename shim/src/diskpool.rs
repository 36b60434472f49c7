//! The writable-layer disk pool: sparse ext4 images formatted ahead of time
//! in `<state_dir>/diskpool/`, so that formatting is never on a pod's
//! critical path.
//!
//! - A ready image is `ready-*.img`, created as `.making-<pid>-*.img` and
//!   renamed once `mkfs.ext4` succeeded (readers never see a half-made one).
//! - Taking one is a rename(2) into the pod's `disks/` directory: atomic, so
//!   any number of shim processes can take from the pool at once. Only an
//!   empty pool makes a disk synchronously (the caller logs it).
//! - Refilling runs in a background thread, serialized across shims by an
//!   flock on `.lock`; images of another size (the config changed) are
//!   discarded, and leftovers of a refill that died are swept.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone)]
pub struct DiskPool {
    dir: PathBuf,
    size_mib: u64,
    target: usize,
    mkfs: PathBuf,
}

/// Result of [`DiskPool::take`].
#[derive(Debug, PartialEq, Eq)]
pub enum Taken {
    /// Came from the pool.
    FromPool,
    /// The pool was empty: formatted on the spot.
    MadeNow,
}

/// `mkfs.ext4` on PATH or in the sbin directories (containerd's PATH may lack them).
pub fn find_mkfs() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
}

static SEQ: AtomicU64 = AtomicU64::new(0);

fn unique() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed))
}

fn pid_alive(pid: i32) -> bool {
    pid > 0 && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// How often [`DiskPool::take`] makes an image before giving up.
const MAKE_ATTEMPTS: usize = 8;

impl DiskPool {
    pub fn new(dir: PathBuf, size_mib: u64, target: usize) -> Result<DiskPool, String> {
        let mkfs = find_mkfs().ok_or("mkfs.ext4 not found (install e2fsprogs)")?;
        Ok(DiskPool { dir, size_mib, target, mkfs })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn size_bytes(&self) -> u64 {
        self.size_mib << 20
    }

    fn ensure_dir(&self) -> Result<(), String> {
        fs::create_dir_all(&self.dir).map_err(|e| format!("create {}: {e}", self.dir.display()))
    }

    /// Formats one image and adds it to the pool; returns its path.
    pub fn make_one(&self) -> Result<PathBuf, String> {
        self.ensure_dir()?;
        let id = unique();
        let tmp = self.dir.join(format!(".making-{id}.img"));
        let ready = self.dir.join(format!("ready-{id}.img"));
        let r = (|| {
            let f = File::create(&tmp).map_err(|e| format!("create {}: {e}", tmp.display()))?;
            f.set_len(self.size_bytes()).map_err(|e| format!("size {}: {e}", tmp.display()))?;
            drop(f);
            // -m 0: no blocks reserved for root (a container layer, not a
            // system disk). No journal: the layer is thrown away with its
            // container and never outlives a guest crash, so there is
            // nothing to recover; without one the guest runs no jbd2 thread
            // and keeps no journal buffers per container. Inode tables are
            // marked zeroed by mkfs's discard (hole punching), so the guest
            // has no lazy init to do.
            let out = Command::new(&self.mkfs)
                .args(["-q", "-F", "-m", "0", "-L", "hull-rw", "-O", "^has_journal"])
                .arg(&tmp)
                .output()
                .map_err(|e| format!("run {}: {e}", self.mkfs.display()))?;
            if !out.status.success() {
                return Err(format!(
                    "{} {}: {}: {}",
                    self.mkfs.display(),
                    tmp.display(),
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            fs::rename(&tmp, &ready).map_err(|e| format!("rename {}: {e}", tmp.display()))
        })();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r.map(|_| ready)
    }

    /// Ready images of the configured size (others are removed).
    pub fn ready(&self) -> Vec<PathBuf> {
        let Ok(rd) = fs::read_dir(&self.dir) else { return Vec::new() };
        let mut v = Vec::new();
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !(name.starts_with("ready-") && name.ends_with(".img")) {
                continue;
            }
            let p = e.path();
            match fs::metadata(&p) {
                Ok(m) if m.len() == self.size_bytes() => v.push(p),
                Ok(_) => {
                    let _ = fs::remove_file(&p);
                }
                Err(_) => {}
            }
        }
        v.sort();
        v
    }

    /// Moves a ready image to `dest` (same file system), making one first
    /// if the pool is empty.
    pub fn take(&self, dest: &Path) -> Result<Taken, String> {
        for p in self.ready() {
            match fs::rename(&p, dest) {
                Ok(()) => return Ok(Taken::FromPool),
                // Another shim took it first.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("move {} to {}: {e}", p.display(), dest.display())),
            }
        }
        // A made image is in the pool as soon as it is ready, so under a
        // burst another shim may take it first: make another.
        for _ in 0..MAKE_ATTEMPTS {
            let p = self.make_one()?;
            match fs::rename(&p, dest) {
                Ok(()) => return Ok(Taken::MadeNow),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(format!("move {} to {}: {e}", p.display(), dest.display())),
            }
        }
        Err(format!("disk pool {}: every image made for this pod was taken by another", self.dir.display()))
    }

    /// Brings the pool up to its target size; returns how many images were
    /// made. Holds an exclusive flock on `.lock` meanwhile.
    pub fn refill(&self) -> Result<usize, String> {
        self.ensure_dir()?;
        let lock_path = self.dir.join(".lock");
        let lock = File::create(&lock_path).map_err(|e| format!("create {}: {e}", lock_path.display()))?;
        // SAFETY: flock on an fd we own; released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!("flock {}: {}", lock_path.display(), io::Error::last_os_error()));
        }
        self.sweep();
        let mut made = 0;
        while self.ready().len() < self.target {
            self.make_one()?;
            made += 1;
        }
        Ok(made)
    }

    /// Removes `.making-<pid>-*` leftovers of processes that are gone.
    fn sweep(&self) {
        let Ok(rd) = fs::read_dir(&self.dir) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(".making-") {
                let pid: i32 = rest.split('-').next().and_then(|p| p.parse().ok()).unwrap_or(0);
                if !pid_alive(pid) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }

    /// Refills in a background thread; errors are logged.
    pub fn refill_in_background(&self) -> Option<std::thread::JoinHandle<()>> {
        let pool = self.clone();
        crate::background::spawn("disk-pool-refill", move || match pool.refill() {
            Ok(0) => {}
            Ok(n) => log::debug!("disk pool {}: formatted {n} disk(s)", pool.dir.display()),
            Err(e) => log::warn!("disk pool {}: refill failed: {e}", pool.dir.display()),
        })
    }
}

/// Gives a used image's blocks back to the file system (it is never used
/// again: a slot is not reused within a pod).
pub fn discard(image: &Path) {
    if let Ok(f) = fs::OpenOptions::new().write(true).open(image) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0) as libc::off_t;
        // SAFETY: plain fallocate on an fd we own.
        unsafe {
            libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, 0, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn ext4_magic(p: &Path) -> bool {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 2];
        File::open(p).unwrap().read_exact_at(&mut b, 1024 + 0x38).unwrap();
        b == [0x53, 0xef]
    }

    /// s_feature_compat & EXT4_FEATURE_COMPAT_HAS_JOURNAL.
    fn has_journal(p: &Path) -> bool {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 4];
        File::open(p).unwrap().read_exact_at(&mut b, 1024 + 0x5C).unwrap();
        u32::from_le_bytes(b) & 0x4 != 0
    }

    #[test]
    fn make_take_refill() {
        let dir = tempfile::tempdir().unwrap();
        let pool = DiskPool::new(dir.path().join("diskpool"), 64, 2).unwrap();
        assert!(pool.ready().is_empty());

        // An empty pool formats synchronously.
        let pod = dir.path().join("pod");
        fs::create_dir(&pod).unwrap();
        assert_eq!(pool.take(&pod.join("d0.img")).unwrap(), Taken::MadeNow);
        let m = fs::metadata(pod.join("d0.img")).unwrap();
        assert_eq!(m.len(), 64 << 20);
        assert!(m.blocks() * 512 < 16 << 20, "the image is sparse: {} bytes used", m.blocks() * 512);
        assert!(ext4_magic(&pod.join("d0.img")));
        assert!(!has_journal(&pod.join("d0.img")), "a throw-away layer needs no journal");

        assert_eq!(pool.refill().unwrap(), 2);
        assert_eq!(pool.ready().len(), 2);
        assert_eq!(pool.refill().unwrap(), 0);
        assert_eq!(pool.take(&pod.join("d1.img")).unwrap(), Taken::FromPool);
        assert!(ext4_magic(&pod.join("d1.img")));
        assert_eq!(pool.ready().len(), 1);
        pool.refill_in_background().unwrap().join().unwrap();
        assert_eq!(pool.ready().len(), 2);
        // No temporary files left.
        let names: Vec<String> =
            fs::read_dir(pool.dir()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert!(names.iter().all(|n| n.starts_with("ready-") || n == ".lock"), "{names:?}");
    }

    #[test]
    fn wrong_size_and_stale_leftovers_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let pool = DiskPool::new(dir.path().to_path_buf(), 32, 1).unwrap();
        let old = DiskPool::new(dir.path().to_path_buf(), 48, 1).unwrap();
        old.make_one().unwrap();
        fs::write(dir.path().join(".making-999999999-1-0.img"), "half").unwrap();
        let mine = dir.path().join(format!(".making-{}-1-0.img", std::process::id()));
        fs::write(&mine, "in progress").unwrap();
        assert!(pool.ready().is_empty(), "a 48 MiB image is not a 32 MiB one");
        assert_eq!(pool.refill().unwrap(), 1);
        assert!(!dir.path().join(".making-999999999-1-0.img").exists());
        assert!(mine.exists(), "a live process's image in progress stays");
    }

    #[test]
    fn concurrent_takers_never_share_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let pool = DiskPool::new(dir.path().join("pool"), 32, 4).unwrap();
        pool.refill().unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let (pool, out) = (pool.clone(), out.clone());
                std::thread::spawn(move || pool.take(&out.join(format!("{i}.img"))).unwrap())
            })
            .collect();
        let results: Vec<Taken> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(results.iter().all(|t| *t == Taken::FromPool), "{results:?}");
        assert_eq!(fs::read_dir(&out).unwrap().count(), 4);
        assert!(pool.ready().is_empty());
    }

    #[test]
    fn discard_frees_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        fs::write(&p, vec![7u8; 1 << 20]).unwrap();
        discard(&p);
        let m = fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 1 << 20);
        assert!(m.blocks() * 512 < 1 << 20);
    }
}
