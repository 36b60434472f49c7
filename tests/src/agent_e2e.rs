//! The agent inside a real microVM: containers from busybox layers shared
//! over virtio-fs (a real virtiofsd) with writable layers on virtio-blk,
//! driven through hull-vmm's hybrid vsock with the ttrpc client.

use crate::pod::{busybox_spec, ext4_disk, process_json, Virtiofsd};
use crate::vm::{accept_line, listen_guest_port, VmmProcess, NOTIFY_PORT};
use crate::{guest_initramfs, guest_kernel, workspace_bin};
use anyhow::{bail, ensure, Context, Result};
use hull_agent_api::proto::agent::{CreateContainerRequest, ExecProcessRequest, SetupSandboxRequest, Stdio};
use hull_agent_api::{open_stdio, AgentAddr, AgentClient, StdioStream};
use std::io::Read;
use std::time::{Duration, Instant};

pub(crate) const LAYER: &str = "layers/busybox";

pub(crate) fn create_req(id: &str, args: &[&str], disk: &str) -> Result<CreateContainerRequest> {
    Ok(CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: busybox_spec(args, false)?,
        layers: vec![LAYER.into()],
        rw_disk_serial: disk.into(),
        stdio: Some(Stdio { terminal: false, stdin: false, stdout: true, stderr: true, ..Default::default() }).into(),
        ..Default::default()
    })
}

/// Reads a stdio stream to EOF on a thread.
pub(crate) fn drain(mut s: std::os::unix::net::UnixStream) -> std::thread::JoinHandle<String> {
    let _ = s.set_read_timeout(None);
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = s.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

/// Runs `args` in `container` via exec and returns (exit status, stdout).
async fn exec(
    c: &AgentClient,
    addr: &AgentAddr,
    container: &str,
    exec_id: &str,
    args: &[&str],
) -> Result<(i32, String)> {
    let req = ExecProcessRequest {
        container_id: container.into(),
        exec_id: exec_id.into(),
        oci_process_json: process_json(args)?,
        stdio: Some(Stdio { stdout: true, stderr: true, ..Default::default() }).into(),
        ..Default::default()
    };
    c.exec_process(&req).await.with_context(|| format!("exec {args:?} in {container}"))?;
    let out = drain(open_stdio(addr, container, Some(exec_id), StdioStream::Stdout)?);
    let err = drain(open_stdio(addr, container, Some(exec_id), StdioStream::Stderr)?);
    let st = c.wait_process(container, Some(exec_id)).await?;
    let err = err.join().unwrap();
    if !err.is_empty() {
        println!("exec {args:?} in {container}: stderr: {err}");
    }
    Ok((st.exit_status, out.join().unwrap()))
}

pub fn containers_in_vm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let shared = d.join("shared");
    hull_rootfs_builder::image::busybox_layer(std::path::Path::new("/bin/busybox"), &shared.join(LAYER))?;
    let mut fsd = Virtiofsd::start(&shared, &d.join("virtiofsd.sock"))?;
    for name in ["disk1", "disk2"] {
        ext4_disk(&d.join(format!("{name}.img")), 64)?;
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
        format!("{},id=ctr1-disk", d.join("disk1.img").display()),
        "--disk".into(),
        format!("{},id=ctr2-disk", d.join("disk2.img").display()),
    ];
    let notify = listen_guest_port(&d.join("vsock.sock"), NOTIFY_PORT)?;
    let mut vm = VmmProcess::spawn(&workspace_bin("hull-vmm"), d, &args)?;
    accept_line(&notify, Duration::from_secs(120)).with_context(|| format!("console:\n{}", vm.console_text()))?;
    let api_addr = AgentAddr::Hybrid { socket: vm.vsock_socket(), port: hull_agent_api::DEFAULT_AGENT_PORT };
    // stdio streams go to the agent's stdio port.
    let addr = AgentAddr::Hybrid { socket: vm.vsock_socket(), port: hull_agent_api::DEFAULT_STDIO_PORT };

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = rt.block_on(async {
        let c = AgentClient::connect(&api_addr, Duration::from_secs(60)).await?;
        c.setup_sandbox(&SetupSandboxRequest {
            sandbox_id: "pod-1".into(),
            hostname: "pod-1".into(),
            entropy: vec![7u8; 32],
            ..Default::default()
        })
        .await?;
        let free_before = c.health().await?.cgroup_pool_free;

        // 1. Output, errors and the exit status of a short-lived container.
        let t = Instant::now();
        c.create_container(&create_req("c1", &["sh", "-c", "echo hi; echo err >&2; exit 3"], "ctr1-disk")?).await?;
        let out = drain(open_stdio(&addr, "c1", None, StdioStream::Stdout)?);
        let err = drain(open_stdio(&addr, "c1", None, StdioStream::Stderr)?);
        c.start_container("c1").await?;
        let st = c.wait_process("c1", None).await?;
        println!("RESULT create_to_exit_ms={}", t.elapsed().as_millis());
        let (out, err) = (out.join().unwrap(), err.join().unwrap());
        ensure!(out == "hi\n", "stdout {out:?}");
        ensure!(err == "err\n", "stderr {err:?}");
        ensure!(st.exit_status == 3, "exit status {}", st.exit_status);
        println!("RESULT c1_stdout=hi c1_stderr=err c1_exit=3");
        c.delete_container("c1", false).await?;

        // 2. Two long-running containers: exec, isolation, writes stay private.
        for (id, disk) in [("c2", "ctr1-disk"), ("c3", "ctr2-disk")] {
            // PID 1 of a pid namespace ignores signals it has no handler for: trap TERM.
            let script = format!("echo {id} > /written-by-{id}; trap 'exit 143' TERM; while :; do sleep 1; done");
            let req = create_req(id, &["sh", "-c", &script], disk)?;
            c.create_container(&req).await?;
            drop(drain(open_stdio(&addr, id, None, StdioStream::Stdout)?));
            drop(drain(open_stdio(&addr, id, None, StdioStream::Stderr)?));
            c.start_container(id).await?;
        }
        ensure!(c.health().await?.cgroup_pool_free + 2 <= free_before, "containers did not take pooled cgroups");
        // Wait until c2's init has written its file (the guest is slow under emulation).
        let mut tries = 0;
        let (st, out) = loop {
            tries += 1;
            let r = exec(&c, &addr, "c2", &format!("e1-{tries}"), &["cat", "/written-by-c2"]).await?;
            if r.0 == 0 || tries == 20 {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        ensure!(st == 0 && out == "c2\n", "exec in c2: {st} {out:?}");
        println!("RESULT exec_in_c2=ok");
        let (st, _) = exec(&c, &addr, "c3", "e1", &["test", "-e", "/written-by-c2"]).await?;
        ensure!(st == 1, "c3 sees c2's file (mount namespaces not isolated): test -e gave {st}");
        let (_, out) = exec(
            &c,
            &addr,
            "c2",
            "e2",
            &["sh", "-c", "cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'"],
        )
        .await?;
        ensure!(out.starts_with("sh -c echo c2"), "c2's pid 1 is not its own init: {out:?}");
        println!("RESULT isolation=ok pid1_in_c2={:?}", out.lines().next().unwrap_or(""));

        // 3. A signal ends a container with 128 + signal.
        c.signal_process("c2", None, 15, false).await?;
        let st = tokio::time::timeout(Duration::from_secs(60), c.wait_process("c2", None))
            .await
            .context("c2 did not exit within 60 s of SIGTERM")??;
        ensure!(st.exit_status == 143, "SIGTERM exit status {}", st.exit_status);
        println!("RESULT sigterm_exit=143");
        c.signal_process("c3", None, 9, false).await?;
        let st = tokio::time::timeout(Duration::from_secs(60), c.wait_process("c3", None))
            .await
            .context("c3 did not exit within 60 s of SIGKILL")??;
        ensure!(st.exit_status == 137, "SIGKILL exit status {}", st.exit_status);

        // 4. Bad input gets a named error and the agent keeps serving.
        match c
            .create_container(&CreateContainerRequest {
                layers: vec!["../../etc".into()],
                ..create_req("bad", &["true"], "")?
            })
            .await
        {
            Err(e) => ensure!(e.to_string().contains(".."), "error does not name the problem: {e}"),
            Ok(_) => bail!("a layer path with .. was accepted"),
        }
        match c.start_container("nope").await {
            Err(e) => ensure!(e.to_string().contains("nope"), "{e}"),
            Ok(_) => bail!("start of an unknown container succeeded"),
        }
        c.version().await.context("agent stopped serving after bad requests")?;

        for id in ["c2", "c3"] {
            c.delete_container(id, true).await?;
        }
        let health = c.health().await?;
        ensure!(health.containers == 0, "{} containers left", health.containers);
        println!("RESULT pool_free_before={free_before} after={}", health.cgroup_pool_free);
        anyhow::Ok(())
    });
    let console = vm.console_text();
    result.with_context(|| format!("console:\n{console}"))?;

    // Writes in the containers never reached the shared layer.
    for id in ["c1", "c2", "c3"] {
        ensure!(!shared.join(LAYER).join(format!("written-by-{id}")).exists(), "{id}'s write reached the shared layer");
    }
    println!("RESULT shared_layer_untouched=ok");
    let api = hull_vmm::api::ApiClient::connect(&vm.api_socket())?.call(&hull_vmm::api::Request::Shutdown)?;
    ensure!(matches!(api, hull_vmm::api::Response::Ok(_)), "{api:?}");
    ensure!(vm.wait_exit(Duration::from_secs(30))?.success());
    fsd.wait_exit(Duration::from_secs(10))?;
    Ok(())
}
