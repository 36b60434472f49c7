//! virtio-net in a real microVM, on taps in network namespaces this test
//! makes (nothing touches the host's own namespace, and 10.200.0.0/24
//! exists only inside them).
//!
//! 1. Namespace A holds tap `hulltap0` (host side 10.200.0.1) and small
//!    servers: TCP echo (7777), a 4 MiB download (7778), a tick counter
//!    (7779). hull-vmm runs inside A with `--net tap=hulltap0` and the
//!    seccomp filters on; the guest (tests/guest/test-init.sh, `net`)
//!    configures eth0 as 10.200.0.2 with busybox `ip`, pings the host,
//!    echoes over TCP, downloads the blob, serves one of its own with
//!    httpd (the host fetches it), then keeps fetching ticks.
//! 2. The VM is paused, snapshotted and shut down. Namespace B gets tap
//!    `hulltap1` with the same host address and MAC (the guest's ARP entry
//!    stays valid). The test opens that tap inside B, as the shim will, and
//!    restores the snapshot with `--net fd=N` from a hull-vmm outside B:
//!    the guest's ticks now reach B's server, and the host fetches the
//!    guest's blob again through the new tap.

use crate::vm::VmmProcess;
use crate::{guest_kernel, test_initramfs, workspace_bin};
use anyhow::{bail, ensure, Context, Result};
use hull_vmm::api::{ApiClient, Request, Response, VmStatus};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const HOST_IP: &str = "10.200.0.1";
const GUEST_IP: &str = "10.200.0.2";
const HOST_MAC: &str = "02:00:0a:c8:00:01";
const GUEST_MAC: &str = "02:00:0a:c8:00:02";
const BLOB_BYTES: usize = 4 << 20;
const GUEST_TIMEOUT: Duration = Duration::from_secs(240);

/// Progress on stderr (where a run that hangs got to).
fn step(what: &str) {
    eprintln!("vmm-net: {what}");
}

fn run(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    ensure!(out.status.success(), "{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// A named network namespace (`ip netns`), deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Result<Netns> {
        let name = format!("hull-e2e-{tag}-{}", std::process::id());
        run("ip", &["netns", "add", &name])?;
        Ok(Netns { name })
    }

    fn ip(&self, args: &str) -> Result<()> {
        let mut a = vec!["-n", &self.name];
        a.extend(args.split_whitespace());
        run("ip", &a)
    }

    fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// A persistent tap with the host side's MAC and address, up.
    fn tap(&self, name: &str) -> Result<()> {
        self.ip(&format!("tuntap add dev {name} mode tap"))?;
        self.ip(&format!("link set {name} address {HOST_MAC} up"))?;
        self.ip(&format!("addr add {HOST_IP}/24 dev {name}"))
    }

    /// Runs `f` on a new thread inside the namespace.
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T>> {
        let path = self.path();
        std::thread::spawn(move || {
            enter(&path)?;
            f()
        })
    }

    /// Runs `f` inside the namespace and waits for it.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
        self.spawn(f).join().map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Moves the calling thread into the network namespace at `path`.
fn enter(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: setns on a namespace file we hold open; affects this thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    ensure!(r == 0, "setns {}: {}", path.display(), std::io::Error::last_os_error());
    Ok(())
}

/// Opens /dev/net/tun attached to tap `name` the way the shim does
/// (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), in the calling thread's namespace.
fn open_tap(name: &str) -> Result<OwnedFd> {
    // SAFETY: open of a NUL-terminated path.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    ensure!(fd >= 0, "open /dev/net/tun: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor we just opened.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = [0u8; 40];
    req[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
    req[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF with a 40-byte struct ifreq.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, req.as_mut_ptr()) };
    ensure!(r == 0, "TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    Ok(fd)
}

fn sha256_hex(data: &[u8]) -> Result<String> {
    let mut c = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let mut stdin = c.stdin.take().context("sha256sum stdin")?;
    let data = data.to_vec();
    let w = std::thread::spawn(move || stdin.write_all(&data));
    let out = c.wait_with_output()?;
    w.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(s.split_whitespace().next().unwrap_or_default().to_string())
}

/// The host side's servers in one namespace.
struct Servers {
    ticks: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Servers {
    fn start(ns: &Netns, blob: Arc<Vec<u8>>) -> Result<Servers> {
        let ticks = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        for port in [7777u16, 7778, 7779] {
            let (ticks, stop, blob) = (ticks.clone(), stop.clone(), blob.clone());
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            ns.spawn(move || {
                let l = TcpListener::bind((HOST_IP, port));
                let l = match l {
                    Ok(l) => {
                        let _ = ready_tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("binding {HOST_IP}:{port}: {e}")));
                        return Ok(());
                    }
                };
                l.set_nonblocking(true)?;
                while !stop.load(Ordering::SeqCst) {
                    match l.accept() {
                        Ok((s, _)) => {
                            s.set_nonblocking(false)?;
                            s.set_read_timeout(Some(Duration::from_secs(30)))?;
                            let _ = serve(port, s, &ticks, &blob);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(20))
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(())
            });
            ready_rx.recv().context("server thread")?.map_err(anyhow::Error::msg)?;
        }
        Ok(Servers { ticks, stop })
    }

    fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::SeqCst)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Reads an HTTP request's head.
fn read_head(s: &mut TcpStream) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        if s.read(&mut b)? == 0 {
            break;
        }
        head.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn serve(port: u16, mut s: TcpStream, ticks: &AtomicU64, blob: &[u8]) -> std::io::Result<()> {
    match port {
        7777 => {
            let mut data = Vec::new();
            s.read_to_end(&mut data)?;
            s.write_all(b"echo:")?;
            s.write_all(&data)
        }
        7778 => {
            read_head(&mut s)?;
            s.write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", blob.len()).as_bytes())?;
            s.write_all(blob)
        }
        _ => {
            if read_head(&mut s)?.starts_with("GET /tick") {
                ticks.fetch_add(1, Ordering::SeqCst);
            }
            s.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        }
    }
}

/// Fetches the guest's /blob from its httpd (from inside `ns`); returns
/// its SHA-256 and how long it took.
fn fetch_guest_blob(ns: &Netns) -> Result<(String, Duration)> {
    ns.run(|| {
        let addr: SocketAddr = format!("{GUEST_IP}:8080").parse()?;
        let t = Instant::now();
        let mut last = None;
        for _ in 0..20 {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(mut s) => {
                    s.set_read_timeout(Some(Duration::from_secs(60)))?;
                    s.write_all(b"GET /blob HTTP/1.0\r\n\r\n")?;
                    let mut resp = Vec::new();
                    s.read_to_end(&mut resp)?;
                    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").context("no HTTP header end")?;
                    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
                    ensure!(head.starts_with("HTTP/1.") && head.contains(" 200"), "guest httpd answered {head:?}");
                    let took = t.elapsed();
                    return Ok((sha256_hex(&resp[split + 4..])?, took));
                }
                Err(e) => {
                    last = Some(e);
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        bail!("connecting to the guest's httpd: {:?}", last)
    })
}

/// The value of `TEST key=` on the console, waiting for it.
fn console_value(vm: &mut VmmProcess, key: &str, timeout: Duration) -> Result<String> {
    let t = Instant::now();
    loop {
        let text = vm.console_text();
        // Complete lines only: the guest may be halfway through one.
        let done = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        if let Some(v) = crate::vm::test_value(done, key) {
            step(&format!("guest: {key}={v}"));
            return Ok(v);
        }
        if let Some(st) = vm.child.try_wait()? {
            bail!("hull-vmm exited ({st}) before the guest printed {key}; console:\n{text}");
        }
        ensure!(t.elapsed() < timeout, "no TEST {key}= within {timeout:?}; console:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn api(vm: &VmmProcess, req: Request) -> Result<VmStatus> {
    match ApiClient::connect(&vm.api_socket())?.call(&req)? {
        Response::Ok(i) => Ok(i.status),
        Response::Error(e) => bail!("API {req:?}: {e}"),
    }
}

/// Waits until `servers` counted `n` more ticks than `from`.
fn wait_ticks(servers: &Servers, from: u64, n: u64, vm: &mut VmmProcess, what: &str) -> Result<Duration> {
    let t = Instant::now();
    while servers.ticks() < from + n {
        if let Some(st) = vm.child.try_wait()? {
            bail!("hull-vmm exited ({st}) while waiting for {what}; console:\n{}", vm.console_text());
        }
        ensure!(t.elapsed() < Duration::from_secs(120), "{what}: {} ticks in 120 s", servers.ticks() - from);
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(t.elapsed())
}

pub fn tap_traffic_and_restore_onto_another_tap() -> Result<()> {
    let total = Instant::now();
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // The host's download: 4 MiB that are not all alike.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let blob: Vec<u8> = (0..BLOB_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let blob_sha = sha256_hex(&blob)?;
    let blob = Arc::new(blob);

    // ---- first VM: hull-vmm inside namespace A, --net tap=NAME ----------
    step("namespace A, tap hulltap0, servers");
    let ns_a = Netns::new("a")?;
    ns_a.tap("hulltap0")?;
    let servers_a = Servers::start(&ns_a, blob.clone())?;
    let dir_a = d.join("a");
    std::fs::create_dir(&dir_a)?;
    let ns_a_file = std::fs::File::open(ns_a.path())?;
    let ns_a_fd = ns_a_file.as_raw_fd();
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--kernel")
        .arg(guest_kernel())
        .arg("--initrd")
        .arg(test_initramfs())
        .args(["--mem", "256", "--seccomp", "on"])
        .arg("--cmdline")
        .arg("console=ttyS0 reboot=k panic=-1 quiet rdinit=/test/init.sh hulltest=net hulltest_end=stay")
        .arg("--net")
        .arg(format!("tap=hulltap0,mac={GUEST_MAC}"))
        .arg("--api-socket")
        .arg(dir_a.join("api.sock"))
        .arg("--console")
        .arg(dir_a.join("console.log"))
        .stdin(Stdio::null());
    // SAFETY: only setns (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns_a_fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    step("booting with --net tap=hulltap0 inside namespace A");
    let started = Instant::now();
    let mut vm = VmmProcess { child: cmd.spawn().context("starting hull-vmm in namespace A")?, dir: dir_a, started };
    drop(ns_a_file);

    let check = |vm: &mut VmmProcess, key: &str, want: &str| -> Result<()> {
        let got = console_value(vm, key, GUEST_TIMEOUT)?;
        ensure!(got == want, "{key}: got {got:?}, want {want:?}; console:\n{}", vm.console_text());
        println!("RESULT {key}={want}");
        Ok(())
    };
    check(&mut vm, "net_mac", GUEST_MAC)?;
    check(&mut vm, "net_up", "0")?;
    check(&mut vm, "net_ping", "ok")?;
    println!("RESULT boot_to_ping_ms={}", started.elapsed().as_millis());
    check(&mut vm, "net_echo", "echo:hello-from-guest")?;
    check(&mut vm, "net_download", &blob_sha)?;
    println!("RESULT download_done_ms={}", started.elapsed().as_millis());
    let guest_blob = console_value(&mut vm, "net_blob", GUEST_TIMEOUT)?;
    check(&mut vm, "net_httpd", "0")?;
    step("fetching the guest's blob");
    let (got, took) = fetch_guest_blob(&ns_a)?;
    ensure!(got == guest_blob, "the guest's blob fetched by the host: sha256 {got}, the guest has {guest_blob}");
    println!("RESULT host_fetch_a=ok ms={} (2 MiB guest→host)", took.as_millis());
    wait_ticks(&servers_a, 0, 3, &mut vm, "ticks before the snapshot")?;
    println!("RESULT ticks_a={}", servers_a.ticks());

    // ---- snapshot -----------------------------------------------------------
    step("pause, snapshot, shutdown");
    ensure!(api(&vm, Request::Pause)? == VmStatus::Paused, "pause");
    let snap = d.join("snap");
    let t = Instant::now();
    api(&vm, Request::Snapshot { dir: snap.clone() })?;
    println!("RESULT snapshot_ms={}", t.elapsed().as_millis());
    api(&vm, Request::Shutdown)?;
    let st = vm.wait_exit(Duration::from_secs(30))?;
    ensure!(st.success(), "first VM's exit status {st}; console:\n{}", vm.console_text());
    let ticks_a_end = servers_a.ticks();

    // ---- restore onto a tap in namespace B, passed as a descriptor -------
    step("namespace B, tap hulltap1, restore with --net fd=N");
    let ns_b = Netns::new("b")?;
    ns_b.tap("hulltap1")?;
    let servers_b = Servers::start(&ns_b, blob.clone())?;
    let tap_fd = ns_b.run(|| open_tap("hulltap1"))?;
    let n: RawFd = tap_fd.as_raw_fd();
    let dir_b = d.join("b");
    std::fs::create_dir(&dir_b)?;
    let mut cmd = Command::new(workspace_bin("hull-vmm"));
    cmd.arg("--restore")
        .arg(&snap)
        .arg("--net")
        .arg(format!("fd={n}"))
        .args(["--seccomp", "on"])
        .arg("--api-socket")
        .arg(dir_b.join("api.sock"))
        .arg("--console")
        .arg(dir_b.join("console.log"))
        .stdin(Stdio::null());
    // SAFETY: only fcntl (async-signal-safe) between fork and exec: the
    // tap descriptor stays open across exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::fcntl(n, libc::F_SETFD, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut vm = VmmProcess { child: cmd.spawn().context("restoring")?, dir: dir_b, started };
    // hull-vmm owns the tap now.
    drop(tap_fd);
    let first = wait_ticks(&servers_b, 0, 1, &mut vm, "the first tick through the new tap")?;
    println!("RESULT restore_to_first_tick_ms={}", first.as_millis());
    wait_ticks(&servers_b, 0, 3, &mut vm, "ticks after the restore")?;
    let (got, took) = fetch_guest_blob(&ns_b)?;
    ensure!(got == guest_blob, "after the restore the guest's blob has sha256 {got}, before {guest_blob}");
    println!("RESULT host_fetch_b=ok ms={}", took.as_millis());
    ensure!(servers_a.ticks() == ticks_a_end, "namespace A still got ticks after its VM was gone");
    println!("RESULT ticks_b={} ticks_a_after={}", servers_b.ticks(), servers_a.ticks() - ticks_a_end);
    println!("RESULT restored_traffic=ok");

    ensure!(api(&vm, Request::Shutdown)? == VmStatus::ShuttingDown, "shutdown");
    let st = vm.wait_exit(Duration::from_secs(30))?;
    ensure!(st.success(), "restored VM's exit status {st}; console:\n{}", vm.console_text());
    println!("RESULT scenario_ms={}", total.elapsed().as_millis());
    Ok(())
}
