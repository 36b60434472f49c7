//! The bundle's OCI spec, read and made fit for the guest.
//!
//! containerd writes specs for a host runtime; inside the pod VM some of it
//! names things that only exist on the host. The shim rewrites (on the JSON,
//! so fields it does not know survive untouched):
//!
//! - **Namespaces.** network, ipc and uts are the pod's, and the pod is the
//!   VM: those entries are removed, so every container of the pod shares the
//!   guest's (CRI joins them through `/proc/<pause pid>/ns/...` paths that
//!   mean nothing in the guest). Any other namespace keeps its type but
//!   loses its host `path` (a fresh namespace in the guest).
//! - **hostname** moves to SetupSandbox (the VM's hostname is the pod's).
//! - **Host bind mounts** (volumes, `/etc/hosts`, `/etc/resolv.conf`,
//!   `/etc/hostname`, the termination log, ...) are bind-mounted by the shim
//!   into the shared directory (`shared/<cid>/mounts/<n>`, read-only if the
//!   mount is) and their source becomes the guest path of that copy under
//!   the agent's virtio-fs mount ([`GUEST_SHARED_ROOT`]). Sources under
//!   `/dev`, `/proc` and `/sys` are left alone: the guest has its own.
//! - **`/dev/shm`** from the host becomes a tmpfs in the guest.
//! - **hooks** name host binaries: they are dropped (with a warning).

use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// Where the agent mounts the virtio-fs share in the guest.
pub const GUEST_SHARED_ROOT: &str = "/run/hull/shared";

/// A host path the shim bind-mounts into the shared directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMount {
    pub source: PathBuf,
    /// Relative to the shared directory: `<cid>/mounts/<n>`.
    pub rel: String,
    pub read_only: bool,
    pub recursive: bool,
    pub is_dir: bool,
}

/// The spec as sent to the agent, and what the shim must do for it.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    pub json: Vec<u8>,
    pub hostname: Option<String>,
    pub host_mounts: Vec<HostMount>,
    pub annotations: std::collections::HashMap<String, String>,
    pub warnings: Vec<String>,
}

/// Reads `<bundle>/config.json` and checks that it is an OCI runtime spec.
pub fn read_bundle_spec(bundle: &Path) -> Result<Value, String> {
    let path = bundle.join("config.json");
    let data = std::fs::read(&path).map_err(|e| format!("reading the OCI spec {}: {e}", path.display()))?;
    parse_spec(&data).map_err(|e| format!("bad OCI spec {}: {e}", path.display()))
}

/// Parses an OCI runtime spec: valid JSON that oci-spec accepts, with a
/// process that has args.
pub fn parse_spec(data: &[u8]) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(data).map_err(|e| e.to_string())?;
    let spec: oci_spec::runtime::Spec = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    match spec.process() {
        None => return Err("no \"process\"".into()),
        Some(p) if p.args().as_ref().is_none_or(|a| a.is_empty()) => return Err("\"process.args\" is empty".into()),
        _ => {}
    }
    Ok(v)
}

/// Annotations of a spec (empty if none).
pub fn annotations(spec: &Value) -> std::collections::HashMap<String, String> {
    spec.get("annotations")
        .and_then(Value::as_object)
        .map(|m| m.iter().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string()))).collect())
        .unwrap_or_default()
}

/// Annotations of `<bundle>/config.json`, for `start` and `delete`; empty
/// if it cannot be read.
pub fn bundle_annotations(bundle: &Path) -> std::collections::HashMap<String, String> {
    std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|d| serde_json::from_slice::<Value>(&d).ok())
        .map(|v| annotations(&v))
        .unwrap_or_default()
}

fn is_bind(m: &Value) -> bool {
    m.get("type").and_then(Value::as_str) == Some("bind")
        || m.get("options")
            .and_then(Value::as_array)
            .is_some_and(|o| o.iter().any(|x| matches!(x.as_str(), Some("bind" | "rbind"))))
}

fn has_option(m: &Value, opt: &str) -> bool {
    m.get("options").and_then(Value::as_array).is_some_and(|o| o.iter().any(|x| x.as_str() == Some(opt)))
}

/// Rewrites `spec` for container `cid` as described in the module docs.
pub fn guest_spec(mut spec: Value, cid: &str) -> Result<GuestSpec, String> {
    let mut warnings = Vec::new();
    let annotations = annotations(&spec);
    let obj = spec.as_object_mut().ok_or("the OCI spec is not a JSON object")?;

    let hostname = obj.remove("hostname").and_then(|h| h.as_str().map(str::to_string)).filter(|h| !h.is_empty());

    if let Some(hooks) = obj.remove("hooks") {
        if hooks.as_object().is_some_and(|h| h.values().any(|v| v.as_array().is_some_and(|a| !a.is_empty()))) {
            warnings.push(format!("OCI hooks are not run inside hull microVMs; dropped: {hooks}"));
        }
    }

    if let Some(ns) = obj.get_mut("linux").and_then(|l| l.get_mut("namespaces")).and_then(Value::as_array_mut) {
        ns.retain(|n| !matches!(n.get("type").and_then(Value::as_str), Some("network" | "ipc" | "uts")));
        for n in ns.iter_mut() {
            if let Some(o) = n.as_object_mut() {
                o.remove("path");
            }
        }
    }

    let mut host_mounts = Vec::new();
    if let Some(mounts) = obj.get_mut("mounts").and_then(Value::as_array_mut) {
        for m in mounts.iter_mut() {
            if !is_bind(m) {
                continue;
            }
            let dest = m.get("destination").and_then(Value::as_str).unwrap_or_default().to_string();
            if dest == "/dev/shm" {
                *m = json!({
                    "destination": "/dev/shm",
                    "type": "tmpfs",
                    "source": "shm",
                    "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
                });
                continue;
            }
            let Some(source) = m.get("source").and_then(Value::as_str).map(PathBuf::from) else {
                return Err(format!("bind mount for {dest:?} has no source"));
            };
            if !source.is_absolute() || ["/dev", "/proc", "/sys"].iter().any(|p| source.starts_with(p)) {
                continue;
            }
            let meta = std::fs::metadata(&source)
                .map_err(|e| format!("mount source {} (for {dest:?}) is not usable: {e}", source.display()))?;
            let rel = format!("{cid}/mounts/{}", host_mounts.len());
            m["source"] = Value::String(format!("{GUEST_SHARED_ROOT}/{rel}"));
            host_mounts.push(HostMount {
                source,
                rel,
                read_only: has_option(m, "ro"),
                recursive: has_option(m, "rbind"),
                is_dir: meta.is_dir(),
            });
        }
    }

    let json = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
    // What the agent gets must still be a valid spec.
    parse_spec(&json).map_err(|e| format!("rewritten OCI spec: {e}"))?;
    Ok(GuestSpec { json, hostname, host_mounts, annotations, warnings })
}

/// Makes the host side of `mounts` under `shared` (files get an empty file
/// to mount on). On error, the caller releases `shared/<cid>`.
pub fn bind_host_mounts(shared: &Path, mounts: &[HostMount]) -> Result<(), String> {
    for m in mounts {
        let dst = shared.join(&m.rel);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
        }
        let made = if m.is_dir { std::fs::create_dir(&dst) } else { std::fs::write(&dst, b"") };
        made.map_err(|e| format!("create {}: {e}", dst.display()))?;
        crate::mounts::bind(&m.source, &dst, !m.read_only, m.recursive)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base_spec() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
            "root": {"path": "rootfs"},
            "hostname": "pod-a",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev/shm", "type": "bind", "source": "/run/containerd/sandboxes/x/shm", "options": ["rbind", "ro"]},
            ],
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/42/ns/uts"},
                {"type": "mount"},
                {"type": "cgroup", "path": "/proc/42/ns/cgroup"},
            ]},
            "hooks": {"prestart": [{"path": "/usr/bin/nvidia-hook"}]},
            "annotations": {"io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb"},
            "x-unknown-field": {"kept": true},
        })
    }

    #[test]
    fn parses_and_rejects_specs() {
        parse_spec(&serde_json::to_vec(&base_spec()).unwrap()).unwrap();
        assert!(parse_spec(b"{not json").is_err());
        let e = parse_spec(br#"{"ociVersion": "1.0.2", "root": {"path": "r"}}"#).unwrap_err();
        assert!(e.contains("process"), "{e}");
        let e = parse_spec(
            br#"{"ociVersion": "1.0.2", "process": {"args": [], "cwd": "/", "user": {"uid": 0, "gid": 0}}}"#,
        )
        .unwrap_err();
        assert!(e.contains("args"), "{e}");
        let e = parse_spec(
            br#"{"ociVersion": "1.0.2", "process": {"args": "sh", "cwd": "/", "user": {"uid": 0, "gid": 0}}}"#,
        )
        .unwrap_err();
        assert!(e.contains("invalid type"), "{e}");
    }

    #[test]
    fn rewrites_namespaces_hostname_hooks_and_shm() {
        let g = guest_spec(base_spec(), "c1").unwrap();
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert_eq!(g.hostname.as_deref(), Some("pod-a"));
        assert!(v.get("hostname").is_none());
        assert!(v.get("hooks").is_none());
        assert_eq!(g.warnings.len(), 1);
        assert!(g.warnings[0].contains("nvidia-hook"));
        let ns = v["linux"]["namespaces"].as_array().unwrap();
        assert_eq!(ns, &vec![json!({"type": "pid"}), json!({"type": "mount"}), json!({"type": "cgroup"})]);
        assert_eq!(v["mounts"][1]["type"], "tmpfs");
        assert_eq!(v["mounts"][1]["destination"], "/dev/shm");
        assert_eq!(v["x-unknown-field"]["kept"], true);
        assert_eq!(g.annotations["io.kubernetes.cri.sandbox-id"], "sb");
        assert!(g.host_mounts.is_empty());
    }

    #[test]
    fn host_bind_mounts_go_through_the_share() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let vol = dir.path().join("vol");
        std::fs::create_dir(&vol).unwrap();
        let mut s = base_spec();
        s["mounts"].as_array_mut().unwrap().extend([
            json!({"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": ["rbind", "rprivate", "ro"]}),
            json!({"destination": "/data", "type": "none", "source": vol, "options": ["rbind", "rw"]}),
            json!({"destination": "/dev/fuse", "type": "bind", "source": "/dev/fuse", "options": ["bind"]}),
        ]);
        let g = guest_spec(s, "c1").unwrap();
        let v: Value = serde_json::from_slice(&g.json).unwrap();
        assert_eq!(v["mounts"][2]["source"], format!("{GUEST_SHARED_ROOT}/c1/mounts/0"));
        assert_eq!(v["mounts"][3]["source"], format!("{GUEST_SHARED_ROOT}/c1/mounts/1"));
        assert_eq!(v["mounts"][4]["source"], "/dev/fuse");
        assert_eq!(
            g.host_mounts,
            vec![
                HostMount { source: hosts, rel: "c1/mounts/0".into(), read_only: true, recursive: true, is_dir: false },
                HostMount { source: vol, rel: "c1/mounts/1".into(), read_only: false, recursive: true, is_dir: true },
            ]
        );
    }

    #[test]
    fn missing_mount_source_is_an_error() {
        let mut s = base_spec();
        s["mounts"]
            .as_array_mut()
            .unwrap()
            .push(json!({"destination": "/x", "type": "bind", "source": "/nonexistent/src"}));
        let e = guest_spec(s, "c1").unwrap_err();
        assert!(e.contains("/nonexistent/src") && e.contains("\"/x\""), "{e}");
    }

    #[test]
    fn host_mounts_are_bound() {
        crate::rootfs::tests::in_private_mount_ns(|| {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("resolv.conf");
            std::fs::write(&file, "nameserver 10.0.0.1\n").unwrap();
            let vol = dir.path().join("vol");
            std::fs::create_dir(&vol).unwrap();
            let shared = dir.path().join("shared");
            std::fs::create_dir(&shared).unwrap();
            let mounts = [
                HostMount { source: file, rel: "c/mounts/0".into(), read_only: true, recursive: false, is_dir: false },
                HostMount {
                    source: vol.clone(),
                    rel: "c/mounts/1".into(),
                    read_only: false,
                    recursive: true,
                    is_dir: true,
                },
            ];
            bind_host_mounts(&shared, &mounts).unwrap();
            assert_eq!(std::fs::read_to_string(shared.join("c/mounts/0")).unwrap(), "nameserver 10.0.0.1\n");
            std::fs::write(shared.join("c/mounts/1/new"), "w").unwrap();
            assert_eq!(std::fs::read_to_string(vol.join("new")).unwrap(), "w");
            assert!(std::fs::write(shared.join("c/mounts/0"), "x").is_err());
            crate::rootfs::release(&shared, "c").unwrap();
            assert!(!shared.join("c").exists());
            assert!(vol.join("new").exists());
        });
    }
}
