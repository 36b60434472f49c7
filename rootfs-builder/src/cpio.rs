//! A minimal, deterministic writer for the "newc" cpio format the kernel unpacks.

use std::collections::BTreeMap;
use std::io::{self, Write};

/// What an archive entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File { data: Vec<u8>, executable: bool },
    Symlink { target: String },
    CharDev { major: u32, minor: u32 },
}

/// An in-memory archive; entries are keyed (and so written) by path order.
#[derive(Debug, Default, Clone)]
pub struct Archive {
    entries: BTreeMap<String, (Node, u32)>,
}

impl Archive {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `node` at `path` (relative, no leading `/`), creating parent
    /// directories. Paths with `..`, empty components or a leading `/` are refused.
    pub fn add(&mut self, path: &str, node: Node) -> io::Result<()> {
        let mode = match &node {
            Node::Dir => 0o040755,
            Node::File { executable: true, .. } => 0o100755,
            Node::File { executable: false, .. } => 0o100644,
            Node::Symlink { .. } => 0o120777,
            Node::CharDev { .. } => 0o020600,
        };
        self.add_with_mode(path, node, mode)
    }

    fn add_with_mode(&mut self, path: &str, node: Node, mode: u32) -> io::Result<()> {
        let bad =
            path.is_empty() || path.starts_with('/') || path.split('/').any(|c| c.is_empty() || c == "." || c == "..");
        if bad {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad archive path {path:?}: must be relative without '.', '..' or empty components"),
            ));
        }
        let mut parent = String::new();
        for comp in path.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(comp);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(parent.clone(), (Node::Dir, 0o040755));
                }
                Some((Node::Dir, _)) => {}
                Some(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{path:?}: parent {parent:?} is not a directory"),
                    ))
                }
            }
        }
        if let Some((existing, _)) = self.entries.get(path) {
            if !(existing == &Node::Dir && node == Node::Dir) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("archive already has an entry at {path:?}"),
                ));
            }
        }
        self.entries.insert(path.to_string(), (node, mode));
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the archive in newc format, ending with the trailer.
    pub fn write_to<W: Write>(&self, mut w: W) -> io::Result<()> {
        let mut written = 0usize;
        for (ino, (path, (node, mode))) in self.entries.iter().enumerate() {
            let (data, rdev): (&[u8], (u32, u32)) = match node {
                Node::Dir => (&[], (0, 0)),
                Node::File { data, .. } => (data, (0, 0)),
                Node::Symlink { target } => (target.as_bytes(), (0, 0)),
                Node::CharDev { major, minor } => (&[], (*major, *minor)),
            };
            let nlink = if matches!(node, Node::Dir) { 2 } else { 1 };
            written += write_entry(&mut w, ino as u32 + 1, *mode, nlink, rdev, path, data)?;
        }
        written += write_entry(&mut w, 0, 0, 1, (0, 0), "TRAILER!!!", &[])?;
        // Pad the whole archive to a 512-byte boundary, as GNU cpio does.
        let pad = (512 - written % 512) % 512;
        w.write_all(&vec![0u8; pad])?;
        Ok(())
    }
}

fn write_entry<W: Write>(
    w: &mut W,
    ino: u32,
    mode: u32,
    nlink: u32,
    rdev: (u32, u32),
    name: &str,
    data: &[u8],
) -> io::Result<usize> {
    let data_len = u32::try_from(data.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: file over 4 GiB")))?;
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{data_len:08x}{maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        maj = 0,
        min = 0,
        rmaj = rdev.0,
        rmin = rdev.1,
        namesize = name.len() + 1,
        check = 0,
    );
    let mut n = 0;
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    n += header.len() + name.len() + 1;
    let pad = (4 - n % 4) % 4;
    w.write_all(&[0u8; 3][..pad])?;
    n += pad;
    w.write_all(data)?;
    n += data.len();
    let pad = (4 - n % 4) % 4;
    w.write_all(&[0u8; 3][..pad])?;
    Ok(n + pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_escaping_paths() {
        let mut a = Archive::new();
        for p in ["/etc", "../x", "a/../b", "a//b", "", "./a"] {
            assert!(a.add(p, Node::Dir).is_err(), "{p:?} accepted");
        }
        assert!(a.is_empty());
    }

    #[test]
    fn creates_parents_and_refuses_duplicates() {
        let mut a = Archive::new();
        a.add("a/b/c", Node::File { data: b"x".to_vec(), executable: false }).unwrap();
        assert_eq!(a.len(), 3);
        assert!(a.add("a/b/c", Node::Dir).is_err());
        assert!(a.add("a/b/c/d", Node::Dir).is_err());
        a.add("a/b", Node::Dir).unwrap();
    }

    #[test]
    fn output_is_order_independent_and_aligned() {
        let mut a = Archive::new();
        a.add("init", Node::File { data: vec![1, 2, 3], executable: true }).unwrap();
        a.add("dev/console", Node::CharDev { major: 5, minor: 1 }).unwrap();
        let mut b = Archive::new();
        b.add("dev/console", Node::CharDev { major: 5, minor: 1 }).unwrap();
        b.add("init", Node::File { data: vec![1, 2, 3], executable: true }).unwrap();
        let (mut x, mut y) = (Vec::new(), Vec::new());
        a.write_to(&mut x).unwrap();
        b.write_to(&mut y).unwrap();
        assert_eq!(x, y);
        assert_eq!(x.len() % 512, 0);
        assert!(x.starts_with(b"070701"));
        let s = String::from_utf8_lossy(&x);
        assert!(s.contains("TRAILER!!!"));
        // "dev" sorts before "dev/console" before "init".
        let (d, c, i) = (s.find("dev\0").unwrap(), s.find("dev/console").unwrap(), s.find("init").unwrap());
        assert!(d < c && c < i);
    }

    /// Cross-check with GNU cpio when it is installed (it is, via scripts/setup.sh).
    #[test]
    fn gnu_cpio_lists_our_archive() {
        if std::process::Command::new("cpio").arg("--version").output().is_err() {
            panic!("GNU cpio is not installed; run scripts/setup.sh");
        }
        let mut a = Archive::new();
        a.add("bin/sh", Node::Symlink { target: "busybox".into() }).unwrap();
        a.add("init", Node::File { data: b"#!/bin/sh\n".to_vec(), executable: true }).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        a.write_to(std::fs::File::create(&path).unwrap()).unwrap();
        let out = std::process::Command::new("cpio").args(["-it", "--quiet", "-F"]).arg(&path).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "bin\nbin/sh\ninit\n");
    }
}
