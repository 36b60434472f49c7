//! Boots the project's guest kernel + initramfs on a KVM host (natively if this
//! host can, else in the lab) and checks the agent's ready line and a ping.

use hull_tests::{guest_initramfs, guest_kernel, workspace_bin};
use hull_tools::lab::LabCommand;
use hull_tools::runner::MicroVmHost;
use std::time::Duration;

fn scripts_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

#[test]
fn qemu_microvm_boots_guest_to_agent_ready_and_ping() {
    let host = MicroVmHost::detect().expect("microVM host");
    let bin_dir = workspace_bin("hull").parent().unwrap().to_path_buf();
    let cmd = LabCommand::new(&[scripts_dir().join("qemu-microvm-boot.sh").to_string_lossy()])
        .env("HULL_KERNEL", &guest_kernel().to_string_lossy())
        .env("HULL_INITRAMFS", &guest_initramfs().to_string_lossy())
        .env("HULL_BIN_DIR", &bin_dir.to_string_lossy())
        .timeout(Duration::from_secs(240));
    let out = host.run(&cmd).expect("run");
    let stdout = out.stdout_str();
    assert_eq!(out.status, 0, "on {}: stdout:\n{stdout}\nstderr:\n{}", host.name(), out.stderr_str());
    assert!(stdout.contains("hull-agent: ready version="), "{stdout}");
    assert!(stdout.contains("agent answered: 0.1.0 proto=1"), "{stdout}");
    eprintln!("{stdout}");
}
