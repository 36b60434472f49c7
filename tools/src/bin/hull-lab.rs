//! hull-lab: run one command inside the lab (an emulated KVM host).

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use hull_tools::lab::{Lab, LabCommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "hull-lab", version, about = "Run commands inside the lab, an emulated KVM host")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot the lab, run CMD in it, stream its output, exit with its status.
    Run {
        /// Seconds before the lab is killed (exit status 124).
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Extra environment variable KEY=VALUE (repeatable). PATH, HOME, TERM,
        /// RUST_LOG and RUST_BACKTRACE are passed through from the caller.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory inside the lab (default: the current directory).
        #[arg(long)]
        cwd: Option<PathBuf>,
        /// Memory of the emulated host, MiB.
        #[arg(long, default_value_t = 4096)]
        mem: u32,
        /// Print the lab's ready time and wall time on stderr.
        #[arg(long)]
        timing: bool,
        #[arg(trailing_var_arg = true, required = true)]
        argv: Vec<String>,
    },
    /// Download and prepare the lab kernel and initramfs (done on first run otherwise).
    Setup,
    /// Inside the lab (the job script starts it): hold one idle KVM VM open
    /// so the kernel never patches KVM's static branches mid-job.
    #[command(hide = true)]
    HoldKvm,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("hull-lab: {e:#}");
            ExitCode::from(if e.to_string().contains("did not finish within") { 124 } else { 125 })
        }
    }
}

fn real_main() -> Result<i32> {
    match Cli::parse().cmd {
        Cmd::Setup => {
            let k = hull_tools::lab::LabKernel::ensure()?;
            println!("kernel:    {}\ninitramfs: {}", k.vmlinuz.display(), k.initramfs.display());
            Ok(0)
        }
        Cmd::HoldKvm => {
            hull_tools::lab::hold_kvm(std::path::Path::new(hull_tools::lab::HELD_MARKER))?;
            Ok(0)
        }
        Cmd::Run { timeout, env, cwd, mem, timing, argv } => {
            let argv: Vec<String> = argv.into_iter().skip_while(|a| a == "--").collect();
            if argv.is_empty() {
                bail!("no command given: hull-lab run -- CMD [ARGS...]");
            }
            let cwd = match cwd {
                Some(c) => c,
                None => std::env::current_dir()?,
            };
            let mut cmd = LabCommand::new(&argv).cwd(cwd).timeout(Duration::from_secs(timeout));
            for k in ["PATH", "HOME", "TERM", "RUST_LOG", "RUST_BACKTRACE"] {
                if let Ok(v) = std::env::var(k) {
                    cmd = cmd.env(k, &v);
                }
            }
            for kv in env {
                let Some((k, v)) = kv.split_once('=') else { bail!("--env {kv:?}: expected KEY=VALUE") };
                cmd = cmd.env(k, v);
            }
            let mut lab = Lab::new()?;
            lab.mem_mib = mem;
            let out = lab.run_streaming(&cmd, &mut std::io::stdout(), &mut std::io::stderr())?;
            if timing {
                eprintln!(
                    "hull-lab: ready after {:.2}s, wall {:.2}s, exit {}",
                    out.ready_after.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN),
                    out.wall.as_secs_f64(),
                    out.status
                );
            }
            Ok(out.status)
        }
    }
}
