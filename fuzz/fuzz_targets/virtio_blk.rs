//! virtio-blk request parsing: fuzz-chosen descriptor chains (well-formed
//! requests with one corruption, or anything) on the request queue, served
//! by `Block::process_queue` against a small memfd disk.
//!
//! Checked besides "no panic, no hang": a used length never exceeds the
//! chain's device-writable bytes, the disk keeps its size, and every
//! well-formed request gets the status and used length the virtio-blk
//! rules give, IN returns what a model of the disk holds, OUT changes the
//! disk as the model says (as long as no corrupted chain wrote into other
//! requests' buffers).

#![no_main]

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
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
// Per request of a run (at most MAX_REQS): a header, a status byte, a
// data area.
const MAX_REQS: u64 = 48;
const HDR: u64 = 0x14_0000;
const STATUS: u64 = 0x14_0800;
const DATA: u64 = 0x15_0000;
const DATA_AREA: u64 = 0x2000; // .. 0x1B_0000
const JUNK: u64 = 0x1C_0000;
const INDIRECT: u64 = 0x8000; // .. 0x38000
const NSECTORS: u64 = 16;

const PALETTE: &[u64] =
    &[HDR, STATUS, DATA, JUNK, BOUNDARY - 0x200, BOUNDARY - 8, MEM_END - 512, MEM_END - 1, MEM_END, 0x1000, INDIRECT];
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

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

/// A well-formed request as the driver meant it, and what the device must
/// make of it.
struct Req {
    req_type: u32,
    sector: u64,
    /// Data buffers in order (the header descriptor's tail first, with any
    /// layout).
    data: Vec<(u64, u32)>,
    status: u64,
    /// Expected status byte and used length.
    expect: (u8, u32),
}

/// The device's answer by the virtio-blk rules (spec 5.2.6, and what
/// block.rs documents for the cases the spec leaves open).
fn expected(req_type: u32, sector: u64, data: &[(u64, u32)], readable_data: bool, read_only: bool) -> (u8, u32) {
    let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
    let in_range = sector.checked_mul(512).and_then(|o| o.checked_add(total)).is_some_and(|end| end <= NSECTORS * 512);
    match req_type {
        T_IN if !readable_data && in_range && total % 512 == 0 => (S_OK, total as u32 + 1),
        T_OUT if !read_only && in_range && total % 512 == 0 => (S_OK, 1),
        T_FLUSH if data.is_empty() => (S_OK, 1),
        T_GET_ID if !readable_data && !data.is_empty() => (S_OK, total.min(20) as u32 + 1),
        T_IN | T_OUT | T_FLUSH | T_GET_ID => (S_IOERR, 1),
        _ => (S_UNSUPP, 1),
    }
}

/// A request: header, data, status; maybe corrupted afterwards (then no
/// `Req`: nothing is expected of it). `n` numbers the requests of the run:
/// each has its own header, data and status bytes.
fn request(
    u: &mut Unstructured,
    mem: &Mem,
    n: u64,
    crossing: &mut bool,
    read_only: bool,
    qsize: u16,
) -> Result<(Vec<Desc>, Option<Req>)> {
    let req_type = match u.int_in_range(0u8..=5)? {
        0 | 1 => T_IN,
        2 => T_OUT,
        3 => T_FLUSH,
        4 => T_GET_ID,
        _ => u.arbitrary()?,
    };
    let sector = match u.int_in_range(0u8..=4)? {
        0 => u64::from(u.int_in_range(0u8..=NSECTORS as u8)?),
        1 => NSECTORS - 1,
        2 => u64::MAX / 512,
        3 => u64::MAX,
        _ => u.arbitrary()?,
    };
    let area = DATA + n * DATA_AREA;
    let status = STATUS + n;
    let mut descs = Vec::new();
    let mut data = Vec::new();
    let any_layout = u.ratio(1, 8)?;
    let hdr = if any_layout { area + 0x1800 } else { HDR + n * 0x20 };
    header(mem, hdr, req_type, sector);
    if any_layout {
        // Header and 512 bytes of data in one (device-readable) descriptor.
        descs.push(Desc::new(hdr, 16 + 512, false));
        data.push((hdr + 16, 512));
    } else {
        descs.push(Desc::new(hdr, 16, false));
        let segs = if req_type == T_FLUSH { 0 } else { u.int_in_range(0..=3)? };
        let mut at = area;
        for _ in 0..segs {
            let len = if req_type == T_GET_ID { 20 } else { 512 * u.int_in_range(1..=3)? };
            // One buffer of the run crosses the boundary between two regions.
            let addr = if !*crossing && u.ratio(1, 4)? {
                *crossing = true;
                BOUNDARY - 0x200
            } else {
                let a = at;
                at += u64::from(len);
                a
            };
            descs.push(Desc::new(addr, len, req_type != T_OUT));
            data.push((addr, len));
        }
    }
    if req_type == T_OUT || any_layout {
        // Recognizable bytes to write.
        for &(addr, len) in &data {
            let bytes: Vec<u8> = (0..len).map(|i| (n as u32 * 31 + i / 7) as u8).collect();
            mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
        }
    }
    descs.push(Desc::new(status, 1, true));
    if corrupt(u, &mut descs, PALETTE, LENS, qsize)? {
        return Ok((descs, None));
    }
    let expect = if any_layout {
        expected(req_type, sector, &data, req_type != T_OUT, read_only)
    } else {
        expected(req_type, sector, &data, false, read_only)
    };
    Ok((descs, Some(Req { req_type, sector, data, status, expect })))
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

/// Checks a well-formed request's outcome against the expected one and the
/// disk model, and applies a write to the model.
fn check(mem: &Mem, r: &Req, len: u32, model: &mut [u8]) {
    let st: u8 = mem.read_obj(GuestAddress(r.status)).unwrap();
    if debug() {
        eprintln!("checked: type {} sector {} -> status {st}, used length {len}", r.req_type, r.sector);
    }
    assert_eq!(
        (st, len),
        r.expect,
        "type {} sector {} data {:x?}: (status, used length)",
        r.req_type,
        r.sector,
        r.data
    );
    if st != S_OK {
        return;
    }
    let mut off = r.sector.wrapping_mul(512) as usize; // in range for IN and OUT (their status is OK)
    match r.req_type {
        T_IN => {
            for &(addr, l) in &r.data {
                let mut got = vec![0u8; l as usize];
                mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
                assert!(got == model[off..off + l as usize], "IN sector {}: data differs from the disk", r.sector);
                off += l as usize;
            }
        }
        T_OUT => {
            for &(addr, l) in &r.data {
                mem.read_slice(&mut model[off..off + l as usize], GuestAddress(addr)).unwrap();
                off += l as usize;
            }
        }
        T_GET_ID => {
            let mut id = [0u8; 20];
            id[..9].copy_from_slice(b"fuzz-disk");
            let mut got = Vec::new();
            for &(addr, l) in &r.data {
                let mut b = vec![0u8; l as usize];
                mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                got.extend(b);
            }
            assert_eq!(&got[..20.min(got.len())], &id[..20.min(got.len())], "GET_ID");
        }
        _ => {}
    }
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
    // What the disk holds, as the requests' outcomes say.
    let mut model = vec![0u8; (NSECTORS * 512) as usize];
    disks._file.read_exact_at(&mut model, 0).unwrap();
    let read_only = u.ratio(1, 4)?;
    let blk = if read_only { &mut disks.ro } else { &mut disks.rw };

    // Status bytes: one per request of the run, preset to "not written".
    let _ = mem.write_slice(&[0xee; 0x80], GuestAddress(STATUS));
    // A chain that may have written into another's buffers: outcomes are
    // no longer checked.
    let mut tainted = false;
    let mut crossing = false;
    let mut reqs: HashMap<u32, Req> = HashMap::new();
    let mut n = 0u64;
    for _round in 0..u.int_in_range(1..=6)? {
        for _ in 0..u.int_in_range(0..=8)? {
            let (descs, req) = if u.ratio(1, 6)? {
                (raw_chain(u, qsize)?, None)
            } else {
                request(u, &mem, n, &mut crossing, read_only, qsize)?
            };
            // (A `next` link may lead into another chain's writable
            // descriptors.)
            if req.is_none() && descs.iter().any(|d| d.flags & F_INDIRECT != 0 || d.writable() || d.next.is_some()) {
                tainted = true;
            }
            // Rings and indirect tables: the first 256 KiB, and around the
            // boundary where a ring may straddle.
            if reaches(&descs, 0, 0x4_0000) || reaches(&descs, RING_BOUNDARY - 0x1000, RING_BOUNDARY + 0x1000) {
                drv.hostile = true;
            }
            // An indirect table per request of the run: a chain left in the
            // ring (behind a hostile avail index) keeps its table.
            let indirect = u.ratio(1, 8)?.then_some(INDIRECT + 0x1000 * n);
            if debug() {
                eprintln!("request {n}: {descs:x?}, indirect {indirect:x?}, read-only disk {read_only}");
            }
            n += 1;
            let Some(head) = drv.add_chain(&mem, &descs, indirect) else { break };
            if let Some(r) = req {
                reqs.insert(u32::from(head), r);
            }
            if n == MAX_REQS {
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
        if debug() {
            eprintln!("process_queue");
        }
        blk.process_queue(&mem, &mut q);
        for (id, len, chain) in drv.take_used(&mem) {
            let req = reqs.remove(&id);
            let Some(descs) = chain else { continue };
            if drv.hostile {
                continue;
            }
            if descs.iter().all(|d| d.flags & F_INDIRECT == 0 && d.next.is_none()) {
                assert!(
                    u64::from(len) <= writable_len(&descs),
                    "chain {id}: used length {len} > its writable bytes {descs:x?}"
                );
            }
            if let Some(r) = req.filter(|_| !tainted) {
                check(&mem, &r, len, &mut model);
            }
        }
        if n == MAX_REQS {
            break;
        }
    }
    let size = std::fs::metadata(format!("/proc/self/fd/{}", disks._file.as_raw_fd())).unwrap().len();
    assert_eq!(size, NSECTORS * 512, "the disk changed size");
    if !tainted && !drv.hostile {
        let mut disk = vec![0u8; (NSECTORS * 512) as usize];
        disks._file.read_exact_at(&mut disk, 0).unwrap();
        assert!(disk == model, "the disk differs from what the requests' outcomes say");
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
