//! hull-vmm: boot a microVM from flags, or wait for an API client to
//! configure and boot it. Exits 0 when the guest reboots or powers off, or on
//! an API shutdown; 1 on any error.

use clap::Parser;
use hull_vmm::api::{self, Response};
use hull_vmm::config::{
    parse_disk, parse_fs, parse_net, Console, DiskConfig, FsDeviceConfig, NetBackend, NetDeviceConfig, VmConfig,
    VsockDeviceConfig, DEFAULT_CMDLINE, DEFAULT_GUEST_CID, DEFAULT_MEM_MIB,
};
use hull_vmm::controller::{Controller, Outcome};
use hull_vmm::jail::{self, Jail};
use hull_vmm::persist::RestoreConfig;
use hull_vmm::seccomp::{self, ThreadKind};
use hull_vmm::vmm::VmmEvent;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "hull-vmm", version, about = "hull's KVM microVM monitor")]
struct Cli {
    /// Guest kernel: vmlinux (PVH) or bzImage. Without it, wait for `configure` on --api-socket.
    #[arg(long)]
    kernel: Option<PathBuf>,
    #[arg(long)]
    initrd: Option<PathBuf>,
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = DEFAULT_MEM_MIB)]
    mem: u64,
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Block device: PATH[,ro][,id=SERIAL] (repeatable).
    #[arg(long = "disk", value_parser = |s: &str| parse_disk(s).map_err(|e| e.to_string()))]
    disks: Vec<DiskConfig>,
    /// virtio-fs via a virtiofsd vhost-user socket: SOCKET[,tag=TAG] (repeatable).
    #[arg(long = "fs-socket", value_parser = |s: &str| parse_fs(s).map_err(|e| e.to_string()))]
    fs: Vec<FsDeviceConfig>,
    /// Hybrid vsock: host side unix socket.
    #[arg(long)]
    vsock_socket: Option<PathBuf>,
    #[arg(long, default_value_t = DEFAULT_GUEST_CID)]
    vsock_cid: u64,
    /// virtio-net: tap=NAME (attach to or create tap NAME in hull-vmm's network namespace),
    /// fd=N (an inherited descriptor already attached to a tap with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR)
    /// or none (no backend); each optionally with ,mac=02:XX:XX:XX:XX:XX (repeatable).
    #[arg(long = "net", value_parser = |s: &str| parse_net(s).map_err(|e| e.to_string()))]
    net: Vec<NetDeviceConfig>,
    /// Serial console: "stdout", "off" or a file path.
    #[arg(long, default_value = "stdout")]
    console: String,
    /// Control API socket (newline-delimited JSON).
    #[arg(long)]
    api_socket: Option<PathBuf>,
    /// Restore from this snapshot directory instead of booting: --disk,
    /// --fs-socket, --vsock-socket and --net then replace the snapshot's backends
    /// (in order); kernel, memory and vCPUs come from the snapshot.
    #[arg(long, conflicts_with_all = ["kernel", "initrd"])]
    restore: Option<PathBuf>,
    /// Confine hull-vmm before it starts the VM: DIR,uid=U,gid=G (see
    /// docs/security.md). Files it creates (sockets, console) must be under DIR.
    #[arg(long, value_parser = |s: &str| jail::parse_jail(s))]
    jail: Option<jail::JailConfig>,
    /// seccomp filters per thread kind (docs/security.md): "on" or "off".
    #[arg(long, default_value = SECCOMP_DEFAULT, value_parser = ["on", "off"])]
    seccomp: String,
    /// An inherited descriptor (a pipe's write end) that gets a line
    /// "ready; phases ms: fork 40, jail 12, ..." (where its start went) and is
    /// closed once the VM runs (after --restore: once its devices serve, the
    /// vsock socket listening), so a parent waits without polling.
    #[arg(long)]
    ready_fd: Option<i32>,
}

/// Takes over `--ready-fd` (close-on-exec from now on).
fn take_ready_fd(fd: i32) -> Result<std::fs::File, String> {
    if fd < 3 {
        return Err(format!("--ready-fd {fd}: must be an inherited descriptor above 2"));
    }
    // SAFETY: F_GETFD/F_SETFD on a number only inspect and flag it.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } < 0
    {
        return Err(format!("--ready-fd {fd}: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the caller handed this open descriptor to us; nothing else owns it.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

/// Where hull-vmm's own start went, in the shim's phase format
/// (`hull_agent_api::phases`: "name ms, name ms, ..."): the shim adds them
/// to its pod's phase marks as `vmm-*`.
struct StartPhases {
    last: Instant,
    marks: Vec<(&'static str, u128)>,
}

impl StartPhases {
    /// Starts with `fork`: from the fork that made this process (its exec,
    /// dynamic loading, up to main) to now, at clock-tick resolution.
    fn new() -> StartPhases {
        let mut marks = Vec::new();
        if let Some(ms) = ms_since_fork() {
            marks.push(("fork", ms));
        }
        StartPhases { last: Instant::now(), marks }
    }

    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.marks.push((name, now.duration_since(self.last).as_millis()));
        self.last = now;
    }
}

impl std::fmt::Display for StartPhases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.marks.iter().map(|(n, ms)| format!("{n} {ms}")).collect();
        f.write_str(&parts.join(", "))
    }
}

/// Milliseconds since this process was forked: its start time
/// (/proc/self/stat field 22, clock ticks of boot time) against now.
fn ms_since_fork() -> Option<u128> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name, which may itself hold spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let start_ticks: u64 = rest.split(' ').nth(19)?.parse().ok()?;
    // SAFETY: sysconf and clock_gettime only fill in plain values.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    if hz <= 0 || unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) } != 0 {
        return None;
    }
    let now_ms = now.tv_sec as u128 * 1000 + now.tv_nsec as u128 / 1_000_000;
    Some(now_ms.saturating_sub(u128::from(start_ticks) * 1000 / hz as u128))
}

/// Says "ready" with the start's phases on the --ready-fd pipe and closes it.
fn announce_ready(ready: Option<std::fs::File>, phases: &StartPhases) {
    if let Some(mut f) = ready {
        if let Err(e) = std::io::Write::write_all(&mut f, format!("ready; phases ms: {phases}\n").as_bytes()) {
            eprintln!("hull-vmm: writing to --ready-fd: {e}");
        }
    }
}

/// Whether filters are on unless --seccomp says otherwise (docs/security.md).
const SECCOMP_DEFAULT: &str = "on";

/// Log lines to stderr at the level named by RUST_LOG (error, warn, info,
/// debug, trace; default warn): the shim keeps hull-vmm's stderr in its log.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("hull-vmm: {} {}: {}", r.level(), r.target(), r.args());
        }
    }
    fn flush(&self) {}
}

fn init_log() {
    let level = std::env::var("RUST_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or(log::LevelFilter::Warn);
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(level);
    }
}

/// Blocks (`SIG_BLOCK`) or unblocks (`SIG_UNBLOCK`) SIGTERM and SIGINT for
/// the calling thread (and threads it starts later).
fn block_termination_signals(how: libc::c_int) {
    // SAFETY: plain signal-mask calls on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

/// Enters the jail (--jail) and rewrites every path to the one the jailed
/// VMM sees. Runs before any thread exists.
fn confine(cli: &mut Cli) -> Result<(), String> {
    let Some(cfg) = cli.jail.clone() else { return Ok(()) };
    // The jail has a network namespace of its own and no /dev/net/tun.
    if let Some(n) = cli.net.iter().find(|n| matches!(n.backend, NetBackend::Tap(_))) {
        return Err(format!(
            "--net {}: a tap cannot be opened by name in the jail; open it outside and pass it with --net fd=N",
            n.backend
        ));
    }
    let mut j = Jail::begin(cfg)?;
    if let Some(k) = &mut cli.kernel {
        *k = j.place(k, "kernel", true)?;
    }
    if let Some(i) = &mut cli.initrd {
        *i = j.place(i, "initrd", true)?;
    }
    if let Some(r) = &mut cli.restore {
        *r = j.place(r, "snapshot", true)?;
    }
    for (n, d) in cli.disks.iter_mut().enumerate() {
        d.path = j.place(&d.path, &format!("disk{n}"), d.read_only)?;
    }
    for (n, f) in cli.fs.iter_mut().enumerate() {
        f.socket = j.place(&f.socket, &format!("fs{n}.sock"), false)?;
    }
    for p in [&mut cli.vsock_socket, &mut cli.api_socket].into_iter().flatten() {
        *p = j.inside(p)?;
    }
    if !matches!(cli.console.as_str(), "stdout" | "off") {
        cli.console = j.inside(Path::new(&cli.console))?.to_string_lossy().into_owned();
    }
    j.enter()
}

fn main() -> ExitCode {
    let mut phases = StartPhases::new();
    init_log();
    // No transparent huge pages for the monitor's own memory (guest memory
    // is a file mapping, not affected): a thread stack or buffer that
    // happened to cover an aligned 2 MiB range got a whole huge page
    // (measured in the lab: 2 MiB `[anon]` in 3 of 4 idle VMMs), host
    // memory every sandbox paid for while touching a few KiB of it.
    // Inherited by the jailed child. SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let mut cli = Cli::parse();
    if cli.kernel.is_none() && cli.restore.is_none() && cli.api_socket.is_none() {
        eprintln!("hull-vmm: give --kernel (boot now), --restore DIR or --api-socket (configure over the API)");
        return ExitCode::FAILURE;
    }
    let ready = match cli.ready_fd.map(take_ready_fd).transpose() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hull-vmm: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = confine(&mut cli) {
        eprintln!("hull-vmm: {e}");
        return ExitCode::FAILURE;
    }
    phases.mark("jail");
    // SIGTERM and SIGINT go to the signal thread only (its handler's write
    // is allowed there): every thread started from here on has them blocked.
    block_termination_signals(libc::SIG_BLOCK);
    // Filters are built before any thread exists; this thread (the
    // controller) installs its own now, every other thread its own first
    // thing (seccomp::spawn).
    if let Err(e) = seccomp::init(cli.seccomp == "on") {
        eprintln!("hull-vmm: {e} (`--seccomp off` runs without filters)");
        return ExitCode::FAILURE;
    }
    if let Err(e) = seccomp::try_apply(ThreadKind::Controller) {
        eprintln!("hull-vmm: {e} (`--seccomp off` runs without filters)");
        return ExitCode::FAILURE;
    }
    if let Err(e) = seccomp::start_spawner() {
        eprintln!("hull-vmm: starting the thread spawner: {e}");
        return ExitCode::FAILURE;
    }
    phases.mark("seccomp");
    let listener = match &cli.api_socket {
        Some(p) => match api::bind(p) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("hull-vmm: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => None,
    };
    let mut controller = Controller::new(cli.api_socket.clone());
    let tx = controller.sender();
    let sig_tx = tx.clone();
    match signal_hook::iterator::Signals::new([libc::SIGTERM, libc::SIGINT]) {
        Ok(mut signals) => {
            let r = seccomp::spawn(ThreadKind::Signals, "signals", move || {
                block_termination_signals(libc::SIG_UNBLOCK);
                if let Some(s) = signals.forever().next() {
                    let _ = sig_tx.send(VmmEvent::Signal(s));
                }
            });
            if let Err(e) = r {
                eprintln!("hull-vmm: cannot start the signal thread: {e}");
                return ExitCode::FAILURE;
            }
        }
        Err(e) => eprintln!("hull-vmm: cannot handle signals: {e}"),
    }
    if let Some(l) = listener {
        let tx = tx.clone();
        if let Err(e) = seccomp::spawn(ThreadKind::Api, "api", move || api::serve(l, tx)) {
            eprintln!("hull-vmm: cannot start the API thread: {e}");
            return ExitCode::FAILURE;
        }
    }
    phases.mark("threads");
    let console = match cli.console.as_str() {
        "stdout" => Console::Stdout,
        "off" => Console::Off,
        p => Console::File(p.into()),
    };
    if let Some(snapshot) = cli.restore {
        let rc = RestoreConfig {
            snapshot,
            disks: cli.disks,
            fs: cli.fs,
            vsock: cli.vsock_socket.map(|uds_path| VsockDeviceConfig { uds_path, guest_cid: cli.vsock_cid }),
            net: cli.net,
            console,
        };
        if let Err(Response::Error(e)) = controller.restore(&rc) {
            eprintln!("hull-vmm: {}", e.message);
            if let Some(p) = &cli.api_socket {
                let _ = std::fs::remove_file(p);
            }
            return ExitCode::FAILURE;
        }
        phases.mark("restore");
        announce_ready(ready, &phases);
    } else if let Some(kernel) = cli.kernel {
        let config = VmConfig {
            kernel,
            initrd: cli.initrd,
            cmdline: cli.cmdline,
            mem_mib: cli.mem,
            vcpus: cli.vcpus,
            disks: cli.disks,
            fs: cli.fs,
            vsock: cli.vsock_socket.map(|uds_path| VsockDeviceConfig { uds_path, guest_cid: cli.vsock_cid }),
            net: cli.net,
            console,
        };
        if let Err(e) = controller.boot(config) {
            eprintln!("hull-vmm: {e}");
            if let Some(p) = &cli.api_socket {
                let _ = std::fs::remove_file(p);
            }
            return ExitCode::FAILURE;
        }
        phases.mark("boot");
        announce_ready(ready, &phases);
    }
    match controller.run() {
        Outcome::Clean(why) => {
            eprintln!("hull-vmm: exiting: {why}");
            ExitCode::SUCCESS
        }
        Outcome::Failed(why) => {
            eprintln!("hull-vmm: {why}");
            ExitCode::FAILURE
        }
    }
}
