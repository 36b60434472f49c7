//! hull-agent in a real microVM (natively where the host runs microVMs, else
//! in the lab): containers from virtio-fs layers with virtio-blk writable
//! layers, stdio, exec, signals, isolation, bad input, pooled cgroups.

use hull_tests::workspace_bin;
use hull_tools::lab::LabCommand;
use hull_tools::runner::MicroVmHost;
use std::time::Duration;

#[test]
fn containers_in_a_microvm() {
    let host = MicroVmHost::detect().expect("microVM host");
    let mut cmd = LabCommand::new(&[workspace_bin("hull-e2e").to_string_lossy().as_ref(), "agent-containers"])
        .timeout(Duration::from_secs(400));
    for var in ["HULL_KERNEL", "HULL_INITRAMFS", "HULL_BIN_DIR", "HOME"] {
        if let Ok(v) = std::env::var(var) {
            cmd = cmd.env(var, &v);
        }
    }
    let out = host.run(&cmd).expect("run scenario");
    let stdout = out.stdout_str();
    eprintln!("{stdout}");
    assert_eq!(out.status, 0, "on {}:\n{stdout}\nstderr:\n{}", host.name(), out.stderr_str());
    for want in [
        "RESULT c1_stdout=hi c1_stderr=err c1_exit=3",
        "RESULT exec_in_c2=ok",
        "RESULT isolation=ok",
        "RESULT sigterm_exit=143",
        "RESULT shared_layer_untouched=ok",
        "hull-e2e agent-containers: ok",
    ] {
        assert!(stdout.contains(want), "missing {want:?}");
    }
}
