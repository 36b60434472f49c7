//! Guest memory backed by one file descriptor (a memfd, or a file), so it can
//! be shared with vhost-user back ends (virtiofsd) and snapshotted, and a
//! template's memory file can be mapped copy-on-write by many VMs.

use crate::arch::x86_64::layout::ram_ranges;
use crate::devices::virtio::GuestMemory;
use std::ffi::CString;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::Path;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too small: hull-vmm needs at least {MIN_MEM_MIB} MiB")]
    TooSmall(u64),
    #[error("guest memory of {0} MiB is too large")]
    TooLarge(u64),
    #[error("creating the guest memory file: {0}")]
    Create(std::io::Error),
    #[error("memory file {path}: {source}")]
    File { path: String, source: std::io::Error },
    #[error("memory file {path} has {actual} bytes, the VM needs {expected}")]
    FileSize { path: String, actual: u64, expected: u64 },
    #[error("mapping guest memory: {0}")]
    Map(String),
}

pub const MIN_MEM_MIB: u64 = 16;
const MAX_MEM_MIB: u64 = 1 << 20;

/// How the memory file is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sharing {
    /// MAP_SHARED: writes reach the file (and other mappers such as virtiofsd).
    Shared,
    /// MAP_PRIVATE: copy on write; the file's pages are shared until written.
    Private,
}

/// Creates `mem_mib` MiB of guest memory in a fresh memfd.
pub fn create_memfd(mem_mib: u64) -> Result<(GuestMemory, File), MemoryError> {
    check_size(mem_mib)?;
    let name = CString::new("hull-guest-mem").unwrap();
    // SAFETY: memfd_create with a valid C string; we take ownership of the fd.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Create(std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(mem_mib << 20).map_err(MemoryError::Create)?;
    let mem = map_file(&file, mem_mib << 20, Sharing::Shared)?;
    Ok((mem, file))
}

/// Maps an existing memory file (a snapshot's) of exactly `mem_mib` MiB.
pub fn open_file(path: &Path, mem_mib: u64, sharing: Sharing) -> Result<(GuestMemory, File), MemoryError> {
    check_size(mem_mib)?;
    let p = path.display().to_string();
    let file = File::options()
        .read(true)
        .write(sharing == Sharing::Shared)
        .open(path)
        .map_err(|source| MemoryError::File { path: p.clone(), source })?;
    let actual = file.metadata().map_err(|source| MemoryError::File { path: p.clone(), source })?.len();
    if actual != mem_mib << 20 {
        return Err(MemoryError::FileSize { path: p, actual, expected: mem_mib << 20 });
    }
    let mem = map_file(&file, mem_mib << 20, sharing)?;
    Ok((mem, file))
}

fn check_size(mem_mib: u64) -> Result<(), MemoryError> {
    if mem_mib < MIN_MEM_MIB {
        return Err(MemoryError::TooSmall(mem_mib));
    }
    if mem_mib > MAX_MEM_MIB {
        return Err(MemoryError::TooLarge(mem_mib));
    }
    Ok(())
}

fn map_file(file: &File, size: u64, sharing: Sharing) -> Result<GuestMemory, MemoryError> {
    let flags = libc::MAP_NORESERVE
        | match sharing {
            Sharing::Shared => libc::MAP_SHARED,
            Sharing::Private => libc::MAP_PRIVATE,
        };
    let mut regions = Vec::new();
    // RAM ranges are laid out back to back in the file.
    let mut file_off = 0u64;
    for (start, len) in ram_ranges(size) {
        let fo = FileOffset::new(file.try_clone().map_err(MemoryError::Create)?, file_off);
        let mapping = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_file_offset(fo)
            .build()
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| MemoryError::Map(format!("bad region at {start:#x}")))?;
        regions.push(region);
        file_off += len;
    }
    GuestMemory::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn memfd_memory_is_file_backed_and_shared() {
        let (mem, file) = create_memfd(32).unwrap();
        assert_eq!(mem.iter().count(), 1);
        let r = mem.iter().next().unwrap();
        assert!(r.file_offset().is_some());
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        let mut buf = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }

    #[test]
    fn private_mapping_does_not_write_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mem");
        std::fs::write(&p, vec![0u8; 16 << 20]).unwrap();
        let (mem, _f) = open_file(&p, 16, Sharing::Private).unwrap();
        mem.write_obj(7u8, GuestAddress(0)).unwrap();
        assert_eq!(std::fs::read(&p).unwrap()[0], 0);
        let err = open_file(&p, 32, Sharing::Private).unwrap_err().to_string();
        assert!(err.contains("needs 33554432"), "{err}");
    }

    #[test]
    fn size_limits() {
        assert!(create_memfd(1).unwrap_err().to_string().contains("too small"));
    }
}
