//! An address bus (MMIO or port I/O): a sorted map of ranges to devices.
//! A guest access outside every range is ignored (reads return all ones).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus. `offset` is relative to the start of its range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range of zero length at {0:#x}")]
    Empty(u64),
}

#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, (u64, Arc<Mutex<dyn BusDevice>>)>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, dev: Arc<Mutex<dyn BusDevice>>, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty(base));
        }
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        let overlaps = self.devices.range(..end).next_back().is_some_and(|(b, (l, _))| b + l > base);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, (len, dev));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Arc<Mutex<dyn BusDevice>>)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let off = addr - base;
        // The whole access must fall inside the device's range.
        (off.checked_add(size as u64)? <= *len).then_some((off, dev))
    }

    /// Returns false if no device claims the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|p| p.into_inner()).read(off, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((off, dev)) => {
                dev.lock().unwrap_or_else(|p| p.into_inner()).write(off, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_and_rejects() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Reg(vec![])));
        bus.insert(dev.clone(), 0x1000, 0x100).unwrap();
        assert_eq!(bus.insert(dev.clone(), 0x10ff, 1), Err(BusError::Overlap { base: 0x10ff, len: 1 }));
        assert_eq!(bus.insert(dev.clone(), 0xf00, 0x101), Err(BusError::Overlap { base: 0xf00, len: 0x101 }));
        assert_eq!(bus.insert(dev.clone(), u64::MAX, 2), Err(BusError::Overlap { base: u64::MAX, len: 2 }));
        bus.insert(dev.clone(), 0x1100, 0x10).unwrap();

        let mut b = [0u8; 4];
        assert!(bus.read(0x1004, &mut b));
        assert_eq!(b, [4; 4]);
        // Straddling the end of a range is not the device's business.
        assert!(!bus.read(0x10fe, &mut b));
        assert_eq!(b, [0xff; 4]);
        assert!(!bus.write(0x2000, &[1]));
        assert!(bus.write(0x1108, &[9, 9]));
        assert_eq!(dev.lock().unwrap().0, vec![(8, vec![9, 9])]);
    }
}
