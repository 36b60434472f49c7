//! virtio-blk request parsing: fuzz-chosen descriptor chains (well-formed
//! requests with one corruption, or anything) on the request queue, served
//! by `Block::process_queue` against a small memfd disk.
//!
//! Checked besides "no panic, no hang": a used length never exceeds the
//! chain's device-writable bytes, the status byte is a virtio-blk status,
//! and the disk keeps its size.

#![no_main]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Mutex, OnceLock};

use hull_fuzz::guest::arbitrary::{Result, Unstructured};
use hull_fuzz::guest::*;
use hull_vmm::devices::virtio::block::{Block, BlockConfig};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

// Three regions: rings may straddle the first boundary, data buffers the
// second.
const MEM_END: u64 = 0x30_0000;
const RING_BOUNDARY: u64 = 0x10_0000;
const BOUNDARY: u64 = 0x20_0000;
const HDR: u64 = 0x14_0000;
const STATUS: u64 = 0x14_0800;
const DATA: u64 = 0x15_0000;
const DATA2: u64 = 0x16_0000;
const INDIRECT: u64 = 0x8000; // .. 0x38000
const NSECTORS: u64 = 16;

const PALETTE: &[u64] =
    &[HDR, STATUS, DATA, DATA2, BOUNDARY - 0x200, BOUNDARY - 8, MEM_END - 512, MEM_END - 1, MEM_END, 0x1000, INDIRECT];
const LENS: &[u32] = &[1, 16, 20, 512, 1024, 4096, 16 + 512, 1 << 20];

struct Disks {
    _file: File,
    rw: Block,
    ro: Block,
}

fn disks() -> &'static Mutex<Disks> {
    static D: OnceLock<Mutex<Disks>> = OnceLock::new();
    D.get_or_init(|| {
        // SAFETY: plain syscall with a valid NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"hull-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh memfd nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(NSECTORS * 512).unwrap();
        let path = format!("/proc/self/fd/{}", file.as_raw_fd());
        let mk = |read_only| {
            Block::new(BlockConfig { path: path.clone().into(), read_only, id: Some("fuzz-disk".into()) }).unwrap()
        };
        Mutex::new(Disks { rw: mk(false), ro: mk(true), _file: file })
    })
}

fn header(mem: &Mem, addr: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    let _ = mem.write_slice(&h, GuestAddress(addr));
}

/// A request: header, data, status; maybe corrupted afterwards (then true).
fn request(u: &mut Unstructured, mem: &Mem, slot: u64, status: u64, qsize: u16) -> Result<(Vec<Desc>, bool)> {
    let req_type = match u.int_in_range(0u8..=5)? {
        0 | 1 => 0, // IN
        2 => 1,     // OUT
        3 => 4,     // FLUSH
        4 => 8,     // GET_ID
        _ => u.arbitrary()?,
    };
    let sector = match u.int_in_range(0u8..=4)? {
        0 => u64::from(u.int_in_range(0u8..=NSECTORS as u8)?),
        1 => NSECTORS - 1,
        2 => u64::MAX / 512,
        3 => u64::MAX,
        _ => u.arbitrary()?,
    };
    let hdr = HDR + slot * 0x100;
    header(mem, hdr, req_type, sector);
    let writes = req_type != 1;
    let mut descs = Vec::new();
    if u.ratio(1, 8)? {
        // Header and data in one descriptor.
        descs.push(Desc::new(hdr, 16 + 512, false));
    } else {
        descs.push(Desc::new(hdr, 16, false));
        let n = if req_type == 4 { 0 } else { u.int_in_range(0..=3)? };
        for i in 0..n {
            let len = if req_type == 8 { 20 } else { 512 * u.int_in_range(1..=4)? };
            let addr = [DATA, DATA2, BOUNDARY - 0x200][(i as usize + slot as usize) % 3];
            descs.push(Desc::new(addr, len, writes));
        }
    }
    descs.push(Desc::new(status, 1, true));
    let corrupted = corrupt(u, &mut descs, PALETTE, LENS, qsize)?;
    Ok((descs, corrupted))
}

fn raw_chain(u: &mut Unstructured, qsize: u16) -> Result<Vec<Desc>> {
    let n = u.int_in_range(1..=6)?;
    let mut descs = Vec::new();
    for _ in 0..n {
        let mut d = Desc::new(pick_addr(u, PALETTE)?, pick_len(u, LENS)?, u.arbitrary()?);
        if u.ratio(1, 8)? {
            d.flags |= F_INDIRECT;
        }
        if u.ratio(1, 8)? {
            d.next = Some(u.int_in_range(0..=qsize.saturating_add(2))?);
        }
        descs.push(d);
    }
    Ok(descs)
}

fn run(u: &mut Unstructured) -> Result<()> {
    let mem = memory(&[(0, 0x10_0000), (RING_BOUNDARY, 0x10_0000), (BOUNDARY, (MEM_END - BOUNDARY) as usize)]);
    let qsize = pick_queue_size(u, 256)?;
    // Rings in the first region, or one of them straddling a boundary.
    let b = RING_BOUNDARY;
    let mut drv = match u.int_in_range(0u8..=5)? {
        0 => DriverQueue::new(&mem, b - 0x800, 0x2000, 0x3000, qsize),
        1 => DriverQueue::new(&mem, 0x1000, b - 0x100, 0x3000, qsize),
        2 => DriverQueue::new(&mem, 0x1000, 0x2000, b - 0x400, qsize),
        _ => DriverQueue::new(&mem, 0x1000, 0x2000, 0x3000, qsize),
    };
    let event_idx = u.arbitrary()?;
    let mut q = drv.queue(event_idx);
    if !virtio_queue::QueueT::is_valid(&q, &mem) {
        return Ok(());
    }
    let mut disks = disks().lock().unwrap_or_else(|p| p.into_inner());
    let read_only = u.ratio(1, 4)?;
    let blk = if read_only { &mut disks.ro } else { &mut disks.rw };

    // Status bytes: one per request of the run, preset to "not written".
    let _ = mem.write_slice(&[0xee; 0x80], GuestAddress(STATUS));
    // Whether some chain may have written over another's status byte.
    let mut tainted = false;
    for round in 0..u.int_in_range(1..=6)? {
        for slot in 0..u.int_in_range(0..=8)? {
            let status = STATUS + 0x10 * round + slot;
            let (descs, corrupted) =
                if u.ratio(1, 6)? { (raw_chain(u, qsize)?, true) } else { request(u, &mem, slot, status, qsize)? };
            tainted |= corrupted;
            // Rings and indirect tables: the first 256 KiB, and around the
            // boundary where a ring may straddle.
            if reaches(&descs, 0, 0x4_0000) || reaches(&descs, RING_BOUNDARY - 0x1000, RING_BOUNDARY + 0x1000) {
                drv.hostile = true;
            }
            // An indirect table per request of the run: a chain left in the
            // ring (behind a hostile avail index) keeps its table.
            let indirect = u.ratio(1, 8)?.then_some(INDIRECT + 0x1000 * (8 * round + slot));
            if drv.add_chain(&mem, &descs, indirect).is_none() {
                break;
            }
        }
        match u.int_in_range(0u8..=15)? {
            0 => drv.publish_bogus(&mem, u.arbitrary()?),
            1 => drv.jump_avail_idx(&mem, u.arbitrary()?),
            _ => {}
        }
        if event_idx {
            drv.set_used_event(&mem, u.arbitrary()?);
        }
        blk.process_queue(&mem, &mut q);
        for (id, len, chain) in drv.take_used(&mem) {
            let Some(descs) = chain else { continue };
            let plain = descs.iter().all(|d| d.flags & F_INDIRECT == 0 && d.next.is_none());
            if plain && !drv.hostile {
                assert!(
                    u64::from(len) <= writable_len(&descs),
                    "chain {id}: used length {len} > its writable bytes {descs:x?}"
                );
            }
            let last = descs.last().copied();
            if let Some(s) = last.filter(|s| !tainted && s.writable() && s.len > 0 && s.addr >= STATUS) {
                if s.addr < STATUS + 0x80 && len > 0 {
                    let st: u8 = mem.read_obj(GuestAddress(s.addr)).unwrap();
                    assert!(st <= 2, "chain {id}: status byte {st:#x}, used len {len}, chain {descs:x?}");
                }
            }
        }
    }
    let size = std::fs::metadata(format!("/proc/self/fd/{}", disks._file.as_raw_fd())).unwrap().len();
    assert_eq!(size, NSECTORS * 512, "the disk changed size");
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
