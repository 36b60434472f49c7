//! Reproducible archives for the guest: a cpio (newc) writer and the initramfs
//! layout. Same inputs give the same bytes: entries are sorted, every mtime is
//! zero, owners are root, inode numbers are assigned in order.

pub mod cpio;
pub mod image;
pub mod initramfs;
pub mod oci;
