//! hull-vmm end to end: the scenarios of `hull-e2e` run on a KVM host (natively
//! if this host can run microVMs, else in the lab), plus the bad-config cases,
//! which fail before any guest runs and so run natively everywhere.

use hull_tests::{guest_kernel, test_initramfs, workspace_bin};
use hull_tools::lab::LabCommand;
use hull_tools::runner::MicroVmHost;
use std::process::Command;
use std::time::Duration;

fn scenario(name: &str) -> String {
    let host = MicroVmHost::detect().expect("microVM host");
    let mut cmd = LabCommand::new(&[workspace_bin("hull-e2e").to_string_lossy().as_ref(), name])
        .timeout(Duration::from_secs(300));
    for var in ["HULL_KERNEL", "HULL_INITRAMFS", "HULL_TEST_INITRAMFS", "HULL_BZIMAGE", "HULL_BIN_DIR", "HOME"] {
        if let Ok(v) = std::env::var(var) {
            cmd = cmd.env(var, &v);
        }
    }
    let out = host.run(&cmd).expect("run scenario");
    let stdout = out.stdout_str();
    assert_eq!(out.status, 0, "{name} on {}:\nstdout:\n{stdout}\nstderr:\n{}", host.name(), out.stderr_str());
    assert!(stdout.contains(&format!("hull-e2e {name}: ok")), "{stdout}");
    eprintln!("{stdout}");
    stdout
}

#[test]
fn boots_to_agent_ready_vsock_both_ways_smp_pause_resume_shutdown() {
    let out = scenario("vmm-boot");
    assert!(out.contains("RESULT guest_cpus=2"), "{out}");
    assert!(out.contains("RESULT ping=0.1.0"), "{out}");
}

#[test]
fn block_both_ways_virtiofs_and_reboot_exit_zero() {
    let out = scenario("vmm-devices");
    for want in [
        "RESULT reboot_exit_status=0",
        "RESULT vda_serial=testdisk",
        "RESULT vdb_ro=refused",
        "RESULT fs_read=hello from the host",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

#[test]
fn snapshot_then_two_restored_vms_run_containers_with_their_own_rng() {
    let out = scenario("vmm-snapshot");
    for want in ["RESULT urandom_differs=ok", "RESULT snapshot_untouched=ok"] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

#[test]
fn net_on_a_tap_ping_tcp_and_restore_onto_another_tap() {
    let out = scenario("vmm-net");
    for want in [
        "RESULT net_mac=02:00:0a:c8:00:02",
        "RESULT net_ping=ok",
        "RESULT net_echo=echo:hello-from-guest",
        "RESULT host_fetch_a=ok",
        "RESULT host_fetch_b=ok",
        "RESULT restored_traffic=ok",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

#[test]
fn boots_a_bzimage_with_the_64_bit_protocol() {
    let out = scenario("vmm-bzimage");
    assert!(out.contains("RESULT bzimage_boot=ok"), "{out}");
}

fn vmm(args: &[&str]) -> (i32, String) {
    let out = Command::new(workspace_bin("hull-vmm")).args(args).output().expect("run hull-vmm");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn missing_kernel_is_a_clear_error() {
    let (code, err) = vmm(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, 1);
    assert!(err.contains("kernel /nonexistent/vmlinux: no such file"), "{err}");
}

#[test]
fn too_little_memory_is_a_clear_error() {
    let k = guest_kernel();
    let (code, err) = vmm(&["--kernel", k.to_str().unwrap(), "--mem", "4"]);
    assert_eq!(code, 1);
    assert!(err.contains("memory 4 MiB is too small"), "{err}");
    // Enough for the checks, too little for the initramfs after the kernel.
    let i = test_initramfs();
    let (code, err) = vmm(&["--kernel", k.to_str().unwrap(), "--initrd", i.to_str().unwrap(), "--mem", "16"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not fit in guest memory") || err.contains("kernel"), "{err}");
}

#[test]
fn busy_socket_paths_are_clear_errors_and_not_removed() {
    let dir = tempfile::tempdir().unwrap();
    let k = guest_kernel();
    let busy = dir.path().join("busy.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&busy).unwrap();
    let (code, err) =
        vmm(&["--kernel", k.to_str().unwrap(), "--vsock-socket", busy.to_str().unwrap(), "--console", "off"]);
    assert_eq!(code, 1);
    assert!(err.contains("in use"), "{err}");
    assert!(busy.exists(), "the other process's socket was removed");
    let (code, err) = vmm(&["--kernel", k.to_str().unwrap(), "--api-socket", busy.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("in use"), "{err}");
    assert!(busy.exists());
}

#[test]
fn bad_disk_spec_and_missing_disk() {
    let k = guest_kernel();
    let (code, err) = vmm(&["--kernel", k.to_str().unwrap(), "--disk", "/x.img,bogus"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("bogus"), "{err}");
    let (code, err) = vmm(&["--kernel", k.to_str().unwrap(), "--disk", "/nonexistent/x.img"]);
    assert_eq!(code, 1);
    assert!(err.contains("disk /nonexistent/x.img: no such file"), "{err}");
}

#[test]
fn bad_ready_fd_is_a_clear_error() {
    let k = guest_kernel();
    let (code, err) = vmm(&["--kernel", k.to_str().unwrap(), "--ready-fd", "1"]);
    assert_eq!(code, 1);
    assert!(err.contains("--ready-fd 1: must be an inherited descriptor above 2"), "{err}");
    let (code, err) = vmm(&["--kernel", k.to_str().unwrap(), "--ready-fd", "987"]);
    assert_eq!(code, 1);
    assert!(err.contains("--ready-fd 987: Bad file descriptor"), "{err}");
}
