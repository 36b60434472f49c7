//! The VM configuration: what the CLI flags and the API's `configure` request
//! describe. Validation names the offending field and value.

use crate::arch::x86_64::layout::{FIRST_VIRTIO_IRQ, LAST_IRQ};
use crate::arch::x86_64::mptable::MAX_VCPUS;
use crate::vstate::memory::MIN_MEM_MIB;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
pub const DEFAULT_MEM_MIB: u64 = 128;
pub const DEFAULT_FS_TAG: &str = "hullfs";
pub const DEFAULT_GUEST_CID: u64 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// vmlinux (ELF with a PVH note) or bzImage.
    pub kernel: PathBuf,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; virtio-mmio device announcements are appended.
    #[serde(default = "default_cmdline")]
    pub cmdline: String,
    #[serde(default = "default_mem")]
    pub mem_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    #[serde(default)]
    pub fs: Vec<FsDeviceConfig>,
    #[serde(default)]
    pub vsock: Option<VsockDeviceConfig>,
    #[serde(default)]
    pub console: Console,
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_mem() -> u64 {
    DEFAULT_MEM_MIB
}
fn default_vcpus() -> u8 {
    1
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    /// The serial the guest reads with VIRTIO_BLK_T_GET_ID (≤ 20 bytes).
    #[serde(default)]
    pub id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsDeviceConfig {
    /// virtiofsd's vhost-user socket.
    pub socket: PathBuf,
    #[serde(default = "default_tag")]
    pub tag: String,
}

fn default_tag() -> String {
    DEFAULT_FS_TAG.to_string()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockDeviceConfig {
    /// Host side unix socket (hybrid vsock); guest→host connections to port P
    /// go to `<uds_path>_<P>`.
    pub uds_path: PathBuf,
    #[serde(default = "default_cid")]
    pub guest_cid: u64,
}

fn default_cid() -> u64 {
    DEFAULT_GUEST_CID
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Console {
    #[default]
    Stdout,
    File(PathBuf),
    Off,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("kernel {0}: no such file")]
    KernelMissing(PathBuf),
    #[error("initramfs {0}: no such file")]
    InitrdMissing(PathBuf),
    #[error("memory {0} MiB is too small: at least {MIN_MEM_MIB} MiB")]
    MemTooSmall(u64),
    #[error("{0} vCPUs: must be 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    #[error("disk {0}: no such file")]
    DiskMissing(PathBuf),
    #[error("{0} virtio devices: at most {max} fit (one IRQ each)", max = LAST_IRQ - FIRST_VIRTIO_IRQ + 1)]
    TooManyDevices(usize),
    #[error("{what} {value:?}: {why}")]
    Bad { what: &'static str, value: String, why: &'static str },
}

impl VmConfig {
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: default_cmdline(),
            mem_mib: DEFAULT_MEM_MIB,
            vcpus: 1,
            disks: vec![],
            fs: vec![],
            vsock: None,
            console: Console::Stdout,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.kernel.is_file() {
            return Err(ConfigError::KernelMissing(self.kernel.clone()));
        }
        if let Some(i) = &self.initrd {
            if !i.is_file() {
                return Err(ConfigError::InitrdMissing(i.clone()));
            }
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall(self.mem_mib));
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        for d in &self.disks {
            if !d.path.exists() {
                return Err(ConfigError::DiskMissing(d.path.clone()));
            }
        }
        let n = self.disks.len() + self.fs.len() + usize::from(self.vsock.is_some());
        if n > (LAST_IRQ - FIRST_VIRTIO_IRQ + 1) as usize {
            return Err(ConfigError::TooManyDevices(n));
        }
        if let Some(v) = &self.vsock {
            if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                return Err(ConfigError::Bad {
                    what: "vsock guest CID",
                    value: v.guest_cid.to_string(),
                    why: "must be 3 to 2^32-1",
                });
            }
        }
        Ok(())
    }
}

/// `PATH[,ro][,id=ID]`
pub fn parse_disk(s: &str) -> Result<DiskConfig, ConfigError> {
    let mut parts = s.split(',');
    let path = parts.next().filter(|p| !p.is_empty()).ok_or(ConfigError::Bad {
        what: "--disk",
        value: s.into(),
        why: "expected PATH[,ro][,id=ID]",
    })?;
    let mut d = DiskConfig { path: path.into(), read_only: false, id: None };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => d.read_only = true,
            None if opt == "rw" => d.read_only = false,
            Some(("id", v)) if !v.is_empty() && v.len() <= 20 => d.id = Some(v.into()),
            Some(("id", _)) => {
                return Err(ConfigError::Bad { what: "--disk id", value: s.into(), why: "id must be 1 to 20 bytes" })
            }
            _ => {
                return Err(ConfigError::Bad {
                    what: "--disk option",
                    value: opt.into(),
                    why: "expected ro, rw or id=ID",
                })
            }
        }
    }
    Ok(d)
}

/// `SOCKET[,tag=TAG]`
pub fn parse_fs(s: &str) -> Result<FsDeviceConfig, ConfigError> {
    let mut parts = s.split(',');
    let socket = parts.next().filter(|p| !p.is_empty()).ok_or(ConfigError::Bad {
        what: "--fs-socket",
        value: s.into(),
        why: "expected SOCKET[,tag=TAG]",
    })?;
    let mut f = FsDeviceConfig { socket: socket.into(), tag: DEFAULT_FS_TAG.into() };
    for opt in parts {
        match opt.split_once('=') {
            Some(("tag", v)) if !v.is_empty() && v.len() <= 36 => f.tag = v.into(),
            _ => {
                return Err(ConfigError::Bad {
                    what: "--fs-socket option",
                    value: opt.into(),
                    why: "expected tag=TAG (1 to 36 bytes)",
                })
            }
        }
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        assert_eq!(parse_disk("/a.img").unwrap(), DiskConfig { path: "/a.img".into(), read_only: false, id: None });
        let d = parse_disk("/a.img,ro,id=ctr-1").unwrap();
        assert!(d.read_only);
        assert_eq!(d.id.as_deref(), Some("ctr-1"));
        assert!(parse_disk("").is_err());
        assert!(parse_disk("/a,id=123456789012345678901").unwrap_err().to_string().contains("20 bytes"));
        assert!(parse_disk("/a,bogus").unwrap_err().to_string().contains("bogus"));
    }

    #[test]
    fn fs_specs() {
        assert_eq!(parse_fs("/s.sock").unwrap().tag, DEFAULT_FS_TAG);
        assert_eq!(parse_fs("/s.sock,tag=layers").unwrap().tag, "layers");
        assert!(parse_fs("/s.sock,tag=").is_err());
    }

    #[test]
    fn validation_names_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        let mut c = VmConfig::new(k.clone());
        assert_eq!(c.validate(), Err(ConfigError::KernelMissing(k.clone())));
        std::fs::write(&k, b"x").unwrap();
        c.validate().unwrap();
        c.mem_mib = 4;
        assert!(c.validate().unwrap_err().to_string().contains("4 MiB is too small"));
        c.mem_mib = 128;
        c.vcpus = 0;
        assert_eq!(c.validate(), Err(ConfigError::Vcpus(0)));
        c.vcpus = 1;
        c.disks.push(DiskConfig { path: dir.path().join("nope"), read_only: false, id: None });
        assert!(matches!(c.validate(), Err(ConfigError::DiskMissing(_))));
    }

    #[test]
    fn json_defaults_and_unknown_fields() {
        let c: VmConfig = serde_json::from_str(r#"{"kernel":"/k"}"#).unwrap();
        assert_eq!((c.mem_mib, c.vcpus, c.cmdline.as_str()), (DEFAULT_MEM_MIB, 1, DEFAULT_CMDLINE));
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","memory":5}"#).unwrap_err();
        assert!(e.to_string().contains("memory"), "{e}");
    }
}
