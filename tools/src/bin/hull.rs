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
    }
}
