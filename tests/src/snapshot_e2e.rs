//! Snapshot and restore in a real microVM: boot a VM with the agent, pause
//! it once the agent is ready, write a snapshot, then restore two VMs from
//! it at once, each with its own virtiofsd, disks and vsock socket, and run
//! a container in each (layers over virtio-fs, writable layer on its disk).
//! The two must not share RNG output, and guest memory must be mapped from
//! the snapshot's file copy-on-write.

use crate::agent_e2e::{create_req, drain, LAYER};
use crate::pod::{ext4_disk, Virtiofsd};
use crate::vm::{accept_line, listen_guest_port, rss_pss_kib, VmmProcess, NOTIFY_PORT};
use crate::{guest_initramfs, guest_kernel, workspace_bin};
use anyhow::{ensure, Context, Result};
use hull_agent_api::proto::agent::SetupSandboxRequest;
use hull_agent_api::{open_stdio, AgentAddr, AgentClient, StdioStream};
use hull_vmm::api::{ApiClient, Request, Response, VmStatus};
use std::path::Path;
use std::time::{Duration, Instant};

const DISK_MIB: u64 = 64;

fn api(vm: &VmmProcess, req: Request) -> Result<Response> {
    Ok(ApiClient::connect(&vm.api_socket())?.call(&req)?)
}

/// Boots the template VM in `d` and snapshots it to `d/snap`.
fn build_template(d: &Path, shared: &Path) -> Result<Duration> {
    std::fs::create_dir_all(d)?;
    let mut fsd = Virtiofsd::start(shared, &d.join("virtiofsd.sock"))?;
    // The template's disks only fix the slots and their size.
    for i in 0..2 {
        let f = std::fs::File::create(d.join(format!("tdisk{i}.img")))?;
        f.set_len(DISK_MIB << 20)?;
    }
    let args: Vec<String> = vec![
        "--kernel".into(),
        guest_kernel().display().to_string(),
        "--initrd".into(),
        guest_initramfs().display().to_string(),
        "--mem".into(),
        "256".into(),
        "--cmdline".into(),
        format!("console=ttyS0 reboot=k panic=-1 quiet hull.notify_port={NOTIFY_PORT}"),
        "--fs-socket".into(),
        format!("{},tag=hullfs", fsd.socket.display()),
        "--disk".into(),
        format!("{},id=slot0", d.join("tdisk0.img").display()),
        "--disk".into(),
        format!("{},id=slot1", d.join("tdisk1.img").display()),
    ];
    let notify = listen_guest_port(&d.join("vsock.sock"), NOTIFY_PORT)?;
    let mut vm = VmmProcess::spawn(&workspace_bin("hull-vmm"), d, &args)?;
    let t = Instant::now();
    accept_line(&notify, Duration::from_secs(180)).with_context(|| format!("console:\n{}", vm.console_text()))?;
    let boot = t.elapsed();
    // Let the agent settle (its notify connection closes, the guest idles).
    std::thread::sleep(Duration::from_millis(500));
    ensure!(matches!(api(&vm, Request::Pause)?, Response::Ok(i) if i.status == VmStatus::Paused), "pause");
    let t = Instant::now();
    let r = api(&vm, Request::Snapshot { dir: d.join("snap") })?;
    ensure!(matches!(r, Response::Ok(_)), "snapshot: {r:?}");
    println!("RESULT snapshot_ms={}", t.elapsed().as_millis());
    ensure!(matches!(api(&vm, Request::Shutdown)?, Response::Ok(_)), "shutdown");
    ensure!(vm.wait_exit(Duration::from_secs(30))?.success(), "template VM exit status");
    fsd.wait_exit(Duration::from_secs(10))?;
    Ok(boot)
}

struct Clone {
    vm: VmmProcess,
    _fsd: Virtiofsd,
    started: Instant,
}

fn start_clone(d: &Path, shared: &Path, snap: &Path) -> Result<Clone> {
    std::fs::create_dir_all(d)?;
    let fsd = Virtiofsd::start(shared, &d.join("virtiofsd.sock"))?;
    for i in 0..2 {
        ext4_disk(&d.join(format!("disk{i}.img")), DISK_MIB)?;
    }
    let args: Vec<String> = vec![
        "--restore".into(),
        snap.display().to_string(),
        "--fs-socket".into(),
        format!("{},tag=hullfs", fsd.socket.display()),
        "--disk".into(),
        format!("{},id=ctr-disk", d.join("disk0.img").display()),
        "--disk".into(),
        format!("{},id=spare", d.join("disk1.img").display()),
    ];
    let started = Instant::now();
    let vm = VmmProcess::spawn(&workspace_bin("hull-vmm"), d, &args)?;
    Ok(Clone { vm, _fsd: fsd, started })
}

/// Runs one container in a restored VM; returns (time to the agent's first
/// answer, the container's random bytes as hex).
async fn use_clone(c: &Clone, name: &str) -> Result<(Duration, String)> {
    let api_addr = AgentAddr::Hybrid { socket: c.vm.vsock_socket(), port: hull_agent_api::DEFAULT_AGENT_PORT };
    let stdio = AgentAddr::Hybrid { socket: c.vm.vsock_socket(), port: hull_agent_api::DEFAULT_STDIO_PORT };
    // The vsock socket appears once the restore is done.
    let sock = c.vm.vsock_socket();
    while !sock.exists() {
        ensure!(
            c.started.elapsed() < Duration::from_secs(120),
            "{name}: no vsock socket 120 s after the restore began"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("RESULT {name}_restored_ms={}", c.started.elapsed().as_millis());
    let agent = AgentClient::connect(&api_addr, Duration::from_secs(60)).await?;
    agent.version().await.context("first call to the restored agent")?;
    let first_answer = c.started.elapsed();
    let mut entropy = vec![0u8; 32];
    getrandom::getrandom(&mut entropy).map_err(|e| anyhow::anyhow!("getrandom: {e}"))?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
    agent
        .setup_sandbox(&SetupSandboxRequest {
            sandbox_id: name.into(),
            hostname: name.into(),
            entropy,
            wall_clock_unix_nanos: now.as_nanos() as i64,
            ..Default::default()
        })
        .await?;
    let script = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /etc/layer-file; \
                  echo w > /w && cat /w; date +%Y";
    agent.create_container(&create_req("c1", &["sh", "-c", script], "ctr-disk")?).await?;
    let out = drain(open_stdio(&stdio, "c1", None, StdioStream::Stdout)?);
    let err = drain(open_stdio(&stdio, "c1", None, StdioStream::Stderr)?);
    agent.start_container("c1").await?;
    let st = agent.wait_process("c1", None).await?;
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    ensure!(st.exit_status == 0, "{name}: container exit {}; stdout {out:?} stderr {err:?}", st.exit_status);
    let lines: Vec<&str> = out.lines().collect();
    ensure!(lines.len() == 4, "{name}: output {out:?} (stderr {err:?})");
    ensure!(lines[0].len() == 32, "{name}: random bytes {:?}", lines[0]);
    ensure!(lines[1] == "from the layer", "{name}: layer file over virtio-fs: {:?}", lines[1]);
    ensure!(lines[2] == "w", "{name}: write to the disk layer: {:?}", lines[2]);
    let year: i32 = lines[3].parse().unwrap_or(0);
    ensure!(year >= 2025, "{name}: guest clock says year {:?} (SetupSandbox sets it)", lines[3]);
    agent.delete_container("c1", false).await?;
    Ok((first_answer, lines[0].to_string()))
}

pub fn restore_from_template() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let shared = d.join("shared");
    hull_rootfs_builder::image::busybox_layer(Path::new("/bin/busybox"), &shared.join(LAYER))?;
    std::fs::write(shared.join(LAYER).join("etc/layer-file"), "from the layer\n")?;

    let boot = build_template(&d.join("template"), &shared)?;
    println!("RESULT template_boot_ms={}", boot.as_millis());
    let snap = d.join("template/snap");
    let mem_file = snap.join(hull_vmm::persist::MEMORY_FILE);
    let allocated = std::fs::metadata(&mem_file)?;
    println!(
        "RESULT memory_file_mib={} allocated_mib={}",
        allocated.len() >> 20,
        (std::os::unix::fs::MetadataExt::blocks(&allocated) * 512) >> 20
    );

    let clones = [start_clone(&d.join("a"), &shared, &snap)?, start_clone(&d.join("b"), &shared, &snap)?];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let results = rt.block_on(async {
        let (a, b) = tokio::join!(use_clone(&clones[0], "pod-a"), use_clone(&clones[1], "pod-b"));
        anyhow::Ok((a?, b?))
    });
    let ((ta, ra), (tb, rb)) = results.with_context(|| {
        format!("console a:\n{}\nconsole b:\n{}", clones[0].vm.console_text(), clones[1].vm.console_text())
    })?;
    println!("RESULT restore_to_agent_ms={} {}", ta.as_millis(), tb.as_millis());
    println!("RESULT cold_boot_over_restore={:.1}", boot.as_secs_f64() / ta.max(tb).as_secs_f64());
    ensure!(ra != rb, "two VMs restored from one template read the same /dev/urandom bytes: {ra}");
    println!("RESULT urandom_differs=ok");

    // Guest memory is the snapshot file, mapped private: it maps the file.
    for c in &clones {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", c.vm.child.id()))?;
        ensure!(maps.contains(&mem_file.display().to_string()), "hull-vmm does not map {}", mem_file.display());
        let (rss, pss) = rss_pss_kib(c.vm.child.id())?;
        println!("RESULT clone_rss_kib={rss} pss_kib={pss}");
    }
    for mut c in clones {
        ensure!(matches!(api(&c.vm, Request::Shutdown)?, Response::Ok(_)), "shutdown");
        ensure!(c.vm.wait_exit(Duration::from_secs(30))?.success(), "restored VM exit status");
    }
    // The snapshot is unchanged by its clones' writes.
    let after = std::fs::metadata(&mem_file)?;
    ensure!(after.modified()? == allocated.modified()?, "the snapshot memory file was written");
    println!("RESULT snapshot_untouched=ok");
    Ok(())
}
