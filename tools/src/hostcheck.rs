//! Can this host run a hull microVM directly?
//!
//! Three facts decide it: /dev/kvm opens and speaks KVM API 12, the CPU
//! advertises hardware virtualization (vmx/svm), and KVM is not the PVM
//! hypervisor (which only runs PVM-built guest kernels).

use std::fmt;
use std::os::fd::AsRawFd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvmDevice {
    Missing,
    Unusable(String),
    Usable { api_version: i32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuVirt {
    Vmx,
    Svm,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostReport {
    pub kvm: KvmDevice,
    pub cpu: CpuVirt,
    /// The kvm_pvm module is loaded (/dev/kvm is the PVM hypervisor).
    pub pvm: bool,
}

impl HostReport {
    /// True when a standard Linux guest runs under this host's KVM.
    pub fn can_run_microvm(&self) -> bool {
        matches!(self.kvm, KvmDevice::Usable { .. }) && self.cpu != CpuVirt::None && !self.pvm
    }

    /// One plain-language verdict line.
    pub fn verdict(&self) -> String {
        if self.can_run_microvm() {
            return "microVMs run natively on this host".to_string();
        }
        if self.pvm || (matches!(self.kvm, KvmDevice::Usable { .. }) && self.cpu == CpuVirt::None) {
            return "KVM here is PVM-only (no vmx/svm): it cannot run a standard guest kernel. \
                    microVMs run in the lab (hull-lab run -- CMD), an emulated KVM host"
                .to_string();
        }
        match &self.kvm {
            KvmDevice::Missing => "no /dev/kvm: microVMs run in the lab (hull-lab run -- CMD)".into(),
            KvmDevice::Unusable(why) => {
                format!("/dev/kvm is unusable ({why}): microVMs run in the lab (hull-lab run -- CMD)")
            }
            KvmDevice::Usable { .. } => "the CPU has no vmx/svm: microVMs run in the lab (hull-lab run -- CMD)".into(),
        }
    }
}

impl fmt::Display for HostReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kvm = match &self.kvm {
            KvmDevice::Missing => "missing".to_string(),
            KvmDevice::Unusable(why) => format!("unusable: {why}"),
            KvmDevice::Usable { api_version } => format!("usable (API {api_version})"),
        };
        let cpu = match self.cpu {
            CpuVirt::Vmx => "vmx",
            CpuVirt::Svm => "svm",
            CpuVirt::None => "none",
        };
        writeln!(f, "/dev/kvm:             {kvm}")?;
        writeln!(f, "cpu virtualization:   {cpu}")?;
        writeln!(f, "kvm_pvm module:       {}", if self.pvm { "loaded" } else { "not loaded" })?;
        write!(f, "verdict:              {}", self.verdict())
    }
}

/// Checks this host.
pub fn check() -> HostReport {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let modules = std::fs::read_to_string("/proc/modules").unwrap_or_default();
    HostReport {
        kvm: probe_kvm("/dev/kvm"),
        cpu: cpu_virt(&cpuinfo),
        pvm: modules.lines().any(|l| l.starts_with("kvm_pvm ")) || std::path::Path::new("/sys/module/kvm_pvm").exists(),
    }
}

const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

pub fn probe_kvm(path: &str) -> KvmDevice {
    let f = match std::fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return KvmDevice::Missing,
        Err(e) => return KvmDevice::Unusable(format!("open {path}: {e}")),
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION, 0) };
    match v {
        12 => KvmDevice::Usable { api_version: v },
        -1 => KvmDevice::Unusable(format!("KVM_GET_API_VERSION: {}", std::io::Error::last_os_error())),
        v => KvmDevice::Unusable(format!("KVM API version {v}, expected 12")),
    }
}

pub fn cpu_virt(cpuinfo: &str) -> CpuVirt {
    for line in cpuinfo.lines().filter(|l| l.starts_with("flags")) {
        let flags = line.split(':').nth(1).unwrap_or("");
        if flags.split_whitespace().any(|f| f == "vmx") {
            return CpuVirt::Vmx;
        }
        if flags.split_whitespace().any(|f| f == "svm") {
            return CpuVirt::Svm;
        }
    }
    CpuVirt::None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_flags() {
        assert_eq!(cpu_virt("flags\t\t: fpu vme svm lm\n"), CpuVirt::Svm);
        assert_eq!(cpu_virt("flags\t\t: fpu vmx\n"), CpuVirt::Vmx);
        assert_eq!(cpu_virt("flags\t\t: fpu vmxx svmm\n"), CpuVirt::None);
        assert_eq!(cpu_virt(""), CpuVirt::None);
    }

    #[test]
    fn verdicts() {
        let pvm = HostReport { kvm: KvmDevice::Usable { api_version: 12 }, cpu: CpuVirt::None, pvm: true };
        assert!(!pvm.can_run_microvm());
        assert!(pvm.verdict().contains("PVM-only"));
        assert!(pvm.verdict().contains("lab"));
        let native = HostReport { kvm: KvmDevice::Usable { api_version: 12 }, cpu: CpuVirt::Svm, pvm: false };
        assert!(native.can_run_microvm());
        let none = HostReport { kvm: KvmDevice::Missing, cpu: CpuVirt::Vmx, pvm: false };
        assert!(!none.can_run_microvm());
        assert!(none.verdict().contains("no /dev/kvm"));
    }

    #[test]
    fn missing_device() {
        assert_eq!(probe_kvm("/nonexistent/kvm"), KvmDevice::Missing);
        assert!(matches!(probe_kvm("/dev/null"), KvmDevice::Unusable(_)));
    }

    /// This host, as PLATFORM.md describes it: the check must say PVM-only.
    #[test]
    fn this_host_matches_platform_facts() {
        let r = check();
        if r.pvm {
            assert!(!r.can_run_microvm());
            assert!(r.verdict().contains("PVM-only"), "{}", r.verdict());
        }
    }
}
