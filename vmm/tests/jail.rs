//! `hull-vmm --jail`, natively (no guest runs: hull-vmm waits on its API
//! socket): the VMM process is PID 1 of its own PID namespace, in its own
//! mount, IPC and network namespaces, rooted in the jail directory, running
//! as the given uid/gid with no capabilities; signals reach it through the
//! parent, and it dies with the parent. Needs root (to set up the jail).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const UID: u32 = 3_999_001;
const GID: u32 = 3_999_000;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

struct Jailed {
    parent: Child,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Jailed {
    fn drop(&mut self) {
        // A failed assertion must not leave the VMM running (it dies with the parent).
        let _ = self.parent.kill();
        let _ = self.parent.wait();
    }
}

fn start() -> Jailed {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("vm");
    std::fs::create_dir(&root).unwrap();
    std::os::unix::fs::chown(&root, Some(UID), Some(GID)).unwrap();
    let parent = Command::new(env!("CARGO_BIN_EXE_hull-vmm"))
        .arg("--jail")
        .arg(format!("{},uid={UID},gid={GID}", root.display()))
        .arg("--api-socket")
        .arg(root.join("api.sock"))
        .args(["--console", "off"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let j = Jailed { parent, root, _dir: dir };
    wait_for(|| j.root.join("api.sock").exists(), "the jailed API socket");
    j
}

fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < Duration::from_secs(10), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The VMM: the parent's only child.
fn vmm_pid(parent: u32) -> u32 {
    let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap();
    let pids: Vec<u32> = children.split_whitespace().map(|p| p.parse().unwrap()).collect();
    assert_eq!(pids.len(), 1, "children of the jail's parent: {pids:?}");
    pids[0]
}

fn status_field(pid: u32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines().find_map(|l| l.strip_prefix(&format!("{key}:"))).unwrap_or_default().trim().to_string()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

fn exited_within(c: &mut Child, t: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < t {
        if let Some(st) = c.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn jailed_vmm_is_confined() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut j = start();
    let vmm = vmm_pid(j.parent.id());
    // Credentials: the jail's uid/gid, /dev/kvm's group only, no capabilities.
    assert_eq!(status_field(vmm, "Uid"), format!("{UID}\t{UID}\t{UID}\t{UID}"));
    assert_eq!(status_field(vmm, "Gid"), format!("{GID}\t{GID}\t{GID}\t{GID}"));
    assert_eq!(status_field(vmm, "Groups"), "");
    // /dev/kvm was opened before the uid switch and kept.
    let kvm_fds = std::fs::read_dir(format!("/proc/{vmm}/fd"))
        .unwrap()
        // (Its path is outside the VMM's root: only the name is kept.)
        .filter(|e| std::fs::read_link(e.as_ref().unwrap().path()).is_ok_and(|t| t.ends_with("kvm")))
        .count();
    assert_eq!(kvm_fds, 1, "the VMM holds /dev/kvm open");
    assert_eq!(status_field(vmm, "CapEff"), "0000000000000000");
    assert_eq!(status_field(vmm, "CapPrm"), "0000000000000000");
    assert_eq!(status_field(vmm, "NoNewPrivs"), "1");
    // PID 1 of its own PID namespace.
    assert_eq!(status_field(vmm, "NSpid").split_whitespace().last(), Some("1"));
    for kind in ["pid_for_children", "mnt", "net", "ipc"] {
        let k = if kind == "pid_for_children" { "pid" } else { kind };
        assert_ne!(ns("self", kind), ns(&vmm.to_string(), k), "{k} namespace shared with the host");
    }
    // Its root is the jail: /dev/kvm and the socket are there, the host's files are not.
    let root = PathBuf::from(format!("/proc/{vmm}/root"));
    let mut seen: Vec<String> =
        std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    seen.sort();
    assert_eq!(seen, ["api.sock"]);
    assert!(!root.join("etc/passwd").exists(), "the host's /etc is visible in the jail");
    assert_eq!(std::fs::metadata(j.root.join("api.sock")).unwrap().uid(), UID);
    // Its mounts stay in its namespace.
    let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!host_mounts.contains(&*j.root.to_string_lossy()), "a jail mount leaked to the host:\n{host_mounts}");

    // SIGTERM to the parent reaches the VMM, and the parent exits as it did.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(j.parent.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let st = exited_within(&mut j.parent, Duration::from_secs(10)).expect("the jail's parent did not exit");
    assert!(st.success(), "{st}");
    assert!(!Path::new(&format!("/proc/{vmm}")).exists(), "the VMM outlived its parent");
}

#[test]
fn jailed_vmm_dies_with_its_parent() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut j = start();
    let vmm = vmm_pid(j.parent.id());
    j.parent.kill().unwrap();
    j.parent.wait().unwrap();
    wait_for(|| !Path::new(&format!("/proc/{vmm}")).exists(), "the VMM to die with its parent");
}

#[test]
fn jailed_vmm_reaches_kvm_and_its_kernel() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    // A kernel outside the jail (bind-mounted in) that is not a kernel: the
    // VMM gets past /dev/kvm and fails on loading it, naming the jail path.
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("vm");
    std::fs::create_dir(&root).unwrap();
    std::os::unix::fs::chown(&root, Some(UID), Some(GID)).unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hull-vmm"))
        .arg("--jail")
        .arg(format!("{},uid={UID},gid={GID}", root.display()))
        .arg("--kernel")
        .arg(&kernel)
        .args(["--console", "off"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains("/dev/kvm"), "{err}");
    assert!(err.contains("kernel"), "{err}");
    assert!(!err.contains("No such file") && !err.contains("ermission denied"), "{err}");
    // The bind target left in the jail directory is empty (the kernel was
    // bound over it only inside the jail's mount namespace).
    let left: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(std::fs::metadata(&left[0]).unwrap().len(), 0);
}

#[test]
fn jail_errors_name_the_problem() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let run = |jail: String, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_hull-vmm"))
            .arg("--jail")
            .arg(jail)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let d = dir.path().display();
    let e = run(format!("{d}/missing,uid={UID},gid={GID}"), &["--api-socket", "/tmp/x.sock"]);
    assert!(e.contains("missing") && e.contains("No such file"), "{e}");
    let e = run(format!("{d},uid=0,gid={GID}"), &["--api-socket", "/tmp/x.sock"]);
    assert!(e.contains("must not be 0"), "{e}");
    // A socket the VMM would create outside the jail.
    let e = run(format!("{d},uid={UID},gid={GID}"), &["--api-socket", "/tmp/hull-jail-test.sock"]);
    assert!(e.contains("/tmp/hull-jail-test.sock") && e.contains("must be under"), "{e}");
    assert!(!Path::new("/tmp/hull-jail-test.sock").exists());
}
