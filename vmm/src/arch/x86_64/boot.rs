//! Loading the kernel, initramfs and command line, and writing the boot
//! information the kernel reads at its entry point.

use super::layout::*;
use super::regs::EntryMode;
use crate::devices::virtio::GuestMemory;
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{load_cmdline, BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {source}")]
    KernelOpen { path: String, source: std::io::Error },
    #[error("kernel {path}: {msg}")]
    KernelLoad { path: String, msg: String },
    #[error("initramfs {path}: {source}")]
    InitrdOpen { path: String, source: std::io::Error },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel (ends at {kernel_end:#x}); give the VM more memory")]
    InitrdTooBig { path: String, size: u64, limit: u64, kernel_end: u64 },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing boot information to guest memory: {0}")]
    Write(String),
}

/// Where the kernel starts and how to enter it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEntry {
    pub mode: EntryMode,
    pub entry: u64,
}

/// Builds a kernel command line (it also gets device announcements later).
pub fn cmdline(text: &str) -> Result<Cmdline, BootError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    c.insert_str(text).map_err(|e| BootError::Cmdline(format!("{e}: {text:?}")))?;
    Ok(c)
}

/// Loads the kernel (a vmlinux ELF with a PVH note, or a bzImage), the
/// initramfs and the command line, and writes the matching boot structures.
pub fn load(
    mem: &GuestMemory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<KernelEntry, BootError> {
    let kpath = kernel.display().to_string();
    let mut kf = File::open(kernel).map_err(|source| BootError::KernelOpen { path: kpath.clone(), source })?;
    let mut magic = [0u8; 4];
    kf.read_exact(&mut magic).map_err(|source| BootError::KernelOpen { path: kpath.clone(), source })?;
    kf.seek(SeekFrom::Start(0)).map_err(|source| BootError::KernelOpen { path: kpath.clone(), source })?;
    let load_err = |msg: String| BootError::KernelLoad { path: kpath.clone(), msg };

    let is_elf = magic == *b"\x7fELF";
    let result = if is_elf {
        Elf::load(mem, None, &mut kf, Some(GuestAddress(HIMEM_START))).map_err(|e| load_err(e.to_string()))?
    } else {
        BzImage::load(mem, None, &mut kf, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| load_err(format!("{e} (neither an ELF vmlinux nor a bzImage)")))?
    };

    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(|e| BootError::Write(e.to_string()))?;
    let cmdline_len = cmdline.as_cstring().map(|c| c.as_bytes_with_nul().len()).unwrap_or(1);

    let initrd_limit = mem.last_addr().raw_value().min(MMIO_GAP_START - 1) + 1;
    let initrd = match initrd {
        Some(p) => Some(load_initrd(mem, p, result.kernel_end, initrd_limit)?),
        None => None,
    };

    if is_elf {
        let entry = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(a) => a.raw_value(),
            _ => return Err(load_err("the ELF kernel has no PVH entry note (build it with CONFIG_PVH=y)".into())),
        };
        write_pvh_info(mem, initrd)?;
        Ok(KernelEntry { mode: EntryMode::Pvh, entry })
    } else {
        let hdr = result.setup_header.ok_or_else(|| load_err("bzImage without a setup header".into()))?;
        write_zero_page(mem, hdr, cmdline_len, initrd)?;
        // The 64-bit entry point is 0x200 past the protected-mode kernel start.
        Ok(KernelEntry { mode: EntryMode::Linux64, entry: result.kernel_load.raw_value() + 0x200 })
    }
}

/// Places the initramfs page-aligned at the top of low memory.
fn load_initrd(mem: &GuestMemory, path: &Path, kernel_end: u64, limit: u64) -> Result<(u64, u64), BootError> {
    let p = path.display().to_string();
    let mut f = File::open(path).map_err(|source| BootError::InitrdOpen { path: p.clone(), source })?;
    let size = f.metadata().map_err(|source| BootError::InitrdOpen { path: p.clone(), source })?.len();
    let addr = limit.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end && size > 0 => a,
        _ => return Err(BootError::InitrdTooBig { path: p, size, limit, kernel_end }),
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| BootError::Write(format!("initramfs {p}: {e}")))?;
    Ok((addr, size))
}

/// The memory map both boot protocols report: usable RAM minus the EBDA
/// and the legacy hole below 1 MiB.
fn e820(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    const RAM: u32 = 1;
    const RESERVED: u32 = 2;
    let mut map = vec![(0, EBDA_START, RAM), (EBDA_START, HIMEM_START - EBDA_START, RESERVED)];
    for r in mem.iter() {
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.start_addr().raw_value() + r.len();
        if end > start {
            map.push((start, end - start, RAM));
        }
    }
    map
}

fn write_pvh_info(mem: &GuestMemory, initrd: Option<(u64, u64)>) -> Result<(), BootError> {
    let w = |e: vm_memory::GuestMemoryError| BootError::Write(e.to_string());
    let map = e820(mem);
    let mut info = hvm_start_info {
        magic: 0x336e_c578, // XEN_HVM_START_MAGIC_VALUE
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry { paddr: addr, size, ..Default::default() };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_START)).map_err(w)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry { addr: *addr, size: *size, type_: *type_, reserved: 0 };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(at)).map_err(w)?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START)).map_err(w)
}

fn write_zero_page(
    mem: &GuestMemory,
    mut hdr: setup_header,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    hdr.type_of_loader = 0xff; // undefined boot loader
    hdr.boot_flag = 0xaa55;
    hdr.header = 0x5372_6448; // "HdrS"
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len as u32;
    hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = initrd {
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }
    params.hdr = hdr;
    let map = e820(mem);
    if map.len() > params.e820_table.len() {
        return Err(BootError::Write("too many e820 entries".into()));
    }
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *type_;
    }
    params.e820_entries = map.len() as u8;
    mem.write_slice(params.as_slice(), GuestAddress(ZERO_PAGE_START)).map_err(|e| BootError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem(size: u64) -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    #[test]
    fn bad_kernels_are_named() {
        let m = mem(64 << 20);
        let c = cmdline("console=ttyS0").unwrap();
        let err = load(&m, Path::new("/nonexistent/vmlinux"), None, &c).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/vmlinux"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        std::fs::write(&junk, vec![0x55u8; 8192]).unwrap();
        let err = load(&m, &junk, None, &c).unwrap_err().to_string();
        assert!(err.contains("junk") && err.contains("bzImage"), "{err}");
    }

    #[test]
    fn initrd_must_fit() {
        let m = mem(8 << 20);
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.cpio");
        std::fs::write(&big, vec![0u8; 9 << 20]).unwrap();
        let err = load_initrd(&m, &big, 2 << 20, 8 << 20).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig { .. }), "{err}");
        let small = dir.path().join("small.cpio");
        std::fs::write(&small, vec![7u8; 5000]).unwrap();
        let (addr, size) = load_initrd(&m, &small, 2 << 20, 8 << 20).unwrap();
        assert_eq!((addr % 4096, size), (0, 5000));
        assert!(addr + size <= 8 << 20);
        let got: u8 = m.read_obj(GuestAddress(addr + 4999)).unwrap();
        assert_eq!(got, 7);
    }

    #[test]
    fn e820_reserves_the_legacy_hole() {
        let m = mem(64 << 20);
        let map = e820(&m);
        assert_eq!(map[0], (0, EBDA_START, 1));
        assert_eq!(map[1].2, 2);
        assert_eq!(map[2], (HIMEM_START, (64 << 20) - HIMEM_START, 1));
    }

    /// The real guest kernel, when scripts/build.sh has built it.
    #[test]
    fn loads_the_guest_vmlinux_with_pvh() {
        let Some(k) = std::env::var_os("HULL_KERNEL") else {
            panic!("HULL_KERNEL is not set: run the tests with scripts/test.sh");
        };
        let m = mem(128 << 20);
        let c = cmdline("console=ttyS0").unwrap();
        let e = load(&m, Path::new(&k), None, &c).unwrap();
        assert_eq!(e.mode, EntryMode::Pvh);
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, 0x336e_c578);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
    }
}
