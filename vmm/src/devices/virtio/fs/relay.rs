//! The relay worker: moves FUSE requests between the guest's virtqueues and
//! the shadow virtqueues that virtiofsd serves, copying every byte.
//!
//! One thread serves all queues of a device. Events: a guest kick (pop
//! chains, copy them into the bounce region, publish them, kick virtiofsd),
//! a virtiofsd call (copy answers back, complete guest chains, interrupt the
//! guest, then retry guest requests that waited for room), the vhost-user
//! socket hanging up (virtiofsd is gone: every request in flight and every
//! later one is answered with EIO, so no guest process hangs on the mount),
//! and a control event (pause, stop).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use log::{debug, error, warn};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::super::{GuestMemory, Interrupt};
use super::shadow::{InFlight, Seg, ShadowRing};

#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(feature = "fuzzing"), allow(dead_code, unused_imports))]
pub mod fuzzing;

/// Largest request (device-readable + device-writable bytes) relayed.
///
/// The Linux driver caps a request's pages at `min(FUSE_MAX_MAX_PAGES = 256,
/// queue size - 4)` and virtiofsd announces `max_pages` = 256 (1 MiB
/// `max_write`) in FUSE_INIT: the largest requests are a 1 MiB WRITE (80
/// header bytes + 1 MiB readable, 24 writable) or READ (64 readable, 16
/// header bytes + 1 MiB writable). xattr values are at most 64 KiB. Larger
/// chains are refused with EIO.
pub const MAX_REQUEST_BYTES: u64 = (1 << 20) + (64 << 10);
/// Most descriptors in one guest chain (256 data pages plus headers fit
/// with room to spare; more is refused).
pub const MAX_CHAIN_DESCS: usize = 1024;

/// Writable room virtiofsd always gets for a reply (more than any reply
/// that is not data: entry + open out of FUSE_CREATE is 160 bytes).
pub const MIN_REPLY_ROOM: u64 = 4096;
/// `struct fuse_in_header` and `struct fuse_out_header` sizes.
pub const FUSE_IN_HEADER_LEN: u32 = 40;
pub const FUSE_OUT_HEADER_LEN: u32 = 16;
const FUSE_FORGET: u32 = 2;
const FUSE_BATCH_FORGET: u32 = 42;
const EIO: i32 = 5;

/// Pause/stop requests from the device to its worker.
#[derive(Debug, Default)]
pub struct Control {
    pub pause: bool,
    pub stop: bool,
    /// Set by the worker: paused with nothing in flight.
    pub idle: bool,
}

/// Shared between the device and its worker.
pub struct Shared {
    pub control: Mutex<Control>,
    pub changed: Condvar,
    pub evt: EventFd,
    pub broken: Arc<AtomicBool>,
    /// Requests relayed and not answered yet (updated by the worker).
    pub in_flight: AtomicUsize,
}

/// One queue: the guest side and its shadow.
pub struct RelayQueue {
    /// None: the driver did not set this queue up.
    pub guest: Option<Queue>,
    pub guest_evt: EventFd,
    pub shadow: ShadowRing,
    /// virtiofsd signals this when it used shadow descriptors.
    pub call: EventFd,
    /// Written to kick virtiofsd.
    pub kick: EventFd,
}

pub struct Relay {
    pub mem: GuestMemory,
    pub bounce: GuestMemory,
    pub interrupt: Arc<Interrupt>,
    pub queues: Vec<RelayQueue>,
    pub shared: Arc<Shared>,
    pub sock_fd: RawFd,
    pub socket: PathBuf,
}

/// What became of one guest chain.
enum Outcome {
    /// Complete it now with this used length.
    Done(u32),
    /// Relayed to virtiofsd.
    Relayed,
    /// No room in the bounce region: put it back, retry later.
    NoRoom,
}

/// A guest chain, read and checked.
struct Chain {
    head: u16,
    rsegs: Vec<Seg>,
    wsegs: Vec<Seg>,
    rlen: u64,
    wlen: u64,
}

enum Parsed {
    Ok(Chain),
    /// Malformed: complete with length 0.
    Bad(&'static str),
    /// Well formed but too big: answer EIO if possible.
    TooBig(Chain, &'static str),
}

fn parse_chain(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> Parsed {
    let head = chain.head_index();
    let mut c = Chain { head, rsegs: Vec::new(), wsegs: Vec::new(), rlen: 0, wlen: 0 };
    let mut count = 0usize;
    let mut too_long = false;
    for d in chain {
        count += 1;
        if count > MAX_CHAIN_DESCS {
            too_long = true;
            break;
        }
        if d.len() == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Parsed::Bad("buffer outside guest memory");
        }
        let seg = Seg { addr: d.addr(), len: d.len() };
        if d.is_write_only() {
            c.wlen += u64::from(d.len());
            c.wsegs.push(seg);
        } else if !c.wsegs.is_empty() {
            return Parsed::Bad("device-readable descriptor after a device-writable one");
        } else {
            c.rlen += u64::from(d.len());
            c.rsegs.push(seg);
        }
    }
    if count == 0 {
        return Parsed::Bad("empty chain");
    }
    if too_long {
        return Parsed::TooBig(c, "more than MAX_CHAIN_DESCS descriptors");
    }
    Parsed::Ok(c)
}

/// Copies guest `segs` into the bounce region at `off`.
pub(super) fn copy_in(
    mem: &GuestMemory,
    segs: &[Seg],
    bounce: &GuestMemory,
    mut off: u64,
) -> Result<(), vm_memory::GuestMemoryError> {
    for s in segs {
        for slice in mem.get_slices(s.addr, s.len as usize) {
            let slice = slice?;
            let dst = bounce.get_slice(GuestAddress(off), slice.len())?;
            slice.copy_to_volatile_slice(dst);
            off += slice.len() as u64;
        }
    }
    Ok(())
}

/// Copies up to `len` bytes from the bounce region at `off` into guest
/// `segs`; returns how many fit.
pub(super) fn copy_out(
    bounce: &GuestMemory,
    mut off: u64,
    len: u32,
    mem: &GuestMemory,
    segs: &[Seg],
) -> Result<u32, vm_memory::GuestMemoryError> {
    let mut left = len as usize;
    for s in segs {
        if left == 0 {
            break;
        }
        let n = left.min(s.len as usize);
        for slice in mem.get_slices(s.addr, n) {
            let dst = slice?;
            let src = bounce.get_slice(GuestAddress(off), dst.len())?;
            src.copy_to_volatile_slice(dst);
            off += src.len() as u64;
        }
        left -= n;
    }
    Ok(len - left as u32)
}

/// Gathers the first `buf.len()` readable bytes of a chain.
fn gather(mem: &GuestMemory, segs: &[Seg], buf: &mut [u8]) -> bool {
    let mut done = 0;
    for s in segs {
        if done == buf.len() {
            break;
        }
        let n = (buf.len() - done).min(s.len as usize);
        if mem.read_slice(&mut buf[done..done + n], s.addr).is_err() {
            return false;
        }
        done += n;
    }
    done == buf.len()
}

/// Writes a FUSE error reply (`fuse_out_header` only) into the writable
/// buffers; returns the used length (0 if there is no room).
fn error_reply(mem: &GuestMemory, wsegs: &[Seg], unique: u64, errno: i32) -> u32 {
    let mut h = [0u8; FUSE_OUT_HEADER_LEN as usize];
    h[..4].copy_from_slice(&FUSE_OUT_HEADER_LEN.to_le_bytes());
    h[4..8].copy_from_slice(&(-errno).to_le_bytes());
    h[8..].copy_from_slice(&unique.to_le_bytes());
    let mut done = 0usize;
    for s in wsegs {
        if done == h.len() {
            break;
        }
        let n = (h.len() - done).min(s.len as usize);
        if mem.write_slice(&h[done..done + n], s.addr).is_err() {
            return 0;
        }
        done += n;
    }
    if done == h.len() {
        FUSE_OUT_HEADER_LEN
    } else {
        0
    }
}

const CTL_TOKEN: u64 = u64::MAX;
const SOCK_TOKEN: u64 = u64::MAX - 1;
const CALL_BASE: u64 = 1 << 32;

impl Relay {
    fn broken(&self) -> bool {
        self.shared.broken.load(Ordering::SeqCst)
    }

    /// Reads the FUSE header, picks room in the bounce region, copies the
    /// request in and publishes it.
    fn relay_chain(&mut self, qi: usize, c: Chain) -> Outcome {
        let mut hdr = [0u8; FUSE_IN_HEADER_LEN as usize];
        if c.rlen < u64::from(FUSE_IN_HEADER_LEN) || !gather(&self.mem, &c.rsegs, &mut hdr) {
            debug!("virtio-fs: queue {qi}: chain {} has no FUSE request header; dropped", c.head);
            return Outcome::Done(0);
        }
        let opcode = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        let unique = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        if self.broken() {
            return Outcome::Done(error_reply(&self.mem, &c.wsegs, unique, EIO));
        }
        // virtiofsd exits on a request shorter than its header says (the
        // Linux driver sends exactly `len` readable bytes).
        let hlen = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        if u64::from(hlen) != c.rlen {
            debug!("virtio-fs: queue {qi}: request header says {hlen} bytes, the chain has {}; answered EIO", c.rlen);
            return Outcome::Done(error_reply(&self.mem, &c.wsegs, unique, EIO));
        }
        // virtiofsd also exits when a reply does not fit: it always gets
        // room for one (only forgets have none); what does not fit the
        // guest's buffers is cut off on the way back.
        let shadow_wlen =
            if opcode == FUSE_FORGET || opcode == FUSE_BATCH_FORGET { c.wlen } else { c.wlen.max(MIN_REPLY_ROOM) };
        let q = &mut self.queues[qi];
        let limit = MAX_REQUEST_BYTES.min(q.shadow.capacity());
        let total = c.rlen + shadow_wlen;
        if total > limit {
            warn!(
                "virtio-fs: queue {qi}: request of {total} bytes (opcode {opcode}) is over the \
                 {limit}-byte relay limit; answered EIO"
            );
            return Outcome::Done(error_reply(&self.mem, &c.wsegs, unique, EIO));
        }
        let Some(r) = q.shadow.reserve(total) else {
            if q.shadow.in_flight() == 0 {
                // Cannot happen (an empty arena takes any request under the
                // limit); never wait for an answer that will not come.
                error!("virtio-fs: queue {qi}: no room for {total} bytes with nothing in flight; answered EIO");
                return Outcome::Done(error_reply(&self.mem, &c.wsegs, unique, EIO));
            }
            return Outcome::NoRoom;
        };
        if let Err(e) = copy_in(&self.mem, &c.rsegs, &self.bounce, r.off) {
            warn!("virtio-fs: queue {qi}: copying a request: {e}");
            q.shadow.cancel(r);
            return Outcome::Done(0);
        }
        // What virtiofsd gets is the copy: check that the header checked
        // above is the one copied (the guest may rewrite it meanwhile).
        let mut copied = [0u8; 16];
        if self.bounce.read_slice(&mut copied, GuestAddress(r.off)).is_err() || copied != hdr[..16] {
            debug!("virtio-fs: queue {qi}: request header changed while being copied; answered EIO");
            q.shadow.cancel(r);
            return Outcome::Done(error_reply(&self.mem, &c.wsegs, unique, EIO));
        }
        // Both fit in u32: total <= MAX_REQUEST_BYTES.
        let (rlen, wlen) = (c.rlen as u32, shadow_wlen as u32);
        if let Err(e) = q.shadow.submit(&self.bounce, r, c.head, rlen, wlen, c.wsegs, unique) {
            error!("virtio-fs: queue {qi}: publishing a request: {e}");
            return Outcome::Done(0);
        }
        Outcome::Relayed
    }

    /// Takes the guest's available chains; returns (guest needs an
    /// interrupt, virtiofsd needs a kick).
    fn serve_guest(&mut self, qi: usize) -> (bool, bool) {
        // Out of `self` while chains are relayed (which borrows the rest).
        let Some(mut q) = self.queues[qi].guest.take() else {
            return (false, false);
        };
        let r = self.serve_guest_queue(qi, &mut q);
        self.queues[qi].guest = Some(q);
        r
    }

    fn serve_guest_queue(&mut self, qi: usize, q: &mut Queue) -> (bool, bool) {
        let (mut used_any, mut relayed) = (false, false);
        let mut idle_rounds = 0;
        let mem = self.mem.clone();
        loop {
            if let Err(e) = q.disable_notification(&mem) {
                warn!("virtio-fs: queue {qi}: disabling notifications: {e}");
                break;
            }
            let mut progressed = false;
            while let Some(chain) = q.pop_descriptor_chain(&mem) {
                progressed = true;
                let head = chain.head_index();
                let outcome = match parse_chain(&mem, chain) {
                    Parsed::Ok(c) => self.relay_chain(qi, c),
                    Parsed::Bad(why) => {
                        debug!("virtio-fs: queue {qi}: chain {head}: {why}; dropped");
                        Outcome::Done(0)
                    }
                    Parsed::TooBig(c, why) => {
                        warn!("virtio-fs: queue {qi}: chain {head}: {why}; answered EIO");
                        let mut hdr = [0u8; 16];
                        let len = if gather(&mem, &c.rsegs, &mut hdr) {
                            let unique = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
                            error_reply(&mem, &c.wsegs, unique, EIO)
                        } else {
                            0
                        };
                        Outcome::Done(len)
                    }
                };
                match outcome {
                    Outcome::Done(len) => match q.add_used(&mem, head, len) {
                        Ok(()) => used_any = true,
                        Err(e) => warn!("virtio-fs: queue {qi}: returning chain {head}: {e}"),
                    },
                    Outcome::Relayed => relayed = true,
                    Outcome::NoRoom => {
                        // Back into the avail ring; retried when virtiofsd
                        // answers something (something is in flight).
                        q.set_next_avail(q.next_avail().wrapping_sub(1));
                        return (used_any, relayed);
                    }
                }
            }
            match q.enable_notification(&mem) {
                // More requests arrived while notifications were off.
                // Without progress in two rounds the avail ring is broken
                // (e.g. an avail idx running ahead by more than the queue
                // size): stop instead of spinning.
                Ok(true) => {
                    idle_rounds = if progressed { 0 } else { idle_rounds + 1 };
                    if idle_rounds >= 2 {
                        warn!("virtio-fs: queue {qi}: avail ring makes no progress; ignored until the next kick");
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    warn!("virtio-fs: queue {qi}: enabling notifications: {e}");
                    break;
                }
            }
        }
        (used_any, relayed)
    }

    /// Completes one answered request in the guest.
    fn complete(&mut self, qi: usize, e: &InFlight, len: u32) -> bool {
        let len = match copy_out(&self.bounce, e.off + u64::from(e.rlen), len, &self.mem, &e.wsegs) {
            Ok(n) => {
                if n < len {
                    debug!("virtio-fs: queue {qi}: a {len}-byte answer cut to the guest's {n}-byte buffer");
                }
                n
            }
            Err(err) => {
                warn!("virtio-fs: queue {qi}: copying an answer to the guest: {err}");
                0
            }
        };
        let Some(q) = self.queues[qi].guest.as_mut() else {
            return false;
        };
        match q.add_used(&self.mem, e.head, len) {
            Ok(()) => true,
            Err(err) => {
                warn!("virtio-fs: queue {qi}: returning chain {}: {err}", e.head);
                false
            }
        }
    }

    /// Collects virtiofsd's answers; returns whether any guest chain was
    /// completed.
    fn serve_shadow(&mut self, qi: usize) -> bool {
        let mut used_any = false;
        while let Some((e, len)) = self.queues[qi].shadow.pop_used(&self.bounce) {
            used_any |= self.complete(qi, &e, len);
            self.queues[qi].shadow.release(&e);
        }
        used_any
    }

    /// virtiofsd is gone: answer everything in flight with EIO.
    fn fail_in_flight(&mut self) -> Vec<usize> {
        let mut touched = Vec::new();
        for qi in 0..self.queues.len() {
            let lost = self.queues[qi].shadow.take_all();
            if lost.is_empty() {
                continue;
            }
            for e in &lost {
                let len = error_reply(&self.mem, &e.wsegs, e.unique, EIO);
                if let Some(q) = self.queues[qi].guest.as_mut() {
                    if let Err(err) = q.add_used(&self.mem, e.head, len) {
                        warn!("virtio-fs: queue {qi}: returning chain {}: {err}", e.head);
                    }
                }
            }
            touched.push(qi);
        }
        touched
    }

    /// virtiofsd hung up: from now on every request is answered with EIO,
    /// starting with those in flight, then those waiting in the guest's
    /// rings for room (unless paused: taken at resume). No answer will
    /// come to retry the waiting ones, and the guest made them available
    /// long ago: it will not kick for them again.
    fn backend_gone(&mut self, paused: bool) {
        self.shared.broken.store(true, Ordering::SeqCst);
        for qi in self.fail_in_flight() {
            self.notify_guest(qi);
        }
        if !paused {
            for qi in 0..self.queues.len() {
                self.turn(qi, false);
            }
        }
    }

    fn notify_guest(&mut self, qi: usize) {
        let Some(q) = self.queues[qi].guest.as_mut() else {
            return;
        };
        let needed = q.needs_notification(&self.mem).unwrap_or_else(|e| {
            warn!("virtio-fs: queue {qi}: checking whether to notify: {e}");
            true
        });
        if needed {
            if let Err(e) = self.interrupt.signal_used_queue() {
                error!("virtio-fs: raising the interrupt: {e}");
            }
        }
    }

    fn kick(&self, qi: usize) {
        if let Err(e) = self.queues[qi].kick.write(1) {
            warn!("virtio-fs: kicking virtiofsd on queue {qi}: {e}");
        }
    }

    fn in_flight(&self) -> usize {
        self.queues.iter().map(|q| q.shadow.in_flight()).sum()
    }

    /// A queue's full turn: answers first (they free room), then new
    /// requests.
    fn turn(&mut self, qi: usize, paused: bool) {
        let mut notify = self.serve_shadow(qi);
        if !paused {
            let (used, relayed) = self.serve_guest(qi);
            notify |= used;
            if relayed {
                self.kick(qi);
            }
        }
        if notify {
            self.notify_guest(qi);
        }
    }

    /// Publishes the pause state; returns (stop, pause).
    fn check_control(&self) -> (bool, bool) {
        let in_flight = self.in_flight();
        self.shared.in_flight.store(in_flight, Ordering::SeqCst);
        let mut c = self.shared.control.lock().unwrap_or_else(|p| p.into_inner());
        let idle = c.pause && in_flight == 0;
        if c.idle != idle {
            c.idle = idle;
            self.shared.changed.notify_all();
        }
        (c.stop, c.pause)
    }

    pub fn run(mut self) {
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                error!("virtio-fs: relay epoll: {e}");
                return;
            }
        };
        let mut fds = vec![(self.shared.evt.as_raw_fd(), CTL_TOKEN, EventSet::IN)];
        fds.push((self.sock_fd, SOCK_TOKEN, EventSet::READ_HANG_UP));
        for (i, q) in self.queues.iter().enumerate() {
            fds.push((q.guest_evt.as_raw_fd(), i as u64, EventSet::IN));
            fds.push((q.call.as_raw_fd(), CALL_BASE + i as u64, EventSet::IN));
        }
        for (fd, token, set) in fds {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token)) {
                error!("virtio-fs: relay epoll_ctl: {e}");
                return;
            }
        }
        // Requests queued before activation (or before a snapshot).
        let (stop, mut paused) = self.check_control();
        if stop {
            return;
        }
        for qi in 0..self.queues.len() {
            self.turn(qi, paused);
        }
        let mut events = vec![EpollEvent::default(); 2 * self.queues.len() + 2];
        loop {
            let (stop, pause) = self.check_control();
            if stop {
                return;
            }
            if paused && !pause {
                // Resumed: take what the guest queued meanwhile.
                for qi in 0..self.queues.len() {
                    self.turn(qi, false);
                }
            }
            paused = pause;
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("virtio-fs: relay epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    CTL_TOKEN => {
                        let _ = self.shared.evt.read();
                    }
                    SOCK_TOKEN => {
                        error!(
                            "virtio-fs: virtiofsd at {} disconnected; device stopped (requests now fail with EIO)",
                            self.socket.display()
                        );
                        let _ = epoll.ctl(ControlOperation::Delete, self.sock_fd, EpollEvent::default());
                        self.backend_gone(paused);
                        // Calls are meaningless now.
                        for q in &self.queues {
                            let _ = epoll.ctl(ControlOperation::Delete, q.call.as_raw_fd(), EpollEvent::default());
                        }
                    }
                    t if t >= CALL_BASE && ((t - CALL_BASE) as usize) < self.queues.len() => {
                        let qi = (t - CALL_BASE) as usize;
                        let _ = self.queues[qi].call.read();
                        self.turn(qi, paused);
                    }
                    t if (t as usize) < self.queues.len() => {
                        let qi = t as usize;
                        let _ = self.queues[qi].guest_evt.read();
                        if !paused {
                            self.turn(qi, false);
                        }
                    }
                    t => debug!("virtio-fs: unexpected epoll token {t}"),
                }
            }
        }
    }
}
