//! containerd-shim-hull-v2: see the `hull_shim` library and docs/containerd.md.
//!
//! Besides containerd's shim commands (`start`, `delete`, serving), two of
//! its own: `containerd-shim-hull-v2 fill-disk-pool` formats the disk pool
//! up to `disk_pool_size`, and `containerd-shim-hull-v2 build-template`
//! builds the VM template for the default pod shape (install scripts run
//! both so the first pods start without formatting or booting; `hull
//! template build` runs the latter).

use hull_shim::config::Config;
use hull_shim::diskpool::DiskPool;

fn fill_disk_pool() -> Result<(), String> {
    let cfg = Config::load()?;
    let pool = DiskPool::new(cfg.disk_pool_dir(), cfg.defaults.disk_size_mib, cfg.defaults.disk_pool_size as usize)?;
    let made = pool.refill()?;
    println!("{}: {made} disk(s) formatted, {} ready", pool.dir().display(), pool.ready().len());
    Ok(())
}

fn build_template() -> Result<(), String> {
    let cfg = Config::load()?;
    cfg.check_files()?;
    hull_shim::sandbox::host_check()?;
    let shape = hull_shim::template::Shape {
        vcpus: cfg.defaults.vcpus,
        mem_mib: cfg.defaults.mem_mib,
        disk_slots: cfg.defaults.disks_per_pod as usize,
        nics: 1,
    };
    let t = std::time::Instant::now();
    let dir = hull_shim::template::ensure(&cfg, shape)?;
    println!("template {} ({shape:?}) ready in {} ms", dir.display(), t.elapsed().as_millis());
    Ok(())
}

fn main() -> std::process::ExitCode {
    // One malloc arena: a shim lives as long as its pod and allocates
    // little, so glibc's per-thread arenas would only keep idle memory.
    // SAFETY: mallopt before any other thread exists.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
    // No transparent huge pages for a shim's few KiB of stacks and buffers
    // (a 2 MiB-aligned range once touched costs a whole 2 MiB page; hull-vmm
    // does the same). SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    let own: Option<fn() -> Result<(), String>> = match std::env::args().nth(1).as_deref() {
        Some("fill-disk-pool") => Some(fill_disk_pool),
        Some("build-template") => Some(build_template),
        _ => None,
    };
    if let Some(command) = own {
        return match command() {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("containerd-shim-hull-v2: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    // A shim serves one pod: two workers are plenty, and on a many-core host
    // the default (one per CPU) would give every pod dozens of idle threads.
    let rt = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-hull-v2: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(hull_shim::shim::run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // containerd shows what `start` (and a server failing to come
            // up, through `start`) wrote to stdout.
            println!("containerd-shim-hull-v2: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
