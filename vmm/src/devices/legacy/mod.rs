//! Legacy port-I/O devices: the 8250 serial console and the i8042 reset line.
