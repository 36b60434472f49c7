//! VM templates: a VM booted once with the agent ready and idle, paused and
//! snapshotted, so that pods start by restoring it (hull-vmm `--restore`)
//! instead of booting.
//!
//! A template lives in `<state_dir>/templates/<key>/` (`state.json` +
//! `memory`). The key hashes what the guest saw when it was made: the
//! kernel, initramfs and hull-vmm files (path, size, modification time —
//! cheap enough to compute on every pod start; a rebuilt file changes it),
//! vCPUs, memory, the device layout (disk slots and their size, the fs tag,
//! the command line) and hull's version. A pod whose resources differ gets
//! its own template.
//!
//! The first pod that needs a missing template builds it under a file lock
//! (`<key>.lock`), so a burst of pods builds it once; the others wait on the
//! lock and then find it. A build happens in `<key>.build-<pid>/` and is
//! renamed into place only when complete.

use crate::config::Config;
use crate::sandbox::{tail, virtiofsd_args, vmm_args, SandboxPaths, VmBoot, CMDLINE, FS_TAG};
use hull_agent_api::READY_MARKER;
use log::{info, warn};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a template is made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub vcpus: u32,
    pub mem_mib: u64,
    pub disk_slots: usize,
    /// virtio-net devices (one per pod interface; at least one).
    pub nics: usize,
}

pub fn templates_dir(cfg: &Config) -> PathBuf {
    cfg.paths.state_dir.join("templates")
}

fn file_identity(p: &Path) -> Result<String, String> {
    let m = fs::metadata(p).map_err(|e| format!("{}: {e}", p.display()))?;
    Ok(format!("{}:{}:{}.{}", p.display(), m.len(), m.mtime(), m.mtime_nsec()))
}

/// The template key for `shape` (hex, 16 characters).
pub fn key(cfg: &Config, shape: Shape) -> Result<String, String> {
    let mut h = Sha256::new();
    for p in [&cfg.paths.kernel, &cfg.paths.initramfs, &cfg.paths.hull_vmm] {
        h.update(file_identity(p)?.as_bytes());
        h.update([0]);
    }
    h.update(
        format!(
            "vcpus={} mem={} slots={} disk_mib={} tag={FS_TAG} nics={} cmdline={CMDLINE} hull={}",
            shape.vcpus,
            shape.mem_mib,
            shape.disk_slots,
            shape.nics.max(1),
            cfg.defaults.disk_size_mib,
            env!("CARGO_PKG_VERSION")
        )
        .as_bytes(),
    );
    Ok(h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// The template's snapshot directory for `shape`, built now if missing
/// (blocking: call from a blocking thread).
pub fn ensure(cfg: &Config, shape: Shape) -> Result<PathBuf, String> {
    let dir = templates_dir(cfg);
    let k = key(cfg, shape)?;
    let snap = dir.join(&k);
    if snap.join(hull_vmm::persist::STATE_FILE).exists() {
        return Ok(snap);
    }
    fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let lock_path = dir.join(format!("{k}.lock"));
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("open {}: {e}", lock_path.display()))?;
    let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("lock {}: {e}", lock_path.display()))?;
    // Someone else may have built it while we waited.
    if snap.join(hull_vmm::persist::STATE_FILE).exists() {
        return Ok(snap);
    }
    let t = Instant::now();
    let build = dir.join(format!("{k}.build-{}", std::process::id()));
    // Jailed VMMs (uid of their own, group jailer.gid) map it read-only.
    let r = build_in(cfg, shape, &build).and_then(|()| crate::jail::share_template(&build.join("snap"), &cfg.jailer));
    let result = r.and_then(|()| {
        fs::rename(build.join("snap"), &snap).map_err(|e| format!("rename the template into {}: {e}", snap.display()))
    });
    if let Err(e) = fs::remove_dir_all(&build) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!("template {k}: removing {}: {e}", build.display());
        }
    }
    result?;
    info!("template {k} ({shape:?}) built in {} ms: {}", t.elapsed().as_millis(), snap.display());
    Ok(snap)
}

/// Kills and reaps a child on drop (the build's virtiofsd and hull-vmm).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn api(sock: &Path, req: hull_vmm::api::Request) -> Result<(), String> {
    let what = format!("{req:?}");
    match hull_vmm::api::ApiClient::connect(sock).and_then(|mut c| c.call(&req)) {
        Ok(hull_vmm::api::Response::Ok(_)) => Ok(()),
        Ok(hull_vmm::api::Response::Error(e)) => Err(format!("hull-vmm {what}: {}", e.message)),
        Err(e) => Err(format!("hull-vmm {what}: {e}")),
    }
}

/// Boots the template VM in `build` (the same devices a pod VM gets, with
/// throw-away backends), waits for the agent, pauses and snapshots it to
/// `build/snap`.
fn build_in(cfg: &Config, shape: Shape, build: &Path) -> Result<(), String> {
    let _ = fs::remove_dir_all(build);
    let paths = SandboxPaths::new(build.to_path_buf());
    for d in [paths.dir.clone(), paths.shared(), paths.disks()] {
        fs::create_dir_all(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    let log = |what: &str| -> Result<fs::File, String> {
        fs::File::create(paths.log(what)).map_err(|e| format!("create {}: {e}", paths.log(what).display()))
    };
    let vfs = Command::new(&cfg.paths.virtiofsd)
        .args(virtiofsd_args(&paths, None))
        .stdin(Stdio::null())
        .stdout(log("virtiofsd")?)
        .stderr(log("virtiofsd")?)
        .spawn()
        .map_err(|e| format!("starting virtiofsd: {e}"))?;
    let _vfs = Reaped(vfs);
    wait_for(&paths.virtiofsd_socket(), Duration::from_secs(10), "virtiofsd's socket")?;

    let notify = UnixListener::bind(paths.notify_socket())
        .map_err(|e| format!("listen on {}: {e}", paths.notify_socket().display()))?;
    // Sparse stand-ins of the pool disks' exact size: the guest learns
    // each slot's capacity now and a restored VM must match it.
    for slot in 0..shape.disk_slots {
        let img = paths.disk_image(&SandboxPaths::disk_serial(slot));
        let f = fs::File::create(&img).map_err(|e| format!("create {}: {e}", img.display()))?;
        f.set_len(cfg.defaults.disk_size_mib << 20).map_err(|e| format!("size {}: {e}", img.display()))?;
    }
    let mut cmd = Command::new(&cfg.paths.hull_vmm);
    let boot = VmBoot::Cold { vcpus: shape.vcpus, mem_mib: shape.mem_mib };
    cmd.args(vmm_args(cfg, &paths, boot, shape.disk_slots, &vec![None; shape.nics.max(1)]));
    let vmm = cmd
        .stdin(Stdio::null())
        .stdout(log("hull-vmm")?)
        .stderr(log("hull-vmm")?)
        .spawn()
        .map_err(|e| format!("starting hull-vmm: {e}"))?;
    let mut vmm = Reaped(vmm);

    let timeout = Duration::from_secs(cfg.defaults.agent_ready_timeout_secs);
    notify.set_nonblocking(true).map_err(|e| e.to_string())?;
    let t = Instant::now();
    loop {
        match notify.accept() {
            Ok((conn, _)) => {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                let mut line = String::new();
                let _ = BufReader::new(conn).read_line(&mut line);
                if line.starts_with(READY_MARKER) {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("accept on {}: {e}", paths.notify_socket().display())),
        }
        if let Ok(Some(st)) = vmm.0.try_wait() {
            return Err(format!("template VM: hull-vmm exited ({st}): {}", tail(&paths.log("hull-vmm"), 3)));
        }
        if t.elapsed() > timeout {
            return Err(format!(
                "template VM: the agent did not answer within {}s; console:\n{}",
                timeout.as_secs(),
                tail(&paths.console(), 10)
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // The agent closes its notify connection and goes idle.
    std::thread::sleep(Duration::from_millis(200));
    api(&paths.api(), hull_vmm::api::Request::Pause)?;
    api(&paths.api(), hull_vmm::api::Request::Snapshot { dir: build.join("snap") })?;
    api(&paths.api(), hull_vmm::api::Request::Shutdown)?;
    let t = Instant::now();
    while vmm.0.try_wait().map_err(|e| e.to_string())?.is_none() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn wait_for(p: &Path, within: Duration, what: &str) -> Result<(), String> {
    let t = Instant::now();
    while !p.exists() {
        if t.elapsed() > within {
            return Err(format!("{what} ({}) did not appear within {}s", p.display(), within.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> Config {
        let mut c = Config::default();
        for (name, p) in
            [("vmlinux", &mut c.paths.kernel), ("initrd", &mut c.paths.initramfs), ("vmm", &mut c.paths.hull_vmm)]
        {
            *p = dir.join(name);
            fs::write(&*p, name).unwrap();
        }
        c.paths.state_dir = dir.join("state");
        c
    }

    #[test]
    fn key_follows_what_the_guest_saw() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let s = Shape { vcpus: 1, mem_mib: 256, disk_slots: 4, nics: 1 };
        let k = key(&c, s).unwrap();
        assert_eq!(k.len(), 16);
        assert_eq!(key(&c, s).unwrap(), k, "stable");
        assert_ne!(key(&c, Shape { mem_mib: 512, ..s }).unwrap(), k);
        assert_ne!(key(&c, Shape { vcpus: 2, ..s }).unwrap(), k);
        assert_ne!(key(&c, Shape { disk_slots: 3, ..s }).unwrap(), k);
        assert_ne!(key(&c, Shape { nics: 2, ..s }).unwrap(), k);
        assert_eq!(key(&c, Shape { nics: 0, ..s }).unwrap(), k, "a VM has one NIC at least");
        let mut c2 = c.clone();
        c2.defaults.disk_size_mib += 1;
        assert_ne!(key(&c2, s).unwrap(), k);
        // A rebuilt kernel (new size) is a new template.
        fs::write(&c.paths.kernel, "a new kernel").unwrap();
        assert_ne!(key(&c, s).unwrap(), k);
        fs::remove_file(&c.paths.initramfs).unwrap();
        assert!(key(&c, s).unwrap_err().contains("initrd"));
    }

    #[test]
    fn an_existing_template_is_used_without_building() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let s = Shape { vcpus: 1, mem_mib: 128, disk_slots: 1, nics: 1 };
        let snap = templates_dir(&c).join(key(&c, s).unwrap());
        fs::create_dir_all(&snap).unwrap();
        fs::write(snap.join(hull_vmm::persist::STATE_FILE), "{}").unwrap();
        assert_eq!(ensure(&c, s).unwrap(), snap);
    }

    #[test]
    fn a_failed_build_leaves_nothing_and_says_why() {
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(d.path());
        c.paths.virtiofsd = d.path().join("no-virtiofsd");
        let s = Shape { vcpus: 1, mem_mib: 128, disk_slots: 1, nics: 1 };
        let e = ensure(&c, s).unwrap_err();
        assert!(e.contains("starting virtiofsd"), "{e}");
        let left: Vec<_> = fs::read_dir(templates_dir(&c)).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 1, "only the lock file is left: {left:?}");
        assert!(left[0].to_string_lossy().ends_with(".lock"));
    }
}
