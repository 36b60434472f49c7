//! containerd-shim-hull-v2 (filled by the shim issue).

fn main() -> std::process::ExitCode {
    eprintln!("containerd-shim-hull-v2: not built yet");
    std::process::ExitCode::FAILURE
}
