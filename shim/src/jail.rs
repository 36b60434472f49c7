//! Jailing each pod's hull-vmm (`[jailer]` in the config): hull-vmm is
//! started with `--jail <pod>/vm,uid=U,gid=G` and confines itself before it
//! touches the guest (its own PID, mount, IPC and network namespaces,
//! pivot_root into `<pod>/vm`, uid U, no capabilities; see hull-vmm's
//! `jail` module). The shim's part is here: a uid of its own for every pod,
//! so one VMM cannot touch another's files, and the ownership of the files
//! the VMM opens.
//!
//! A pod's uid is claimed by creating `<state_dir>/jail-uids/<uid>` (its
//! content is the pod id) with O_EXCL, and written to `<pod>/jail-uid` so a
//! `delete` after a dead shim can release it. A claim whose pod directory is
//! gone is stale and is taken over.

use crate::config::{Config, Jailer};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The file in a pod's directory naming its jail uid.
const POD_UID_FILE: &str = "jail-uid";

/// A pod's jail identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIds {
    pub uid: u32,
    pub gid: u32,
}

impl JailIds {
    /// hull-vmm's `--jail` argument for jail root `root`.
    pub fn arg(&self, root: &Path) -> String {
        format!("{},uid={},gid={}", root.display(), self.uid, self.gid)
    }

    /// Makes `p` the jailed VMM's own (it writes or connects to it).
    pub fn give(&self, p: &Path) -> Result<(), String> {
        std::os::unix::fs::chown(p, Some(self.uid), Some(self.gid))
            .map_err(|e| format!("chown {} to the pod's jail uid {}: {e}", p.display(), self.uid))
    }
}

fn claims_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("jail-uids")
}

/// Claims a free uid for pod `pod_id` (whose directory is `pod_dir`).
pub fn claim(cfg: &Config, pod_id: &str, pod_dir: &Path) -> Result<JailIds, String> {
    let j = &cfg.jailer;
    let dir = claims_dir(&cfg.paths.state_dir);
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    // Start where the pod id hashes to: a burst of pods rarely collides.
    let start = pod_id.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32)) % j.uid_count;
    for i in 0..j.uid_count {
        let uid = j.uid_base + 1 + (start + i) % j.uid_count;
        let claim = dir.join(uid.to_string());
        let created = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&claim);
        let mut f = match created {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !is_stale(&cfg.paths.state_dir, &claim) {
                    continue;
                }
                let _ = fs::remove_file(&claim);
                match fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&claim) {
                    Ok(f) => f,
                    Err(_) => continue, // another shim took it over first
                }
            }
            Err(e) => return Err(format!("claim jail uid {uid}: {e}")),
        };
        f.write_all(pod_id.as_bytes()).map_err(|e| format!("write {}: {e}", claim.display()))?;
        fs::write(pod_dir.join(POD_UID_FILE), uid.to_string())
            .map_err(|e| format!("write {}: {e}", pod_dir.join(POD_UID_FILE).display()))?;
        return Ok(JailIds { uid, gid: j.gid });
    }
    Err(format!(
        "no free jail uid: all {} of jailer.uid_base + 1 .. + {} are taken (raise jailer.uid_count)",
        j.uid_count, j.uid_count
    ))
}

/// A claim naming a pod whose directory no longer exists.
fn is_stale(state_dir: &Path, claim: &Path) -> bool {
    match fs::read_to_string(claim) {
        // An empty claim may be one being written right now.
        Ok(pod) if !pod.is_empty() => {
            hull_agent_api::validate::check_id("sandbox id", &pod).is_err() || !state_dir.join(&pod).exists()
        }
        _ => false,
    }
}

/// Releases the uid claimed for the pod in `pod_dir` (if any). Returns
/// what was done, for the log.
pub fn release(pod_dir: &Path) -> Option<String> {
    let uid: u32 = fs::read_to_string(pod_dir.join(POD_UID_FILE)).ok()?.trim().parse().ok()?;
    let pod_id = pod_dir.file_name()?.to_string_lossy().into_owned();
    let claim = claims_dir(pod_dir.parent()?).join(uid.to_string());
    // Only our own claim: a stale one may have been taken over since.
    if fs::read_to_string(&claim).ok()? != pod_id {
        return None;
    }
    fs::remove_file(&claim).ok()?;
    Some(format!("released jail uid {uid}"))
}

/// Lets jailed VMMs read a template: its directory and files belong to
/// group `gid` (read-only); nobody else gets in.
pub fn share_template(snap: &Path, j: &Jailer) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let set = |p: &Path, mode: u32| -> Result<(), String> {
        std::os::unix::fs::chown(p, Some(0), Some(j.gid)).map_err(|e| format!("chown {}: {e}", p.display()))?;
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).map_err(|e| format!("chmod {}: {e}", p.display()))
    };
    set(snap, 0o750)?;
    for e in fs::read_dir(snap).map_err(|e| format!("read {}: {e}", snap.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            set(&e.path(), 0o640)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(state: &Path, count: u32) -> Config {
        let mut c = Config::default();
        c.paths.state_dir = state.to_path_buf();
        c.jailer.uid_base = 5_000_000;
        c.jailer.uid_count = count;
        c
    }

    fn pod(state: &Path, id: &str) -> PathBuf {
        let d = state.join(id);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn every_pod_gets_its_own_uid_until_the_range_is_full() {
        let t = tempfile::tempdir().unwrap();
        let c = cfg(t.path(), 3);
        let mut uids: Vec<u32> =
            ["a", "b", "c"].iter().map(|id| claim(&c, id, &pod(t.path(), id)).unwrap().uid).collect();
        uids.sort();
        assert_eq!(uids, [5_000_001, 5_000_002, 5_000_003]);
        let e = claim(&c, "d", &pod(t.path(), "d")).unwrap_err();
        assert!(e.contains("no free jail uid") && e.contains("jailer.uid_count"), "{e}");
        // Releasing one frees exactly that uid.
        let b_uid: u32 = fs::read_to_string(t.path().join("b/jail-uid")).unwrap().parse().unwrap();
        assert_eq!(release(&t.path().join("b")), Some(format!("released jail uid {b_uid}")));
        assert_eq!(claim(&c, "d", &pod(t.path(), "d")).unwrap().uid, b_uid);
        assert!(claim(&c, "e", &pod(t.path(), "e")).unwrap_err().contains("no free"));
    }

    #[test]
    fn a_claim_of_a_vanished_pod_is_taken_over() {
        let t = tempfile::tempdir().unwrap();
        let c = cfg(t.path(), 1);
        let gone = pod(t.path(), "gone");
        let uid = claim(&c, "gone", &gone).unwrap().uid;
        fs::remove_dir_all(&gone).unwrap();
        assert_eq!(claim(&c, "new", &pod(t.path(), "new")).unwrap().uid, uid);
        // The vanished pod's late release does not free the new pod's claim.
        fs::create_dir_all(&gone).unwrap();
        fs::write(gone.join(POD_UID_FILE), uid.to_string()).unwrap();
        assert_eq!(release(&gone), None);
        assert_eq!(fs::read_to_string(claims_dir(t.path()).join(uid.to_string())).unwrap(), "new");
    }

    #[test]
    fn templates_are_readable_by_the_jail_group_only() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let t = tempfile::tempdir().unwrap();
        fs::write(t.path().join("memory"), "m").unwrap();
        let j = Jailer { gid: 5_000_000, ..Jailer::default() };
        share_template(t.path(), &j).unwrap();
        let m = fs::metadata(t.path().join("memory")).unwrap();
        assert_eq!((m.gid(), m.permissions().mode() & 0o777), (5_000_000, 0o640));
        assert_eq!(fs::metadata(t.path()).unwrap().permissions().mode() & 0o777, 0o750);
    }
}
