//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`;
//! the unit tests use them too): the relay without its thread or a
//! vhost-user connection. The caller
//! plays both the guest driver (guest queues) and virtiofsd (the shadow
//! rings in [`FuzzRelay::bounce`]), and says when each one kicks.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::super::{GuestMemory, Interrupt};
use super::super::shadow::{self, ShadowRing};
use super::{Control, Relay, RelayQueue, Shared};

pub use super::{FUSE_IN_HEADER_LEN, FUSE_OUT_HEADER_LEN, MIN_REPLY_ROOM};

/// Where one shadow virtqueue and its arena are in the bounce region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub arena: u64,
    pub arena_len: u64,
}

pub struct FuzzRelay {
    relay: Relay,
    layouts: Vec<ShadowLayout>,
}

impl FuzzRelay {
    /// One relay queue per entry of `queues` (queue 0 is hiprio), each with
    /// a shadow ring of `shadow_size` entries (the device's queue size).
    /// None: the driver did not set the queue up. A ready queue must be
    /// valid (the transport checks that before activation).
    pub fn new(mem: GuestMemory, queues: Vec<Option<Queue>>, shadow_size: u16) -> io::Result<FuzzRelay> {
        let sizes = vec![shadow_size; queues.len()];
        let (layouts, total) = shadow::layout(&sizes);
        let bounce = shadow::create_bounce(total)?;
        let mut relay_queues = Vec::with_capacity(queues.len());
        for (guest, l) in queues.into_iter().zip(&layouts) {
            relay_queues.push(RelayQueue {
                guest,
                guest_evt: EventFd::new(EFD_NONBLOCK)?,
                shadow: ShadowRing::new(*l, &bounce)?,
                call: EventFd::new(EFD_NONBLOCK)?,
                kick: EventFd::new(EFD_NONBLOCK)?,
            });
        }
        let shared = Arc::new(Shared {
            control: Mutex::new(Control::default()),
            changed: Condvar::new(),
            evt: EventFd::new(EFD_NONBLOCK)?,
            broken: Arc::new(AtomicBool::new(false)),
            in_flight: AtomicUsize::new(0),
        });
        let relay = Relay {
            mem,
            bounce,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK)?)),
            queues: relay_queues,
            shared,
            sock_fd: -1,
            socket: PathBuf::from("fuzz"),
        };
        let layouts = layouts
            .iter()
            .map(|l| ShadowLayout {
                size: l.size,
                desc: l.desc,
                avail: l.avail,
                used: l.used,
                arena: l.arena,
                arena_len: l.arena_len,
            })
            .collect();
        Ok(FuzzRelay { relay, layouts })
    }

    /// virtiofsd's memory: the shadow rings and arenas.
    pub fn bounce(&self) -> &GuestMemory {
        &self.relay.bounce
    }

    pub fn layout(&self, qi: usize) -> ShadowLayout {
        self.layouts[qi]
    }

    /// The guest kicked queue `qi`, or virtiofsd called on it (the relay
    /// does the same for both: collect answers, then take new requests).
    pub fn turn(&mut self, qi: usize) {
        self.relay.turn(qi, false);
    }

    /// Answers only (as while paused for a snapshot).
    pub fn turn_paused(&mut self, qi: usize) {
        self.relay.turn(qi, true);
    }

    /// virtiofsd hung up: what the relay thread does on the socket's HUP.
    pub fn backend_gone(&mut self) {
        self.relay.backend_gone(false);
    }

    /// Requests relayed and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.relay.in_flight()
    }
}
