//! The shim's host cgroups on cgroup v2. This kind of host is cgroup v1, so
//! `cargo test` covers v1 natively (shim/src/cgroups.rs); the v2 scenarios
//! are an #[ignore]d test of the shim's library, run here inside the lab
//! (cgroup2 at /sys/fs/cgroup), never skipped.

use hull_tools::lab::{Lab, LabCommand};
use std::time::Duration;

#[test]
fn host_cgroups_v2_in_the_lab() {
    let bin = hull_tests::artifact("HULL_SHIM_TEST_BIN");
    let lab = Lab::new().expect("lab");
    let cmd = LabCommand::new(&[bin.to_string_lossy().as_ref(), "--ignored", "--test-threads=1", "cgroups::"])
        .timeout(Duration::from_secs(600));
    let out = lab.run_job(&cmd).expect("lab run");
    let stdout = out.stdout_str();
    eprintln!("{stdout}");
    assert_eq!(out.status, 0, "{stdout}\nstderr:\n{}", out.stderr_str());
    let summary = stdout.lines().find(|l| l.starts_with("test result:")).unwrap_or_default().to_string();
    assert!(summary.contains(" 0 failed"), "{summary}");
    assert!(!summary.contains(" 0 passed"), "no cgroup v2 test ran: {summary}");
    assert!(stdout.contains("cgroups::tests::lab_cgroup_v2 ... ok"), "{stdout}");
}
