//! The 8250 UART at COM1 (0x3f8, IRQ 4): the guest console, written to a file
//! or stdout. Guest input is not wired (the console is for logs).

use super::EventFdTrigger;
use crate::devices::bus::BusDevice;
use std::io::Write;

pub const SERIAL_PORT_BASE: u64 = 0x3f8;
pub const SERIAL_PORT_LEN: u64 = 8;

pub struct Serial {
    inner: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Serial { inner: vm_superio::Serial::new(irq, out) }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Registers are bytes; wider accesses are not something a driver does.
        if data.len() == 1 && offset < SERIAL_PORT_LEN {
            data[0] = self.inner.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1 && offset < SERIAL_PORT_LEN {
            if let Err(e) = self.inner.write(offset as u8, data[0]) {
                log::debug!("serial: {e:?}");
            }
            let _ = self.inner.writer_mut().flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_bytes_and_ignores_odd_widths() {
        let sink = Sink::default();
        let mut s = Serial::new(EventFdTrigger(EventFd::new(0).unwrap()), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        s.write(0, b"xy");
        s.write(99, b"z");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter holding register empty");
    }
}
