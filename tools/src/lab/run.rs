//! Running one job in the lab: boot, stream output, collect the exit status,
//! and never wait past the timeout.

use super::kernel::{cache_dir, LabKernel};
use crate::lock::FileLock;
use anyhow::{Context, Result};
use hull_rootfs_builder::cpio::{Archive, Node};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One command to run inside the lab.
#[derive(Debug, Clone)]
pub struct LabCommand {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub timeout: Duration,
}

impl LabCommand {
    pub fn new<S: AsRef<str>>(argv: &[S]) -> Self {
        LabCommand {
            argv: argv.iter().map(|s| s.as_ref().to_string()).collect(),
            env: vec![("PATH".into(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into())],
            cwd: PathBuf::from("/"),
            timeout: Duration::from_secs(300),
        }
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.retain(|(key, _)| key != k);
        self.env.push((k.into(), v.into()));
        self
    }
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = dir.into();
        self
    }
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The job script: cd, a clean environment, exec.
    /// The job script. `holder`: the hull-lab binary, started first to hold
    /// a KVM VM for the job's lifetime (see `hold.rs`).
    fn script(&self, holder: Option<&Path>) -> String {
        let mut s = String::from("# written by hull-lab\n");
        match holder {
            Some(h) => s.push_str(&format!(
                "{h} hold-kvm </dev/null >/dev/null &\n\
                 i=0; while [ ! -e {m} ] && [ $i -lt 300 ] && kill -0 $! 2>/dev/null; do sleep 0.1; i=$((i+1)); done\n\
                 [ -e {m} ] || echo 'hull-lab: could not hold a KVM VM: the lab may hang when VMs come and go' >&2\n",
                h = quote(&h.to_string_lossy()),
                m = quote(super::HELD_MARKER),
            )),
            None => s.push_str(
                "echo 'hull-lab: no hull-lab binary to hold a KVM VM: the lab may hang when VMs come and go' >&2\n",
            ),
        }
        s.push_str(&format!(
            "cd {} || {{ echo {} >&2; exit 126; }}\n",
            quote(&self.cwd.to_string_lossy()),
            quote(&format!("hull-lab: cannot change to directory {}", self.cwd.display()))
        ));
        s.push_str("exec /usr/bin/env -i");
        for (k, v) in &self.env {
            s.push(' ');
            s.push_str(&quote(&format!("{k}={v}")));
        }
        for a in &self.argv {
            s.push(' ');
            s.push_str(&quote(a));
        }
        s.push('\n');
        s
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[derive(Debug, Clone)]
pub struct LabOutput {
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// From QEMU start to the lab's init reporting ready (before the job ran).
    pub ready_after: Option<Duration>,
    pub wall: Duration,
}

impl LabOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[derive(Debug)]
pub enum LabError {
    Timeout { after: Duration, console_tail: String },
    NoStatus { detail: String, console_tail: String },
}

impl std::error::Error for LabError {}

/// How often the lab's init prints its heartbeat (`lab: alive, up N s`).
pub const HEARTBEAT: Duration = Duration::from_secs(120);

impl LabError {
    /// The emulated machine failed, not the job: its kernel panicked, or it
    /// froze (its heartbeat stopped well before the job's time ran out).
    /// Both seen under bursts of nested VMs with QEMU 7.2's TCG (README,
    /// "The lab"); a job that hangs in a live lab is not one of them.
    pub fn is_lab_failure(&self) -> bool {
        match self {
            LabError::NoStatus { console_tail, .. } => console_tail.contains("Kernel panic"),
            LabError::Timeout { after, console_tail } => {
                let last = console_tail
                    .lines()
                    .rev()
                    .find_map(|l| l.strip_prefix("lab: alive, up ")?.split(' ').next()?.parse::<f64>().ok())
                    .unwrap_or(0.0);
                // Live to the end: a heartbeat within two periods (plus the
                // boot) of the kill.
                last < after.saturating_sub(HEARTBEAT * 2 + Duration::from_secs(30)).as_secs_f64()
            }
        }
    }
}

impl std::fmt::Display for LabError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LabError::Timeout { after, console_tail } => {
                write!(f, "the lab job did not finish within {after:?}; it was killed.\nlab console (last lines):\n{console_tail}")
            }
            LabError::NoStatus { detail, console_tail } => {
                write!(f, "the lab ended without an exit status ({detail}).\nlab console (last lines):\n{console_tail}")
            }
        }
    }
}

/// The lab runner. Runs are serialized across processes (a lock file): on a
/// 2-core host two emulated machines would only slow each other down.
#[derive(Debug, Clone)]
pub struct Lab {
    kernel: LabKernel,
    pub mem_mib: u32,
    pub cpus: u32,
    /// The hull-lab binary (for `hold-kvm` inside the lab).
    holder: Option<PathBuf>,
}

impl Lab {
    pub fn new() -> Result<Lab> {
        which("qemu-system-x86_64").context("the lab needs QEMU: apt-get install qemu-system-x86")?;
        Ok(Lab { kernel: LabKernel::ensure()?, mem_mib: 4096, cpus: 2, holder: find_hull_lab() })
    }

    /// Runs `cmd`, capturing its output.
    pub fn run(&self, cmd: &LabCommand) -> Result<LabOutput> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let mut o = self.run_streaming(cmd, &mut out, &mut err)?;
        o.stdout = out;
        o.stderr = err;
        Ok(o)
    }

    /// [`Lab::run`], once more if the lab machine itself failed
    /// ([`LabError::is_lab_failure`]: its kernel panicked or it froze under
    /// the emulator). For tests, which want the job's result, not QEMU's;
    /// a job that fails or hangs in a live lab is not run again.
    pub fn run_job(&self, cmd: &LabCommand) -> Result<LabOutput> {
        self.once_more_on_lab_failure(&format!("{:?}", cmd.argv), |lab| lab.run(cmd))
    }

    /// Runs `job` (one lab run, e.g. a `run_streaming` with sinks of its
    /// own) and, if the lab machine itself failed, once more.
    pub fn once_more_on_lab_failure<T>(&self, what: &str, mut job: impl FnMut(&Lab) -> Result<T>) -> Result<T> {
        match job(self) {
            Err(e) if e.downcast_ref::<LabError>().is_some_and(LabError::is_lab_failure) => {
                eprintln!("hull-lab: the lab machine failed ({e:#}); running {what} again");
                job(self)
            }
            r => r,
        }
    }

    /// Runs `cmd`, writing its stdout and stderr to the given sinks as it goes.
    pub fn run_streaming(&self, cmd: &LabCommand, stdout: &mut dyn Write, stderr: &mut dyn Write) -> Result<LabOutput> {
        let _lock = FileLock::exclusive(&cache_dir().join("lab/run.lock"))?;
        let tmp = tempfile::Builder::new().prefix("hull-lab-").tempdir()?;
        let dir = tmp.path();

        let initrd = dir.join("initrd");
        write_initrd(&self.kernel.initramfs, &cmd.script(self.holder.as_deref()), &initrd)?;
        let names = ["stdout", "stderr", "status"];
        let listeners: Vec<UnixListener> = names
            .iter()
            .map(|n| UnixListener::bind(dir.join(n)).with_context(|| format!("binding {n} socket")))
            .collect::<Result<_>>()?;
        for l in &listeners {
            l.set_nonblocking(true)?;
        }
        let console = dir.join("console.log");
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", "tcg,thread=multi", "-M", "q35", "-cpu", "max"])
            .args(["-smp", &self.cpus.to_string(), "-m", &self.mem_mib.to_string()])
            .args(["-display", "none", "-nodefaults", "-no-reboot", "-no-user-config"])
            .arg("-kernel")
            .arg(&self.kernel.vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            // loglevel 5: warnings and the stack traces that come with them
            // (a soft lockup's shows where the lab's kernel is stuck).
            .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=5"])
            .arg("-chardev")
            .arg(format!("file,id=con,path={}", console.display()))
            .args(["-serial", "chardev:con"])
            .args(["-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap"])
            .args(["-device", "virtio-serial-pci,id=vs"]);
        for n in names {
            qemu.arg("-chardev").arg(format!("socket,id={n},path={}", dir.join(n).display()));
            qemu.arg("-device").arg(format!("virtserialport,bus=vs.0,chardev={n},name=hull.{n}"));
        }
        qemu.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let start = Instant::now();
        let child = qemu.spawn().context("starting qemu-system-x86_64")?;
        let mut guard = KillOnDrop(child);

        let mut pump = Pump::new(listeners);
        let deadline = start + cmd.timeout;
        let mut status_text = Vec::new();
        let mut ready_after = None;
        let exited = loop {
            let now = Instant::now();
            if now >= deadline {
                break None;
            }
            pump.poll(deadline.min(now + Duration::from_millis(200)) - now, &mut [stdout, stderr], &mut status_text)?;
            if ready_after.is_none() && status_text.starts_with(b"ready") && status_text.contains(&b'\n') {
                ready_after = Some(start.elapsed());
            }
            if let Some(st) = guard.0.try_wait()? {
                // Drain what the guest wrote before it went away.
                pump.poll(Duration::from_millis(0), &mut [stdout, stderr], &mut status_text)?;
                break Some(st);
            }
        };
        let tail = || tail_lines(&console, 80);
        let Some(qemu_status) = exited else {
            return Err(LabError::Timeout { after: cmd.timeout, console_tail: tail() }.into());
        };
        let status_text = String::from_utf8_lossy(&status_text).into_owned();
        let code = status_text.lines().find_map(|l| l.strip_prefix("exit ")).and_then(|c| c.trim().parse::<i32>().ok());
        let Some(code) = code else {
            let mut qerr = String::new();
            if let Some(mut e) = guard.0.stderr.take() {
                let _ = e.read_to_string(&mut qerr);
            }
            let detail =
                format!("qemu {qemu_status}; status port said {:?}; qemu stderr: {}", status_text.trim(), qerr.trim());
            return Err(LabError::NoStatus { detail, console_tail: tail() }.into());
        };
        Ok(LabOutput { status: code, stdout: Vec::new(), stderr: Vec::new(), ready_after, wall: start.elapsed() })
    }
}

/// The cached lab initramfs followed by a small uncompressed cpio holding the
/// job (the kernel unpacks concatenated archives in order).
fn write_initrd(base: &Path, script: &str, out: &Path) -> Result<()> {
    let mut bytes = std::fs::read(base).with_context(|| format!("reading {}", base.display()))?;
    while bytes.len() % 4 != 0 {
        bytes.push(0);
    }
    let mut job = Archive::new();
    job.add("job.sh", Node::File { data: script.as_bytes().to_vec(), executable: true })?;
    job.write_to(&mut bytes)?;
    std::fs::write(out, bytes)?;
    Ok(())
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Accepts the three port connections and copies their bytes out.
struct Pump {
    listeners: Vec<Option<UnixListener>>,
    streams: Vec<Option<UnixStream>>,
}

impl Pump {
    fn new(listeners: Vec<UnixListener>) -> Self {
        let n = listeners.len();
        Pump { listeners: listeners.into_iter().map(Some).collect(), streams: (0..n).map(|_| None).collect() }
    }

    fn poll(&mut self, wait: Duration, sinks: &mut [&mut dyn Write; 2], status: &mut Vec<u8>) -> Result<()> {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        for i in 0..self.listeners.len() {
            let fd = match (&self.listeners[i], &self.streams[i]) {
                (_, Some(s)) => s.as_raw_fd(),
                (Some(l), None) => l.as_raw_fd(),
                (None, None) => -1,
            };
            fds.push(libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        }
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait.as_millis() as i32) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e.into());
        }
        for i in 0..fds.len() {
            if fds[i].revents == 0 && wait.as_millis() > 0 {
                continue;
            }
            if self.streams[i].is_none() {
                if let Some(l) = &self.listeners[i] {
                    if let Ok((s, _)) = l.accept() {
                        s.set_nonblocking(true)?;
                        self.streams[i] = Some(s);
                        self.listeners[i] = None;
                    }
                }
            }
            if let Some(s) = &mut self.streams[i] {
                let mut buf = [0u8; 65536];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => {
                            self.streams[i] = None;
                            break;
                        }
                        Ok(n) => {
                            if i < 2 {
                                sinks[i].write_all(&buf[..n])?;
                                sinks[i].flush()?;
                            } else {
                                status.extend_from_slice(&buf[..n]);
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            self.streams[i] = None;
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

fn tail_lines(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// This binary if it is hull-lab, else hull-lab next to it or one directory
/// up (test binaries run from target/*/deps).
fn find_hull_lab() -> Option<PathBuf> {
    let me = std::env::current_exe().ok()?;
    if me.file_name().is_some_and(|n| n == "hull-lab") {
        return Some(me);
    }
    let dir = me.parent()?;
    [dir.join("hull-lab"), dir.parent()?.join("hull-lab")].into_iter().find(|p| p.is_file())
}

fn which(prog: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .with_context(|| format!("{prog} not found in PATH"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_failures_are_told_from_job_failures() {
        let timeout = |tail: &str| LabError::Timeout { after: Duration::from_secs(1200), console_tail: tail.into() };
        let alive = "[ 1.0] boot\nlab: alive, up 1081.2 s, load 2.0 1.9 1.8\n  PID  PPID STAT COMMAND\n";
        assert!(!timeout(alive).is_lab_failure(), "a job stalled in a live lab");
        let froze = "[ 1.0] boot\nlab: alive, up 241.0 s, load 2.0 1.9 1.8\n";
        assert!(timeout(froze).is_lab_failure(), "heartbeats stopped at 241 s of 1200");
        assert!(timeout("[ 3.6] Unstable clock detected\n").is_lab_failure(), "no heartbeat at all");
        let panic = LabError::NoStatus { detail: "x".into(), console_tail: "Kernel panic - not syncing".into() };
        assert!(panic.is_lab_failure());
        let died = LabError::NoStatus { detail: "x".into(), console_tail: "lab: alive, up 100 s".into() };
        assert!(!died.is_lab_failure());
    }

    #[test]
    fn script_quotes_everything() {
        let c = LabCommand::new(&["sh", "-c", "echo 'hi'; exit 3"]).env("A", "x y").cwd("/tmp/it's");
        let s = c.script(Some(Path::new("/x/hull-lab")));
        assert!(s.contains("'/x/hull-lab' hold-kvm"), "{s}");
        assert!(s.contains(r"cd '/tmp/it'\''s'"), "{s}");
        assert!(s.contains(r"'sh' '-c' 'echo '\''hi'\''; exit 3'"), "{s}");
        assert!(s.contains("'A=x y'"), "{s}");
        // The job script must run under a plain POSIX sh on this host.
        let out = Command::new("sh").arg("-n").arg("-c").arg(&s).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn script_runs_with_env_and_cwd() {
        let dir = tempfile::tempdir().unwrap();
        let c = LabCommand::new(&["sh", "-c", "echo \"$A:$(pwd):$HOME\"; exit 7"]).env("A", "v w").cwd(dir.path());
        // A holder that exits at once: the script goes on without it and says so.
        let out = Command::new("sh").arg("-c").arg(c.script(Some(Path::new("/bin/false")))).output().unwrap();
        assert_eq!(out.status.code(), Some(7));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("v w:{}:\n", dir.path().display()));
        assert!(String::from_utf8_lossy(&out.stderr).contains("could not hold a KVM VM"));
    }
}
