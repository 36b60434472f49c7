//! The measurements that run guests (in the lab on a PVM-only host): pod
//! cold start through containerd (template restore, cold boot, and QEMU
//! microvm boot of the same kernel + initramfs as the baseline), N pods
//! started at once, and the host memory of K idle sandboxes.
//!
//! containerd is Debian's, started privately as tests/scripts/containerd-env.sh
//! does (own root, state, socket and config on a tmpfs), with the shim
//! `containerd-shim-hull-v2` reading its config from `HULL_CONFIG`. Pods are
//! started with `ctr run -d --runtime io.containerd.hull.v2`, which returns
//! once the task is running (create → start → running): that wall time is
//! the pod's start latency. The shim's own log lines give the split.

use crate::stats::Summary;
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const IMAGE: &str = "docker.io/library/hull-bench:latest";
const RUNTIME: &str = "io.containerd.hull.v2";
/// Marks the result line on stdout (everything else goes to stderr).
pub const JSON_MARK: &str = "HULL_BENCH_JSON ";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodsOptions {
    pub runs: usize,
    pub concurrency: Vec<usize>,
    pub density: usize,
    pub mem_mib: u64,
    pub disks_per_pod: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Where hull-vmm and containerd-shim-hull-v2 are.
    pub bin_dir: PathBuf,
    /// hull-rootfs-builder.
    pub rootfs_builder: PathBuf,
    pub virtiofsd: PathBuf,
    /// Seconds each ctr command may take.
    pub ctr_timeout: u64,
}

/// One pod start as the shim logged it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Split {
    /// `ctr run -d` wall time.
    pub total_ms: f64,
    /// hull-vmm start → the agent's ready announcement (shim log).
    pub agent_ready_ms: Option<f64>,
    /// hull-vmm start → sandbox set up (SetupSandbox answered; shim log).
    pub sandbox_ready_ms: Option<f64>,
    /// The shim's log lines for this pod that carry a time.
    pub log: Vec<String>,
    /// containerd's log lines naming this pod (with their timestamps), and
    /// the wall clock (Unix ms) when ctr was started and when it returned.
    #[serde(default)]
    pub raw: Vec<String>,
    #[serde(default)]
    pub ctr_start_unix_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StartSeries {
    pub label: String,
    pub samples_ms: Vec<f64>,
    pub summary: Summary,
    pub splits: Vec<Split>,
    /// CPU time (all CPUs of the machine, idle noise subtracted) per start.
    pub cpu_ms: Vec<f64>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Burst {
    pub n: usize,
    pub wall_ms: f64,
    pub latencies_ms: Vec<f64>,
    pub summary: Summary,
    pub failures: usize,
    pub errors: Vec<String>,
    /// Machine CPU time over the burst (ms).
    pub cpu_ms: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProcMem {
    pub pid: u32,
    pub kind: String,
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub private_kib: u64,
    /// hull-vmm only: the template memory file's mapping.
    pub template_rss_kib: u64,
    pub template_pss_kib: u64,
    /// Pages of the template mapping this VM wrote (copied on write).
    pub template_anon_kib: u64,
    /// PSS by mapping name (the path's file name, or `[heap]`, `[anon]`,
    /// ...), to say where a process's memory is.
    #[serde(default)]
    pub pss_by_mapping_kib: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Density {
    pub k: usize,
    pub running: usize,
    pub procs: Vec<ProcMem>,
    /// Sum of PSS of every hull-vmm, shim and virtiofsd, divided by K.
    pub pss_per_sandbox_kib: f64,
    /// The part of that PSS that is the template file's shared pages.
    pub template_pss_per_sandbox_kib: f64,
    /// PSS per sandbox beyond the shared template pages.
    pub beyond_template_per_sandbox_kib: f64,
    /// The template's resident file pages (counted once for all sandboxes).
    pub template_resident_kib: u64,
    /// Per-kind PSS per sandbox.
    pub by_kind_kib: BTreeMap<String, f64>,
    /// Private_Clean + Private_Dirty of each hull-vmm.
    pub vmm_private_kib: Summary,
    /// Machine CPU (ms per s) with the K sandboxes idle, and before they
    /// started: what an idle sandbox costs in CPU (its guest's timers etc.).
    #[serde(default)]
    pub idle_cpu_ms_per_s: f64,
    #[serde(default)]
    pub idle_cpu_before_ms_per_s: f64,
    /// Where that idle CPU goes: ms per s per sandbox, by process kind and
    /// thread name ("hull-vmm vcpu0", "shim tokio-runtime-w", ...); a
    /// vCPU thread's figure includes the guest's own run time.
    #[serde(default)]
    pub idle_cpu_by_thread: BTreeMap<String, f64>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PodsResult {
    pub host: String,
    pub cpus: usize,
    /// The shim understands `defaults.template`.
    pub template_supported: bool,
    pub template_build_ms: Option<f64>,
    pub qemu: StartSeries,
    pub cold: StartSeries,
    pub template: StartSeries,
    /// CPU time of one template start (from `template.cpu_ms`).
    pub cpu_one_start: Summary,
    /// Idle CPU use of the machine (ms of CPU per s), subtracted above.
    pub idle_cpu_ms_per_s: f64,
    /// Wall time of `ctr task ls -q` (ctr's own start + one containerd call):
    /// the floor under every `ctr run -d` figure.
    #[serde(default)]
    pub ctr_floor: Summary,
    pub bursts: Vec<Burst>,
    pub density: Option<Density>,
    pub errors: Vec<String>,
}

struct Env {
    opts: PodsOptions,
    work: PathBuf,
    ctrd: PathBuf,
    config: PathBuf,
    state: PathBuf,
    containerd: Child,
    path_env: String,
    ctrd_log: PathBuf,
    seq: usize,
    started: std::sync::Mutex<BTreeMap<String, f64>>,
}

fn log(msg: impl AsRef<str>) {
    eprintln!("hull-bench: {}", msg.as_ref());
}

pub fn run(opts: PodsOptions) -> Result<PodsResult> {
    let mut env = Env::start(opts)?;
    let r = env.measure();
    env.stop();
    r
}

impl Env {
    fn start(opts: PodsOptions) -> Result<Env> {
        for p in [&opts.kernel, &opts.initramfs, &opts.rootfs_builder, &opts.virtiofsd] {
            ensure!(p.exists(), "{} does not exist", p.display());
        }
        for b in ["hull-vmm", "containerd-shim-hull-v2"] {
            ensure!(opts.bin_dir.join(b).exists(), "{} missing in {}", b, opts.bin_dir.display());
        }
        let work = tempfile::Builder::new().prefix("hull-bench.").tempdir()?.keep();
        let ctrd = work.join("containerd");
        std::fs::create_dir_all(&ctrd)?;
        // Snapshots need a file system overlayfs accepts as upper.
        run_ok(Command::new("mount").args(["-t", "tmpfs", "-o", "mode=0700", "hull-bench-ctrd"]).arg(&ctrd))?;
        for d in ["root", "state", "cni/conf", "cni/bin", "tmp"] {
            std::fs::create_dir_all(ctrd.join(d))?;
        }
        let c = |p: &str| ctrd.join(p).display().to_string();
        let toml = format!(
            "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\n  address = \"{}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  conf_dir = \"{}\"\n  bin_dir = \"{}\"\n\
             [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  runtime_type = \"io.containerd.runc.v2\"\n",
            c("root"),
            c("state"),
            c("containerd.sock"),
            c("cni/conf"),
            c("cni/bin")
        );
        std::fs::write(ctrd.join("config.toml"), toml)?;
        // The shim is found on PATH by its name.
        let bin = work.join("bin");
        std::fs::create_dir_all(&bin)?;
        std::os::unix::fs::symlink(opts.bin_dir.join("containerd-shim-hull-v2"), bin.join("containerd-shim-hull-v2"))?;
        let path_env = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
        let config = work.join("config.toml");
        let state = PathBuf::from(format!("/run/hull-bench-{}", std::process::id()));
        let ctrd_log = ctrd.join("containerd.log");
        let containerd = Command::new("containerd")
            .arg("--config")
            .arg(ctrd.join("config.toml"))
            .env("PATH", &path_env)
            .env("HULL_CONFIG", &config)
            .env("TMPDIR", ctrd.join("tmp"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&ctrd_log)?)
            .stderr(std::fs::File::create(&ctrd_log)?.try_clone()?)
            .spawn()
            .context("starting containerd (apt-get install containerd)")?;
        let env = Env {
            opts,
            work,
            ctrd,
            config,
            state,
            containerd,
            path_env,
            ctrd_log,
            seq: 0,
            started: Default::default(),
        };
        let t = Instant::now();
        while !env.ctrd.join("containerd.sock").exists() {
            if t.elapsed() > Duration::from_secs(60) {
                bail!("containerd did not start: {}", tail(&env.ctrd_log, 20));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(env)
    }

    fn stop(&mut self) {
        let _ = self.containerd.kill();
        let _ = self.containerd.wait();
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("timeout");
        c.args(["-s", "KILL", &self.opts.ctr_timeout.to_string(), "ctr", "--address"])
            .arg(self.ctrd.join("containerd.sock"))
            .args(args)
            .env("TMPDIR", self.ctrd.join("tmp"))
            .stdin(Stdio::null());
        c
    }

    fn shim(&self, arg: &str) -> Command {
        let mut c = Command::new(self.opts.bin_dir.join("containerd-shim-hull-v2"));
        c.arg(arg).env("HULL_CONFIG", &self.config).env("PATH", &self.path_env).stdin(Stdio::null());
        c
    }

    /// The shim's config; `template` = None leaves the key out.
    fn write_config(&self, template: Option<bool>, pool: usize) -> Result<()> {
        let o = &self.opts;
        let mut s = format!(
            "[paths]\nkernel = \"{}\"\ninitramfs = \"{}\"\nhull_vmm = \"{}\"\nvirtiofsd = \"{}\"\nstate_dir = \"{}\"\n\n\
             [defaults]\nvcpus = 1\nmem_mib = {}\ndisks_per_pod = {}\ndisk_size_mib = 64\ndisk_pool_size = {pool}\n\
             agent_ready_timeout_secs = 600\nagent_call_timeout_secs = 600\nlog_level = \"info\"\n",
            o.kernel.display(),
            o.initramfs.display(),
            o.bin_dir.join("hull-vmm").display(),
            o.virtiofsd.display(),
            self.state.display(),
            o.mem_mib,
            o.disks_per_pod,
        );
        if let Some(t) = template {
            // The keys that came with templates and the host cgroup pool; the
            // cgroup pool as large as the disk pool, so bursts take pooled ones.
            s.push_str(&format!("template = {t}\ncgroup_pool_size = {pool}\n"));
            s = s.replace("state_dir = ", "cgroup_parent = \"hull-bench\"\nstate_dir = ");
        }
        std::fs::write(&self.config, s)?;
        Ok(())
    }

    fn fill_pool(&self) -> Result<()> {
        if self.opts.disks_per_pod == 0 {
            return Ok(());
        }
        let out = self.shim("fill-disk-pool").output()?;
        ensure!(out.status.success(), "fill-disk-pool: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(())
    }

    fn next_id(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}{}", self.seq)
    }

    /// `ctr run -d` of a pod that idles; its wall time in ms.
    fn start_pod(&self, id: &str) -> Result<f64> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        self.started.lock().unwrap().insert(id.to_string(), now.as_secs_f64() * 1e3);
        let t = Instant::now();
        let out = self
            .ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "1000000"])
            .output()
            .context("running ctr")?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if !out.status.success() {
            let text = std::fs::read_to_string(&self.ctrd_log).unwrap_or_default();
            let mine: Vec<&str> = text.lines().filter(|l| l.contains(id)).collect();
            bail!(
                "ctr run {id} after {ms:.0} ms: {} {}; containerd log for it (last 8):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                mine[mine.len().saturating_sub(8)..].join("\n")
            );
        }
        Ok(ms)
    }

    fn remove_pod(&self, id: &str) {
        let t = Instant::now();
        self.remove_pod_inner(id);
        if t.elapsed() > Duration::from_secs(20) {
            log(format!("  removing {id} took {:.0} s", t.elapsed().as_secs_f64()));
        }
    }

    fn remove_pod_inner(&self, id: &str) {
        let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]).output();
        for _ in 0..30 {
            let out = self.ctr(&["task", "delete", "-f", id]).output();
            if out.map(|o| o.status.success()).unwrap_or(false) {
                break;
            }
            if !self.task_exists(id) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.ctr(&["container", "delete", id]).output();
    }

    fn task_exists(&self, id: &str) -> bool {
        self.ctr(&["task", "ls", "-q"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == id))
            .unwrap_or(false)
    }

    fn remove_all(&self, ids: &[String]) {
        let par = 4.min(ids.len().max(1));
        std::thread::scope(|s| {
            for chunk in ids.chunks(ids.len().div_ceil(par).max(1)) {
                s.spawn(move || chunk.iter().for_each(|id| self.remove_pod(id)));
            }
        });
        self.wait_quiet();
    }

    /// Until no hull-vmm or virtiofsd is left (30 s at most).
    fn wait_quiet(&self) {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30)
            && procs().iter().any(|(_, k)| k.starts_with("hull-vmm") || k == "virtiofsd")
        {
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn split(&self, id: &str, total_ms: f64) -> Split {
        let text = std::fs::read_to_string(&self.ctrd_log).unwrap_or_default();
        let needle = format!("pod {id}:");
        let mut s = Split { total_ms, ..Default::default() };
        for line in text.lines().filter(|l| l.contains(&needle) && l.contains(" ms")) {
            let msg = line.split_once(&needle).map(|(_, m)| m).unwrap_or(line);
            let msg = msg.split('"').next().unwrap_or(msg).trim().to_string();
            if let Some(v) = number_before(&msg, " ms after start") {
                s.agent_ready_ms = Some(v);
            }
            if let Some(v) = number_after(&msg, "ready in ") {
                s.sandbox_ready_ms = Some(v);
            }
            s.log.push(msg);
        }
        s.raw = text.lines().filter(|l| l.contains(id)).take(40).map(str::to_string).collect();
        s.ctr_start_unix_ms = self.started.lock().unwrap().get(id).copied().unwrap_or(0.0);
        s
    }

    fn measure(&mut self) -> Result<PodsResult> {
        let o = self.opts.clone();
        let mut r = PodsResult {
            host: if tools_host_is_lab() { "lab".into() } else { "native".into() },
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            ..Default::default()
        };
        let max_n = o.concurrency.iter().copied().max().unwrap_or(1).max(o.density).max(1);
        let pool = max_n + 2;
        // Does the shim take `defaults.template`? (An unknown key is an error.)
        self.write_config(Some(false), pool)?;
        r.template_supported = self.shim("fill-disk-pool").output().map(|o| o.status.success()).unwrap_or(false);
        if !r.template_supported {
            log("the shim does not know defaults.template: every pod cold boots (template figures are cold boots)");
            self.write_config(None, pool)?;
        }
        log("building and importing the test image");
        let layer = self.work.join("layer");
        let tar = self.work.join("image.tar");
        run_ok(Command::new(&o.rootfs_builder).arg("busybox-layer").arg("--out").arg(&layer))?;
        run_ok(
            Command::new(&o.rootfs_builder)
                .args(["oci-image", "--layer"])
                .arg(&layer)
                .args(["--name", IMAGE, "--out"])
                .arg(&tar),
        )?;
        run_ok(&mut self.ctr(&["image", "import", &tar.display().to_string()]))?;
        log("filling the disk pool");
        self.fill_pool()?;
        r.idle_cpu_ms_per_s = idle_rate(Duration::from_secs(3));
        log(format!("idle CPU: {:.1} ms/s", r.idle_cpu_ms_per_s));
        let mut floor = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            if self.ctr(&["task", "ls", "-q"]).output().map(|o| o.status.success()).unwrap_or(false) {
                floor.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        r.ctr_floor = Summary::of(&floor);
        log(format!("ctr floor (task ls): p50 {:.0} ms", r.ctr_floor.p50));

        // --- baseline: QEMU microvm cold boot to the agent's ready line ---
        log(format!("QEMU microvm boot to ready, {} runs", o.runs));
        r.qemu = StartSeries { label: "QEMU microvm cold boot (to agent ready)".into(), ..Default::default() };
        for i in 0..o.runs {
            match qemu_boot(&o, 200 + i as u32) {
                Ok(ms) => r.qemu.samples_ms.push(ms),
                Err(e) => r.qemu.errors.push(format!("{e:#}")),
            }
        }
        r.qemu.summary = Summary::of(&r.qemu.samples_ms);

        // --- cold boot through containerd ---
        if r.template_supported {
            self.write_config(Some(false), pool)?;
        }
        log(format!("cold boot through containerd, {} runs", o.runs));
        r.cold = self.series("hull cold boot (ctr run -d)", "cold", o.runs, r.idle_cpu_ms_per_s)?;

        // --- template restore through containerd ---
        if r.template_supported {
            self.write_config(Some(true), pool)?;
            log("building the template (timed separately)");
            let t = Instant::now();
            let out = self.shim("build-template").output()?;
            if out.status.success() {
                r.template_build_ms = Some(t.elapsed().as_secs_f64() * 1e3);
            } else {
                // An older shim: the first pod builds it.
                log(format!("build-template: {}", String::from_utf8_lossy(&out.stderr).trim()));
                let id = self.next_id("warm");
                let t = Instant::now();
                match self.start_pod(&id) {
                    Ok(_) => r.template_build_ms = Some(t.elapsed().as_secs_f64() * 1e3),
                    Err(e) => r.errors.push(format!("template warm-up: {e:#}")),
                }
                self.remove_pod(&id);
            }
            // One warm-up start (page cache of the template file).
            let id = self.next_id("warm");
            if let Err(e) = self.start_pod(&id) {
                r.errors.push(format!("template warm-up: {e:#}"));
            }
            self.remove_pod(&id);
            self.wait_quiet();
        }
        log(format!("template start through containerd, {} runs", o.runs));
        let label =
            if r.template_supported { "hull template restore (ctr run -d)" } else { "hull (no template: cold boot)" };
        r.template = self.series(label, "tmpl", o.runs, r.idle_cpu_ms_per_s)?;
        r.cpu_one_start = Summary::of(&r.template.cpu_ms);
        emit(&r);

        // --- N at once ---
        for &n in &o.concurrency {
            self.fill_pool()?;
            self.wait_quiet();
            log(format!("{n} pods at once"));
            let b = self.burst(n, r.idle_cpu_ms_per_s);
            log(format!(
                "  N={n}: wall {:.0} ms, p50 {:.0} ms, p99 {:.0} ms, {} failed",
                b.wall_ms, b.summary.p50, b.summary.p99, b.failures
            ));
            r.bursts.push(b);
            emit(&r);
        }

        // --- K idle sandboxes ---
        if o.density > 0 {
            self.fill_pool()?;
            self.wait_quiet();
            log(format!("{} idle sandboxes", o.density));
            r.density = Some(self.density(o.density));
        }
        Ok(r)
    }

    fn series(&mut self, label: &str, prefix: &str, runs: usize, idle: f64) -> Result<StartSeries> {
        let mut s = StartSeries { label: label.into(), ..Default::default() };
        for _ in 0..runs {
            self.wait_quiet();
            let id = self.next_id(prefix);
            let c0 = cpu_ms();
            let t0 = Instant::now();
            let res = self.start_pod(&id);
            // Work the start left running (background threads) settles within a second.
            std::thread::sleep(Duration::from_secs(1));
            let cpu = cpu_ms() - c0 - idle * t0.elapsed().as_secs_f64();
            match res {
                Ok(ms) => {
                    s.samples_ms.push(ms);
                    s.cpu_ms.push(cpu.max(0.0));
                    s.splits.push(self.split(&id, ms));
                    log(format!("  {id}: {ms:.0} ms, CPU {cpu:.0} ms"));
                }
                Err(e) => {
                    log(format!("  {id}: {e:#}"));
                    s.errors.push(format!("{e:#}"));
                }
            }
            self.remove_pod(&id);
        }
        s.summary = Summary::of(&s.samples_ms);
        Ok(s)
    }

    fn burst(&mut self, n: usize, idle: f64) -> Burst {
        let ids: Vec<String> = (0..n).map(|_| self.next_id(&format!("n{n}-"))).collect();
        let me = &*self;
        let c0 = cpu_ms();
        let t0 = Instant::now();
        let results: Vec<Result<f64>> = std::thread::scope(|s| {
            let hs: Vec<_> = ids.iter().map(|id| s.spawn(move || me.start_pod(id))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))).collect()
        });
        let wall = t0.elapsed();
        let cpu = cpu_ms() - c0 - idle * wall.as_secs_f64();
        let mut b = Burst { n, wall_ms: wall.as_secs_f64() * 1e3, cpu_ms: cpu.max(0.0), ..Default::default() };
        for r in results {
            match r {
                Ok(ms) => b.latencies_ms.push(ms),
                Err(e) => {
                    b.failures += 1;
                    if b.errors.len() < 5 {
                        b.errors.push(format!("{e:#}"));
                    }
                }
            }
        }
        b.summary = Summary::of(&b.latencies_ms);
        self.remove_all(&ids);
        b
    }

    fn density(&mut self, k: usize) -> Density {
        let ids: Vec<String> = (0..k).map(|_| self.next_id("idle")).collect();
        let mut d = Density { k, ..Default::default() };
        d.idle_cpu_before_ms_per_s = idle_rate(Duration::from_secs(5));
        // Two at a time: the sandboxes are idle when measured either way.
        let me = &*self;
        std::thread::scope(|s| {
            let hs: Vec<_> = ids
                .chunks(k.div_ceil(2).max(1))
                .map(|chunk| s.spawn(move || chunk.iter().map(|id| me.start_pod(id)).collect::<Vec<_>>()))
                .collect();
            for h in hs {
                for r in h.join().unwrap_or_default() {
                    match r {
                        Ok(_) => d.running += 1,
                        Err(e) => d.errors.push(format!("{e:#}")),
                    }
                }
            }
        });
        // Let start-up work (page cache, background refills) settle.
        std::thread::sleep(Duration::from_secs(5));
        let hull = procs();
        let t0 = (thread_cpu_ms(&hull), Instant::now());
        d.idle_cpu_ms_per_s = idle_rate(Duration::from_secs(10));
        let (t1, secs) = (thread_cpu_ms(&hull), t0.1.elapsed().as_secs_f64());
        for (name, ms) in t1 {
            let delta = ms - t0.0.get(&name).copied().unwrap_or(0.0);
            *d.idle_cpu_by_thread.entry(name).or_default() = delta / secs / d.running.max(1) as f64;
        }
        let template_inodes = template_memory_inodes(&self.state.join("templates"));
        for (pid, kind) in hull {
            match proc_mem(pid, &kind, &template_inodes) {
                Ok(m) => d.procs.push(m),
                Err(e) => d.errors.push(format!("{kind} {pid}: {e:#}")),
            }
        }
        let kk = d.running.max(1) as f64;
        let pss: u64 = d.procs.iter().map(|p| p.pss_kib).sum();
        let tmpl: u64 = d.procs.iter().map(|p| p.template_pss_kib.saturating_sub(p.template_anon_kib)).sum();
        d.pss_per_sandbox_kib = pss as f64 / kk;
        d.template_pss_per_sandbox_kib = tmpl as f64 / kk;
        d.beyond_template_per_sandbox_kib = (pss - tmpl) as f64 / kk;
        d.template_resident_kib =
            d.procs.iter().map(|p| p.template_rss_kib.saturating_sub(p.template_anon_kib)).max().unwrap_or(0);
        for p in &d.procs {
            *d.by_kind_kib.entry(p.kind.clone()).or_default() += p.pss_kib as f64 / kk;
        }
        let vmm_private: Vec<f64> =
            d.procs.iter().filter(|p| p.kind == "hull-vmm").map(|p| p.private_kib as f64).collect();
        d.vmm_private_kib = Summary::of(&vmm_private);
        self.remove_all(&ids);
        d
    }
}

fn tools_host_is_lab() -> bool {
    // The lab's root is an overlay of the host's over 9p.
    std::fs::read_to_string("/proc/mounts").map(|m| m.lines().any(|l| l.contains(" 9p "))).unwrap_or(false)
}

fn run_ok(c: &mut Command) -> Result<Output> {
    let out = c.output().with_context(|| format!("running {c:?}"))?;
    ensure!(out.status.success(), "{c:?}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    Ok(out)
}

fn tail(p: &Path, n: usize) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn number_before(s: &str, suffix: &str) -> Option<f64> {
    let i = s.find(suffix)?;
    let head = &s[..i];
    let start = head.rfind(|c: char| !(c.is_ascii_digit() || c == '.')).map(|j| j + 1).unwrap_or(0);
    head[start..].parse().ok()
}

fn number_after(s: &str, prefix: &str) -> Option<f64> {
    let i = s.find(prefix)? + prefix.len();
    let rest = &s[i..];
    let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Prints the results so far (the last such line wins: a run cut short
/// still reports what it measured).
fn emit(r: &PodsResult) {
    if let Ok(j) = serde_json::to_string(r) {
        println!("{JSON_MARK}{j}");
    }
}

/// Busy CPU time of the whole machine so far (ms): /proc/stat's user, nice,
/// system, irq, softirq and steal (guest time is inside user).
pub fn cpu_ms() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> =
        text.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    if f.len() < 8 {
        return 0.0;
    }
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) * 1000.0 / hz
}

fn idle_rate(d: Duration) -> f64 {
    let c0 = cpu_ms();
    let t = Instant::now();
    std::thread::sleep(d);
    (cpu_ms() - c0) / t.elapsed().as_secs_f64()
}

/// CPU time (user + system, ms) so far of the threads of `procs`, summed by
/// "kind thread-name" (digits at the end of a name kept: vcpu0 ≠ vcpu1).
fn thread_cpu_ms(procs: &[(u32, String)]) -> BTreeMap<String, f64> {
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut out = BTreeMap::new();
    for (pid, kind) in procs {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for t in rd.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else { continue };
            let Some(ticks) = stat_cpu_ticks(&stat) else { continue };
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            *out.entry(format!("{kind} {}", comm.trim())).or_default() += ticks as f64 * 1000.0 / hz;
        }
    }
    out
}

/// utime + stime (fields 14 and 15) of a /proc/.../stat line.
fn stat_cpu_ticks(stat: &str) -> Option<u64> {
    // The name in parentheses may hold spaces: count fields after it.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split(' ').collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// (pid, kind) of every hull-vmm, virtiofsd and hull shim.
fn procs() -> Vec<(u32, String)> {
    let mut v = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return v };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let kind = match comm.trim() {
            "hull-vmm" => "hull-vmm",
            "virtiofsd" => "virtiofsd",
            "containerd-shim" => {
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                if !String::from_utf8_lossy(&cmd).contains("hull") {
                    continue;
                }
                "shim"
            }
            _ => continue,
        };
        v.push((pid, kind.to_string()));
    }
    // A jailed hull-vmm forks: the outer process only waits for the VMM (its
    // child, PID 1 of the jail's namespace). Counted, under its own name.
    let ppid = |pid: u32| {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        st.lines().find_map(|l| l.strip_prefix("PPid:")).and_then(|x| x.trim().parse::<u32>().ok())
    };
    let vmms: Vec<u32> = v.iter().filter(|(_, k)| k == "hull-vmm").map(|(p, _)| *p).collect();
    let parents: HashSet<u32> = vmms.iter().filter_map(|p| ppid(*p)).collect();
    for (pid, kind) in &mut v {
        if kind == "hull-vmm" && parents.contains(pid) {
            *kind = "hull-vmm (jail parent)".into();
        }
    }
    v
}

/// Inode numbers of the templates' memory files (`templates/*/memory`).
fn template_memory_inodes(templates: &Path) -> HashSet<u64> {
    use std::os::unix::fs::MetadataExt;
    let Ok(rd) = std::fs::read_dir(templates) else { return HashSet::new() };
    rd.flatten().filter_map(|e| std::fs::metadata(e.path().join("memory")).ok()).map(|m| m.ino()).collect()
}

/// PSS etc. of one process; for hull-vmm also its template mapping. The
/// mapping is found by inode, not by path: a jailed hull-vmm maps the file
/// under its bind-mount name inside the jail.
fn proc_mem(pid: u32, kind: &str, template_inodes: &HashSet<u64>) -> Result<ProcMem> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(parse_smaps(pid, kind, &text, template_inodes))
}

fn parse_smaps(pid: u32, kind: &str, text: &str, template_inodes: &HashSet<u64>) -> ProcMem {
    let mut m = ProcMem { pid, kind: kind.into(), ..Default::default() };
    let mut in_template = false;
    let mut name = String::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let Some(first) = it.next() else { continue };
        if !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let mut f = line.split_whitespace().skip(4);
            let inode = f.next().and_then(|i| i.parse::<u64>().ok()).unwrap_or(0);
            let path = f.next().unwrap_or("");
            in_template = inode != 0 && path.ends_with("memory") && template_inodes.contains(&inode);
            name = match path.rsplit('/').next() {
                _ if in_template => "template memory".to_string(),
                Some(n) if !n.is_empty() => n.to_string(),
                _ => "[anon]".to_string(),
            };
            continue;
        }
        let Some(kib) = it.next().and_then(|x| x.parse::<u64>().ok()) else { continue };
        match first {
            "Rss:" => {
                m.rss_kib += kib;
                if in_template {
                    m.template_rss_kib += kib;
                }
            }
            "Pss:" => {
                m.pss_kib += kib;
                if kib > 0 {
                    *m.pss_by_mapping_kib.entry(name.clone()).or_default() += kib;
                }
                if in_template {
                    m.template_pss_kib += kib;
                }
            }
            "Private_Clean:" | "Private_Dirty:" => m.private_kib += kib,
            "Anonymous:" if in_template => m.template_anon_kib += kib,
            _ => {}
        }
    }
    m
}

/// QEMU microvm (vhost-vsock) with the same kernel and initramfs: process
/// start → the agent's ready line on the console (polled every 2 ms).
fn qemu_boot(o: &PodsOptions, cid: u32) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let console = dir.path().join("console.log");
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host", "-m", &o.mem_mib.to_string(), "-smp", "1"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .arg("-kernel")
        .arg(&o.kernel)
        .arg("-initrd")
        .arg(&o.initramfs)
        .args(["-append", "console=ttyS0 reboot=t panic=-1 quiet"])
        .arg("-chardev")
        .arg(format!("file,id=con,path={}", console.display()))
        .args(["-serial", "chardev:con"])
        .args(["-device", &format!("vhost-vsock-device,guest-cid={cid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let mut child = c.spawn().context("starting qemu-system-x86_64")?;
    let r = loop {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains("hull-agent: ready") {
            break Ok(start.elapsed().as_secs_f64() * 1e3);
        }
        if start.elapsed() > Duration::from_secs(300) || child.try_wait()?.is_some() {
            break Err(anyhow::anyhow!("QEMU: no ready line; console:\n{}", text));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = child.kill();
    let _ = child.wait();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_in_log_lines() {
        let m = "hull-agent: ready 1 (1234 ms after start)";
        assert_eq!(number_before(m, " ms after start"), Some(1234.0));
        assert_eq!(number_after("ready in 87 ms (1 vCPU)", "ready in "), Some(87.0));
        assert_eq!(number_after("nothing", "ready in "), None);
    }

    #[test]
    fn thread_cpu_from_stat() {
        // A name with spaces and a parenthesis; utime 250, stime 31.
        let stat = "812 (vcpu 0) x) S 800 812 800 0 -1 4194624 1 0 0 0 250 31 0 0 20 0 4 0 900";
        assert_eq!(stat_cpu_ticks(stat), Some(281));
        assert_eq!(stat_cpu_ticks("812 (x) S 1 2"), None);
        // This test's own threads: some CPU, summed under "kind name".
        let me = std::process::id();
        let busy = Instant::now();
        while busy.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        let by = thread_cpu_ms(&[(me, "test".into())]);
        assert!(by.keys().all(|k| k.starts_with("test ")), "{by:?}");
        assert!(by.values().sum::<f64>() > 0.0, "{by:?}");
    }

    #[test]
    fn smaps_by_mapping() {
        let text = "\
7f00-7f10 rw-p 00000000 00:2a 77 /jail/run/memory
Rss:                 400 kB
Pss:                 100 kB
Private_Dirty:        40 kB
Anonymous:            40 kB
7f10-7f20 r-xp 00000000 00:2a 12 /usr/bin/hull-vmm
Rss:                  80 kB
Pss:                  80 kB
Private_Clean:        80 kB
7f20-7f30 rw-p 00000000 00:00 0 [heap]
Pss:                  30 kB
7f30-7f40 rw-p 00000000 00:00 0
Pss:                   6 kB
";
        let m = parse_smaps(9, "hull-vmm", text, &HashSet::from([77]));
        assert_eq!((m.rss_kib, m.pss_kib, m.private_kib), (480, 216, 120));
        assert_eq!((m.template_rss_kib, m.template_pss_kib, m.template_anon_kib), (400, 100, 40));
        let want: BTreeMap<String, u64> = [("template memory", 100), ("hull-vmm", 80), ("[heap]", 30), ("[anon]", 6)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(m.pss_by_mapping_kib, want);
        // Another inode is not the template.
        let m = parse_smaps(9, "shim", text, &HashSet::from([78]));
        assert_eq!(m.template_pss_kib, 0);
        assert_eq!(m.pss_by_mapping_kib["memory"], 100);
    }

    #[test]
    fn cpu_time_moves() {
        let a = cpu_ms();
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(50) {}
        assert!(cpu_ms() >= a);
    }
}
