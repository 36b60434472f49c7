//! Where things are in guest physical memory.

/// Boot GDT and IDT.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, its module list and memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// The Linux zero page (`boot_params`) for bzImage boot.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit entry (first 1 GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel may be loaded from (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole: virtio-mmio devices, IOAPIC, LAPIC. RAM skips it.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows: one 4 KiB page each from the gap start.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IRQ lines: 4 is the serial port, virtio devices from 5 up to 23 (IOAPIC pins).
pub const SERIAL_IRQ: u32 = 4;
pub const FIRST_VIRTIO_IRQ: u32 = 5;
pub const LAST_IRQ: u32 = 23;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// KVM's TSS (3 pages) and identity map page just below the IOAPIC.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;

/// The guest RAM ranges (start, size) for `mem_size` bytes of memory: below
/// the MMIO gap first, the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![(0, MMIO_GAP_START), (MMIO_GAP_END, mem_size - MMIO_GAP_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_skips_the_mmio_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, MMIO_GAP_START), (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)]);
    }
}
