//! Boot CPU state: segments and GDT, identity page tables, registers, FPU,
//! MSRs and the local APIC's LINT pins.

use super::layout::*;
use crate::devices::virtio::GuestMemory;
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use vm_memory::{Bytes, GuestAddress};

/// How the kernel is entered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, %ebx = hvm_start_info.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, identity paging, %rsi = zero page.
    Linux64,
}

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("writing boot structures to guest memory at {0:#x}")]
    Write(u64),
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// A GDT entry from flags, base and limit.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn segment(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0xffffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Sets up segments (and for 64-bit entry, paging) and writes the GDT/IDT
/// and page tables into guest memory.
pub fn boot_sregs(mem: &GuestMemory, mode: EntryMode, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    let code = match mode {
        EntryMode::Pvh => gdt_entry(0xc09b, 0, 0xfffff),     // 32-bit code
        EntryMode::Linux64 => gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
    };
    let gdt = [gdt_entry(0, 0, 0), code, gdt_entry(0xc093, 0, 0xfffff), gdt_entry(0x808b, 0, 0xfffff)];
    for (i, e) in gdt.iter().enumerate() {
        let addr = BOOT_GDT_START + i as u64 * 8;
        mem.write_obj(*e, GuestAddress(addr)).map_err(|_| RegsError::Write(addr))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(|_| RegsError::Write(BOOT_IDT_START))?;

    let (code_seg, data_seg, tss_seg) = (segment(gdt[1], 1), segment(gdt[2], 2), segment(gdt[3], 3));
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.tr = tss_seg;

    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            // Identity-map the first 1 GiB with 2 MiB pages.
            let w = |v: u64, a: u64| mem.write_obj(v, GuestAddress(a)).map_err(|_| RegsError::Write(a));
            w(PDPTE_START | 0x03, PML4_START)?;
            w(PDE_START | 0x03, PDPTE_START)?;
            for i in 0..512u64 {
                w((i << 21) | 0x83, PDE_START + i * 8)?;
            }
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    Ok(())
}

/// General registers at the kernel entry.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    let mut r = kvm_regs { rflags: 0x2, rip: entry, ..Default::default() };
    match mode {
        EntryMode::Pvh => r.rbx = PVH_INFO_START,
        EntryMode::Linux64 => {
            r.rsp = BOOT_STACK_POINTER;
            r.rbp = BOOT_STACK_POINTER;
            r.rsi = ZERO_PAGE_START;
        }
    }
    r
}

pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

/// MSRs a freshly reset CPU should have (what firmware would leave).
pub fn boot_msrs() -> Msrs {
    const MSR_IA32_SYSENTER_CS: u32 = 0x174;
    const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
    const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
    const MSR_STAR: u32 = 0xc000_0081;
    const MSR_LSTAR: u32 = 0xc000_0082;
    const MSR_CSTAR: u32 = 0xc000_0083;
    const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
    const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
    const MSR_IA32_TSC: u32 = 0x10;
    const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
    const MISC_ENABLE_FAST_STRING: u64 = 1;
    let e = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    Msrs::from_entries(&[
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
    ])
    .expect("a fixed, small MSR list")
}

/// LINT0 = ExtINT (the PIC), LINT1 = NMI, as the MP table says.
pub fn set_lint(lapic: &mut kvm_lapic_state) {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_NMI: u32 = 0x4;
    const APIC_MODE_EXTINT: u32 = 0x7;
    let get = |l: &kvm_lapic_state, off: usize| u32::from_le_bytes(std::array::from_fn(|i| l.regs[off + i] as u8));
    let set = |l: &mut kvm_lapic_state, off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            l.regs[off + i] = *b as _;
        }
    };
    let mode = |reg: u32, m: u32| (reg & !0x700) | (m << 8);
    let v0 = get(lapic, APIC_LVT0);
    set(lapic, APIC_LVT0, mode(v0, APIC_MODE_EXTINT));
    let v1 = get(lapic, APIC_LVT1);
    set(lapic, APIC_LVT1, mode(v1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode() {
        let code64 = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((code64.l, code64.db, code64.present, code64.type_, code64.selector), (1, 0, 1, 0xb, 8));
        assert_eq!(code64.limit, 0xffff_ffff);
        let code32 = segment(gdt_entry(0xc09b, 0, 0xfffff), 1);
        assert_eq!((code32.l, code32.db), (0, 1));
        let null = segment(gdt_entry(0, 0, 0), 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn lint_modes() {
        let mut l = kvm_lapic_state::default();
        set_lint(&mut l);
        assert_eq!((l.regs[0x351] as u8) & 0x7, 7);
        assert_eq!((l.regs[0x361] as u8) & 0x7, 4);
    }
}
