//! The lab runner itself: exit status, separate stdout/stderr, environment,
//! working directory, and a timeout that a hung guest cannot outlive.

use hull_tools::lab::{Lab, LabCommand, LabError};
use std::time::Duration;

#[test]
fn runs_a_command_with_env_cwd_and_status() {
    let lab = Lab::new().expect("lab setup");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "from the host\n").unwrap();
    let cmd = LabCommand::new(&[
        "sh",
        "-c",
        "cat hello.txt; echo \"$GREETING\"; echo oops >&2; test -c /dev/kvm && echo kvm; exit 3",
    ])
    .env("GREETING", "hi there")
    .cwd(dir.path())
    .timeout(Duration::from_secs(120));
    let out = lab.run(&cmd).expect("lab run");
    assert_eq!(out.status, 3);
    assert_eq!(out.stdout_str(), "from the host\nhi there\nkvm\n");
    assert_eq!(out.stderr_str(), "oops\n");
    let ready = out.ready_after.expect("the lab reported ready");
    eprintln!("lab ready after {ready:?}, wall {:?}", out.wall);
}

#[test]
fn the_host_file_system_is_read_only_underneath() {
    let lab = Lab::new().expect("lab setup");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("written-in-lab");
    let cmd = LabCommand::new(&["sh", "-c", &format!("echo x > {0} && cat {0}", f.display())])
        .timeout(Duration::from_secs(120));
    let out = lab.run(&cmd).expect("lab run");
    assert_eq!(out.status, 0, "{}", out.stderr_str());
    assert_eq!(out.stdout_str(), "x\n");
    // The write went to the lab's tmpfs overlay, not to this machine.
    assert!(!f.exists());
}

#[test]
fn a_hung_guest_is_killed_at_the_timeout() {
    let lab = Lab::new().expect("lab setup");
    let err = lab.run(&LabCommand::new(&["sleep", "600"]).timeout(Duration::from_secs(4))).expect_err("must time out");
    // Wall time is not asserted: a run first waits for the lab lock.
    match err.downcast_ref::<LabError>() {
        Some(LabError::Timeout { after, .. }) => assert_eq!(*after, Duration::from_secs(4)),
        _ => panic!("expected a timeout, got {err:#}"),
    }
    assert!(err.to_string().contains("did not finish within 4s"), "{err}");
}

#[test]
fn a_missing_cwd_is_reported() {
    let lab = Lab::new().expect("lab setup");
    let out = lab
        .run(&LabCommand::new(&["true"]).cwd("/nonexistent/dir").timeout(Duration::from_secs(120)))
        .expect("lab run");
    assert_eq!(out.status, 126);
    assert!(out.stderr_str().contains("/nonexistent/dir"), "{}", out.stderr_str());
}
