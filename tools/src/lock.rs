//! An exclusive advisory lock on a file, held until dropped (flock(2)).

use anyhow::{Context, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

pub struct FileLock {
    _file: File,
}

impl FileLock {
    pub fn exclusive(path: &Path) -> Result<FileLock> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; blocks until the lock is ours.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("locking {}", path.display()));
        }
        Ok(FileLock { _file: file })
    }
}
