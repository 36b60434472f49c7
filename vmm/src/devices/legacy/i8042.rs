//! The i8042 keyboard controller, only for its CPU reset line: a guest
//! `reboot` (with `reboot=k`) writes 0xFE to port 0x64 and the VMM exits.

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;

pub const I8042_PORT_BASE: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;

pub struct I8042 {
    inner: vm_superio::I8042Device<EventFdTrigger>,
}

impl I8042 {
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042 { inner: vm_superio::I8042Device::new(reset) }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < I8042_PORT_LEN {
            data[0] = self.inner.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < I8042_PORT_LEN {
            if let Err(e) = self.inner.write(offset as u8, data[0]) {
                log::warn!("i8042: signalling reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut d = I8042::new(EventFdTrigger(evt.try_clone().unwrap()));
        d.write(4, &[0x01]);
        assert!(evt.read().is_err(), "no reset for other commands");
        d.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
