//! containerd-shim-hull-v2 with a real containerd (Debian's 1.6) in a KVM
//! host (natively if this host runs microVMs, else the lab):
//! tests/scripts/shim-ctr.sh runs `ctr run --runtime io.containerd.hull.v2`
//! cases (stdio and exit codes, exec, tty, signals, OOM, a CRI-annotated pod,
//! a killed shim, faults, a pod network, leaks, clear failures), a CRI
//! client scenario (hull-cri: RunPodSandbox with handler `hull`, two
//! containers, ExecSync, stop, remove) and checks nothing is left behind.
//!
//! The cases run in groups, one lab job each, so a hang shows which group
//! it was in and each has its own time limit; the script's output is copied
//! to stderr as it comes (uncaptured), so a timed-out job still shows how
//! far it got.

use hull_tools::lab::LabCommand;
use hull_tools::runner::MicroVmHost;
use std::io::Write;
use std::time::Duration;

/// A sink that keeps what it gets and copies it to the test's stderr.
struct Tee(Vec<u8>);

impl Write for Tee {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(b);
        let _ = std::io::stderr().write_all(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A script of this repository (path from the tests crate) with the
/// artifacts' variables, `extra_env` and a time limit.
fn script_cmd(script: &str, minutes: u64, extra_env: &[(&str, &str)]) -> LabCommand {
    let script = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let mut cmd = LabCommand::new(&[script.to_string_lossy().as_ref()]).timeout(Duration::from_secs(minutes * 60));
    for var in ["HULL_KERNEL", "HULL_INITRAMFS", "HULL_BIN_DIR", "HOME"] {
        if let Ok(v) = std::env::var(var) {
            cmd = cmd.env(var, &v);
        }
    }
    for (k, v) in extra_env {
        cmd = cmd.env(k, v);
    }
    cmd
}

fn run_cases(cases: &str, minutes: u64, extra_env: &[(&str, &str)]) {
    let host = MicroVmHost::detect().expect("microVM host");
    let mut env = vec![("HULL_SHIM_CASES", cases)];
    env.extend_from_slice(extra_env);
    let cmd = script_cmd("scripts/shim-ctr.sh", minutes, &env);
    let (status, stdout) = match &host {
        MicroVmHost::Lab(lab) => {
            // One more try only if the lab machine itself failed (its
            // kernel panicked or it froze: an emulator failure, README "The
            // lab"); any failure of the job fails the test.
            let r = lab.once_more_on_lab_failure(&format!("shim-ctr.sh {cases}"), |lab| {
                let (mut out, mut err) = (Tee(Vec::new()), Tee(Vec::new()));
                let o = lab.run_streaming(&cmd, &mut out, &mut err)?;
                Ok((o.status, String::from_utf8_lossy(&out.0).into_owned()))
            });
            r.unwrap_or_else(|e| panic!("shim-ctr.sh {cases}: {e:#}"))
        }
        MicroVmHost::Native => {
            let o = host.run(&cmd).expect("run shim-ctr.sh");
            eprintln!("{}\n{}", o.stdout_str(), o.stderr_str());
            (o.status, o.stdout_str())
        }
    };
    assert_eq!(status, 0, "shim-ctr.sh {cases} on {}: exit {status}", host.name());
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}

#[test]
fn containers_stdio_exec_tty_signals_oom() {
    run_cases("basic stdio exec tty signal oom", 12, &[]);
}

#[test]
fn pods_cri_crash_faults_failures() {
    run_cases("pod cri crash faults failures", 12, &[]);
}

#[test]
fn pod_network() {
    run_cases("net", 10, &[]);
}

/// The full 100 cycles, 10 at a time (the README's figure), take ~20 min
/// under emulation; CI runs 10 cycles, 5 at a time (HULL_LEAK_CYCLES and
/// HULL_LEAK_BATCH override). Leaks are what this checks: 10-wide bursts
/// on the lab's 2 emulated CPUs sometimes lose a restored guest (README,
/// "Leaks"), which the bench's burst figures report.
#[test]
fn no_leaks_after_create_start_delete_cycles() {
    let cycles = std::env::var("HULL_LEAK_CYCLES").unwrap_or_else(|_| "10".into());
    let batch = std::env::var("HULL_LEAK_BATCH").unwrap_or_else(|_| "5".into());
    // 15 s a cycle, plus 12 min for the rest (a hung cycle alone takes 5).
    let minutes = 12 + cycles.parse::<u64>().unwrap_or(100) / 4;
    run_cases("leaks", minutes, &[("HULL_LEAK_CYCLES", &cycles), ("HULL_LEAK_BATCH", &batch)]);
}

/// The README's main job (`scripts/run.sh` runs scripts/demo-ctr.sh) as a
/// user runs it: two containers through a private containerd, the second
/// restored from the VM template the first one built.
#[test]
fn the_main_job_runs_two_containers_through_containerd() {
    let host = MicroVmHost::detect().expect("microVM host");
    let out = host.run(&script_cmd("../scripts/demo-ctr.sh", 10, &[])).expect("run demo-ctr.sh");
    let stdout = out.stdout_str();
    assert_eq!(out.status, 0, "demo-ctr.sh on {}:\n{stdout}\n{}", host.name(), out.stderr_str());
    for id in ["demo1", "demo2"] {
        assert!(stdout.contains(&format!("hello from container {id} in a hull microVM")), "{stdout}");
    }
    assert!(stdout.contains("demo: shim: pod demo2: restored from the template"), "{stdout}");
    assert!(stdout.ends_with("demo: ok\n"), "{stdout}");
}
