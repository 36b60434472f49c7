//! The guest driver's side of split virtqueues, for the device targets:
//! guest memory, descriptor tables and avail rings written from fuzz input,
//! used rings read back and checked.
//!
//! Descriptor indices are handed out from a free list as a driver would, so
//! a chain's descriptors stay what they were until the device returns it;
//! hostile shapes (bad addresses, lengths, flags, `next` links, avail index
//! jumps, indirect tables) come from the chain contents, not from
//! overwriting chains in flight.

use arbitrary::{Result, Unstructured};
use std::collections::HashMap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use libfuzzer_sys::arbitrary;

pub type Mem = GuestMemoryMmap<()>;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// `HULL_FUZZ_DEBUG=1`: the targets print what they do (to replay a crash
/// and see it).
pub fn debug() -> bool {
    static D: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *D.get_or_init(|| std::env::var_os("HULL_FUZZ_DEBUG").is_some())
}

/// Removes `dir` when the process exits normally (libFuzzer ends a timed
/// run with `exit`).
pub fn remove_at_exit(dir: std::path::PathBuf) {
    static DIRS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    extern "C" fn cleanup() {
        for d in DIRS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    let mut dirs = DIRS.lock().unwrap_or_else(|p| p.into_inner());
    if dirs.is_empty() {
        // SAFETY: registers a plain function without arguments.
        unsafe { libc::atexit(cleanup) };
    }
    dirs.push(dir);
}

/// Anonymous guest memory made of `regions` (start, length).
pub fn memory(regions: &[(u64, usize)]) -> Mem {
    let r: Vec<(GuestAddress, usize)> = regions.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    GuestMemoryMmap::from_ranges(&r).expect("guest memory")
}

/// One descriptor as the driver means it (`next` is filled in when the
/// chain is written, unless `next` is set: a hostile link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: Option<u16>,
}

impl Desc {
    pub fn new(addr: u64, len: u32, writable: bool) -> Desc {
        Desc { addr, len, flags: if writable { F_WRITE } else { 0 }, next: None }
    }

    pub fn writable(&self) -> bool {
        self.flags & F_WRITE != 0
    }
}

/// Writes descriptor `i` of the table at `table`.
pub fn write_desc(mem: &Mem, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let a = table + 16 * u64::from(i);
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&b, GuestAddress(a)).expect("descriptor table inside guest memory");
}

/// Driver side of one split virtqueue.
pub struct DriverQueue {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub size: u16,
    avail_idx: u16,
    used_seen: u16,
    free: Vec<u16>,
    /// Head -> the descriptor indices of its chain and the chain as written.
    chains: HashMap<u16, (Vec<u16>, Vec<Desc>)>,
    /// The avail index was moved by hand: the device may return stale heads.
    pub hostile: bool,
}

impl DriverQueue {
    /// Rings at the given addresses; the avail and used rings are cleared.
    pub fn new(mem: &Mem, desc: u64, avail: u64, used: u64, size: u16) -> DriverQueue {
        let zeros = vec![0u8; 6 + 8 * usize::from(size)];
        mem.write_slice(&zeros[..6 + 2 * usize::from(size)], GuestAddress(avail)).expect("avail ring");
        mem.write_slice(&zeros, GuestAddress(used)).expect("used ring");
        DriverQueue {
            desc,
            avail,
            used,
            size,
            avail_idx: 0,
            used_seen: 0,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            hostile: false,
        }
    }

    /// The device's view, as the transport would hand it over.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = Queue::new(self.size.max(1)).expect("queue");
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// Chains that can still be made available with `n` descriptors.
    pub fn has_room(&self, n: usize) -> bool {
        self.free.len() >= n
    }

    /// Writes `descs` as one chain (linked with NEXT unless a descriptor
    /// names its own `next`) and makes it available. With `indirect`, the
    /// chain goes into the indirect table at that address and one ring
    /// descriptor points at it. None if the ring has no free descriptors.
    pub fn add_chain(&mut self, mem: &Mem, descs: &[Desc], indirect: Option<u64>) -> Option<u16> {
        if descs.is_empty() {
            return None;
        }
        let head = match indirect {
            Some(table) => {
                for (i, d) in descs.iter().enumerate() {
                    let last = i + 1 == descs.len();
                    let (flags, next) = link(d, last, i as u16 + 1);
                    write_desc(mem, table, i as u16, d.addr, d.len, flags, next);
                }
                let idx = self.free.pop()?;
                write_desc(mem, self.desc, idx, table, 16 * descs.len() as u32, F_INDIRECT, 0);
                self.chains.insert(idx, (vec![idx], descs.to_vec()));
                idx
            }
            None => {
                if self.free.len() < descs.len() {
                    return None;
                }
                let idxs: Vec<u16> = (0..descs.len()).map(|_| self.free.pop().unwrap_or_default()).collect();
                for (i, d) in descs.iter().enumerate() {
                    let last = i + 1 == descs.len();
                    let (flags, next) = link(d, last, idxs.get(i + 1).copied().unwrap_or(0));
                    write_desc(mem, self.desc, idxs[i], d.addr, d.len, flags, next);
                }
                self.chains.insert(idxs[0], (idxs.clone(), descs.to_vec()));
                idxs[0]
            }
        };
        self.publish(mem, head);
        Some(head)
    }

    /// Puts any `head` on the avail ring (a bogus one, or a chain in flight
    /// a second time): the device may return anything afterwards.
    pub fn publish_bogus(&mut self, mem: &Mem, head: u16) {
        self.hostile = true;
        self.publish(mem, head);
    }

    fn publish(&mut self, mem: &Mem, head: u16) {
        if self.size == 0 {
            return;
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2)).expect("avail ring");
    }

    /// Moves the avail index by `delta` without publishing anything.
    pub fn jump_avail_idx(&mut self, mem: &Mem, delta: u16) {
        self.hostile = true;
        self.avail_idx = self.avail_idx.wrapping_add(delta);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail + 2)).expect("avail ring");
    }

    /// The next avail index the driver publishes.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Chains made available and not used yet (as of the last
    /// [`DriverQueue::take_used`]).
    pub fn outstanding(&self) -> u16 {
        self.avail_idx.wrapping_sub(self.used_seen)
    }

    /// Whether the device wants a notification for the chains published
    /// since avail index `old`, by the driver's rules: the used ring's
    /// NO_NOTIFY flag, or with EVENT_IDX `vring_need_event(avail_event)`.
    pub fn needs_kick(&self, mem: &Mem, event_idx: bool, old: u16) -> bool {
        let new = self.avail_idx;
        if event_idx {
            let e: u16 = mem.read_obj(GuestAddress(self.used + 4 + 8 * u64::from(self.size))).expect("used ring");
            let event = u16::from_le(e);
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = mem.read_obj(GuestAddress(self.used)).expect("used ring");
            u16::from_le(flags) & 1 == 0
        }
    }

    /// The driver's `used_event` (EVENT_IDX).
    pub fn set_used_event(&self, mem: &Mem, v: u16) {
        mem.write_obj(v.to_le(), GuestAddress(self.avail + 4 + 2 * u64::from(self.size))).expect("avail ring");
    }

    /// New used entries, as (id, len, the chain as written if known). Checks
    /// what any device must respect: a used id names a descriptor of the
    /// ring, and the used index never runs ahead of what was made available
    /// (unless the rings were made [`DriverQueue::hostile`]: then the device
    /// may have been told to write over them).
    pub fn take_used(&mut self, mem: &Mem) -> Vec<(u32, u32, Option<Vec<Desc>>)> {
        let idx = u16::from_le(mem.read_obj(GuestAddress(self.used + 2)).expect("used ring"));
        let new = idx.wrapping_sub(self.used_seen);
        if !self.hostile {
            let outstanding = self.avail_idx.wrapping_sub(self.used_seen);
            assert!(new <= outstanding, "used index {idx} ran {new} ahead, only {outstanding} chains were available");
        }
        let mut out = Vec::new();
        for _ in 0..new.min(self.size) {
            let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id = u32::from_le(mem.read_obj(GuestAddress(e)).expect("used ring"));
            let len = u32::from_le(mem.read_obj(GuestAddress(e + 4)).expect("used ring"));
            assert!(
                self.hostile || id < u32::from(self.size),
                "used id {id} is not a descriptor of a ring of {}",
                self.size
            );
            let chain = self.chains.remove(&(id as u16)).map(|(idxs, descs)| {
                self.free.extend(idxs);
                descs
            });
            out.push((id, len, chain));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        self.used_seen = idx;
        out
    }
}

fn link(d: &Desc, last: bool, next: u16) -> (u16, u16) {
    match d.next {
        Some(n) => (d.flags | F_NEXT, n),
        None if last => (d.flags & !F_NEXT, 0),
        None => (d.flags | F_NEXT, next),
    }
}

/// Whether a chain lets the device write into `[lo, hi)` (where the rings
/// and indirect tables are), or makes it follow an indirect table nobody
/// wrote as one: afterwards the rings may hold anything, and only "no
/// panic, no hang" is checked.
pub fn reaches(descs: &[Desc], lo: u64, hi: u64) -> bool {
    descs.iter().any(|d| {
        d.flags & F_INDIRECT != 0 || (d.writable() && d.addr < hi && d.addr.saturating_add(u64::from(d.len)) > lo)
    })
}

/// Total length of the device-writable descriptors of a chain.
pub fn writable_len(descs: &[Desc]) -> u64 {
    descs.iter().filter(|d| d.writable()).map(|d| u64::from(d.len)).sum()
}

/// An address: mostly one of the device's interesting places (plus a small
/// offset), sometimes anything.
pub fn pick_addr(u: &mut Unstructured, palette: &[u64]) -> Result<u64> {
    Ok(match u.int_in_range(0u8..=15)? {
        0 => u.arbitrary::<u64>()?,
        1 => u64::MAX - u64::from(u.arbitrary::<u8>()?),
        2 => palette[u.choose_index(palette.len())?].wrapping_sub(u64::from(u.arbitrary::<u8>()?)),
        _ => palette[u.choose_index(palette.len())?].wrapping_add(u64::from(u.arbitrary::<u8>()?) * 8),
    })
}

/// A length: mostly one of the device's meaningful sizes, sometimes
/// anything.
pub fn pick_len(u: &mut Unstructured, typical: &[u32]) -> Result<u32> {
    Ok(match u.int_in_range(0u8..=15)? {
        0 => u.arbitrary::<u32>()?,
        1 => 0,
        2 => u32::from(u.arbitrary::<u8>()?),
        3 => u32::from(u.arbitrary::<u16>()?),
        _ => typical[u.choose_index(typical.len())?],
    })
}

/// One random corruption of a well-formed chain (or none); true if the
/// chain was changed.
pub fn corrupt(u: &mut Unstructured, descs: &mut Vec<Desc>, palette: &[u64], lens: &[u32], qsize: u16) -> Result<bool> {
    if descs.is_empty() || u.ratio(3, 4)? {
        return Ok(false);
    }
    let i = u.choose_index(descs.len())?;
    match u.int_in_range(0u8..=6)? {
        0 => descs[i].addr = pick_addr(u, palette)?,
        1 => descs[i].len = pick_len(u, lens)?,
        2 => descs[i].flags ^= F_WRITE,
        3 => descs[i].flags ^= F_INDIRECT,
        4 => descs[i].next = Some(u.int_in_range(0..=qsize.saturating_add(2))?),
        5 => {
            descs.remove(i);
        }
        _ => {
            let d = descs[i];
            descs.insert(i, d);
        }
    }
    Ok(true)
}

/// A queue size the transport accepts (a power of two up to `max`).
pub fn pick_queue_size(u: &mut Unstructured, max: u16) -> Result<u16> {
    let sizes: Vec<u16> = (0..16).map(|s| 1u16 << s).filter(|&s| s <= max).collect();
    Ok(sizes[u.choose_index(sizes.len())?])
}
