//! virtio-fs relay: guest FUSE request chains on the hiprio and request
//! queues, copied by the relay into the shadow rings; this target plays
//! virtiofsd on the shadow side (answers of any length, bogus used ids,
//! used indices running ahead, hanging up) and the guest driver on the
//! other.
//!
//! Checked besides "no panic, no hang": what virtiofsd is handed (chains of
//! a readable then a writable part inside the queue's arena, a readable
//! part exactly as long as its FUSE header says, at least MIN_REPLY_ROOM
//! bytes of reply room except for forgets, a request no larger than the
//! relay limit, arena ranges of requests in flight never overlapping, the
//! request bytes identical to the guest's) and the guest's used rings.

#![no_main]

use std::collections::HashMap;

use hull_fuzz::guest::arbitrary::{Result, Unstructured};
use hull_fuzz::guest::*;
use hull_vmm::devices::virtio::fs::fuzzing::{FuzzRelay, ShadowLayout, FUSE_IN_HEADER_LEN, MIN_REPLY_ROOM};
use hull_vmm::devices::virtio::fs::MAX_REQUEST_BYTES;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM_END: u64 = 0x40_0000;
const BOUNDARY: u64 = 0x20_0000;
const RINGS: [(u64, u64, u64); 2] = [(0x0, 0x1000, 0x2000), (0x4000, 0x5000, 0x6000)];
const INDIRECT: u64 = 0x1_0000; // .. 0x5_0000
const RINGS_END: u64 = 0x5_0000;
const REQ: u64 = 0x10_0000; // request buffers, 16 slots of 0x1000
const REPLY: u64 = 0x20_0000 - 0x800; // reply buffers, across the boundary
const BIG: u64 = 0x28_0000; // a large buffer (reads, writes)
const JUNK: u64 = 0x3F_0000;

const PALETTE: &[u64] = &[REQ, REPLY, BIG, JUNK, BOUNDARY - 8, MEM_END - 16, MEM_END, 0x4000];
const LENS: &[u32] = &[0, 16, 40, 41, 80, 4096, 0x1_0000, 0x10_0000, 0x11_0000];
const FORGET: u32 = 2;
const BATCH_FORGET: u32 = 42;

/// A request virtiofsd holds.
struct Held {
    id: u16,
    off: u64,
    end: u64,
    wlen: u32,
}

/// The virtiofsd side of one shadow ring.
struct Backend {
    l: ShadowLayout,
    last_avail: u16,
    used_idx: u16,
    held: Vec<Held>,
    /// Bogus used entries were sent: the relay may have completed requests
    /// this side still holds.
    bogus: bool,
}

impl Backend {
    /// Takes the new shadow requests and checks each.
    fn pop(&mut self, b: &Mem, guest: Option<&HashMap<u64, Vec<u8>>>) {
        let avail: u16 = b.read_obj(GuestAddress(self.l.avail + 2)).unwrap();
        while self.last_avail != avail {
            let pos = u64::from(self.last_avail % self.l.size);
            let head: u16 = b.read_obj(GuestAddress(self.l.avail + 4 + 2 * pos)).unwrap();
            self.last_avail = self.last_avail.wrapping_add(1);
            assert!(head < self.l.size, "shadow head {head}");
            let mut descs = Vec::new();
            let mut i = head;
            loop {
                let a = self.l.desc + 16 * u64::from(i);
                let addr: u64 = b.read_obj(GuestAddress(a)).unwrap();
                let len: u32 = b.read_obj(GuestAddress(a + 8)).unwrap();
                let flags: u16 = b.read_obj(GuestAddress(a + 12)).unwrap();
                let next: u16 = b.read_obj(GuestAddress(a + 14)).unwrap();
                descs.push((addr, len, flags));
                assert!(descs.len() <= 2, "shadow chain longer than 2: {descs:x?}");
                if flags & F_NEXT == 0 {
                    break;
                }
                assert!(next < self.l.size);
                i = next;
            }
            let arena = self.l.arena..self.l.arena + self.l.arena_len;
            for &(addr, len, _) in &descs {
                assert!(
                    arena.contains(&addr) && addr + u64::from(len) <= arena.end && len > 0,
                    "shadow buffer {addr:#x}+{len:#x} outside the arena {arena:x?}"
                );
            }
            let (r, w) = match descs.as_slice() {
                [(a, l, 0)] => (Some((*a, *l)), None),
                [(a, l, F_WRITE)] => (None, Some((*a, *l))),
                [(a, l, F_NEXT), (wa, wl, F_WRITE)] => {
                    assert_eq!(*wa, a + u64::from(*l), "reply room right after the request");
                    (Some((*a, *l)), Some((*wa, *wl)))
                }
                other => panic!("shadow chain shape {other:x?}"),
            };
            let off = r.or(w).unwrap().0;
            let rlen = r.map_or(0, |x| x.1);
            let wlen = w.map_or(0, |x| x.1);
            assert!(u64::from(rlen) + u64::from(wlen) <= MAX_REQUEST_BYTES);
            if let Some((a, l)) = r {
                let mut req = vec![0u8; l as usize];
                b.read_slice(&mut req, GuestAddress(a)).unwrap();
                assert!(l >= FUSE_IN_HEADER_LEN, "request of {l} bytes");
                let hlen = u32::from_le_bytes(req[..4].try_into().unwrap());
                assert_eq!(hlen, l, "FUSE header length {hlen} for {l} request bytes");
                let opcode = u32::from_le_bytes(req[4..8].try_into().unwrap());
                if opcode != FORGET && opcode != BATCH_FORGET {
                    assert!(u64::from(wlen) >= MIN_REPLY_ROOM, "opcode {opcode}: {wlen} bytes of reply room");
                }
                let unique = u64::from_le_bytes(req[8..16].try_into().unwrap());
                if let Some(g) = guest.and_then(|g| g.get(&unique)) {
                    let n = g.len().min(req.len());
                    assert_eq!(&req[..n], &g[..n], "request {unique} differs from the guest's bytes");
                }
            } else {
                assert!(u64::from(wlen) >= MIN_REPLY_ROOM);
            }
            let end = off + u64::from(rlen) + u64::from(wlen);
            if !self.bogus {
                for h in &self.held {
                    assert!(end <= h.off || off >= h.end, "arena ranges of requests in flight overlap");
                }
            }
            self.held.push(Held { id: head, off, end, wlen });
        }
    }

    fn push_used(&mut self, b: &Mem, id: u32, len: u32) {
        let e = self.l.used + 4 + 8 * u64::from(self.used_idx % self.l.size);
        b.write_obj(id, GuestAddress(e)).unwrap();
        b.write_obj(len, GuestAddress(e + 4)).unwrap();
        self.used_idx = self.used_idx.wrapping_add(1);
        b.write_obj(self.used_idx, GuestAddress(self.l.used + 2)).unwrap();
    }

    /// Answers some requests (or sends junk).
    fn answer(&mut self, u: &mut Unstructured, b: &Mem) -> Result<()> {
        for _ in 0..u.int_in_range(0..=4)? {
            match u.int_in_range(0u8..=9)? {
                0 => {
                    let (id, len) = (u.arbitrary()?, u.arbitrary()?);
                    self.push_used(b, id, len);
                    self.bogus = true;
                }
                1 => {
                    self.used_idx = self.used_idx.wrapping_add(u.arbitrary()?);
                    b.write_obj(self.used_idx, GuestAddress(self.l.used + 2)).unwrap();
                    self.bogus = true;
                }
                _ if !self.held.is_empty() => {
                    let h = self.held.remove(u.choose_index(self.held.len())?);
                    let len = match u.int_in_range(0u8..=4)? {
                        0 => u.arbitrary()?,
                        1 => h.wlen,
                        _ => 16.min(h.wlen),
                    };
                    if h.wlen > 0 {
                        // The reply: a fuse_out_header and what the input has.
                        let at = h.off + u64::from(self.rlen_of(b, h.id));
                        let n = (h.wlen as usize).min(u.len()).min(64);
                        let bytes = u.bytes(n)?;
                        b.write_slice(bytes, GuestAddress(at)).unwrap();
                    }
                    self.push_used(b, u32::from(h.id), len);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The readable length of the shadow chain at `head` (0: none).
    fn rlen_of(&self, b: &Mem, head: u16) -> u32 {
        let a = self.l.desc + 16 * u64::from(head);
        let flags: u16 = b.read_obj(GuestAddress(a + 12)).unwrap();
        if flags & F_WRITE != 0 {
            0
        } else {
            b.read_obj(GuestAddress(a + 8)).unwrap()
        }
    }
}

/// A FUSE request of `rlen` bytes (header + body) in one or more readable
/// buffers, then writable buffers; maybe corrupted.
fn request(u: &mut Unstructured, mem: &Mem, slot: u64, unique: u64, qsize: u16) -> Result<(Vec<Desc>, Vec<u8>)> {
    let opcode: u32 = match u.int_in_range(0u8..=7)? {
        0 => FORGET,
        1 => BATCH_FORGET,
        2 => 15, // READ
        3 => 16, // WRITE
        4 => u.arbitrary()?,
        _ => 1, // LOOKUP
    };
    let body = u.int_in_range(0..=200usize)?;
    let rlen = FUSE_IN_HEADER_LEN as usize + body;
    let mut req = vec![0u8; rlen];
    // Only these bytes are compared with what virtiofsd gets.
    let hlen = match u.int_in_range(0u8..=9)? {
        0 => u.arbitrary()?,
        1 => rlen as u32 + 1,
        _ => rlen as u32,
    };
    req[..4].copy_from_slice(&hlen.to_le_bytes());
    req[4..8].copy_from_slice(&opcode.to_le_bytes());
    req[8..16].copy_from_slice(&unique.to_le_bytes());
    let tail = u.bytes(body.min(u.len()))?;
    req[FUSE_IN_HEADER_LEN as usize..FUSE_IN_HEADER_LEN as usize + tail.len()].copy_from_slice(tail);
    let at = REQ + 0x1000 * slot;
    mem.write_slice(&req, GuestAddress(at)).unwrap();
    let mut descs = Vec::new();
    if u.ratio(1, 3)? {
        // Header split over two descriptors.
        let cut = u.int_in_range(1..=rlen - 1)?;
        descs.push(Desc::new(at, cut as u32, false));
        descs.push(Desc::new(at + cut as u64, (rlen - cut) as u32, false));
    } else {
        descs.push(Desc::new(at, rlen as u32, false));
    }
    if opcode == 16 && u.ratio(1, 2)? {
        // WRITE data from the big buffer (its bytes are part of the request).
        let n = [4096u32, 0x1_0000, 0x10_0000, 0x10_1000][u.choose_index(4)?];
        descs.push(Desc::new(BIG, n, false));
        let hl = (rlen as u32 + n).to_le_bytes();
        mem.write_slice(&hl, GuestAddress(at)).unwrap();
        req[..4].copy_from_slice(&hl);
    }
    let w = match u.int_in_range(0u8..=5)? {
        0 => None,
        1 => Some((REPLY, 8)),
        2 => Some((BIG, [0x1_0000, 0x10_0000, 0x11_0000, 0x18_0000][u.choose_index(4)?])),
        _ => Some((REPLY + 0x100 * slot, 0x100)),
    };
    if let Some((a, l)) = w {
        if u.ratio(1, 4)? {
            descs.push(Desc::new(a, l / 2, true));
            descs.push(Desc::new(a + u64::from(l / 2), l - l / 2, true));
        } else {
            descs.push(Desc::new(a, l, true));
        }
    }
    if corrupt(u, &mut descs, PALETTE, LENS, qsize)? {
        req.clear();
    }
    Ok((descs, req))
}

fn run(u: &mut Unstructured) -> Result<()> {
    let mem = memory(&[(0, BOUNDARY as usize), (BOUNDARY, (MEM_END - BOUNDARY) as usize)]);
    let shadow_size = pick_queue_size(u, 64)?.max(2);
    let event_idx: bool = u.arbitrary()?;
    let mut drv = Vec::new();
    let mut queues = Vec::new();
    for (qi, &(d, a, us)) in RINGS.iter().enumerate() {
        let size = pick_queue_size(u, shadow_size)?;
        let q = DriverQueue::new(&mem, d, a, us, size);
        // The driver may leave a queue unused.
        let set_up = u.ratio(if qi == 0 { 3 } else { 7 }, if qi == 0 { 4 } else { 8 })?;
        queues.push(set_up.then(|| q.queue(event_idx)));
        drv.push(q);
    }
    if queues.iter().all(Option::is_none) {
        return Ok(());
    }
    let present: Vec<bool> = queues.iter().map(Option::is_some).collect();
    let Ok(mut relay) = FuzzRelay::new(mem.clone(), queues, shadow_size) else { return Ok(()) };
    let mut be: Vec<Backend> = (0..2)
        .map(|qi| Backend { l: relay.layout(qi), last_avail: 0, used_idx: 0, held: Vec::new(), bogus: false })
        .collect();
    // Requests as the guest wrote them, by FUSE unique (uncorrupted ones).
    let mut guest_req: HashMap<u64, Vec<u8>> = HashMap::new();
    // A corrupted chain or hostile ring: replies may land anywhere, the
    // request bytes are not compared.
    let mut tainted = false;
    let mut unique = 0u64;
    let mut chains = 0u64;

    for _ in 0..u.int_in_range(1..=32)? {
        let qi = u.choose_index(2)?;
        let act = u.int_in_range(0u8..=9)?;
        if debug() {
            eprintln!("queue {qi}: action {act}, {} in flight", relay.in_flight());
        }
        match act {
            0..=3 if present[qi] => {
                let old = drv[qi].avail_idx();
                for _ in 0..u.int_in_range(1..=4)? {
                    unique += 1;
                    chains += 1;
                    let (descs, req) = request(u, &mem, unique % 16, unique, drv[qi].size)?;
                    if req.is_empty() {
                        tainted = true;
                    } else {
                        guest_req.insert(unique, req);
                    }
                    if reaches(&descs, 0, RINGS_END) {
                        drv.iter_mut().for_each(|d| d.hostile = true);
                    }
                    let ind = (u.ratio(1, 8)? && chains < 64).then_some(INDIRECT + 0x1000 * chains);
                    if debug() {
                        eprintln!("  chain {descs:x?}, indirect table {ind:x?}");
                    }
                    if drv[qi].add_chain(&mem, &descs, ind).is_none() {
                        break;
                    }
                }
                if event_idx {
                    drv[qi].set_used_event(&mem, u.arbitrary()?);
                }
                // A driver kicks when the device asks for it (and may
                // anyway).
                if drv[qi].needs_kick(&mem, event_idx, old) || u.ratio(1, 16)? {
                    relay.turn(qi);
                }
            }
            4..=6 => {
                be[qi].answer(u, relay.bounce())?;
                if u.ratio(1, 8)? {
                    // Paused for a snapshot, then resumed.
                    relay.turn_paused(qi);
                    for q in 0..2 {
                        relay.turn(q);
                    }
                } else {
                    relay.turn(qi);
                }
            }
            7 if present[qi] => match (u.int_in_range(0u8..=3)?, tainted = true).0 {
                0 => {
                    let delta = u.arbitrary()?;
                    drv[qi].jump_avail_idx(&mem, delta);
                    relay.turn(qi);
                }
                _ => {
                    let head = u.arbitrary()?;
                    drv[qi].publish_bogus(&mem, head);
                    relay.turn(qi);
                }
            },
            8 if u.ratio(1, 4)? => {
                relay.backend_gone();
                for b in &mut be {
                    b.held.clear();
                }
            }
            _ => {}
        }
        for (i, b) in be.iter_mut().enumerate() {
            b.pop(relay.bounce(), (!tainted).then_some(&guest_req));
            let _ = drv[i].take_used(&mem);
        }
        // Nothing at virtiofsd: nothing can be left waiting in a guest ring
        // (no answer will come to retry it, and the driver kicked already).
        if relay.in_flight() == 0 {
            for (i, d) in drv.iter().enumerate() {
                if present[i] && !d.hostile {
                    assert_eq!(d.outstanding(), 0, "queue {i}: requests left in the ring with nothing in flight");
                }
            }
        }
        // (Bogus used entries may delay real ones to the next call.)
        let held: usize = be.iter().map(|b| b.held.len()).sum();
        if !be.iter().any(|b| b.bogus) {
            assert!(relay.in_flight() <= held, "relay counts {} in flight, virtiofsd holds {held}", relay.in_flight());
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
