//! Where a job that starts microVMs runs: directly on this host when its KVM
//! can run a standard guest, in the lab otherwise. Never skipped.

use crate::hostcheck;
use crate::lab::{Lab, LabCommand, LabOutput};
use anyhow::{Context, Result};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub enum MicroVmHost {
    Native,
    Lab(Lab),
}

impl MicroVmHost {
    /// Native if this host can run a microVM (unless `HULL_FORCE_LAB=1`), else the lab.
    pub fn detect() -> Result<MicroVmHost> {
        let force_lab = std::env::var("HULL_FORCE_LAB").is_ok_and(|v| v == "1");
        if !force_lab && hostcheck::check().can_run_microvm() {
            Ok(MicroVmHost::Native)
        } else {
            Ok(MicroVmHost::Lab(Lab::new()?))
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            MicroVmHost::Native => "native",
            MicroVmHost::Lab(_) => "lab",
        }
    }

    /// Runs `cmd` here or in the lab (there once more if the lab machine
    /// itself failed: [`Lab::run_job`]).
    pub fn run(&self, cmd: &LabCommand) -> Result<LabOutput> {
        match self {
            MicroVmHost::Lab(lab) => lab.run_job(cmd),
            MicroVmHost::Native => run_native(cmd),
        }
    }
}

fn run_native(cmd: &LabCommand) -> Result<LabOutput> {
    let (prog, args) = cmd.argv.split_first().context("empty command")?;
    let start = Instant::now();
    let mut child = Command::new(prog)
        .args(args)
        .env_clear()
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cmd.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {prog}"))?;
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if start.elapsed() > cmd.timeout {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("{prog} did not finish within {:?}; it was killed", cmd.timeout);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    use std::os::unix::process::ExitStatusExt;
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(LabOutput {
        status: code,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
        ready_after: None,
        wall: start.elapsed(),
    })
}
