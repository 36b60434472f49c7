//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI
//! finds its CPUs, the IOAPIC and the IRQ routing.

use super::layout::{EBDA_START, IOAPIC_ADDR, LAPIC_ADDR, LAST_IRQ};
use crate::devices::virtio::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

/// The most vCPUs whose table still fits in the 1 KiB the kernel scans at the
/// EBDA (284 + 20 bytes per vCPU).
pub const MAX_VCPUS: u8 = 32;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("{0} vCPUs: the MP table supports 1 to {MAX_VCPUS}")]
    BadCpuCount(u8),
    #[error("the MP table does not fit in guest memory at {0:#x}")]
    Write(u64),
}

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Builds the floating pointer + configuration table, as bytes placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, MpTableError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS {
        return Err(MpTableError::BadCpuCount(num_cpus));
    }
    let ioapic_id = num_cpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = 1 | if cpu == 0 { 2 } else { 0 }; // enabled, bootstrap processor
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU | APIC
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..=LAST_IRQ as u8 {
        // I/O interrupt: INT, conforming polarity/trigger, ISA bus irq -> IOAPIC pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1 of every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = base + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"HULL    ");
    table.extend_from_slice(b"HULL-VMM    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length (16-byte units), revision, checksum, features
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table at the start of the EBDA.
pub fn setup(mem: &GuestMemory, num_cpus: u8) -> Result<(), MpTableError> {
    let bytes = build(num_cpus, EBDA_START)?;
    if EBDA_START + bytes.len() as u64 > 0xa0000 {
        return Err(MpTableError::Write(EBDA_START));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START)).map_err(|_| MpTableError::Write(EBDA_START))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_counts() {
        for cpus in [1u8, 2, 8, MAX_VCPUS] {
            let t = build(cpus, EBDA_START).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes([table[4], table[5]]) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0);
            let entries = u16::from_le_bytes([table[34], table[35]]);
            assert_eq!(entries as usize, cpus as usize + 1 + 1 + 24 + 2);
            // The pointer in the floating structure points at the table.
            assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64, EBDA_START + 16);
        }
        assert_eq!(build(0, 0), Err(MpTableError::BadCpuCount(0)));
        assert_eq!(build(MAX_VCPUS + 1, 0), Err(MpTableError::BadCpuCount(MAX_VCPUS + 1)));
    }

    #[test]
    fn fits_below_640k_for_max_cpus() {
        assert!(EBDA_START + build(MAX_VCPUS, EBDA_START).unwrap().len() as u64 <= 0xa0000);
    }
}
