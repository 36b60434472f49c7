//! virtio-blk (virtio spec 1.2, section 5.2) backed by a raw image file.
//!
//! One request queue. Supported requests: IN, OUT, FLUSH and GET_ID; every
//! other type gets VIRTIO_BLK_S_UNSUPP.
//!
//! The guest is hostile. A request's descriptor chain is checked before
//! anything is done with it:
//! - the last descriptor carries the status byte: it must be device-writable,
//!   at least 1 byte long and inside guest memory, otherwise the chain is
//!   returned with used length 0 and nothing else happens;
//! - the first descriptor holds the 16-byte request header and must be
//!   device-readable (bytes after the header in the same descriptor are data);
//! - device-readable descriptors come before device-writable ones, data of an
//!   IN (or GET_ID) request is device-writable, data of an OUT request is
//!   device-readable, FLUSH has no data;
//! - every data buffer lies entirely inside guest memory;
//! - the data length is a multiple of 512, and `sector * 512 + length` neither
//!   overflows nor goes past the disk's capacity.
//!
//! A request breaking a rule gets VIRTIO_BLK_S_IOERR. The used length is the
//! number of bytes the device wrote into guest memory (data plus status).

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::{debug, error, warn};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile, WriteVolatile};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    ActivateArgs, ActivateError, DeviceState, GuestMemory, Interrupt, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

pub const SECTOR_SIZE: u64 = 512;
/// Size of the single request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request offered in config space: a chain holds at most
/// `QUEUE_SIZE` descriptors, two of which are header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Length of the GET_ID serial (VIRTIO_BLK_ID_BYTES).
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Longest descriptor chain accepted (indirect tables could make chains far
/// longer than the queue; such requests get IOERR).
const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;
/// struct virtio_blk_outhdr: le32 type, le32 reserved, le64 sector.
const REQUEST_HEADER_LEN: u32 = 16;
/// Config space we fill: capacity (le64), size_max (le32), seg_max (le32).
const CONFIG_LEN: usize = 16;

const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw disk image (regular file, may be sparse, or a block device).
    pub path: PathBuf,
    pub read_only: bool,
    /// Serial returned by GET_ID (the guest's /sys/block/vdX/serial); at most
    /// 20 bytes.
    pub id: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image {}: no such file", .path.display())]
    NotFound { path: PathBuf },
    #[error("disk image {}: cannot open read-write: {source}", .path.display())]
    OpenReadWrite { path: PathBuf, source: io::Error },
    #[error("disk image {}: cannot open: {source}", .path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("disk image {}: not a regular file or block device", .path.display())]
    NotAFile { path: PathBuf },
    #[error("disk image {}: cannot determine size: {source}", .path.display())]
    Size { path: PathBuf, source: io::Error },
    #[error("disk image {}: id {id:?} is {len} bytes long, at most {max} allowed", .path.display(), max = ID_BYTES)]
    IdTooLong { path: PathBuf, id: String, len: usize },
}

/// Serializable device state (for snapshots). The ring indices of the
/// request queue are part of the transport's queue state.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    pub path: PathBuf,
    pub read_only: bool,
    pub id: Option<String>,
    /// Capacity in 512-byte sectors when the device was created.
    pub nsectors: u64,
    pub avail_features: u64,
    pub acked_features: u64,
}

/// The request-processing half of the device: what the worker thread owns.
#[derive(Clone, Debug)]
struct Disk {
    file: Arc<File>,
    nsectors: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
}

/// A guest buffer (one descriptor, or the data part of the header descriptor).
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// Result of executing a request: the status byte and how many data bytes
/// were written into guest memory.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    status: u8,
    written: u32,
}

impl Outcome {
    fn ok(written: u32) -> Self {
        Outcome { status: STATUS_OK, written }
    }

    fn ioerr(why: &str) -> Self {
        debug!("virtio-blk: bad request: {why}");
        Outcome { status: STATUS_IOERR, written: 0 }
    }
}

fn total_len(segs: &[Segment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

fn vmem_err(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

impl Disk {
    fn capacity_bytes(&self) -> u64 {
        // nsectors came from the file size divided by 512: cannot overflow.
        self.nsectors * SECTOR_SIZE
    }

    /// Serves every available request. Returns whether the driver must be
    /// interrupted.
    fn process_queue(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used_any = false;
        let mut idle_rounds = 0;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                warn!("virtio-blk: disabling queue notifications: {e}");
                break;
            }
            let mut progressed = false;
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                progressed = true;
                let head = chain.head_index();
                let used_len = self.process_chain(mem, chain);
                match queue.add_used(mem, head, used_len) {
                    Ok(()) => used_any = true,
                    Err(e) => warn!("virtio-blk: returning descriptor chain {head}: {e}"),
                }
            }
            match queue.enable_notification(mem) {
                // More requests arrived while notifications were off. Without
                // progress in two rounds the avail ring is broken (e.g. an
                // avail idx running ahead by more than the queue size):
                // stop instead of spinning.
                Ok(true) => {
                    idle_rounds = if progressed { 0 } else { idle_rounds + 1 };
                    if idle_rounds >= 2 {
                        warn!("virtio-blk: avail ring makes no progress; ignoring it until the next notification");
                        break;
                    }
                }
                Ok(false) => break,
                Err(e) => {
                    warn!("virtio-blk: enabling queue notifications: {e}");
                    break;
                }
            }
        }
        if !used_any {
            return false;
        }
        queue.needs_notification(mem).unwrap_or_else(|e| {
            warn!("virtio-blk: checking whether to notify: {e}");
            true
        })
    }

    /// Executes one request; returns the used length.
    fn process_chain(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        // virtio-queue bounds the walk (TTL per table, 4 GiB per chain), but
        // an indirect table can still hold 64 Ki descriptors: keep at most
        // MAX_CHAIN_DESCS, remember the last one.
        let mut descs: Vec<Descriptor> = Vec::new();
        let mut count = 0usize;
        let mut last = None;
        for d in chain {
            count += 1;
            if descs.len() < MAX_CHAIN_DESCS {
                descs.push(d);
            }
            last = Some(d);
        }
        let Some(status_desc) = last else {
            debug!("virtio-blk: empty descriptor chain");
            return 0;
        };
        if !status_desc.is_write_only() || status_desc.len() == 0 {
            debug!("virtio-blk: request without a writable status byte dropped");
            return 0;
        }
        let status_addr = status_desc.addr();
        if !mem.check_range(status_addr, 1) {
            debug!("virtio-blk: status byte at {:#x} outside guest memory", status_addr.0);
            return 0;
        }
        let outcome = if count > MAX_CHAIN_DESCS {
            Outcome::ioerr("descriptor chain too long")
        } else {
            self.execute(mem, &descs[..descs.len() - 1])
        };
        if let Err(e) = mem.write_obj(outcome.status, status_addr) {
            warn!("virtio-blk: writing status byte: {e}");
            return outcome.written;
        }
        outcome.written.saturating_add(1)
    }

    /// Executes a request whose chain (without the status descriptor) is
    /// `body`.
    fn execute(&mut self, mem: &GuestMemory, body: &[Descriptor]) -> Outcome {
        let Some((hdr, rest)) = body.split_first() else {
            return Outcome::ioerr("no request header");
        };
        if hdr.is_write_only() || hdr.len() < REQUEST_HEADER_LEN {
            return Outcome::ioerr("request header is not 16 device-readable bytes");
        }
        let mut raw = [0u8; REQUEST_HEADER_LEN as usize];
        if mem.read_slice(&mut raw, hdr.addr()).is_err() {
            return Outcome::ioerr("request header outside guest memory");
        }
        let req_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let sector = u64::from_le_bytes([raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15]]);
        if !matches!(req_type, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_FLUSH | VIRTIO_BLK_T_GET_ID) {
            debug!("virtio-blk: unsupported request type {req_type}");
            return Outcome { status: STATUS_UNSUPP, written: 0 };
        }

        let mut readable = Vec::new();
        let mut writable = Vec::new();
        if hdr.len() > REQUEST_HEADER_LEN {
            // Header and data in one descriptor (VIRTIO_F_ANY_LAYOUT).
            let Some(addr) = hdr.addr().0.checked_add(u64::from(REQUEST_HEADER_LEN)) else {
                return Outcome::ioerr("request header address overflows");
            };
            readable.push(Segment { addr: GuestAddress(addr), len: hdr.len() - REQUEST_HEADER_LEN });
        }
        for d in rest {
            if d.is_write_only() {
                if d.len() > 0 {
                    writable.push(Segment { addr: d.addr(), len: d.len() });
                }
            } else if !writable.is_empty() {
                return Outcome::ioerr("device-readable descriptor after a device-writable one");
            } else if d.len() > 0 {
                readable.push(Segment { addr: d.addr(), len: d.len() });
            }
        }
        if let Some(s) = readable.iter().chain(&writable).find(|s| !mem.check_range(s.addr, s.len as usize)) {
            debug!("virtio-blk: buffer {:#x}+{:#x} outside guest memory", s.addr.0, s.len);
            return Outcome::ioerr("data buffer outside guest memory");
        }

        match req_type {
            VIRTIO_BLK_T_IN => {
                if !readable.is_empty() {
                    return Outcome::ioerr("IN request with device-readable data");
                }
                let offset = match self.check_io(sector, total_len(&writable)) {
                    Ok(offset) => offset,
                    Err(why) => return Outcome::ioerr(why),
                };
                let (written, res) = self.read_to_guest(mem, offset, &writable);
                match res {
                    Ok(()) => Outcome::ok(written),
                    Err(e) => {
                        warn!("virtio-blk: reading sector {sector}: {e}");
                        Outcome { status: STATUS_IOERR, written }
                    }
                }
            }
            VIRTIO_BLK_T_OUT => {
                if !writable.is_empty() {
                    return Outcome::ioerr("OUT request with device-writable data");
                }
                if self.read_only {
                    return Outcome::ioerr("write to a read-only disk");
                }
                let offset = match self.check_io(sector, total_len(&readable)) {
                    Ok(offset) => offset,
                    Err(why) => return Outcome::ioerr(why),
                };
                match self.write_from_guest(mem, offset, &readable) {
                    Ok(()) => Outcome::ok(0),
                    Err(e) => {
                        warn!("virtio-blk: writing sector {sector}: {e}");
                        Outcome { status: STATUS_IOERR, written: 0 }
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                if !readable.is_empty() || !writable.is_empty() {
                    return Outcome::ioerr("FLUSH request with data");
                }
                match self.file.sync_data() {
                    Ok(()) => Outcome::ok(0),
                    Err(e) => {
                        warn!("virtio-blk: flush: {e}");
                        Outcome { status: STATUS_IOERR, written: 0 }
                    }
                }
            }
            VIRTIO_BLK_T_GET_ID => {
                if !readable.is_empty() || writable.is_empty() {
                    return Outcome::ioerr("GET_ID request without a device-writable buffer");
                }
                let mut id: &[u8] = &self.id;
                let mut written = 0u32;
                for s in &writable {
                    if id.is_empty() {
                        break;
                    }
                    let n = id.len().min(s.len as usize);
                    if mem.write_slice(&id[..n], s.addr).is_err() {
                        return Outcome { status: STATUS_IOERR, written };
                    }
                    id = &id[n..];
                    written += n as u32;
                }
                Outcome::ok(written)
            }
            // Filtered above.
            _ => Outcome { status: STATUS_UNSUPP, written: 0 },
        }
    }

    /// Checks a data transfer of `len` bytes at `sector`; returns the byte
    /// offset in the image.
    fn check_io(&self, sector: u64, len: u64) -> Result<u64, &'static str> {
        if len & (SECTOR_SIZE - 1) != 0 {
            return Err("data length is not a multiple of 512");
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or("sector number overflows")?;
        let end = offset.checked_add(len).ok_or("sector range overflows")?;
        if end > self.capacity_bytes() {
            return Err("sector range beyond the end of the disk");
        }
        Ok(offset)
    }

    /// Reads the image at `offset` into `segs`; returns the bytes written
    /// into guest memory even on error.
    fn read_to_guest(&self, mem: &GuestMemory, offset: u64, segs: &[Segment]) -> (u32, io::Result<()>) {
        let mut file: &File = &self.file;
        let mut done: u32 = 0;
        if let Err(e) = file.seek(SeekFrom::Start(offset)) {
            return (0, Err(e));
        }
        for s in segs {
            for slice in mem.get_slices(s.addr, s.len as usize) {
                let mut slice = match slice {
                    Ok(slice) => slice,
                    Err(e) => return (done, Err(vmem_err(e))),
                };
                if let Err(e) = file.read_exact_volatile(&mut slice) {
                    return (done, Err(vmem_err(e)));
                }
                done = done.saturating_add(slice.len() as u32);
            }
        }
        (done, Ok(()))
    }

    /// Writes `segs` to the image at `offset`.
    fn write_from_guest(&self, mem: &GuestMemory, offset: u64, segs: &[Segment]) -> io::Result<()> {
        let mut file: &File = &self.file;
        file.seek(SeekFrom::Start(offset))?;
        for s in segs {
            for slice in mem.get_slices(s.addr, s.len as usize) {
                file.write_all_volatile(&slice.map_err(vmem_err)?).map_err(vmem_err)?;
            }
        }
        Ok(())
    }
}

struct Worker {
    kill_evt: EventFd,
    handle: JoinHandle<()>,
}

/// A virtio block device over a raw image file.
pub struct Block {
    path: PathBuf,
    id: Option<String>,
    disk: Disk,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    queue_max_sizes: [u16; 1],
    worker: Option<Worker>,
}

impl Block {
    pub fn new(cfg: BlockConfig) -> Result<Block, BlockError> {
        let BlockConfig { path, read_only, id } = cfg;
        let mut id_bytes = [0u8; ID_BYTES];
        if let Some(id) = &id {
            if id.len() > ID_BYTES {
                return Err(BlockError::IdTooLong { path, id: id.clone(), len: id.len() });
            }
            id_bytes[..id.len()].copy_from_slice(id.as_bytes());
        }
        let mut file = match OpenOptions::new().read(true).write(!read_only).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(BlockError::NotFound { path }),
            Err(source) if !read_only => return Err(BlockError::OpenReadWrite { path, source }),
            Err(source) => return Err(BlockError::Open { path, source }),
        };
        let file_type = match file.metadata() {
            Ok(m) => m.file_type(),
            Err(source) => return Err(BlockError::Size { path, source }),
        };
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(BlockError::NotAFile { path });
        }
        // Seeking to the end works for block devices too (their metadata
        // length is 0).
        let size = match file.seek(SeekFrom::End(0)) {
            Ok(size) => size,
            Err(source) => return Err(BlockError::Size { path, source }),
        };
        let nsectors = size / SECTOR_SIZE;
        if size & (SECTOR_SIZE - 1) != 0 {
            warn!(
                "virtio-blk: {}: size {size} is not a multiple of 512; the last {} bytes are not visible",
                path.display(),
                size & (SECTOR_SIZE - 1)
            );
        }

        let mut avail_features = VIRTIO_F_VERSION_1
            | (1u64 << VIRTIO_BLK_F_FLUSH)
            | (1u64 << VIRTIO_BLK_F_SEG_MAX)
            | (1u64 << VIRTIO_RING_F_EVENT_IDX);
        if read_only {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&nsectors.to_le_bytes());
        // size_max (offset 8) is not offered.
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());

        debug!(
            "virtio-blk: {} ({nsectors} sectors, {}) fd {}",
            path.display(),
            if read_only { "ro" } else { "rw" },
            file.as_raw_fd()
        );
        Ok(Block {
            path,
            id,
            disk: Disk { file: Arc::new(file), nsectors, read_only, id: id_bytes },
            avail_features,
            acked_features: 0,
            config,
            queue_max_sizes: [QUEUE_SIZE],
            worker: None,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only
    }

    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Capacity in 512-byte sectors.
    pub fn nsectors(&self) -> u64 {
        self.disk.nsectors
    }

    /// Whether a worker thread is serving the queue.
    pub fn is_active(&self) -> bool {
        self.worker.is_some()
    }

    pub fn save_state(&self) -> BlockState {
        BlockState {
            path: self.path.clone(),
            read_only: self.disk.read_only,
            id: self.id.clone(),
            nsectors: self.disk.nsectors,
            avail_features: self.avail_features,
            acked_features: self.acked_features,
        }
    }

    /// Serves every available request on `queue` in the calling thread (the
    /// worker's loop body). Returns whether the driver must be interrupted.
    /// Refused (returns false) while the worker thread owns the queue.
    pub fn process_queue(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        if self.worker.is_some() {
            warn!("virtio-blk: {}: process_queue while the worker is running", self.path.display());
            return false;
        }
        self.disk.process_queue(mem, queue)
    }

    fn stop_worker(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        if let Err(e) = worker.kill_evt.write(1) {
            // Joining would wait forever; leave the thread behind.
            error!("virtio-blk: {}: stopping worker: {e}", self.path.display());
            return;
        }
        if worker.handle.join().is_err() {
            error!("virtio-blk: {}: worker thread panicked", self.path.display());
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

const QUEUE_TOKEN: u64 = 0;
const KILL_TOKEN: u64 = 1;

fn run_worker(
    mut disk: Disk,
    mem: GuestMemory,
    mut queue: Queue,
    queue_evt: EventFd,
    kill_evt: EventFd,
    interrupt: Arc<Interrupt>,
) {
    let epoll = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            error!("virtio-blk: worker epoll: {e}");
            return;
        }
    };
    for (fd, token) in [(queue_evt.as_raw_fd(), QUEUE_TOKEN), (kill_evt.as_raw_fd(), KILL_TOKEN)] {
        if let Err(e) = epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token)) {
            error!("virtio-blk: worker epoll_ctl: {e}");
            return;
        }
    }
    let serve = |disk: &mut Disk, queue: &mut Queue| {
        if disk.process_queue(&mem, queue) {
            if let Err(e) = interrupt.signal_used_queue() {
                error!("virtio-blk: raising interrupt: {e}");
            }
        }
    };
    // The driver may have queued requests before the worker started.
    serve(&mut disk, &mut queue);
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("virtio-blk: worker epoll_wait: {e}");
                return;
            }
        };
        let mut notified = false;
        for ev in &events[..n] {
            match ev.data() {
                KILL_TOKEN => return,
                QUEUE_TOKEN => notified = true,
                other => warn!("virtio-blk: unexpected epoll token {other}"),
            }
        }
        if notified {
            // Nonblocking: an empty counter (WouldBlock) is fine.
            let _ = queue_evt.read();
            serve(&mut disk, &mut queue);
        }
    }
}

impl VirtioDevice for Block {
    fn snapshot_state(&self) -> Option<DeviceState> {
        Some(DeviceState::Block(self.save_state()))
    }

    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, acked: u64) {
        self.acked_features = acked & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| self.config.get(o).copied())
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        debug!("virtio-blk: config write of {} bytes at {offset:#x} ignored", data.len());
    }

    fn activate(&mut self, args: ActivateArgs) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::Other("virtio-blk: already active".into()));
        }
        let ActivateArgs { mem, interrupt, mut queues, mut queue_evts } = args;
        if queues.len() != 1 || queue_evts.len() != 1 {
            return Err(ActivateError::Other(format!(
                "virtio-blk: expected 1 queue and eventfd, got {} and {}",
                queues.len(),
                queue_evts.len()
            )));
        }
        let (Some(mut queue), Some(queue_evt)) = (queues.pop(), queue_evts.pop()) else {
            return Err(ActivateError::Other("virtio-blk: no queue".into()));
        };
        if !queue.ready() {
            return Err(ActivateError::Other("virtio-blk: request queue not ready".into()));
        }
        queue.set_event_idx(self.acked_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0);
        let kill_evt = EventFd::new(EFD_NONBLOCK)?;
        let worker_kill = kill_evt.try_clone()?;
        let disk = self.disk.clone();
        let handle = crate::seccomp::spawn(crate::seccomp::ThreadKind::Block, "virtio-blk", move || {
            run_worker(disk, mem, queue, queue_evt, worker_kill, interrupt)
        })?;
        self.worker = Some(Worker { kill_evt, handle });
        Ok(())
    }

    fn reset(&mut self) -> bool {
        self.stop_worker();
        self.acked_features = 0;
        true
    }

    fn shutdown(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::MmioTransport;
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    const R: u16 = 0;
    const W: u16 = VRING_DESC_F_WRITE as u16;

    // Guest memory: two adjacent regions [0, 2 MiB) and [2 MiB, 3 MiB).
    const MEM_END: u64 = 0x30_0000;
    const Q_SIZE: u16 = 16;
    const DESC_TABLE: u64 = 0x1000;
    const AVAIL_RING: u64 = 0x2000;
    const USED_RING: u64 = 0x3000;
    const HDR: u64 = 0x10_0000;
    const STATUS: u64 = 0x10_0800;
    const DATA: u64 = 0x11_0000;
    const DATA2: u64 = 0x12_0000;

    fn guest_mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x20_0000), (GuestAddress(0x20_0000), 0x10_0000)]).unwrap()
    }

    fn new_queue(mem: &GuestMemory) -> Queue {
        let mut q = Queue::new(QUEUE_SIZE).unwrap();
        q.set_size(Q_SIZE);
        q.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        q.set_used_ring_address(Some(USED_RING as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    fn write_desc(mem: &GuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(table + 16 * u64::from(i));
        mem.write_obj(addr.to_le(), a).unwrap();
        mem.write_obj(len.to_le(), GuestAddress(a.0 + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(a.0 + 12)).unwrap();
        mem.write_obj(next.to_le(), GuestAddress(a.0 + 14)).unwrap();
    }

    /// The driver side: publishes chains on the avail ring.
    struct Driver {
        next_desc: u16,
        avail_idx: u16,
    }

    impl Driver {
        fn new(mem: &GuestMemory) -> Self {
            mem.write_obj(0u16, GuestAddress(AVAIL_RING + 2)).unwrap();
            mem.write_obj(0u16, GuestAddress(USED_RING + 2)).unwrap();
            Driver { next_desc: 0, avail_idx: 0 }
        }

        /// Writes `descs` (addr, len, flags) as one chain and makes it available.
        fn push(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16)]) -> u16 {
            let head = self.next_desc;
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let idx = (head + i as u16) % Q_SIZE;
                let last = i == descs.len() - 1;
                let flags = if last { flags } else { flags | VRING_DESC_F_NEXT as u16 };
                write_desc(mem, DESC_TABLE, idx, addr, len, flags, (idx + 1) % Q_SIZE);
            }
            self.next_desc = (head + descs.len() as u16) % Q_SIZE;
            self.publish(mem, head);
            head
        }

        fn publish(&mut self, mem: &GuestMemory, head: u16) {
            let slot = AVAIL_RING + 4 + 2 * u64::from(self.avail_idx % Q_SIZE);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(AVAIL_RING + 2)).unwrap();
        }

        fn used_idx(&self, mem: &GuestMemory) -> u16 {
            mem.read_obj(GuestAddress(USED_RING + 2)).unwrap()
        }

        /// (id, len) of used element `n`.
        fn used(&self, mem: &GuestMemory, n: u16) -> (u32, u32) {
            let a = USED_RING + 4 + 8 * u64::from(n % Q_SIZE);
            (mem.read_obj(GuestAddress(a)).unwrap(), mem.read_obj(GuestAddress(a + 4)).unwrap())
        }
    }

    fn header(mem: &GuestMemory, addr: u64, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    fn fill(mem: &GuestMemory, addr: u64, len: usize, byte: u8) {
        mem.write_slice(&vec![byte; len], GuestAddress(addr)).unwrap();
    }

    fn read_mem(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn status(mem: &GuestMemory) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A disk image of `size` bytes; byte i of sector s is `s as u8 ^ i as u8`
    /// for the first `filled` sectors, the rest is a hole.
    fn image(size: u64, filled: u64) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(size).unwrap();
        for s in 0..filled {
            let sector: Vec<u8> = (0..512).map(|i| s as u8 ^ i as u8).collect();
            f.write_all(&sector).unwrap();
        }
        f.flush().unwrap();
        f
    }

    fn file_bytes(f: &tempfile::NamedTempFile) -> Vec<u8> {
        let mut v = Vec::new();
        File::open(f.path()).unwrap().read_to_end(&mut v).unwrap();
        v
    }

    fn block(f: &tempfile::NamedTempFile, read_only: bool, id: Option<&str>) -> Block {
        Block::new(BlockConfig { path: f.path().to_path_buf(), read_only, id: id.map(String::from) }).unwrap()
    }

    /// Runs one chain through a fresh queue; returns (status byte, used len).
    /// The status byte is preset to 0xee so "not written" is visible.
    fn submit(blk: &mut Block, mem: &GuestMemory, descs: &[(u64, u32, u16)]) -> (u8, u32) {
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let mut drv = Driver::new(mem);
        let mut q = new_queue(mem);
        let head = drv.push(mem, descs);
        assert!(blk.process_queue(mem, &mut q), "no interrupt requested");
        assert_eq!(drv.used_idx(mem), 1);
        let (id, len) = drv.used(mem, 0);
        assert_eq!(id, u32::from(head));
        (status(mem), len)
    }

    const OK: u8 = STATUS_OK;
    const IOERR: u8 = STATUS_IOERR;
    const UNTOUCHED: u8 = 0xee;

    #[test]
    fn new_and_config_space() {
        let f = image(10 * 512 + 100, 0);
        let blk = block(&f, false, Some("ctr-1"));
        assert_eq!(blk.nsectors(), 10);
        assert_eq!(blk.device_type(), TYPE_BLOCK);
        assert_eq!(blk.queue_max_sizes(), &[256]);
        assert_eq!(
            blk.avail_features(),
            VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX | 1 << VIRTIO_RING_F_EVENT_IDX
        );
        let mut cap = [0u8; 8];
        blk.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 10);
        let mut seg = [0u8; 4];
        blk.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), 254);
        let mut b = [0xffu8; 8];
        blk.read_config(14, &mut b);
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 0]);
        blk.read_config(u64::MAX - 2, &mut b);
        assert_eq!(b, [0; 8]);
        let mut one = [0u8; 1];
        blk.read_config(1, &mut one);
        assert_eq!(one, [0]);

        let ro = block(&f, true, None);
        assert_ne!(ro.avail_features() & 1 << VIRTIO_BLK_F_RO, 0);
        let mut ro = ro;
        ro.set_acked_features(u64::MAX);
        assert_eq!(ro.save_state().acked_features, ro.avail_features());
    }

    #[test]
    fn new_errors_name_path_and_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.img");
        let err = Block::new(BlockConfig { path: missing.clone(), read_only: false, id: None }).err().unwrap();
        assert!(matches!(err, BlockError::NotFound { .. }));
        assert!(err.to_string().contains("nope.img") && err.to_string().contains("no such file"), "{err}");

        // A directory cannot be opened read-write (EISDIR, even as root)...
        let err = Block::new(BlockConfig { path: dir.path().into(), read_only: false, id: None }).err().unwrap();
        assert!(matches!(err, BlockError::OpenReadWrite { .. }), "{err}");
        assert!(err.to_string().contains("cannot open read-write"), "{err}");
        // ...and is no disk read-only either.
        let err = Block::new(BlockConfig { path: dir.path().into(), read_only: true, id: None }).err().unwrap();
        assert!(matches!(err, BlockError::NotAFile { .. }), "{err}");

        let f = image(512, 0);
        let long = "x".repeat(21);
        let err = Block::new(BlockConfig { path: f.path().into(), read_only: false, id: Some(long) }).err().unwrap();
        assert!(matches!(err, BlockError::IdTooLong { len: 21, .. }), "{err}");
        assert!(err.to_string().contains(&f.path().display().to_string()), "{err}");
        // Exactly 20 bytes is fine.
        block(&f, false, Some(&"y".repeat(20)));
    }

    #[test]
    fn write_then_read_round_trip() {
        let mem = guest_mem();
        let f = image(64 * 512, 64);
        let mut blk = block(&f, false, None);
        let before = file_bytes(&f);

        // OUT: sectors 3..5 from two data descriptors.
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
        fill(&mem, DATA, 512, 0xa1);
        fill(&mem, DATA2, 512, 0xb2);
        let r = submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, R), (DATA2, 512, R), (STATUS, 1, W)]);
        assert_eq!(r, (OK, 1));
        let after = file_bytes(&f);
        assert_eq!(&after[3 * 512..4 * 512], &[0xa1; 512][..]);
        assert_eq!(&after[4 * 512..5 * 512], &[0xb2; 512][..]);
        assert_eq!(&after[..3 * 512], &before[..3 * 512]);
        assert_eq!(&after[5 * 512..], &before[5 * 512..]);

        // IN: sectors 2..6 into one buffer that crosses the guest memory
        // region boundary at 2 MiB, then a second buffer.
        let cross = 0x20_0000 - 0x200;
        header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
        fill(&mem, cross, 3 * 512, 0);
        fill(&mem, DATA, 512, 0);
        let r = submit(&mut blk, &mem, &[(HDR, 16, R), (cross, 3 * 512, W), (DATA, 512, W), (STATUS, 1, W)]);
        assert_eq!(r, (OK, 4 * 512 + 1));
        assert_eq!(read_mem(&mem, cross, 3 * 512), &after[2 * 512..5 * 512]);
        assert_eq!(read_mem(&mem, DATA, 512), &after[5 * 512..6 * 512]);

        // Header and data in one descriptor (any layout).
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 63);
        fill(&mem, HDR + 16, 512, 0xc3);
        let r = submit(&mut blk, &mem, &[(HDR, 16 + 512, R), (STATUS, 1, W)]);
        assert_eq!(r, (OK, 1));
        assert_eq!(&file_bytes(&f)[63 * 512..], &[0xc3; 512][..]);
    }

    #[test]
    fn sparse_file() {
        let mem = guest_mem();
        let size = 1u64 << 30;
        let f = image(size, 0);
        let mut blk = block(&f, false, None);
        assert_eq!(blk.nsectors(), size / 512);
        let last = size / 512 - 1;

        header(&mem, HDR, VIRTIO_BLK_T_IN, last);
        fill(&mem, DATA, 512, 0x55);
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), (OK, 513));
        assert_eq!(read_mem(&mem, DATA, 512), vec![0; 512]);

        header(&mem, HDR, VIRTIO_BLK_T_OUT, last);
        fill(&mem, DATA, 512, 0x66);
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]), (OK, 1));
        header(&mem, HDR, VIRTIO_BLK_T_IN, last);
        fill(&mem, DATA2, 512, 0);
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA2, 512, W), (STATUS, 1, W)]), (OK, 513));
        assert_eq!(read_mem(&mem, DATA2, 512), vec![0x66; 512]);

        let meta = std::fs::metadata(f.path()).unwrap();
        assert_eq!(meta.len(), size);
        assert!(meta.blocks() * 512 < 1 << 20, "image is no longer sparse");
    }

    #[test]
    fn flush() {
        let mem = guest_mem();
        let f = image(8 * 512, 0);
        for ro in [false, true] {
            let mut blk = block(&f, ro, None);
            header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 12345);
            assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (STATUS, 1, W)]), (OK, 1));
            // Flush carries no data.
            assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), (IOERR, 1));
        }
    }

    #[test]
    fn get_id() {
        let mem = guest_mem();
        let f = image(8 * 512, 0);
        let mut blk = block(&f, true, Some("container-abc"));
        header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        fill(&mem, DATA, 32, 0xff);
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]), (OK, 21));
        let mut want = b"container-abc".to_vec();
        want.resize(20, 0);
        want.extend_from_slice(&[0xff; 12]);
        assert_eq!(read_mem(&mem, DATA, 32), want);

        // A short buffer gets what fits.
        fill(&mem, DATA, 32, 0xff);
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 4, W), (STATUS, 1, W)]), (OK, 5));
        assert_eq!(read_mem(&mem, DATA, 5), b"cont\xff");
        // No buffer at all.
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (STATUS, 1, W)]), (IOERR, 1));
        // Buffer in the wrong direction.
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 20, R), (STATUS, 1, W)]), (IOERR, 1));

        // Without an id the serial is all zeros.
        let mut blk = block(&f, false, None);
        fill(&mem, DATA, 20, 0xff);
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]), (OK, 21));
        assert_eq!(read_mem(&mem, DATA, 20), vec![0; 20]);
    }

    #[test]
    fn bad_header() {
        let mem = guest_mem();
        let f = image(8 * 512, 8);
        let before = file_bytes(&f);
        let mut blk = block(&f, false, None);
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        // Short header.
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 15, R), (DATA, 512, R), (STATUS, 1, W)]), (IOERR, 1));
        // Header the device is supposed to write.
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, W), (STATUS, 1, W)]), (IOERR, 1));
        // No header at all: just the status descriptor.
        assert_eq!(submit(&mut blk, &mem, &[(STATUS, 1, W)]), (IOERR, 1));
        // Header outside guest memory, or straddling its end.
        assert_eq!(submit(&mut blk, &mem, &[(MEM_END, 16, R), (STATUS, 1, W)]), (IOERR, 1));
        assert_eq!(submit(&mut blk, &mem, &[(MEM_END - 8, 16, R), (STATUS, 1, W)]), (IOERR, 1));
        assert_eq!(submit(&mut blk, &mem, &[(u64::MAX - 7, 16, R), (STATUS, 1, W)]), (IOERR, 1));
        // Header + data in one descriptor whose data runs out of memory.
        header(&mem, MEM_END - 16, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(submit(&mut blk, &mem, &[(MEM_END - 16, 16 + 512, R), (STATUS, 1, W)]), (IOERR, 1));
        assert_eq!(file_bytes(&f), before);
    }

    #[test]
    fn no_usable_status_byte() {
        let mem = guest_mem();
        let f = image(8 * 512, 8);
        let before = file_bytes(&f);
        let mut blk = block(&f, false, None);
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        fill(&mem, DATA, 512, 0x77);
        // Status descriptor not device-writable.
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, R)]), (UNTOUCHED, 0));
        // Missing status: the chain ends with the data.
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, R)]), (UNTOUCHED, 0));
        // Zero-length status.
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 0, W)]), (UNTOUCHED, 0));
        // Status outside guest memory.
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, R), (MEM_END, 1, W)]), (UNTOUCHED, 0));
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, R), (u64::MAX, 1, W)]), (UNTOUCHED, 0));
        // None of these reached the disk.
        assert_eq!(file_bytes(&f), before);
    }

    #[test]
    fn data_in_wrong_direction() {
        let mem = guest_mem();
        let f = image(8 * 512, 8);
        let before = file_bytes(&f);
        let mut blk = block(&f, false, None);

        // IN with device-readable data: guest buffer untouched.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        fill(&mem, DATA, 512, 0x11);
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]), (IOERR, 1));
        assert_eq!(read_mem(&mem, DATA, 512), vec![0x11; 512]);
        // IN with data both ways.
        assert_eq!(
            submit(&mut blk, &mem, &[(HDR, 16, R), (DATA2, 512, R), (DATA, 512, W), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        assert_eq!(read_mem(&mem, DATA, 512), vec![0x11; 512]);

        // OUT with device-writable data: file untouched.
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), (IOERR, 1));
        // Readable descriptor after a writable one.
        assert_eq!(
            submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, W), (DATA2, 512, R), (STATUS, 1, W)]),
            (IOERR, 1)
        );
        assert_eq!(file_bytes(&f), before);
    }

    #[test]
    fn data_outside_guest_memory() {
        let mem = guest_mem();
        let f = image(8 * 512, 8);
        let before = file_bytes(&f);
        let mut blk = block(&f, false, None);
        for (req, flags) in [(VIRTIO_BLK_T_OUT, R), (VIRTIO_BLK_T_IN, W)] {
            header(&mem, HDR, req, 0);
            for addr in [MEM_END, MEM_END - 256, 0x1_0000_0000, u64::MAX - 511, u64::MAX] {
                let r = submit(&mut blk, &mem, &[(HDR, 16, R), (addr, 512, flags), (STATUS, 1, W)]);
                assert_eq!(r, (IOERR, 1), "type {req} addr {addr:#x}");
            }
            // One good buffer followed by a bad one: nothing is transferred.
            fill(&mem, DATA, 512, 0x42);
            let r = submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, flags), (MEM_END, 512, flags), (STATUS, 1, W)]);
            assert_eq!(r, (IOERR, 1));
            assert_eq!(read_mem(&mem, DATA, 512), vec![0x42; 512]);
        }
        assert_eq!(file_bytes(&f), before);
    }

    #[test]
    fn sector_range_checks() {
        let mem = guest_mem();
        let f = image(8 * 512, 8);
        let before = file_bytes(&f);
        let mut blk = block(&f, false, None);
        let cases: &[(u64, u32)] = &[
            (8, 512),                  // first sector past the end
            (7, 1024),                 // runs past the end
            (u64::MAX, 512),           // sector * 512 overflows
            (u64::MAX / 512 + 1, 512), // likewise, just barely
            (u64::MAX / 512, 1024),    // sector * 512 fits, + len overflows
            (0, 513),                  // not a multiple of 512
            (0, 100),
        ];
        for (req, flags) in [(VIRTIO_BLK_T_OUT, R), (VIRTIO_BLK_T_IN, W)] {
            for &(sector, len) in cases {
                header(&mem, HDR, req, sector);
                fill(&mem, DATA, 1024, 0x99);
                let r = submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, len, flags), (STATUS, 1, W)]);
                assert_eq!(r, (IOERR, 1), "type {req} sector {sector} len {len}");
                assert_eq!(read_mem(&mem, DATA, 1024), vec![0x99; 1024]);
            }
            // The last sector itself is fine.
            header(&mem, HDR, req, 7);
            let r = submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, flags), (STATUS, 1, W)]);
            assert_eq!(r, (OK, if req == VIRTIO_BLK_T_IN { 513 } else { 1 }));
        }
        let after = file_bytes(&f);
        assert_eq!(&after[..7 * 512], &before[..7 * 512]);
        assert_eq!(&after[7 * 512..], &[0x99; 512][..]);
    }

    #[test]
    fn write_to_read_only_disk() {
        let mem = guest_mem();
        let f = image(8 * 512, 8);
        let before = file_bytes(&f);
        let mut blk = block(&f, true, None);
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
        fill(&mem, DATA, 512, 0xdd);
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]), (IOERR, 1));
        assert_eq!(file_bytes(&f), before);
        // Reading works.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
        assert_eq!(submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]), (OK, 513));
        assert_eq!(read_mem(&mem, DATA, 512), &before[512..1024]);
    }

    #[test]
    fn unknown_request_types() {
        let mem = guest_mem();
        let f = image(8 * 512, 8);
        let before = file_bytes(&f);
        let mut blk = block(&f, false, None);
        for t in [2u32, 11, 13, 0xdead_beef, u32::MAX] {
            header(&mem, HDR, t, 0);
            let r = submit(&mut blk, &mem, &[(HDR, 16, R), (DATA, 512, R), (STATUS, 1, W)]);
            assert_eq!(r, (STATUS_UNSUPP, 1), "type {t}");
        }
        assert_eq!(file_bytes(&f), before);
    }

    #[test]
    fn descriptor_loops_and_long_chains_terminate() {
        let mem = guest_mem();
        let f = image(8 * 512, 8);
        let before = file_bytes(&f);
        let mut blk = block(&f, false, None);
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();

        // desc 0 (header) -> desc 1 -> desc 1 -> ... (a readable self-loop).
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        let mut drv = Driver::new(&mem);
        let mut q = new_queue(&mem);
        write_desc(&mem, DESC_TABLE, 0, HDR, 16, R | VRING_DESC_F_NEXT as u16, 1);
        write_desc(&mem, DESC_TABLE, 1, DATA, 512, R | VRING_DESC_F_NEXT as u16, 1);
        drv.publish(&mem, 0);
        assert!(blk.process_queue(&mem, &mut q));
        assert_eq!(drv.used(&mem, 0), (0, 0));
        assert_eq!(status(&mem), UNTOUCHED);

        // Indirect table with more descriptors than any legal request.
        let table = 0x18_0000;
        let n: u16 = 300;
        write_desc(&mem, table, 0, HDR, 16, R | VRING_DESC_F_NEXT as u16, 1);
        for i in 1..n - 1 {
            write_desc(&mem, table, i, DATA, 512, R | VRING_DESC_F_NEXT as u16, i + 1);
        }
        write_desc(&mem, table, n - 1, STATUS, 1, W, 0);
        write_desc(&mem, DESC_TABLE, 2, table, 16 * u32::from(n), VRING_DESC_F_INDIRECT as u16, 0);
        drv.publish(&mem, 2);
        assert!(blk.process_queue(&mem, &mut q));
        assert_eq!(drv.used(&mem, 1), (2, 1));
        assert_eq!(status(&mem), IOERR);

        // A head index beyond the queue yields no chain; the queue moves on.
        drv.publish(&mem, 999);
        assert!(!blk.process_queue(&mem, &mut q));
        assert_eq!(drv.used_idx(&mem), 2);
        // Next request is served normally.
        header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        drv.next_desc = 4;
        drv.push(&mem, &[(HDR, 16, R), (STATUS, 1, W)]);
        assert!(blk.process_queue(&mem, &mut q));
        assert_eq!(drv.used(&mem, 2), (4, 1));
        assert_eq!(status(&mem), OK);

        // The avail index jumping far ahead does not hang the device.
        mem.write_obj(drv.avail_idx.wrapping_add(1000), GuestAddress(AVAIL_RING + 2)).unwrap();
        assert!(!blk.process_queue(&mem, &mut q));
        assert_eq!(drv.used_idx(&mem), 3);
        assert_eq!(file_bytes(&f), before);
    }

    #[test]
    fn batch_and_event_idx() {
        let mem = guest_mem();
        let f = image(8 * 512, 8);
        let mut blk = block(&f, false, None);
        let mut drv = Driver::new(&mem);
        let mut q = new_queue(&mem);
        q.set_event_idx(true);
        header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let used_event = GuestAddress(AVAIL_RING + 4 + 2 * u64::from(Q_SIZE));

        // The driver wants an interrupt once used idx passes 5: not yet.
        mem.write_obj(5u16, used_event).unwrap();
        for _ in 0..3 {
            drv.push(&mem, &[(HDR, 16, R), (STATUS, 1, W)]);
        }
        assert!(!blk.process_queue(&mem, &mut q));
        assert_eq!(drv.used_idx(&mem), 3);
        // With notifications on again, the device asks for a kick at idx 3.
        let avail_event: u16 = mem.read_obj(GuestAddress(USED_RING + 4 + 8 * u64::from(Q_SIZE))).unwrap();
        assert_eq!(avail_event, 3);
        for _ in 0..3 {
            drv.push(&mem, &[(HDR, 16, R), (STATUS, 1, W)]);
        }
        assert!(blk.process_queue(&mem, &mut q));
        assert_eq!(drv.used_idx(&mem), 6);
        for i in 0..6 {
            assert_eq!(drv.used(&mem, i), (u32::from(i * 2), 1));
        }
        // Nothing new: no interrupt.
        assert!(!blk.process_queue(&mem, &mut q));
    }

    fn wait_readable(evt: &EventFd) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match evt.read() {
                Ok(n) => return n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                Err(e) => panic!("no interrupt: {e}"),
            }
        }
    }

    #[test]
    fn worker_thread_serves_queue() {
        let mem = guest_mem();
        let f = image(8 * 512, 8);
        let before = file_bytes(&f);
        let mut blk = block(&f, false, None);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(Interrupt::new(irq.try_clone().unwrap()));

        for round in 0..2 {
            let qevt = EventFd::new(EFD_NONBLOCK).unwrap();
            let mut drv = Driver::new(&mem);
            let args = ActivateArgs {
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                queues: vec![new_queue(&mem)],
                queue_evts: vec![qevt.try_clone().unwrap()],
            };
            blk.set_acked_features(VIRTIO_F_VERSION_1);
            blk.activate(args).unwrap();
            assert!(blk.is_active());
            // A second activation is refused.
            let again = ActivateArgs {
                mem: mem.clone(),
                interrupt: interrupt.clone(),
                queues: vec![new_queue(&mem)],
                queue_evts: vec![qevt.try_clone().unwrap()],
            };
            assert!(blk.activate(again).is_err());

            header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
            fill(&mem, DATA, 512, 0);
            mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
            drv.push(&mem, &[(HDR, 16, R), (DATA, 512, W), (STATUS, 1, W)]);
            qevt.write(1).unwrap();
            assert!(wait_readable(&irq) >= 1, "round {round}");
            assert_eq!(interrupt.status() & super::super::INT_USED_RING, 1);
            interrupt.ack(u32::MAX);
            assert_eq!(drv.used(&mem, 0), (0, 513));
            assert_eq!(status(&mem), OK);
            assert_eq!(read_mem(&mem, DATA, 512), &before[1024..1536]);

            assert!(blk.reset());
            assert!(!blk.is_active());
        }
        // Wrong queue counts are refused.
        let args = ActivateArgs { mem: mem.clone(), interrupt, queues: vec![], queue_evts: vec![] };
        assert!(blk.activate(args).is_err());
        blk.shutdown();
    }

    #[test]
    fn end_to_end_through_mmio() {
        let mem = guest_mem();
        let f = image(8 * 512, 8);
        let blk = block(&f, false, Some("vol-7"));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(mem.clone(), Box::new(blk), irq.try_clone().unwrap()).unwrap();
        let wr = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
        let rd = |t: &mut MmioTransport, off: u64| {
            let mut b = [0u8; 4];
            t.read(off, &mut b);
            u32::from_le_bytes(b)
        };
        assert_eq!(rd(&mut t, 0x08), TYPE_BLOCK);
        wr(&mut t, 0x70, 0);
        wr(&mut t, 0x70, 1);
        wr(&mut t, 0x70, 3);
        wr(&mut t, 0x14, 0);
        let lo = rd(&mut t, 0x10);
        wr(&mut t, 0x14, 1);
        let hi = rd(&mut t, 0x10);
        let offered = u64::from(hi) << 32 | u64::from(lo);
        let wanted = offered & !(1u64 << VIRTIO_BLK_F_SEG_MAX);
        wr(&mut t, 0x24, 0);
        wr(&mut t, 0x20, wanted as u32);
        wr(&mut t, 0x24, 1);
        wr(&mut t, 0x20, (wanted >> 32) as u32);
        wr(&mut t, 0x70, 11);
        assert_eq!(rd(&mut t, 0x70), 11);
        let mut cap = [0u8; 8];
        t.read(0x100, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        wr(&mut t, 0x30, 0);
        assert_eq!(rd(&mut t, 0x34), 256);
        wr(&mut t, 0x38, u32::from(Q_SIZE));
        wr(&mut t, 0x80, DESC_TABLE as u32);
        wr(&mut t, 0x90, AVAIL_RING as u32);
        wr(&mut t, 0xa0, USED_RING as u32);
        wr(&mut t, 0x44, 1);
        let mut drv = Driver::new(&mem);
        wr(&mut t, 0x70, 15);
        assert_eq!(rd(&mut t, 0x70), 15);

        header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        drv.push(&mem, &[(HDR, 16, R), (DATA, 20, W), (STATUS, 1, W)]);
        wr(&mut t, 0x50, 0); // QueueNotify without an ioeventfd
        wait_readable(&irq);
        assert_eq!(rd(&mut t, 0x60), 1);
        wr(&mut t, 0x64, 1);
        assert_eq!(rd(&mut t, 0x60), 0);
        assert_eq!(drv.used(&mem, 0), (0, 21));
        assert_eq!(status(&mem), OK);
        assert_eq!(&read_mem(&mem, DATA, 20)[..6], b"vol-7\0");

        // Reset stops the worker; shutdown is then a no-op.
        wr(&mut t, 0x70, 0);
        assert!(!t.is_activated());
        t.shutdown();
    }

    #[test]
    fn state_serializes() {
        let f = image(4 * 512, 0);
        let mut blk = block(&f, true, Some("abc"));
        blk.set_acked_features(VIRTIO_F_VERSION_1);
        let s = blk.save_state();
        assert_eq!(
            s,
            BlockState {
                path: f.path().into(),
                read_only: true,
                id: Some("abc".into()),
                nsectors: 4,
                avail_features: blk.avail_features(),
                acked_features: VIRTIO_F_VERSION_1,
            }
        );
        let back: BlockState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert!(blk.reset());
        assert_eq!(blk.save_state().acked_features, 0);
    }

    /// Random descriptor tables, rings and headers: the device must neither
    /// panic nor hang, and the image must keep its size.
    #[test]
    fn hostile_queue_fuzz() {
        let mem = guest_mem();
        let f = image(16 * 512, 16);
        let size = std::fs::metadata(f.path()).unwrap().len();
        let mut blk = block(&f, false, Some("fuzz"));
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut served, mut with_data) = (0u32, 0u32);
        let bufs = [HDR, STATUS, DATA, DATA2, 0x20_0000 - 0x100, MEM_END - 1, MEM_END, u64::MAX - 3];
        for _ in 0..500 {
            let mut q = new_queue(&mem);
            if next() & 1 == 0 {
                q.set_event_idx(true);
            }
            for i in 0..Q_SIZE {
                let r = next();
                let addr = match r % 4 {
                    0 => next() % (MEM_END + 0x1000),
                    1 => next(),
                    _ => bufs[(next() % bufs.len() as u64) as usize],
                };
                let len = match (r >> 8) % 5 {
                    0 => 0,
                    1 => 16,
                    2 => 1,
                    3 => 512 * (1 + (next() % 4) as u32),
                    _ => next() as u32,
                };
                let flags = ((r >> 16) & 0x7) as u16; // NEXT, WRITE, INDIRECT
                let nxt = ((r >> 24) % u64::from(Q_SIZE + 2)) as u16;
                write_desc(&mem, DESC_TABLE, i, addr, len, flags, nxt);
                mem.write_obj((next() % u64::from(Q_SIZE + 2)) as u16, GuestAddress(AVAIL_RING + 4 + 2 * u64::from(i)))
                    .unwrap();
            }
            // Headers with mostly known types and sectors near the end.
            for &h in &[HDR, DATA, DATA2] {
                let t = [0u32, 1, 4, 8, next() as u32][(next() % 5) as usize];
                let sector = [0u64, 15, 16, u64::MAX, next()][(next() % 5) as usize];
                header(&mem, h, t, sector);
            }
            let mut avail_idx = (next() % (2 * u64::from(Q_SIZE) + 2)) as u16;
            if next() & 1 == 0 {
                // A well-formed IN/OUT/GET_ID chain at the head, then one
                // random corruption (or none).
                let t = [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_GET_ID][(next() % 3) as usize];
                header(&mem, HDR, t, next() % 16);
                let dir = if t == VIRTIO_BLK_T_OUT { R } else { W };
                let mut chain = [
                    (HDR, 16u32, R | VRING_DESC_F_NEXT as u16, 1u16),
                    (DATA, 512 * (1 + (next() % 2) as u32), dir | VRING_DESC_F_NEXT as u16, 2),
                    (STATUS, 1, W, 0),
                ];
                let victim = (next() % 4) as usize;
                if victim < 3 {
                    let d = &mut chain[victim];
                    match next() % 4 {
                        0 => d.0 = bufs[(next() % bufs.len() as u64) as usize],
                        1 => d.1 = next() as u32 % 2048,
                        2 => d.2 ^= 1 << (next() % 3),
                        _ => d.3 = (next() % u64::from(Q_SIZE + 2)) as u16,
                    }
                }
                for (i, &(addr, len, flags, nxt)) in chain.iter().enumerate() {
                    write_desc(&mem, DESC_TABLE, i as u16, addr, len, flags, nxt);
                }
                mem.write_obj(0u16, GuestAddress(AVAIL_RING + 4)).unwrap();
                avail_idx = 1 + (next() % 3) as u16;
            }
            mem.write_obj(avail_idx, GuestAddress(AVAIL_RING + 2)).unwrap();
            mem.write_obj(next() as u16, GuestAddress(AVAIL_RING + 4 + 2 * u64::from(Q_SIZE))).unwrap();
            mem.write_obj(0u16, GuestAddress(USED_RING + 2)).unwrap();
            blk.process_queue(&mem, &mut q);
            let used: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).unwrap();
            served += u32::from(used);
            for i in 0..used.min(Q_SIZE) {
                let len: u32 = mem.read_obj(GuestAddress(USED_RING + 8 + 8 * u64::from(i))).unwrap();
                with_data += u32::from(len > 1);
            }
        }
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), size);
        // The fuzzer did get requests through, some of them moving data.
        assert!(served > 1000 && with_data > 0, "served {served}, with data {with_data}");
    }
}
