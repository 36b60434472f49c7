//! The guest initramfs: the agent as `/init`, the directories PID 1 mounts on,
//! `/dev/console` (so init has stdio before devtmpfs is up) and, optionally,
//! busybox for debugging and tests.

use crate::cpio::{Archive, Node};
use anyhow::{bail, Context, Result};
use flate2::{write::GzEncoder, Compression};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Inputs of a guest initramfs.
#[derive(Debug, Clone)]
pub struct InitramfsSpec {
    /// Static hull-agent binary, installed as `/init`.
    pub agent: PathBuf,
    /// Optional static busybox, installed as `/bin/busybox` with applet links.
    pub busybox: Option<PathBuf>,
    /// Extra files: (host path, path inside the guest).
    pub extra: Vec<(PathBuf, String)>,
}

/// Busybox applets linked in `/bin` when busybox is included.
const APPLETS: &[&str] = &[
    "sh",
    "tr",
    "printf",
    "cat",
    "echo",
    "ls",
    "mount",
    "umount",
    "mkdir",
    "dd",
    "hexdump",
    "nproc",
    "reboot",
    "poweroff",
    "sleep",
    "grep",
    "head",
    "od",
    "cmp",
    "sync",
    "uname",
    "dmesg",
    "mkfs.ext2",
];

const DIRS: &[&str] = &["dev", "proc", "sys", "tmp", "run", "mnt", "etc", "bin", "sbin"];

pub fn build_archive(spec: &InitramfsSpec) -> Result<Archive> {
    let mut a = Archive::new();
    for d in DIRS {
        a.add(d, Node::Dir)?;
    }
    a.add("dev/console", Node::CharDev { major: 5, minor: 1 })?;
    a.add("init", Node::File { data: read_elf(&spec.agent, "agent")?, executable: true })?;
    if let Some(bb) = &spec.busybox {
        a.add("bin/busybox", Node::File { data: read_elf(bb, "busybox")?, executable: true })?;
        for applet in APPLETS {
            a.add(&format!("bin/{applet}"), Node::Symlink { target: "busybox".into() })?;
        }
    }
    for (src, dest) in &spec.extra {
        let data = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        let executable = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(src)?.permissions()) & 0o111 != 0;
        a.add(dest.trim_start_matches('/'), Node::File { data, executable })?;
    }
    Ok(a)
}

/// Writes the gzip-compressed initramfs. Gzip here has a zero mtime and no
/// file name in its header, so the bytes depend only on the inputs.
pub fn write_initramfs(spec: &InitramfsSpec, out: &Path) -> Result<()> {
    let archive = build_archive(spec)?;
    let mut raw = Vec::new();
    archive.write_to(&mut raw)?;
    let mut gz = GzEncoder::new(Vec::new(), Compression::new(6));
    gz.write_all(&raw)?;
    let bytes = gz.finish()?;
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
    Ok(())
}

/// Reads a binary that must run as a static ELF in the guest.
fn read_elf(path: &Path, what: &str) -> Result<Vec<u8>> {
    let data = std::fs::read(path).with_context(|| format!("reading the {what} binary {}", path.display()))?;
    if !data.starts_with(b"\x7fELF") {
        bail!("the {what} binary {} is not an ELF executable", path.display());
    }
    if has_interp(&data) {
        bail!(
            "the {what} binary {} is dynamically linked; the guest has no libraries \
             (build it with RUSTFLAGS='-C target-feature=+crt-static' --target x86_64-unknown-linux-gnu)",
            path.display()
        );
    }
    Ok(data)
}

/// True if a 64-bit little-endian ELF has a PT_INTERP program header.
fn has_interp(elf: &[u8]) -> bool {
    let rd16 = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let rd64 = |o: usize| elf.get(o..o + 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd64(0x20), rd16(0x36), rd16(0x38)) else {
        return false;
    };
    (0..phnum).any(|i| {
        let off = phoff.saturating_add(i.saturating_mul(phentsize));
        elf.get(off..off + 4).map(|b| u32::from_le_bytes(b.try_into().unwrap())) == Some(3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn static_binary() -> PathBuf {
        // busybox-static is installed by scripts/setup.sh.
        let p = PathBuf::from("/bin/busybox");
        assert!(p.exists(), "busybox-static is not installed; run scripts/setup.sh");
        p
    }

    #[test]
    fn same_inputs_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let spec = InitramfsSpec { agent: static_binary(), busybox: Some(static_binary()), extra: vec![] };
        let (a, b) = (dir.path().join("a.gz"), dir.path().join("b.gz"));
        write_initramfs(&spec, &a).unwrap();
        write_initramfs(&spec, &b).unwrap();
        let (x, y) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(x, y);
        assert_eq!(&x[..2], &[0x1f, 0x8b], "not gzip");
    }

    #[test]
    fn refuses_dynamic_agent() {
        let spec = InitramfsSpec { agent: PathBuf::from("/bin/ls"), busybox: None, extra: vec![] };
        let err = build_archive(&spec).unwrap_err().to_string();
        assert!(err.contains("dynamically linked"), "{err}");
        let spec = InitramfsSpec { agent: PathBuf::from("/nonexistent/agent"), busybox: None, extra: vec![] };
        let err = format!("{:#}", build_archive(&spec).unwrap_err());
        assert!(err.contains("/nonexistent/agent"), "{err}");
    }
}
