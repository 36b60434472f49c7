//! Pod semantics from the CRI annotations containerd puts in every
//! container's OCI spec: which pod (sandbox) a container belongs to, whether
//! it is the pod's sandbox ("pause") container, and the pod's CPU and memory.
//!
//! One shim process and one microVM serve a whole pod: the shim `start`
//! command groups containers by [`grouping`], so every container of a pod
//! reaches the shim process started for its sandbox.

use crate::config::{Defaults, MAX_VCPUS};
use std::collections::HashMap;

pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// What a container is to its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The CRI sandbox ("pause") container: boots the pod VM. It never
    /// writes to its root file system, so it takes no disk slot (tmpfs upper).
    Sandbox,
    /// A CRI workload container, joining its sandbox's VM.
    Container,
    /// No CRI annotations (e.g. `ctr run`): a pod of one container.
    Standalone,
}

impl Role {
    /// Whether the container starts the pod (boots the VM) rather than joining one.
    pub fn starts_pod(self) -> bool {
        matches!(self, Role::Sandbox | Role::Standalone)
    }

    /// Whether the container gets a writable-layer disk slot.
    pub fn wants_disk(self) -> bool {
        !matches!(self, Role::Sandbox)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    pub role: Role,
    /// The pod's id: the CRI sandbox id, or the container's own id.
    pub sandbox_id: String,
}

/// Reads the pod role and sandbox id of container `id` from its annotations.
pub fn pod_info(id: &str, annotations: &HashMap<String, String>) -> Result<PodInfo, String> {
    let sandbox = annotations.get(SANDBOX_ID).filter(|s| !s.is_empty());
    match annotations.get(CONTAINER_TYPE).map(String::as_str) {
        None => Ok(PodInfo { role: Role::Standalone, sandbox_id: id.to_string() }),
        Some("sandbox") => {
            if let Some(s) = sandbox {
                if s != id {
                    return Err(format!(
                        "{CONTAINER_TYPE}=sandbox but {SANDBOX_ID}={s:?} is not the container id {id:?}"
                    ));
                }
            }
            Ok(PodInfo { role: Role::Sandbox, sandbox_id: id.to_string() })
        }
        Some("container") => match sandbox {
            Some(s) => Ok(PodInfo { role: Role::Container, sandbox_id: s.clone() }),
            None => Err(format!("{CONTAINER_TYPE}=container without a {SANDBOX_ID} annotation")),
        },
        Some(other) => Err(format!("{CONTAINER_TYPE}={other:?}: expected \"sandbox\" or \"container\"")),
    }
}

/// The shim grouping key (the pod's sandbox id) used by `start`; containers
/// with the same key share one shim process and one VM. Unreadable or
/// inconsistent annotations fall back to the container's own id (the error
/// surfaces later, at Create).
pub fn grouping(id: &str, annotations: &HashMap<String, String>) -> String {
    pod_info(id, annotations).map(|p| p.sandbox_id).unwrap_or_else(|_| id.to_string())
}

/// A pod VM's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    pub vcpus: u32,
    pub mem_mib: u64,
}

fn number(annotations: &HashMap<String, String>, key: &str) -> Result<Option<i64>, String> {
    match annotations.get(key).map(|v| v.trim()) {
        None | Some("") => Ok(None),
        Some(v) => v.parse::<i64>().map(Some).map_err(|_| format!("annotation {key}={v:?} is not an integer")),
    }
}

/// The pod VM's vCPUs and memory.
///
/// - vCPUs: `max(defaults.vcpus, ceil(cpu-quota / cpu-period))`, at most
///   32. A pod limited to N CPUs can run N threads at once; the agent needs
///   no CPU of its own. No quota (absent, 0 or -1) → `defaults.vcpus`.
/// - memory: `defaults.mem_mib + ceil(sandbox-memory / 1 MiB)`. The base
///   holds the guest kernel, the agent and the page cache of the image
///   layers; the pod's limit comes on top (kubelet includes the
///   RuntimeClass overhead in `sandbox-memory`). No limit → `defaults.mem_mib`.
pub fn resources(annotations: &HashMap<String, String>, d: &Defaults) -> Result<Resources, String> {
    let quota = number(annotations, SANDBOX_CPU_QUOTA)?;
    let period = number(annotations, SANDBOX_CPU_PERIOD)?;
    let mut vcpus = d.vcpus;
    if let (Some(q), Some(p)) = (quota, period) {
        if q > 0 && p > 0 {
            let want = (q as u64).div_ceil(p as u64).min(u64::from(MAX_VCPUS)) as u32;
            vcpus = vcpus.max(want);
        } else if p < 0 {
            return Err(format!("annotation {SANDBOX_CPU_PERIOD}={p}: must not be negative"));
        }
    }
    let mut mem_mib = d.mem_mib;
    match number(annotations, SANDBOX_MEMORY)? {
        Some(m) if m > 0 => mem_mib += (m as u64).div_ceil(1 << 20),
        Some(m) if m < 0 => return Err(format!("annotation {SANDBOX_MEMORY}={m}: must not be negative")),
        _ => {}
    }
    Ok(Resources { vcpus, mem_mib })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn roles() {
        let p = pod_info("c1", &ann(&[])).unwrap();
        assert_eq!(p, PodInfo { role: Role::Standalone, sandbox_id: "c1".into() });
        assert!(p.role.starts_pod() && p.role.wants_disk());

        let p = pod_info("sb", &ann(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "sb")])).unwrap();
        assert_eq!(p, PodInfo { role: Role::Sandbox, sandbox_id: "sb".into() });
        assert!(p.role.starts_pod() && !p.role.wants_disk());

        let p = pod_info("c2", &ann(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "sb")])).unwrap();
        assert_eq!(p, PodInfo { role: Role::Container, sandbox_id: "sb".into() });
        assert!(!p.role.starts_pod() && p.role.wants_disk());

        // Sandbox without the id annotation: its own id.
        assert_eq!(pod_info("sb", &ann(&[(CONTAINER_TYPE, "sandbox")])).unwrap().sandbox_id, "sb");
    }

    #[test]
    fn bad_annotations() {
        let e = pod_info("c", &ann(&[(CONTAINER_TYPE, "container")])).unwrap_err();
        assert!(e.contains(SANDBOX_ID), "{e}");
        let e = pod_info("c", &ann(&[(CONTAINER_TYPE, "pod")])).unwrap_err();
        assert!(e.contains("\"pod\""), "{e}");
        let e = pod_info("c", &ann(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "other")])).unwrap_err();
        assert!(e.contains("other"), "{e}");
    }

    #[test]
    fn grouping_keys() {
        assert_eq!(grouping("c1", &ann(&[])), "c1");
        assert_eq!(grouping("c2", &ann(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "sb")])), "sb");
        assert_eq!(grouping("sb", &ann(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "sb")])), "sb");
        assert_eq!(grouping("c3", &ann(&[(CONTAINER_TYPE, "container")])), "c3");
    }

    #[test]
    fn resources_from_annotations() {
        let d = Defaults::default();
        assert_eq!(resources(&ann(&[]), &d).unwrap(), Resources { vcpus: 1, mem_mib: 256 });
        // 1.5 CPUs → 2 vCPUs; 128 MiB + 1 byte → 129 MiB on top of the base.
        let a = ann(&[
            (SANDBOX_CPU_QUOTA, "150000"),
            (SANDBOX_CPU_PERIOD, "100000"),
            (SANDBOX_MEMORY, &((128u64 << 20) + 1).to_string()),
        ]);
        assert_eq!(resources(&a, &d).unwrap(), Resources { vcpus: 2, mem_mib: 256 + 129 });
        // Unlimited (-1) and zero are "no limit".
        let a = ann(&[(SANDBOX_CPU_QUOTA, "-1"), (SANDBOX_CPU_PERIOD, "100000"), (SANDBOX_MEMORY, "0")]);
        assert_eq!(resources(&a, &d).unwrap(), Resources { vcpus: 1, mem_mib: 256 });
        // Quota without period: no limit.
        assert_eq!(resources(&ann(&[(SANDBOX_CPU_QUOTA, "50000")]), &d).unwrap().vcpus, 1);
        // The floor is the configured default; the cap is hull-vmm's maximum.
        let d4 = Defaults { vcpus: 4, ..Defaults::default() };
        let a = ann(&[(SANDBOX_CPU_QUOTA, "50000"), (SANDBOX_CPU_PERIOD, "100000")]);
        assert_eq!(resources(&a, &d4).unwrap().vcpus, 4);
        let a = ann(&[(SANDBOX_CPU_QUOTA, "100000000"), (SANDBOX_CPU_PERIOD, "100000")]);
        assert_eq!(resources(&a, &d).unwrap().vcpus, 32);
    }

    #[test]
    fn bad_resource_annotations() {
        let d = Defaults::default();
        let e = resources(&ann(&[(SANDBOX_MEMORY, "lots")]), &d).unwrap_err();
        assert!(e.contains(SANDBOX_MEMORY) && e.contains("lots"), "{e}");
        let e = resources(&ann(&[(SANDBOX_MEMORY, "-5")]), &d).unwrap_err();
        assert!(e.contains("negative"), "{e}");
        let e = resources(&ann(&[(SANDBOX_CPU_QUOTA, "1.5"), (SANDBOX_CPU_PERIOD, "1")]), &d).unwrap_err();
        assert!(e.contains(SANDBOX_CPU_QUOTA), "{e}");
    }
}
