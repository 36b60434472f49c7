//! hull-e2e: end-to-end scenarios that need a KVM host. The tests run them
//! natively where the host can run microVMs, else inside the lab; a person
//! can run them by hand the same way. Each prints `RESULT key=value` lines
//! and exits non-zero with a reason on the first failed check.

use anyhow::{bail, ensure, Context, Result};
use hull_agent_api::AgentAddr;
use hull_tests::vm::{accept_line, listen_guest_port, rss_pss_kib, test_value, VmmProcess, NOTIFY_PORT};
use hull_tests::{guest_kernel, test_initramfs, virtiofsd, workspace_bin};
use hull_vmm::api::{ApiClient, Request, Response, VmStatus};
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

fn main() {
    let scenario = std::env::args().nth(1).unwrap_or_default();
    let r = match scenario.as_str() {
        "vmm-boot" => vmm_boot(),
        "vmm-devices" => vmm_devices(),
        "vmm-bzimage" => vmm_bzimage(),
        "agent-containers" => hull_tests::agent_e2e::containers_in_vm(),
        "vmm-snapshot" => hull_tests::snapshot_e2e::restore_from_template(),
        "vmm-net" => hull_tests::net_e2e::tap_traffic_and_restore_onto_another_tap(),
        "bench-boot" => bench_boot(),
        _ => {
            eprintln!(
                "usage: hull-e2e vmm-boot|vmm-devices|vmm-bzimage|agent-containers|vmm-snapshot|vmm-net|bench-boot"
            );
            std::process::exit(2);
        }
    };
    if let Err(e) = r {
        eprintln!("hull-e2e {scenario}: FAILED: {e:#}");
        std::process::exit(1);
    }
    println!("hull-e2e {scenario}: ok");
}

fn cmdline(extra: &str) -> String {
    format!("console=ttyS0 reboot=k panic=-1 quiet rdinit=/test/init.sh {extra}")
}

fn base_args(mem: u64, vcpus: u8, cmdline: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        guest_kernel().display().to_string(),
        "--initrd".into(),
        test_initramfs().display().to_string(),
        "--mem".into(),
        mem.to_string(),
        "--vcpus".into(),
        vcpus.to_string(),
        "--cmdline".into(),
        cmdline.into(),
    ]
}

fn api(vm: &VmmProcess, req: Request) -> Result<Response> {
    Ok(ApiClient::connect(&vm.api_socket())?.call(&req)?)
}

fn status(r: Response) -> Result<VmStatus> {
    match r {
        Response::Ok(info) => Ok(info.status),
        Response::Error(e) => bail!("API error: {e}"),
    }
}

/// The agent's version, from its ttrpc Version call over the hybrid vsock socket.
fn ping(vm: &VmmProcess) -> Result<String> {
    let addr = AgentAddr::Hybrid { socket: vm.vsock_socket(), port: hull_agent_api::DEFAULT_AGENT_PORT };
    Ok(hull_agent_api::ping(&addr, Duration::from_secs(10))?)
}

/// Boot to the agent's ready notification (guest→host vsock), ping it
/// (host→guest), SMP, pause/resume over the API, shutdown and cleanup.
fn vmm_boot() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let vcpus = 2;
    let args = base_args(128, vcpus, &cmdline(&format!("hull.notify_port={NOTIFY_PORT}")));
    let notify = listen_guest_port(&dir.path().join("vsock.sock"), NOTIFY_PORT)?;
    let mut vm = VmmProcess::spawn(&workspace_bin("hull-vmm"), dir.path(), &args)?;
    let ready = accept_line(&notify, BOOT_TIMEOUT).with_context(|| format!("console:\n{}", vm.console_text()))?;
    let boot_ms = vm.started.elapsed().as_millis();
    ensure!(ready.starts_with("hull-agent: ready"), "guest→host notification was {ready:?}");
    println!("RESULT boot_to_ready_ms={boot_ms}");
    let console = vm.console_text();
    ensure!(console.contains("hull-agent: ready"), "ready line missing on the console:\n{console}");
    ensure!(test_value(&console, "cpus") == Some(vcpus.to_string()), "guest CPU count: console:\n{console}");
    println!("RESULT guest_cpus={vcpus}");

    let v = ping(&vm).context("host→guest ping")?;
    println!("RESULT ping={v}");
    let (rss, pss) = rss_pss_kib(vm.child.id())?;
    println!("RESULT vmm_rss_kib={rss} vmm_pss_kib={pss}");

    ensure!(status(api(&vm, Request::State)?)? == VmStatus::Running);
    ensure!(status(api(&vm, Request::Pause)?)? == VmStatus::Paused);
    ensure!(status(api(&vm, Request::Resume)?)? == VmStatus::Running);
    ping(&vm).context("ping after resume")?;
    match api(&vm, Request::Boot)? {
        Response::Error(e) => ensure!(e.message.contains("already booted"), "{e}"),
        r => bail!("second boot accepted: {r:?}"),
    }

    ensure!(status(api(&vm, Request::Shutdown)?)? == VmStatus::ShuttingDown);
    let st = vm.wait_exit(Duration::from_secs(20))?;
    ensure!(st.success(), "hull-vmm exit status after API shutdown: {st}");
    for s in [vm.vsock_socket(), vm.api_socket()] {
        ensure!(!s.exists(), "{} left behind", s.display());
    }
    Ok(())
}

/// virtio-blk both ways (rw with a serial, ro refused), virtio-fs with a real
/// virtiofsd, and guest reboot ending hull-vmm with status 0.
fn vmm_devices() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    // A sparse 4 MiB disk with a host pattern at 0, and a read-only disk.
    let disk = d.join("disk.img");
    let f = std::fs::File::create(&disk)?;
    f.set_len(4 << 20)?;
    f.write_all_at(b"HOSTPATTERN-0001", 0)?;
    drop(f);
    let ro = d.join("ro.img");
    let mut ro_bytes = b"READONLY".to_vec();
    ro_bytes.resize(1 << 20, 0);
    std::fs::write(&ro, &ro_bytes)?;

    let shared = d.join("shared");
    std::fs::create_dir(&shared)?;
    std::fs::write(shared.join("hello.txt"), "hello from the host\n")?;
    let fs_sock = d.join("virtiofsd.sock");
    let mut virtiofsd = Command::new(virtiofsd())
        .arg(format!("--socket-path={}", fs_sock.display()))
        .arg(format!("--shared-dir={}", shared.display()))
        .args(["--sandbox=none", "--cache=never"])
        .stdin(Stdio::null())
        .spawn()
        .context("starting virtiofsd")?;
    let t = Instant::now();
    while !fs_sock.exists() {
        ensure!(t.elapsed() < Duration::from_secs(30), "virtiofsd did not create its socket");
        std::thread::sleep(Duration::from_millis(20));
    }

    let mut args = base_args(256, 1, &cmdline("hulltest=blk,fs hulltest_end=reboot"));
    args.extend(["--disk".into(), format!("{},id=testdisk", disk.display())]);
    args.extend(["--disk".into(), format!("{},ro", ro.display())]);
    args.extend(["--fs-socket".into(), format!("{},tag=hullfs", fs_sock.display())]);
    let mut vm = VmmProcess::spawn(&workspace_bin("hull-vmm"), d, &args)?;
    let st = vm.wait_exit(BOOT_TIMEOUT)?;
    let console = vm.console_text();
    ensure!(st.success(), "hull-vmm exit status after guest reboot: {st}; console:\n{console}");
    println!("RESULT reboot_exit_status=0");
    ensure!(console.contains("TEST done"), "test init did not finish; console:\n{console}");

    let check = |key: &str, want: &str| -> Result<()> {
        let got = test_value(&console, key);
        ensure!(got.as_deref() == Some(want), "{key}: got {got:?}, want {want:?}; console:\n{console}");
        println!("RESULT {key}={want}");
        Ok(())
    };
    check("vda_serial", "testdisk")?;
    check("vda_head", "HOSTPATTERN-0001")?;
    check("vdb_ro", "refused")?;
    check("vdb_head", "READONLY")?;
    check("fs_read", "hello from the host")?;
    check("fs_wrote", "0")?;

    let mut buf = [0u8; 17];
    std::fs::File::open(&disk)?.read_exact_at(&mut buf, 4096)?;
    ensure!(&buf == b"GUESTPATTERN-8192", "disk bytes at 4096: {:?}", String::from_utf8_lossy(&buf));
    ensure!(std::fs::read(&ro)? == ro_bytes, "the read-only disk changed");
    ensure!(std::fs::read_to_string(shared.join("guest.txt"))? == "from-guest\n", "guest's file on the share");
    ensure!(std::fs::metadata(&disk)?.len() == 4 << 20, "disk size changed");

    // hull-vmm closed its vhost-user connection: virtiofsd exits by itself.
    let t = Instant::now();
    loop {
        if let Some(s) = virtiofsd.try_wait()? {
            println!("RESULT virtiofsd_exit={s}");
            break;
        }
        if t.elapsed() > Duration::from_secs(10) {
            let _ = virtiofsd.kill();
            bail!("virtiofsd still running 10 s after hull-vmm exited (orphaned connection)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    ensure!(!vm.vsock_socket().exists() && !vm.api_socket().exists(), "sockets left behind");
    Ok(())
}

/// The 64-bit Linux boot protocol: boot a bzImage (Debian's generic kernel,
/// given as HULL_BZIMAGE) to the test init, which reboots.
fn vmm_bzimage() -> Result<()> {
    let bz = hull_tests::artifact("HULL_BZIMAGE");
    let dir = tempfile::tempdir()?;
    let args = vec![
        "--kernel".to_string(),
        bz.display().to_string(),
        "--initrd".into(),
        test_initramfs().display().to_string(),
        "--mem".into(),
        "256".into(),
        "--cmdline".into(),
        cmdline("hulltest_end=reboot"),
    ];
    let mut vm = VmmProcess::spawn(&workspace_bin("hull-vmm"), dir.path(), &args)?;
    let st = vm.wait_exit(Duration::from_secs(240))?;
    let console = vm.console_text();
    ensure!(st.success(), "hull-vmm exit status: {st}; console:\n{console}");
    ensure!(console.contains("TEST done"), "bzImage guest did not run the test init; console:\n{console}");
    println!("RESULT bzimage_boot=ok");
    Ok(())
}

/// Boots the same kernel + initramfs `runs` times with hull-vmm and with QEMU
/// `microvm` (vhost-vsock), timing process start → the agent's ready line on
/// the console (polled the same way for both), and measures each monitor's
/// RSS/PSS with a 128 MiB guest once the agent is ready. Prints a table and
/// one `BENCH_JSON` line.
fn bench_boot() -> Result<()> {
    let runs: usize = std::env::var("HULL_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let kernel = guest_kernel();
    let initrd = hull_tests::guest_initramfs();
    // (monitor, boot times in ms, (RSS, PSS) per run)
    type Runs = (&'static str, Vec<f64>, Vec<(u64, u64)>);
    let mut results: Vec<Runs> = Vec::new();
    for monitor in ["hull-vmm", "qemu-microvm"] {
        let mut times = Vec::new();
        let mut mem = Vec::new();
        for i in 0..runs {
            let dir = tempfile::tempdir()?;
            let console = dir.path().join("console.log");
            let mut cmd = if monitor == "hull-vmm" {
                let mut c = Command::new(workspace_bin("hull-vmm"));
                c.arg("--kernel").arg(&kernel).arg("--initrd").arg(&initrd).args(["--mem", "128"]);
                c.arg("--vsock-socket").arg(dir.path().join("v.sock")).arg("--console").arg(&console);
                c
            } else {
                let mut c = Command::new("qemu-system-x86_64");
                c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host", "-m", "128", "-smp", "1"]);
                c.args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
                c.arg("-kernel").arg(&kernel).arg("-initrd").arg(&initrd);
                c.args(["-append", "console=ttyS0 reboot=t panic=-1 quiet"]);
                c.arg("-chardev").arg(format!("file,id=con,path={}", console.display()));
                c.args(["-serial", "chardev:con"]);
                c.args(["-device", &format!("vhost-vsock-device,guest-cid={}", 100 + i)]);
                c
            };
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
            let start = Instant::now();
            let mut child = cmd.spawn().with_context(|| format!("starting {monitor}"))?;
            let ready = loop {
                let text = std::fs::read_to_string(&console).unwrap_or_default();
                if text.contains("hull-agent: ready") {
                    break start.elapsed();
                }
                if start.elapsed() > BOOT_TIMEOUT || child.try_wait()?.is_some() {
                    let _ = child.kill();
                    bail!("{monitor} run {i}: no ready line; console:\n{text}");
                }
                std::thread::sleep(Duration::from_millis(2));
            };
            mem.push(rss_pss_kib(child.id())?);
            let _ = child.kill();
            let _ = child.wait();
            times.push(ready.as_secs_f64() * 1000.0);
        }
        results.push((monitor, times, mem));
    }
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.partial_cmp(b).unwrap());
        s[s.len() / 2]
    };
    println!(
        "{:<14} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "monitor", "min ms", "median ms", "max ms", "RSS KiB", "PSS KiB"
    );
    let mut json = Vec::new();
    for (m, t, mem) in &results {
        let (rss, pss) = mem[mem.len() / 2];
        let min = t.iter().cloned().fold(f64::MAX, f64::min);
        let max = t.iter().cloned().fold(0.0, f64::max);
        println!("{m:<14} {min:>10.0} {:>10.0} {max:>10.0} {rss:>10} {pss:>10}", median(t));
        json.push(format!(
            r#"{{"monitor":"{m}","boot_to_ready_ms":{t:?},"median_ms":{:.1},"rss_kib":{rss},"pss_kib":{pss}}}"#,
            median(t)
        ));
    }
    let ratio = median(&results[1].1) / median(&results[0].1);
    println!("qemu-microvm / hull-vmm median boot time: {ratio:.2}x (runs={runs}, 128 MiB, 1 vCPU)");
    println!(r#"BENCH_JSON {{"runs":{runs},"results":[{}],"qemu_over_hull":{ratio:.3}}}"#, json.join(","));
    Ok(())
}
