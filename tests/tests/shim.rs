//! containerd-shim-hull-v2 with a real containerd (Debian's 1.6) in a KVM
//! host (natively if this host runs microVMs, else the lab):
//! tests/scripts/shim-ctr.sh runs `ctr run --runtime io.containerd.hull.v2`
//! cases (stdio and exit codes, exec, tty, signals, OOM, a CRI-annotated pod,
//! a killed shim, clear failures), a CRI client scenario (hull-cri:
//! RunPodSandbox with handler `hull`, two containers, ExecSync, stop,
//! remove) and checks nothing is left behind.

use hull_tools::lab::LabCommand;
use hull_tools::runner::MicroVmHost;
use std::time::Duration;

#[test]
fn ctr_run_with_the_hull_runtime() {
    let host = MicroVmHost::detect().expect("microVM host");
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/shim-ctr.sh");
    let mut cmd = LabCommand::new(&[script.to_string_lossy().as_ref()]).timeout(Duration::from_secs(1800));
    for var in ["HULL_KERNEL", "HULL_INITRAMFS", "HULL_BIN_DIR", "HOME"] {
        if let Ok(v) = std::env::var(var) {
            cmd = cmd.env(var, &v);
        }
    }
    let out = host.run(&cmd).expect("run shim-ctr.sh");
    let stdout = out.stdout_str();
    eprintln!("{stdout}");
    assert_eq!(out.status, 0, "on {}:\n{stdout}\nstderr:\n{}", host.name(), out.stderr_str());
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
