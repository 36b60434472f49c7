//! The vsock device thread: one epoll loop over the queue eventfds, the unix
//! listener and streams (through the [`Muxer`]), a kill eventfd and a command
//! eventfd (transport reset requests).

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, error};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::super::{GuestMemory, Interrupt};
use super::muxer::{Muxer, TOKEN_LISTENER};
use super::packet::{self, WritableChain, EVENT_TRANSPORT_RESET, HDR_SIZE, MAX_PKT_PAYLOAD};

pub const RXQ: usize = 0;
pub const TXQ: usize = 1;
pub const EVQ: usize = 2;

const TOKEN_RXQ: u64 = 0;
const TOKEN_TXQ: u64 = 1;
const TOKEN_EVQ: u64 = 2;
const TOKEN_KILL: u64 = 3;
const TOKEN_CMD: u64 = 4;

/// How long host connections wait for the guest to handle a transport reset.
/// Generous: a guest that is merely slow (a burst of restores on a busy
/// host delays its event work by seconds) must not have the first host
/// connections reset under it. A guest that never answers only holds up
/// its own host connections.
const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Worker {
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    kill_evt: EventFd,
    cmd_evt: EventFd,
    /// Set by `Vsock::send_transport_reset`, consumed here.
    reset_requested: Arc<AtomicBool>,
    /// A TRANSPORT_RESET event waits for an event queue buffer.
    reset_to_deliver: bool,
    /// The event was delivered; the guest has not yet handled it (it kicks
    /// the event queue when it gives the buffer back). Host connections
    /// wait meanwhile: the guest would reset them along with the old ones.
    /// Bounded: after RESET_ACK_TIMEOUT they are accepted anyway.
    reset_unacked: Option<Instant>,
    muxer: Muxer,
    scratch: Vec<u8>,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        kill_evt: EventFd,
        cmd_evt: EventFd,
        reset_requested: Arc<AtomicBool>,
        muxer: Muxer,
    ) -> io::Result<Self> {
        assert!(queues.len() == 3 && queue_evts.len() == 3);
        let ep = muxer.epoll();
        for (i, evt) in queue_evts.iter().enumerate() {
            ep.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        ep.ctl(ControlOperation::Add, kill_evt.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_KILL))?;
        ep.ctl(ControlOperation::Add, cmd_evt.as_raw_fd(), EpollEvent::new(EventSet::IN, TOKEN_CMD))?;
        Ok(Worker {
            mem,
            interrupt,
            queues,
            queue_evts,
            kill_evt,
            cmd_evt,
            reset_requested,
            reset_to_deliver: false,
            reset_unacked: None,
            muxer,
            scratch: vec![0u8; MAX_PKT_PAYLOAD],
        })
    }

    /// Runs until the kill eventfd fires; hands the listener back.
    pub fn run(mut self) -> UnixListener {
        // Work that may already be pending (restored queues, reset request).
        self.process_all();
        loop {
            match self.run_once(None) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    error!("vsock: worker stopped: {e}");
                    break;
                }
            }
        }
        self.muxer.into_listener()
    }

    /// One round: waits for events (at most `max_wait`, and never past a
    /// connection deadline), handles them and processes the queues. Returns
    /// false once killed.
    pub fn run_once(&mut self, max_wait: Option<Duration>) -> io::Result<bool> {
        let now = Instant::now();
        let until_deadline =
            self.muxer.next_deadline().map(|d| d.saturating_duration_since(now) + Duration::from_millis(1));
        let until_reset_timeout = self
            .reset_unacked
            .map(|t| (t + RESET_ACK_TIMEOUT).saturating_duration_since(now) + Duration::from_millis(1));
        let wait = [max_wait, until_deadline, until_reset_timeout].into_iter().flatten().min();
        let timeout_ms = wait.map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32);

        let mut events = [EpollEvent::default(); 64];
        let n = match self.muxer.epoll().wait(timeout_ms, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            let token = ev.data();
            match token {
                TOKEN_RXQ | TOKEN_TXQ => {
                    let _ = self.queue_evts[token as usize].read();
                }
                TOKEN_EVQ => {
                    let _ = self.queue_evts[EVQ].read();
                    if self.reset_unacked.is_some() && !self.reset_to_deliver {
                        self.end_reset_wait();
                    }
                }
                TOKEN_KILL => {
                    let _ = self.kill_evt.read();
                    return Ok(false);
                }
                TOKEN_CMD => {
                    let _ = self.cmd_evt.read();
                }
                t if t >= TOKEN_LISTENER => self.muxer.handle_event(t, ev.event_set()),
                t => debug!("vsock: unexpected epoll token {t}"),
            }
        }
        if self.reset_unacked.is_some_and(|t| t.elapsed() >= RESET_ACK_TIMEOUT) {
            log::warn!("vsock: the guest did not hand back the transport reset event buffer; accepting connections");
            self.end_reset_wait();
        }
        self.process_all();
        Ok(true)
    }

    fn end_reset_wait(&mut self) {
        self.reset_unacked = None;
        if let Err(e) = self.muxer.set_accepting(true) {
            error!("vsock: listening again after the transport reset: {e}");
        }
    }

    fn process_all(&mut self) {
        if self.reset_requested.swap(false, Ordering::SeqCst) {
            self.muxer.reset_all();
            self.reset_to_deliver = true;
            if self.reset_unacked.is_none() {
                self.reset_unacked = Some(Instant::now());
                if let Err(e) = self.muxer.set_accepting(false) {
                    error!("vsock: pausing the listener for the transport reset: {e}");
                }
            }
        }
        self.muxer.process_timeouts(Instant::now());
        let mut used = [false; 3];
        used[TXQ] = self.process_tx();
        used[RXQ] = self.process_rx();
        used[EVQ] = self.process_event_queue();
        let mut notify = false;
        for (i, u) in used.iter().enumerate() {
            if *u {
                notify |= self.queues[i].needs_notification(&self.mem).unwrap_or(true);
            }
        }
        if notify {
            if let Err(e) = self.interrupt.signal_used_queue() {
                error!("vsock: interrupt: {e}");
            }
        }
    }

    fn pop(&mut self, q: usize) -> Option<(u16, Vec<Descriptor>)> {
        if !self.queues[q].ready() {
            return None;
        }
        let chain = self.queues[q].pop_descriptor_chain(&self.mem)?;
        let head = chain.head_index();
        Some((head, chain.collect()))
    }

    fn add_used(&mut self, q: usize, head: u16, len: u32) {
        if let Err(e) = self.queues[q].add_used(&self.mem, head, len) {
            debug!("vsock: add_used on queue {q}: {e}");
        }
    }

    /// Consumes every tx chain. Returns whether descriptors were used.
    pub fn process_tx(&mut self) -> bool {
        let mut used = false;
        while let Some((head, descs)) = self.pop(TXQ) {
            match packet::read_tx_packet(&self.mem, &descs) {
                Ok(pkt) => self.muxer.handle_tx_packet(pkt),
                Err(e) => debug!("vsock: dropping tx packet: {e}"),
            }
            self.add_used(TXQ, head, 0);
            used = true;
        }
        used
    }

    /// Fills rx chains while the muxer has packets. Returns whether
    /// descriptors were used.
    pub fn process_rx(&mut self) -> bool {
        let mut used = false;
        while self.muxer.has_rx() {
            let Some((head, descs)) = self.pop(RXQ) else {
                break;
            };
            let chain = match WritableChain::new(&self.mem, &descs, HDR_SIZE) {
                Ok(c) => c,
                Err(e) => {
                    debug!("vsock: bad rx chain: {e}");
                    self.add_used(RXQ, head, 0);
                    used = true;
                    continue;
                }
            };
            let room = chain.payload_room();
            let Some((hdr, n)) = self.muxer.next_rx(room, &mut self.scratch) else {
                // Nothing to send after all: give the chain back.
                self.queues[RXQ].go_to_previous_position();
                break;
            };
            used = true;
            let len = match chain.write_packet(&self.mem, &hdr, &self.scratch[..n]) {
                Ok(len) => len,
                Err(e) => {
                    error!("vsock: writing rx packet: {e}");
                    0
                }
            };
            self.add_used(RXQ, head, len);
        }
        used
    }

    /// Delivers a pending TRANSPORT_RESET event.
    pub fn process_event_queue(&mut self) -> bool {
        let mut used = false;
        while self.reset_to_deliver {
            let Some((head, descs)) = self.pop(EVQ) else {
                break;
            };
            used = true;
            match WritableChain::new(&self.mem, &descs, 4) {
                Ok(c) => match c.write_bytes(&self.mem, &EVENT_TRANSPORT_RESET.to_le_bytes()) {
                    Ok(len) => {
                        self.add_used(EVQ, head, len);
                        self.reset_to_deliver = false;
                    }
                    Err(e) => {
                        debug!("vsock: event write: {e}");
                        self.add_used(EVQ, head, 0);
                    }
                },
                Err(e) => {
                    debug!("vsock: bad event chain: {e}");
                    self.add_used(EVQ, head, 0);
                }
            }
        }
        used
    }

    #[cfg(any(test, feature = "fuzzing"))]
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }
}
