//! hull: the operator's CLI.

use anyhow::Result;
use clap::{Parser, Subcommand};
use hull_agent_api::{ping, AgentAddr};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "hull", version, about = "hull secure container runtime")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Can this host run microVMs? Exit 0 if natively, 3 if only in the lab.
    Check,
    /// Ping a hull agent (its ttrpc Version call): ADDR is vsock:CID:PORT,
    /// hybrid:SOCKET_PATH:PORT or unix:SOCKET_PATH.
    Ping {
        addr: AgentAddr,
        /// Keep retrying for this many seconds (the guest may still be booting).
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
    /// VM templates (pods start by restoring one instead of booting).
    Template {
        #[command(subcommand)]
        cmd: TemplateCmd,
    },
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Build the template for the default pod shape of /etc/hull/config.toml
    /// (or $HULL_CONFIG), if it is not there yet. Runs the shim's
    /// `build-template` (containerd-shim-hull-v2 next to this binary or on PATH).
    Build,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hull: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<ExitCode> {
    match Cli::parse().cmd {
        Cmd::Check => {
            let r = hull_tools::hostcheck::check();
            println!("{r}");
            Ok(if r.can_run_microvm() { ExitCode::SUCCESS } else { ExitCode::from(3) })
        }
        Cmd::Ping { addr, wait } => {
            let v = ping(&addr, Duration::from_secs(wait))?;
            println!("agent answered: version {v}");
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Template { cmd: TemplateCmd::Build } => {
            const SHIM: &str = "containerd-shim-hull-v2";
            let beside = std::env::current_exe()?.with_file_name(SHIM);
            let shim = if beside.is_file() { beside } else { SHIM.into() };
            let st = std::process::Command::new(&shim)
                .arg("build-template")
                .status()
                .map_err(|e| anyhow::anyhow!("running {}: {e}", shim.display()))?;
            Ok(if st.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
    }
}
