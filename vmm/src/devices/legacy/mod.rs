//! Legacy port-I/O devices: the 8250 serial console and the i8042 reset line.

mod i8042;
mod serial;

pub use i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
pub use serial::{Serial, SerialState, SERIAL_PORT_BASE, SERIAL_PORT_LEN};

use vmm_sys_util::eventfd::EventFd;

/// A vm-superio interrupt/event trigger backed by an eventfd (an irqfd for
/// the serial IRQ, the VMM's reset event for the i8042).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
