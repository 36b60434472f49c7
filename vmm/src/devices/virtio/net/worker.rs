//! The virtio-net device thread: one epoll loop over the two queue
//! eventfds, the tap, a kill eventfd and a command eventfd (resume).
//!
//! RX: while the tap is readable and the guest has receive buffers, one
//! frame is read straight into one chain (`readv` into the checked guest
//! buffers). When the guest has no buffer left the tap is no longer polled
//! (its frames wait in the tap's queue, where the kernel drops them once it
//! is full) and RXQ notifications are turned on; the guest's next RXQ kick
//! resumes reading. TX: every chain is checked and written to the tap as
//! one frame (`writev` from the guest buffers), or dropped.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use log::{debug, error, warn};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::super::{GuestMemory, Interrupt};
use super::chain::{ChainError, Segments};
use super::tap::{Tap, VNET_HDR_LEN};
use super::{Control, NetStats, MAX_CHAIN_DESCS, MAX_FRAME_LEN, MIN_FRAME_LEN, RXQ, TXQ};

const TOKEN_RXQ: u64 = 0;
const TOKEN_TXQ: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_KILL: u64 = 3;
const TOKEN_CMD: u64 = 4;

/// Offsets in `struct virtio_net_hdr_v1`.
const HDR_FLAGS: u64 = 0;
const HDR_GSO_TYPE: usize = 1;
const HDR_NUM_BUFFERS: u64 = 10;
const GSO_ECN: u8 = 0x80;
/// Bytes in a TX chain: header plus an Ethernet header at least, header
/// plus the largest frame at most.
const TX_MIN: u64 = (VNET_HDR_LEN + MIN_FRAME_LEN) as u64;
const TX_MAX: u64 = (VNET_HDR_LEN + MAX_FRAME_LEN) as u64;

fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// What happened to one receive attempt.
enum Rx {
    /// A frame went into the chain (used length).
    Delivered(u32),
    /// The frame was consumed but not given to the guest; the chain is
    /// still free.
    Dropped,
    /// Nothing to read.
    Empty,
    /// The tap failed for good.
    Broken,
}

pub struct NetWorker {
    pub(super) mem: GuestMemory,
    pub(super) interrupt: Arc<Interrupt>,
    pub(super) rxq: Queue,
    pub(super) txq: Queue,
    pub(super) acked: u64,
    /// None: backend-less (TX dropped, nothing received), or the tap failed.
    pub(super) tap: Option<Arc<Tap>>,
    pub(super) control: Arc<Control>,
    pub(super) stats: Arc<NetStats>,
    /// The tap is in the epoll set with EPOLLIN.
    tap_polled: bool,
    /// RXQ notifications are on (we are out of receive buffers).
    rx_notify: bool,
    /// The tap failed for good (e.g. its interface was deleted); the next
    /// round takes it out of the epoll set and drops it.
    pub(super) tap_broken: bool,
}

impl NetWorker {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        rxq: Queue,
        txq: Queue,
        acked: u64,
        tap: Option<Arc<Tap>>,
        control: Arc<Control>,
        stats: Arc<NetStats>,
    ) -> Self {
        NetWorker {
            mem,
            interrupt,
            rxq,
            txq,
            acked,
            tap,
            control,
            stats,
            tap_polled: false,
            rx_notify: true,
            tap_broken: false,
        }
    }

    /// Runs until `kill_evt` fires.
    pub(super) fn run(mut self, queue_evts: [EventFd; 2], kill_evt: EventFd, cmd_evt: EventFd) {
        let epoll = match Epoll::new() {
            Ok(e) => e,
            Err(e) => {
                error!("virtio-net: worker epoll: {e}");
                return;
            }
        };
        for (fd, token) in [
            (queue_evts[RXQ].as_raw_fd(), TOKEN_RXQ),
            (queue_evts[TXQ].as_raw_fd(), TOKEN_TXQ),
            (kill_evt.as_raw_fd(), TOKEN_KILL),
            (cmd_evt.as_raw_fd(), TOKEN_CMD),
        ] {
            if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)) {
                error!("virtio-net: worker epoll_ctl: {e}");
                return;
            }
        }
        if let Some(tap) = &self.tap {
            // Registered without events; process_rx turns EPOLLIN on while
            // the guest has buffers.
            if let Err(e) =
                epoll.ctl(ControlOperation::Add, tap.as_raw_fd(), EpollEvent::new(EventSet::empty(), TOKEN_TAP))
            {
                error!("virtio-net: worker epoll_ctl (tap): {e}");
                return;
            }
        }
        // Work that may be pending already (a restored device, buffers the
        // driver queued before DRIVER_OK).
        self.round(&epoll);
        let mut events = [EpollEvent::default(); 8];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    error!("virtio-net: worker epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => return,
                    TOKEN_RXQ => {
                        let _ = queue_evts[RXQ].read();
                    }
                    TOKEN_TXQ => {
                        let _ = queue_evts[TXQ].read();
                    }
                    TOKEN_CMD => {
                        let _ = cmd_evt.read();
                    }
                    TOKEN_TAP => {
                        if ev.event_set().intersects(EventSet::ERROR | EventSet::HANG_UP)
                            && !ev.event_set().contains(EventSet::IN)
                        {
                            self.tap_failed(&epoll, "the tap reports an error or hang-up");
                        }
                    }
                    other => debug!("virtio-net: unexpected epoll token {other}"),
                }
            }
            self.round(&epoll);
        }
    }

    /// One pass over both queues (unless the VM is paused).
    fn round(&mut self, epoll: &Epoll) {
        self.stats.rounds.fetch_add(1, Ordering::Relaxed);
        let control = self.control.clone();
        let _gate = control.gate.lock().unwrap_or_else(|p| p.into_inner());
        if control.paused.load(Ordering::SeqCst) {
            // Frames wait in the tap until resume; queue kicks are picked
            // up by the round resume triggers.
            self.poll_tap(epoll, false);
            return;
        }
        let tx = self.process_tx();
        let rx = self.process_rx(Some(epoll));
        if self.tap_broken {
            self.tap_failed(epoll, "it failed");
        }
        let mut notify = false;
        if tx {
            notify |= self.txq.needs_notification(&self.mem).unwrap_or(true);
        }
        if rx {
            notify |= self.rxq.needs_notification(&self.mem).unwrap_or(true);
        }
        if notify {
            if let Err(e) = self.interrupt.signal_used_queue() {
                error!("virtio-net: raising interrupt: {e}");
            }
        }
    }

    /// The tap, unless there is none or it failed.
    fn live_tap(&self) -> Option<&Arc<Tap>> {
        self.tap.as_ref().filter(|_| !self.tap_broken)
    }

    fn poll_tap(&mut self, epoll: &Epoll, on: bool) {
        let Some(tap) = &self.tap else { return };
        if self.tap_polled == on {
            return;
        }
        let events = if on { EventSet::IN } else { EventSet::empty() };
        match epoll.ctl(ControlOperation::Modify, tap.as_raw_fd(), EpollEvent::new(events, TOKEN_TAP)) {
            Ok(()) => self.tap_polled = on,
            Err(e) => error!("virtio-net: epoll_ctl on the tap: {e}"),
        }
    }

    fn tap_failed(&mut self, epoll: &Epoll, why: &str) {
        self.tap_broken = false;
        if let Some(tap) = self.tap.take() {
            error!("virtio-net: tap {}: {why}; the device no longer sends or receives", tap.name());
            let _ = epoll.ctl(ControlOperation::Delete, tap.as_raw_fd(), EpollEvent::default());
            self.tap_polled = false;
        }
    }

    // ---- transmit -------------------------------------------------------

    /// Sends (or drops) every available TX chain. Returns whether chains
    /// were used.
    pub(super) fn process_tx(&mut self) -> bool {
        if !self.txq.ready() {
            return false;
        }
        let mut used = false;
        let mut idle_rounds = 0;
        loop {
            if let Err(e) = self.txq.disable_notification(&self.mem) {
                warn!("virtio-net: disabling TX notifications: {e}");
                break;
            }
            let mut progressed = false;
            while let Some(chain) = self.txq.pop_descriptor_chain(&self.mem) {
                progressed = true;
                let head = chain.head_index();
                let segs = Segments::collect(&self.mem, chain, false, MAX_CHAIN_DESCS, TX_MIN, TX_MAX);
                self.send(segs);
                if let Err(e) = self.txq.add_used(&self.mem, head, 0) {
                    warn!("virtio-net: returning TX chain {head}: {e}");
                }
                used = true;
            }
            match self.txq.enable_notification(&self.mem) {
                // More chains arrived meanwhile. Two rounds without
                // progress: the avail ring is broken (e.g. its index ran
                // ahead by more than the queue size); wait for a kick.
                Ok(true) => {
                    idle_rounds = if progressed { 0 } else { idle_rounds + 1 };
                    if idle_rounds >= 2 {
                        warn!("virtio-net: TX avail ring makes no progress; ignoring it until the next kick");
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    warn!("virtio-net: enabling TX notifications: {e}");
                    break;
                }
            }
        }
        used
    }

    fn drop_tx(&self, why: impl std::fmt::Display) {
        self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
        debug!("virtio-net: TX frame dropped: {why}");
    }

    /// Writes one checked TX chain to the tap.
    fn send(&mut self, segs: Result<Segments, ChainError>) {
        let segs = match segs {
            Ok(s) => s,
            Err(e) => {
                self.stats.bad_chains.fetch_add(1, Ordering::Relaxed);
                return self.drop_tx(e);
            }
        };
        // The header the tap gets is our copy, checked against what the
        // driver negotiated; the frame goes from guest memory.
        let mut hdr = [0u8; VNET_HDR_LEN];
        if !segs.read_at(&self.mem, 0, &mut hdr) {
            return self.drop_tx("header unreadable");
        }
        if let Err(why) = self.check_tx_header(&mut hdr) {
            return self.drop_tx(why);
        }
        let Some(tap) = self.live_tap().cloned() else {
            return self.drop_tx("no backend");
        };
        let mut iovs = Vec::with_capacity(8);
        iovs.push(libc::iovec { iov_base: hdr.as_mut_ptr().cast(), iov_len: hdr.len() });
        if let Err(e) = segs.iovecs(&self.mem, VNET_HDR_LEN as u64, &mut iovs) {
            return self.drop_tx(e);
        }
        match tap.writev(&iovs) {
            Ok(_) => {
                self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                self.stats.tx_bytes.fetch_add(segs.total() - VNET_HDR_LEN as u64, Ordering::Relaxed);
            }
            Err(e) if e.raw_os_error() == Some(libc::EBADFD) => {
                error!("virtio-net: tap {}: write: {e}", tap.name());
                self.drop_tx(&e);
                self.tap_broken = true;
            }
            // EIO: the interface is down; EINVAL: the kernel refused the
            // header or frame. The frame is lost either way.
            Err(e) => self.drop_tx(format!("tap write: {e}")),
        }
    }

    /// Refuses offloads the driver did not negotiate and clears header
    /// flags that mean nothing on transmit.
    fn check_tx_header(&self, hdr: &mut [u8; VNET_HDR_LEN]) -> Result<(), String> {
        let flags = hdr[0];
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 && !has(self.acked, VIRTIO_NET_F_CSUM) {
            return Err("checksum offload without VIRTIO_NET_F_CSUM".into());
        }
        hdr[0] = flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        let gso = hdr[HDR_GSO_TYPE];
        let allowed = match u32::from(gso) {
            VIRTIO_NET_HDR_GSO_NONE => true,
            VIRTIO_NET_HDR_GSO_TCPV4 => has(self.acked, VIRTIO_NET_F_HOST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => has(self.acked, VIRTIO_NET_F_HOST_TSO6),
            _ => false,
        };
        if !allowed {
            return Err(format!("GSO type {gso:#x} not negotiated"));
        }
        // num_buffers is the device's field.
        hdr[10] = 0;
        hdr[11] = 0;
        Ok(())
    }

    // ---- receive --------------------------------------------------------

    /// Moves frames from the tap into receive buffers while both exist.
    /// Returns whether chains were used. `epoll` is None in unit tests
    /// that drive the queue by hand.
    pub(super) fn process_rx(&mut self, epoll: Option<&Epoll>) -> bool {
        if self.live_tap().is_none() || !self.rxq.ready() {
            if let Some(ep) = epoll {
                self.poll_tap(ep, false);
            }
            return false;
        }
        let mut used = false;
        let mut idle_rounds = 0;
        loop {
            let Some(chain) = self.rxq.pop_descriptor_chain(&self.mem) else {
                // Out of buffers (or a broken avail ring): ask for a kick
                // when the driver adds one, and stop reading the tap.
                match self.rxq.enable_notification(&self.mem) {
                    Ok(true) if idle_rounds < 1 => {
                        idle_rounds += 1;
                        self.rx_notify = true;
                        continue;
                    }
                    Ok(true) => warn!("virtio-net: RX avail ring makes no progress; ignoring it until the next kick"),
                    Ok(false) => {}
                    Err(e) => warn!("virtio-net: enabling RX notifications: {e}"),
                }
                self.rx_notify = true;
                if let Some(ep) = epoll {
                    self.poll_tap(ep, false);
                }
                break;
            };
            idle_rounds = 0;
            if self.rx_notify {
                // Buffers are there again: no kicks needed until they run out.
                if let Err(e) = self.rxq.disable_notification(&self.mem) {
                    debug!("virtio-net: disabling RX notifications: {e}");
                }
                self.rx_notify = false;
            }
            let head = chain.head_index();
            let segs = match Segments::collect(&self.mem, chain, true, MAX_CHAIN_DESCS, VNET_HDR_LEN as u64, u64::MAX) {
                Ok(s) => s,
                Err(e) => {
                    debug!("virtio-net: RX chain {head} refused: {e}");
                    self.stats.bad_chains.fetch_add(1, Ordering::Relaxed);
                    self.add_used_rx(head, 0);
                    used = true;
                    continue;
                }
            };
            match self.receive_into(&segs) {
                Rx::Delivered(len) => {
                    self.add_used_rx(head, len);
                    used = true;
                }
                Rx::Dropped => {
                    // Keep the buffer for the next frame.
                    self.rxq.go_to_previous_position();
                }
                Rx::Empty => {
                    self.rxq.go_to_previous_position();
                    if let Some(ep) = epoll {
                        self.poll_tap(ep, true);
                    }
                    break;
                }
                Rx::Broken => {
                    self.rxq.go_to_previous_position();
                    self.tap_broken = true;
                    break;
                }
            }
        }
        used
    }

    fn add_used_rx(&mut self, head: u16, len: u32) {
        if let Err(e) = self.rxq.add_used(&self.mem, head, len) {
            warn!("virtio-net: returning RX chain {head}: {e}");
        }
    }

    fn drop_rx(&self, why: impl std::fmt::Display) -> Rx {
        self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
        debug!("virtio-net: RX frame dropped: {why}");
        Rx::Dropped
    }

    /// Reads one frame from the tap into `segs`.
    fn receive_into(&self, segs: &Segments) -> Rx {
        let Some(tap) = self.live_tap() else { return Rx::Broken };
        let mut iovs = Vec::with_capacity(8);
        if let Err(e) = segs.iovecs(&self.mem, 0, &mut iovs) {
            // Checked when collected; cannot happen. Do not spin on it.
            error!("virtio-net: RX buffers: {e}");
            return Rx::Broken;
        }
        // One byte past the guest's buffers tells a frame that did not fit
        // (older kernels return the whole frame's length then, newer ones
        // what they copied: with this byte, more than the buffers either way).
        let mut overflow = [0u8; 1];
        iovs.push(libc::iovec { iov_base: overflow.as_mut_ptr().cast(), iov_len: 1 });
        let n = loop {
            match tap.readv(&iovs) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Rx::Empty,
                // The kernel consumed and dropped the frame (e.g. a GSO
                // type it cannot describe in a header).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EFAULT)) => {
                    return self.drop_rx(format!("tap read: {e}"))
                }
                Err(e) => {
                    error!("virtio-net: tap {}: read: {e}", tap.name());
                    return Rx::Broken;
                }
            }
        };
        if n as u64 > segs.total() {
            return self.drop_rx(format!("{n}-byte frame does not fit a {}-byte buffer", segs.total()));
        }
        if n < VNET_HDR_LEN + MIN_FRAME_LEN {
            return self.drop_rx(format!("{n}-byte read"));
        }
        // Frames the driver did not ask for (queued before the offloads
        // changed) never reach it.
        let mut hdr = [0u8; 2];
        if !segs.read_at(&self.mem, HDR_FLAGS, &mut hdr) {
            return self.drop_rx("header unreadable");
        }
        let gso = hdr[HDR_GSO_TYPE];
        let ok = match u32::from(gso & !GSO_ECN) {
            VIRTIO_NET_HDR_GSO_NONE => gso & GSO_ECN == 0,
            VIRTIO_NET_HDR_GSO_TCPV4 => gso & GSO_ECN == 0 && has(self.acked, VIRTIO_NET_F_GUEST_TSO4),
            VIRTIO_NET_HDR_GSO_TCPV6 => gso & GSO_ECN == 0 && has(self.acked, VIRTIO_NET_F_GUEST_TSO6),
            _ => false,
        };
        if !ok {
            return self.drop_rx(format!("GSO type {gso:#x} not negotiated"));
        }
        let guest_csum = has(self.acked, VIRTIO_NET_F_GUEST_CSUM);
        if hdr[0] & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 && !guest_csum {
            return self.drop_rx("partial checksum without VIRTIO_NET_F_GUEST_CSUM");
        }
        // Without GUEST_CSUM the flags must be 0 (the kernel may set
        // DATA_VALID); num_buffers is 1 without MRG_RXBUF.
        let fixed = (guest_csum || segs.write_at(&self.mem, HDR_FLAGS, &[0]))
            && segs.write_at(&self.mem, HDR_NUM_BUFFERS, &1u16.to_le_bytes());
        if !fixed {
            return self.drop_rx("header not writable");
        }
        self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.stats.rx_bytes.fetch_add((n - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        Rx::Delivered(n as u32)
    }
}
