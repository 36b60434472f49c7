//! virtio-vsock packets (virtio spec 1.2, section 5.10.6): the 44-byte
//! header and the checked reading/writing of packets from/to descriptor
//! chains.
//!
//! Everything here handles guest-controlled data: descriptor addresses,
//! lengths and flags are validated before anything is read or written, and a
//! bad chain is reported as a [`PacketError`], never a panic.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::super::GuestMemory;

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_SIZE: usize = 44;

/// The largest payload accepted from, or sent to, the guest in one packet.
pub const MAX_PKT_PAYLOAD: usize = 64 * 1024;

/// Well-known CIDs.
pub const VSOCK_HOST_CID: u64 = 2;

/// Socket types.
pub const TYPE_STREAM: u16 = 1;

/// Operations.
pub const OP_INVALID: u16 = 0;
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// Flags of OP_SHUTDOWN.
pub const SHUTDOWN_F_RECEIVE: u32 = 1;
pub const SHUTDOWN_F_SEND: u32 = 2;
pub const SHUTDOWN_F_BOTH: u32 = SHUTDOWN_F_RECEIVE | SHUTDOWN_F_SEND;

/// Event queue event IDs.
pub const EVENT_TRANSPORT_RESET: u32 = 0;

/// `struct virtio_vsock_hdr`, all fields little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl VsockHeader {
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap());
        VsockHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a descriptor chain was rejected.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty descriptor chain")]
    EmptyChain,
    #[error("device-writable descriptor in a tx chain")]
    WritableTxDescriptor,
    #[error("device-readable descriptor in an rx or event chain")]
    ReadableRxDescriptor,
    #[error("chain holds {0} bytes, less than the {HDR_SIZE}-byte header")]
    ShortHeader(u64),
    #[error("header len {0} exceeds the {MAX_PKT_PAYLOAD}-byte maximum")]
    PayloadTooLong(u32),
    #[error("header len {len} exceeds the {avail} bytes after the header")]
    PayloadBeyondChain { len: u32, avail: u64 },
    #[error("descriptor at {addr:#x} (len {len}) is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("chain too small: {have} bytes, need {need}")]
    TooSmall { have: u64, need: u64 },
}

/// A packet the guest put on the tx queue, structurally valid: the header was
/// fully readable and `payload.len() == hdr.len` for OP_RW (empty otherwise).
#[derive(Debug, Clone)]
pub struct TxPacket {
    pub hdr: VsockHeader,
    pub payload: Vec<u8>,
}

/// Device-readable (or -writable) memory segments of one chain.
#[derive(Debug)]
struct Segments {
    segs: Vec<(GuestAddress, u32)>,
    total: u64,
}

fn check_segment(mem: &GuestMemory, d: &Descriptor) -> Result<(), PacketError> {
    let ok = d.len() == 0 || GuestMemoryBackend::check_range(mem, d.addr(), d.len() as usize);
    if ok {
        Ok(())
    } else {
        Err(PacketError::OutOfMemory { addr: d.addr().0, len: d.len() })
    }
}

fn collect(mem: &GuestMemory, descs: &[Descriptor], writable: bool) -> Result<Segments, PacketError> {
    if descs.is_empty() {
        return Err(PacketError::EmptyChain);
    }
    let mut segs = Vec::with_capacity(descs.len());
    let mut total = 0u64;
    for d in descs {
        if d.is_write_only() != writable {
            return Err(if writable { PacketError::ReadableRxDescriptor } else { PacketError::WritableTxDescriptor });
        }
        check_segment(mem, d)?;
        if d.len() > 0 {
            segs.push((d.addr(), d.len()));
            total += u64::from(d.len());
        }
    }
    Ok(Segments { segs, total })
}

impl Segments {
    /// Copies `buf.len()` bytes starting `offset` bytes into the chain.
    fn read_at(&self, mem: &GuestMemory, mut offset: u64, buf: &mut [u8]) -> Result<(), PacketError> {
        let mut done = 0usize;
        for &(addr, len) in &self.segs {
            if done == buf.len() {
                break;
            }
            let len = u64::from(len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(buf.len() - done);
            let a = addr.0 + offset;
            mem.read_slice(&mut buf[done..done + n], GuestAddress(a))
                .map_err(|_| PacketError::OutOfMemory { addr: a, len: n as u32 })?;
            done += n;
            offset = 0;
        }
        if done == buf.len() {
            Ok(())
        } else {
            Err(PacketError::TooSmall { have: self.total, need: buf.len() as u64 })
        }
    }

    /// Writes `data` starting `offset` bytes into the chain.
    fn write_at(&self, mem: &GuestMemory, mut offset: u64, data: &[u8]) -> Result<(), PacketError> {
        let mut done = 0usize;
        for &(addr, len) in &self.segs {
            if done == data.len() {
                break;
            }
            let len = u64::from(len);
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = ((len - offset) as usize).min(data.len() - done);
            let a = addr.0 + offset;
            mem.write_slice(&data[done..done + n], GuestAddress(a))
                .map_err(|_| PacketError::OutOfMemory { addr: a, len: n as u32 })?;
            done += n;
            offset = 0;
        }
        if done == data.len() {
            Ok(())
        } else {
            Err(PacketError::TooSmall { have: self.total, need: data.len() as u64 })
        }
    }
}

/// Reads and structurally validates a tx chain: only device-readable
/// descriptors inside guest memory, a complete header, `hdr.len` within
/// [`MAX_PKT_PAYLOAD`] and within the chain. The payload is only read for
/// OP_RW; other ops carry none.
pub fn read_tx_packet(mem: &GuestMemory, descs: &[Descriptor]) -> Result<TxPacket, PacketError> {
    let segs = collect(mem, descs, false)?;
    if segs.total < HDR_SIZE as u64 {
        return Err(PacketError::ShortHeader(segs.total));
    }
    let mut raw = [0u8; HDR_SIZE];
    segs.read_at(mem, 0, &mut raw)?;
    let hdr = VsockHeader::from_bytes(&raw);
    if hdr.len as usize > MAX_PKT_PAYLOAD {
        return Err(PacketError::PayloadTooLong(hdr.len));
    }
    let avail = segs.total - HDR_SIZE as u64;
    if u64::from(hdr.len) > avail {
        return Err(PacketError::PayloadBeyondChain { len: hdr.len, avail });
    }
    let mut payload = Vec::new();
    if hdr.op == OP_RW && hdr.len > 0 {
        payload = vec![0u8; hdr.len as usize];
        segs.read_at(mem, HDR_SIZE as u64, &mut payload)?;
    }
    Ok(TxPacket { hdr, payload })
}

/// A validated rx (or event) chain: device-writable descriptors only, all
/// inside guest memory.
#[derive(Debug)]
pub struct WritableChain {
    segs: Segments,
}

impl WritableChain {
    /// Validates a chain the device will write into; it must hold at least
    /// `min_len` bytes.
    pub fn new(mem: &GuestMemory, descs: &[Descriptor], min_len: usize) -> Result<Self, PacketError> {
        let segs = collect(mem, descs, true)?;
        if segs.total < min_len as u64 {
            return Err(PacketError::TooSmall { have: segs.total, need: min_len as u64 });
        }
        Ok(WritableChain { segs })
    }

    /// Total writable bytes.
    pub fn capacity(&self) -> u64 {
        self.segs.total
    }

    /// Room for payload after a vsock header, capped at [`MAX_PKT_PAYLOAD`].
    pub fn payload_room(&self) -> usize {
        (self.segs.total.saturating_sub(HDR_SIZE as u64)).min(MAX_PKT_PAYLOAD as u64) as usize
    }

    /// Writes a vsock packet; returns the number of bytes written (the used
    /// length). `hdr.len` is set from `payload`.
    pub fn write_packet(&self, mem: &GuestMemory, hdr: &VsockHeader, payload: &[u8]) -> Result<u32, PacketError> {
        let mut hdr = *hdr;
        hdr.len = payload.len() as u32;
        self.segs.write_at(mem, 0, &hdr.to_bytes())?;
        self.segs.write_at(mem, HDR_SIZE as u64, payload)?;
        Ok((HDR_SIZE + payload.len()) as u32)
    }

    /// Writes raw bytes at the start of the chain.
    pub fn write_bytes(&self, mem: &GuestMemory, data: &[u8]) -> Result<u32, PacketError> {
        self.segs.write_at(mem, 0, data)?;
        Ok(data.len() as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn rd(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    fn wr(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
    }

    fn hdr(op: u16, len: u32) -> VsockHeader {
        VsockHeader {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1000,
            dst_port: 2000,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_roundtrip_and_layout() {
        let h = hdr(OP_RW, 5);
        let b = h.to_bytes();
        assert_eq!(VsockHeader::from_bytes(&b), h);
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
    }

    #[test]
    fn tx_header_split_over_descriptors() {
        let m = mem();
        let b = hdr(OP_RW, 4).to_bytes();
        m.write_slice(&b[..10], GuestAddress(0x1000)).unwrap();
        m.write_slice(&b[10..], GuestAddress(0x2000)).unwrap();
        m.write_slice(b"data", GuestAddress(0x2000 + 34)).unwrap();
        let p = read_tx_packet(&m, &[rd(0x1000, 10), rd(0x2000, 38)]).unwrap();
        assert_eq!(p.hdr, hdr(OP_RW, 4));
        assert_eq!(p.payload, b"data");
    }

    #[test]
    fn tx_rejects_hostile_chains() {
        let m = mem();
        m.write_slice(&hdr(OP_RW, 100).to_bytes(), GuestAddress(0x1000)).unwrap();
        assert_eq!(read_tx_packet(&m, &[]).unwrap_err(), PacketError::EmptyChain);
        assert_eq!(read_tx_packet(&m, &[wr(0x1000, 44)]).unwrap_err(), PacketError::WritableTxDescriptor);
        assert_eq!(read_tx_packet(&m, &[rd(0x1000, 43)]).unwrap_err(), PacketError::ShortHeader(43));
        // Payload claimed beyond the buffers.
        assert_eq!(
            read_tx_packet(&m, &[rd(0x1000, 44), rd(0x3000, 99)]).unwrap_err(),
            PacketError::PayloadBeyondChain { len: 100, avail: 99 }
        );
        // Descriptor outside guest memory, and one wrapping the address space.
        assert!(matches!(
            read_tx_packet(&m, &[rd(0x1000, 44), rd(0x10_0000, 100)]).unwrap_err(),
            PacketError::OutOfMemory { .. }
        ));
        assert!(matches!(read_tx_packet(&m, &[rd(u64::MAX - 10, 100)]).unwrap_err(), PacketError::OutOfMemory { .. }));
        // Oversized len.
        m.write_slice(&hdr(OP_RW, 64 * 1024 + 1).to_bytes(), GuestAddress(0x1000)).unwrap();
        assert_eq!(
            read_tx_packet(&m, &[rd(0x1000, 0x8_0000)]).unwrap_err(),
            PacketError::PayloadTooLong(64 * 1024 + 1)
        );
        // A mixed chain where the writable part comes later.
        m.write_slice(&hdr(OP_RW, 1).to_bytes(), GuestAddress(0x1000)).unwrap();
        assert_eq!(
            read_tx_packet(&m, &[rd(0x1000, 44), wr(0x3000, 1)]).unwrap_err(),
            PacketError::WritableTxDescriptor
        );
    }

    #[test]
    fn control_packet_payload_is_not_read() {
        let m = mem();
        m.write_slice(&hdr(OP_REQUEST, 0).to_bytes(), GuestAddress(0x1000)).unwrap();
        let p = read_tx_packet(&m, &[rd(0x1000, 44)]).unwrap();
        assert!(p.payload.is_empty());
    }

    #[test]
    fn rx_chain_validation_and_write() {
        let m = mem();
        assert_eq!(
            WritableChain::new(&m, &[rd(0x1000, 100)], HDR_SIZE).unwrap_err(),
            PacketError::ReadableRxDescriptor
        );
        assert!(matches!(
            WritableChain::new(&m, &[wr(0x1000, 20), wr(0x2000, 20)], HDR_SIZE).unwrap_err(),
            PacketError::TooSmall { have: 40, need: 44 }
        ));
        assert!(matches!(
            WritableChain::new(&m, &[wr(0xF_FFF0, 100)], HDR_SIZE).unwrap_err(),
            PacketError::OutOfMemory { .. }
        ));
        let c = WritableChain::new(&m, &[wr(0x1000, 30), wr(0x2000, 30)], HDR_SIZE).unwrap();
        assert_eq!(c.payload_room(), 16);
        let h = hdr(OP_RW, 0);
        assert_eq!(c.write_packet(&m, &h, b"0123456789abcdef").unwrap(), 60);
        let mut raw = [0u8; HDR_SIZE];
        m.read_slice(&mut raw[..30], GuestAddress(0x1000)).unwrap();
        m.read_slice(&mut raw[30..], GuestAddress(0x2000)).unwrap();
        let back = VsockHeader::from_bytes(&raw);
        assert_eq!(back.len, 16);
        let mut data = [0u8; 16];
        m.read_slice(&mut data, GuestAddress(0x2000 + 14)).unwrap();
        assert_eq!(&data, b"0123456789abcdef");
        assert!(c.write_packet(&m, &h, &[0u8; 17]).is_err());
    }
}
