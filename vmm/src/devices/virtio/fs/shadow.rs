//! The bounce region and the shadow virtqueues inside it.
//!
//! The bounce region is a sealed memfd owned by the device and mapped shared
//! by hull-vmm and by virtiofsd (it is the only "guest memory" virtiofsd is
//! given, at address 0). For each queue it holds, page aligned:
//!
//! ```text
//! | descriptor table | avail ring | used ring | arena (request bytes) |
//! ```
//!
//! hull-vmm is the *driver* of these split virtqueues: it writes descriptors
//! and the avail ring, virtiofsd (the device) writes the used ring. Each
//! relayed request takes one slot, which owns the descriptor pair `2k`
//! (device-readable part) and `2k+1` (device-writable part), and a
//! contiguous range of the queue's arena, allocated first-fit in
//! [`UNIT`]-byte units. virtiofsd is not trusted either: used entries that
//! name no in-flight slot are ignored and lengths are clamped.

use std::fs::File;
use std::io;
use std::num::Wrapping;
use std::os::fd::FromRawFd;
use std::sync::atomic::Ordering;

use log::warn;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use super::super::GuestMemory;

/// Allocation unit of the arenas.
pub const UNIT: u64 = 512;
/// Arena of the hiprio queue (FUSE_FORGET and friends: tens of bytes each).
pub const HIPRIO_ARENA_BYTES: u64 = 64 << 10;
/// Arena of each request queue: room for three requests of the largest
/// size at once, or hundreds of small ones.
pub const REQUEST_ARENA_BYTES: u64 = 4 << 20;

const PAGE: u64 = 4096;
const DESC_LEN: u64 = 16;
const VRING_DESC_F_NEXT: u16 = 1;
const VRING_DESC_F_WRITE: u16 = 2;

fn page_up(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

/// Where one queue's shadow ring and arena live in the bounce region
/// (addresses are offsets into the region = virtiofsd's guest addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub arena: u64,
    pub arena_len: u64,
}

/// Lays out one shadow ring of `sizes[i]` entries per queue (queue 0 is
/// hiprio); returns the layouts and the bounce region's total length.
pub fn layout(sizes: &[u16]) -> (Vec<RingLayout>, u64) {
    let mut off = 0u64;
    let mut out = Vec::with_capacity(sizes.len());
    for (i, &size) in sizes.iter().enumerate() {
        let n = u64::from(size);
        let desc = off;
        let avail = desc + DESC_LEN * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        let arena = page_up(used + 6 + 8 * n);
        let arena_len = if i == 0 { HIPRIO_ARENA_BYTES } else { REQUEST_ARENA_BYTES };
        out.push(RingLayout { size, desc, avail, used, arena, arena_len });
        off = page_up(arena + arena_len);
    }
    (out, off)
}

/// Creates the bounce region: a memfd of `len` bytes, sealed against
/// resizing (virtiofsd gets the fd: a shrunk file would fault hull-vmm's
/// accesses), mapped shared at address 0.
pub fn create_bounce(len: u64) -> io::Result<GuestMemory> {
    // SAFETY: plain syscall with a valid NUL-terminated name.
    let fd =
        unsafe { libc::memfd_create(c"hull-virtiofs-bounce".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh memfd owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a valid fd we own.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let size = usize::try_from(len).map_err(|_| io::Error::other("bounce region too large"))?;
    GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), size, Some(FileOffset::new(file, 0)))])
        .map_err(|e| io::Error::other(format!("mapping the bounce region: {e}")))
}

/// A guest buffer (checked to lie in guest memory when the chain was read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A guest request relayed to virtiofsd and not answered yet.
#[derive(Debug)]
pub struct InFlight {
    /// Head of the guest's descriptor chain.
    pub head: u16,
    /// The guest's device-writable buffers, in order.
    pub wsegs: Vec<Seg>,
    /// FUSE `unique` of the request (for an error reply if virtiofsd goes).
    pub unique: u64,
    /// Offset of the request bytes in the bounce region.
    pub off: u64,
    /// Readable and writable lengths (the writable part follows the
    /// readable one in the arena).
    pub rlen: u32,
    pub wlen: u32,
    unit: usize,
    units: usize,
}

/// Arena space and a slot for one request, from [`ShadowRing::reserve`].
#[derive(Debug)]
pub struct Reservation {
    slot: u16,
    unit: usize,
    units: usize,
    pub off: u64,
}

/// The driver side of one shadow split virtqueue.
pub struct ShadowRing {
    l: RingLayout,
    next_avail: Wrapping<u16>,
    last_used: Wrapping<u16>,
    slots: Vec<Option<InFlight>>,
    free_slots: Vec<u16>,
    /// One flag per arena unit.
    units: Vec<bool>,
    free_units: usize,
    in_flight: usize,
}

impl ShadowRing {
    /// A fresh ring (indices at 0); `bounce` is zeroed where the ring is.
    pub fn new(l: RingLayout, bounce: &GuestMemory) -> io::Result<Self> {
        let ring_bytes = usize::try_from(l.arena - l.desc).map_err(io::Error::other)?;
        bounce
            .write_slice(&vec![0u8; ring_bytes], GuestAddress(l.desc))
            .map_err(|e| io::Error::other(format!("clearing a shadow ring: {e}")))?;
        let nslots = (l.size / 2).max(1);
        let nunits = (l.arena_len / UNIT) as usize;
        Ok(ShadowRing {
            l,
            next_avail: Wrapping(0),
            last_used: Wrapping(0),
            slots: (0..nslots).map(|_| None).collect(),
            free_slots: (0..nslots).rev().collect(),
            units: vec![false; nunits],
            free_units: nunits,
            in_flight: 0,
        })
    }

    /// Largest request (readable + writable bytes) this ring can ever take.
    pub fn capacity(&self) -> u64 {
        self.l.arena_len
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Reserves a slot and `bytes` of arena; None if either is exhausted
    /// right now.
    pub fn reserve(&mut self, bytes: u64) -> Option<Reservation> {
        let want = usize::try_from(bytes.div_ceil(UNIT)).ok()?.max(1);
        if want > self.free_units || self.free_slots.is_empty() {
            return None;
        }
        let mut run = 0usize;
        let mut start = None;
        for (i, used) in self.units.iter().enumerate() {
            if *used {
                run = 0;
                continue;
            }
            run += 1;
            if run == want {
                start = Some(i + 1 - want);
                break;
            }
        }
        let unit = start?;
        let slot = self.free_slots.pop()?;
        self.units[unit..unit + want].iter_mut().for_each(|u| *u = true);
        self.free_units -= want;
        Some(Reservation { slot, unit, units: want, off: self.l.arena + unit as u64 * UNIT })
    }

    /// Gives back a reservation that was not submitted.
    pub fn cancel(&mut self, r: Reservation) {
        self.free_units(r.unit, r.units);
        self.free_slots.push(r.slot);
    }

    fn free_units(&mut self, unit: usize, units: usize) {
        self.units[unit..unit + units].iter_mut().for_each(|u| *u = false);
        self.free_units += units;
    }

    /// Publishes a request whose readable bytes are already in the arena
    /// at `r.off`: a chain of the readable part (`rlen` bytes) then the
    /// writable part (`wlen` bytes right after it), either may be empty
    /// but not both.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        bounce: &GuestMemory,
        r: Reservation,
        head: u16,
        rlen: u32,
        wlen: u32,
        wsegs: Vec<Seg>,
        unique: u64,
    ) -> Result<(), vm_memory::GuestMemoryError> {
        let d0 = 2 * r.slot;
        let write_desc = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&addr.to_le_bytes());
            b[8..12].copy_from_slice(&len.to_le_bytes());
            b[12..14].copy_from_slice(&flags.to_le_bytes());
            b[14..].copy_from_slice(&next.to_le_bytes());
            bounce.write_slice(&b, GuestAddress(self.l.desc + DESC_LEN * u64::from(i)))
        };
        let head_desc = match (rlen, wlen) {
            (0, _) => {
                write_desc(d0 + 1, r.off, wlen, VRING_DESC_F_WRITE, 0)?;
                d0 + 1
            }
            (_, 0) => {
                write_desc(d0, r.off, rlen, 0, 0)?;
                d0
            }
            _ => {
                write_desc(d0, r.off, rlen, VRING_DESC_F_NEXT, d0 + 1)?;
                write_desc(d0 + 1, r.off + u64::from(rlen), wlen, VRING_DESC_F_WRITE, 0)?;
                d0
            }
        };
        let pos = self.next_avail.0 % self.l.size;
        bounce.write_obj(head_desc.to_le(), GuestAddress(self.l.avail + 4 + 2 * u64::from(pos)))?;
        self.next_avail += 1;
        // The descriptors and the ring entry are visible before the index.
        bounce.store(self.next_avail.0.to_le(), GuestAddress(self.l.avail + 2), Ordering::Release)?;
        self.slots[usize::from(r.slot)] =
            Some(InFlight { head, wsegs, unique, off: r.off, rlen, wlen, unit: r.unit, units: r.units });
        self.in_flight += 1;
        Ok(())
    }

    /// The next request virtiofsd answered, with the number of bytes it
    /// wrote (at most the writable length). Its slot is free again; its
    /// arena stays reserved until [`ShadowRing::release`] (the caller copies
    /// the answer out first).
    pub fn pop_used(&mut self, bounce: &GuestMemory) -> Option<(InFlight, u32)> {
        // Bounded: at most one lap of bogus entries per call.
        for _ in 0..=self.l.size {
            let idx: u16 = match bounce.load(GuestAddress(self.l.used + 2), Ordering::Acquire) {
                Ok(i) => u16::from_le(i),
                Err(e) => {
                    warn!("virtio-fs: reading a shadow used index: {e}");
                    return None;
                }
            };
            if Wrapping(idx) == self.last_used {
                return None;
            }
            let pos = u64::from(self.last_used.0 % self.l.size);
            self.last_used += 1;
            let elem = GuestAddress(self.l.used + 4 + 8 * pos);
            let (id, len) = match (bounce.read_obj::<u32>(elem), bounce.read_obj::<u32>(elem.unchecked_add(4))) {
                (Ok(id), Ok(len)) => (u32::from_le(id), u32::from_le(len)),
                _ => return None,
            };
            // Head descriptor of slot k is 2k (readable part) or 2k+1 (a
            // chain with only a writable part).
            let slot = (id / 2) as usize;
            let Some(entry) = self.slots.get_mut(slot).and_then(Option::take) else {
                warn!("virtio-fs: virtiofsd returned descriptor {id}, which is not in flight; ignored");
                continue;
            };
            self.free_slots.push(slot as u16);
            self.in_flight -= 1;
            let len = len.min(entry.wlen);
            return Some((entry, len));
        }
        warn!("virtio-fs: virtiofsd's used ring runs ahead; ignoring it until the next call");
        None
    }

    /// Frees the arena range of an answered request.
    pub fn release(&mut self, e: &InFlight) {
        self.free_units(e.unit, e.units);
    }

    /// Takes every request still in flight (virtiofsd went away).
    pub fn take_all(&mut self) -> Vec<InFlight> {
        let mut out = Vec::new();
        for (k, s) in self.slots.iter_mut().enumerate() {
            if let Some(e) = s.take() {
                self.free_slots.push(k as u16);
                out.push(e);
            }
        }
        self.in_flight = 0;
        for e in &out {
            self.units[e.unit..e.unit + e.units].iter_mut().for_each(|u| *u = false);
            self.free_units += e.units;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device side of the ring, as virtiofsd would see it.
    fn device_pop(b: &GuestMemory, l: &RingLayout, n: u16) -> (u16, Vec<(u64, u32, u16, u16)>) {
        let avail_idx: u16 = b.read_obj(GuestAddress(l.avail + 2)).unwrap();
        assert!(avail_idx > n, "nothing available");
        let head: u16 = b.read_obj(GuestAddress(l.avail + 4 + 2 * u64::from(n % l.size))).unwrap();
        let mut descs = Vec::new();
        let mut i = head;
        loop {
            let a = GuestAddress(l.desc + 16 * u64::from(i));
            let addr: u64 = b.read_obj(a).unwrap();
            let len: u32 = b.read_obj(a.unchecked_add(8)).unwrap();
            let flags: u16 = b.read_obj(a.unchecked_add(12)).unwrap();
            let next: u16 = b.read_obj(a.unchecked_add(14)).unwrap();
            descs.push((addr, len, flags, next));
            if flags & VRING_DESC_F_NEXT == 0 {
                break;
            }
            i = next;
        }
        (head, descs)
    }

    fn device_push(b: &GuestMemory, l: &RingLayout, n: u16, id: u32, len: u32) {
        let e = GuestAddress(l.used + 4 + 8 * u64::from(n % l.size));
        b.write_obj(id, e).unwrap();
        b.write_obj(len, e.unchecked_add(4)).unwrap();
        b.store(n + 1, GuestAddress(l.used + 2), Ordering::Release).unwrap();
    }

    #[test]
    fn layout_is_aligned_and_disjoint() {
        let (ls, total) = layout(&[1024, 1024]);
        assert_eq!(ls.len(), 2);
        for l in &ls {
            assert_eq!(l.desc % PAGE, 0);
            assert_eq!(l.used % 4, 0);
            assert_eq!(l.arena % PAGE, 0);
            assert!(l.used + 6 + 8 * u64::from(l.size) <= l.arena);
        }
        assert!(ls[0].arena + ls[0].arena_len <= ls[1].desc);
        assert_eq!(ls[0].arena_len, HIPRIO_ARENA_BYTES);
        assert_eq!(ls[1].arena_len, REQUEST_ARENA_BYTES);
        assert_eq!(total, ls[1].arena + ls[1].arena_len);
        // A bit over 4 MiB for one request queue.
        assert!(total < (5 << 20), "{total}");
    }

    #[test]
    fn bounce_is_sealed() {
        let b = create_bounce(1 << 20).unwrap();
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let r = b.iter().next().unwrap();
        let f = r.file_offset().unwrap().file();
        assert!(f.set_len(4096).is_err(), "shrinking must be refused");
        assert!(f.set_len(2 << 20).is_err(), "growing must be refused");
    }

    #[test]
    fn submit_and_complete() {
        let (ls, total) = layout(&[8, 8]);
        let b = create_bounce(total).unwrap();
        let l = ls[1];
        let mut r = ShadowRing::new(l, &b).unwrap();
        assert_eq!(r.in_flight(), 0);

        // Three requests: both parts, readable only, writable only.
        let res = r.reserve(100 + 200).unwrap();
        let off1 = res.off;
        r.submit(&b, res, 7, 100, 200, vec![], 1).unwrap();
        let res = r.reserve(48).unwrap();
        let off2 = res.off;
        assert!(off2 >= off1 + 300);
        r.submit(&b, res, 8, 48, 0, vec![], 2).unwrap();
        let res = r.reserve(16).unwrap();
        r.submit(&b, res, 9, 0, 16, vec![], 3).unwrap();
        assert_eq!(r.in_flight(), 3);

        let (h, d) = device_pop(&b, &l, 0);
        assert_eq!(d, vec![(off1, 100, VRING_DESC_F_NEXT, h + 1), (off1 + 100, 200, VRING_DESC_F_WRITE, 0)]);
        let (h2, d2) = device_pop(&b, &l, 1);
        assert_eq!(d2, vec![(off2, 48, 0, 0)]);
        let (h3, d3) = device_pop(&b, &l, 2);
        assert_eq!(d3[0].2, VRING_DESC_F_WRITE);
        assert_eq!(h3 % 2, 1);

        assert!(r.pop_used(&b).is_none());
        // Out of order, and a length above the writable part is clamped.
        device_push(&b, &l, 0, u32::from(h2), 0);
        device_push(&b, &l, 1, u32::from(h), 5000);
        let (e, len) = r.pop_used(&b).unwrap();
        assert_eq!((e.head, len), (8, 0));
        r.release(&e);
        let (e, len) = r.pop_used(&b).unwrap();
        assert_eq!((e.head, e.unique, len), (7, 1, 200));
        r.release(&e);
        assert!(r.pop_used(&b).is_none());
        // A bogus id and a repeated one are ignored.
        device_push(&b, &l, 2, 6, 1);
        device_push(&b, &l, 3, u32::from(h), 1);
        device_push(&b, &l, 4, 999, 1);
        assert!(r.pop_used(&b).is_none());
        assert_eq!(r.in_flight(), 1);
        let left = r.take_all();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].head, 9);
        assert_eq!(r.in_flight(), 0);
    }

    #[test]
    fn exhaustion_and_reuse() {
        let (ls, total) = layout(&[8, 8]);
        let b = create_bounce(total).unwrap();
        let mut r = ShadowRing::new(ls[1], &b).unwrap();
        // Four slots for a ring of 8.
        let rs: Vec<_> = (0..4).map(|_| r.reserve(10).unwrap()).collect();
        assert!(r.reserve(10).is_none(), "out of slots");
        for x in rs {
            r.cancel(x);
        }
        // The whole arena at once, then nothing more.
        let all = r.reserve(REQUEST_ARENA_BYTES).unwrap();
        assert!(r.reserve(1).is_none(), "out of arena");
        assert!(r.reserve(REQUEST_ARENA_BYTES + 1).is_none());
        r.cancel(all);
        // Fragmentation: a free hole too small is skipped.
        let a = r.reserve(UNIT).unwrap();
        let bb = r.reserve(UNIT).unwrap();
        r.cancel(a);
        let c = r.reserve(2 * UNIT).unwrap();
        assert!(c.off > bb.off);
    }
}
