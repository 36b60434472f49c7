//! hull-bench: the benchmark harness of issue 6. One command
//! (`scripts/bench.sh` builds what it needs and runs `hull-bench run`):
//!
//! - natively on this host: the host-side restore path (no guest runs);
//! - where microVMs run (in the lab on a PVM-only host, as one lab run):
//!   cold start through containerd (template restore, cold boot, QEMU
//!   microvm as the baseline), N pods at once, K idle sandboxes' memory.
//!
//! Prints a table with PASS/MISS per target and writes `bench.json` and PNG
//! plots to the output directory (`target/bench`).

mod native;
mod pods;
mod report;
mod stats;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Parser)]
#[command(
    name = "hull-bench",
    version,
    about = "hull's benchmark harness (issue 6): prints a table, writes JSON and PNGs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Everything: the native restore path here, the pod measurements where
    /// microVMs run (the lab here), then the report.
    Run(RunArgs),
    /// Only the native host-side restore path, and its report.
    Native {
        #[command(flatten)]
        n: NativeArgs,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
    /// The pod measurements on this host (needs a KVM host that runs guests:
    /// what `run` starts inside the lab). Prints one HULL_BENCH_JSON line.
    Pods(PodArgs),
    /// Print the table and redraw the plots from a bench.json.
    Report {
        #[arg(default_value = "target/bench/bench.json")]
        json: PathBuf,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
    },
}

#[derive(Args, Clone)]
struct NativeArgs {
    /// Iterations of the native restore path.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// MiB of non-zero pages in the native snapshot's memory file.
    #[arg(long, default_value_t = 16)]
    touched_mib: u64,
}

#[derive(Args, Clone)]
struct PodArgs {
    /// Pod starts per cold-start series (QEMU, cold boot, template).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Pods started at once, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    concurrency: Vec<usize>,
    /// Idle sandboxes for the density figure (0: skip).
    #[arg(long, default_value_t = 10)]
    density: usize,
    /// Guest memory of each pod VM (MiB).
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Writable-layer disks per pod (the shim's defaults.disks_per_pod).
    #[arg(long, default_value_t = 1)]
    disks_per_pod: u32,
    /// Guest kernel [env HULL_KERNEL].
    #[arg(long, env = "HULL_KERNEL")]
    kernel: PathBuf,
    /// Guest initramfs [env HULL_INITRAMFS].
    #[arg(long, env = "HULL_INITRAMFS")]
    initramfs: PathBuf,
    /// Directory with hull-vmm and containerd-shim-hull-v2 (default: this binary's).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// hull-rootfs-builder (default: in --bin-dir, else target/debug).
    #[arg(long)]
    rootfs_builder: Option<PathBuf>,
    /// virtiofsd (default: on PATH or ~/.cargo/bin).
    #[arg(long)]
    virtiofsd: Option<PathBuf>,
    /// Seconds each ctr command may take (at N = 50 on 2 emulated CPUs a
    /// start takes over 180 s: every start of a burst shares the CPUs).
    #[arg(long, default_value_t = 600)]
    ctr_timeout: u64,
}

#[derive(Args, Clone)]
struct RunArgs {
    #[command(flatten)]
    native: NativeArgs,
    #[command(flatten)]
    pods: PodArgs,
    /// Output directory for bench.json and the PNGs.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    #[arg(long)]
    skip_native: bool,
    #[arg(long)]
    skip_pods: bool,
    /// Memory of the lab machine (MiB).
    #[arg(long, default_value_t = 12288)]
    lab_mem: u32,
    /// Seconds the lab run may take.
    #[arg(long, default_value_t = 5400)]
    lab_timeout: u64,
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Some(Cmd::Run(a)) => run(a),
        None => {
            // `hull-bench` alone = `hull-bench run` with its defaults.
            let a = Cli::parse_from(["hull-bench", "run"]);
            match a.cmd {
                Some(Cmd::Run(a)) => run(a),
                _ => unreachable!(),
            }
        }
        Some(Cmd::Native { n, out }) => native_only(n, &out),
        Some(Cmd::Pods(p)) => pods_here(p),
        Some(Cmd::Report { json, out }) => redraw(&json, &out),
    };
    if let Err(e) = r {
        eprintln!("hull-bench: {e:#}");
        std::process::exit(1);
    }
}

fn native_opts(n: &NativeArgs) -> native::NativeOptions {
    native::NativeOptions { iterations: n.iterations, mem_mib: 128, vcpus: 1, touched_mib: n.touched_mib }
}

fn native_only(n: NativeArgs, out: &Path) -> Result<()> {
    eprintln!("hull-bench: native restore path, {} iterations", n.iterations);
    let nat = native::run(&native_opts(&n))?;
    finish(report::Report::new(Some(nat), None), out)
}

fn finish(r: report::Report, out: &Path) -> Result<()> {
    report::print_table(&r);
    let files = report::write(&r, out)?;
    println!();
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

fn redraw(json: &Path, out: &Path) -> Result<()> {
    let r: report::Report =
        serde_json::from_slice(&std::fs::read(json).with_context(|| format!("reading {}", json.display()))?)?;
    let r = report::Report::new(r.native, r.pods);
    finish(r, out)
}

fn exe_dir() -> PathBuf {
    std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_else(|| ".".into())
}

fn find_virtiofsd() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| "/root".into());
    std::env::split_paths(&path)
        .map(|d| d.join("virtiofsd"))
        .chain([home.join(".cargo/bin/virtiofsd"), "/usr/libexec/virtiofsd".into()])
        .find(|p| p.exists())
}

fn abs(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn pod_options(p: &PodArgs) -> Result<pods::PodsOptions> {
    let bin_dir = abs(&p.bin_dir.clone().unwrap_or_else(exe_dir));
    let rootfs_builder = p.rootfs_builder.clone().unwrap_or_else(|| {
        let b = bin_dir.join("hull-rootfs-builder");
        if b.exists() {
            b
        } else {
            PathBuf::from("target/debug/hull-rootfs-builder")
        }
    });
    let virtiofsd = match &p.virtiofsd {
        Some(v) => v.clone(),
        None => find_virtiofsd().context("virtiofsd not found (scripts/setup.sh installs it)")?,
    };
    Ok(pods::PodsOptions {
        runs: p.runs,
        concurrency: p.concurrency.clone(),
        density: p.density,
        mem_mib: p.mem_mib,
        disks_per_pod: p.disks_per_pod,
        kernel: abs(&p.kernel),
        initramfs: abs(&p.initramfs),
        bin_dir,
        rootfs_builder: abs(&rootfs_builder),
        virtiofsd: abs(&virtiofsd),
        ctr_timeout: p.ctr_timeout,
    })
}

fn pods_here(p: PodArgs) -> Result<()> {
    let r = pods::run(pod_options(&p)?)?;
    println!("{}{}", pods::JSON_MARK, serde_json::to_string(&r)?);
    Ok(())
}

fn run(a: RunArgs) -> Result<()> {
    let nat = if a.skip_native {
        None
    } else {
        eprintln!("hull-bench: native restore path, {} iterations", a.native.iterations);
        Some(native::run(&native_opts(&a.native))?)
    };
    let pods = if a.skip_pods { None } else { Some(run_pods(&a)?) };
    finish(report::Report::new(nat, pods), &a.out)
}

/// The pod measurements: here if this host runs microVMs, else `hull-bench
/// pods` inside the lab (one lab run, so all figures share one machine).
fn run_pods(a: &RunArgs) -> Result<pods::PodsResult> {
    let o = pod_options(&a.pods)?;
    let host = hull_tools::runner::MicroVmHost::detect()?;
    if let hull_tools::runner::MicroVmHost::Native = host {
        return pods::run(o);
    }
    let me = abs(&std::env::current_exe()?);
    let lab = [exe_dir().join("hull-lab"), PathBuf::from("target/debug/hull-lab")]
        .into_iter()
        .find(|p| p.exists())
        .context("hull-lab not found next to hull-bench or in target/debug (cargo build -p hull-tools)")?;
    let conc: Vec<String> = o.concurrency.iter().map(|n| n.to_string()).collect();
    let mut c = Command::new(&lab);
    c.args(["run", "--timing", "--mem", &a.lab_mem.to_string(), "--timeout", &a.lab_timeout.to_string(), "--"])
        .arg(me)
        .args(["pods", "--runs", &o.runs.to_string(), "--concurrency", &conc.join(",")])
        .args(["--density", &o.density.to_string(), "--mem-mib", &o.mem_mib.to_string()])
        .args(["--disks-per-pod", &o.disks_per_pod.to_string(), "--ctr-timeout", &o.ctr_timeout.to_string()])
        .arg("--kernel")
        .arg(&o.kernel)
        .arg("--initramfs")
        .arg(&o.initramfs)
        .arg("--bin-dir")
        .arg(&o.bin_dir)
        .arg("--rootfs-builder")
        .arg(&o.rootfs_builder)
        .arg("--virtiofsd")
        .arg(&o.virtiofsd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    eprintln!("hull-bench: pod measurements in the lab (waits for the lab lock if another run holds it)");
    let mut child = c.spawn().with_context(|| format!("starting {}", lab.display()))?;
    let mut result: Option<pods::PodsResult> = None;
    for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        match line.strip_prefix(pods::JSON_MARK) {
            Some(j) => result = Some(serde_json::from_str(j).context("the lab's result line")?),
            None => eprintln!("{line}"),
        }
    }
    let st = child.wait()?;
    if !st.success() {
        eprintln!("hull-bench: the lab run ended with {st}: reporting what it measured before");
    }
    match result {
        Some(mut r) => {
            r.host = "lab (TCG-emulated KVM host)".into();
            Ok(r)
        }
        None => bail!("the lab run ended ({st}) without a result"),
    }
}
