//! The VM configuration: what the CLI flags and the API's `configure` request
//! describe. Validation names the offending field and value.

use crate::arch::x86_64::layout::{FIRST_VIRTIO_IRQ, LAST_IRQ};
use crate::arch::x86_64::mptable::MAX_VCPUS;
use crate::devices::virtio::net::tap::valid_ifname;
pub use crate::devices::virtio::net::{MacAddr, NetBackend};
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
    /// virtio-net devices (eth0, eth1, ... in the guest, in this order).
    #[serde(default)]
    pub net: Vec<NetDeviceConfig>,
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

/// One virtio-net device. JSON: `{"backend": {"tap": "tap0"}, "mac":
/// "02:00:00:00:00:01"}`, `{"backend": {"fd": 5}}` or `{"backend": "none"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetDeviceConfig {
    pub backend: NetBackend,
    /// The guest's MAC address (`02:00:00:00:00:01`); random if absent.
    /// Kept as text so that validation can name a bad value.
    #[serde(default)]
    pub mac: Option<String>,
}

impl NetDeviceConfig {
    /// The parsed MAC address (validate first).
    pub fn mac_addr(&self) -> Result<Option<MacAddr>, ConfigError> {
        match &self.mac {
            None => Ok(None),
            Some(m) => m.parse().map(Some).map_err(|e: crate::devices::virtio::net::MacError| ConfigError::BadValue {
                what: "net mac",
                value: m.clone(),
                why: e.to_string(),
            }),
        }
    }
}

/// Checks a list of net devices: MACs, tap names, descriptors, no two
/// devices on one tap, descriptor or MAC.
pub fn validate_net(nets: &[NetDeviceConfig]) -> Result<(), ConfigError> {
    let mut macs = Vec::new();
    for (i, n) in nets.iter().enumerate() {
        if let Some(mac) = n.mac_addr()? {
            if macs.contains(&mac) {
                return Err(ConfigError::Bad {
                    what: "net mac",
                    value: mac.to_string(),
                    why: "given to two net devices",
                });
            }
            macs.push(mac);
        }
        match &n.backend {
            NetBackend::Tap(name) if !valid_ifname(name) => {
                return Err(ConfigError::Bad {
                    what: "net tap",
                    value: name.clone(),
                    why: "an interface name is 1 to 15 bytes without '/', ':', whitespace or NUL",
                })
            }
            NetBackend::Fd(fd) if *fd < 3 => {
                return Err(ConfigError::Bad {
                    what: "net fd",
                    value: fd.to_string(),
                    why: "must be an inherited descriptor above 2 (0-2 are stdio)",
                })
            }
            NetBackend::None => {}
            b => {
                if nets[..i].iter().any(|o| &o.backend == b) {
                    return Err(ConfigError::Bad {
                        what: "net backend",
                        value: b.to_string(),
                        why: "given to two net devices",
                    });
                }
            }
        }
    }
    Ok(())
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
    #[error("{what} {value:?}: {why}")]
    BadValue { what: &'static str, value: String, why: String },
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
            net: vec![],
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
        let n = self.disks.len() + self.fs.len() + usize::from(self.vsock.is_some()) + self.net.len();
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
        validate_net(&self.net)
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

/// `tap=NAME[,mac=MAC]`, `fd=N[,mac=MAC]` or `none[,mac=MAC]`
pub fn parse_net(s: &str) -> Result<NetDeviceConfig, ConfigError> {
    let syntax = || ConfigError::Bad {
        what: "--net",
        value: s.into(),
        why: "expected tap=NAME[,mac=MAC], fd=N[,mac=MAC] or none[,mac=MAC]",
    };
    let mut parts = s.split(',');
    let backend = match parts.next().map(|p| p.split_once('=').unwrap_or((p, ""))) {
        Some(("tap", name)) if !name.is_empty() => NetBackend::Tap(name.into()),
        Some(("fd", n)) => NetBackend::Fd(n.parse().map_err(|_| ConfigError::Bad {
            what: "--net fd",
            value: n.into(),
            why: "expected a descriptor number",
        })?),
        Some(("none", "")) => NetBackend::None,
        _ => return Err(syntax()),
    };
    let mut n = NetDeviceConfig { backend, mac: None };
    for opt in parts {
        match opt.split_once('=') {
            Some(("mac", v)) if n.mac.is_none() => n.mac = Some(v.into()),
            _ => {
                return Err(ConfigError::Bad {
                    what: "--net option",
                    value: opt.into(),
                    why: "expected mac=MAC (once)",
                })
            }
        }
    }
    validate_net(std::slice::from_ref(&n))?;
    Ok(n)
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
    fn net_specs() {
        let n = parse_net("tap=hull0,mac=02:00:00:00:00:01").unwrap();
        assert_eq!(n.backend, NetBackend::Tap("hull0".into()));
        assert_eq!(n.mac_addr().unwrap(), Some(MacAddr([2, 0, 0, 0, 0, 1])));
        assert_eq!(parse_net("fd=7").unwrap(), NetDeviceConfig { backend: NetBackend::Fd(7), mac: None });
        assert_eq!(parse_net("none,mac=0a:bB:cc:dd:ee:ff").unwrap().backend, NetBackend::None);
        for (bad, says) in [
            ("", "expected tap=NAME"),
            ("tap=", "expected tap=NAME"),
            ("eth0", "expected tap=NAME"),
            ("none=1", "expected tap=NAME"),
            ("fd=x", "\"x\": expected a descriptor number"),
            ("fd=1", "inherited descriptor above 2"),
            ("tap=a/b", "interface name"),
            ("tap=0123456789abcdef", "interface name"),
            ("tap=t0,mac=02:00:00:00:00", "\"02:00:00:00:00\": expected six hex bytes"),
            ("tap=t0,mac=01:00:00:00:00:01", "multicast"),
            ("tap=t0,mac=00:00:00:00:00:00", "all-zero"),
            ("tap=t0,mac=02:00:00:00:00:0g", "six hex bytes"),
            ("tap=t0,mtu=9000", "\"mtu=9000\": expected mac=MAC"),
            ("tap=t0,mac=02:00:00:00:00:01,mac=02:00:00:00:00:02", "expected mac=MAC (once)"),
        ] {
            let e = parse_net(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }

    #[test]
    fn net_devices_in_the_vm_config() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinux");
        std::fs::write(&k, b"x").unwrap();
        let json = format!(
            r#"{{"kernel":"{}","net":[{{"backend":{{"tap":"t0"}},"mac":"02:00:00:00:00:01"}},
                {{"backend":{{"fd":5}}}},{{"backend":"none"}}]}}"#,
            k.display()
        );
        let mut c: VmConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(c.net.len(), 3);
        assert_eq!(c.net[1].backend, NetBackend::Fd(5));
        assert_eq!(c.net[2].backend, NetBackend::None);
        c.validate().unwrap();
        c.net[2].mac = Some("zz".into());
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "net mac \"zz\": expected six hex bytes separated by colons, like 02:00:00:00:00:01"
        );
        c.net[2].mac = Some("02:00:00:00:00:01".into());
        assert!(c.validate().unwrap_err().to_string().contains("given to two net devices"));
        c.net[2].mac = None;
        c.net[2].backend = NetBackend::Tap("t0".into());
        assert_eq!(c.validate().unwrap_err().to_string(), "net backend \"tap=t0\": given to two net devices");
        let e =
            serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","net":[{"backend":{"tap":"t"},"mtu":1}]}"#).unwrap_err();
        assert!(e.to_string().contains("mtu"), "{e}");
        let e = serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","net":[{"backend":"vde"}]}"#).unwrap_err();
        assert!(e.to_string().contains("vde"), "{e}");
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
