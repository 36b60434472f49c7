//! hull-agent: PID 1 inside the hull microVM.
//!
//! Built as a static binary and placed at `/init` in the guest initramfs.
//! In the guest it serves the ttrpc `Agent` API and the STDIO protocol on
//! the vsock ports from the kernel command line (see `hull_agent_api`).
//!
//! Outside a VM (tests, development) it can serve on unix sockets:
//!
//! ```text
//! hull-agent --listen unix:///PATH --stdio-listen unix:///PATH2 [--resolv-conf FILE] [--no-backend]
//! ```
//!
//! SetupSandbox then changes nothing on the machine except the
//! `--resolv-conf` file, if given. `--no-backend` serves without the
//! container backend (which would set up cgroups and state on this machine):
//! container requests then fail with FAILED_PRECONDITION.

mod backend;
mod container;
mod init;
mod server;
mod stdio;

use server::{ListenAddr, SandboxSettings, ServerConfig};
use std::process::ExitCode;
use std::sync::Arc;

const USAGE: &str = "usage: hull-agent [--listen unix:///PATH|vsock://PORT --stdio-listen unix:///PATH|vsock://PORT] \
                     [--resolv-conf FILE] [--no-backend]";

#[derive(Debug, Default, PartialEq)]
struct Args {
    listen: Option<ListenAddr>,
    stdio_listen: Option<ListenAddr>,
    resolv_conf: Option<std::path::PathBuf>,
    no_backend: bool,
}

impl Args {
    fn parse(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
        let mut a = Args::default();
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--listen" => a.listen = Some(ListenAddr::parse(&value()?)?),
                "--stdio-listen" => a.stdio_listen = Some(ListenAddr::parse(&value()?)?),
                "--resolv-conf" => a.resolv_conf = Some(value()?.into()),
                "--no-backend" => a.no_backend = true,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if a.listen.is_some() != a.stdio_listen.is_some() {
            return Err("--listen and --stdio-listen go together".into());
        }
        Ok(a)
    }
}

fn main() -> ExitCode {
    let is_pid1 = std::process::id() == 1;
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hull-agent: {e}\n{USAGE}");
            return exit(is_pid1);
        }
    };
    if is_pid1 {
        if let Err(e) = init::mount_pseudo_filesystems() {
            // Keep going: a missing mount is logged, serving the API still helps debugging.
            eprintln!("hull-agent: {e}");
        }
        // PID 1 reaps every orphan of the guest: the backend's reaper does it
        // (the only reaper, so it never steals the statuses it waits for).
        drop(container::hold_reaper());
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let (api, stdio, notify) = match (args.listen, args.stdio_listen) {
        (Some(api), Some(stdio)) => (api, stdio, None),
        _ => {
            let ports = init::agent_port(&cmdline)
                .and_then(|a| Ok((a, init::stdio_port(&cmdline)?)))
                .and_then(|(a, s)| if a == s { Err(format!("agent and stdio port are both {a}")) } else { Ok((a, s)) });
            let (api_port, stdio_port) = match ports {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("hull-agent: {e}");
                    return exit(is_pid1);
                }
            };
            let notify = init::notify_port(&cmdline).unwrap_or_else(|e| {
                eprintln!("hull-agent: {e}");
                None
            });
            (ListenAddr::Vsock(api_port), ListenAddr::Vsock(stdio_port), notify)
        }
    };

    let backend = if args.no_backend { Err("disabled by --no-backend".to_string()) } else { make_backend(&cmdline) };
    if let Err(e) = &backend {
        eprintln!("hull-agent: container backend unavailable, container requests will fail: {e}");
    }
    let sandbox = if is_pid1 {
        SandboxSettings::guest()
    } else {
        SandboxSettings { resolv_conf: args.resolv_conf, apply_kernel: false }
    };
    let cfg = ServerConfig { backend, sandbox, drain_timeout: server::DEFAULT_DRAIN_TIMEOUT };

    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hull-agent: tokio runtime: {e}");
            return exit(is_pid1);
        }
    };
    match rt.block_on(server::serve(api, stdio, notify, cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hull-agent: {e}");
            exit(is_pid1)
        }
    }
}

/// The container backend from the kernel command line's settings. An error
/// is served as such (every container request fails with it), never hidden.
fn make_backend(cmdline: &str) -> server::BackendSlot {
    let cfg = container::BackendConfig::from_cmdline(cmdline).map_err(|e| e.to_string())?;
    let b = container::LibcontainerBackend::new(cfg).map_err(|e| e.to_string())?;
    Ok(Arc::new(b))
}

/// PID 1 must not exit (the kernel would panic); stop the VM instead.
fn exit(is_pid1: bool) -> ExitCode {
    if is_pid1 {
        init::power_off();
    }
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        Args::parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn arguments() {
        assert_eq!(parse(&[]), Ok(Args::default()));
        let a = parse(&["--listen", "unix:///tmp/a.sock", "--stdio-listen", "unix:///tmp/b.sock"]).unwrap();
        assert_eq!(a.listen, Some(ListenAddr::Unix("/tmp/a.sock".into())));
        assert_eq!(a.stdio_listen, Some(ListenAddr::Unix("/tmp/b.sock".into())));
        let a = parse(&["--listen", "vsock://1024", "--stdio-listen", "vsock:1025"]).unwrap();
        assert_eq!((a.listen, a.stdio_listen), (Some(ListenAddr::Vsock(1024)), Some(ListenAddr::Vsock(1025))));
        assert!(parse(&["--listen", "unix:///a"]).unwrap_err().contains("go together"));
        assert!(parse(&["--listen"]).unwrap_err().contains("needs a value"));
        assert!(parse(&["--listen", "tcp://1:2", "--stdio-listen", "unix:///b"]).unwrap_err().contains("expected"));
        assert!(parse(&["--frob"]).unwrap_err().contains("unknown argument"));
        assert!(parse(&["--no-backend"]).unwrap().no_backend);
    }
}
