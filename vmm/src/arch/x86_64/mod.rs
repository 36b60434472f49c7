//! x86_64: guest physical layout, kernel loading (PVH ELF and bzImage),
//! boot structures (GDT, page tables, zero page, PVH start info, MP table)
//! and the boot register state.

pub mod boot;
pub mod layout;
pub mod mptable;
pub mod regs;
