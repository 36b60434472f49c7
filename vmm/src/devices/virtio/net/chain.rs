//! Checked views of virtio-net descriptor chains: every descriptor has the
//! direction the queue requires and lies inside guest memory, the chain has
//! a bounded number of descriptors and bytes. From such a chain the worker
//! builds the iovecs the tap reads into or writes from.

use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::super::GuestMemory;

/// Why a chain was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("empty descriptor chain")]
    Empty,
    #[error("more than {max} descriptors in the chain")]
    TooManyDescriptors { max: usize },
    #[error("device-writable descriptor in a transmit chain")]
    WritableInTx,
    #[error("device-readable descriptor in a receive chain")]
    ReadableInRx,
    #[error("descriptor at {addr:#x} (len {len}) is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("chain holds {have} bytes, at most {max} allowed")]
    TooBig { have: u64, max: u64 },
    #[error("chain holds {have} bytes, at least {min} needed")]
    TooSmall { have: u64, min: u64 },
    #[error("chain spans {0} memory slices")]
    TooManySlices(usize),
}

/// The buffers of one validated chain, in order (zero-length descriptors
/// left out).
#[derive(Debug)]
pub struct Segments {
    segs: Vec<(GuestAddress, u32)>,
    total: u64,
}

/// Most iovecs of guest memory one frame may use: IOV_MAX (1024) less the
/// one the worker adds (TX: its header copy; RX: an overflow byte).
pub const MAX_IOVECS: usize = 1023;

impl Segments {
    /// Walks `chain`: at most `max_descs` descriptors, all device-writable
    /// (`writable`) or all device-readable, each inside guest memory, in
    /// all between `min` and `max` bytes.
    pub fn collect(
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
        writable: bool,
        max_descs: usize,
        min: u64,
        max: u64,
    ) -> Result<Segments, ChainError> {
        let mut segs = Vec::new();
        let mut total = 0u64;
        let mut count = 0usize;
        for d in chain {
            count += 1;
            if count > max_descs {
                return Err(ChainError::TooManyDescriptors { max: max_descs });
            }
            if d.is_write_only() != writable {
                return Err(if writable { ChainError::ReadableInRx } else { ChainError::WritableInTx });
            }
            if d.len() == 0 {
                continue;
            }
            if !mem.check_range(d.addr(), d.len() as usize) {
                return Err(ChainError::OutOfMemory { addr: d.addr().0, len: d.len() });
            }
            total += u64::from(d.len());
            if total > max {
                return Err(ChainError::TooBig { have: total, max });
            }
            segs.push((d.addr(), d.len()));
        }
        if count == 0 {
            return Err(ChainError::Empty);
        }
        if total < min {
            return Err(ChainError::TooSmall { have: total, min });
        }
        Ok(Segments { segs, total })
    }

    /// Bytes in the chain.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Appends iovecs covering the chain from byte `skip` on to `out`.
    /// The pointers stay valid while `mem` is alive (its regions are
    /// mapped for the VM's lifetime).
    pub fn iovecs(&self, mem: &GuestMemory, mut skip: u64, out: &mut Vec<libc::iovec>) -> Result<(), ChainError> {
        for &(addr, len) in &self.segs {
            let len = u64::from(len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let start = GuestAddress(addr.0 + skip);
            let n = (len - skip) as usize;
            skip = 0;
            for slice in mem.get_slices(start, n) {
                let slice = slice.map_err(|_| ChainError::OutOfMemory { addr: start.0, len: n as u32 })?;
                if out.len() >= MAX_IOVECS {
                    return Err(ChainError::TooManySlices(out.len() + 1));
                }
                out.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: slice.len() });
            }
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes starting `offset` bytes into the chain.
    /// Returns false if the chain is too short or memory fails.
    pub fn read_at(&self, mem: &GuestMemory, offset: u64, buf: &mut [u8]) -> bool {
        self.walk(offset, buf.len(), |a, range| mem.read_slice(&mut buf[range], a).is_ok())
    }

    /// Writes `data` starting `offset` bytes into the chain.
    pub fn write_at(&self, mem: &GuestMemory, offset: u64, data: &[u8]) -> bool {
        self.walk(offset, data.len(), |a, range| mem.write_slice(&data[range], a).is_ok())
    }

    /// Calls `f(address, byte range)` for the pieces of `[offset, offset +
    /// len)` in each segment; true if all of it exists and `f` succeeded.
    fn walk(
        &self,
        mut offset: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
    ) -> bool {
        let mut done = 0usize;
        for &(addr, seg_len) in &self.segs {
            if done == len {
                break;
            }
            let seg_len = u64::from(seg_len);
            if offset >= seg_len {
                offset -= seg_len;
                continue;
            }
            let n = ((seg_len - offset) as usize).min(len - done);
            if !f(GuestAddress(addr.0 + offset), done..done + n) {
                return false;
            }
            done += n;
            offset = 0;
        }
        done == len
    }
}
