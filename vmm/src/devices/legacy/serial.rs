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

/// The UART's registers, for snapshots (the guest driver's IER/LCR settings
/// must survive a restore or its tty writes stall).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
}

impl Serial {
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        Serial { inner: vm_superio::Serial::new(irq, out) }
    }

    pub fn from_state(state: &SerialState, irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: Vec::new(),
        };
        match vm_superio::Serial::from_state(&s, irq, vm_superio::serial::NoEvents, out) {
            Ok(inner) => Serial { inner },
            // Only an oversized input buffer is refused, and ours is empty.
            Err(e) => unreachable!("serial state with an empty input buffer: {e:?}"),
        }
    }

    pub fn state(&self) -> SerialState {
        let s = self.inner.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
        }
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

    #[test]
    fn state_round_trips() {
        let mut s = Serial::new(EventFdTrigger(EventFd::new(0).unwrap()), Box::new(Sink::default()));
        s.write(1, &[0x02]); // IER: THR empty interrupt
        s.write(3, &[0x03]); // LCR: 8N1
        s.write(7, &[0x5a]); // scratch
        let st = s.state();
        assert_eq!((st.interrupt_enable, st.line_control, st.scratch), (0x02, 0x03, 0x5a));
        let sink = Sink::default();
        let mut r = Serial::from_state(&st, EventFdTrigger(EventFd::new(0).unwrap()), Box::new(sink.clone()));
        assert_eq!(r.state(), st);
        let mut b = [0u8];
        r.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        r.write(0, b"x");
        assert_eq!(&*sink.0.lock().unwrap(), b"x");
    }
}
