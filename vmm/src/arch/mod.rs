//! Architecture-specific boot setup.

pub mod x86_64;
