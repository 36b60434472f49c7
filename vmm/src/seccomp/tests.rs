use super::*;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;

/// Set in a child process started by [`run_child`]: which case to run.
const CHILD_ENV: &str = "HULL_SECCOMP_TEST_CHILD";

/// Runs this test binary again, only the `child` test, with `case` in the
/// environment; returns its exit status and stderr.
fn run_child(case: &str) -> (std::process::ExitStatus, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "seccomp::tests::child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, case)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("child {case}: {:?}\n{stderr}", out.status);
    (out.status, stderr)
}

/// The child half: does nothing in a normal test run.
#[test]
fn child() {
    let Ok(case) = std::env::var(CHILD_ENV) else { return };
    // No core file from the SIGSYS kill.
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain setrlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    init(true).unwrap();
    if case == "spawned-worker" {
        start_spawner().unwrap();
    }
    // Filtered work runs on its own thread (the test harness's threads
    // stay unfiltered); the thread must also be able to exit.
    let t = std::thread::spawn(move || {
        match case.as_str() {
            "vcpu-socket" => {
                apply(ThreadKind::Vcpu);
                // SAFETY: plain syscall; refused by the vCPU filter.
                unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            }
            "vcpu-ioctl" => {
                apply(ThreadKind::Vcpu);
                // KVM_CREATE_VM (0xAE01) on a vCPU thread: not in its list.
                // SAFETY: plain ioctl on fd 0; refused before it runs.
                unsafe { libc::ioctl(0, 0xAE01, 0) };
            }
            "controller-execve" => {
                apply(ThreadKind::Controller);
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                // SAFETY: a valid path and argv; refused before it runs.
                unsafe { libc::execv(c"/bin/true".as_ptr(), argv.as_ptr()) };
            }
            "vcpu-allowed" => {
                apply(ThreadKind::Vcpu);
                let e = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
                e.write(7).unwrap();
                assert_eq!(e.read().unwrap(), 7);
                let v: Vec<u8> = vec![1; 8 << 20]; // mmap and munmap
                assert_eq!(v.iter().map(|&b| u64::from(b)).sum::<u64>(), 8 << 20);
                // KVM_RUN on a non-KVM fd passes the filter and fails with ENOTTY.
                // SAFETY: plain ioctl on an eventfd.
                let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&e), 0xAE80, 0) };
                assert_eq!(r, -1);
                assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::ENOTTY));
                eprintln!("ALLOWED-OK");
            }
            "spawned-worker" => {
                // A worker started from a vCPU thread gets the controller
                // and worker filters, not the vCPU one: the vsock worker may
                // create sockets.
                SPAWNER.get().expect("spawner");
                apply(ThreadKind::Vcpu);
                let h = spawn(ThreadKind::Vsock, "vsock", || {
                    // SAFETY: plain syscall, allowed for vsock.
                    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
                    assert!(fd >= 0);
                    // SAFETY: our own fd.
                    unsafe { libc::close(fd) };
                })
                .unwrap();
                h.join().unwrap();
                eprintln!("ALLOWED-OK");
            }
            other => panic!("unknown case {other}"),
        }
    });
    t.join().unwrap();
}

#[test]
fn refused_syscalls_kill_the_process_with_sigsys() {
    for (case, name) in [("vcpu-socket", "(socket)"), ("vcpu-ioctl", "(ioctl)"), ("controller-execve", "(execve)")] {
        let (status, stderr) = run_child(case);
        assert_eq!(status.signal(), Some(libc::SIGSYS), "{case}: {status:?}\n{stderr}");
        assert!(stderr.contains("hull-vmm: seccomp:") && stderr.contains(name), "{case}: {stderr}");
    }
}

#[test]
fn allowed_syscalls_work() {
    let (status, stderr) = run_child("vcpu-allowed");
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(stderr.contains("ALLOWED-OK"), "{stderr}");
}

#[test]
fn workers_started_from_a_vcpu_thread_do_not_inherit_its_filter() {
    let (status, stderr) = run_child("spawned-worker");
    assert!(status.success(), "{status:?}\n{stderr}");
    assert!(stderr.contains("ALLOWED-OK"), "{stderr}");
}

#[test]
fn every_filter_builds_and_fits_under_the_controller_filter() {
    let controller = rules(ThreadKind::Controller);
    for kind in ThreadKind::ALL {
        let prog = build(kind).unwrap();
        eprintln!("{}: {} syscalls, {} BPF instructions", kind.name(), rules(kind).len(), prog.len());
        assert!(!prog.is_empty() && prog.len() < 4096, "{kind:?}: {} instructions", prog.len());
        for nr in rules(kind).keys() {
            assert!(
                controller.contains_key(nr),
                "{kind:?} allows {:?}, which the controller (inherited by every thread) does not",
                syscall_name(*nr)
            );
        }
    }
}

#[test]
fn kvm_ioctl_numbers() {
    use kvm_ioctl::*;
    assert_eq!(KVM_RUN, 0xae80);
    assert_eq!(KVM_GET_REGS, 0x8090_ae81);
    assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
    assert_eq!(KVM_GET_MSRS, 0xc008_ae88);
    assert_eq!(KVM_GET_CPUID2, 0xc008_ae91);
    assert_eq!(KVM_GET_LAPIC, 0x8400_ae8e);
    assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
    assert_eq!(KVM_GET_VCPU_EVENTS, 0x8040_ae9f);
    assert_eq!(KVM_GET_XSAVE, 0x9000_aea4);
    assert_eq!(KVM_GET_XCRS, 0x8188_aea6);
    assert_eq!(syscall_name(libc::SYS_socket), Some("socket"));
    assert_eq!(syscall_name(libc::SYS_execve), Some("execve"));
}
