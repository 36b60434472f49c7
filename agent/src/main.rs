//! hull-agent: PID 1 inside the hull microVM.
//!
//! Built as a static binary and placed at `/init` in the guest initramfs.

mod init;
mod server;

use std::process::ExitCode;

fn main() -> ExitCode {
    let is_pid1 = std::process::id() == 1;
    if is_pid1 {
        if let Err(e) = init::mount_pseudo_filesystems() {
            // Keep going: a missing mount is logged, serving the API still helps debugging.
            eprintln!("hull-agent: {e}");
        }
        init::spawn_reaper();
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let port = match init::agent_port(&cmdline) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hull-agent: {e}");
            return exit(is_pid1);
        }
    };
    let notify = match init::notify_port(&cmdline) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("hull-agent: {e}");
            None
        }
    };
    match server::serve(port, notify) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hull-agent: {e}");
            exit(is_pid1)
        }
    }
}

/// PID 1 must not exit (the kernel would panic); stop the VM instead.
fn exit(is_pid1: bool) -> ExitCode {
    if is_pid1 {
        init::power_off();
    }
    ExitCode::FAILURE
}
