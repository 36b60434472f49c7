//! Pieces of a pod for end-to-end tests: a virtiofsd serving a shared dir,
//! ext4 writable-layer disks, and OCI specs for busybox containers.

use anyhow::{ensure, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running virtiofsd; killed on drop if still running.
pub struct Virtiofsd {
    pub child: Child,
    pub socket: PathBuf,
}

impl Virtiofsd {
    pub fn start(shared: &Path, socket: &Path) -> Result<Virtiofsd> {
        let child = Command::new(crate::virtiofsd())
            .arg(format!("--socket-path={}", socket.display()))
            .arg(format!("--shared-dir={}", shared.display()))
            .args(["--sandbox=none", "--cache=always"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting virtiofsd")?;
        let t = Instant::now();
        while !socket.exists() {
            ensure!(t.elapsed() < Duration::from_secs(30), "virtiofsd did not create {}", socket.display());
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Virtiofsd { child, socket: socket.to_path_buf() })
    }

    /// Waits for virtiofsd to exit on its own (after the VMM disconnects).
    pub fn wait_exit(&mut self, within: Duration) -> Result<()> {
        let t = Instant::now();
        loop {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            ensure!(t.elapsed() < within, "virtiofsd still running {within:?} after the VMM exited");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A sparse ext4 image of `mib` MiB (what the shim's disk pool makes).
pub fn ext4_disk(path: &Path, mib: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(mib << 20)?;
    drop(f);
    let out =
        Command::new("mkfs.ext4").args(["-q", "-F", "-E", "root_owner=0:0"]).arg(path).output().context("mkfs.ext4")?;
    ensure!(out.status.success(), "mkfs.ext4 {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// A runc-style default spec running `args` (as JSON bytes for the agent).
pub fn busybox_spec(args: &[&str], terminal: bool) -> Result<Vec<u8>> {
    let mut spec = oci_spec::runtime::Spec::default();
    let mut process = spec.process().clone().unwrap_or_default();
    process.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    process.set_terminal(Some(terminal));
    process.set_env(Some(vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into(), "HOME=/root".into()]));
    spec.set_process(Some(process));
    spec.set_hostname(Some("hull-test".into()));
    // The default spec's root is read-only; containers here write their layer.
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_readonly(Some(false));
    spec.set_root(Some(root));
    Ok(serde_json::to_vec(&spec)?)
}

/// An OCI process object for exec.
pub fn process_json(args: &[&str]) -> Result<Vec<u8>> {
    let mut p = oci_spec::runtime::Process::default();
    p.set_args(Some(args.iter().map(|s| s.to_string()).collect()));
    p.set_env(Some(vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()]));
    p.set_cwd("/".into());
    Ok(serde_json::to_vec(&p)?)
}
