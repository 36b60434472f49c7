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

/// The container library's own tests need root and cgroup v2, which this
/// kind of host (cgroup v1) lacks: they are #[ignore]d in a native run and run
/// here, inside the lab (cgroup2 mounted), never skipped.
#[test]
fn container_library_tests_in_the_lab() {
    let bin = hull_tests::artifact("HULL_AGENT_TEST_BIN");
    let lab = hull_tools::lab::Lab::new().expect("lab");
    let cmd =
        LabCommand::new(&[bin.to_string_lossy().as_ref(), "--ignored", "--test-threads=1", "--skip", "lab_bench"])
            .timeout(Duration::from_secs(900));
    let out = lab.run_job(&cmd).expect("lab run");
    let stdout = out.stdout_str();
    eprintln!("{stdout}");
    assert_eq!(out.status, 0, "{stdout}\nstderr:\n{}", out.stderr_str());
    let summary = stdout.lines().find(|l| l.starts_with("test result:")).unwrap_or_default().to_string();
    assert!(summary.contains(" 0 failed"), "{summary}");
    assert!(!summary.contains(" 0 passed"), "no container test ran: {summary}");
}
