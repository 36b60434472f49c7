//! Driving a hull-vmm process from a test: spawn it, wait for the agent's
//! readiness notification, talk to its API, wait for its exit with a timeout.

use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Port the agent announces readiness to (hull.notify_port).
pub const NOTIFY_PORT: u32 = 1023;

pub struct VmmProcess {
    pub child: Child,
    pub dir: PathBuf,
    pub started: Instant,
}

impl VmmProcess {
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }
    pub fn console(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn console_text(&self) -> String {
        std::fs::read_to_string(self.console()).unwrap_or_default()
    }

    /// Starts hull-vmm with a vsock device, an API socket and a console file
    /// in `dir`; `extra` adds flags (disks, fs, cmdline...).
    pub fn spawn(vmm: &Path, dir: &Path, extra: &[String]) -> Result<VmmProcess> {
        let started = Instant::now();
        let child = Command::new(vmm)
            .arg("--vsock-socket")
            .arg(dir.join("vsock.sock"))
            .arg("--api-socket")
            .arg(dir.join("api.sock"))
            .arg("--console")
            .arg(dir.join("console.log"))
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", vmm.display()))?;
        Ok(VmmProcess { child, dir: dir.to_path_buf(), started })
    }

    /// Waits for the process to exit, killing it after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(st);
            }
            if t.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("hull-vmm did not exit within {timeout:?}; console:\n{}", self.console_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for VmmProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Listens where a guest→host vsock connection to `port` arrives (hybrid vsock).
pub fn listen_guest_port(vsock_socket: &Path, port: u32) -> Result<UnixListener> {
    let p = PathBuf::from(format!("{}_{port}", vsock_socket.display()));
    UnixListener::bind(&p).with_context(|| format!("binding {}", p.display()))
}

/// Accepts one connection and reads one line, within `timeout`.
pub fn accept_line(l: &UnixListener, timeout: Duration) -> Result<String> {
    l.set_nonblocking(true)?;
    let t = Instant::now();
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(timeout))?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line)?;
                return Ok(line.trim_end().to_string());
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if t.elapsed() > timeout {
                    bail!("no guest connection within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// `TEST key=value` lines the test init printed on the console.
pub fn test_value(console: &str, key: &str) -> Option<String> {
    let prefix = format!("TEST {key}=");
    console.lines().find_map(|l| l.trim_end_matches('\r').strip_prefix(&prefix).map(str::to_string))
}

/// Resident and proportional set size (KiB) of a process.
pub fn rss_pss_kib(pid: u32) -> Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let field = |name: &str| -> Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name).map(|r| r.trim().trim_end_matches(" kB").trim().parse::<u64>()))
            .with_context(|| format!("{name} missing in smaps_rollup"))?
            .map_err(Into::into)
    };
    Ok((field("Rss:")?, field("Pss:")?))
}
