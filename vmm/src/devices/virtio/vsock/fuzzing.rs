//! Entry points for the fuzz targets in `fuzz/` (cargo feature `fuzzing`):
//! the device's worker with its muxer, driven step by step in the caller's
//! thread instead of the device thread.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::super::{GuestMemory, Interrupt};
use super::muxer::Muxer;
use super::worker::Worker;

pub use super::muxer::{parse_connect_line, LOCAL_PORT_BASE};

/// The vsock worker of a device whose queues are rx, tx, event (as the
/// transport hands them over: a ready queue is valid).
pub struct FuzzWorker {
    worker: Worker,
    reset: Arc<AtomicBool>,
}

impl FuzzWorker {
    /// `listener` is the host side's unix listener bound at `uds_path`;
    /// guest connections to port P go to `<uds_path>_<P>`.
    pub fn new(
        mem: GuestMemory,
        queues: Vec<Queue>,
        guest_cid: u64,
        uds_path: &Path,
        listener: UnixListener,
    ) -> io::Result<FuzzWorker> {
        if queues.len() != 3 {
            return Err(io::Error::other("vsock needs 3 queues"));
        }
        let muxer = Muxer::new(guest_cid, uds_path, listener)?;
        let evts = (0..3).map(|_| EventFd::new(EFD_NONBLOCK)).collect::<io::Result<Vec<_>>>()?;
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK)?));
        let reset = Arc::new(AtomicBool::new(false));
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let cmd = EventFd::new(EFD_NONBLOCK)?;
        let worker = Worker::new(mem, interrupt, queues, evts, kill, cmd, reset.clone(), muxer)?;
        Ok(FuzzWorker { worker, reset })
    }

    /// Consumes the tx queue.
    pub fn process_tx(&mut self) -> bool {
        self.worker.process_tx()
    }

    /// Fills rx buffers while packets wait.
    pub fn process_rx(&mut self) -> bool {
        self.worker.process_rx()
    }

    /// One round of the device loop (unix socket events, timers, all
    /// queues) without waiting.
    pub fn poll(&mut self) -> io::Result<()> {
        self.worker.run_once(Some(Duration::ZERO)).map(|_| ())
    }

    /// What `Vsock::send_transport_reset` does; carried out by the next
    /// [`FuzzWorker::poll`].
    pub fn request_transport_reset(&self) {
        self.reset.store(true, Ordering::SeqCst);
    }

    pub fn num_connections(&self) -> usize {
        self.worker.muxer().num_connections()
    }
}
